"""Cost–accuracy frontier of an experiment's finished runs, logged to MLflow as a run of its own.

A run contributes one point: cost c = ``gflops_paper`` = 2 x ``val/macs_paper`` / 1e9 (multiply-adds per image from
hard gate decisions, counted in the papers' ResNet v1 layout: ``models.cost``, spec §1.3 — the convention of the
``--reference`` rows) and accuracy a = ``val/top1``, each the run's latest value (MLflow's "latest": highest step).
A run logged before the v1 count existed (no ``val/macs_paper``) is placed at 2 x ``val/macs_per_image`` / 1e9 (its
trained layout; else its ``val/gflops_paper``) and marked ``cost_convention: trained layout (legacy run)``.
Only runs with status FINISHED and both values finite count; frontier runs themselves (tag
``spnet.kind=frontier``) are never points.

Dominance: p dominates q  iff  c_p <= c_q and a_p >= a_q and (c_p < c_q or a_p > a_q)  (values compared exactly as
stored, no tolerance). The frontier is the set of points no other point dominates. Hence ties: points with equal
cost and equal accuracy do not dominate each other and are all on the frontier (reported with ``tied_with``); a
point with equal cost but lower accuracy, or equal accuracy but higher cost, is dominated.
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

KIND_TAG = "spnet.kind"
CONVENTION = ("gflops_paper = 2 x macs_paper / 1e9: multiply-adds in the papers' ResNet v1 layout (their GMACCs; "
              "ResNet-50 7.72), as the reference rows; top1 as a fraction")
PAPER, LEGACY = "papers' v1 layout", "trained layout (legacy run)"


def pareto_flags(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (cost, accuracy) pairs: True where no other pair dominates (see module doc). O(n log n)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    flags = [False] * len(points)
    best = -math.inf  # best accuracy among strictly cheaper points
    i = 0
    while i < len(order):
        j = i
        cost = points[order[i]][0]
        while j < len(order) and points[order[j]][0] == cost:
            j += 1
        group = order[i:j]  # equal cost, accuracy descending
        top = points[group[0]][1]
        if top > best:
            for k in group:
                if points[k][1] == top:
                    flags[k] = True
        best = max(best, top)
        i = j
    return flags


def dominated_by(points: Sequence[tuple[float, float]], i: int) -> int | None:
    """Index of one point that dominates point ``i`` (the cheapest, then most accurate), or None."""
    c, a = points[i]
    cands = [k for k, (ck, ak) in enumerate(points) if ck <= c and ak >= a and (ck < c or ak > a)]
    return min(cands, key=lambda k: (points[k][0], -points[k][1])) if cands else None


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def collect_points(client: Any, experiment_id: str) -> tuple[list[dict[str, Any]], int]:
    """Points of the experiment's finished runs; returns (points, runs skipped for missing metrics)."""
    points, skipped = [], 0
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=1000, order_by=["attributes.start_time ASC"], page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    for r in runs:
        if r.data.tags.get(KIND_TAG) == "frontier":
            continue
        m = r.data.metrics
        top1 = m.get("val/top1")
        macs = m.get("val/macs_per_image")
        if not _finite(macs) and _finite(m.get("val/gflops_paper")):
            macs = m["val/gflops_paper"] / 2 * 1e9
        if not (_finite(top1) and _finite(macs)):
            skipped += 1
            continue
        v1 = m.get("val/macs_paper")
        gflops, convention = (2 * float(v1) / 1e9, PAPER) if _finite(v1) else (2 * float(macs) / 1e9, LEGACY)
        t = r.data.tags
        points.append({"run_id": r.info.run_id, "run_name": r.info.run_name or r.info.run_id[:8],
                       "method": t.get("method", ""), "backbone": t.get("backbone", ""),
                       "target_rate": t.get("target_rate", ""), "macs_per_image": float(macs),
                       "gflops_paper": gflops, "cost_convention": convention, "top1": float(top1),
                       "top5": m.get("val/top5"), "exec_rate": m.get("val/exec_rate"), "source": "run"})
    return points, skipped


def mark_frontier(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``on_frontier``, ``dominated_by`` (run id / label) and ``tied_with`` to each point (cost: gflops_paper)."""
    xy = [(p["gflops_paper"], p["top1"]) for p in points]
    flags = pareto_flags(xy)
    name = (lambda p: p.get("run_id") or p.get("label"))
    for i, p in enumerate(points):
        p["on_frontier"] = flags[i]
        d = None if flags[i] else dominated_by(xy, i)
        p["dominated_by"] = name(points[d]) if d is not None else ""
        ties = [name(points[k]) for k in range(len(points)) if k != i and xy[k] == xy[i]]
        p["tied_with"] = ",".join(ties)
    return points


def frontier_figure(runs: list[dict[str, Any]], reference: list[dict[str, Any]] | None, title: str):
    """x: GFLOPs in the papers' convention (2 x MACs), y: top-1 %; the frontier as a staircase."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12 if reference else 9, 6), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    dom = [p for p in runs if not p["on_frontier"]]
    front = sorted((p for p in runs if p["on_frontier"]), key=lambda p: (p["gflops_paper"], -p["top1"]))
    if dom:
        ax.scatter([p["gflops_paper"] for p in dom], [100 * p["top1"] for p in dom], s=28, c="#9aa0a6",
                   label=f"runs, dominated ({len(dom)})", zorder=2)
    if front:
        xs, ys = [p["gflops_paper"] for p in front], [100 * p["top1"] for p in front]
        ax.step(xs, ys, where="post", color="#d93025", lw=1.5, zorder=3)
        ax.scatter(xs, ys, s=44, c="#d93025", label=f"runs, Pareto frontier ({len(front)})", zorder=4)
        for p in front:
            ax.annotate(p["run_name"], (p["gflops_paper"], 100 * p["top1"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color="#a50e0e")
    if reference:
        ref_front = sorted((p for p in reference if p["on_frontier"]), key=lambda p: p["gflops_paper"])
        ax.step([p["gflops_paper"] for p in ref_front], [100 * p["top1"] for p in ref_front], where="post",
                color="#1a73e8", lw=1, ls="--", zorder=1)
        lines = []
        for i, p in enumerate(reference, 1):  # numbered markers + a key beside the axes: the cluster is dense
            static = p["kind"] == "static"
            ax.scatter([p["gflops_paper"]], [100 * p["top1"]], marker="*" if static else "D", s=70 if static else 26,
                       c="#202124" if static else "#1a73e8", zorder=3)
            ax.annotate(str(i), (p["gflops_paper"], 100 * p["top1"]), textcoords="offset points",
                        xytext=(3, 3 if i % 2 else -9), fontsize=6.5, color="#174ea6")
            lines.append(f"{i:>2} {p['label']}: {p['gflops_paper']:.2f}, {100 * p['top1']:.2f}"
                         + (" *" if p["on_frontier"] else ""))
        ax.scatter([], [], marker="D", s=26, c="#1a73e8", label="ImageNet, published (SP-Net paper table)")
        ax.scatter([], [], marker="*", s=70, c="#202124", label="ImageNet, static ResNets (same table)")
        fig.text(0.74, 0.92, "published ImageNet rows\n(GFLOPs, top-1 %; * = frontier)\n\n" + "\n".join(lines),
                 fontsize=6.5, va="top", family="monospace")
        fig.subplots_adjust(right=0.72)
    xs_all = [p["gflops_paper"] for p in runs + (reference or [])]
    if xs_all and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 20:
        ax.set_xscale("log")
    ax.set_xlabel("GFLOPs per image, papers' convention (2 x MACs)  -  lower is better")
    ax.set_ylabel("top-1 accuracy (%)  -  higher is better")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    if not reference:
        fig.tight_layout()
    return fig


def frontier(uri: str, experiment: str, reference: bool = False) -> dict[str, Any]:
    """Compute the frontier of ``experiment`` in ``uri``, log it as a new run named "frontier" (figure
    ``pareto.png``, tables ``frontier.json`` / ``frontier.csv``) and return a JSON-able summary."""
    import os

    import mlflow

    if uri.startswith(("http://", "https://")):  # an unreachable server: fail in seconds, not after minutes
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    from .sqlite_init import ensure_sqlite_store

    try:
        ensure_sqlite_store(uri)  # a fresh SQLite store: created once, under a lock
        client = mlflow.MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(experiment)
    except Exception as err:  # noqa: BLE001 - an unreachable server: one clear message
        raise ValueError(f"cannot read MLflow store {uri}: {' '.join(str(err).split())[:300]}") from None
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(f"no experiment named {experiment!r} in {uri}; experiments there: {names}")
    points, skipped = collect_points(client, exp.experiment_id)
    mark_frontier(points)
    refs = mark_frontier(_reference()) if reference else None
    front = sorted((p for p in points if p["on_frontier"]), key=lambda p: (p["gflops_paper"], -p["top1"]))
    legacy = sum(p["cost_convention"] == LEGACY for p in points)

    title = (f"Cost-accuracy frontier of experiment '{experiment}': {len(front)} of {len(points)} finished runs"
             + (" (+ published ImageNet rows)" if reference else ""))
    rows = [{k: p.get(k) for k in ("source", "run_id", "run_name", "label", "method", "backbone", "target_rate",
                                   "macs_per_image", "gflops_paper", "cost_convention", "top1", "top5", "exec_rate",
                                   "on_frontier",
                                   "dominated_by", "tied_with")} for p in points + (refs or [])]
    run = client.create_run(exp.experiment_id, run_name="frontier",
                            tags={KIND_TAG: "frontier", "spnet.frontier.reference": str(bool(reference)).lower(),
                                  "mlflow.note.content": f"Pareto frontier of {len(points)} finished runs. "
                                                         f"{CONVENTION}."})
    rid = run.info.run_id
    try:
        from mlflow.entities import Metric, Param

        ts = int(time.time() * 1000)
        client.log_batch(rid, params=[Param("experiment", experiment), Param("reference", str(bool(reference))),
                                      Param("convention", CONVENTION)],
                         metrics=[Metric("frontier/runs", len(points), ts, 0),
                                  Metric("frontier/points", len(front), ts, 0),
                                  Metric("frontier/skipped_runs", skipped, ts, 0)])
        client.log_figure(rid, frontier_figure(points, refs, title), "pareto.png")
        import pandas as pd

        table = pd.DataFrame(rows)
        client.log_table(rid, data=table, artifact_file="frontier.json")
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            table.to_csv(Path(tmp) / "frontier.csv", index=False)
            client.log_artifact(rid, str(Path(tmp) / "frontier.csv"))
        client.set_terminated(rid, "FINISHED")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    return {"experiment": experiment, "experiment_id": exp.experiment_id, "frontier_run_id": rid,
            "runs": len(points), "skipped_runs": skipped, "reference": bool(reference), "legacy_cost_runs": legacy,
            "frontier": [{k: p[k] for k in ("run_id", "run_name", "macs_per_image", "gflops_paper", "top1",
                                            "tied_with")} for p in front],
            "artifacts": ["pareto.png", "frontier.json", "frontier.csv"], "convention": CONVENTION,
            "tracking_uri": uri}


def _reference() -> list[dict[str, Any]]:
    from .reference import reference_points

    return reference_points()
