"""Every method trains through the full stack (Hydra → DALI → model → DeepSpeed → MLflow) on the tiny dataset and
reports top-1, MACs per image from hard decisions and per-block execution rates (per-exit results for BoostNet)."""
from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from conftest import TINY_CLASSES, last_json, run_spnet, tiny_train_args

STEPS_PER_EPOCH = TINY_CLASSES * 16 // 8
EXTRA = {
    "aig": [],
    "spnet_code": [],
    # one USW epoch, then one joint epoch (the phase switch happens through the trainer's on_epoch_start)
    "rdinet": ["trainer.epochs=2", "method.usw_epochs=1", "method.router.d=32"],
    "boostnet": ["method.heldout=0.25"],
    "static": [],  # the plain ResNet: no routers, every block runs
}


def _history(db: Path, run_id: str, key: str) -> dict[int, float]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def expected_macs(block_rates: list[float], method: str) -> float:
    """MACs per image of the tiny model with this method's routers and heads at these block execution fractions
    (hard gates: the count is linear in them)."""
    from spnet_dist.models import macs_per_image

    return float(macs_per_image(cost_table_of(method), torch.tensor([block_rates], dtype=torch.float64)))


def cost_table_of(method: str):
    """The MAC table of the tiny model (32 px) with this method's routers and heads."""
    from spnet_dist.config import compose
    from spnet_dist.methods import prepare_method_cfg
    from spnet_dist.models import build_model, cost_table

    cfg = compose([f"method={method}", f"model.num_classes={TINY_CLASSES}"])
    return cost_table(build_model(cfg.model, prepare_method_cfg(cfg.method, cfg.model)), 32)


def _method_state(ckpt: Path) -> dict:
    state = torch.load(Path(ckpt) / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return state["spnet"]["method"]


@pytest.mark.parametrize("method", sorted(EXTRA))
def test_method_trains_through_the_stack(tiny_data, tmp_path, method):
    target = [] if method == "static" else ["method.target_rate=0.7"]
    proc = run_spnet(*tiny_train_args(tiny_data, tmp_path, f"method={method}", *target, *EXTRA[method]), cwd=tmp_path)
    s = last_json(proc.stdout)
    epochs = 2 if method == "rdinet" else 1
    # BoostNet's held-out quarter of train is left out of the training loader
    steps_per_epoch = STEPS_PER_EPOCH * 3 // 4 if method == "boostnet" else STEPS_PER_EPOCH
    assert s["method"] == ("spnet" if method == "spnet_code" else method)
    assert s["steps"] == epochs * steps_per_epoch and s["val_images"] == TINY_CLASSES * 5
    n = s["val_images"]
    assert s["top1"] * n == pytest.approx(round(s["top1"] * n))  # a count of images
    assert len(s["block_rates"]) == 4
    if method == "static":  # every block runs on every image: MACs = the backbone count
        assert s["exec_rate"] == 1.0 and s["block_rates"] == [1.0] * 4
        assert s["macs_per_image"] == expected_macs([1.0] * 4, method) == cost_table_of(method).backbone_full
    if method in ("aig", "spnet_code"):  # every block gated: exec_rate is the mean block rate, counts are integral
        assert s["exec_rate"] == pytest.approx(sum(s["block_rates"]) / 4)
        assert all(r * n == pytest.approx(round(r * n), abs=1e-3) for r in s["block_rates"])
        assert s["macs_per_image"] == pytest.approx(expected_macs(s["block_rates"], method), rel=1e-6)
    db = tmp_path / "mlflow.db"
    assert len(_history(db, s["mlflow_run_id"], "val/top1")) == epochs
    assert len(_history(db, s["mlflow_run_id"], "train/ce")) == s["steps"]
    state = _method_state(s["checkpoint"])
    assert state["name"] == s["method"]

    if method == "rdinet":
        assert len(s["option_rates"]) == 4
        # option fractions are counts of images; a block runs fully for 'full' and partly for 'light'
        assert all(x * n == pytest.approx(round(x * n), abs=0.05) for r in s["option_rates"] for x in r)
        assert all(full - 1e-3 <= b <= light + full + 1e-3 and (light == 0 or b < light + full)
                   for b, (_, light, full) in zip(s["block_rates"], s["option_rates"]))
        assert s["full_rate"] == pytest.approx(sum(r[2] for r in s["option_rates"]) / 4, abs=1e-3)
        usw = _history(db, s["mlflow_run_id"], "train/usw")
        assert [usw[k] for k in sorted(usw)] == [1.0] * STEPS_PER_EPOCH + [0.0] * STEPS_PER_EPOCH
        assert state["phase"] == "joint" and state["epoch"] == 1
    if method == "boostnet":
        exits = s["exits"]
        assert [e["exit"] for e in exits] == [1, 2, 3, 4]
        assert all(a["macs"] < b["macs"] for a, b in zip(exits, exits[1:]))
        assert s["full_macs"] == pytest.approx(exits[-1]["macs"]) and s["macs_per_image"] <= s["full_macs"]
        assert s["calibration"] == "heldout" and s["heldout_images"] == TINY_CLASSES * 16 // 4
        assert s["heldout_trained_on"] is False
        assert s["top1"] == pytest.approx(s["simulated_top1"]) and s["macs_per_image"] == pytest.approx(
            s["simulated_macs"])
        # the budgeted cost is what the images cost at the exits they left by
        assert all(f * n == pytest.approx(round(f * n), abs=0.05) for f in s["exit_fractions"])
        assert s["macs_per_image"] == pytest.approx(sum(f * e["macs"] for f, e in zip(s["exit_fractions"], exits)),
                                                    rel=1e-3)
        assert state["heldout"]["indices"].numel() == TINY_CLASSES * 16 // 4
        assert len(_history(db, s["mlflow_run_id"], "val/exit1_top1")) == 1
