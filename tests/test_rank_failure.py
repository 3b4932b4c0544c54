"""A rank that dies (SIGKILL, as the OOM killer does) or freezes (SIGSTOP) mid-training: the run ends quickly, says
which rank, with a distinct exit code; under SLURM transient failures are requeued into the same MLflow run.

Real processes, real signals, real SLURM (tests/slurm_fixtures.py); resnet_tiny at 32 px on the tiny dataset,
2 ranks over gloo. Slow tests say so in their docstring.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from conftest import last_json, run_spnet, tiny_train_args

from spnet_dist.engine.heartbeat import peer_failure
from spnet_dist.engine.preempt import EXIT_RANK_LOST
from spnet_dist.launch.failures import classify, srun_failures

JOB_TIMEOUT = 420


def mlflow_runs(tmp: Path) -> list:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("spnet")
    return client.search_runs([exp.experiment_id]) if exp else []


def logged_steps(tmp: Path) -> int:
    try:
        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}")
        return max((len(client.get_metric_history(r.info.run_id, "train/loss")) for r in mlflow_runs(tmp)),
                   default=0)
    except Exception:  # noqa: BLE001 - the store is being created
        return 0


def wait_for(what: str, predicate, timeout: float, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def spawned_ranks(parent: int) -> list[int]:
    """PIDs of the ranks `spnet train` spawned (torch.multiprocessing, spawn), in rank order."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent and "spawn_main" in cmd:
                out.append(int(d.name))
    return sorted(out)


# ---------------------------------------------------------------------------------------------------- fast


def test_srun_lines_name_the_task_and_the_cause():
    text = ("spnet-slurm: batch start restart 0\n"
            "srun: error: n1: task 1: Killed\n"
            "srun: Terminating StepId=7.0\n"
            "srun: error: n1: task 0: Exited with exit code 76\n")
    fails = srun_failures(text)
    assert fails == [{"node": "n1", "rank": 1, "signal": "SIGKILL", "exit_code": None},
                     {"node": "n1", "rank": 0, "signal": None, "exit_code": 76}]
    cause = classify(fails, lost=[])
    assert cause["rank"] == 1 and cause["transient"] and cause["signal"] == "SIGKILL"
    det = classify([{"node": "n2", "rank": 1, "signal": None, "exit_code": 2},
                    {"node": "n1", "rank": 0, "signal": None, "exit_code": 76}], lost=[])
    assert det["rank"] == 1 and not det["transient"]
    frozen = classify([{"node": "n1", "rank": 0, "signal": None, "exit_code": 76},
                       {"node": "n1", "rank": 1, "signal": "SIGKILL", "exit_code": None}],
                      lost=[{"rank": 1, "node": "n1", "pid": 5, "silent_s": 31}])
    assert frozen["rank"] == 1 and frozen["cause"] == "stopped answering" and frozen["transient"]


def test_an_ordinary_error_is_not_a_peer_failure():
    assert peer_failure(ValueError("bad value")) is None  # no heartbeat running: never a peer failure


# ---------------------------------------------------------------------------------------------------- local


def test_local_rank_killed_is_one_line_with_exit_76_and_a_failed_run(tiny_data, tmp_path):
    """Slow (~40 s): `spnet train trainer.nprocs=2`, rank 1 SIGKILLed mid-training."""
    args = tiny_train_args(tiny_data, tmp_path, "trainer.nprocs=2", "trainer.batch_size=4", "trainer.epochs=40")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "spnet_dist.cli", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for("training to start", lambda: logged_steps(tmp_path) >= 2, timeout=180, poll=0.3)
        ranks = spawned_ranks(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_RANK_LOST, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("spnet train: error:")]
    assert len(lines) == 1 and f"rank 1 (pid {ranks[1]}) was killed by SIGKILL" in lines[0], err[-3000:]
    assert took < 30, f"the run took {took:.0f} s to end after the kill"
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FAILED"
