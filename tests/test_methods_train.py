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
}


def _history(db: Path, run_id: str, key: str) -> dict[int, float]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _method_state(ckpt: Path) -> dict:
    state = torch.load(Path(ckpt) / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return state["spnet"]["method"]


@pytest.mark.parametrize("method", sorted(EXTRA))
def test_method_trains_through_the_stack(tiny_data, tmp_path, method):
    proc = run_spnet(*tiny_train_args(tiny_data, tmp_path, f"method={method}", "method.target_rate=0.7",
                                      *EXTRA[method]), cwd=tmp_path)
    s = last_json(proc.stdout)
    epochs = 2 if method == "rdinet" else 1
    # BoostNet's held-out quarter of train is left out of the training loader
    steps_per_epoch = STEPS_PER_EPOCH * 3 // 4 if method == "boostnet" else STEPS_PER_EPOCH
    assert s["method"] == ("spnet" if method == "spnet_code" else method)
    assert s["steps"] == epochs * steps_per_epoch and s["val_images"] == TINY_CLASSES * 5
    assert 0.0 <= s["top1"] <= 1.0 and s["macs_per_image"] > 0
    assert len(s["block_rates"]) == 4 and all(0.0 <= r <= 1.0 for r in s["block_rates"])
    assert 0.0 <= s["exec_rate"] <= 1.0
    db = tmp_path / "mlflow.db"
    assert len(_history(db, s["mlflow_run_id"], "val/top1")) == epochs
    assert len(_history(db, s["mlflow_run_id"], "train/ce")) == s["steps"]
    state = _method_state(s["checkpoint"])
    assert state["name"] == s["method"]

    if method == "rdinet":
        assert len(s["option_rates"]) == 4 and all(sum(r) == pytest.approx(1.0, abs=1e-3) for r in s["option_rates"])
        assert s["skip_rate"] + s["light_rate"] + s["full_rate"] == pytest.approx(1.0, abs=1e-6)
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
        assert sum(s["exit_fractions"]) == pytest.approx(1.0, abs=1e-3)
        assert state["heldout"]["indices"].numel() == TINY_CLASSES * 16 // 4
        assert len(_history(db, s["mlflow_run_id"], "val/exit1_top1")) == 1
