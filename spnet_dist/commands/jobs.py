"""spnet jobs [list|status ID|cancel ID|tail ID]: the SLURM jobs submitted from this checkout."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--folder", help="the folder given to spnet submit (default: $SPNET_SUBMIT_DIR, else "
                                    "outputs/slurm)")
    sub = p.add_subparsers(dest="action")
    folder = argparse.ArgumentParser(add_help=False)  # --folder also after the action: `spnet jobs tail --folder X`
    folder.add_argument("--folder", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    ls = sub.add_parser("list", help="jobs with their SLURM state (newest last)", parents=[folder])
    ls.add_argument("-n", type=int, default=20, help="show the newest N jobs (0: all)")
    ls.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    st = sub.add_parser("status", help="state, restarts, requeue history, checkpoints, MLflow run, result",
                        parents=[folder])
    st.add_argument("job_id", nargs="?")
    cc = sub.add_parser("cancel", help="scancel the job (no requeue; its checkpoints stay)", parents=[folder])
    cc.add_argument("job_id", nargs="?")
    tl = sub.add_parser("tail", help="the end of a task's submitit stdout/stderr logs", parents=[folder])
    tl.add_argument("job_id", nargs="?")
    tl.add_argument("-n", type=int, default=40, help="lines per file")
    tl.add_argument("--task", type=int, default=0, help="task (global rank); default 0")
    tl.add_argument("--stream", choices=["out", "err", "both"], default="both")
    tl.add_argument("-f", "--follow", action="store_true", help="keep printing (tail -F)")


def run(args: argparse.Namespace) -> dict[str, Any] | int | None:
    from ..launch import jobs as J

    folder = args.folder or J.default_folder()
    action = args.action or "list"
    if action == "list":
        return _list(J, folder, getattr(args, "n", 20), getattr(args, "json", False))
    entry = J.find(folder, args.job_id)
    if action == "status":
        return _status(J, entry)
    if action == "cancel":
        r = J.cancel(entry["job_id"])
        if r.returncode != 0:
            print(f"spnet jobs: scancel {entry['job_id']} failed: {r.stderr.strip()}", file=sys.stderr)
            return 1
        return {"job_id": entry["job_id"], "cancelled": True, "checkpoint_dir": entry["checkpoint_dir"]}
    return _tail(J, entry, args)


def _list(J: Any, folder: Any, n: int, as_json: bool) -> dict[str, Any] | None:
    entries = J.read_index(folder)
    entries = entries[-n:] if n > 0 else entries
    rows = []
    for e in entries:
        st = J.state(e)
        rows.append({"job_id": e["job_id"], "state": st["state"], "restarts": st.get("restarts"),
                     "run_time": st.get("run_time"), "nodes": st.get("nodes"), "submitted": e["submitted"],
                     "cluster": e["cluster"], "overrides": " ".join(_user_overrides(e))})
    if as_json:
        return {"folder": str(folder), "jobs": rows}
    if not rows:
        print(f"no jobs in {J.index_path(folder)}")
        return None
    cols = ["job_id", "state", "restarts", "run_time", "nodes", "submitted", "cluster", "overrides"]
    table = [[str(r[c]) if r[c] is not None else "-" for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols[:-1])]
    print("  ".join(c.upper().ljust(w) for c, w in zip(cols[:-1], widths)) + "  OVERRIDES")
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t[:-1], widths)) + "  " + t[-1])
    return None


def _user_overrides(e: dict[str, Any]) -> list[str]:
    """The overrides as the user gave them (without the checkpoint.dir/trainer.threads submit added)."""
    auto = (f"checkpoint.dir={e['job_dir']}/checkpoints", "trainer.threads=")
    return [o for o in e["overrides"] if not o.startswith(auto)]


def _status(J: Any, e: dict[str, Any]) -> dict[str, Any]:
    from ..engine.checkpoint import complete_tags

    st = J.state(e)
    evts = J.events(e)
    res = J.read_result(e)
    summary = res[1] if res and res[0] == "success" and isinstance(res[1], dict) else None
    run_ids = [ev.get("mlflow_run_id") for ev in evts if ev.get("mlflow_run_id")]
    paths = J.task_paths(e)
    tags = complete_tags(e["checkpoint_dir"])
    failures = _failures(J, e, evts, st)
    return {"job_id": e["job_id"], **st, "submitted": e["submitted"], "cluster": e["cluster"],
            "overrides": e["overrides"], "stdout": str(paths["stdout"]), "stderr": str(paths["stderr"]),
            "checkpoint_dir": e["checkpoint_dir"], "latest_checkpoint": tags[-1] if tags else None,
            "interruptions": [{k: ev.get(k) for k in ("event", "restart", "step", "requeued")}
                              for ev in evts if ev["event"] in ("timeout", "preemption", "stopped")],
            "failures": failures, "cause": failures[-1]["message"] if failures and not summary else None,
            "tracking_uri": e["tracking_uri"], "experiment": e["experiment"],
            "mlflow_run_id": (summary or {}).get("mlflow_run_id") or (run_ids[-1] if run_ids else None),
            "summary": summary, "error": res[1] if res and res[0] == "error" else None}


def _failures(J: Any, e: dict[str, Any], evts: list[dict[str, Any]], st: dict[str, Any]) -> list[dict[str, Any]]:
    """The failed ranks the job's supervisor recorded (``rank_failed`` events); for a job that ended without one
    (its batch script could not run the supervisor), the failed task srun reported in the job's log."""
    keys = ("restart", "rank", "node", "pid", "signal", "exit_code", "cause", "transient", "requeued", "message")
    out = [{k: ev.get(k) for k in keys} for ev in evts if ev["event"] == "rank_failed"]
    if out or J.is_active(st["state"]) or st["state"] in ("COMPLETED", "UNKNOWN"):
        return out
    from ..launch.failures import classify, current_incarnation, describe, srun_failures

    path = J.task_paths(e)["stderr"]
    text = current_incarnation(path.read_text(errors="replace")) if path.is_file() else ""
    lost = [x for ev in evts if ev["event"] == "rank_lost" for x in ev.get("lost", [])]
    cause = classify(srun_failures(text), lost)
    return [{**{k: cause.get(k) for k in keys}, "message": describe(cause)}] if cause else []


def _tail(J: Any, e: dict[str, Any], args: argparse.Namespace) -> int:
    if args.task >= int(e["tasks"]):
        raise ValueError(f"--task {args.task}: job {e['job_id']} has tasks 0..{int(e['tasks']) - 1}")
    paths = J.task_paths(e, args.task)
    files = [paths[s] for s in (("stdout", "stderr") if args.stream == "both" else
                                ("stdout" if args.stream == "out" else "stderr",))]
    if args.follow:
        os.execvp("tail", ["tail", "-n", str(args.n), "-F", *map(str, files)])
    for path in files:
        print(f"==> {path} <==")
        if not path.is_file():
            print("(not written yet: the job may be pending; `spnet jobs status`)")
        for line in J.tail_lines(path, args.n):
            print(line)
    sys.stdout.flush()
    return 0

