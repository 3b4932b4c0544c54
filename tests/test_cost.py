"""Tests for spnet_dist.models.cost: baseline MACs, flop_counter cross-checks, per-image accounting."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

from spnet_dist.models import MODELS, build_model, cost_table, full_macs, macs_per_image

NO_ROUTER = {"router": {"type": "none"}}
CHEAP = [n for n in sorted(MODELS) if n not in ("resnet50", "resnet101")]

# (model, variant, MACs) — spec 1.3; CIFAR rows given as the papers' 2×MAC GFLOPs.
BASELINES = [
    ("resnet50", "v1", 3.858e9), ("resnet50", "v1.5", 4.089e9),
    ("resnet101", "v1", 7.570e9), ("resnet101", "v1.5", 7.801e9),
    ("resnet110_cifar", "v1.5", 0.506e9 / 2), ("resnet32_cifar", "v1.5", 0.138e9 / 2),
]


def _flops(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, dict]:
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model(x)
    return fc.get_total_flops(), fc.get_flop_counts()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def rn50_spnet():
    return build_model("resnet50", {"multi_stage_heads": True}).eval()


@pytest.mark.parametrize("name,variant,expected", BASELINES, ids=[f"{n}-{v}" for n, v, _ in BASELINES])
def test_baseline_macs(name: str, variant: str, expected: float) -> None:
    plain = cost_table(build_model({"name": name, "variant": variant}, NO_ROUTER))
    assert plain.full() == plain.backbone_full and plain.routers == 0 and plain.heads == 0
    assert abs(plain.full() / expected - 1) < 0.005, plain.full()
    assert "2 x MACs" in plain.convention


def test_exact_resnet_numbers_and_overheads(rn50_spnet) -> None:
    v15, v1 = cost_table(rn50_spnet), cost_table(rn50_spnet, variant="v1")
    assert v15.backbone_full == 4_089_184_256 and v1.backbone_full == 3_857_973_248  # spec 1.3, exact
    assert round(2 * v1.backbone_full / 1e9, 2) == 7.72
    assert "v1 layout" in v1.convention and "v1.5 layout" in v15.convention
    assert rn50_spnet.layer2[0].conv2.stride == (2, 2)  # variant override left the model unchanged
    assert v15.breakdown["stem"] == 118_013_952 and v15.breakdown["classifier"] == 2_048_000
    assert v15.blocks[0] == 179_830_784 and v15.blocks[1] == 218_365_952 and v15.blocks[3] == 269_746_176
    assert v1.blocks[3] == 192_675_840 and v15.breakdown["projections"] == 359_661_568
    assert abs(v15.routers / 1.68e6 - 1) < 0.005  # SP-Net gates C·128 + 256
    assert abs(v15.heads / (3.67e6 + 6.144e6) - 1) < 0.005  # alignment + 3 aux classifiers
    assert v15.fixed == v15.breakdown["stem"] + v15.breakdown["projections"] + v15.routers + 2_048_000
    aig = cost_table(build_model("resnet50", {"router": {"type": "aig"}}))
    assert abs(aig.routers / 0.21e6 - 1) < 0.01


@pytest.mark.parametrize("variant", ["v1", "v1.5"])
def test_flop_counter_cross_check_rn50(variant: str) -> None:
    """FlopCounterMode counts 2 FLOPs per MAC for conv/linear (biases and elementwise ops not counted)."""
    m = build_model({"name": "resnet50", "variant": variant}, {"multi_stage_heads": True}).eval()
    t = cost_table(m, 160)
    m.force_gates(1.0)
    total, per_module = _flops(m, torch.zeros(1, 3, 160, 160))
    assert total == 2 * t.full(include_heads=True)
    routers = 0
    for i, name in enumerate(t.block_names):  # per-block attribution (routers run outside block.forward)
        blk = per_module[f"DynamicResNet.{name}"]
        proj = per_module.get(f"DynamicResNet.{name}.downsample", {})
        assert sum(blk.values()) - sum(proj.values()) == 2 * t.blocks[i]
        routers += sum(per_module[f"DynamicResNet.{name}.router"].values())
    assert routers == 2 * t.routers
    assert sum(per_module["DynamicResNet.aux"].values()) == 2 * t.heads


@pytest.mark.parametrize("arch", ["resnet50", "resnet101"])
def test_flop_counter_against_torchvision(arch: str) -> None:
    """Independent check: torchvision's own model under FlopCounterMode = 2 × our v1.5 backbone figure."""
    tv_total, _ = _flops(getattr(torchvision.models, arch)(weights=None).eval(), torch.zeros(1, 3, 224, 224))
    ours = cost_table(build_model(arch, NO_ROUTER))
    assert tv_total == 2 * ours.backbone_full


@pytest.mark.parametrize("name", ["resnet32_cifar", "resnet_tiny"])
def test_flop_counter_cross_check_small(name: str) -> None:
    m = build_model(name, {"router": {"type": "aig"}, "multi_stage_heads": True}).eval()
    t = cost_table(m)
    m.force_gates(1.0)
    total, _ = _flops(m, torch.zeros(1, 3, m.image_size, m.image_size))
    assert total == 2 * t.full(include_heads=True)


@pytest.mark.parametrize("rate", [0.0, 0.25, 0.5, 1.0])
def test_macs_per_image_matches_skip_execution(rate: float) -> None:
    """In skip mode only executed branches run, so measured FLOPs = 2 × Σ_images macs_per_image."""
    m = build_model("resnet_tiny", {"multi_stage_heads": True}).eval()
    t = cost_table(m)
    m.set_execution("skip")
    m.force_gates(rate, torch.Generator().manual_seed(0))
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad():
        gates = m(x).gates
    m.force_gates(rate, torch.Generator().manual_seed(0))
    total, _ = _flops(m, x)
    per_image = macs_per_image(t, gates, include_heads=True)
    assert per_image.shape == (8,) and per_image.dtype == torch.float64
    assert total == 2 * per_image.sum().item()


def test_macs_per_image_and_expected() -> None:
    m = build_model("resnet_tiny", {"gate_mask": [True, False, True, True], "multi_stage_heads": True}).eval()
    t = cost_table(m)
    assert len(t.blocks) == m.num_blocks == 4 and t.gated == [True, False, True, True]
    gates = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    got = macs_per_image(t, gates)
    assert got.tolist() == [t.full(), t.fixed + t.blocks[1], t.fixed + t.blocks[0] + t.blocks[1] + t.blocks[3]]
    assert torch.equal(macs_per_image(t, gates, include_heads=True), got + t.heads)
    assert full_macs(t) == t.full() and full_macs(t, include_heads=True) == t.full() + t.heads
    assert t.expected(0.5) == pytest.approx(t.fixed + t.blocks[1] + 0.5 * (t.blocks[0] + t.blocks[2] + t.blocks[3]))
    with torch.no_grad():
        out = m(torch.randn(2, 3, 64, 64))
    assert macs_per_image(t, out.gates).shape == (2,)
    with pytest.raises(ValueError, match="blocks"):
        macs_per_image(t, torch.ones(2, 3))


def test_cost_table_restores_state_and_scales_with_resolution() -> None:
    m = build_model("resnet_tiny").train()
    m.force_gates(0.5)
    t64, t128 = cost_table(m), cost_table(m, 128)
    assert m.training and m.execution == "dense" and m._forced == (0.5, None)
    assert t64.image_size == (64, 64) and t128.image_size == (128, 128)
    assert t128.blocks == [4 * b for b in t64.blocks]  # spatial layers scale with H·W
    assert t128.routers == t64.routers  # routers act on pooled features


@pytest.mark.parametrize("name", CHEAP)  # RN-50/101 are covered separately
def test_every_registered_model_has_a_cost_table(name: str) -> None:
    t = cost_table(build_model(name))
    assert len(t.blocks) == sum(MODELS[name]["layers"]) and all(b > 0 for b in t.blocks) and t.routers > 0
