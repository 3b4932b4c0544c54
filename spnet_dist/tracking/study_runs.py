"""The MLflow side of `spnet study`: the parent run, which runs are finished, their points, the study frontier on
relative axes (MACs ÷ static MACs, top-1 − static top-1) and the JSON summary, all read from the store."""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from .frontier import _finite, pareto_flags
from .reference import reference_points
from .runs import experiment_id
from .sqlite_init import client  # MlflowClient after the one-time creation of a fresh SQLite store

STUDY_TAG, KEY_TAG, KIND_TAG, PARENT_TAG = "spnet.study", "spnet.study.key", "spnet.kind", "mlflow.parentRunId"
TRAIN_RATE_WINDOW = 20  # train_exec_rate = mean of the last this many logged (Gumbel-sampled) training rates


def _search(c: Any, exp_id: str, flt: str) -> list[Any]:
    runs, token = [], None
    while True:
        page = c.search_runs([exp_id], filter_string=flt, max_results=1000, page_token=token,
                             order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def parent_run(uri: str, experiment: str, study: str, spec: dict[str, Any]) -> str:
    """The study's parent run (created on the first call, reused by a re-run), marked running again."""
    c = client(uri)
    exp_id = experiment_id(c, experiment)
    found = _search(c, exp_id, f"tags.`{KIND_TAG}` = 'study' and tags.`{STUDY_TAG}` = '{study}'")
    if found:
        rid = found[0].info.run_id
        c.update_run(rid, status="RUNNING")
    else:
        rid = c.create_run(exp_id, run_name=study, tags={KIND_TAG: "study", STUDY_TAG: study}).info.run_id
    c.set_tag(rid, "spnet.study.spec", json.dumps(spec, sort_keys=True)[:5000])
    return rid


def finished_runs(uri: str, experiment: str, study: str) -> dict[str, str]:
    """Run key -> MLflow run id of the study's finished runs."""
    return {k: r.info.run_id for k, r in _runs_by_key(uri, experiment, study)[1].items()}


def tag_study_run(uri: str, summary: dict[str, Any], study: str, key: str, parent: str) -> None:
    """Mark the run of a training ``summary`` as run ``key`` of ``study``, nested under the parent run."""
    rid = summary.get("mlflow_run_id")
    if not rid:
        raise ValueError(f"study run {key!r} has no MLflow run id in its summary (was tracking.enabled=false?)")
    c = client(uri)
    for k, v in {STUDY_TAG: study, KEY_TAG: key, PARENT_TAG: parent}.items():
        c.set_tag(rid, k, v)


def _point(c: Any, run: Any) -> dict[str, Any]:
    m, t = run.data.metrics, run.data.tags
    hist = c.get_metric_history(run.info.run_id, "train/exec_rate")
    last = [h.value for h in sorted(hist, key=lambda h: (h.step, h.timestamp))][-TRAIN_RATE_WINDOW:]
    target = t.get("target_rate", "")
    key = t.get(KEY_TAG, "")
    return {"key": key, "method": key.rsplit("-t", 1)[0] if key != "static" else "static",  # the preset name
            "target_rate": float(target) if target not in ("", "None") else None,
            "top1": m.get("val/top1"), "macs_per_image": m.get("val/macs_per_image"),
            "exec_rate": m.get("val/exec_rate"),
            "train_exec_rate": sum(last) / len(last) if last else None, "mlflow_run_id": run.info.run_id}


def _runs_by_key(uri: str, experiment: str, study: str) -> tuple[Any, dict[str, Any]]:
    c = client(uri)
    found = _search(c, experiment_id(c, experiment), f"tags.`{STUDY_TAG}` = '{study}' and "
                                                     f"attributes.status = 'FINISHED'")
    return c, {r.data.tags[KEY_TAG]: r for r in found
               if KEY_TAG in r.data.tags and r.data.tags.get(KIND_TAG) != "study"}


def static_point(uri: str, experiment: str, study: str) -> dict[str, Any]:
    c, runs = _runs_by_key(uri, experiment, study)
    if "static" not in runs:
        raise ValueError(f"study {study!r} has no finished static run in experiment {experiment!r} of {uri}")
    p = _point(c, runs["static"])
    return {"top1": p["top1"], "macs_per_image": p["macs_per_image"], "mlflow_run_id": p["mlflow_run_id"]}


def study_points(uri: str, experiment: str, study: str, keys: Sequence[str]) -> list[dict[str, Any]]:
    c, runs = _runs_by_key(uri, experiment, study)
    missing = [k for k in keys if k not in runs]
    if missing:
        raise ValueError(f"study {study!r}: no finished MLflow run for {missing}")
    return [_point(c, runs[k]) for k in keys]


def relative(points: list[dict[str, Any]], static: dict[str, Any]) -> list[dict[str, Any]]:
    """Add ``rel_macs`` (÷ static MACs), ``delta_top1`` (− static top-1) and the frontier flag (static included)."""
    for p in points:
        p["rel_macs"] = p["macs_per_image"] / static["macs_per_image"]
        p["delta_top1"] = p["top1"] - static["top1"]
    flags = pareto_flags([(1.0, 0.0)] + [(p["rel_macs"], p["delta_top1"]) for p in points])
    for p, f in zip(points, flags[1:]):
        p["on_frontier"] = bool(f)
    return points


def paper_points() -> list[dict[str, Any]]:
    """The SP-Net paper's ImageNet rows relative to the paper's own static ResNet of the same depth."""
    refs = reference_points()
    static = {p["backbone"]: p for p in refs if p["kind"] == "static"}
    return [{"label": p["label"], "rel_macs": p["gflops_paper"] / static[p["backbone"]]["gflops_paper"],
             "delta_top1": p["top1"] - static[p["backbone"]]["top1"]}
            for p in refs if p["kind"] != "static" and p["backbone"] in static]


def relative_figure(points: list[dict[str, Any]], title: str):
    """x: MACs ÷ static MACs, y: top-1 − static top-1 (points); the study's runs by method, the static baseline at
    (1, 0), the study's frontier as a staircase and the paper's ImageNet rows on the same relative axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    ax.axhline(0, color="#5f6368", lw=0.8)
    ax.axvline(1, color="#5f6368", lw=0.8)
    ax.scatter([1.0], [0.0], marker="*", s=120, c="#202124", label="static ResNet (this study)", zorder=5)
    colors = ["#d93025", "#1a73e8", "#188038", "#e37400", "#9334e6"]
    for i, method in enumerate(sorted({p["method"] for p in points})):
        mine = [p for p in points if p["method"] == method]
        ax.scatter([p["rel_macs"] for p in mine], [100 * p["delta_top1"] for p in mine], s=40,
                   c=colors[i % len(colors)], label=f"{method} (this study)", zorder=4)
        for p in mine:
            ax.annotate(f"t={p['target_rate']:g}", (p["rel_macs"], 100 * p["delta_top1"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 3))
    front = sorted([(1.0, 0.0)] + [(p["rel_macs"], 100 * p["delta_top1"]) for p in points if p["on_frontier"]])
    ax.step([x for x, _ in front], [y for _, y in front], where="post", color="#d93025", lw=1, alpha=0.6)
    paper = paper_points()
    ax.scatter([p["rel_macs"] for p in paper], [100 * p["delta_top1"] for p in paper], marker="D", s=18,
               c="#9aa0a6", label="ImageNet rows of the SP-Net paper, vs its static ResNet", zorder=2)
    for p in paper:
        ax.annotate(p["label"].split(" (")[0], (p["rel_macs"], 100 * p["delta_top1"]), fontsize=6,
                    color="#80868b", textcoords="offset points", xytext=(3, -8))
    ax.set_xlabel("MACs per image ÷ static MACs (routers and heads included)  -  lower is better")
    ax.set_ylabel("top-1 − static top-1 (points)  -  higher is better")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def finish(uri: str, parent: str, study: str, experiment: str, static: dict[str, Any],
           points: list[dict[str, Any]], folder: Path) -> dict[str, Any]:
    """Log the study's frontier to the parent run (``study.json``, ``frontier_relative.png``, metrics), save the
    picture in ``folder`` too, and return the JSON summary; the parent run ends FINISHED."""
    bad = [p["key"] for p in points if not (_finite(p["top1"]) and _finite(p["macs_per_image"]))]
    if bad or not (_finite(static.get("top1")) and _finite(static.get("macs_per_image"))):
        raise ValueError(f"study {study!r}: runs without val/top1 or val/macs_per_image: {bad or ['static']}")
    relative(points, static)
    front = sorted((p for p in points if p["on_frontier"]), key=lambda p: p["rel_macs"])
    summary = {"study": study, "experiment": experiment, "tracking_uri": uri, "parent_run_id": parent,
               "static": static, "runs": points,
               "frontier": [{"key": p["key"], "rel_macs": p["rel_macs"], "delta_top1": p["delta_top1"]}
                            for p in front],
               "picture": str(Path(folder) / "frontier_relative.png"),
               "picture_artifact": f"runs:/{parent}/frontier_relative.png"}
    c = client(uri)
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    metrics = [Metric("static/top1", static["top1"], ts, 0), Metric("static/macs_per_image",
                                                                    static["macs_per_image"], ts, 0)]
    for p in points:
        metrics += [Metric(f"{p['key']}/rel_macs", p["rel_macs"], ts, 0),
                    Metric(f"{p['key']}/delta_top1", p["delta_top1"], ts, 0)]
    c.log_batch(parent, metrics=metrics)
    fig = relative_figure(points, f"Study '{study}': cost-accuracy relative to its static ResNet "
                                  f"(top-1 {100 * static['top1']:.2f} %)")
    Path(folder).mkdir(parents=True, exist_ok=True)
    fig.savefig(summary["picture"])
    c.log_figure(parent, fig, "frontier_relative.png")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "study.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
        c.log_artifact(parent, str(Path(tmp) / "study.json"))
    c.set_terminated(parent, "FINISHED")
    return summary
