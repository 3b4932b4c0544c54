"""Best-epoch checkpoint (issue 15, item 9): the checkpoint with the best validation top-1 is kept besides
``checkpoint.keep_last``, survives a resume, and is named in the final JSON line, ``best.json`` and MLflow."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import mlflow
from conftest import last_json, run_spnet, tiny_train_args

from spnet_dist.engine.best import BEST_FILE, BestCheckpoint
from spnet_dist.engine.checkpoint import COMPLETE, Checkpointer, complete_tags


class _Tracker:
    def __init__(self) -> None:
        self.metrics: list[dict] = []
        self.tags: dict[str, str] = {}

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.metrics.append({**metrics, "step": step})

    def log_tags(self, tags: dict) -> None:
        self.tags.update(tags)


def _epoch(hook: BestCheckpoint, ckpt: Checkpointer, loop: SimpleNamespace, top1: float, steps: int = 4) -> None:
    """One epoch as the loop runs it: evaluation (after_eval), then the epoch's checkpoint (save + prune, after_save)."""
    loop.progress.epoch += 1
    loop.progress.step += steps
    hook.after_eval(loop, {"top1": top1})
    tag = ckpt.directory / f"global_step{loop.progress.step}"
    tag.mkdir(parents=True)
    (tag / COMPLETE).write_text("{}")
    ckpt._prune()
    loop.last_ckpt = tag
    hook.after_save(loop, tag)


def _loop() -> SimpleNamespace:
    return SimpleNamespace(progress=SimpleNamespace(epoch=0, step=0), last_ckpt=None, tracker=_Tracker(), report={})


def test_best_survives_keep_last_and_resume(tmp_path):
    ckpt, loop = Checkpointer(tmp_path, keep_last=1), _loop()
    hook = BestCheckpoint(ckpt)
    for top1 in (0.5, 0.7, 0.6, 0.7):  # a tie does not replace the best
        _epoch(hook, ckpt, loop, top1)
    assert complete_tags(tmp_path) == ["global_step8", "global_step16"]  # the best (epoch 2) and the last
    assert json.loads((tmp_path / BEST_FILE).read_text())["tag"] == "global_step8"
    assert loop.tracker.tags["best_epoch"] == "2" and loop.tracker.metrics[-1] == {"best/top1": 0.7, "step": 8}

    state = hook.state_dict()  # what the epoch-4 checkpoint holds; a new process resumes from it
    (tmp_path / BEST_FILE).write_text('{"tag": "global_step99"}')  # e.g. left by an abandoned later attempt
    ckpt2, loop2 = Checkpointer(tmp_path, keep_last=1), _loop()
    loop2.progress.epoch, loop2.progress.step = 4, 16
    hook2 = BestCheckpoint(ckpt2)
    hook2.load_state_dict(state)
    assert json.loads((tmp_path / BEST_FILE).read_text())["tag"] == "global_step8"  # the resumed state wins
    _epoch(hook2, ckpt2, loop2, 0.65)
    assert complete_tags(tmp_path) == ["global_step8", "global_step20"]
    _epoch(hook2, ckpt2, loop2, 0.9)  # a better one: the old best is pruned like any other tag
    assert complete_tags(tmp_path) == ["global_step24"]
    hook2.after_train(loop2)
    assert loop2.report == {"best_checkpoint": str(tmp_path / "global_step24"), "best_top1": 0.9,
                            "best_epoch": 6}


def test_eval_after_the_save_points_at_the_saved_tag(tmp_path):
    """max_steps mid-epoch: the final checkpoint is written before the final evaluation of the same step."""
    ckpt, loop = Checkpointer(tmp_path, keep_last=2), _loop()
    hook = BestCheckpoint(ckpt)
    loop.progress.step = 3
    loop.last_ckpt = tmp_path / "global_step3"
    loop.last_ckpt.mkdir()
    hook.after_eval(loop, {"top1": 0.4})
    hook.after_train(loop)
    assert loop.report["best_checkpoint"] == str(loop.last_ckpt) and loop.report["best_epoch"] == 0


def test_tiny_run_keeps_and_reports_the_best_epoch(tiny_data, tmp_path):
    """2 epochs, then a resume to 3 (keep_last=1): the best of all three evaluations is kept and reported."""
    first = run_spnet(*tiny_train_args(tiny_data, tmp_path, "trainer.epochs=2", "checkpoint.keep_last=1"),
                      cwd=tmp_path)
    out = last_json(run_spnet(*tiny_train_args(tiny_data, tmp_path, "trainer.epochs=3", "checkpoint.keep_last=1"),
                              cwd=tmp_path).stdout)
    run_id = out["mlflow_run_id"]
    assert run_id == last_json(first.stdout)["mlflow_run_id"]  # the resume continued the same MLflow run
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val/top1"))
    assert [s for s, _ in history] == [8, 16, 24]
    best_step, best = max(history, key=lambda sv: (sv[1], -sv[0]))  # the first epoch with the highest top-1
    assert out["best_top1"] == best and out["best_epoch"] == best_step // 8
    assert out["best_checkpoint"] == str(tmp_path / "ckpt" / f"global_step{best_step}")
    assert out["checkpoint"].endswith("global_step24")
    assert sorted(complete_tags(tmp_path / "ckpt")) == sorted({f"global_step{best_step}", "global_step24"})
    pointer = json.loads((tmp_path / "ckpt" / BEST_FILE).read_text())
    assert (pointer["tag"], pointer["top1"], pointer["epoch"]) == (f"global_step{best_step}", best, best_step // 8)
    run = client.get_run(run_id)
    assert run.data.tags["best_checkpoint"] == str(Path(out["best_checkpoint"]).resolve())
    assert run.data.tags["best_epoch"] == str(best_step // 8) and run.data.metrics["best/top1"] == best
