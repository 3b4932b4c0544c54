"""RDI-Net's warm-up through the real trainer (2 ranks, gloo): routers untouched by the optimizer during the warm-up
under every ZeRO stage, and the two-stage flow (warm-up run, then a joint run from its checkpoint)."""
from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from conftest import TINY_CLASSES, last_json, run_spnet, tiny_train_args

from spnet_dist.config import compose
from spnet_dist.engine.phase_params import frozen_groups
from spnet_dist.engine.rng import seed_all
from spnet_dist.methods.build import build_from_config

MODEL_FILE = "mp_rank_00_model_states.pt"
SMALL = ["method.router.d=32", f"model.num_classes={TINY_CLASSES}"]


def saved_module(ckpt: str | Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(ckpt) / MODEL_FILE, map_location="cpu", weights_only=False)["module"]


def initial_state(overrides: list[str]) -> dict[str, torch.Tensor]:
    """The network the trainer builds at its start (same composed config, same seed, nothing trained)."""
    cfg = compose(overrides)
    seed_all(int(cfg.seed))
    net, _ = build_from_config(cfg.model, cfg.method)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def router_params(state: dict[str, torch.Tensor]) -> list[str]:
    """Router parameter keys (BN running statistics of the routers are buffers, not parameters)."""
    return [k for k in state if ".router." in k and not k.rsplit(".", 1)[1].startswith(("running_", "num_batches"))]


@pytest.mark.parametrize("stage", ["zero0", "zero1", "zero2"])
def test_routers_bitwise_unchanged_through_the_warmup_with_weight_decay(tiny_data, tmp_path, stage):
    """Before the fix DeepSpeed's zero-filled router gradients met weight decay 0.01 and momentum: 0.718x the router
    norm after 40 steps (the same under ZeRO 0, 1 and 2). Now the routers are left out of every warm-up step."""
    over = ["method=rdinet", f"deepspeed={stage}", "optim.weight_decay=0.01", "method.usw_epochs=1", *SMALL]
    proc = run_spnet(*tiny_train_args(tiny_data, tmp_path, "trainer.nprocs=2", *over), cwd=tmp_path)
    s = last_json(proc.stdout)
    assert s["steps"] == TINY_CLASSES * 16 // 16 and s["world_size"] == 2
    init, after = initial_state(over), saved_module(s["checkpoint"])
    keys = router_params(init)
    assert keys and all(torch.equal(init[k], after[k]) for k in keys), \
        [k for k in keys if not torch.equal(init[k], after[k])]
    conv = "layer1.0.conv1.weight"  # the backbone did train (and decay) meanwhile
    assert not torch.equal(init[conv], after[conv])


def test_zero_groups_must_not_mix_phase_and_active_parameters():
    a, b, c = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    assert frozen_groups([[a, b], [c]], [c]) == [1]
    assert frozen_groups([[a, b], [c]], []) == []
    with pytest.raises(ValueError, match="mixes 1 parameters inactive"):
        frozen_groups([[a, b], [c]], [a])


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_excluded_parameters_and_their_momentum_stay_bitwise(zero, fused):
    """A parameter with momentum state already built up and a (zero-filled, as DeepSpeed's) gradient: the step
    inside ``excluded_from_step`` leaves it and its momentum buffer as they were; the other parameter moves.
    ZeRO 0: the torch optimizer itself; ZeRO 1/2: the stand-in exposes DeepSpeed's ``bit16_groups`` / ``optimizer``."""
    from types import SimpleNamespace

    from spnet_dist.engine.phase_params import excluded_from_step

    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(5))
    sgd = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1, momentum=0.9, weight_decay=0.01,
                          nesterov=True, fused=fused or None)
    a.grad, b.grad = torch.randn(5), torch.randn(5)
    sgd.step()  # momentum buffers exist for both
    engine = SimpleNamespace(optimizer=SimpleNamespace(bit16_groups=[[a], [b]], optimizer=sgd) if zero else sgd)
    a0, b0 = a.detach().clone(), b.detach().clone()
    buf0 = sgd.state[b]["momentum_buffer"].clone()
    a.grad, b.grad = torch.randn(5), torch.zeros(5)
    with excluded_from_step(engine, [b]):
        sgd.step()
    assert torch.equal(b, b0) and torch.equal(sgd.state[b]["momentum_buffer"], buf0)
    assert not torch.equal(a, a0)
    assert [(g["lr"], g["weight_decay"], g["momentum"], g["nesterov"]) for g in sgd.param_groups] == \
        [(0.1, 0.01, 0.9, True)] * 2  # the group settings are back after the step


def _history(db: Path, run_id: str, key: str) -> list[float]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_two_stage_flow_warmup_then_joint_from_its_checkpoint(tiny_data, tmp_path):
    """Stage 1 (method=rdinet_warmup): warm-up only. Stage 2 (method=rdinet_joint, model.pretrained=<stage-1
    checkpoint.dir>): joint only, its own run and schedule, starting from stage 1's backbone; routers fresh."""
    warm_dir, joint_dir = tmp_path / "warm", tmp_path / "joint"
    warm_dir.mkdir(), joint_dir.mkdir()
    warm = last_json(run_spnet(*tiny_train_args(tiny_data, warm_dir, "method=rdinet_warmup", "trainer.epochs=2",
                                                "optim.milestones=[1]", *SMALL), cwd=warm_dir).stdout)
    assert _history(warm_dir / "mlflow.db", warm["mlflow_run_id"], "train/usw") == [1.0] * 16  # never joint
    lrs = _history(warm_dir / "mlflow.db", warm["mlflow_run_id"], "train/lr")  # its own schedule: x0.1 after epoch 1
    assert lrs[0] == pytest.approx(0.1) and lrs[-1] == pytest.approx(0.01)
    w = saved_module(warm["checkpoint"])

    # lr 0: the joint run's weights stay what it loaded, so they show where it started
    over = ["method=rdinet_joint", f"model.pretrained={warm_dir / 'ckpt'}", "optim.lr=0.0", *SMALL]
    joint = last_json(run_spnet(*tiny_train_args(tiny_data, joint_dir, *over), cwd=joint_dir).stdout)
    j = saved_module(joint["checkpoint"])
    db = joint_dir / "mlflow.db"
    assert _history(db, joint["mlflow_run_id"], "train/usw") == [0.0] * 8  # joint from the first step
    assert joint["steps"] == 8 and joint["epochs"] == 1  # its own run: epoch and schedule counted from 0
    backbone = [k for k in w if ".router." not in k and k.endswith("weight") and "bn" not in k]
    assert backbone and all(torch.equal(w[k], j[k]) for k in backbone)  # conv / fc weights: stage 1's
    init = initial_state(over[:1] + over[2:])  # routers: as built (the official --resume skips 'router' keys)
    assert all(torch.equal(init[k], j[k]) for k in router_params(init))
    assert not all(torch.equal(w[k], init[k]) for k in backbone)  # stage 1 did train: a real test of the load

    # with the preset's lr the joint stage trains the routers from its first step
    joint2_dir = tmp_path / "joint2"
    joint2_dir.mkdir()
    j2 = last_json(run_spnet(*tiny_train_args(tiny_data, joint2_dir, *over[:2], *SMALL), cwd=joint2_dir).stdout)
    trained = saved_module(j2["checkpoint"])
    assert any(not torch.equal(init[k], trained[k]) for k in router_params(init))
    assert _history(joint2_dir / "mlflow.db", j2["mlflow_run_id"], "train/lr")[0] == pytest.approx(0.1)
