"""Tests of spnet_dist.methods: shared losses, ConvNet-AIG and SP-Net (EMA teacher), on the real tiny model."""
from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
import yaml

from spnet_dist.methods import METHODS, build_method, gate_mask_for, prepare_method_cfg
from spnet_dist.methods.losses import (
    evolution_loss,
    logits_distill,
    multi_head_ce,
    path_distill,
    rate_loss,
)
from spnet_dist.models import build_model

ROOT = Path(__file__).resolve().parents[1]
METHOD_DIR = ROOT / "configs" / "method"
# same keys / values as configs/model/resnet_tiny.yaml (bottleneck [1,1,1,1], 64 px, 10 classes)
TINY = dict(name="resnet_tiny", block="bottleneck", layers=[1, 1, 1, 1], widths=[8, 16, 32, 64], stem="imagenet",
            stem_width=16, variant="v1.5", num_classes=10, image_size=64, pretrained=None)


def method_cfg(preset: str, **overrides) -> dict:
    cfg = yaml.safe_load((METHOD_DIR / f"{preset}.yaml").read_text())
    cfg.update(overrides)
    return cfg


def make(preset: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = prepare_method_cfg(method_cfg(preset, **overrides), TINY)
    model = build_model(TINY, cfg)
    return model, build_method(cfg, model), cfg


def batch(b: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 64, 64, generator=g), torch.randint(0, 10, (b,), generator=g)


# ---------------------------------------------------------------------------------------------- losses
def test_one_sided_rate_loss_zero_below_positive_above():
    mask = [True, True, True, True]
    below = torch.tensor([0.1, 0.5, 0.69, 0.7])
    assert rate_loss(below, 0.7, mask, one_sided=True).item() == 0.0
    above = torch.tensor([0.9, 0.5, 0.8, 0.2])
    val = rate_loss(above, 0.7, mask, one_sided=True)
    assert val.item() > 0
    assert val.item() == pytest.approx((0.2**2 + 0.1**2) / 4, abs=1e-7)
    # the same rates two-sided are penalised below the target as well
    assert rate_loss(below, 0.7, mask, one_sided=False).item() > 0


def test_two_sided_rate_loss_hand_value_with_mask_and_schedule():
    rates = torch.tensor([0.5, 0.9, 0.2, 0.3], dtype=torch.float64, requires_grad=True)
    # ungated block 2 is excluded from the sum but counted in 1/L
    val = rate_loss(rates, [0.7, 0.7, 1.0, 0.4], [True, True, False, True], one_sided=False)
    assert val.item() == pytest.approx((0.2**2 + 0.2**2 + 0.1**2) / 4, abs=1e-12)
    val.backward()  # d/dr_l = 2 (r_l - t_l) / L on gated blocks, 0 elsewhere
    assert torch.allclose(rates.grad, torch.tensor([-0.1, 0.1, 0.0, -0.05], dtype=torch.float64))
    with pytest.raises(ValueError):
        rate_loss(rates.detach(), [0.7, 0.7], None, one_sided=False)


def _evo_features():
    # sample 0 turns 90° at every stage, sample 1 moves along a straight line
    f = torch.tensor(
        [
            [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [2.0, 1.0]],
            [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0]],
        ],
        dtype=torch.float64,
    )
    return [f[:, k] for k in range(4)]


def test_evolution_loss_consecutive_hand_value():
    # Δ = (1,0),(0,1),(1,0) → cos 0, 0 for sample 0; cos 1, 1 for sample 1 → 0.5 + 0.5
    assert evolution_loss(_evo_features(), "consecutive").item() == pytest.approx(1.0, abs=1e-12)


def test_evolution_loss_official_hand_value():
    # sample 0: d1 = (2,1), d2 = (1,1), d3 = (1,0); sample 1: all parallel → 0
    expected = 0.5 * ((1 - 3 / math.sqrt(10)) + (1 - 1 / math.sqrt(2)) + (1 - 2 / math.sqrt(5)))
    assert evolution_loss(_evo_features(), "official").item() == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError):
        evolution_loss(_evo_features(), "nope")


def test_distill_and_multi_head_ce_hand_values():
    t = torch.tensor([[1.0, 2.0]])
    heads = [torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 2.0]])]
    total, per = logits_distill(heads, t, [0.5, 0.25, 1.0])  # every head vs the teacher's FINAL logits
    assert [p.item() for p in per] == [2.0, 0.0, 2.0]
    assert total.item() == pytest.approx(0.5 * 2.0 + 1.0 * 2.0)
    # single-head model: the last (final-head) weight applies
    assert logits_distill(heads[:1], t, [0.5, 0.25, 1.0])[0].item() == pytest.approx(2.0)
    labels = torch.tensor([1])
    ce_total, ce_per = multi_head_ce(heads, labels, [0.5, 0.25, 1.0])
    assert ce_total.item() == pytest.approx(sum(w * c.item() for w, c in zip([0.5, 0.25, 1.0], ce_per)))
    s = torch.zeros(2, 3, 2)
    tt = torch.zeros(2, 3, 2)
    tt[:, 1] = 4.0  # only the ungated block differs
    assert path_distill(s, tt, [True, False, True]).item() == 0.0
    assert path_distill(s, tt, None).item() == pytest.approx(16.0 / 3)


# ---------------------------------------------------------------------------------------------- methods
def test_registry_and_gate_mask_for():
    assert {"aig", "spnet"} <= set(METHODS)
    model, _, _ = make("aig")
    with pytest.raises(KeyError):
        build_method({"name": "nope"}, model)
    cfg = method_cfg("aig", target_schedule=[1, 0.5, 1.0, 0.7])
    assert gate_mask_for(cfg, 4) == [False, True, False, True]
    assert gate_mask_for({**cfg, "gate_full_blocks": True}, 4) is None
    assert gate_mask_for({**cfg, "gate_mask": [True, False, True, True]}, 4) == [True, False, True, True]
    assert gate_mask_for(method_cfg("aig"), 4) is None
    prepared = prepare_method_cfg(cfg, TINY)
    assert prepared["gate_mask"] == [False, True, False, True]
    assert cfg["gate_mask"] is None  # the input config is not mutated
    m = build_model(TINY, prepared)
    assert m.gated_blocks == [False, True, False, True]
    aig = build_method(prepared, m)
    out = m(batch()[0])
    _, logs = aig.loss(m, *batch(), out)
    assert logs["block_rates"][0].item() == 1.0 and logs["block_rates"][2].item() == 1.0


@pytest.mark.parametrize("preset", ["aig", "spnet_code", "spnet_paper"])
def test_presets_build_and_step(preset):
    model, method, cfg = make(preset)
    x, y = batch()
    loss, logs = method.loss(model, x, y, model(x))
    assert torch.isfinite(loss)
    loss.backward()
    for key in ("ce", "rate_loss", "exec_rate", "block_rates", "loss"):
        assert key in logs and not logs[key].requires_grad
    assert logs["block_rates"].shape == (4,)
    assert 0.0 <= logs["exec_rate"].item() <= 1.0
    if cfg["name"] == "spnet":
        assert {"logits_kd", "path_kd", "evo", "cls"} <= set(logs)
        weights = (method.w_logits, method.w_path, method.w_evo)
        assert weights == ((0.1, 0.1, 0.1) if preset == "spnet_code" else (1.0, 0.5, 1e-4))
        assert method.one_sided and method.rate_weight == 2.0 and method.momentum == 0.9
    else:
        assert not method.one_sided and method.rate_weight == 1.0


@pytest.mark.parametrize("preset", ["aig", "spnet_code"])
def test_ce_gradient_reaches_routers(preset):
    over = {"rate_weight": 0.0}
    if preset != "aig":
        over.update(w_logits=0.0, w_path=0.0, w_evo=0.0, multi_stage_heads=False)
    model, method, _ = make(preset, **over)
    x, y = batch(8)
    loss, logs = method.loss(model, x, y, model(x))
    assert loss.item() == pytest.approx(logs["ce"].item())  # CE only
    loss.backward()
    for blk in model.blocks():
        grads = [p.grad for p in blk.router.parameters()]
        assert all(g is not None for g in grads)
        assert sum(g.abs().sum().item() for g in grads) > 0, "router got no gradient through the gates"


def test_teacher_ema_exact_and_no_grad():
    m = 0.9
    model, method, _ = make("spnet_code", ema_momentum=m)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with torch.no_grad():  # make student and teacher differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    for it in range(2):
        t0 = [p.detach().clone() for p in method.teacher.parameters()]
        s0 = [p.detach().clone() for p in model.parameters()]
        x, y = batch(4, seed=it)
        loss, _ = method.loss(model, x, y, model(x))
        opt.zero_grad()
        loss.backward()
        for tp, sp in zip(method.teacher.parameters(), model.parameters()):
            assert tp.grad is None and not tp.requires_grad
            assert tp.data_ptr() != sp.data_ptr()
        for tp, a, b in zip(method.teacher.parameters(), t0, s0):
            torch.testing.assert_close(tp, m * a + (1 - m) * b, rtol=1e-6, atol=1e-6)  # the formula
            assert torch.equal(tp, torch.lerp(a, b, 1 - m))  # bitwise, the fused update's op
        opt.step()  # student moves; the next EMA must use these (pre-next-step) weights
    assert method.step == 2


def test_state_dict_round_trip_bitwise():
    model, method, _ = make("spnet_code")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for it in range(2):
        x, y = batch(4, seed=it)
        loss, _ = method.loss(model, x, y, model(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    fresh_model, fresh, _ = make("spnet_code", seed=123)
    ref = method.teacher.state_dict()
    assert set(state["teacher"]) == set(ref)
    assert any(k.endswith("running_mean") for k in ref)  # buffers included
    assert not all(torch.equal(v, fresh.teacher.state_dict()[k]) for k, v in ref.items())
    fresh.load_state_dict(state)
    got = fresh.teacher.state_dict()
    for k, v in ref.items():
        assert v.dtype == got[k].dtype and torch.equal(v, got[k]), k
    assert fresh.step == method.step == 2
    with pytest.raises(ValueError):
        make("aig")[1].load_state_dict(state)


@pytest.mark.parametrize("preset", ["aig", "spnet_code"])
def test_batch_size_one(preset):
    model, method, _ = make(preset)
    x, y = batch(1)
    loss, logs = method.loss(model, x, y, model(x))
    assert torch.isfinite(loss) and logs["block_rates"].shape == (4,)
    loss.backward()


def test_distill_terms_zero_when_student_equals_teacher():
    torch.use_deterministic_algorithms(True)
    try:
        model, method, _ = make(
            "spnet_code", teacher_mode="eval", ema_momentum=0.0, multi_stage_heads=False, w_evo=0.0
        )
        model.eval()
        x, y = batch(4)
        _, logs = method.loss(model, x, y, model(x))
        assert logs["logits_kd"].item() == 0.0
        assert logs["path_kd"].item() == 0.0
        # ... and both are non-zero once the student deviates from the teacher
        method2 = copy.deepcopy(method)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05)
        method2.momentum = 1.0  # keep the old teacher
        _, logs2 = method2.loss(model, x, y, model(x))
        assert logs2["logits_kd"].item() > 0 and logs2["path_kd"].item() > 0
    finally:
        torch.use_deterministic_algorithms(False)


def test_wrapped_student_ddp_single_process(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model, method, _ = make("spnet_code")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        t0 = [p.detach().clone() for p in method.teacher.parameters()]
        x, y = batch(4)
        loss, _ = method.loss(ddp, x, y, ddp(x))
        loss.backward()
        for tp, a, b in zip(method.teacher.parameters(), t0, model.parameters()):
            assert torch.equal(tp, torch.lerp(a, b.detach(), 0.1))
        assert method.eval_model(ddp) is ddp
    finally:
        dist.destroy_process_group()


def test_omegaconf_cfg_overrides_and_teacher_follows_dtype():
    omegaconf = pytest.importorskip("omegaconf")
    base = omegaconf.OmegaConf.create(method_cfg("spnet_paper"))
    # command-line style override of plain keys
    cfg = omegaconf.OmegaConf.merge(base, omegaconf.OmegaConf.from_dotlist(["w_path=0.25", "evo_form=official"]))
    torch.manual_seed(0)
    prepared = prepare_method_cfg(cfg, "resnet_tiny")
    model = build_model(TINY, prepared)
    method = build_method(cfg, model)
    assert method.w_path == 0.25 and method.evo_form == "official" and method.w_logits == 1.0
    model.double()  # the student changes dtype after the method was built: the teacher follows
    x, y = batch(2)
    loss, _ = method.loss(model, x.double(), y, model(x.double()))
    assert loss.dtype == torch.float64 and next(method.teacher.parameters()).dtype == torch.float64


def test_bf16_teacher_precision_rounds_targets_only():
    """teacher_precision=bf16: the teacher runs under bf16 autocast (its logits come out bf16 and close to the fp32
    teacher's), the loss stays finite and differentiable; an unknown precision is refused."""
    model, fp32, _ = make("spnet_code", teacher_mode="eval")
    bf16 = build_method(prepare_method_cfg(method_cfg("spnet_code", teacher_mode="eval", teacher_precision="bf16"),
                                           TINY), model)
    x, _ = batch(4)
    ref, low = fp32.teacher_forward(x), bf16.teacher_forward(x)
    assert ref.logits.dtype == torch.float32 and low.logits.dtype == torch.bfloat16
    assert not torch.equal(ref.logits, low.logits.float())
    torch.testing.assert_close(low.logits.float(), ref.logits, atol=0.05, rtol=0.05)
    x, y = batch(4)
    loss, _ = bf16.loss(model, x, y, model(x))
    loss.backward()
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="teacher_precision must be 'fp32' or 'bf16'"):
        make("spnet_code", teacher_precision="fp16")


def test_exec_rate_and_path_distill_over_gated_blocks_only():
    model, method, _ = make("aig")
    rates = torch.tensor([0.2, 0.4, 0.6, 0.8])
    method.gated_blocks = [True, False, True, False]
    method._gated_index.clear()
    assert method.exec_rate(rates).item() == pytest.approx(0.4)
    method.gated_blocks = [False] * 4
    assert method.exec_rate(rates).item() == 1.0
    s, t = torch.zeros(2, 4, 2), torch.zeros(2, 4, 2)
    t[:, 1] = 3.0  # only an ungated block differs
    assert path_distill(s, t, [True, False, True, True]).item() == 0.0
    assert path_distill(s, t, [True, True, False, False]).item() == pytest.approx(4.5)
    assert path_distill(s, t, torch.tensor([True, True, False, False])).item() == pytest.approx(4.5)
