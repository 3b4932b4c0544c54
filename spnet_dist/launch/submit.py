"""`spnet submit`: the same `spnet train` on every rank of a SLURM job, through submitit.

Layout of one submission (``<folder>`` defaults to outputs/slurm; it must be on a filesystem the compute nodes
share)::

    <folder>/jobs.jsonl                     index of every job submitted from here (`spnet jobs`)
    <folder>/<stamp>-<uid>/submission.json  profile, sbatch parameters, overrides of every job
    <folder>/<stamp>-<uid>/submitit/<job>/  submitit: pickled task, <job>_<task>_log.out/.err, results
    <folder>/<stamp>-<uid>/job<i>/          checkpoint.dir (checkpoints/) and events.jsonl of job i of a sweep

Every submission gets a fresh folder, so a restarted cluster whose job ids begin at 1 again never meets a stale
submitit result, and a requeued job finds exactly its own checkpoints.
"""
from __future__ import annotations

import datetime as dt
import itertools
import os
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

from ..config import ConfigError, compose
from ..config.checks import check_required
from ..preflight import check_static, plan_checked, probe_writable
from . import jobs as J
from .failures import BATCH_MARK
from .profile import executor_parameters, load_profile, sbatch_parameters, split_cluster_overrides
from .task import SlurmTask

KEEP_ENV = ("SLURM_CONF",)  # where the cluster is; submitit's clean_env() would drop it with the job variables
SRUN_ARGS = ["--kill-on-bad-exit=1"]  # one failing rank ends the step instead of leaving the others in a collective


BATCH_MARK_LINE = f'echo "{BATCH_MARK} ${{SLURM_RESTART_COUNT:-0}}" >&2'  # where this incarnation's log begins


def supervisor_lines(sub_dir: Path, max_failures: int) -> list[str]:
    """The batch script's lines after srun: the supervisor names a failed task and requeues transient failures
    (``launch.supervise``); the script exits with srun's status."""
    cmd = [sys.executable, "-m", "spnet_dist.launch.supervise", "--srun-rc", "$SPNET_SRUN_RC", "--submission-dir",
           str(sub_dir), "--max-failures", str(int(max_failures))]
    return ["SPNET_SRUN_RC=$?", " ".join(a if a.startswith("$") else shlex.quote(a) for a in cmd)]


def expand_sweeps(overrides: Sequence[str]) -> list[list[str]]:
    """Hydra sweep syntax (``k=a,b``, ``k=range(1,4)``, ``k=choice(a,b)``) -> one override list per combination
    (cartesian product, in the order given). Lists (``k=[1,2]``) are values, not sweeps."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise ConfigError(" ".join(str(err).split())) from None
    axes: list[list[str]] = []
    for o in parsed:
        if o.is_sweep_override():
            key = o.get_key_element()
            axes.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            axes.append([o.input_line])
    return [list(combo) for combo in itertools.product(*axes)]


def _has(overrides: Sequence[str], key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in overrides)


def _swept_keys(overrides: Sequence[str], combos: list[list[str]]) -> list[str]:
    if len(combos) <= 1:
        return []
    return [c.split("=", 1)[0] for i, c in enumerate(combos[0]) if len({combo[i] for combo in combos}) > 1]


def plan(overrides: Sequence[str], cluster: str | None = None, folder: str | Path | None = None,
         sweep: Sequence[str] = ()) -> dict[str, Any]:
    """Validate everything (the machine-independent pre-flight: keys, values, the tracking URI's scheme, the data
    listing, a write probe of each job's checkpoint.dir) and decide folders and per-job overrides; nothing is
    left written."""
    name, items, train_overrides = split_cluster_overrides(list(overrides) + list(sweep))
    if cluster and name and cluster != name:
        raise ConfigError(f"--cluster {cluster} and cluster={name} disagree; give one")
    profile = load_profile(cluster or name, items)
    combos = expand_sweeps(train_overrides)
    folder = Path(folder or J.default_folder()).absolute()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    uid = uuid.uuid4().hex[:6]
    sub_dir = folder / f"{stamp}-{uid}"
    job_list = []
    checked: set[tuple[str, str, int, int]] = set()
    world = int(profile["nodes"]) * int(profile["tasks_per_node"])
    first_cfg = None
    for i, combo in enumerate(combos):
        job_dir = sub_dir / f"job{i}"
        extra = []
        if _has(combo, "checkpoint.dir"):  # the user's; still one folder per job of a sweep
            if len(combos) > 1:
                given = [o for o in combo if o.split("=", 1)[0].lstrip("+~") == "checkpoint.dir"][-1]
                extra.append(f"checkpoint.dir={given.split('=', 1)[1]}/job{i}")
        else:
            extra.append(f"checkpoint.dir={job_dir / 'checkpoints'}")
        if not _has(combo, "trainer.threads"):  # torch threads = the CPUs SLURM gives each rank
            extra.append(f"trainer.threads={profile['cpus_per_task']}")
        job_overrides = combo + extra
        cfg = compose(job_overrides)  # a bad key fails here, before anything is submitted
        check_static(cfg)  # bad choices and ranges too, and the scheme of tracking.uri
        check_required(cfg)
        # the shared folder the job will write its checkpoints to; made and removed again: nothing is left here
        probe_writable("checkpoint.dir", cfg.checkpoint.dir, keep=False)
        first_cfg = first_cfg or cfg
        # the data must fit this job's world size (nodes x tasks per node), checked here rather than in the job
        fit = (str(cfg.data.root), str(cfg.model.num_classes), int(cfg.trainer.batch_size), world)  # or auto
        if fit not in checked:
            plan_checked(cfg, world, scan="off")  # listing only: no file is opened on the login node
            checked.add(fit)
        job_list.append({"index": i, "overrides": job_overrides, "job_dir": str(job_dir),
                         "checkpoint_dir": str(Path(str(cfg.checkpoint.dir)).absolute()),
                         "run_name": str(cfg.name) if cfg.name else None})
    assert first_cfg is not None
    job_name = f"spnet-{first_cfg.name or first_cfg.method.name}"
    params = executor_parameters(profile, job_name)
    params["slurm_srun_args"] = SRUN_ARGS
    params["slurm_setup"] = [*params["slurm_setup"], BATCH_MARK_LINE]
    params["slurm_teardown"] = supervisor_lines(sub_dir, profile["max_failures"])
    return {"profile": profile, "folder": str(folder), "submission_dir": str(sub_dir), "submission": sub_dir.name,
            "jobs": job_list, "swept": _swept_keys(train_overrides, combos), "executor_parameters": params,
            "tracking_uri": str(first_cfg.tracking.uri), "experiment": str(first_cfg.tracking.experiment)}


def sbatch_script(p: dict[str, Any]) -> str:
    """The sbatch script submitit will write for plan ``p`` (what ``--dry-run`` prints)."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = sbatch_parameters(p["executor_parameters"])
    if len(p["jobs"]) > 1:
        params["map_count"] = len(p["jobs"])
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit",
                        shlex.quote(str(Path(p["submission_dir"]) / "submitit" / "%j"))])
    return _make_sbatch_string(command=command, folder=str(Path(p["submission_dir"]) / "submitit" / "%j"), **params)


def tracking_uri_for_display(uri: str) -> str:
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).absolute())
    return uri


def ensure_experiment(uri: str, experiment: str) -> str | None:
    """Create the experiment (and a fresh SQLite schema) once here, not concurrently in every job."""
    try:
        from ..tracking.runs import ensure_experiment as get_or_create

        return get_or_create(uri, experiment)
    except Exception as err:  # noqa: BLE001 - e.g. a tracking server reachable from compute nodes only
        print(f"spnet submit: warning: could not open MLflow experiment {experiment!r} at {uri}: {err}",
              file=sys.stderr)
        return None


def submit(overrides: Sequence[str], cluster: str | None = None, folder: str | Path | None = None,
           sweep: Sequence[str] = (), dry_run: bool = False, wait: bool = False,
           wait_timeout_s: float | None = None) -> dict[str, Any]:
    p = plan(overrides, cluster=cluster, folder=folder, sweep=sweep)
    prof = p["profile"]
    out: dict[str, Any] = {"cluster": prof["name"], "submission_dir": p["submission_dir"],
                           "tracking_uri": tracking_uri_for_display(p["tracking_uri"]),
                           "experiment": p["experiment"], "tasks_per_job": prof["nodes"] * prof["tasks_per_node"],
                           "swept": p["swept"]}
    if dry_run:
        print(sbatch_script(p))
        out.update(dry_run=True, jobs=[{"index": j["index"], "overrides": j["overrides"],
                                        "checkpoint_dir": j["checkpoint_dir"]} for j in p["jobs"]])
        return out

    import submitit
    from submitit.helpers import clean_env

    exp_id = ensure_experiment(p["tracking_uri"], p["experiment"])
    sub_dir = Path(p["submission_dir"])
    sub_dir.mkdir(parents=True, exist_ok=False)
    executor = submitit.AutoExecutor(folder=sub_dir / "submitit" / "%j", cluster="slurm",
                                     slurm_max_num_timeout=prof["max_requeues"])
    executor.update_parameters(**p["executor_parameters"])
    tasks = [SlurmTask(j["overrides"], j["job_dir"], cluster=prof["name"], submission=p["submission"],
                       max_requeues=prof["max_requeues"], timeout_min=prof["timeout_min"],
                       signal_delay_s=prof["signal_delay_s"]) for j in p["jobs"]]
    keep = {k: os.environ[k] for k in KEEP_ENV if k in os.environ}
    with clean_env():  # a submission from inside a SLURM job must not inherit that job's SLURM_*/RANK variables
        os.environ.update(keep)
        submitted = [executor.submit(tasks[0])] if len(tasks) == 1 else executor.submit_array(tasks)
    now = time.time()
    entries = []
    for j, job in zip(p["jobs"], submitted):
        entries.append({"job_id": str(job.job_id), "time": now, "submitted": dt.datetime.now().isoformat(
            timespec="seconds"), "submission": p["submission"], "submission_dir": p["submission_dir"],
            "folder": str(job.paths.folder), "job_dir": j["job_dir"], "tasks": out["tasks_per_job"],
            "cluster": prof["name"], "overrides": j["overrides"], "checkpoint_dir": j["checkpoint_dir"],
            "tracking_uri": out["tracking_uri"], "experiment": p["experiment"], "run_name": j["run_name"]})
    J.append_index(p["folder"], entries)
    (sub_dir / "submission.json").write_text(_json({**p, "job_ids": [e["job_id"] for e in entries]}))
    out.update(job_id=entries[0]["job_id"], job_ids=[e["job_id"] for e in entries], experiment_id=exp_id,
               jobs=[{"job_id": e["job_id"], "overrides": e["overrides"], "checkpoint_dir": e["checkpoint_dir"],
                      "stdout": str(J.task_paths(e)["stdout"]), "stderr": str(J.task_paths(e)["stderr"])}
                     for e in entries])
    out["stdout"], out["stderr"] = out["jobs"][0]["stdout"], out["jobs"][0]["stderr"]
    print(f"submitted {len(entries)} job(s) to cluster profile {prof['name']}: {' '.join(out['job_ids'])}; "
          f"logs: {out['stdout']} (`spnet jobs tail {out['job_id']}`); MLflow: {out['tracking_uri']} "
          f"experiment {p['experiment']!r}", file=sys.stderr, flush=True)
    if not wait:
        out["mlflow_run_ids"] = None  # known once the jobs run: `spnet jobs status <id>`
        return out
    results = J.wait(entries, timeout_s=wait_timeout_s)
    for job, o in zip(out["jobs"], results):
        res = o["result"] if isinstance(o["result"], dict) else None
        job.update(state=o["state"], ok=o["ok"], restarts=o.get("restarts"),
                   mlflow_run_id=res.get("mlflow_run_id") if res else None,
                   summary=res, error=None if o["ok"] else (o["result"] if isinstance(o["result"], str) else None))
    out["ok"] = all(o["ok"] for o in results)
    out["mlflow_run_ids"] = [j["mlflow_run_id"] for j in out["jobs"]]
    out["mlflow_run_id"] = out["mlflow_run_ids"][0]
    return out


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, indent=2, sort_keys=True, default=str)
