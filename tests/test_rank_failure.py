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
from test_submit import wait_for

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
    killed = classify([{"node": "n1", "rank": 1, "signal": "SIGKILL", "exit_code": None}],  # silent only while
                      lost=[{"rank": 1, "node": "n1", "pid": 5, "silent_s": 4.6, "stale_s": 300}])  # the others probed
    assert killed["cause"] == "killed by SIGKILL" and killed["transient"]
    unreported = classify([], lost=[{"rank": 1, "node": "n1", "pid": 5, "silent_s": 4.6, "stale_s": 300}])
    assert unreported["cause"] == "stopped answering"


def test_an_ordinary_error_is_not_a_peer_failure():
    assert peer_failure(ValueError("bad value")) is None  # no heartbeat running: never a peer failure


# ---------------------------------------------------------------------------------------------------- local


def run_and_signal(tiny_data, tmp_path: Path, sig: int, *extra: str) -> tuple[subprocess.Popen, str, int, float]:
    """`spnet train trainer.nprocs=2 ...`; ``sig`` to rank 1 once training logged 2 steps; returns (process,
    stderr, rank 1's pid, seconds from the signal to the end)."""
    args = tiny_train_args(tiny_data, tmp_path, "trainer.nprocs=2", "trainer.batch_size=4", "trainer.epochs=40",
                           *extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "spnet_dist.cli", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ranks: list[int] = []
    try:
        wait_for("training to start", lambda: logged_steps(tmp_path) >= 2, timeout=180, poll=0.3)
        ranks = spawned_ranks(proc.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], sig)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=120)
        return proc, err, ranks[1], time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def one_error_line(proc: subprocess.Popen, err: str) -> str:
    assert proc.returncode == EXIT_RANK_LOST, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("spnet train: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def test_local_rank_killed_is_one_line_with_exit_76_and_a_failed_run(tiny_data, tmp_path):
    """Slow (~40 s): `spnet train trainer.nprocs=2`, rank 1 SIGKILLed mid-training."""
    proc, err, pid, took = run_and_signal(tiny_data, tmp_path, signal.SIGKILL)
    line = one_error_line(proc, err)
    assert f"rank 1 (pid {pid}) was killed by SIGKILL" in line, err[-3000:]
    assert took < 30, f"the run took {took:.0f} s to end after the kill"
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FAILED"


def test_local_rank_frozen_ends_the_run_after_the_collective_timeout(tiny_data, tmp_path):
    """Slow (~50 s): rank 1 SIGSTOPped with trainer.collective_timeout_s=10: rank 0 names it and ends (exit 76),
    the parent kills the frozen rank; one line, the MLflow run FAILED."""
    proc, err, pid, took = run_and_signal(tiny_data, tmp_path, signal.SIGSTOP, "trainer.collective_timeout_s=10")
    line = one_error_line(proc, err)
    assert f"rank 1 (node " in line and f"pid {pid}) stopped answering" in line, err[-3000:]
    assert 10 <= took < 45, f"the run ended {took:.0f} s after the rank froze"
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FAILED"


# ---------------------------------------------------------------------------------------------------- SLURM


def slurm_status(slurm, tmp: Path, job_id: str) -> dict:
    return last_json(run_spnet("jobs", "--folder", str(tmp / "slurm"), "status", job_id, cwd=tmp,
                               env=slurm.environ()).stdout)


def test_slurm_rank_killed_is_requeued_and_completes_in_the_same_run(slurm_cluster, tiny_data, tmp_path):
    """Slow (~2 min): 1 node x 2 tasks; task 1 SIGKILLed after the first checkpoint -> srun ends the step, the
    batch script's supervisor names the task (rank 1, node n1, SIGKILL) and requeues the job, which resumes from
    that checkpoint and completes in the same MLflow run."""
    from test_submit import finish, index, job_args, submit_background, task_pids

    from spnet_dist.engine.checkpoint import complete_tags

    epochs = 6  # 24 steps at 2 ranks x batch 8
    proc = submit_background(slurm_cluster, tmp_path, *job_args(tiny_data, tmp_path, f"trainer.epochs={epochs}",
                                                                "checkpoint.every_steps=2"),
                             "cluster.tasks_per_node=2", "cluster.max_failures=1")
    try:
        entry = wait_for("the job in the index", lambda: (index(tmp_path) or [None])[0], timeout=60)
        wait_for("a checkpoint", lambda: complete_tags(entry["checkpoint_dir"]), timeout=240, poll=0.2)
        pids = task_pids(entry)
        os.kill(pids[1], signal.SIGKILL)
        out = finish(proc, timeout=JOB_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    (job,) = out["jobs"]
    assert out["ok"] and job["restarts"] == 1 and job["summary"]["steps"] == epochs * 4 * 16 // 16
    events = [json.loads(x) for x in (Path(entry["job_dir"]) / "events.jsonl").read_text().splitlines()]
    (failed,) = [e for e in events if e["event"] == "rank_failed"]
    assert (failed["rank"], failed["node"], failed["signal"]) == (1, "n1", "SIGKILL"), failed
    assert failed["transient"] and failed["requeued"] and failed["restart"] == 0
    assert [e["event"] for e in events][-1] == "completed"
    runs = mlflow_runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.run_id == out["mlflow_run_id"] == failed["mlflow_run_id"]
    assert runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["slurm.failures"] == "rank1@n1:SIGKILL@restart0"
    status = slurm_status(slurm_cluster, tmp_path, entry["job_id"])
    assert status["state"] == "COMPLETED" and status["restarts"] == 1
    assert [(f["rank"], f["node"], f["signal"], f["requeued"]) for f in status["failures"]] == [
        (1, "n1", "SIGKILL", True)]
    assert "rank 1 on node n1 killed by SIGKILL" in status["failures"][0]["message"]


def test_slurm_frozen_rank_ends_the_job_within_the_timeout_and_is_named(slurm_cluster, tiny_data, tmp_path):
    """Slow (~1.5 min): task 1 SIGSTOPped with trainer.collective_timeout_s=30 -> rank 0 notices the silent
    heartbeat and its collective times out; it exits 76, srun ends the step, the supervisor records rank 1 as
    "stopped answering" (cluster.max_failures=0: not requeued) and the MLflow run is FAILED."""
    from test_submit import index, job_args, submit_background, task_pids

    proc = submit_background(slurm_cluster, tmp_path, *job_args(tiny_data, tmp_path, "trainer.epochs=40",
                                                                "trainer.collective_timeout_s=30"),
                             "cluster.tasks_per_node=2", "cluster.max_failures=0")
    try:
        wait_for("training to start", lambda: logged_steps(tmp_path) >= 2, timeout=240, poll=0.2)
        (entry,) = index(tmp_path)
        pids = task_pids(entry)
        os.kill(pids[1], signal.SIGSTOP)
        stopped = time.time()
        events_path = Path(entry["job_dir"]) / "events.jsonl"

        def failed():
            return next((json.loads(x) for x in events_path.read_text().splitlines()
                         if json.loads(x)["event"] == "rank_failed"), None)

        rec = wait_for("the failure to be recorded", failed, timeout=150)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.kill(pids[1], signal.SIGKILL)
        except (ProcessLookupError, UnboundLocalError):
            pass
    assert proc.returncode == 1  # spnet submit --wait: the job failed
    took = rec["time"] - stopped
    assert took < 90, f"the job ended {took:.0f} s after the rank froze"
    assert rec["rank"] == 1 and rec["node"] == "n1" and rec["cause"] == "stopped answering", rec
    assert rec["transient"] and not rec["requeued"]
    events = [json.loads(x) for x in events_path.read_text().splitlines()]
    lost = [e for e in events if e["event"] == "rank_lost"]
    assert lost and lost[0]["reporter"] == 0 and lost[0]["lost"][0]["rank"] == 1
    assert "rank 1 (node n1" in lost[0]["message"] and "stopped answering" in lost[0]["message"]
    (run,) = mlflow_runs(tmp_path)
    assert run.info.status == "FAILED"
    status = slurm_status(slurm_cluster, tmp_path, entry["job_id"])
    assert status["state"] == "FAILED", status
    assert status["cause"] == "rank 1 on node n1 stopped answering"
    log = Path(entry["folder"], f"{entry['job_id']}_0_log.err").read_text()
    assert "rank 1 (node n1" in log and "exit 76" in log
