"""The training loop: Hydra config -> DALI -> dynamic ResNet -> DeepSpeed engine -> checkpoints -> MLflow."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..config import flatten, to_container
from . import distributed as D
from .checkpoint import Checkpointer, resolve_resume
from .evaluate import evaluate
from .rng import rng_state, seed_all, set_rng_state

log = logging.getLogger("spnet.train")


def deepspeed_config(cfg: Any, world: int) -> dict[str, Any]:
    ds = cfg.deepspeed
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.trainer.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.trainer.batch_size * world,
        "zero_optimization": {"stage": ds.stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.gradient_clipping:
        conf["gradient_clipping"] = ds.gradient_clipping
    if ds.bf16_autocast:
        conf["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return conf


def lr_lambda(optim: Any, steps_per_epoch: int):
    """Per-step multiplier: linear warm-up, then x gamma at each milestone epoch."""
    warm = optim.warmup_epochs * steps_per_epoch
    milestones = [m * steps_per_epoch for m in optim.milestones]

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        return optim.gamma ** sum(step >= m for m in milestones)

    return f


def init_distributed() -> None:
    import deepspeed

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
    if not D.is_dist():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def run_name(cfg: Any) -> str:
    return cfg.name or f"{cfg.method.name}-{cfg.model.name}-t{cfg.method.get('target_rate', 'na')}"


def train(cfg: Any) -> dict[str, Any]:
    """Run training on this rank; returns the summary (rank 0's is printed by the CLI)."""
    import deepspeed

    from ..data.loaders import build_loader
    from ..methods import build_method, prepare_method_cfg
    from ..models import build_model, cost_table
    from ..tracking.mlflow_tracker import Tracker

    init_distributed()
    rank, world = D.rank(), D.world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(cfg.trainer.threads or max(1, (os.cpu_count() or 1) // local_world))
    seed_all(cfg.seed)

    method_cfg = prepare_method_cfg(cfg.method, cfg.model)
    model = build_model(cfg.model, method_cfg)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 and cfg.optim.get("no_decay_bn", False) else decay).append(p)
    groups = [{"params": decay}] + ([{"params": no_decay, "weight_decay": 0.0}] if no_decay else [])
    optimizer = torch.optim.SGD(groups,
                                lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)

    train_loader = build_loader(cfg, train=True, shard_id=rank, num_shards=world)
    val_loader = build_loader(cfg, train=False, shard_id=rank, num_shards=world)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError(f"trainer.batch_size={cfg.trainer.batch_size} x {world} ranks is larger than the "
                         f"training shard ({train_loader.shard_size} images); use a smaller batch size")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.optim, steps_per_epoch))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world))
    method = build_method(method_cfg, engine.module)
    table = cost_table(engine.module, cfg.data.image_size)
    seed_all(cfg.seed + 1000 * rank)  # per-rank Gumbel / dropout streams

    ckpt = Checkpointer(cfg.checkpoint.dir, cfg.checkpoint.keep_last)
    state = {"epoch": 0, "step": 0, "run_id": None}
    found = resolve_resume(cfg.resume, cfg.checkpoint.dir)
    if found:
        client = Checkpointer.load(engine, *found)
        method.load_state_dict(client["method"])
        state.update(epoch=client["epoch"], step=client["step"], run_id=client["run_id"])
        if rank < len(client["rng"]):
            set_rng_state(client["rng"][rank])
        if rank == 0:
            log.info("resumed from %s (epoch %d, step %d)", found[0] / found[1], state["epoch"], state["step"])

    tracker = Tracker(cfg.tracking.uri, cfg.tracking.experiment, enabled=rank == 0)
    tags = {"method": str(cfg.method.name), "backbone": str(cfg.model.name),
            "target_rate": str(cfg.method.get("target_rate")), "world_size": str(world)}
    state["run_id"] = tracker.start(state["run_id"], run_name(cfg), tags)
    tracker.log_params(flatten(to_container(cfg)))

    max_steps = cfg.trainer.max_steps if cfg.trainer.max_steps and cfg.trainer.max_steps > 0 else math.inf
    last_ckpt: Path | None = found[0] / found[1] if found else None
    metrics: dict[str, Any] = {}
    images_seen, t_start = 0, time.perf_counter()

    def save() -> Path:
        client = {"epoch": state["epoch"], "step": state["step"], "run_id": state["run_id"],
                  "method": method.state_dict(), "rng": gather_rng(), "config": to_container(cfg)}
        return ckpt.save(engine, state["step"], client)

    for epoch in range(state["epoch"], cfg.trainer.epochs):
        if state["step"] >= max_steps:
            break
        engine.train()
        epoch_start = state["step"]
        bar = progress(cfg, rank, steps_per_epoch, f"epoch {epoch + 1}/{cfg.trainer.epochs}")
        for images, labels in train_loader:
            out = engine(images)
            loss, terms = method.loss(engine.module, images, labels, out)
            engine.backward(loss)
            engine.step()
            state["step"] += 1
            images_seen += images.shape[0] * world
            if state["step"] % cfg.trainer.log_every == 0:
                logged = {f"train/{k}": float(v) for k, v in terms.items() if v.ndim == 0}
                logged["train/loss"] = float(loss.detach())
                logged["train/lr"] = scheduler.get_last_lr()[0]
                tracker.log_metrics(logged, step=state["step"])
            if bar:
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", rate=f"{float(terms['exec_rate']):.2f}")
                bar.update(1)
            if cfg.checkpoint.every_steps and state["step"] % cfg.checkpoint.every_steps == 0:
                last_ckpt = save()
            if state["step"] >= max_steps:
                break
        if bar:
            bar.close()
        if state["step"] - epoch_start == steps_per_epoch:
            state["epoch"] = epoch + 1  # a stop mid-epoch (max_steps) leaves the epoch unfinished
        if (epoch + 1) % cfg.eval.every_epochs == 0 or state["epoch"] >= cfg.trainer.epochs:
            metrics = evaluate(method.eval_model(engine.module), val_loader, table, cfg.eval.execution)
            tracker.log_metrics({f"val/{k}": v for k, v in metrics.items() if not isinstance(v, list)},
                                step=state["step"])
            if rank == 0:
                log.info("epoch %d: top1 %.4f, MACs/image %.4g", epoch + 1, metrics["top1"],
                         metrics["macs_per_image"])
        last_ckpt = save()
    if not metrics:  # nothing left to train (resumed a finished run): evaluate once
        metrics = evaluate(method.eval_model(engine.module), val_loader, table, cfg.eval.execution)
    elapsed = time.perf_counter() - t_start
    tracker.set_tags({"checkpoint": str(last_ckpt)})
    tracker.finish()
    summary = {**metrics, "checkpoint": str(last_ckpt) if last_ckpt else None, "mlflow_run_id": state["run_id"],
               "steps": state["step"], "epochs": state["epoch"], "world_size": world,
               "train_images_per_sec": images_seen / elapsed if elapsed > 0 else 0.0,
               "method": str(cfg.method.name), "model": str(cfg.model.name), "tracking_uri": str(cfg.tracking.uri)}
    return summary


def gather_rng() -> list[dict[str, Any]]:
    """Every rank's RNG state (each rank restores its own)."""
    import torch.distributed as dist

    mine = rng_state()
    if not D.is_dist() or D.world_size() == 1:
        return [mine]
    states: list[Any] = [None] * D.world_size()
    dist.all_gather_object(states, mine)
    return states


def progress(cfg: Any, rank: int, total: int, desc: str):
    if rank != 0 or not cfg.trainer.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def summary_line(summary: dict[str, Any]) -> str:
    return json.dumps(summary, sort_keys=True)
