"""Data-parallel scaling on one machine: 1 vs N ranks (gloo), step time and img/s, side by side.

Usage:
    python tools/bench_scale.py [--ranks 1 2] [--model resnet_tiny] [--method spnet_code] [--image-size 64]
                                [--batch 32] [--steps 20] [--warmup 3] [--rounds 3] [--wait-quiet 600]

Each run starts N rank processes the way ``spnet train trainer.nprocs=N`` does (RANK / WORLD_SIZE / LOCAL_RANK /
LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT, torch threads = cores // N, DALI threads = data.num_threads // N) and
runs the trainer's own pieces on the composed Hydra config: ``init_distributed`` (gloo), ``build_model``,
``build_method``, the trainer's SGD (``build_optimizer``) in ``deepspeed.initialize`` with ``deepspeed_config`` (ZeRO-0), the DALI
``build_loader`` sharded by rank, and the trainer's step (``engine(x)``, ``method.loss``, ``engine.backward``,
``engine.step``). No evaluation, checkpoints or MLflow: only steps are timed. Weak scaling, as ``trainer.nprocs``:
the batch per rank is fixed, so N ranks process N x batch images per step.

Per run: ``--warmup`` untimed steps, then ``--steps`` timed ones; img/s = images of all ranks / wall time of the
timed steps. Per step and rank the parts are timed too: waiting for data, forward + loss, backward (DeepSpeed reduces
the gradients here), optimizer step; plus a separate all-reduce of a gradient-sized float32 buffer; and images per
CPU-second (process CPU time of all ranks over the timed steps: the cost per image, less sensitive to other load). Runs alternate
between rank counts (``--rounds`` rounds, rotated order); reported: medians over rounds, and img/s of N ranks /
img/s of 1 rank. Data: a tiny ImageNet-format set (``spnet_dist.data.tiny``) made once under ``--data``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402

RESULT = "BENCH_SCALE_RESULT "
PARTS = ("data", "forward_loss", "backward", "step")


def ensure_data(root: Path, per_class: int) -> Path:
    from spnet_dist.data.tiny import make_tiny_imagenet

    if not (root / "tiny_imagenet.json").exists():
        make_tiny_imagenet(root, classes=10, train_per_class=per_class, val_per_class=2, seed=0)
    return root


def overrides(args: argparse.Namespace) -> list[str]:
    return [f"data.root={args.data}", f"model={args.model}", f"method={args.method}", "model.num_classes=10",
            f"data.image_size={args.image_size}", f"data.val_resize={args.image_size}", "data.scan=off",
            f"trainer.batch_size={args.batch}", f"deepspeed={args.deepspeed}", "seed=0"]


# ------------------------------------------------------------------------------------------------ one rank
def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from spnet_dist.config import compose
    from spnet_dist.data.loader import build_loader
    from spnet_dist.data.preflight import plan_data
    from spnet_dist.engine.rng import seed_all
    from spnet_dist.engine.setup import build_optimizer, deepspeed_config, setup_process
    from spnet_dist.methods import build_method
    from spnet_dist.methods.build import build_from_config

    cfg = compose(overrides(args))
    rank, world = setup_process(cfg)  # the trainer's: process group, threads, CPU malloc tuning
    seed_all(cfg.seed)
    model, method_cfg = build_from_config(cfg.model, cfg.method)
    opt = build_optimizer(model, cfg.optim)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, world))
    method = build_method(method_cfg, engine.module)
    seed_all(cfg.seed + 1000 * rank)
    loader = build_loader(cfg, plan_data(cfg, world), train=True, shard_id=rank, num_shards=world)
    engine.train()

    def batches():
        while True:
            yield from loader

    it = batches()
    parts: dict[str, list[float]] = {p: [] for p in PARTS}
    dist.barrier()
    t_start = time.perf_counter()
    for s in range(args.warmup + args.steps):
        if s == args.warmup:
            dist.barrier()
            t_start, c_start = time.perf_counter(), time.process_time()
        t0 = time.perf_counter()
        images, labels = next(it)
        t1 = time.perf_counter()
        out = engine(images)
        loss, _ = method.loss(engine.module, images, labels, out)
        t2 = time.perf_counter()
        engine.backward(loss)
        t3 = time.perf_counter()
        engine.step()
        t4 = time.perf_counter()
        if s >= args.warmup:
            for p, v in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[p].append(v)
    cpu = time.process_time() - c_start  # this rank's CPU time (torch + DALI threads) over the timed steps
    dist.barrier()
    wall = time.perf_counter() - t_start
    n_params = sum(p.numel() for p in engine.module.parameters())
    flat = torch.zeros(n_params)
    ar = []
    for _ in range(6):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        ar.append(time.perf_counter() - t0)
    mine = {"parts_ms": {p: statistics.median(v) * 1e3 for p, v in parts.items()},
            "allreduce_ms": statistics.median(ar[1:]) * 1e3, "threads": torch.get_num_threads(),
            "dali_threads": loader.spec.num_threads, "final_loss": float(loss.detach()), "cpu_s": cpu}
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        images = args.steps * args.batch * world
        res = {"world": world, "wall_s": wall, "img_per_s": images / wall, "step_ms": wall / args.steps * 1e3,
               "img_per_cpu_s": images / sum(x["cpu_s"] for x in everyone),
               "n_params": n_params, "ranks": everyone}
        print(RESULT + json.dumps(res), flush=True)
    loader.release()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ launcher
def launch(args: argparse.Namespace, world: int, port: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", *sys_args(args)]
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit(f"a {world}-rank run exceeded {args.timeout} s")
        outs.append((p.returncode, out, err))
    for rc, out, err in outs:
        if rc != 0:
            raise SystemExit(f"a {world}-rank run failed (rc {rc}):\n{err[-3000:]}")
    for line in outs[0][1].splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    raise SystemExit(f"rank 0 printed no result:\n{outs[0][1][-2000:]}\n{outs[0][2][-2000:]}")


def sys_args(args: argparse.Namespace) -> list[str]:
    return ["--data", str(args.data), "--model", args.model, "--method", args.method, "--image-size",
            str(args.image_size), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
            str(args.warmup), "--deepspeed", args.deepspeed]


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from spnet_dist.engine.run import free_port

    ensure_data(Path(args.data), args.per_class)
    la_start = bc.wait_for_quiet(args.wait_quiet, args.quiet_load) if args.wait_quiet else bc.load_avg()
    print(f"# {args.model} @ {args.image_size}px, {args.method}, batch {args.batch}/rank, {args.steps} steps "
          f"(+{args.warmup} warm-up) per run, {args.rounds} rounds, ranks {args.ranks}, load average {la_start}",
          flush=True)
    results: dict[int, list[dict[str, Any]]] = {n: [] for n in args.ranks}
    for r in range(args.rounds):
        k = r % len(args.ranks)
        for n in args.ranks[k:] + args.ranks[:k]:
            res = launch(args, n, free_port())
            results[n].append(res)
            print(f"# round {r + 1}: {n} rank(s): {res['img_per_s']:.1f} img/s, step {res['step_ms']:.1f} ms, "
                  f"load {bc.load_avg()}", flush=True)
    la_end = bc.load_avg()
    ref = args.ranks[0]
    rows = []
    for n in args.ranks:
        rs = results[n]
        parts = {p: round(bc.median([statistics.mean(x["parts_ms"][p] for x in res["ranks"]) for res in rs]), 2)
                 for p in PARTS}
        rows.append(bc.stamp({
            "bench": "bench_scale", "ranks": n, "model": args.model, "method": args.method,
            "image_size": args.image_size, "batch_per_rank": args.batch, "steps": args.steps,
            "rounds": args.rounds, "deepspeed": args.deepspeed,
            "threads_per_rank": rs[0]["ranks"][0]["threads"], "dali_threads_per_rank": rs[0]["ranks"][0]["dali_threads"],
            "img_per_s": round(bc.median([x["img_per_s"] for x in rs]), 2),
            "step_ms": round(bc.median([x["step_ms"] for x in rs]), 2),
            "ratio_vs": f"{ref} rank(s)",
            "img_s_ratio": round(bc.ratio_median([x["img_per_s"] for x in rs],
                                                 [x["img_per_s"] for x in results[ref]]), 4),
            "img_per_cpu_s": round(bc.median([x["img_per_cpu_s"] for x in rs]), 3),
            "img_cpu_s_ratio": round(bc.ratio_median([x["img_per_cpu_s"] for x in rs],
                                                     [x["img_per_cpu_s"] for x in results[ref]]), 4),
            "parts_ms": parts,
            "allreduce_grad_ms": round(bc.median([x["ranks"][0]["allreduce_ms"] for x in rs]), 3),
            "n_params": rs[0]["n_params"], "img_per_s_all": [round(x["img_per_s"], 2) for x in rs],
        }, la_start, la_end))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--model", default="resnet_tiny")
    p.add_argument("--method", default="spnet_code")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=32, help="per rank")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--deepspeed", default="zero0")
    p.add_argument("--data", default=str(bc.BENCH_DIR / "tiny-imagenet"))
    p.add_argument("--per-class", type=int, default=60, help="training images per class when making --data")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    bc.add_common_args(p, "bench_scale")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    args.data = str(Path(args.data).resolve())
    rows = run(args)
    table = [{**r, **r["parts_ms"]} for r in rows]
    bc.print_table(table, [("ranks", "ranks", "d"), ("threads_per_rank", "thr/rank", "d"),
                           ("step_ms", "step ms", ".1f"), ("img_per_s", "img/s", ".1f"),
                           ("img_s_ratio", f"img/s ÷ {args.ranks[0]}r", ".3f"),
                           ("img_per_cpu_s", "img/CPU-s", ".2f"), ("img_cpu_s_ratio", "img/CPU-s ÷", ".3f"),
                           ("data", "data", ".1f"),
                           ("forward_loss", "fwd+loss", ".1f"), ("backward", "bwd(+ar)", ".1f"),
                           ("step", "opt step", ".1f"), ("allreduce_grad_ms", "allreduce", ".2f")])
    print(f"# load average {rows[0]['load_avg_start']} -> {rows[0]['load_avg_end']}")
    bc.append_jsonl(args.jsonl, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
