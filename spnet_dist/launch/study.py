"""`spnet study`: a cost–accuracy study as the papers run one — a static ResNet trained first, then every method ×
target rate fine-tuned from its weights (``model.pretrained``), each an MLflow run of one experiment, tagged with
the study and nested under a parent run that holds the frontier on relative axes.

Runs execute one after another as ``spnet train`` subprocesses (``--cluster P``: as ``spnet submit`` jobs, the
fine-tunes all at once once the static job is done). A re-run of the same study (same ``--name``, experiment and
tracking store) skips every run MLflow lists as finished and resumes an interrupted one from its checkpoint
(``resume=auto`` in its own checkpoint folder, ``<checkpoint.dir>/<study>/<run key>``).
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Collection, Mapping, Sequence

from ..errors import ConfigError, SpnetError

log = logging.getLogger("spnet.study")


class StudyError(SpnetError):
    """A study run failed or its results are missing; the message names the run and how to continue."""


@dataclass
class StudyRun:
    key: str                      # "static" or "<method>-t<target>"
    method: str
    target_rate: float | None
    overrides: list[str]
    checkpoint_dir: str
    result: dict[str, Any] = field(default_factory=dict)


@dataclass
class StudySpec:
    name: str
    methods: list[str]
    targets: list[float]
    overrides: list[str]
    static_epochs: int | None = None
    epochs: int | None = None
    static_checkpoint: str | None = None
    finetune_lr: float | None = None
    finetune_milestones: list[int] | None = None  # the fine-tunes' optim.milestones (None: as the static run's)
    calibration_batches: int = 16
    router_lr_mult: float = 10.0
    # method.rate_weight of the fine-tunes whose method has one: a number, "per-block" (PER_BLOCK_WEIGHT x the
    # model's blocks) or None (each preset's own)
    rate_weight: float | str | None = "per-block"
    cluster: str | None = None


def run_key(method: str, target: float | None) -> str:
    return "static" if target is None else f"{method}-t{target:g}"


PER_BLOCK_WEIGHT = 2.0  # the CIFAR scripts' λ, given to every block: the rate loss averages over the L blocks


def study_rate_weight(spec_weight: float | str | None, model_cfg: Any) -> float | None:
    """The ``method.rate_weight`` of the study's gated fine-tunes (None: keep each method's preset)."""
    from ..methods.base import num_blocks_of

    if spec_weight == "per-block":
        return PER_BLOCK_WEIGHT * num_blocks_of(model_cfg)
    return None if spec_weight is None else float(spec_weight)


def is_method_key(override: str) -> bool:
    """``method.*`` overrides are the fine-tunes' only: the static method has none of their keys."""
    return override.split("=", 1)[0].lstrip("+~").startswith("method.")


def applies_to(override: str, keys: Collection[str]) -> bool:
    """Whether ``override`` goes to a method with these ``method.*`` keys (every non-method override does)."""
    key = override.split("=", 1)[0]
    if not is_method_key(override) or key.startswith("+"):
        return True
    return key.lstrip("~").split(".")[1] in keys


def plan_runs(spec: StudySpec, cfg: Any, method_keys: Mapping[str, Collection[str]] | None = None) -> list[StudyRun]:
    """The static run (unless ``--static`` names a checkpoint) and every method × target, with their overrides.
    ``method_keys``: each method's ``method.*`` keys (None: take every override as it is). A ``method.*`` override
    goes to the methods that have its key, ``spec.rate_weight`` to those with ``rate_weight`` unless an override
    sets it."""
    base = Path(str(cfg.checkpoint.dir)) / spec.name
    if spec.cluster:  # the jobs' working directory need not be ours
        base = base.absolute()
    user = [o for o in spec.overrides if o.split("=", 1)[0].lstrip("+~") not in ("checkpoint.dir", "name", "resume")]
    static_dir = spec.static_checkpoint or str(base / "static")
    runs = []
    if spec.static_checkpoint is None:
        static_user = [o for o in user if not is_method_key(o)]
        runs.append(StudyRun("static", "static", None, [
            *static_user, "method=static", f"checkpoint.dir={static_dir}", f"name={spec.name}/static", "resume=auto",
            *([f"trainer.epochs={spec.static_epochs}"] if spec.static_epochs else [])], static_dir))
    lr = spec.finetune_lr if spec.finetune_lr is not None else 0.1 * float(cfg.optim.lr)
    user_weight = any(o.split("=", 1)[0].lstrip("+~") == "method.rate_weight" for o in user)
    rate_weight = study_rate_weight(spec.rate_weight, cfg.model)
    milestones = ([f"optim.milestones=[{','.join(str(int(e)) for e in spec.finetune_milestones)}]"]
                  if spec.finetune_milestones is not None else [])
    for m in spec.methods:
        keys = None if method_keys is None else method_keys[m]
        own = [o for o in user if keys is None or applies_to(o, keys)]
        weight = ([f"method.rate_weight={rate_weight:g}"]
                  if (keys is None or "rate_weight" in keys) and rate_weight is not None and not user_weight
                  else [])
        for t in spec.targets:
            key = run_key(m, t)
            ckpt = str(base / key)
            runs.append(StudyRun(key, m, t, [
                *own, f"method={m}", f"method.target_rate={t}", f"model.pretrained={static_dir}",
                f"optim.lr={lr:g}", f"optim.router_lr_mult={spec.router_lr_mult:g}",
                f"eval.gate_calibration_batches={spec.calibration_batches}", *weight, *milestones,
                f"checkpoint.dir={ckpt}", f"name={spec.name}/{key}", "resume=auto",
                *([f"trainer.epochs={spec.epochs}"] if spec.epochs else [])], ckpt))
    return runs


def _train_local(run: StudyRun) -> dict[str, Any]:
    """``spnet train`` in a subprocess (a fresh process per run: no state shared between runs); its stderr
    streams through, its last stdout line is the run's JSON summary."""
    cmd = [sys.executable, "-m", "spnet_dist.cli", "train", *run.overrides]
    log.info("study run %s: spnet train %s", run.key, " ".join(run.overrides))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        raise StudyError(f"study run {run.key!r} failed (exit {proc.returncode}); its output is above. Fix the "
                         f"cause and run the same `spnet study` command again: finished runs are skipped and this "
                         f"one resumes from its checkpoint in {run.checkpoint_dir}")
    return json.loads(lines[-1])


def _train_cluster(runs: list[StudyRun], cluster: str) -> list[dict[str, Any]]:
    """Submit every run as a `spnet submit` job, then wait for all of them (through requeues)."""
    from . import jobs as J
    from .submit import submit

    entries = []
    for run in runs:
        out = submit(run.overrides, cluster=cluster)
        entries.append(J.find(J.default_folder(), out["job_id"]))
    results = []
    for run, o in zip(runs, J.wait(entries)):
        if not o["ok"] or not isinstance(o["result"], dict):
            raise StudyError(f"study run {run.key!r} (SLURM job {o.get('job_id', '?')}) ended {o['state']}: "
                             f"{o['result'] if isinstance(o['result'], str) else 'no summary'}; "
                             f"`spnet jobs tail` shows its log; run the same `spnet study` command to continue")
        results.append(o["result"])
    return results


def study(spec: StudySpec) -> dict[str, Any]:
    """Run (or continue) the study; returns the JSON summary that `spnet study` prints last."""
    from ..config import compose
    from ..preflight import preflight
    from ..tracking import study_runs as S

    from .profile import split_cluster_overrides

    profile, cluster_items, train_overrides = split_cluster_overrides(spec.overrides)
    if (profile or cluster_items) and not spec.cluster:
        raise ConfigError(f"{[*([f'cluster={profile}'] if profile else []), *cluster_items]} configure SLURM jobs: "
                          f"add --cluster <profile> to run the study as jobs, or drop them to run it here")
    common = [o for o in train_overrides if not is_method_key(o)]
    cfg = compose(common)
    method_keys = {m: set(compose([*common, f"method={m}"]).method) for m in spec.methods}
    for o in (o for o in train_overrides if is_method_key(o)):
        missing = [m for m in spec.methods if not applies_to(o, method_keys[m])]
        if len(missing) == len(spec.methods):
            raise ConfigError(f"{o!r}: no method of this study ({', '.join(spec.methods)}) has that key")
        if missing:
            log.info("study: %s goes to the %s runs only (%s has no such key)",
                     o, ", ".join(m for m in spec.methods if m not in missing), ", ".join(missing))
    for m in spec.methods:  # every run's config and the data, checked before the first run starts
        own = [o for o in train_overrides if applies_to(o, method_keys[m])]
        preflight(compose([*own, f"method={m}", "method.target_rate=0.5"]))
    uri, experiment = str(cfg.tracking.uri), str(cfg.tracking.experiment)
    runs = plan_runs(spec, cfg, method_keys)
    parent = S.parent_run(uri, experiment, spec.name, spec_dict(spec))
    finished = S.finished_runs(uri, experiment, spec.name)
    todo = [r for r in runs if r.key not in finished]
    for r in runs:
        if r.key in finished:
            log.info("study run %s: finished in MLflow run %s, skipped", r.key, finished[r.key])
    static_first = [r for r in todo if r.key == "static"]
    for batch in (static_first, [r for r in todo if r.key != "static"]):
        if not batch:
            continue
        if spec.cluster:
            for r, s in zip(batch, _train_cluster(batch, spec.cluster)):
                S.tag_study_run(uri, s, spec.name, r.key, parent)
        else:
            for r in batch:  # tagged as each one finishes: a later failure leaves it skippable
                S.tag_study_run(uri, _train_local(r), spec.name, r.key, parent)
    static = (S.static_point(uri, experiment, spec.name) if spec.static_checkpoint is None
              else static_from_checkpoint(spec.static_checkpoint, spec.overrides))
    points = S.study_points(uri, experiment, spec.name, [r.key for r in runs if r.key != "static"])
    return S.finish(uri, parent, spec.name, experiment, static, points, Path(str(cfg.checkpoint.dir)) / spec.name)


def static_from_checkpoint(checkpoint: str, overrides: Sequence[str]) -> dict[str, Any]:
    """The baseline point of ``--static <checkpoint>``: that checkpoint evaluated on this study's data."""
    from ..engine.eval_checkpoint import eval_checkpoint

    # the checkpoint's own config decides the model; the study's data and evaluation keys apply
    data = [o for o in overrides if o.split("=", 1)[0].lstrip("+~").startswith(("data.", "eval."))]
    res = eval_checkpoint([*data, f"checkpoint={checkpoint}"])
    return {"top1": float(res["top1"]), "macs_per_image": float(res["macs_per_image"]),
            "mlflow_run_id": res.get("mlflow_run_id")}


def spec_dict(spec: StudySpec) -> dict[str, Any]:
    return {"name": spec.name, "methods": spec.methods, "targets": spec.targets, "overrides": spec.overrides,
            "static_epochs": spec.static_epochs, "epochs": spec.epochs, "static": spec.static_checkpoint,
            "finetune_lr": spec.finetune_lr, "finetune_milestones": spec.finetune_milestones,
            "calibration_batches": spec.calibration_batches,
            "router_lr_mult": spec.router_lr_mult, "rate_weight": spec.rate_weight,
            "cluster": spec.cluster}


def print_table(summary: dict[str, Any], out: Any = sys.stderr) -> None:
    st = summary["static"]
    print(f"study {summary['study']!r} (experiment {summary['experiment']!r}): static top-1 {st['top1']:.4f}, "
          f"{st['macs_per_image'] / 1e6:.2f} MMACs/image", file=out)
    print(f"{'run':<18}{'top-1':>8}{'Δ top-1':>9}{'MACs ÷ static':>15}{'eval rate':>11}{'train rate':>12}"
          f"{'target':>8}  frontier", file=out)
    for p in summary["runs"]:
        print(f"{p['key']:<18}{p['top1']:>8.4f}{100 * p['delta_top1']:>+9.2f}{p['rel_macs']:>15.3f}"
              f"{p['exec_rate']:>11.3f}{p['train_exec_rate']:>12.3f}{p['target_rate']:>8.2f}  "
              f"{'*' if p['on_frontier'] else ''}", file=out)
    print(f"frontier picture: {summary['picture']} (MLflow: {summary['picture_artifact']})", file=out)


def parse_targets(values: Sequence[str]) -> list[float]:
    out = []
    for v in values:
        try:
            t = float(v)
        except ValueError:
            t = -1.0
        if not 0.0 < t <= 1.0:
            raise ValueError(f"--targets takes execution rates in (0, 1], got {v!r} (e.g. --targets 0.3 0.5 0.7)")
        out.append(t)
    return out
