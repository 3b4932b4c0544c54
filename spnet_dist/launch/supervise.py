"""The SLURM-side supervisor: runs in the job's batch script after srun returned (submitit's ``slurm_teardown``).

srun ends the step as soon as one task fails (``--kill-on-bad-exit``); the tasks themselves may be gone before they
can say anything (a SIGKILLed rank never can), so the decision is made here, by the batch script, which outlives
them::

    python -m spnet_dist.launch.supervise --srun-rc $? --submission-dir <dir> --max-failures N

With a non-zero srun exit and no event of this incarnation that already explains it (completed, preemption,
timeout, stopped): it names the failed task (node, rank, signal or exit code) from srun's report in the job log and
the survivors' ``rank_lost`` events (a rank that stopped answering), appends a ``rank_failed`` event to the job's
``events.jsonl``, marks the MLflow run FAILED (tag ``slurm.failures``; rank 0 may be the rank that died), and for a
transient failure requeues the job (``scontrol requeue``) while fewer than ``max_failures`` failures were requeued
before. The requeued job continues from its newest checkpoint into the same MLflow run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .failures import classify, current_incarnation, describe, srun_failures

EVENTS = "events.jsonl"
EXPLAINED = ("completed", "preemption", "timeout", "stopped", "rank_failed")


def log(msg: str) -> None:
    print(f"spnet-slurm: {msg}", file=sys.stderr, flush=True)


def job_paths(submission_dir: Path) -> tuple[Path, Path]:
    """(job_dir, the job's batch/task-0 stderr log) of this array element or job."""
    array_job, index = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = f"{array_job}_{index}" if array_job and index else os.environ.get("SLURM_JOB_ID", "0")
    return submission_dir / f"job{index or 0}", submission_dir / "submitit" / job_id / f"{job_id}_0_log.err"


def read_events(job_dir: Path) -> list[dict[str, Any]]:
    path = job_dir / EVENTS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_event(job_dir: Path, event: str, **fields: Any) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    with open(job_dir / EVENTS, "a") as f:
        f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")


def mark_run(events: list[dict[str, Any]], failure: str) -> str | None:
    """FAILED (if still RUNNING) and ``slurm.failures`` += ``failure`` on the job's MLflow run; returns its id."""
    rec = next((e for e in reversed(events) if e.get("mlflow_run_id") and e.get("tracking_uri")), None)
    if rec is None:
        return next((e["mlflow_run_id"] for e in reversed(events) if e.get("mlflow_run_id")), None)
    run_id = rec["mlflow_run_id"]
    try:
        from ..tracking.runs import client, tag_run

        c = client(rec["tracking_uri"])
        if c.get_run(run_id).info.status == "RUNNING":
            c.set_terminated(run_id, "FAILED")
        tag_run(rec["tracking_uri"], run_id, {}, append={"slurm.failures": failure})
    except Exception as err:  # noqa: BLE001 - the decision below must not depend on the tracking store
        log(f"could not mark MLflow run {run_id}: {err}")
    return run_id


def supervise(srun_rc: int, submission_dir: Path, max_failures: int) -> int:
    """Decide after srun returned; returns the batch script's exit code (srun's)."""
    if srun_rc == 0:
        return 0
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
    job_dir, log_path = job_paths(submission_dir)
    events = read_events(job_dir)
    mine = [e for e in events if e.get("restart", restart) == restart]
    if any(e["event"] in EXPLAINED for e in mine):
        return srun_rc
    text = current_incarnation(log_path.read_text(errors="replace")) if log_path.is_file() else ""
    lost = [x for e in mine if e["event"] == "rank_lost" for x in e.get("lost", [])]
    cause = classify(srun_failures(text), lost) or {
        "rank": None, "node": None, "signal": None, "exit_code": srun_rc, "cause": f"srun exited with {srun_rc}",
        "transient": False}
    requeued_before = sum(1 for e in events if e["event"] == "rank_failed" and e.get("requeued"))
    requeue = bool(cause["transient"]) and requeued_before < max_failures
    short = f"rank{cause['rank']}@{cause.get('node')}:{cause.get('signal') or cause['cause']}"
    run_id = mark_run(events, f"{short}@restart{restart}")
    message = describe(cause)
    job_id = os.environ.get("SLURM_JOB_ID", "")
    append_event(job_dir, "rank_failed", job_id=job_id, restart=restart, **{k: cause.get(k) for k in (
        "rank", "node", "pid", "signal", "exit_code", "cause", "transient")}, message=message,
        requeued=requeue, failures=requeued_before + (1 if requeue else 0), max_failures=max_failures,
        mlflow_run_id=run_id)
    if requeue:
        log(f"{message}; requeueing job {job_id} from its last checkpoint (failure {requeued_before + 1} of at "
            f"most {max_failures}, cluster.max_failures)")
        r = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            log(f"scontrol requeue {job_id} failed ({r.returncode}): {r.stderr.strip()}")
        else:
            time.sleep(30)  # SLURM ends this batch script for the requeue
    elif cause["transient"]:
        log(f"{message}; not requeued: {requeued_before} failure(s) requeued already (cluster.max_failures="
            f"{max_failures}); submit again with the same checkpoint.dir (resume=auto) to continue")
    else:
        log(f"{message}; not requeued: an error, not a transient failure (a requeue would fail the same way)")
    return srun_rc


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spnet_dist.launch.supervise")
    p.add_argument("--srun-rc", type=int, required=True)
    p.add_argument("--submission-dir", type=Path, required=True)
    p.add_argument("--max-failures", type=int, default=0)
    args = p.parse_args(argv)
    try:
        return supervise(args.srun_rc, args.submission_dir, args.max_failures)
    except Exception as err:  # noqa: BLE001 - never hide srun's exit status
        log(f"supervisor failed: {err}")
        return args.srun_rc


if __name__ == "__main__":
    sys.exit(main())
