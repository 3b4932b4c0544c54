"""RDI-Net: relational router (GCN with decay), 3-option blocks and their MACs, SRM, cost loss, USW phase."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TINY_MODEL as TINY
import torch
import torch.nn as nn
import yaml

from spnet_dist.methods import build_method, prepare_method_cfg
from spnet_dist.methods.losses import cost_loss, histogram_features, pairwise_l2, rank_loss, srm_triplets
from spnet_dist.models import build_model, cost_table, macs_per_image
from spnet_dist.models.backbone import Bottleneck
from spnet_dist.models.rdinet import FULL, LIGHT, SKIP, RDIResNet, route_of
from spnet_dist.models.routers import RelationalRouter, relation_adjacency

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rdi_cfg(**over) -> dict:
    cfg = yaml.safe_load((ROOT / "configs" / "method" / "rdinet.yaml").read_text())
    cfg.update(over)
    return cfg


def make(model_cfg=TINY, seed: int = 0, **over):
    torch.manual_seed(seed)
    cfg = prepare_method_cfg(rdi_cfg(**over), model_cfg)
    model = build_model(model_cfg, cfg)
    return model, build_method(cfg, model)


def images(b: int, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------- relational router
def test_adjacency_eq4():
    a = relation_adjacency(2, 0.5)
    assert torch.equal(a, torch.tensor([[1.0, 0.5, 0.25], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64))
    assert torch.equal(relation_adjacency(1, 0.0), torch.eye(2, dtype=torch.float64))  # γ = 0: no relation


def test_gcn_aggregation_with_decay_hand_values():
    r = RelationalRouter(2, d=2, r=2, gamma=0.5, dropout=0.0)
    s_cur = torch.tensor([[1.0, 2.0]])
    c1, c2, c3 = torch.tensor([[8.0, 0.0]]), torch.tensor([[4.0, 4.0]]), torch.tensor([[0.0, 2.0]])
    # current + γ·s_{n-1} + γ²·s_{n-2}; s_{n-3} is beyond r = 2
    assert torch.allclose(r.aggregate(s_cur, [c1, c2, c3]), torch.tensor([[1 + 0 + 1.0, 2 + 1 + 1.0]]))
    assert torch.allclose(r.aggregate(s_cur, [c3]), torch.tensor([[1.0, 3.0]]))  # truncated graph (block 2)
    assert torch.allclose(r.aggregate(s_cur, []), s_cur)  # block 1
    assert torch.allclose(RelationalRouter(2, d=2, r=2, gamma=0.0).aggregate(s_cur, [c1, c2]), s_cur)

    # full forward with identity layers: s̃ = ReLU(GAP(x)), s = ReLU(W¹·agg), logits = W²·s + b
    r.eval()
    with torch.no_grad():
        r.fc1.weight.copy_(torch.eye(2)), r.fc1.bias.zero_()
        r.bn.eps = 0.0  # running mean 0 / var 1, γ=1, β=0: identity in eval
        r.gcn.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        r.fc2.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])), r.fc2.bias.copy_(torch.tensor([0.0, 0.0, 0.5]))
    x = s_cur.view(1, 2, 1, 1).expand(1, 2, 3, 3)
    ctx = [c1, c2, c3]
    logits = r(x, ctx)
    agg = torch.tensor([[2.0, 4.0]])
    s = torch.relu(torch.tensor([[agg[0, 0], -agg[0, 1]]]))  # [[2, 0]]
    assert torch.allclose(ctx[-1], s) and len(ctx) == 4  # the router appended its own feature
    assert torch.allclose(logits, torch.tensor([[2.0, 0.0, 2.5]]))


def test_router_chain_carries_gradient():
    m, _ = make(usw_epochs=0, router={"type": "relational", "d": 16, "r": 2, "gamma": 0.5, "dropout": 0.0})
    m.train()
    out = m(images(4))
    # the last block's logits depend on the first router's parameters through the relation graph
    out.gate_logits[:, -1].sum().backward()
    first = m.layer1[0].router
    assert first.fc1.weight.grad is not None and first.fc1.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- 3-option blocks
def test_light_fractions_from_cost_table():
    m, _ = make()
    # layer1.0: conv1 16·8·16², conv2 9·8·8·16², conv3 8·32·16² → (32768 + 65536) / 245760
    # layer2.0 (v1.5, stride on conv2): conv1 32·16·16², conv2 9·16·16·8², conv3 16·64·8²
    assert m.light_fractions[0] == pytest.approx((32768 + 65536) / 245760)
    assert m.light_fractions[1] == pytest.approx((131072 + 65536) / (131072 + 147456 + 65536))
    r50 = build_model("resnet50", prepare_method_cfg(rdi_cfg(), "resnet50"))
    # ResNet-50 non-first block: (51.38 + 51.38) / 218.37 M (spec 1.3)
    assert r50.light_fractions[1] == pytest.approx(2 * 51_380_224 / 218_365_952)
    cifar = build_model("resnet32_cifar", prepare_method_cfg(rdi_cfg(), "resnet32_cifar"))
    # basic block: conv1 / (conv1 + conv2) = 1/2, except the first block of stages 2 and 3 (conv1 has C_in = C/2)
    firsts = {5, 10}
    assert all(f == pytest.approx(1 / 3 if i in firsts else 0.5) for i, f in enumerate(cifar.light_fractions))


@pytest.mark.parametrize("name", ["resnet_tiny", "resnet32_cifar"])
def test_gates_hold_executed_fraction_and_skip_equals_dense(name):
    m, _ = make(name)
    size = m.image_size
    x = images(12, size)
    m.train()
    with torch.no_grad():
        m(x)  # BN statistics
    m.eval()
    with torch.no_grad():
        for blk in m.blocks():  # spread the argmax decisions over all three options
            blk.router.fc2.bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
            blk.router.fc2.weight.normal_(0, 5.0)
        dense = m(x)
        m.set_execution("skip")
        skip = m(x)
        m.set_execution("dense")
    route = route_of(dense.gates)
    assert {SKIP, LIGHT, FULL} <= set(route.unique().tolist())
    rho = torch.tensor(m.light_fractions)
    expect = torch.where(route == FULL, 1.0, torch.where(route == LIGHT, rho.expand_as(dense.gates), 0.0))
    assert torch.allclose(dense.gates, expect)
    assert torch.equal(route, dense.gate_logits.argmax(-1))
    assert torch.allclose(dense.logits, skip.logits, atol=1e-5)
    assert torch.equal(dense.gates, skip.gates)


def test_macs_per_image_counts_what_skip_execution_runs():
    """Σ over images of macs_per_image == fixed cost + the conv MACs actually executed in skip mode."""
    m, _ = make()
    x = images(10)
    m.eval()
    with torch.no_grad():
        for blk in m.blocks():
            blk.router.fc2.weight.normal_(0, 5.0)
    table = cost_table(m)
    ran = {"macs": 0.0}

    def hook(mod, inp, out):
        ran["macs"] += mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels * out[0].numel() * out.shape[0]

    handles = [mod.register_forward_hook(hook) for blk in m.blocks() for n, mod in blk.named_modules()
               if isinstance(mod, nn.Conv2d) and not n.startswith(("downsample", "router"))]
    m.set_execution("skip")
    with torch.no_grad():
        out = m(x)
    for h in handles:
        h.remove()
    per_image = macs_per_image(table, out.gates)
    assert per_image.sum().item() == pytest.approx(ran["macs"] + 10 * table.fixed)
    assert 0 < ran["macs"] < 10 * sum(table.blocks)


# ---------------------------------------------------------------------------------------------- SRM (Eq. 10-12)
def test_srm_triplets_from_known_distance_matrix_with_near_ties():
    d = torch.tensor([[0.0, 1.0, 3.0, 2.0],
                      [1.0, 0.0, 2.0, 2.01],
                      [3.0, 2.0, 0.0, 5.0],
                      [2.0, 2.01, 5.0, 0.0]])
    a, p, n = srm_triplets(d, tie_tol=0.01)
    got = set(zip(a.tolist(), p.tolist(), n.tolist()))
    # anchor 0: ranks 1, 3, 2 → (1,3), (3,2); anchor 1: 0, 2, 3 → (0,2) and (2,3) is a near-tie (2 vs 2.01);
    # anchor 2: 1, 0, 3; anchor 3: 0, 1, 2 → (0,1) near-tie dropped, (1,2)
    assert got == {(0, 1, 3), (0, 3, 2), (1, 0, 2), (2, 1, 0), (2, 0, 3), (3, 1, 2)}
    a2, _, _ = srm_triplets(d, tie_tol=0.0)  # without the tolerance both near-ties count
    assert a2.numel() == 8
    # exact duplicates: a sample at distance 0 from the anchor is not taken for the anchor itself
    dup = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    a3, p3, n3 = srm_triplets(dup, tie_tol=0.01)
    assert set(zip(a3.tolist(), p3.tolist(), n3.tolist())) == {(0, 1, 2), (1, 0, 2)}

    paths = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.0]], requires_grad=True)
    # hinges: (0,3,2) 3 − 2 + 0.5 = 1.5; (2,1,0) √5 − 2 + 0.5; the other four are negative
    expect = 1.5 + (5 ** 0.5 - 2 + 0.5)
    assert rank_loss(paths, a, p, n, 0.5, "sum").item() == pytest.approx(expect, rel=1e-6)
    loss = rank_loss(paths, a, p, n, 0.5, "mean")
    assert loss.item() == pytest.approx(expect / 6, rel=1e-6)
    loss.backward()
    assert torch.isfinite(paths.grad).all() and paths.grad.abs().sum() > 0


def test_histogram_mapping_and_distance():
    x = torch.zeros(2, 3, 4, 4)
    x[1, 0] = 2.6  # channel 0 of image 1 at the top of the range
    h = histogram_features(x, bins=4, value_range=(-2.2, 2.7))
    assert h.shape == (2, 12)
    assert torch.allclose(h.view(2, 3, 4).sum(-1), torch.ones(2, 3))
    assert h[0, 1] == 1.0 and h[1, 3] == 1.0  # bins of width 1.225 from -2.2: 0.0 is in bin 1, 2.6 in bin 3
    d = pairwise_l2(h)
    assert d[0, 1].item() == pytest.approx(2 ** 0.5) and d[0, 0].item() == 0.0


def test_cost_loss_is_eq15_sum():
    v = torch.tensor([0.5, 0.9, 0.2, 0.7])
    assert cost_loss(v, 0.7, None).item() == pytest.approx(0.04 + 0.04 + 0.25 + 0.0)
    assert cost_loss(v, 0.7, [True, False, True, True]).item() == pytest.approx(0.04 + 0.25)


# ---------------------------------------------------------------------------------------------- USW and the method
def test_usw_samples_paths_uniformly():
    m, method = make(usw_epochs=2)
    assert method.phase == "usw" and m.uniform_routes
    torch.manual_seed(1234)
    m.train()
    counts = torch.zeros(m.num_blocks, 3)
    with torch.no_grad():
        for _ in range(5):
            out = m(images(64, seed=5))
            counts += torch.nn.functional.one_hot(route_of(out.gates), 3).sum(0)
            assert not out.gate_logits.any()  # routers are not used during USW
    n = counts.sum(1, keepdim=True)  # 320 draws per block
    chi2 = ((counts - n / 3) ** 2 / (n / 3)).sum(1)
    assert (chi2 < 13.82).all(), chi2  # χ²(2) at p = 0.001, per block
    total = counts.sum(0)
    chi2_all = ((total - total.sum() / 3) ** 2 / (total.sum() / 3)).sum()
    assert chi2_all < 13.82
    m.eval()
    with torch.no_grad():
        assert m(images(4)).gate_logits.any()  # evaluation uses the routers even during USW


def test_usw_phase_loss_and_switch_and_resume():
    m, method = make(usw_epochs=1, rate_weight=1.0, srm_weight=0.2)
    x, y = images(8), torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))
    method.on_epoch_start(0)
    m.train()
    out = m(x)
    loss, logs = method.loss(m, x, y, out)
    assert logs["usw"].item() == 1.0 and loss.item() == pytest.approx(logs["ce"].item())
    loss.backward()
    assert all(p.grad is None for p in m.router_parameters())  # routers unused in USW

    state = method.state_dict()
    assert state["phase"] == "usw" and state["epoch"] == 0
    method.on_epoch_start(1)
    assert method.phase == "joint" and not m.uniform_routes
    m.zero_grad()
    out = m(x)
    loss, logs = method.loss(m, x, y, out)
    assert logs["usw"].item() == 0.0 and logs["srm_triplets"].item() > 0
    expect = logs["ce"] + method.rate_weight * logs["rate_loss"] + method.srm_weight * logs["rank_loss"]
    assert loss.item() == pytest.approx(expect.item(), rel=1e-6)
    assert logs["rate_loss"].item() == pytest.approx(((logs["block_rates"] - 0.7) ** 2).sum().item(), rel=1e-6)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.router_parameters())

    # a resume from the USW checkpoint lands in USW; the trainer's on_epoch_start then moves on
    m2, fresh = make(usw_epochs=1)
    fresh.on_epoch_start(5)
    assert fresh.phase == "joint"
    fresh.load_state_dict(state)
    assert fresh.phase == "usw" and m2.uniform_routes
    fresh.on_epoch_start(1)
    assert fresh.phase == "joint" and not m2.uniform_routes
    with pytest.raises(ValueError, match="unknown phase"):
        fresh.load_state_dict({**state, "phase": "warmup"})


def test_method_config_checks():
    with pytest.raises(ValueError, match="relational"):
        prepare_method_cfg(rdi_cfg(router={"type": "spnet"}), TINY)
    cfg = prepare_method_cfg(rdi_cfg(), TINY)
    assert cfg["arch"] == "rdinet" and isinstance(build_model(TINY, cfg), RDIResNet)
    with pytest.raises(TypeError, match="RDIResNet"):
        build_method(cfg, build_model(TINY, {"router": {"type": "aig"}}))


def test_training_runs_every_path_so_all_ranks_have_the_same_gradients():
    """With autograd on, an unused path still runs (zero weight): DDP / DeepSpeed need the same gradient set on
    every rank, and USW routes (no gradient) can leave a path unused on one rank only."""
    m, _ = make()
    blk = m.layer2[0]
    x = torch.randn(4, blk.conv1.in_channels, 8, 8)
    z = torch.nn.functional.one_hot(torch.full((4,), LIGHT), 3).float()  # everyone light: conv2 unused
    m.train()
    m._dense_block(blk, x, z).sum().backward()
    assert blk.conv2.weight.grad is not None and not blk.conv2.weight.grad.any()
    assert blk.conv1.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- binary option (Eq. 8-9)
BINARY = {"type": "relational", "options": 2, "d": 16, "r": 2, "gamma": 0.5, "dropout": 0.0}


class FixedLogits(nn.Module):
    """A stand-in router returning given logits (and appending nothing to the relational context)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x, context=None):
        return self.logits


def test_binary_soft_relaxation_matches_eq9_on_a_hand_example(monkeypatch):
    """Eq. 8: v = softmax((ℓ + G)/τ)[1]; Eq. 9: x' = v·F(x) + (1 − v)·x. Hand example: ℓ = (0, ln 3) and (ln 3, 0),
    τ = 1, the same Gumbel draw G for both options (constant uniform noise) → v = 3/4 and 1/4. The block: identity
    shortcut, branch ≡ −1 (zero convs, BN3 shift −1), so F(x) = ReLU(x − 1). Image 1: x = 2 → F = 1,
    x' = 0.75·1 + 0.25·2 = 1.25; image 2: x = 0.5 → F = 0, x' = 0.25·0 + 0.75·0.5 = 0.375 (mixing inside the ReLU,
    ReLU(x + v·branch), would give 1.25 and 0.25)."""
    m, _ = make(usw_epochs=0, router=BINARY)
    assert m.num_options == 2 and m.relaxation == "soft"
    blk = m.layer1[0]
    ln3 = float(torch.log(torch.tensor(3.0)))
    blk.router = FixedLogits(torch.tensor([[0.0, ln3], [ln3, 0.0]]))
    monkeypatch.setattr(torch, "rand_like", lambda t: torch.full_like(t, 0.5))  # G equal for both options
    m.train()
    z, _ = m._gate(blk, torch.zeros(2, 16, 4, 4))
    assert torch.allclose(z, torch.tensor([[0.25, 0.75], [0.75, 0.25]]))  # soft in training
    assert torch.allclose(m._gate_value(blk, z), torch.tensor([0.75, 0.25]))  # gates hold v

    hand = Bottleneck(4, 1)  # 4 -> 1 -> 1 -> 4 channels, stride 1: identity shortcut
    with torch.no_grad():
        for conv in (hand.conv1, hand.conv2, hand.conv3):
            conv.weight.zero_()
        hand.bn3.bias.fill_(-1.0)
    hand.eval()  # BN: running mean 0, var 1 → branch = −1 (eps 1e-5 scales 0 only)
    x = torch.tensor([2.0, 0.5]).view(2, 1, 1, 1).expand(2, 4, 3, 3).contiguous()
    out = RDIResNet._dense_block(hand, x, z)
    assert torch.allclose(out[:, :, 0, 0], torch.tensor([[1.25] * 4, [0.375] * 4]))

    m.eval()  # evaluation: hard argmax decisions
    z_eval, _ = m._gate(blk, torch.zeros(2, 16, 4, 4))
    assert torch.equal(z_eval, torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def test_binary_model_and_method():
    m, method = make(usw_epochs=0, router=BINARY)
    x, y = images(8), torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))
    m.train()
    out = m(x)
    assert out.gate_logits.shape == (8, 4, 2)
    assert ((out.gates > 0) & (out.gates < 1)).any()  # soft v in training
    loss, logs = method.loss(m, x, y, out)
    assert logs["rate_loss"].item() == pytest.approx(((out.gates.mean(0) - 0.7) ** 2).sum().item(), rel=1e-5)
    assert logs["light_rate"].item() == 0.0
    assert logs["full_rate"].item() == pytest.approx(out.gates.mean().item(), rel=1e-5)
    assert logs["srm_triplets"].item() > 0
    loss.backward()
    assert all(p.grad is not None for p in m.router_parameters())
    m.eval()
    with torch.no_grad():
        for blk in m.blocks():
            blk.router.fc2.weight.normal_(0, 5.0)
        dense = m(x)
        m.set_execution("skip")
        skip = m(x)
        m.set_execution("dense")
    assert set(dense.gates.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(dense.logits, skip.logits, atol=1e-5) and torch.equal(dense.gates, skip.gates)
    usw, _ = make(usw_epochs=1, router=BINARY)  # warm-up: skip / execute drawn uniformly
    usw.train()
    with torch.no_grad():
        assert set(usw(images(16)).gates.unique().tolist()) == {0.0, 1.0}


def test_router_option_checks():
    with pytest.raises(ValueError, match="relaxation=soft needs router.options=2"):
        make(router={"type": "relational", "relaxation": "soft"})
    with pytest.raises(ValueError, match="3 options .* or 2"):
        make(router={"type": "relational", "options": 4})
    m, _ = make(usw_epochs=0, router={**BINARY, "relaxation": "hard_st"})
    m.train()
    with torch.no_grad():
        assert set(m(images(8)).gates.unique().tolist()) <= {0.0, 1.0}  # binary with hard straight-through
    assert make()[0].relaxation == "hard_st" and make()[0].num_options == 3  # the default
