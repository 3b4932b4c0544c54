"""BoostNet on ResNet: boosted logits, stop-gradient, gradient rescaling, exit costs, real early exits,
budgeted-batch thresholds (hand cases and the 1 % budget search), the held-out split as method state."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import TINY_MODEL as TINY
import torch
import yaml

from spnet_dist.evaluation.budgeted import (anytime, assign_exits, budgeted_result, exit_proportions,
                                            fit_thresholds, search_budget)
from spnet_dist.methods import build_method, prepare_method_cfg
from spnet_dist.methods.boostnet import heldout_indices
from spnet_dist.methods.losses import boosted_ce
from spnet_dist.models import build_model, cost_table
from spnet_dist.models.boostnet import EarlyExitResNet, ensemble_logits
from spnet_dist.models.cost import exit_macs

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def boost_cfg(**over) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "method" / "boostnet.yaml").read_text())
    cfg.update(over)
    return cfg


def make(seed: int = 0, **over):
    torch.manual_seed(seed)
    cfg = prepare_method_cfg(boost_cfg(**over), TINY)
    model = build_model(TINY, cfg)
    return model, build_method(cfg, model)


def batch(b: int = 6, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 64, 64, generator=g), torch.randint(0, 10, (b,), generator=g)


# ---------------------------------------------------------------------------------------------- boosting
def test_boosted_logits_hand_values():
    f = [torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([[-1.0, 4.0]])]
    F1, F2, F3 = ensemble_logits(f, 0.5)
    assert torch.equal(F1, f[0])
    assert torch.equal(F2, torch.tensor([[1.0, 1.0]]))          # f2 + 0.5·F1
    assert torch.equal(F3, torch.tensor([[-0.5, 4.5]]))         # f3 + 0.5·F2
    y = torch.tensor([1])
    total, per = boosted_ce(f, y, 0.5)
    want = [torch.nn.functional.cross_entropy(z, y) for z in (F1, F2, F3)]
    assert all(a.item() == pytest.approx(b.item()) for a, b in zip(per, want))
    assert total.item() == pytest.approx(sum(w.item() for w in want))


def test_stop_gradient_exit_n_does_not_reach_head_n_minus_1():
    m, _ = make(grad_rescale=False)
    x, y = batch()
    out = m(x)
    _, per = boosted_ce(out.head_logits, y, 0.5)
    head1 = list(m.aux.align[0].parameters()) + list(m.aux.fc[0].parameters())
    g = torch.autograd.grad(per[1], head1, allow_unused=True)  # exit 2's loss
    assert all(t is None or not t.any() for t in g)
    g2 = torch.autograd.grad(per[1], list(m.aux.fc[1].parameters()) + list(m.layer1.parameters()))
    assert all(t.abs().sum() > 0 for t in g2)  # its own head and the shared trunk do get gradient
    # without the stop-gradient the ensemble term would carry exit 2's loss into head 1
    out = m(x)
    plain = ensemble_logits(out.head_logits, 0.5, detach_previous=False)
    g3 = torch.autograd.grad(torch.nn.functional.cross_entropy(plain[1], y), m.aux.fc[0].weight)[0]
    assert g3.abs().sum() > 0


def test_gradient_rescaling_factors():
    torch.manual_seed(0)
    on = build_model(TINY, prepare_method_cfg(boost_cfg(grad_rescale=True), TINY))
    off = build_model(TINY, prepare_method_cfg(boost_cfg(grad_rescale=False), TINY))
    off.load_state_dict(on.state_dict())
    assert on.rescale_factors() == [(1 / 4, 3 / 4), (1 / 3, 2 / 3), (1 / 2, 1 / 2)]
    x, y = batch()
    for exit_k, factor in ((0, 1 / 4), (3, 3 / 4 * 2 / 3 * 1 / 2)):
        grads = []
        for m in (on, off):
            m.zero_grad()
            out = m(x)
            torch.nn.functional.cross_entropy(out.head_logits[exit_k], y).backward()
            grads.append(m.layer1[0].conv1.weight.grad.clone())
        assert torch.allclose(grads[0], factor * grads[1], rtol=1e-4, atol=1e-9)
    # values are unchanged by the rescaling identities
    on.eval(), off.eval()
    with torch.no_grad():
        assert torch.equal(on(x).logits, off(x).logits)


def test_exit_macs_cumulative_with_heads():
    m, _ = make()
    t = cost_table(m)
    costs = exit_macs(t)
    assert costs[-1] == pytest.approx(t.full(include_heads=True))
    assert costs[0] == pytest.approx(t.breakdown["stem"] + t.blocks[0] + t.block_fixed[0] + t.head_macs[0])
    for k in range(1, 4):  # one block per stage in the tiny model
        head = t.head_macs[k] if k < 3 else t.breakdown["classifier"]
        assert costs[k] - costs[k - 1] == pytest.approx(t.blocks[k] + t.block_fixed[k] + head)
    # heads: Linear(C_k → 256) + Linear(256 → 10)
    assert t.head_macs == [c * 256 + 2560 for c in (32, 64, 128)]


# ---------------------------------------------------------------------------------------------- early exits
def test_early_exit_forward_subsets_the_batch_and_matches_the_ensemble():
    m, _ = make()
    x, _ = batch(16)
    m.train()
    with torch.no_grad():
        m(x)
    m.eval()
    with torch.no_grad():
        full = ensemble_logits(m(x).head_logits, 0.5)
    conf = torch.stack([torch.softmax(z, 1).max(1).values for z in full])
    thr = [float(conf[0].median()), float(conf[1].quantile(0.7)), float(conf[2].quantile(0.3)), -1e8]
    seen = []
    hooks = [getattr(m, s)[0].register_forward_pre_hook(lambda mod, a: seen.append(a[0].shape[0]))
             for s in m.stage_names]
    res = m.early_exit_forward(x, thr, 0.5)
    for h in hooks:
        h.remove()
    want = assign_exits(conf, torch.tensor(thr, dtype=torch.float64))
    assert torch.equal(res.exit_index, want)
    alive = [int((want >= k).sum()) for k in range(4)]
    assert seen == [a for a in alive if a > 0]  # every stage ran only on the images still in
    assert seen[0] == 16 and seen[-1] < 16
    for i in range(16):
        assert torch.allclose(res.logits[i], full[int(want[i])][i], atol=1e-5)
    reached = torch.stack([want >= k for k in range(4)], 1)  # one block per stage
    assert torch.equal(res.reached, reached)


# ---------------------------------------------------------------------------------------------- budgeted batch
def test_exit_proportions_and_thresholds_hand_case():
    q = exit_proportions(2.0, 3)
    assert torch.allclose(q, torch.tensor([2.0, 4.0, 8.0], dtype=torch.float64) / 14)
    conf = torch.tensor([[0.9, 0.8, 0.3, 0.2, 0.1],
                         [0.5, 0.6, 0.95, 0.4, 0.7],
                         [0.1, 0.1, 0.1, 0.1, 0.1]])
    # q = (0.4, 0.4, 0.2), M = 5: exit 1 takes ⌊2⌋ = 2 → T1 = 0.8 (images 0, 1);
    # exit 2 walks 2 (0.95), 1 (exited, skipped), 4 (0.7) → T2 = 0.7 (images 2, 4); image 3 goes to exit 3
    thr = fit_thresholds(conf, torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64))
    assert thr.tolist()[:2] == pytest.approx([0.8, 0.7]) and thr[2] == -1e8
    assert assign_exits(conf, thr).tolist() == [0, 0, 1, 2, 1]
    correct = torch.tensor([[1, 0, 0, 0, 0], [0, 0, 1, 0, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    r = budgeted_result(conf, correct, thr, [10.0, 20.0, 30.0])
    assert r["top1"] == pytest.approx(4 / 5) and r["macs"] == pytest.approx((2 * 10 + 2 * 20 + 30) / 5)
    assert r["exit_fractions"] == pytest.approx([0.4, 0.4, 0.2])
    # an unreachable count leaves T = +1e8 (nobody exits there)
    thr0 = fit_thresholds(conf, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    assert thr0[0] == 1e8 and thr0[1] == 1e8
    assert anytime(correct, [10.0, 20.0, 30.0])[0] == {"exit": 1, "top1": 0.2, "macs": 10.0}


@pytest.mark.parametrize("budget", [1.3e6, 2.0e6, 2.6e6, 3.4e6])
def test_budget_search_hits_requested_budget_within_1pct(budget):
    g = torch.Generator().manual_seed(0)
    n, m = 4, 20000
    base = torch.rand(m, generator=g)  # easy images are confident at every exit
    conf = torch.stack([(0.3 + 0.1 * k) * base + (0.7 - 0.1 * k) * torch.rand(m, generator=g) for k in range(n)])
    costs = [1.0e6, 2.0e6, 3.0e6, 4.0e6]
    p, thr, achieved = search_budget(conf, costs, budget)
    assert abs(achieved - budget) <= 0.01 * budget
    assert budgeted_result(conf, None, thr, costs)["macs"] == pytest.approx(achieved)
    # the thresholds generalise to an independent sample of the same distribution
    base2 = torch.rand(m, generator=g)
    conf2 = torch.stack([(0.3 + 0.1 * k) * base2 + (0.7 - 0.1 * k) * torch.rand(m, generator=g) for k in range(n)])
    assert abs(budgeted_result(conf2, None, thr, costs)["macs"] - budget) <= 0.03 * budget
    assert p > 0 and math.isfinite(p)


def test_evaluate_anytime_and_budgeted_with_heldout_loader():
    m, method = make(target_rate=0.7)
    m.train()
    with torch.no_grad():
        m(batch(16, seed=3)[0])
    val = [batch(8, seed=s) for s in (10, 11, 12)]
    method.heldout_loader = [batch(8, seed=s) for s in (20, 21, 22, 23)]
    table = cost_table(m)
    res = method.evaluate(m, val, table, "dense")
    costs = exit_macs(table)
    assert res["calibration"] == "heldout" and res["val_images"] == 24
    assert [e["macs"] for e in res["exits"]] == pytest.approx(costs)
    assert res["full_macs"] == pytest.approx(costs[-1]) and res["anytime_top1"] == res["exits"][-1]["top1"]
    assert res["top1"] == pytest.approx(res["simulated_top1"])  # real early exits == simulated exits
    assert res["macs_per_image"] == pytest.approx(res["simulated_macs"])
    assert sum(res["exit_fractions"]) == pytest.approx(1.0)
    assert res["block_rates"][0] == 1.0 and res["exec_rate"] <= 1.0
    assert res["budget_macs"] == pytest.approx(method.budget_macs(table))
    assert len(res["budget_curve"]) == 39 and len(res["thresholds"]) == 4
    for k in range(1, 5):
        assert isinstance(res[f"exit{k}_top1"], float)
    assert m.training  # the train/eval mode is restored


# ---------------------------------------------------------------------------------------------- held-out split
def test_heldout_split_is_method_state():
    files = [f"{c}/{c}_{i}.JPEG" for c in ("a", "b") for i in range(10)]  # the plan's usable training files
    _, method = make(heldout=0.25, heldout_seed=3)
    held = method.ensure_split(files[::-1])  # drawn from the sorted list, whatever order it is given in
    assert held == [sorted(files)[i] for i in heldout_indices(20, 5, 3).tolist()] and len(set(held)) == 5
    assert method.heldout_trained_on and method.train_exclusions(files) == held and not method.heldout_trained_on
    assert torch.equal(method.heldout["indices"], heldout_indices(20, 5, 3))
    state = method.state_dict()
    _, other = make(heldout=0.25, heldout_seed=99)  # another seed in the config: the state wins on resume
    other.load_state_dict(state)
    assert other.ensure_split(files) == held
    with pytest.raises(ValueError, match="drawn from 20"):
        other.ensure_split(files + ["b/b_99.JPEG"])
    _, big = make(heldout=21)  # the split now has 21 images
    with pytest.raises(ValueError, match="impossible"):
        big.ensure_split(files + ["b/b_99.JPEG"])


def test_method_config_checks():
    with pytest.raises(ValueError, match="without routers"):
        prepare_method_cfg(boost_cfg(router={"type": "spnet"}), TINY)
    cfg = prepare_method_cfg(boost_cfg(), TINY)
    assert cfg["multi_stage_heads"] and cfg["arch"] == "early_exit"
    m = build_model(TINY, cfg)
    assert isinstance(m, EarlyExitResNet) and m.num_exits == 4 and not any(m.gated_blocks)
    with pytest.raises(TypeError, match="EarlyExitResNet"):
        build_method(cfg, build_model(TINY, {"router": {"type": "none"}, "multi_stage_heads": True}))
