"""Which task of a SLURM job failed, how, and whether a requeue may help.

srun reports every task that ended badly on its own stderr (the job's ``<job>_0_log.err``)::

    srun: error: n1: task 1: Killed
    srun: error: n2: task 0: Exited with exit code 76

The surviving ranks exit with ``EXIT_RANK_LOST`` (76) after naming the rank they lost (``rank_lost`` events, from
the heartbeat); the task that caused the failure is the one that did *not* exit with 76. A task killed by a
signal, a frozen (silent) rank and a node failure are *transient*: the job is requeued from its last checkpoint,
up to ``cluster.max_failures`` times. An exit with an error (config, data, a NaN loss: exit codes 1 and 2) is
*deterministic*: a requeue would fail the same way.
"""
from __future__ import annotations

import re
import signal
from typing import Any

from ..errors import EXIT_PREEMPTED, EXIT_RANK_LOST

BATCH_MARK = "spnet-slurm: batch start restart"
_SRUN = re.compile(r"srun: error: (?P<node>\S+): tasks? (?P<tasks>[\d,\-]+): (?P<what>.+?)\s*$")
_SIGNAL_WORDS = {"Killed": "SIGKILL", "Terminated": "SIGTERM", "Segmentation fault": "SIGSEGV",
                 "Aborted": "SIGABRT", "Bus error": "SIGBUS", "Out Of Memory": "SIGKILL (out of memory)",
                 "Hangup": "SIGHUP", "Interrupt": "SIGINT", "Floating point exception": "SIGFPE"}


def _tasks(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def current_incarnation(text: str) -> str:
    """The part of a (appended) job log written by the newest incarnation of the job."""
    at = text.rfind(BATCH_MARK)
    return text[at:] if at >= 0 else text


def srun_failures(text: str) -> list[dict[str, Any]]:
    """Every task srun reported as failed, in the order reported."""
    out = []
    for line in text.splitlines():
        m = _SRUN.search(line)
        if not m:
            continue
        what = m["what"]
        code = re.search(r"[Ee]xited with exit code (\d+)", what)
        sig = None if code else next((v for k, v in _SIGNAL_WORDS.items() if what.startswith(k)), None)
        if not code and sig is None:
            num = re.search(r"signal (\d+)", what)
            sig = signal.Signals(int(num[1])).name if num else what
        for t in _tasks(m["tasks"]):
            out.append({"node": m["node"], "rank": t, "signal": sig, "exit_code": int(code[1]) if code else None})
    return out


def classify(failures: list[dict[str, Any]], lost: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The failure that ended the job: a rank the others found silent (heartbeat), else the first task srun
    reported that was not a survivor (exit 76) or a clean stop (exit 75); with ``transient`` for requeueing."""
    by_rank = {f["rank"]: f for f in failures}
    # a rank killed by a signal is also silent to the others, for the few seconds of their probe; one silent for
    # about the collective timeout froze (srun then reports the SIGKILL it sent itself)
    silent = [x for x in lost if "silent_s" in x and not x.get("what")
              and (x["silent_s"] >= 0.5 * float(x.get("stale_s", 0)) or x["rank"] not in by_rank)]
    if silent:
        x = silent[0]
        return {"rank": x["rank"], "node": x.get("node") or by_rank.get(x["rank"], {}).get("node"),
                "pid": x.get("pid"), "signal": None, "exit_code": None, "cause": "stopped answering",
                "silent_s": x.get("silent_s"), "transient": True}
    for f in failures:
        if f["exit_code"] in (EXIT_RANK_LOST, EXIT_PREEMPTED):
            continue
        cause = f"killed by {f['signal']}" if f["signal"] else f"exited with code {f['exit_code']}"
        return {**f, "cause": cause, "transient": f["signal"] is not None}
    if lost:
        x = lost[0]
        return {"rank": x.get("rank"), "node": x.get("node"), "pid": x.get("pid"), "signal": None,
                "exit_code": None, "cause": x.get("what", "rank") + " stopped answering", "transient": True}
    return None


def describe(cause: dict[str, Any]) -> str:
    where = f" on node {cause['node']}" if cause.get("node") else ""
    return f"rank {cause['rank']}{where} {cause['cause']}"
