"""Tests for spnet_dist.models: shapes, layouts, gates, skip execution, torchvision loading, configs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from spnet_dist.models import (MODELS, DynamicResNet, ModelOutput, StateDictError, build_model, build_router,
                               gumbel_st, load_torchvision_state_dict)
from spnet_dist.models.routers import AIGGate, SPNetRouter

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "model"
SMALL = ["resnet_tiny", "resnet32_cifar"]  # cheap configs for behavioural tests
CHEAP = [n for n in sorted(MODELS) if n not in ("resnet50", "resnet101")]
HEADS = {"multi_stage_heads": True}


def _x(model: DynamicResNet, b: int, size: int | None = None, seed: int = 0) -> torch.Tensor:
    s = size or model.image_size
    return torch.randn(b, 3, s, s, generator=torch.Generator().manual_seed(seed))


def _calibrate_bn(model: nn.Module, x: torch.Tensor) -> None:
    """Set BN running stats from one batch so eval activations stay O(1) (tolerances are meaningful)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rn50_heads() -> DynamicResNet:
    return build_model("resnet50", HEADS).eval()


@pytest.fixture(scope="module")
def rn101_heads() -> DynamicResNet:
    return build_model("resnet101", HEADS).eval()


# ---- configs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_yaml_matches_registry(path: Path) -> None:
    cfg = yaml.safe_load(path.read_text())
    assert cfg["name"] == path.stem
    assert cfg["num_classes"] == "auto"  # the pre-flight counts the class folders; the registry keeps a number
    assert cfg.pop("sync_bn") is False  # an engine key (registry.RUN_KEYS): off unless asked
    assert cfg == {**MODELS[path.stem], "num_classes": "auto"}


def test_every_registered_model_has_yaml() -> None:
    assert {p.stem for p in CONFIG_DIR.glob("*.yaml")} == set(MODELS)


def test_build_from_omegaconf_and_bad_keys() -> None:
    from omegaconf import OmegaConf
    m = build_model(OmegaConf.create(MODELS["resnet_tiny"]),
                    OmegaConf.create({"router": {"type": "aig", "tau": 1.0}, "gate_mask": [True, False, True, True]}))
    assert m.gated_blocks == [True, False, True, True]
    assert isinstance(m.layer1[0].router, AIGGate) and m.layer2[0].router is None
    with pytest.raises(ValueError, match="variant"):
        build_model({"name": "resnet50", "variant": "v2"})
    with pytest.raises(ValueError, match="unknown model config key"):
        build_model({"name": "resnet50", "depth": 50})
    with pytest.raises(ValueError, match="router.type"):
        build_model("resnet_tiny", {"router": {"type": "mlp"}})
    with pytest.raises(ValueError, match="gate_mask"):
        build_model("resnet_tiny", {"gate_mask": [True]})
    with pytest.raises(ValueError, match="hyper-parameters"):
        build_router({"type": "spnet", "width": 3}, 16)


# ---- shapes / layouts ------------------------------------------------------------------------------
def _check_output(out: ModelOutput, b: int, n_blocks: int, n_classes: int, c_final: int, n_heads: int) -> None:
    assert out.logits.shape == (b, n_classes)
    assert out.gates.shape == (b, n_blocks) and out.gates.dtype == torch.float32
    assert set(out.gates.unique().tolist()) <= {0.0, 1.0}
    assert out.gate_logits.shape == (b, n_blocks, 2)
    assert len(out.head_logits) == n_heads and all(h.shape == (b, n_classes) for h in out.head_logits)
    assert out.head_logits[-1] is out.logits
    assert len(out.stage_features) == n_heads and all(f.shape == (b, c_final) for f in out.stage_features)


@pytest.mark.parametrize("size", [224, 160])
@pytest.mark.parametrize("which,n_blocks", [("rn50_heads", 16), ("rn101_heads", 33)])
def test_imagenet_shapes_multi_stage(request: pytest.FixtureRequest, which: str, n_blocks: int, size: int) -> None:
    m = request.getfixturevalue(which)
    assert m.num_blocks == n_blocks and m.block_names[0] == "layer1.0" and all(m.gated_blocks)
    with torch.no_grad():
        out = m(_x(m, 1, size))
    _check_output(out, 1, n_blocks, 1000, 2048, 4)


@pytest.mark.parametrize("name", CHEAP)  # RN-50/101 are covered separately
@pytest.mark.parametrize("heads", [False, True])
def test_registered_model_shapes(name: str, heads: bool) -> None:
    m = build_model(name, {"multi_stage_heads": heads})
    n_stages = len(MODELS[name]["layers"])
    out = m(_x(m, 2))
    _check_output(out, 2, sum(MODELS[name]["layers"]), 10, m.num_features, n_stages if heads else 1)
    out.logits.sum().backward()


def test_v1_vs_v15_stride_placement() -> None:
    cfg = dict(MODELS["resnet_tiny"])
    v1, v15 = build_model({**cfg, "variant": "v1"}), build_model({**cfg, "variant": "v1.5"})
    for s in ("layer2", "layer3", "layer4"):
        b1, b15 = getattr(v1, s)[0], getattr(v15, s)[0]
        assert (b1.conv1.stride, b1.conv2.stride) == ((2, 2), (1, 1))
        assert (b15.conv1.stride, b15.conv2.stride) == ((1, 1), (2, 2))
        assert b1.downsample[0].stride == b15.downsample[0].stride == (2, 2)
    assert v15.layer1[0].conv1.stride == v15.layer1[0].conv2.stride == (1, 1)
    v15.load_state_dict(v1.state_dict())  # same parameter shapes
    v1.eval(), v15.eval()
    with torch.no_grad():
        assert v1(_x(v1, 1)).logits.shape == v15(_x(v15, 1)).logits.shape


def test_cifar_option_a_shortcut() -> None:
    m = build_model("resnet32_cifar", {"router": {"type": "none"}})
    blk = m.layer2[0]
    assert blk.downsample is None
    x = torch.randn(2, 16, 32, 32)
    sc = blk.shortcut(x)
    assert sc.shape == (2, 32, 16, 16)
    assert torch.equal(sc[:, 8:24], x[:, :, ::2, ::2]) and sc[:, :8].abs().sum() == 0 and sc[:, 24:].abs().sum() == 0
    assert not any(isinstance(mod, nn.Conv2d) and mod.kernel_size == (1, 1) for mod in m.modules())


# ---- gates -----------------------------------------------------------------------------------------
def test_gumbel_st() -> None:
    logits = torch.tensor([[0.3, -1.0], [0.0, 2.0], [5.0, 5.5]], requires_grad=True)
    y = gumbel_st(logits, noise=False)
    assert torch.equal(y.detach(), torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))
    (y[:, 1] * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    soft = F.softmax(logits.detach(), -1)
    expected = torch.stack([-soft[:, 0] * soft[:, 1], soft[:, 0] * soft[:, 1]], 1) * torch.tensor([[1.0], [2.0], [3.0]])
    torch.testing.assert_close(logits.grad, expected)
    torch.manual_seed(0)
    ys = gumbel_st(torch.zeros(4000, 2), noise=True)
    assert set(ys.sum(1).tolist()) == {1.0} and 0.45 < ys[:, 1].mean().item() < 0.55


@pytest.mark.parametrize("rtype", ["spnet", "aig"])
def test_router_gradients_through_gates(rtype: str) -> None:
    torch.manual_seed(0)
    m = build_model("resnet_tiny", {"router": {"type": rtype}, "multi_stage_heads": True}).train()
    x, y = _x(m, 4), torch.tensor([0, 1, 2, 3])
    out = m(x)
    assert out.gates.requires_grad
    F.cross_entropy(out.logits, y).backward()  # CE on the final logits only
    for blk in m.blocks():
        g = blk.router.fc2.bias.grad
        assert g is not None and g.abs().sum() > 0, "no gradient reached the router through the gate"
        assert blk.router.fc1.weight.grad.abs().sum() > 0


def test_eval_gates_deterministic_and_eval_noise() -> None:
    m = build_model("resnet_tiny").eval()
    x = _x(m, 8)
    with torch.no_grad():
        a, b = m(x), m(x)
    assert torch.equal(a.gates, b.gates) and torch.equal(a.logits, b.logits)
    assert torch.equal(a.gates, (a.gate_logits[..., 1] > a.gate_logits[..., 0]).float())
    noisy = build_model("resnet_tiny", {"router": {"type": "spnet", "eval_noise": True}}).eval()
    for blk in noisy.blocks():  # 50/50 routers
        nn.init.zeros_(blk.router.fc2.weight), nn.init.zeros_(blk.router.fc2.bias)
    with torch.no_grad():
        assert not torch.equal(noisy(_x(m, 16)).gates, noisy(_x(m, 16)).gates)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("rtype", ["spnet", "aig"])
def test_batch_size_one(name: str, rtype: str) -> None:
    m = build_model(name, {"router": {"type": rtype}, "multi_stage_heads": True}).train()
    bn = next(blk.router.bn for blk in m.blocks())
    before = bn.running_mean.clone()
    out = m(_x(m, 1))
    F.cross_entropy(out.logits, torch.tensor([3])).backward()
    assert torch.equal(bn.running_mean, before)  # batch-1 router BN uses running stats, does not update them
    m.eval()
    with torch.no_grad():
        assert m(_x(m, 1)).logits.shape == (1, 10)
    m.set_execution("skip")
    with torch.no_grad():
        assert m(_x(m, 1)).logits.shape == (1, 10)


def test_gate_mask_and_no_router() -> None:
    mask = [False, True, True, False]
    m = build_model("resnet_tiny", {"gate_mask": mask}).train()
    out = m(_x(m, 3))
    assert m.gated_blocks == mask
    assert torch.equal(out.gates[:, 0], torch.ones(3)) and torch.equal(out.gates[:, 3], torch.ones(3))
    assert out.gate_logits[:, [0, 3]].abs().sum() == 0 and out.gate_logits[:, 1].abs().sum() > 0
    plain = build_model("resnet_tiny", {"router": {"type": "none"}})
    assert plain.gated_blocks == [False] * 4 and not list(plain.router_parameters())
    assert torch.equal(plain(_x(m, 2)).gates, torch.ones(2, 4))


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5, 1.0])
def test_force_gates_exact_count(rate: float) -> None:
    m = build_model("resnet_tiny").eval()
    m.force_gates(rate, torch.Generator().manual_seed(1))
    with torch.no_grad():
        g = m(_x(m, 10)).gates
    assert torch.equal(g.sum(0), torch.full((4,), float(round(rate * 10))))
    m.force_gates(None)
    with torch.no_grad():
        assert torch.equal(m(_x(m, 10)).gates, m(_x(m, 10)).gates)


# ---- skip execution --------------------------------------------------------------------------------
def _outputs(m: DynamicResNet, x: torch.Tensor, mode: str, rate: float | None) -> ModelOutput:
    m.set_execution(mode)
    m.force_gates(rate, torch.Generator().manual_seed(7) if rate is not None else None)
    with torch.no_grad():
        return m(x)


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("rate", [None, 0.0, 0.25, 0.5, 0.75, 1.0])
def test_skip_equals_dense(name: str, rate: float | None) -> None:
    torch.manual_seed(0)
    m = build_model(name, HEADS)
    x = _x(m, 8)
    _calibrate_bn(m, x)
    m.eval()
    if rate is None:  # router decisions: make them mixed
        for blk in m.blocks():
            nn.init.normal_(blk.router.fc2.weight, 0, 1.0), nn.init.zeros_(blk.router.fc2.bias)
    dense, skip = _outputs(m, x, "dense", rate), _outputs(m, x, "skip", rate)
    assert torch.equal(dense.gates, skip.gates)
    if rate is None:
        assert 0 < dense.gates.mean() < 1
    for a, b in zip(dense.head_logits + dense.stage_features, skip.head_logits + skip.stage_features):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_skip_requires_inference() -> None:
    m = build_model("resnet_tiny")
    m.set_execution("skip")
    with pytest.raises(RuntimeError, match="inference-only"):
        m(_x(m, 2))
    m.eval()
    with pytest.raises(RuntimeError, match="no_grad"):
        m(_x(m, 2))
    with pytest.raises(ValueError, match="execution mode"):
        m.set_execution("sparse")


# ---- torchvision state dicts -----------------------------------------------------------------------
def test_load_torchvision_resnet50_reproduces_logits(tmp_path: Path) -> None:
    import torchvision
    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path / "resnet50_tv.pth"
    torch.save(tv.state_dict(), path)
    m = build_model({**MODELS["resnet50"], "pretrained": str(path)}, HEADS).eval()
    routers = {k: v.clone() for k, v in m.state_dict().items() if not m.is_backbone_key(k)}
    assert routers and all(".router." in k or k.startswith("aux.") for k in routers)
    report = load_torchvision_state_dict(m, path)  # idempotent; returns what was loaded
    assert len(report["loaded"]) == len(tv.state_dict()) and not report["missing"] + report["unexpected"]
    x = _x(m, 2, 160)
    m.force_gates(1.0)
    with torch.no_grad():
        ref = tv(x)
        out = m(x)
        m.set_execution("skip")
        out_skip = m(x)
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.logits, ref, rtol=1e-5, atol=1e-5 * max(1.0, scale))
    torch.testing.assert_close(out_skip.logits, ref, rtol=1e-5, atol=1e-5 * max(1.0, scale))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in routers.items())  # untouched


def test_load_state_dict_errors(tmp_path: Path) -> None:
    m = build_model("resnet_tiny")
    sd = {k: v for k, v in m.state_dict().items() if m.is_backbone_key(k)}
    sd["layer1.0.convX.weight"] = sd.pop("layer1.0.conv1.weight")
    with pytest.raises(StateDictError, match=r"missing key\(s\): layer1\.0\.conv1\.weight.*unexpected key\(s\): "
                                             r"layer1\.0\.convX\.weight"):
        load_torchvision_state_dict(m, sd)
    report = load_torchvision_state_dict(m, sd, strict_backbone=False)
    assert report["missing"] == ["layer1.0.conv1.weight"]
    bad_fc = {k: v for k, v in m.state_dict().items() if m.is_backbone_key(k)}
    bad_fc["fc.weight"] = torch.zeros(1000, 256)
    torch.save({"state_dict": bad_fc}, tmp_path / "w.pth")
    with pytest.raises(StateDictError, match=r"fc\.weight \(checkpoint \[1000, 256\] vs model \[10, 256\]\)"):
        load_torchvision_state_dict(m, tmp_path / "w.pth")
    with pytest.raises(FileNotFoundError, match="only local files"):
        build_model({**MODELS["resnet_tiny"], "pretrained": str(tmp_path / "nope.pth")})


def test_router_modules() -> None:
    r = SPNetRouter(32)
    assert torch.equal(r.fc2.bias.data, torch.tensor([0.1, 2.0])) and r.fc1.out_features == 128 and r.drop.p == 0.4
    g = AIGGate(32)
    assert torch.equal(g.fc2.bias.data, torch.tensor([0.1, 2.0])) and g.fc2.weight.std() < 0.01
    for mod in (r, g):
        assert mod(torch.randn(3, 32, 5, 5)).shape == (3, 2)
    assert isinstance(build_router({"type": "spnet", "hidden": 64, "dropout": 0.0, "bias_init": [0.0, 1.0]}, 8),
                      SPNetRouter)
    assert build_router({"type": "none"}, 8) is None


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_global_avg_pool_matches_adaptive_pool(fmt, dtype) -> None:
    """Same values and input gradients as ``F.adaptive_avg_pool2d(x, 1)`` (bitwise), with the pooling's gradient
    added to a convolution's as in a router (its speed is measured by tools/bench_step.py, BENCHMARKS.md)."""
    from spnet_dist.models.lean_ops import global_avg_pool

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 5, 7, generator=gen).to(dtype).contiguous(memory_format=fmt)
    conv = nn.Conv2d(8, 4, 1).to(dtype)
    w = torch.randn(3, 8, generator=gen).to(dtype)
    grads = []
    for pool in (lambda t: torch.flatten(F.adaptive_avg_pool2d(t, 1), 1), global_avg_pool):
        xi = x.detach().clone(memory_format=fmt).requires_grad_(True)
        y = pool(xi)
        ((y * w).sum() + conv(xi).sum()).backward()
        grads.append((y.detach(), xi.grad))
    (y_ref, g_ref), (y, g) = grads
    assert torch.equal(y, y_ref) and torch.equal(g, g_ref)
    with pytest.raises(ValueError, match="B×C×H×W"):
        global_avg_pool(torch.zeros(2, 3))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_gated_residual_gradients_match_the_plain_formula(fmt) -> None:
    """``sc + z·r`` with the custom backward: torch.autograd.gradcheck in float64, and the same values and
    gradients as the plain broadcast formula in float32 (the gate z continuous here, so ∂/∂z is exercised)."""
    from spnet_dist.models.lean_ops import gated_residual

    gen = torch.Generator().manual_seed(0)

    def inputs(dtype):
        return [torch.randn(3, 4, 5, 6, generator=gen, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(),
                torch.randn(3, 4, 5, 6, generator=gen, dtype=dtype).contiguous(memory_format=fmt).requires_grad_(),
                torch.rand(3, generator=gen, dtype=dtype).requires_grad_()]

    assert torch.autograd.gradcheck(gated_residual, inputs(torch.float64))
    sc, r, z = inputs(torch.float32)
    w = torch.randn(3, 4, 5, 6, generator=gen)
    grads = []
    for f in (lambda a, b, c: a + b * c.view(-1, 1, 1, 1), gated_residual):
        out = f(sc, r, z)
        grads.append((out.detach(), *torch.autograd.grad((out * w).sum(), (sc, r, z))))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
