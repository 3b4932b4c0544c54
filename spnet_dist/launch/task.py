"""What runs in every SLURM task of a `spnet submit` job.

Each task builds the torch.distributed environment from the SLURM job, then runs the `spnet train` entry
(``train_from_overrides``) in-process with the submitted overrides. Preemption and timeouts:

* SLURM sends ``--signal=USR2@<signal_delay_s>`` before the time limit; ``scancel --signal=USR2`` (or a
  preemption with ``preempt_send_user_signal``) sends the same signal. The trainer's handler
  (``engine.preempt.install()``, installed when training starts) replaces submitit's: every rank agrees on the
  flag at the next step boundary, all ranks save one collective DeepSpeed checkpoint and ``train`` returns a
  summary with ``"preempted": true``.
* This task then decides: rank 0 classifies the stop (``timeout`` when the job's time left is within the signal
  window, else ``preemption``), and if ``SLURM_RESTART_COUNT < max_requeues`` runs ``scontrol requeue``. All ranks
  exit with ``EXIT_PREEMPTED`` (75) and write no submitit result: the job is not over. The requeued job runs the
  same pickled task; ``resume=auto`` continues from the newest complete checkpoint in the job's
  ``checkpoint.dir``, whose client state carries the MLflow run id, so it logs into the same run.
* A stop by SIGTERM alone (``scancel <id>``, node shutdown) saves a checkpoint but is not requeued.
* A USR2 that arrives before the trainer installed its handler (imports, process-group set-up) is handled by
  submitit's own handler on rank 0: it calls :meth:`SlurmTask.checkpoint` — which only returns the same task —
  and requeues. Nothing is lost: no step has been trained in that incarnation yet.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import submitit

from .. import distributed as D
from .supervise import EVENTS, append_event

TIMER_SLACK_S = 45  # SLURM checks time limits every ~30 s; plus the time to write the checkpoint


def log(msg: str) -> None:
    print(f"spnet-slurm: {msg}", file=sys.stderr, flush=True)


def _scontrol_node_addr(name: str) -> str | None:
    try:
        out = subprocess.run(["scontrol", "show", "node", name, "-o"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\bNodeAddr=(\S+)", out)
    return m.group(1) if m else None


def node_address(name: str) -> str:
    """An address for node ``name``: its SLURM NodeAddr (emulated nodes n1, n2 do not resolve in DNS), else the
    name itself if it resolves, else this host's name."""
    addr = _scontrol_node_addr(name)
    if addr:
        return addr
    try:
        socket.gethostbyname(name)
        return name
    except OSError:
        return socket.gethostname()


def master_port(job_id: str, restart: int = 0) -> int:
    """Same on every task of one job incarnation; differs between jobs (and between restarts, so a requeued
    job never meets a socket of its previous incarnation)."""
    digits = int(re.sub(r"\D", "", job_id) or 0)
    return 20000 + (digits * 131 + restart * 17) % 20000


def local_world_size(num_tasks: int, num_nodes: int) -> int:
    per_node = os.environ.get("SLURM_NTASKS_PER_NODE", "")
    return int(per_node) if per_node.isdigit() else max(1, num_tasks // max(1, num_nodes))


def distributed_env() -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT for this SLURM task.

    MASTER_ADDR is the first node of the job (where global rank 0 runs with SLURM's block distribution).
    CUDA_VISIBLE_DEVICES is left alone: DeepSpeed selects the device from LOCAL_RANK.
    """
    je = submitit.JobEnvironment()
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
    return {
        "RANK": str(je.global_rank),
        "WORLD_SIZE": str(je.num_tasks),
        "LOCAL_RANK": str(je.local_rank),
        "LOCAL_WORLD_SIZE": str(local_world_size(je.num_tasks, je.num_nodes)),
        "MASTER_ADDR": node_address(je.hostnames[0]),
        "MASTER_PORT": str(master_port(os.environ.get("SLURM_JOB_ID", je.job_id), restart)),
    }


def parse_slurm_duration(text: str) -> float | None:
    """'[D-]HH:MM:SS' / 'MM:SS' / 'SS' -> seconds; None for UNLIMITED, INVALID, NOT_SET, ..."""
    text = text.strip()
    if not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", text):
        return None
    days, _, clock = text.rpartition("-")
    total = 0
    for part, unit in zip(reversed(clock.split(":")), (1, 60, 3600)):
        total += int(part) * unit
    return float(total + int(days or 0) * 86400)


def time_left_s(job_id: str) -> float | None:
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%L"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_slurm_duration(out.splitlines()[0]) if out.strip() else None


def usr_signal() -> int:
    return int(submitit.JobEnvironment._usr_sig())


class SlurmTask(submitit.helpers.Checkpointable):
    """One `spnet train` per SLURM task; pickled once per job (array element) by `spnet submit`."""

    def __init__(self, overrides: Sequence[str], job_dir: str, *, cluster: str, submission: str,
                 max_requeues: int, timeout_min: int, signal_delay_s: int) -> None:
        self.overrides = list(overrides)
        self.job_dir = str(job_dir)
        self.cluster = cluster
        self.submission = submission
        self.max_requeues = int(max_requeues)
        self.timeout_min = int(timeout_min)
        self.signal_delay_s = int(signal_delay_s)

    # submitit calls this on rank 0 only when its own USR2 handler is still in place, i.e. before training
    # started: requeue the same task (no state to save; resume=auto picks up the newest checkpoint).
    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        log("signal before training started: submitit requeues the same task")
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def __call__(self) -> dict[str, Any]:
        t0 = time.time()
        os.environ.update(distributed_env())
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        restart = int(os.environ.get("SLURM_RESTART_COUNT", 0) or 0)
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        job_id = submitit.JobEnvironment().job_id
        log(f"job {job_id} restart {restart}: rank {rank}/{world} local {os.environ['LOCAL_RANK']}/"
            f"{os.environ['LOCAL_WORLD_SIZE']} on node {node}; master "
            f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}; pid {os.getpid()}")
        overrides = list(self.overrides)
        if restart > 0:  # a requeued job continues from its own checkpoints, whatever resume= said at first
            overrides.append("resume=auto")
        from ..engine import preempt
        from ..engine.run import train_from_overrides
        from ..engine.run_id_event import RunIdEvent

        from ..engine import heartbeat

        heartbeat.set_reporter(lambda d: self._event("rank_lost", job_id=job_id, restart=restart, reporter=rank,
                                                     node=node, lost=d["lost"], message=d["message"]))
        hooks = []
        if rank == 0:
            self._event("started", job_id=job_id, restart=restart, node=node, world_size=world)
            hooks.append(RunIdEvent(Path(self.job_dir) / EVENTS))  # the MLflow run id, as soon as it exists

        summary = train_from_overrides(overrides, hooks) or {}
        ranks = D.gather_objects({"node": node, "signal": preempt.requested_signal()})
        info = {"job_id": job_id, "restart": restart, "cluster": self.cluster, "submission": self.submission,
                "rank_nodes": [r["node"] for r in ranks]}
        if not summary.get("preempted"):
            if rank == 0:
                self._tag_run(summary, info, None)
                self._event("completed", job_id=job_id, restart=restart, step=summary.get("steps"),
                            mlflow_run_id=summary.get("mlflow_run_id"))
            log(f"rank {rank}: training finished at step {summary.get('steps')}")
            return {**summary, "slurm": info}
        return self._stopped(summary, ranks, info, rank, t0)

    def _stopped(self, summary: dict[str, Any], ranks: list[dict[str, Any]], info: dict[str, Any], rank: int,
                 t0: float) -> dict[str, Any]:
        from ..engine.preempt import EXIT_PREEMPTED

        job_id, restart = info["job_id"], info["restart"]
        raw_id = os.environ.get("SLURM_JOB_ID", job_id)
        usr = usr_signal()
        by_usr = any(r["signal"] == usr for r in ranks)
        step = summary.get("steps")
        if not by_usr:  # scancel <id>, node shutdown: not ours to requeue
            sig = next((r["signal"] for r in ranks if r["signal"]), None)
            msg = (f"stopped by {signal.Signals(sig).name if sig else 'a stop request'} at step "
                   f"{step}; checkpoint {summary.get('checkpoint')} written; not requeued (submit again with the "
                   f"same checkpoint.dir, resume=auto, to continue)")
            if rank == 0:
                self._tag_run(summary, info, f"cancelled@step{step}")
                self._event("stopped", job_id=job_id, restart=restart, step=step,
                            signal=signal.Signals(sig).name if sig else None,
                            mlflow_run_id=summary.get("mlflow_run_id"))
            log(msg)
            D.barrier()
            raise SystemExit(EXIT_PREEMPTED)
        stops = restart - self._failures()  # restarts after preemptions and timeouts, not after failures
        if rank == 0:
            reason = self._reason(raw_id, t0)
            requeue = stops < self.max_requeues
            self._tag_run(summary, info, f"{reason}@step{step}")
            self._event(reason, job_id=job_id, restart=restart, step=step, checkpoint=summary.get("checkpoint"),
                        mlflow_run_id=summary.get("mlflow_run_id"), requeued=requeue)
            if requeue:
                log(f"{reason} at step {step}: checkpoint {summary.get('checkpoint')}; requeueing job {raw_id} "
                    f"(restart {restart + 1} of at most {self.max_requeues})")
                r = subprocess.run(["scontrol", "requeue", raw_id], capture_output=True, text=True, timeout=60)
                if r.returncode != 0:  # e.g. SLURM requeues a preempted job itself (PreemptMode=REQUEUE)
                    log(f"scontrol requeue {raw_id} failed ({r.returncode}): {r.stderr.strip()}")
        else:
            requeue = stops < self.max_requeues
        D.barrier()  # the requeue is issued before any task exits (srun --kill-on-bad-exit)
        if not requeue:
            raise RuntimeError(
                f"job {job_id} stopped at step {step} after {restart} requeue(s) (max_requeues="
                f"{self.max_requeues}); checkpoint {summary.get('checkpoint')}. Continue with `spnet submit` and "
                f"the same checkpoint.dir (resume=auto), or raise cluster.max_requeues")
        raise SystemExit(EXIT_PREEMPTED)

    def _failures(self) -> int:
        """Restarts of this job that followed a failed rank (``rank_failed`` events of the supervisor)."""
        from .supervise import read_events

        return sum(1 for e in read_events(Path(self.job_dir)) if e["event"] == "rank_failed" and e.get("requeued"))

    def _reason(self, raw_id: str, t0: float) -> str:
        left = time_left_s(raw_id)
        if left is None:
            start = float(os.environ.get("SLURM_JOB_START_TIME", t0) or t0)
            left = self.timeout_min * 60 - (time.time() - start)
        return "timeout" if left <= self.signal_delay_s + TIMER_SLACK_S else "preemption"

    def _event(self, event: str, **fields: Any) -> None:
        try:
            append_event(Path(self.job_dir), event, **fields)
        except OSError as err:
            log(f"could not write {EVENTS}: {err}")

    def _tag_run(self, summary: dict[str, Any], info: dict[str, Any], interruption: str | None) -> None:
        """SLURM facts as tags of the MLflow run (rank 0; never fatal)."""
        run_id, uri = summary.get("mlflow_run_id"), summary.get("tracking_uri")
        if not run_id or not uri:
            return
        try:
            from ..tracking.runs import tag_run

            tags = {"slurm.job_id": info["job_id"], "slurm.cluster": info["cluster"],
                    "slurm.restarts": str(info["restart"]), "spnet.submission": info["submission"],
                    "slurm.rank_nodes": ",".join(info["rank_nodes"]),
                    "slurm.nodes": ",".join(sorted(set(info["rank_nodes"])))}
            tag_run(uri, run_id, tags, append={"slurm.interruptions": interruption} if interruption else None)
        except Exception as err:  # noqa: BLE001 - tags are a convenience; the job's outcome must not depend on them
            log(f"could not tag MLflow run {run_id}: {err}")
