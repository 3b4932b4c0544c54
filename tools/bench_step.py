"""Training-step time of a static ResNet, ConvNet-AIG and SP-Net (EMA teacher included), side by side.

Usage:
    python tools/bench_step.py [--model resnet50] [--image-size 224] [--batch 8] [--threads 2] [--rounds 8]
                               [--variants static aig spnet spnet:nograd spnet:bf16teacher spnet:noteacher]
                               [--engine deepspeed|torch] [--compile [BACKEND]] [--profile] [--wait-quiet 600]

One process, one set of model instances. Every variant runs the trainer's own step, ``TrainLoop.run_step``
(``spnet_dist.engine.loop``: forward, method loss, finite/stop flags, backward, optimizer step), with the trainer's
DeepSpeed config (ZeRO-0 as the default config, 1 rank, gloo) and its
SGD (``build_optimizer``: fused, momentum 0.9, weight decay 1e-4; lr 0.01 so random data stays finite). Inputs are a fixed random
batch (time does not depend on pixel values: training runs every block densely, whatever the gates decide).

Variants (``base[:option+option]``):
  static            plain ResNet: router type ``none`` (no gates, no heads), CE loss (ConvNet-AIG objective with
                    nothing gated = CE)
  aig               ConvNet-AIG (configs/method/aig.yaml): a gate per block, two-sided rate loss
  spnet             SP-Net (configs/method/spnet_code.yaml): gates, multi-stage heads, EMA teacher (update + forward
                    in inference mode), all five loss terms — the step as the trainer runs it
  :nograd           teacher forward under ``torch.no_grad`` (the step before the lean-step change)
  :bf16teacher      ``method.teacher_precision=bf16``: teacher forward under bf16 autocast (student fp32)
  :noteacher        what-if: w_logits = w_path = 0 (no teacher forward; the EMA still runs) = the limit of
                    "teacher every k steps" for k -> infinity
  :cl               channels_last input (parameters stay NCHW: convolutions follow the input's format)
  :bf16             whole step in bf16 autocast (DeepSpeed ``torch_autocast``, as ``deepspeed.bf16_autocast=true``;
                    the teacher runs under the same autocast)

Timing: ``--warmup`` untimed rounds, then ``--rounds`` rounds in which every variant does one step, in an order
rotated every round. Reported: median step time per variant, img/s, and the ratio to ``static`` as the median of
the per-round ratios (of wall time, and of process CPU time: the latter is less sensitive to other load). For SP-Net variants a breakdown with manual timers around the same calls on the same
instances: student forward, EMA update, teacher forward, losses (the rest of ``method.loss`` and the step's flags),
backward (with the gradient all-reduce when there are several ranks), optimizer step; the timers wrap the engine's
forward, ``backward`` and ``step`` and the method's EMA / teacher calls. On a GPU every timer synchronises first.
``--engine torch`` (a what-if without DeepSpeed) runs the same calls by hand. ``--compile [BACKEND]`` compiles
every variant as ``trainer.compile=true`` does (``engine.compile()``, and the SP-Net teacher's ``compile()``;
backend ``inductor`` by default, ``eager`` checks the tracing alone); its compile time falls in the warm-up rounds.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402
import torch  # noqa: E402

BASES = ("static", "aig", "spnet")
OPTIONS = ("nograd", "bf16teacher", "noteacher", "cl", "bf16")
PARTS = ("forward", "ema", "teacher", "losses", "backward", "step")


def method_cfg(base: str, options: set[str]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    name = {"static": "aig", "aig": "aig", "spnet": "spnet_code"}[base]
    cfg = OmegaConf.to_container(OmegaConf.load(bc.ROOT / "configs" / "method" / f"{name}.yaml"), resolve=True)
    if base == "static":
        cfg["router"] = {"type": "none"}
        cfg["gate_mask"] = None
    if "noteacher" in options:
        cfg["w_logits"] = cfg["w_path"] = 0.0
    if "bf16teacher" in options:
        cfg["teacher_precision"] = "bf16"
    return cfg


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Variant:
    """One model + method + engine, and its timed training step."""

    def __init__(self, spec: str, args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor) -> None:
        from spnet_dist.engine.setup import build_optimizer, deepspeed_config
        from spnet_dist.methods import build_method
        from spnet_dist.methods.build import build_from_config

        base, _, opts = spec.partition(":")
        self.options = set(filter(None, opts.split("+")))
        if base not in BASES or not self.options <= set(OPTIONS):
            raise SystemExit(f"unknown variant {spec!r}: base one of {BASES}, options from {OPTIONS}")
        if self.options & {"nograd", "bf16teacher", "noteacher"} and base != "spnet":
            raise SystemExit(f"variant {spec!r}: teacher options apply to spnet only")
        self.name, self.base = spec, base
        self.loop = None
        torch.manual_seed(0)
        model, mcfg = build_from_config({"name": args.model, "image_size": args.image_size},
                                        method_cfg(base, self.options))
        self.memory_format = torch.channels_last if "cl" in self.options else torch.contiguous_format
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # channels_last on the input only: DeepSpeed cannot broadcast/flatten channels_last parameters, and
        # convolutions follow the input's memory format anyway (the trainer's GPU path does the same)
        model = model.to(device=device)
        self.x = x.to(device).contiguous(memory_format=self.memory_format)
        self.y = y.to(device)
        opt = build_optimizer(model, {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4,
                                      "fused": not args.unfused_sgd})
        self.amp = "bf16" in self.options
        if args.engine == "deepspeed":
            import deepspeed
            from omegaconf import OmegaConf

            cfg = OmegaConf.create({"trainer": {"batch_size": x.shape[0]},
                                    "deepspeed": {"stage": args.zero_stage, "gradient_clipping": 0.0,
                                                  "bf16_autocast": self.amp}})
            self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                                        config=deepspeed_config(cfg, bc_world()))
            self.module = self.engine.module
            self.loop = trainer_loop(self.engine, x.shape[0], self.amp)
            self.loop.memory_format = self.memory_format
        else:
            self.module = model

            def fwd(images: torch.Tensor) -> Any:
                with self.autocast():
                    return model(images)

            def opt_step() -> None:
                opt.step()
                opt.zero_grad(set_to_none=True)

            self.forward, self.backward, self.opt_step = fwd, (lambda loss: loss.backward()), opt_step
        self.method = build_method(mcfg, self.module)
        if args.compile:  # as the trainer: after build_method (a deep copy of a compiled module calls the original)
            compile_variant(self, args.compile, args.engine)
        if args.engine == "deepspeed":
            self.loop.method = self.method
            self._time_engine()
        self.parts: dict[str, list[float]] = {p: [] for p in PARTS}
        self.cpu: list[float] = []
        self.losses: list[float] = []
        self._cur: dict[str, float] = {}
        if base == "spnet":
            self.method.teacher_inference_mode = "nograd" not in self.options
            self._wrap("ema", "ema_update")
            self._wrap("teacher", "teacher_forward", self.autocast if "bf16" in self.options else None)

    def autocast(self) -> Any:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(dev, dtype=torch.bfloat16)

    def _wrap(self, part: str, attr: str, ctx: Callable[[], Any] | None = None) -> None:
        fn = getattr(self.method, attr)

        def timed(*a: Any, **k: Any) -> Any:
            sync()
            t0 = time.perf_counter()
            with (ctx() if ctx else contextlib.nullcontext()):
                res = fn(*a, **k)
            sync()
            self._cur[part] = self._cur.get(part, 0.0) + time.perf_counter() - t0
            return res

        setattr(self.method, attr, timed)  # instance attribute shadows the bound method

    def _time_engine(self) -> None:
        """Part timers around the engine's forward (hooks), backward and step (instance attributes)."""
        def start(*_: Any) -> None:
            sync()
            self._cur["t_fwd"] = time.perf_counter()

        def end(*_: Any) -> None:
            sync()
            self._cur["forward"] = time.perf_counter() - self._cur["t_fwd"]
            self._cur["t_loss"] = time.perf_counter()

        self.engine.register_forward_pre_hook(start)
        self.engine.register_forward_hook(end)
        for part, attr in (("backward", "backward"), ("step", "step")):
            fn = getattr(self.engine, attr)

            def timed(*a: Any, _fn: Callable = fn, _part: str = part, **k: Any) -> Any:
                sync()
                t0 = time.perf_counter()
                if _part == "backward":
                    self._cur["losses"] = t0 - self._cur["t_loss"]
                res = _fn(*a, **k)
                sync()
                self._cur[_part] = time.perf_counter() - t0
                return res

            object.__setattr__(self.engine, attr, timed)  # instance attribute shadows the bound method

    def step(self) -> dict[str, float]:
        """The trainer's step; returns the per-part seconds."""
        self._cur = {}
        if self.loop is not None:
            c0 = time.process_time()
            result = self.loop.run_step(self.x, self.y)
            self._cpu = time.process_time() - c0
            self.last_loss = result.loss
            inner = self._cur.get("ema", 0.0) + self._cur.get("teacher", 0.0)
            return {"forward": self._cur["forward"], "ema": self._cur.get("ema", 0.0),
                    "teacher": self._cur.get("teacher", 0.0), "losses": self._cur["losses"] - inner,
                    "backward": self._cur["backward"], "step": self._cur["step"]}
        sync()
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = self.forward(self.x)
        sync()
        t1 = time.perf_counter()
        # under bf16 autocast the losses (and the teacher) run in the engine's autocast, as in the trainer
        with (self.autocast() if self.amp else contextlib.nullcontext()):
            loss, _terms = self.method.loss(self.module, self.x, self.y, out)
        sync()
        t2 = time.perf_counter()
        self.backward(loss)
        sync()
        t3 = time.perf_counter()
        self.opt_step()
        sync()
        t4 = time.perf_counter()
        self._cpu = time.process_time() - c0
        inner = self._cur.get("ema", 0.0) + self._cur.get("teacher", 0.0)
        parts = {"forward": t1 - t0, "ema": self._cur.get("ema", 0.0), "teacher": self._cur.get("teacher", 0.0),
                 "losses": (t2 - t1) - inner, "backward": t3 - t2, "step": t4 - t3}
        self.last_loss = loss.detach()
        return parts

    def record(self, parts: dict[str, float]) -> None:
        for k, v in parts.items():
            self.parts[k].append(v)
        self.losses.append(float(self.last_loss))  # outside the timed step
        self.cpu.append(self._cpu)


def compile_variant(v: Variant, backend: str, engine: str) -> None:
    """``trainer.compile=true``: the engine's module (or the bare model) and an SP-Net teacher, in place."""
    if engine == "deepspeed":
        v.engine.compile(backend=backend)
    else:
        v.module.compile(backend=backend)
    teacher = getattr(v.method, "teacher", None)
    if isinstance(teacher, torch.nn.Module):
        teacher.compile(backend=backend)


def trainer_loop(engine: Any, batch: int, bf16: bool) -> Any:
    """The trainer's ``TrainLoop`` around ``engine``, without hooks, loaders or tracking: only ``run_step`` is used
    (the method is set once it exists)."""
    from omegaconf import OmegaConf

    from spnet_dist.engine.loop import Progress, TrainLoop

    cfg = OmegaConf.create({"trainer": {"epochs": 1, "max_steps": 0, "channels_last": None, "on_nonfinite": "stop"},
                            "deepspeed": {"bf16_autocast": bf16}})
    return TrainLoop(cfg, engine, None, None, [None] * batch, None, Progress(), None, [])


def bc_world() -> int:
    import spnet_dist.distributed as D

    return D.world_size()


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from spnet_dist.engine.setup import init_distributed

    torch.set_num_threads(args.threads)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    elif not args.default_malloc:  # as the trainer does (trainer.cpu_malloc_tuning=true)
        from spnet_dist.engine.malloc import keep_freed_memory

        keep_freed_memory()
    if args.engine == "deepspeed":
        os.environ.setdefault("MASTER_PORT", str(29700 + os.getpid() % 1000))
        init_distributed()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen)
    num_classes = 1000 if args.model in ("resnet50", "resnet101") else 10
    y = torch.randint(0, num_classes, (args.batch,), generator=gen)
    variants = [Variant(s, args, x, y) for s in args.variants]
    by_name = {v.name: v for v in variants}
    la_start = bc.wait_for_quiet(args.wait_quiet, args.quiet_load) if args.wait_quiet else bc.load_avg()
    print(f"# {args.model} @ {args.image_size}px, batch {args.batch}, {args.threads} threads, engine {args.engine}, "
          f"compile {args.compile or 'off'}, {args.rounds} rounds (+{args.warmup} warm-up), load average {la_start}",
          flush=True)
    times = bc.interleaved({v.name: v.step for v in variants}, rounds=args.rounds, warmup=args.warmup,
                           on_result=lambda n, parts: by_name[n].record(parts))
    if args.profile:
        profile(variants)
    ref = "static" if "static" in times else variants[0].name
    rows = []
    for v in variants:
        t = bc.median(times[v.name])
        row: dict[str, Any] = {
            "bench": "bench_step", "variant": v.name, "model": args.model, "image_size": args.image_size,
            "batch": args.batch, "threads": args.threads, "engine": args.engine, "rounds": args.rounds,
            "compile": args.compile, "device": "cuda" if torch.cuda.is_available() else "cpu",
            "step_ms": round(t * 1e3, 2), "img_per_s": round(args.batch / t, 3),
            "img_per_s_per_core": round(args.batch / t / args.threads, 3),
            "ratio_vs": ref, "ratio": round(bc.ratio_median(times[v.name], times[ref]), 4),
            "step_ms_all": [round(s * 1e3, 1) for s in times[v.name]],
            "cpu_ms": round(bc.median(v.cpu) * 1e3, 2),
            "cpu_ratio": round(bc.ratio_median(v.cpu, by_name[ref].cpu), 4),
            "parts_ms": {p: round(bc.median(v.parts[p]) * 1e3, 2) for p in PARTS},
            "final_loss": v.losses[-1] if v.losses else None,
        }
        if v.base == "spnet" and row["parts_ms"]["teacher"] > 0:
            # the measured ratio with the teacher forward amortised over k steps (its share of this step removed)
            share = row["parts_ms"]["teacher"] / (sum(row["parts_ms"].values()) or 1.0)
            row["teacher_share"] = round(share, 4)
            row["estimate_teacher_every_k"] = {str(k): round(row["ratio"] * (1 - share * (1 - 1 / k)), 4)
                                               for k in (2, 4, 8)}
        rows.append(row)
    la_end = bc.load_avg()
    return [bc.stamp(r, la_start, la_end) for r in rows]


def profile(variants: list[Variant], rows: int = 15) -> None:
    """torch.profiler tables of one step of every variant: top ``rows`` ops by self time (CUDA time on a GPU)."""
    from torch.profiler import ProfilerActivity, profile as tprofile

    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    for v in variants:
        with tprofile(activities=acts) as prof:
            v.step()
        print(f"# torch.profiler, one step of {v.name}, top {rows} by {key}")
        print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48))


def print_rows(rows: list[dict[str, Any]]) -> None:
    table = []
    for r in rows:
        p = r["parts_ms"]
        table.append({"variant": r["variant"], "step_ms": r["step_ms"], "img_s": r["img_per_s"],
                      "img_s_core": r["img_per_s_per_core"], "ratio": r["ratio"], "cpu_ratio": r["cpu_ratio"], **p})
    bc.print_table(table, [("variant", "variant", ""), ("step_ms", "step ms", ".1f"), ("img_s", "img/s", ".2f"),
                           ("img_s_core", "img/s/core", ".2f"), ("ratio", f"÷ {rows[0]['ratio_vs']}", ".3f"),
                           ("cpu_ratio", "CPU-time ÷", ".3f"),
                           ("forward", "fwd", ".1f"), ("ema", "ema", ".1f"), ("teacher", "teacher", ".1f"),
                           ("losses", "losses", ".1f"), ("backward", "bwd", ".1f"), ("step", "opt step", ".1f")])
    for r in rows:
        if "estimate_teacher_every_k" in r:
            est = ", ".join(f"k={k}: {v:.3f}" for k, v in r["estimate_teacher_every_k"].items())
            print(f"# {r['variant']}: estimated ratio with the teacher forward every k steps: {est}")
    print(f"# load average {r['load_avg_start']} -> {r['load_avg_end']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet50")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=["static", "aig", "spnet"])
    p.add_argument("--engine", choices=("deepspeed", "torch"), default="deepspeed")
    p.add_argument("--zero-stage", type=int, default=0)
    p.add_argument("--default-malloc", action="store_true",
                   help="glibc's default malloc thresholds (trainer: trainer.cpu_malloc_tuning=false)")
    p.add_argument("--unfused-sgd", action="store_true", help="torch's per-parameter SGD (trainer: optim.fused=false)")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile every variant as trainer.compile=true does (default backend: inductor)")
    p.add_argument("--profile", action="store_true", help="torch.profiler table of one step of every variant")
    bc.add_common_args(p, "bench_step")
    args = p.parse_args(argv)
    rows = run(args)
    print_rows(rows)
    bc.append_jsonl(args.jsonl, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
