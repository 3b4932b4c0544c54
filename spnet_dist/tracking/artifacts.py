"""Files the tracker logs besides metrics: the per-block execution-rate table and its heat map.

Figures are drawn on a bare ``matplotlib.figure.Figure`` (Agg canvas, no pyplot state), so they work headless
and from any thread.
"""
from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

log = logging.getLogger(__name__)


def rate_rows(rates: Sequence[float], table: Any = None) -> list[dict[str, Any]]:
    """One row per block: name, stage, index in stage, gated, execution rate, residual-branch MACs."""
    names = list(getattr(table, "block_names", None) or [f"block{i}" for i in range(len(rates))])
    gated = list(getattr(table, "gated", None) or [True] * len(rates))
    macs = list(getattr(table, "blocks", None) or [float("nan")] * len(rates))
    rows = []
    for i, r in enumerate(rates):
        name = names[i] if i < len(names) else f"block{i}"
        stage, _, idx = name.rpartition(".")
        rows.append({"block": name, "stage": stage or name, "index": int(idx) if idx.isdigit() else i,
                     "gated": bool(gated[i]) if i < len(gated) else True, "rate": float(r),
                     "branch_macs": float(macs[i]) if i < len(macs) else float("nan")})
    return rows


def write_rate_table(rows: list[dict[str, Any]], csv_path: Path, json_path: Path, meta: dict[str, Any]) -> None:
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["block", "rate"])
        w.writeheader()
        w.writerows(rows)
    json_path.write_text(json.dumps({**meta, "blocks": rows}, indent=1), encoding="utf-8")


def rate_heatmap(rows: list[dict[str, Any]], title: str):
    """Stages (rows) x block index in the stage (columns), coloured by execution rate in [0, 1]."""
    import numpy as np
    from matplotlib.figure import Figure

    stages = list(dict.fromkeys(r["stage"] for r in rows))
    width = max((r["index"] for r in rows), default=0) + 1
    grid = np.full((len(stages), width), np.nan)
    for r in rows:
        grid[stages.index(r["stage"]), r["index"]] = r["rate"]
    fig = Figure(figsize=(max(4.0, 0.9 * width + 2.0), 0.7 * len(stages) + 1.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.ma.masked_invalid(grid), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for r in rows:
        y, x = stages.index(r["stage"]), r["index"]
        ax.text(x, y, f"{r['rate']:.2f}" + ("" if r["gated"] else "*"), ha="center", va="center",
                color="white" if r["rate"] < 0.6 else "black", fontsize=8)
    ax.set_yticks(range(len(stages)), stages)
    ax.set_xticks(range(width), [str(i) for i in range(width)])
    ax.set_xlabel("block in stage  (* = not gated, always executed)")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="execution rate")
    fig.tight_layout()
    return fig


def stage_rate_artifacts(rows: list[dict[str, Any]], folder: Path, step: int, epoch: int | None) -> None:
    """Write one evaluation's rate table (CSV + JSON) and heat map into ``folder``; a figure that cannot be
    drawn is a warning, never an error (it must not stop training)."""
    label = (f"epoch_{epoch:03d}_" if epoch is not None else "") + f"step_{step:07d}"
    try:
        write_rate_table(rows, folder / f"{label}.csv", folder / f"{label}.json", {"step": step, "epoch": epoch})
        title = f"per-block execution rate, epoch {epoch}" if epoch is not None else "per-block execution rate"
        rate_heatmap(rows, f"{title} (step {step})").savefig(folder / f"heatmap_{label}.png")
    except Exception as err:  # noqa: BLE001 - a figure must never stop training
        from .store import short

        log.warning("could not draw the block-rate artifacts: %s", short(err))


def finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
