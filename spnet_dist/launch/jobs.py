"""The index of jobs submitted from this checkout (``<folder>/jobs.jsonl``) and what SLURM and submitit say
about them. There is no ``sacct`` on the test cluster (and often none that users may query): states come from
``scontrol show job`` while slurmctld remembers the job (``MinJobAge``), then from submitit's result files.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

INDEX = "jobs.jsonl"
DEFAULT_FOLDER_ENV = "SPNET_SUBMIT_DIR"
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD",
          "RESIZING", "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "POWER_UP_NODE"}


def default_folder() -> Path:
    return Path(os.environ.get(DEFAULT_FOLDER_ENV) or "outputs/slurm")


def index_path(folder: str | Path) -> Path:
    return Path(folder) / INDEX


def append_index(folder: str | Path, entries: Iterable[dict[str, Any]]) -> None:
    path = index_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for e in entries:
            f.write(json.dumps(e, sort_keys=True) + "\n")


def read_index(folder: str | Path) -> list[dict[str, Any]]:
    path = index_path(folder)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a concurrent writer: skip it
    return out


def find(folder: str | Path, job_id: str | None) -> dict[str, Any]:
    """The index entry for ``job_id`` (``12``, ``12_0``; ``last`` or None: the newest)."""
    entries = read_index(folder)
    if not entries:
        raise FileNotFoundError(f"no jobs in {index_path(folder)}; submit one with `spnet submit`, or pass "
                                f"--folder <the folder given to spnet submit>")
    if job_id in (None, "", "last"):
        return entries[-1]
    exact = [e for e in entries if e["job_id"] == job_id]
    if exact:
        return exact[-1]  # job ids restart at 1 on a fresh cluster: the newest wins
    array = [e for e in entries if e["job_id"].split("_")[0] == job_id]
    if len(array) == 1:
        return array[0]
    if array:
        raise KeyError(f"job {job_id} is an array of {len(array)} jobs: use one of "
                       f"{[e['job_id'] for e in array]}")
    known = [e["job_id"] for e in entries[-10:]]
    raise KeyError(f"job {job_id!r} is not in {index_path(folder)}; recent jobs: {known}")


def scontrol_job(job_id: str) -> dict[str, str] | None:
    """``scontrol show job <id> -o`` as a dict; None when slurmctld does not know the job (any more);
    ``{"JobState": "UNKNOWN", "Error": ...}`` when scontrol itself failed (slurmctld busy or down)."""
    try:
        r = subprocess.run(["scontrol", "show", "job", job_id, "-o"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as err:
        return {"JobState": "UNKNOWN", "Error": str(err)}
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    if r.returncode != 0 or not lines:
        if "invalid job id" in r.stderr.lower() or r.returncode == 0:
            return None
        return {"JobState": "UNKNOWN", "Error": r.stderr.strip()}
    if "_" in job_id:  # pick the array element's record
        main, idx = job_id.split("_", 1)
        lines = [ln for ln in lines if f"ArrayTaskId={idx} " in ln + " "] or lines
    return dict(re.findall(r"(\w+)=(\S*)", lines[0]))


def task_paths(entry: dict[str, Any], task: int = 0) -> dict[str, Path]:
    from submitit.core.utils import JobPaths

    p = JobPaths(entry["folder"], job_id=entry["job_id"], task_id=task)
    return {"stdout": p.stdout, "stderr": p.stderr, "result": p.result_pickle}


def read_result(entry: dict[str, Any], task: int = 0) -> tuple[str, Any] | None:
    """submitit's result file of ``task``: ("success", value) or ("error", traceback), or None."""
    path = task_paths(entry, task)["result"]
    if not path.is_file():
        return None
    from submitit.core.utils import pickle_load

    try:
        return pickle_load(path)
    except Exception:  # noqa: BLE001 - being written right now
        return None


def events(entry: dict[str, Any]) -> list[dict[str, Any]]:
    from .supervise import read_events

    return read_events(Path(entry["job_dir"]))


def state(entry: dict[str, Any]) -> dict[str, Any]:
    """State, restarts and timing of one job from scontrol, else from submitit's result file."""
    info = scontrol_job(entry["job_id"])
    if info and "Error" in info:
        return {"state": "UNKNOWN", "restarts": None, "source": f"scontrol failed: {info['Error']}"}
    if info:
        return {"state": info.get("JobState", "UNKNOWN"), "restarts": int(info.get("Restarts", 0) or 0),
                "run_time": info.get("RunTime"), "time_limit": info.get("TimeLimit"),
                "nodes": info.get("NodeList"), "reason": info.get("Reason"), "exit_code": info.get("ExitCode"),
                "source": "scontrol"}
    res = read_result(entry)
    s = "UNKNOWN" if res is None else ("COMPLETED" if res[0] == "success" else "FAILED")
    return {"state": s, "restarts": None, "source": "submitit result" if res else "none"}


def is_active(s: str) -> bool:
    return s.split()[0].rstrip("+") in ACTIVE


def outcome(entry: dict[str, Any]) -> dict[str, Any] | None:
    """None while the job may still run; else state + rank 0's result (summary or error text)."""
    results = [read_result(entry, t) for t in range(int(entry["tasks"]))]
    st = state(entry)
    if all(r is not None for r in results) or (results[0] is not None and not is_active(st["state"])):
        ok = all(r is not None and r[0] == "success" for r in results)
        return {**st, "ok": ok, "result": results[0][1] if results[0] else None}
    if not is_active(st["state"]) and st["state"] != "UNKNOWN":
        return {**st, "ok": False, "result": None}
    if st["state"] == "UNKNOWN" and st["source"] == "none" and (time.time() - entry.get("time", 0)) > 900:
        return {**st, "ok": False, "result": None}  # forgotten by slurmctld, no result: gone
    return None


def wait(entries: list[dict[str, Any]], poll_s: float = 2.0, timeout_s: float | None = None) -> list[dict]:
    """Block until every job has finished (requeues included); returns ``outcome`` per job.

    A job that ended without a submitit result must stay ended for a grace period (a requeue, ours or SLURM's
    after a preemption, briefly shows such states) before it counts as failed."""
    done: dict[str, dict[str, Any]] = {}
    ended_at: dict[str, float] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while len(done) < len(entries):
        for e in entries:
            if e["job_id"] not in done:
                o = outcome(e)
                if o is None or o["result"] is not None:
                    ended_at.pop(e["job_id"], None)
                    if o is not None:
                        done[e["job_id"]] = o
                    continue
                grace = 120 if o["state"].startswith(("PREEMPTED", "NODE_FAIL")) else 15
                first = ended_at.setdefault(e["job_id"], time.monotonic())
                if time.monotonic() - first >= grace:
                    done[e["job_id"]] = o
        if len(done) < len(entries):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"jobs still running after {timeout_s} s: "
                                   f"{[e['job_id'] for e in entries if e['job_id'] not in done]}")
            time.sleep(poll_s)
    settle = time.monotonic() + 15  # results are written just before the job ends: report the final state
    for e in entries:
        while is_active(done[e["job_id"]]["state"]) and time.monotonic() < settle:
            time.sleep(0.5)
            done[e["job_id"]].update(state(e))
    return [done[e["job_id"]] for e in entries]


def tail_lines(path: Path, n: int) -> list[str]:
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size, block, data = f.tell(), 8192, b""
        while size > 0 and data.count(b"\n") <= n:
            step = min(block, size)
            size -= step
            f.seek(size)
            data = f.read(step) + data
    return data.decode(errors="replace").splitlines()[-n:]


def cancel(job_id: str) -> subprocess.CompletedProcess:
    return subprocess.run(["scancel", job_id], capture_output=True, text=True, timeout=60)
