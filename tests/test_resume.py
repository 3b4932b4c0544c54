"""Exact resume, preemption and checkpoint faults with 2 real ranks (gloo), DALI, DeepSpeed and MLflow."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import last_json, run_spnet, tiny_train_args

from spnet_dist.engine.checkpoint import COMPLETE, resolve_resume

# 4 classes x 16 images, 2 ranks x batch 4 -> 8 steps per epoch; checkpoint at step 5 is mid-epoch.
TWO_RANKS = ["trainer.nprocs=2", "trainer.batch_size=4", "method=spnet_code", "checkpoint.every_steps=5",
             "deepspeed=zero1", "trainer.sync_check_every=3"]


def _history(db: Path, run_id: str, key: str) -> dict[int, float]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _states(ckpt: Path) -> tuple[dict, dict]:
    state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return state["module"], state["spnet"]["method"]


def _assert_same_tensors(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tensors(x, y, f"{where}[{i}]")


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted_run_bitwise(tiny_data, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    args = ["trainer.epochs=2", *TWO_RANKS]
    run_a = last_json(run_spnet(*tiny_train_args(tiny_data, a, *args), cwd=a).stdout)

    killed = run_spnet(*tiny_train_args(tiny_data, b, *args), cwd=b, check=False,
                       env={"SPNET_FAILPOINT": "kill_after_save:5"})
    assert killed.returncode != 0
    assert (b / "ckpt" / "global_step5" / COMPLETE).is_file() and not (b / "ckpt" / "global_step10").exists()
    run_b = last_json(run_spnet(*tiny_train_args(tiny_data, b, *args), cwd=b).stdout)

    assert run_b["steps"] == run_a["steps"] == 16
    for key in ("train/loss", "train/exec_rate", "train/rate_loss", "train/logits_kd", "train/path_kd"):
        hist_a = _history(a / "mlflow.db", run_a["mlflow_run_id"], key)
        hist_b = _history(b / "mlflow.db", run_b["mlflow_run_id"], key)
        assert sorted(hist_b) == list(range(1, 17)), f"{key}: steps logged {sorted(hist_b)}"
        assert hist_a == hist_b, f"{key} differs after resume"
    module_a, method_a = _states(Path(run_a["checkpoint"]))
    module_b, method_b = _states(Path(run_b["checkpoint"]))
    _assert_same_tensors(module_a, module_b, "student")
    _assert_same_tensors(method_a["teacher"], method_b["teacher"], "teacher")
    assert run_a["top1"] == run_b["top1"]


def test_truncated_newest_checkpoint_is_skipped_with_a_message(tiny_data, tmp_path, caplog):
    # 8 steps per epoch: checkpoints at steps 5, 8 (epoch end) and 10
    run_spnet(*tiny_train_args(tiny_data, tmp_path, "trainer.epochs=3", "trainer.max_steps=10",
                               "checkpoint.every_steps=5"), cwd=tmp_path)
    ckpt = tmp_path / "ckpt"
    newest = ckpt / "global_step10" / "mp_rank_00_model_states.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level("WARNING"):
        assert resolve_resume("auto", ckpt) == (ckpt, "global_step8")
    assert "global_step10" in caplog.text and "bytes" in caplog.text

    proc = run_spnet(*tiny_train_args(tiny_data, tmp_path, "trainer.epochs=3", "trainer.max_steps=9"),
                     cwd=tmp_path)
    assert "skipping checkpoint" in proc.stderr and "global_step10" in proc.stderr
    assert "resumed from" in proc.stderr and "step 8" in proc.stderr
    assert last_json(proc.stdout)["steps"] == 9


def test_sigterm_saves_exits_with_documented_code_and_resume_continues(tiny_data, tmp_path):
    args = tiny_train_args(tiny_data, tmp_path, "trainer.epochs=50", "trainer.nprocs=2", "trainer.batch_size=4",
                           "checkpoint.every_steps=3")
    proc = subprocess.Popen([sys.executable, "-m", "spnet_dist.cli", *args], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = tmp_path / "ckpt" / "global_step3" / COMPLETE
    deadline = time.time() + 240
    while not first.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert first.exists(), proc.stderr.read() if proc.poll() is not None else "no checkpoint in time"
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-3000:]
    summary = last_json(out)
    assert summary["preempted"] is True and summary["steps"] > 3
    stopped_at = summary["steps"]
    assert (tmp_path / "ckpt" / "latest").read_text() == f"global_step{stopped_at}"
    assert "exiting with code 75" in err

    resumed = last_json(run_spnet(*args, f"trainer.max_steps={stopped_at + 2}", cwd=tmp_path).stdout)
    assert resumed["steps"] == stopped_at + 2 and resumed["mlflow_run_id"] == summary["mlflow_run_id"]
    assert resumed["preempted"] is False


def test_world_size_change_zero1_refuses_with_conversion_hint(tiny_data, tmp_path):
    run_spnet(*tiny_train_args(tiny_data, tmp_path, "deepspeed=zero1", "trainer.nprocs=2", "trainer.batch_size=4",
                               "trainer.max_steps=3"), cwd=tmp_path)
    proc = run_spnet(*tiny_train_args(tiny_data, tmp_path, "deepspeed=zero1", "trainer.max_steps=5"), cwd=tmp_path,
                     check=False)
    assert proc.returncode == 2
    assert "written by 2 ranks" in proc.stderr and "ds_to_universal" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_world_size_change_zero0_resumes_at_epoch_boundary(tiny_data, tmp_path):
    common = ["deepspeed=zero0", "trainer.batch_size=4"]
    run_spnet(*tiny_train_args(tiny_data, tmp_path, *common, "trainer.nprocs=2", "trainer.max_steps=3"),
              cwd=tmp_path)
    proc = run_spnet(*tiny_train_args(tiny_data, tmp_path, *common, "trainer.max_steps=5"), cwd=tmp_path)
    assert "world size changed 2 -> 1" in proc.stderr and "restarts at its beginning" in proc.stderr
    assert last_json(proc.stdout)["steps"] == 5
