"""Inference time of real skipping vs dense masked execution vs the theoretical MAC saving.

Usage:
    python tools/bench_skip.py [--batches 1 64] [--rates 0.3 0.5 0.7] [--repeats 5] [--repeats-small 30]
                               [--threads 2] [--model resnet50] [--image-size 224]
                               [--device cpu|cuda] [--bf16] [--channels-last]
                               [--jsonl outputs/bench/bench_skip.jsonl]

Model: ResNet-50 v1.5 with SP-Net routers (all 16 blocks gated), 1000 classes, eval mode, ``torch.no_grad()``,
random weights with BN statistics calibrated on random images (timing does not depend on the weight values).
No auxiliary heads (they are training-time deep supervision only; SP-Net predicts with o_4).

Gates are forced, so both execution modes run exactly the same decisions:
  * batch > 1: ``model.force_gates(t, generator)`` — in every gated block exactly round(t·B) random images execute;
    the generator is re-seeded before every forward, so dense and skip see identical gates.
  * batch 1: force_gates would give round(t·1) ∈ {0, 1} executing images in *every* block (t=0.3/0.5 skip the whole
    network, t=0.7 runs all of it), so the image executes exactly round(t·L) of the L gated blocks instead, a fixed
    seeded pattern chosen (among 512 random ones) with branch-MAC fraction closest to t. It is fed through the same
    forced-gate hook of the model (``_forced_z``), one block at a time.

Timing: one warm-up forward per (batch, t, mode), then ``repeats`` rounds; in each round every (t, mode) pair runs
once, interleaved (dense and skip alternate, their order flips every round), so slow drifts of a contended machine
hit both modes alike. Reported: the median per pair.

Columns: measured saving = 1 − skip/dense; theoretical saving = 1 − macs/macs(1.0) from spnet_dist.models.cost,
``theo(t)`` from the nominal rate (CostTable.expected(t)) and ``theo(gates)`` from the gate decisions actually run
(macs_per_image); realised = measured / theo(gates). The same from process CPU time (all threads; not counting
time lost to other processes on a contended machine) is printed after the bar. Dense and skip logits are compared
(max |Δ|) as a sanity check. Each batch size's rows are printed and appended to --jsonl as soon as they are done.

``--device cuda``: model and inputs on the GPU (cuDNN autotuning on, as the trainer), the clock read after a
``torch.cuda.synchronize()`` on both ends of every forward; ``--bf16`` runs the forward under bf16 autocast and
``--channels-last`` feeds channels_last inputs (the GPU inference settings). CPU time is then mostly launch overhead.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from spnet_dist.models import build_model, cost_table, macs_per_image  # noqa: E402
from spnet_dist.models.dynamic_resnet import DynamicResNet  # noqa: E402

SEED = 0


def load_avg() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux
        return []


def build(model: str, image_size: int) -> DynamicResNet:
    torch.manual_seed(SEED)
    m = build_model({"name": model, "image_size": image_size}, {"router": {"type": "spnet"}})
    # BN running statistics from a few random batches so activations have realistic scale and gates are not NaN.
    m.train()
    with torch.no_grad():
        m.force_gates(1.0)
        for _ in range(2):
            m(torch.randn(4, 3, image_size, image_size))
    m.force_gates(None)
    m.eval()
    return m


def single_image_pattern(table: Any, t: float, seed: int) -> list[float]:
    """Per-block gates (0/1) for one image: round(t·L) of the L gated blocks on, MAC fraction closest to t."""
    gated = [i for i, g in enumerate(table.gated) if g]
    k = round(t * len(gated))
    total = sum(table.blocks[i] for i in gated)
    gen = torch.Generator().manual_seed(seed)
    best, best_err = None, float("inf")
    for _ in range(512):
        on = torch.randperm(len(gated), generator=gen)[:k].tolist()
        frac = sum(table.blocks[gated[j]] for j in on) / total
        if abs(frac - t) < best_err:
            best, best_err = {gated[j] for j in on}, abs(frac - t)
    return [1.0 if (i in best or not g) else 0.0 for i, g in enumerate(table.gated)]


class Forcer:
    """Sets the model's forced gates for one forward, identical for dense and skip."""

    def __init__(self, model: DynamicResNet, table: Any, batch: int, t: float) -> None:
        self.model, self.batch, self.t = model, batch, t
        self.gen = torch.Generator()
        self.pattern = single_image_pattern(table, t, SEED) if batch == 1 else None
        self._i = 0

    def _pattern_z(self, b: int, device: torch.device) -> torch.Tensor:
        gated = [i for i, g in enumerate(self.model.gated_blocks) if g]
        z = torch.full((b,), self.pattern[gated[self._i % len(gated)]], device=device)
        self._i += 1
        return z

    def arm(self) -> None:
        self.gen.manual_seed(SEED + int(self.t * 1000))
        self.model.force_gates(self.t, self.gen)
        if self.pattern is not None:
            self._i = 0
            self.model._forced_z = self._pattern_z  # instance override of the forced-gate hook
        elif "_forced_z" in self.model.__dict__:
            del self.model._forced_z


def sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def forward(model: DynamicResNet, x: torch.Tensor, mode: str, forcer: Forcer,
            bf16: bool = False) -> tuple[float, float, Any]:
    """(wall ms, process CPU ms, output). CPU time (all threads of this process) is the contention-robust twin of
    the wall time: time spent descheduled by other processes' load does not count (OpenMP spin-waits do)."""
    model.set_execution(mode)
    forcer.arm()
    sync(x)
    c0, t0 = time.process_time(), time.perf_counter()
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
    sync(x)
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3, out


def bench(args: argparse.Namespace, emit: Any = None) -> list[dict[str, Any]]:
    """All rows; ``emit(rows)`` is called with each batch size's rows as soon as they are measured."""
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model = build(args.model, args.image_size)
    table = cost_table(model, args.image_size)
    model.to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    full = table.full()
    rows = []
    modes = ("dense", "skip")
    with torch.no_grad():
        for batch in args.batches:
            repeats = args.repeats_small if batch <= 8 else args.repeats
            x = torch.randn(batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(1))
            x = x.to(device).contiguous(memory_format=fmt)
            forcers = {t: Forcer(model, table, batch, t) for t in args.rates}
            times: dict[tuple[float, str], list[float]] = {(t, m): [] for t in args.rates for m in modes}
            cpu: dict[tuple[float, str], list[float]] = {(t, m): [] for t in args.rates for m in modes}
            check: dict[float, dict[str, float]] = {}
            load_start = load_avg()
            for t in args.rates:  # warm-up + equality check + gate-exact theoretical MACs
                *_, dense = forward(model, x, "dense", forcers[t], args.bf16)
                *_, skip = forward(model, x, "skip", forcers[t], args.bf16)
                if not torch.equal(dense.gates, skip.gates):
                    raise RuntimeError(f"batch {batch}, t={t}: dense and skip ran different gates")
                check[t] = {"max_abs_diff": float((dense.logits - skip.logits).abs().max()),
                            "gate_rate": float(dense.gates.mean()),
                            "macs": float(macs_per_image(table, dense.gates).mean())}
            for r in range(repeats):
                for t in args.rates:
                    for mode in (modes if r % 2 == 0 else modes[::-1]):
                        ms, cpu_ms, _ = forward(model, x, mode, forcers[t], args.bf16)
                        times[(t, mode)].append(ms)
                        cpu[(t, mode)].append(cpu_ms)
            load_end = load_avg()
            batch_rows = []
            for t in args.rates:
                d, s = statistics.median(times[(t, "dense")]), statistics.median(times[(t, "skip")])
                measured = 1.0 - s / d
                d_cpu, s_cpu = statistics.median(cpu[(t, "dense")]), statistics.median(cpu[(t, "skip")])
                measured_cpu = 1.0 - s_cpu / d_cpu
                # drift-robust twin: the median of the per-round ratios (dense and skip of one round run back to back)
                paired = 1.0 - statistics.median(sk / de for sk, de in zip(times[(t, "skip")], times[(t, "dense")]))
                theo_t = 1.0 - table.expected(t) / full
                theo_g = 1.0 - check[t]["macs"] / full
                batch_rows.append({
                    "batch": batch, "t": t, "dense_ms": round(d, 3), "skip_ms": round(s, 3),
                    "measured_saving": round(measured, 4), "theoretical_saving": round(theo_t, 4),
                    "theoretical_saving_gates": round(theo_g, 4),
                    "realised_fraction": round(measured / theo_g, 4) if theo_g > 0 else None,
                    "measured_saving_paired": round(paired, 4),
                    "dense_cpu_ms": round(d_cpu, 3), "skip_cpu_ms": round(s_cpu, 3),
                    "measured_saving_cpu": round(measured_cpu, 4),
                    "realised_fraction_cpu": round(measured_cpu / theo_g, 4) if theo_g > 0 else None,
                    "gate_rate": round(check[t]["gate_rate"], 4), "max_abs_logit_diff": check[t]["max_abs_diff"],
                    "dense_ms_all": [round(v, 2) for v in times[(t, "dense")]],
                    "skip_ms_all": [round(v, 2) for v in times[(t, "skip")]],
                    "repeats": repeats, "threads": args.threads, "model": args.model,
                    "image_size": args.image_size, "macs_full": full, "macs_gates": check[t]["macs"],
                    "device": device.type, "bf16": args.bf16, "channels_last": args.channels_last,
                    "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                    "load_avg_start": load_start, "load_avg_end": load_end,
                    "torch": torch.__version__, "cpu_count": os.cpu_count(), "host": platform.node(),
                    "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                })
            print(f"# batch {batch}: {repeats} repeats, load average {load_start} -> {load_end}", flush=True)
            rows += batch_rows
            if emit is not None:
                emit(batch_rows)
    return rows


def print_table(rows: list[dict[str, Any]], header: bool = True) -> None:
    head = (f"{'batch':>5} {'t':>4} {'gates':>6} {'dense ms':>10} {'skip ms':>10} {'measured':>9} "
            f"{'theo(t)':>8} {'theo(gates)':>11} {'realised':>9} {'| cpu saving':>12} {'realised':>9}")
    if header:
        print(head)
        print("-" * len(head))
    for r in rows:
        real = f"{r['realised_fraction']:.1%}" if r["realised_fraction"] is not None else "n/a"
        print(f"{r['batch']:>5} {r['t']:>4} {r['gate_rate']:>6.3f} {r['dense_ms']:>10.1f} {r['skip_ms']:>10.1f} "
              f"{r['measured_saving']:>9.1%} {r['theoretical_saving']:>8.1%} {r['theoretical_saving_gates']:>11.1%} "
              f"{real:>9} {'|':>3}{r['measured_saving_cpu']:>9.1%} {r['realised_fraction_cpu']:>9.1%}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rates", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--repeats", type=int, default=5, help="timed rounds for batches > 8")
    p.add_argument("--repeats-small", type=int, default=30, help="timed rounds for batches <= 8")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--bf16", action="store_true", help="forward under bf16 autocast")
    p.add_argument("--channels-last", action="store_true", help="channels_last inputs")
    p.add_argument("--jsonl", default="outputs/bench/bench_skip.jsonl", help="append one JSON line per row here")
    args = p.parse_args(argv)
    print(f"# {args.model} @ {args.image_size}px, SP-Net routers, eval + no_grad, torch {torch.__version__}, "
          f"{args.threads} threads, {os.cpu_count()} CPUs, device {args.device}{' bf16' if args.bf16 else ''}"
          f"{' channels_last' if args.channels_last else ''}, load average {load_avg()}", flush=True)
    out = Path(args.jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)

    def emit(batch_rows: list[dict[str, Any]]) -> None:  # partial results survive an interrupted run
        print_table(batch_rows)
        with out.open("a") as f:
            for r in batch_rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")
        sys.stdout.flush()

    rows = bench(args, emit)
    print("# all rows")
    print_table(rows)
    print(f"# appended {len(rows)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
