"""The training loop: Hydra config -> DALI -> dynamic ResNet -> DeepSpeed engine -> checkpoints -> MLflow.

Everything that must survive a restart goes into the checkpoint's client state: epoch/step/batch position,
the DALI reader state of every rank, every rank's RNG streams, the method state (SP-Net teacher, ...) and the
MLflow run id. DeepSpeed restores the module, the optimizer and the LR scheduler it owns.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..config import flatten, to_container
from ..errors import SpnetError
from .. import distributed as D
from . import preempt
from .checkpoint import Checkpointer, resolve_resume, saved_world_size
from ..evaluation.metrics import evaluate
from .malloc import keep_freed_memory
from .rng import rng_state, seed_all, set_rng_state
from .schedule import EpochClock, lr_factor

log = logging.getLogger("spnet.train")
RUN_EVENTS_ENV = "SPNET_RUN_EVENTS"  # set by `spnet submit`'s task: the job's events.jsonl
FAILPOINT_ENV = "SPNET_FAILPOINT"  # test hooks: "kill_after_save:<step>" (SIGKILL every rank), "nan_loss:<step>",
# "nan_weights:<step>" (a NaN weight after that step's update, as a NaN gradient with a finite loss would leave)


@dataclass
class Progress:
    epoch: int = 0           # completed epochs
    step: int = 0            # optimizer steps in total
    batch_in_epoch: int = 0  # optimizer steps done in the current epoch
    run_id: str | None = None


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


def extensions_dir_per_environment() -> None:
    """Build DeepSpeed's JIT ops (the CPU ``deepspeed_shm_comm``) inside this Python environment: in the shared
    ``~/.cache/torch_extensions`` two virtualenvs invalidate each other's build (it records their include paths)
    and rebuild it in turn (~30 s each time). An explicit ``TORCH_EXTENSIONS_DIR`` wins; a read-only environment
    keeps torch's default."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return
    target = Path(sys.prefix) / "torch_extensions"
    try:
        target.mkdir(exist_ok=True)
    except OSError:
        return
    if os.access(target, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(target)


def init_distributed() -> None:
    import deepspeed

    extensions_dir_per_environment()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                         ("MASTER_PORT", str(29500 + os.getpid() % 2000))):
        os.environ.setdefault(key, default)
    if not D.is_dist():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def param_groups(model: torch.nn.Module, no_decay_bn: bool) -> list[dict[str, Any]]:
    """One group (the papers' recipe), or with ``+optim.no_decay_bn=true`` a second one without weight decay for
    1-D parameters (BN scales/shifts, biases)."""
    params = list(model.parameters())
    if not no_decay_bn:
        return [{"params": params}]
    flat = [p for p in params if p.ndim <= 1]
    return [{"params": [p for p in params if p.ndim > 1]}, {"params": flat, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, optim: Any) -> torch.optim.SGD:
    """SGD of ``optim`` (lr, momentum, weight_decay, nesterov, fused, no_decay_bn). ``fused``: one multi-tensor
    kernel per step (CPU and CUDA) instead of torch's per-parameter loop (SP-Net ResNet-50 on CPU under ZeRO-1:
    203 → 151 ms per optimizer step, BENCHMARKS.md)."""
    return torch.optim.SGD(param_groups(model, bool(optim.get("no_decay_bn", False))), lr=optim["lr"],
                           momentum=optim["momentum"], weight_decay=optim["weight_decay"],
                           nesterov=bool(optim.get("nesterov", False)), fused=bool(optim.get("fused", False)) or None)


def run_name(cfg: Any) -> str:
    return cfg.name or f"{cfg.method.name}-{cfg.model.name}-t{cfg.method.get('target_rate', 'na')}"


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (rank 0's checkpoint stores them all)."""
    if not D.is_dist() or D.world_size() == 1:
        return [obj]
    out: list[Any] = [None] * D.world_size()
    dist.all_gather_object(out, obj)
    return out


def state_checksum(state: Any) -> torch.Tensor:
    """Sum and sum of squares of every tensor in a nested state, in float64."""
    parts: list[torch.Tensor] = []

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            parts.append(torch.stack([x.double().sum(), x.double().square().sum()]))
        elif isinstance(x, dict):
            for k in sorted(x):
                visit(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)

    visit(state)
    return torch.cat(parts) if parts else torch.zeros(2, dtype=torch.float64)


def check_in_sync(method: Any, step: int) -> None:
    """Stop with a clear error if replicated method state (SP-Net's EMA teacher) differs between ranks."""
    if not D.is_dist() or D.world_size() == 1:
        return
    mine = state_checksum(method.replicated_tensors()).to(D.comm_device())
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    bad = torch.tensor([0.0 if torch.equal(mine, ref) else 1.0], device=D.comm_device())
    dist.all_reduce(bad)
    if bad.item():
        raise RuntimeError(f"method state (e.g. the EMA teacher) differs between ranks at step {step}: "
                           f"{int(bad.item())} rank(s) drifted from rank 0. The run cannot continue consistently; "
                           "resume from the last checkpoint (resume=auto).")


def global_scalars(terms: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar loss terms averaged over ranks (collective), as ``train/<name>`` floats for logging."""
    names = [k for k, v in terms.items() if v.ndim == 0]
    values = torch.stack([terms[k].detach().double().to(D.comm_device()) for k in names])
    if D.is_dist() and D.world_size() > 1:
        dist.all_reduce(values)
        values /= D.world_size()
    return {f"train/{k}": float(v) for k, v in zip(names, values.tolist())}


def step_flags(loss: torch.Tensor) -> tuple[bool, bool]:
    """(loss finite on every rank, a stop signal reached some rank): one collective and the step's one host sync."""
    bad = (~torch.isfinite(loss.detach())).any().to(device=D.comm_device(), dtype=torch.float32)
    stop = torch.tensor(float(preempt.requested_signal() is not None), device=D.comm_device())
    flags = torch.stack([bad, stop])
    if D.is_dist() and D.world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    any_bad, any_stop = flags.tolist()
    return any_bad == 0.0, any_stop > 0.0


def on_nonfinite(cfg: Any, step: int, loss: torch.Tensor, terms: dict[str, torch.Tensor],
                 last_ckpt: Path | None) -> None:
    """Stop (default) or skip the optimizer update for a non-finite loss; nothing is saved from a bad state."""
    shown = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items() if v.ndim == 0)
    where = _last_good(last_ckpt)
    if cfg.trainer.on_nonfinite == "skip":
        log.warning("non-finite loss at step %d (%s; loss=%s): optimizer update skipped (trainer.on_nonfinite=skip)",
                    step, shown, float(loss))
        return
    raise NonFiniteLossError(
        f"non-finite loss at step {step} on at least one rank (loss={float(loss)}; terms: {shown}); {where} "
        f"(not overwritten). Resume from it with resume=auto after lowering optim.lr or enabling "
        f"deepspeed.gradient_clipping, or set trainer.on_nonfinite=skip to skip such steps")


class NonFiniteLossError(SpnetError):
    """The loss, or the weights about to be saved, became NaN or infinite."""


def _last_good(last_ckpt: Path | None) -> str:
    return f"last good checkpoint: {last_ckpt}" if last_ckpt else "no checkpoint was written yet"


def check_finite_state(model: torch.nn.Module, method: Any, step: int, last_ckpt: Path | None) -> None:
    """Refuse to checkpoint NaN/inf weights (a NaN gradient with a finite loss gets past the loss check): the
    previous checkpoint and ``latest`` stay as they are. One fused norm per tensor list, once per save."""
    for what, tensors in (("model weights", list(model.parameters())),
                          ("method state (e.g. the EMA teacher)", list(method.replicated_tensors()))):
        floating = [t for t in tensors if t.is_floating_point()]
        if floating and not bool(torch.isfinite(torch.stack(torch._foreach_norm(floating))).all()):
            raise NonFiniteLossError(
                f"non-finite {what} at step {step} (a gradient was NaN or infinite although the loss was finite); "
                f"checkpoint not written, {_last_good(last_ckpt)} (not overwritten). Resume from it with resume=auto after lowering "
                f"optim.lr or enabling deepspeed.gradient_clipping")


def failpoint() -> tuple[str, int]:
    """The test hook ``SPNET_FAILPOINT=<kind>:<step>`` as (kind, step); ("", -1) when unset. Read once per run."""
    kind, _, step = os.environ.get(FAILPOINT_ENV, "").partition(":")
    return (kind, int(step)) if step else ("", -1)


def setup_process(cfg: Any) -> tuple[int, int]:
    """Signal handlers, process group, threads and backend switches of this rank; returns (rank, world size)."""
    preempt.install()
    init_distributed()
    rank, world = D.rank(), D.world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(cfg.trainer.threads or max(1, (os.cpu_count() or 1) // local_world))
    # GPU path (CUDA only; CPU runs keep their exact, bitwise-resumable behaviour): cuDNN autotuning
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    elif cfg.trainer.get("cpu_malloc_tuning", True):
        keep_freed_memory()  # CPU: no page faults for the activations every step re-allocates
    return rank, world


def resume_point(cfg: Any, world: int) -> tuple[tuple[Path, str] | None, bool]:
    """The checkpoint to resume from (``cfg.resume``) and whether it was written by as many ranks as this run has;
    refuses a world-size change where the optimizer state is partitioned per rank."""
    found = resolve_resume(cfg.resume, cfg.checkpoint.dir)
    same_world = found is None or saved_world_size(*found) == world
    if found and not same_world and cfg.deepspeed.stage > 0:
        raise ValueError(
            f"checkpoint {found[0] / found[1]} was written by {saved_world_size(*found)} ranks with ZeRO stage "
            f"{cfg.deepspeed.stage} (optimizer state partitioned per rank); this run has {world} ranks. Resume "
            f"with {saved_world_size(*found)} ranks, or convert it with `python -m deepspeed.checkpoint."
            f"ds_to_universal --input_folder {found[0] / found[1]} --output_folder <dir>`; runs with deepspeed=zero0 "
            f"resume on any number of ranks")
    return found, same_world


def restore(cfg: Any, engine: Any, method: Any, found: tuple[Path, str],
            same_world: bool) -> tuple[Progress, dict[str, Any]]:
    """Load engine, method, progress and this rank's RNG streams; returns (progress, client state)."""
    rank, world = D.rank(), D.world_size()
    client = Checkpointer.load(engine, *found)
    method.load_state_dict(client["method"])
    prog = Progress(**client["progress"])
    if same_world:
        set_rng_state(client["rng"][rank])
    else:  # no exact continuation possible: restart the interrupted epoch with fresh streams
        seed_all(cfg.seed + 1000 * rank + prog.step)
        if prog.batch_in_epoch and rank == 0:
            log.warning("world size changed %d -> %d: the DALI reader position is per rank and cannot be "
                        "carried over; epoch %d restarts at its beginning", saved_world_size(*found), world,
                        prog.epoch + 1)
        prog.batch_in_epoch = 0
    if rank == 0:
        log.info("resumed from %s (epoch %d, step %d)", found[0] / found[1], prog.epoch, prog.step)
    return prog, client


def build_loaders(cfg: Any, method: Any, dali_state: Any) -> tuple[Any, Any]:
    """This rank's training loader (restored to ``dali_state`` when given; without the method's held-out images)
    and validation loader."""
    from ..data.loaders import build_loader

    rank, world = D.rank(), D.world_size()
    held_out = method.train_exclusions(Path(cfg.data.root) / "train") if hasattr(method, "train_exclusions") else ()
    train_loader = build_loader(cfg, train=True, shard_id=rank, num_shards=world, checkpoint=dali_state,
                                exclude=held_out)
    if len(train_loader) == 0:
        raise ValueError(f"trainer.batch_size={cfg.trainer.batch_size} x {world} ranks is larger than the "
                         f"training shard ({train_loader.shard_size} images); use a smaller batch size")
    return train_loader, build_loader(cfg, train=False, shard_id=rank, num_shards=world)


def announce_run(run_id: str | None, step: int) -> None:
    """Append ``{"event": "tracking", "mlflow_run_id": ...}`` to ``$SPNET_RUN_EVENTS`` (a SLURM job's events file)
    as soon as the run exists, so `spnet jobs status` names the run while the job is still training."""
    path = os.environ.get(RUN_EVENTS_ENV)
    if not path or not run_id:
        return
    try:
        with open(path, "a") as f:
            f.write(json.dumps({"event": "tracking", "time": time.time(), "mlflow_run_id": run_id,
                                "step": step}) + "\n")
    except OSError as err:
        log.warning("could not record the MLflow run id in %s: %s", path, err)


def train(cfg: Any) -> dict[str, Any]:
    """Run training on this rank; returns the summary (rank 0's is printed by the CLI)."""
    import deepspeed

    from ..methods import build_method, prepare_method_cfg
    from ..models import build_model, cost_table
    from ..tracking.mlflow_tracker import Tracker

    rank, world = setup_process(cfg)
    channels_last = (torch.cuda.is_available() if cfg.trainer.get("channels_last") is None
                     else bool(cfg.trainer.channels_last))
    # deepspeed.bf16_autocast: the engine autocasts the student forward; the method's teacher forward and losses
    # run under the same autocast (the teacher's forward is a quarter of SP-Net's step)
    amp = (functools.partial(torch.autocast, "cuda" if torch.cuda.is_available() else "cpu", dtype=torch.bfloat16)
           if cfg.deepspeed.bf16_autocast else contextlib.nullcontext)
    seed_all(cfg.seed)

    # --- where do we start? (decided before building loaders: the DALI state is per rank)
    ckpt = Checkpointer(cfg.checkpoint.dir, cfg.checkpoint.keep_last)
    found, same_world = resume_point(cfg, world)

    method_cfg = prepare_method_cfg(cfg.method, cfg.model)
    model = build_model(cfg.model, method_cfg)
    optimizer = build_optimizer(model, cfg.optim)
    clock = EpochClock()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, clock))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world))
    method = build_method(method_cfg, engine.module)
    if cfg.trainer.get("compile"):  # after build_method: a deep copy of a compiled module would call the original
        engine.compile()
        if isinstance(getattr(method, "teacher", None), torch.nn.Module):
            method.teacher.compile()
    table = cost_table(engine.module, cfg.data.image_size)
    seed_all(cfg.seed + 1000 * rank)  # per-rank Gumbel / dropout streams

    prog, client = restore(cfg, engine, method, found, same_world) if found else (Progress(), None)

    train_loader, val_loader = build_loaders(cfg, method, client["data"][rank] if client and same_world else None)
    steps_per_epoch = len(train_loader)
    clock.steps_per_epoch = steps_per_epoch
    clock.epochs = prog.epoch + prog.batch_in_epoch / steps_per_epoch
    if not found:  # the first LR was computed before the epoch length was known
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * scheduler.lr_lambdas[0](0)

    tracker = Tracker.from_config(cfg, enabled=rank == 0)
    tags = {"method": str(cfg.method.name), "backbone": str(cfg.model.name),
            "target_rate": str(cfg.method.get("target_rate")), "world_size": str(world)}
    prog.run_id = tracker.start(prog.run_id, run_name(cfg), tags)
    if rank == 0:
        announce_run(prog.run_id, prog.step)
    tracker.log_params(flatten(to_container(cfg)))  # the tracker masks secrets
    run_eval = getattr(method, "evaluate", None) or evaluate

    max_steps = cfg.trainer.max_steps if cfg.trainer.max_steps and cfg.trainer.max_steps > 0 else math.inf
    sync_every = int(cfg.trainer.sync_check_every or 0)
    last_ckpt: Path | None = found[0] / found[1] if found else None
    metrics: dict[str, Any] = {}
    images_seen, t_start, preempted = 0, time.perf_counter(), False
    fail_kind, fail_step = failpoint()

    def save() -> Path:
        check_finite_state(engine.module, method, prog.step, last_ckpt)
        D.average_buffers(engine.module)  # one set of BN statistics, whichever rank's file is read
        state = {"progress": asdict(prog), "method": method.state_dict(), "rng": gather_objects(rng_state()),
                 "data": gather_objects(train_loader.state_dict()["dali"]), "config": to_container(cfg)}
        path = ckpt.save(engine, prog.step, state)
        tracker.log_checkpoint(path, step=prog.step, epoch=prog.epoch)
        if (fail_kind, fail_step) == ("kill_after_save", prog.step):
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    def validate() -> dict[str, Any]:
        D.average_buffers(engine.module)
        m = run_eval(method.eval_model(engine.module), val_loader, table, cfg.eval.execution)
        tracker.log_eval(m, step=prog.step, epoch=prog.epoch, table=table)
        if rank == 0:
            log.info("epoch %d: top1 %.4f, MACs/image %.4g", prog.epoch, m["top1"], m["macs_per_image"])
        return m

    def end_of_epoch() -> None:
        nonlocal metrics, last_ckpt
        prog.epoch += 1
        prog.batch_in_epoch = 0
        if prog.epoch % cfg.eval.every_epochs == 0 or prog.epoch >= cfg.trainer.epochs:
            metrics = validate()
        if last_ckpt is None or last_ckpt.name != f"global_step{prog.step}":
            last_ckpt = save()

    def train_epoch() -> bool:
        """Train until the loader's epoch ends, max_steps, or a stop signal (returns True if stopped)."""
        nonlocal last_ckpt, images_seen
        if hasattr(method, "on_epoch_start"):
            method.on_epoch_start(prog.epoch)
        engine.train()
        bar = progress_bar(cfg, rank, steps_per_epoch, prog.batch_in_epoch,
                           f"epoch {prog.epoch + 1}/{cfg.trainer.epochs}")
        stop = False
        for images, labels in train_loader:  # a restored loader yields only the rest of its epoch
            images = images.to(engine.device, non_blocking=True)  # no-op on CPU and for GPU-decoded batches
            # no copy for DALI's GPU output (HWC, already channels_last) nor for CPU batches (contiguous NCHW)
            images = images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            labels = labels.to(engine.device, non_blocking=True)
            out = engine(images)
            with amp():
                loss, terms = method.loss(engine.module, images, labels, out)
            if (fail_kind, fail_step) == ("nan_loss", prog.step + 1):
                loss = loss * float("nan")
            finite, stop = step_flags(loss)  # a signal arriving after this is seen at the next step
            if finite:
                engine.backward(loss)
            else:
                on_nonfinite(cfg, prog.step + 1, loss, terms, last_ckpt)
            prog.step += 1
            prog.batch_in_epoch += 1
            clock.epochs = prog.epoch + prog.batch_in_epoch / steps_per_epoch
            if finite:
                engine.step()
                if (fail_kind, fail_step) == ("nan_weights", prog.step):  # as a NaN gradient would leave them
                    with torch.no_grad():
                        next(engine.module.parameters()).view(-1)[0] = float("nan")
            images_seen += images.shape[0] * world
            if prog.step % cfg.trainer.log_every == 0:
                logged = global_scalars({"loss": loss.detach(), **terms})
                logged["train/lr"] = scheduler.get_last_lr()[0]
                tracker.log_metrics(logged, step=prog.step, images_seen=images_seen)
            if bar:
                if prog.step % cfg.trainer.log_every == 0:  # the logged floats: no extra host sync per step
                    bar.set_postfix(loss=f"{logged['train/loss']:.3f}",
                                    rate=f"{logged.get('train/exec_rate', float('nan')):.2f}")
                bar.update(1)
            if sync_every and prog.step % sync_every == 0:
                check_in_sync(method, prog.step)
            if stop or (cfg.checkpoint.every_steps and prog.step % cfg.checkpoint.every_steps == 0):
                last_ckpt = save()
            if stop or prog.step >= max_steps:
                break
        if bar:
            bar.close()
        return stop

    while not preempted:
        if prog.batch_in_epoch >= steps_per_epoch:
            end_of_epoch()
            preempted = preempt.should_stop()
        if preempted or prog.epoch >= cfg.trainer.epochs or prog.step >= max_steps:
            break
        preempted = train_epoch()
    if preempted and rank == 0:
        log.warning("stop signal %s: checkpoint %s written at step %d; exiting with code %d (resume=auto "
                    "continues)", preempt.requested_signal(), last_ckpt, prog.step, preempt.EXIT_PREEMPTED)
    if not preempted and (last_ckpt is None or last_ckpt.name != f"global_step{prog.step}"):
        last_ckpt = save()  # stopped mid-epoch by max_steps
    if not metrics and not preempted:  # resumed a finished run, or stopped mid-epoch: evaluate once
        metrics = validate()
    elapsed = time.perf_counter() - t_start
    tracker.log_final(method.eval_model(engine.module), last_ckpt, final=not preempted)
    prog.run_id = tracker.finish("KILLED" if preempted else "FINISHED") or prog.run_id
    return {**metrics, "checkpoint": str(last_ckpt) if last_ckpt else None, "mlflow_run_id": prog.run_id,
            "steps": prog.step, "epochs": prog.epoch, "world_size": world, "preempted": preempted,
            "train_images_per_sec": images_seen / elapsed if elapsed > 0 else 0.0,
            "method": str(cfg.method.name), "model": str(cfg.model.name), "tracking_uri": str(cfg.tracking.uri)}


def progress_bar(cfg: Any, rank: int, total: int, initial: int, desc: str):
    if rank != 0 or not cfg.trainer.progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, mininterval=1.0)
