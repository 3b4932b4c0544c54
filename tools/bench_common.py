"""Shared helpers of the ``tools/bench_*.py`` benchmarks: machine facts, quiet-window wait, interleaved timing,
tables and JSON lines.

Every benchmark prints a table and appends one JSON object per result row to ``outputs/bench/<name>.jsonl``; each
row carries the machine, the date, the command and the 1-minute load average before and after the measurement
(``load_avg_start`` / ``load_avg_end``), because the build machines are shared and a loaded CPU skews absolute times.
Ratios are measured side by side: in every round each variant runs once, in a rotating order, and the reported
ratio is the median over rounds of the per-round ratio, so slow drifts of a contended machine hit all variants alike.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from spnet_dist.osutil import usable_cores  # noqa: E402  (after the sys.path insert)

BENCH_DIR = Path("outputs/bench")


def load_avg() -> list[float]:
    """(1, 5, 15)-minute load averages, rounded; [] where the OS does not report them."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return []


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    try:
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):  # pragma: no cover
        mem_gib = None
    return {"host": platform.node(), "cpu": cpu_model(), "cores": usable_cores(), "mem_gib": mem_gib, "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def wait_for_quiet(max_wait_s: float, threshold: float = 1.5, poll_s: float = 10.0) -> list[float]:
    """Poll the 1-minute load average until it is below ``threshold`` or ``max_wait_s`` passed; returns it."""
    deadline = time.monotonic() + max_wait_s
    la = load_avg()
    announced = False
    while la and la[0] >= threshold and time.monotonic() < deadline:
        if not announced:
            print(f"# waiting up to {max_wait_s:.0f} s for a quiet machine (1-min load {la[0]} >= {threshold})",
                  flush=True)
            announced = True
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        la = load_avg()
    if announced:
        state = "quiet" if la and la[0] < threshold else "still busy, measuring anyway"
        print(f"# load average {la}: {state}", flush=True)
    return la


def interleaved(fns: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                on_result: Callable[[str, Any], None] | None = None) -> dict[str, list[float]]:
    """Run every function once per round, in an order rotated by one each round; returns seconds per call.

    ``warmup`` untimed rounds come first. A function may return a dict of extra timings; ``on_result(name,
    result)`` receives it (only for timed rounds).
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            res = fns[n]()
            times[n].append(time.perf_counter() - t0)
            if on_result is not None:
                on_result(n, res)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def ratio_median(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of the per-round ratios num[i] / den[i] (side-by-side rounds)."""
    return median([a / b for a, b in zip(num, den) if b > 0])


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec such as '.3f' or '')."""
    cells = [[("" if r.get(k) is None else format(r[k], f)) for k, _, f in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(columns)]
    head = "  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths))
    print(head)
    print("-" * len(head))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def append_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True, default=str) + "\n")
            n += 1
    print(f"# appended {n} row(s) to {out}", flush=True)
    return out


def add_common_args(p: Any, name: str) -> None:
    p.add_argument("--jsonl", default=str(BENCH_DIR / f"{name}.jsonl"), help="append one JSON line per result")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to this long for the 1-minute load average to drop below --quiet-load")
    p.add_argument("--quiet-load", type=float, default=1.5)


def stamp(extra: Mapping[str, Any], load_start: list[float], load_end: list[float]) -> dict[str, Any]:
    """Fields every JSON row carries."""
    return {**extra, "machine": machine(), "date": now_utc(), "command": command_line(),
            "load_avg_start": load_start, "load_avg_end": load_end}
