"""Resume against what the checkpoint holds: changed settings (applied, refused, allowed deliberately) and damaged
checkpoints (content hashes, load failures), with real DeepSpeed checkpoints, DALI and MLflow on SQLite."""
from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import pytest
from conftest import last_json, run_spnet, tiny_train_args

from spnet_dist.engine.checkpoint import COMPLETE, complete_tags, problem_with
from spnet_dist.engine.resume_config import config_changes

MODEL_FILE = "mp_rank_00_model_states.pt"


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("spnet train:")]


def _run(db: Path, run_id: str) -> mlflow.entities.Run:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").get_run(run_id)


@pytest.fixture(scope="module")
def one_epoch(tiny_data, tmp_path_factory) -> Path:
    """One epoch (8 steps of 8 images) at optim.lr=0.1, checkpoints at steps 4 and 8."""
    tmp = tmp_path_factory.mktemp("one_epoch")
    run_spnet(*tiny_train_args(tiny_data, tmp, "checkpoint.every_steps=4"), cwd=tmp)
    return tmp


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_changed_learning_rate_applies_from_the_resume_step_and_is_recorded(tiny_data, one_epoch, tmp_path):
    tmp = _copy(one_epoch, tmp_path / "run")
    proc = run_spnet(*tiny_train_args(tiny_data, tmp, "trainer.epochs=2", "optim.lr=0.01", "optim.momentum=0.5"),
                     cwd=tmp)
    changed = [line for line in proc.stderr.splitlines() if "changed settings" in line]
    assert len(changed) == 1 and "optim.lr 0.1 -> 0.01" in changed[0] and "trainer.epochs 1 -> 2" in changed[0]
    result = last_json(proc.stdout)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    lrs = {m.step: m.value for m in client.get_metric_history(result["mlflow_run_id"], "train/lr")}
    assert {lrs[s] for s in range(1, 9)} == {0.1} and {lrs[s] for s in range(9, 17)} == {0.01}
    run = client.get_run(result["mlflow_run_id"])
    assert run.data.params["optim.lr"] == "0.1" and run.data.params["resumed/step8/optim.lr"] == "0.01"
    assert "optim.lr 0.1 -> 0.01" in run.data.tags["spnet.config_changes.step8"]
    marker = json.loads((Path(result["checkpoint"]) / COMPLETE).read_text())  # the next checkpoint's config
    assert marker["config"]["optim"]["lr"] == 0.01 and marker["config"]["optim"]["momentum"] == 0.5
    import torch

    groups = torch.load(Path(result["checkpoint"]) / MODEL_FILE, map_location="cpu",
                        weights_only=False)["optimizer"]["param_groups"]
    assert {(g["initial_lr"], g["momentum"]) for g in groups} == {(0.01, 0.5)}  # in force, not only in the config


@pytest.mark.parametrize("change, key, allow", [
    ("model.widths=[8,16,32,128]", "model.widths [8, 16, 32, 64] -> [8, 16, 32, 128]", None),
    ("method.target_rate=0.3", "method.target_rate", "resume_allow=[method.target_rate]"),
])
def test_a_change_of_what_is_trained_stops_with_one_line_and_writes_nothing(tiny_data, one_epoch, tmp_path,
                                                                             change, key, allow):
    tmp = _copy(one_epoch, tmp_path / "run")
    before = {p: p.stat().st_mtime_ns for p in (tmp / "ckpt").rglob("*")}
    db_before = (tmp / "mlflow.db").read_bytes()
    proc = run_spnet(*tiny_train_args(tiny_data, tmp, "trainer.epochs=2", change), cwd=tmp, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and key in lines[0] and "global_step8" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in (tmp / "ckpt").rglob("*")} == before
    assert (tmp / "mlflow.db").read_bytes() == db_before
    if allow is None:
        assert "resume_allow" not in lines[0] and "new run" in lines[0]
    else:  # named in the message as the deliberate way; with it the run continues at the new value
        assert allow.replace("resume_allow=", "resume_allow=") in lines[0]
        proc = run_spnet(*tiny_train_args(tiny_data, tmp, "trainer.epochs=2", change, allow), cwd=tmp)
        result = last_json(proc.stdout)
        assert result["steps"] == 16
        assert _run(tmp / "mlflow.db", result["mlflow_run_id"]).data.params[
            "resumed/step8/method.target_rate"] == "0.3"


def test_newest_checkpoint_damaged_in_place_falls_back_to_the_previous_one(tiny_data, one_epoch, tmp_path):
    tmp = _copy(one_epoch, tmp_path / "run")
    ckpt = tmp / "ckpt"
    assert complete_tags(ckpt)[-2:] == ["global_step4", "global_step8"]
    newest = ckpt / "global_step8" / MODEL_FILE
    size = newest.stat().st_size
    with open(newest, "r+b") as f:  # same size, 64 KiB of other bytes in the middle
        f.seek(size // 2)
        f.write(os.urandom(min(65536, size // 4)))
    assert newest.stat().st_size == size
    assert "SHA-256" in problem_with(ckpt, "global_step8")
    evaluated = run_spnet("eval", f"checkpoint={ckpt / 'global_step8'}", f"data.root={tiny_data}", cwd=tmp,
                          check=False)  # spnet eval verifies too
    lines = [line for line in evaluated.stderr.splitlines() if line.startswith("spnet eval:")]
    assert evaluated.returncode == 2 and len(lines) == 1 and "SHA-256" in lines[0], evaluated.stderr[-2000:]
    proc = run_spnet(*tiny_train_args(tiny_data, tmp, "trainer.epochs=2"), cwd=tmp)
    skipped = [line for line in proc.stderr.splitlines() if "skipping checkpoint" in line]
    assert len(skipped) == 1 and "global_step8" in skipped[0] and MODEL_FILE in skipped[0]
    assert "resumed from" in proc.stderr and "step 4)" in proc.stderr
    assert last_json(proc.stdout)["steps"] == 16


def test_an_unloadable_checkpoint_without_hashes_is_passed_over_without_a_traceback(tiny_data, one_epoch,
                                                                                      tmp_path):
    """A tag written before content hashes were recorded (its marker has sizes only) whose model file was
    overwritten with random bytes: the load fails, resume=auto takes the previous tag with one line."""
    tmp = _copy(one_epoch, tmp_path / "run")
    tag = tmp / "ckpt" / "global_step8"
    marker = json.loads((tag / COMPLETE).read_text())
    del marker["sha256"], marker["config"]
    (tag / COMPLETE).write_text(json.dumps(marker))
    (tag / MODEL_FILE).write_bytes(os.urandom((tag / MODEL_FILE).stat().st_size))
    assert problem_with(tmp / "ckpt", "global_step8") is None  # sizes match: only loading can tell
    explicit = run_spnet(*tiny_train_args(tiny_data, tmp, "trainer.epochs=2", f"resume={tag}"), cwd=tmp,
                         check=False)
    assert explicit.returncode == 2 and len(_error_lines(explicit.stderr)) == 1, explicit.stderr[-2000:]
    assert "could not be loaded" in _error_lines(explicit.stderr)[0] and "Traceback" not in explicit.stderr
    proc = run_spnet(*tiny_train_args(tiny_data, tmp, "trainer.epochs=2"), cwd=tmp)
    assert "Traceback" not in proc.stderr
    skipped = [line for line in proc.stderr.splitlines() if "could not be loaded" in line]
    assert len(skipped) == 1 and "global_step8" in skipped[0]
    assert "step 4)" in proc.stderr and last_json(proc.stdout)["steps"] == 16


def test_config_changes_compares_leaves_and_ignores_keys_added_since():
    old = {"optim": {"lr": 0.1, "milestones": [1]}, "model": {"widths": [8, 16]}}
    new = {"optim": {"lr": 0.1, "milestones": [2], "new_key": 1}, "model": {"widths": [8, 16]}}
    assert config_changes(old, new) == [("optim.milestones", [1], [2])]
    assert config_changes(new, old) == [("optim.milestones", [2], [1]), ("optim.new_key", 1, "<unset>")]
