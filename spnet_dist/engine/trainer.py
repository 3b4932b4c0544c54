"""``train(cfg)``: Hydra config -> loaders -> dynamic ResNet -> DeepSpeed engine -> the loop with its hooks.

Everything that must survive a restart goes into the checkpoint's client state (``hooks.Checkpointing``):
epoch/step/batch position, the loader state of every rank, every rank's RNG streams, the method state (SP-Net
teacher, ...), every hook's state and the MLflow run id. DeepSpeed restores the module and the optimizer.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from .. import distributed as D
from ..errors import SpnetError
from .checkpoint import Checkpointer, resolve_resume, saved_config, saved_world_size
from .hook import Hook
from .loop import Progress, TrainLoop
from .resume_config import check_resume_config
from .rng import seed_all, set_rng_state
from .setup import build_optimizer, deepspeed_config, setup_process, with_method_clamp
from .sync_bn import convert_sync_bn

log = logging.getLogger("spnet.train")


def resume_point(cfg: Any, world: int, skip: Sequence[str] = (), verify: bool = True
                 ) -> tuple[tuple[Path, str] | None, bool]:
    """The checkpoint to resume from (``cfg.resume``; rank 0 checks it — with ``verify`` also the content hashes —
    and decides for every rank) and whether it was written by as many ranks as this run has; refuses a world-size
    change where the optimizer state is partitioned per rank."""
    decision: Any = None
    if D.rank() == 0:
        try:
            decision = resolve_resume(cfg.resume, cfg.checkpoint.dir, verify, quiet=not verify, skip=skip)
        except (ValueError, FileNotFoundError) as err:
            decision = err
    found = D.gather_objects(decision)[0]
    if isinstance(found, Exception):
        raise found
    same_world = found is None or saved_world_size(*found) == world
    if found and not same_world and cfg.deepspeed.stage > 0:
        raise ValueError(
            f"checkpoint {found[0] / found[1]} was written by {saved_world_size(*found)} ranks with ZeRO stage "
            f"{cfg.deepspeed.stage} (optimizer state partitioned per rank); this run has {world} ranks. Resume "
            f"with {saved_world_size(*found)} ranks, or convert it with `python -m deepspeed.checkpoint."
            f"ds_to_universal --input_folder {found[0] / found[1]} --output_folder <dir>`; runs with deepspeed=zero0 "
            f"resume on any number of ranks")
    return found, same_world


def load_resumable(cfg: Any, engine: Any, world: int) -> tuple[tuple[Path, str] | None, bool, dict[str, Any] | None]:
    """Load the checkpoint ``resume_point`` picks into ``engine``: (found, same world, client state). A tag that
    passes the checks but cannot be loaded on some rank is passed over with one line under ``resume=auto``
    (an explicit ``resume=`` stops with one line); a traceback never ends a resume."""
    failed: list[str] = []
    while True:
        found, same_world = resume_point(cfg, world, failed)
        if found is None:
            if failed:
                raise SpnetError(f"resume=auto: no checkpoint in {cfg.checkpoint.dir} could be loaded (tried "
                                 f"{', '.join(failed)}); move them away and rerun, or start fresh with resume=none")
            return None, same_world, None
        client: dict[str, Any] | None = None
        try:
            client = Checkpointer.load(engine, *found)
            error = None
        except Exception as err:  # noqa: BLE001 - any unreadable file: UnpicklingError, RuntimeError, KeyError...
            error = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        error = D.first_error(error)
        if error is None:
            return found, same_world, client
        if str(cfg.resume) != "auto":
            raise SpnetError(f"resume={cfg.resume}: checkpoint {found[0] / found[1]} could not be loaded ({error}); "
                             f"use resume=auto to take the newest loadable one")
        if D.rank() == 0:
            log.warning("resume=auto: skipping checkpoint %s: it could not be loaded (%s)", found[0] / found[1], error)
        failed.append(found[1])


def restore(cfg: Any, method: Any, found: tuple[Path, str], client: dict[str, Any],
            same_world: bool) -> Progress:
    """Restore method, progress and this rank's RNG streams from the loaded client state."""
    rank, world = D.rank(), D.world_size()
    method.load_state_dict(client["method"])
    prog = Progress(**client["progress"])
    if same_world:
        set_rng_state(client["rng"][rank])
    else:  # no exact continuation possible: restart the interrupted epoch with fresh streams
        seed_all(cfg.seed + 1000 * rank + prog.step)
        if prog.batch_in_epoch and rank == 0:
            log.warning("world size changed %d -> %d: the loader position is per rank and cannot be "
                        "carried over; epoch %d restarts at its beginning", saved_world_size(*found), world,
                        prog.epoch + 1)
        prog.batch_in_epoch = 0
    if rank == 0:
        log.info("resumed from %s (epoch %d, step %d)", found[0] / found[1], prog.epoch, prog.step)
    return prog


def build_loaders(cfg: Any, method: Any, plan: Any, state: dict[str, Any] | None = None) -> tuple[Any, Any, Any]:
    """This rank's training loader (restored to the loader ``state`` when given; without the method's held-out
    images and the gate calibration's), validation loader, and the training file list, all read from ``plan`` (the
    start's ``DataPlan``)."""
    from ..data.heldout import calibration_heldout
    from ..data.loader import build_loader

    rank, world = D.rank(), D.world_size()
    held_out = set(method.train_exclusions(plan.train.files)) | set(calibration_heldout(cfg, plan.train.files))
    files = [f for f in plan.train.files if f not in held_out] if held_out else None
    train_loader = build_loader(cfg, plan, train=True, shard_id=rank, num_shards=world, state=state, files=files)
    if len(train_loader) == 0:
        raise ValueError(f"trainer.batch_size={cfg.trainer.batch_size} x {world} ranks is larger than the "
                         f"training shard ({train_loader.shard_size} images); use a smaller batch size")
    return train_loader, build_loader(cfg, plan, train=False, shard_id=rank, num_shards=world), files


def fresh_train_pass(cfg: Any, plan: Any, files: Any) -> Any:
    """``(seed, eval_transform=False, limit=None, heldout=False) -> loader``: a new pass over this rank's training
    files (PreciseBN, gate calibration), independent of the training loader's position. ``eval_transform``: the
    evaluation transform on a seeded random sample of ``limit`` training files (all of them without a limit), in
    that sample's order; ``heldout``: a pass over the files ``eval.gate_calibration_heldout`` kept out of training
    instead."""
    import random

    from omegaconf import OmegaConf

    from ..data.heldout import calibration_heldout
    from ..data.loader import build_loader

    held = calibration_heldout(cfg, plan.train.files)  # once: calibration asks for a pass per gated block

    def make(seed: int, eval_transform: bool = False, limit: int | None = None, heldout: bool = False) -> Any:
        seeded = OmegaConf.merge(cfg, {"seed": int(seed)})
        pool = held if heldout else files
        if not eval_transform:
            return build_loader(seeded, plan, train=True, shard_id=D.rank(), num_shards=D.world_size(), files=pool)
        pool = list(plan.train.files if pool is None else pool)
        sample = random.Random(seed).sample(pool, min(limit or len(pool), len(pool)))
        return build_loader(seeded, plan, train=False, shard_id=D.rank(), num_shards=D.world_size(), files=sample,
                            split="train")

    return make


def train(cfg: Any, hooks: Sequence[Hook] = (), plan: Any = None) -> dict[str, Any]:
    """Run training on this rank with the standard hooks plus ``hooks`` (e.g. a SLURM task's events file) on the
    files of ``plan`` (the start's pre-flight ``DataPlan``; made once here when not given); returns the summary
    (rank 0's is printed by the CLI)."""
    import deepspeed

    from ..data.preflight import plan_data, resolve_num_classes
    from ..methods import build_method
    from ..methods.base import method_class
    from ..methods.build import build_from_config
    from ..models import cost_table
    from ..tracking.tracker import Tracker
    from .hooks import standard_hooks

    rank, world = setup_process(cfg)
    seed_all(cfg.seed)
    early, _ = resume_point(cfg, world, verify=False)  # refusals (world size, changed settings): before any model
    if early:
        check_resume_config(cfg, saved_config(*early), early[0] / early[1])

    plan = plan if plan is not None else plan_data(cfg, world)
    resolve_num_classes(cfg, plan)  # model.num_classes=auto: a no-op after the pre-flight, which wrote the number
    model, method_cfg = build_from_config(cfg.model, cfg.method)
    model = convert_sync_bn(model, bool(cfg.model.get("sync_bn", False)), world)  # before optimizer and teacher
    optimizer = build_optimizer(model, with_method_clamp(cfg.optim, method_cfg),
                                router_group=method_class(method_cfg).router_param_group)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, world))
    method = build_method(method_cfg, engine.module)
    if cfg.trainer.get("compile"):  # after build_method: a deep copy of a compiled module would call the original
        engine.compile()
        if isinstance(getattr(method, "teacher", None), torch.nn.Module):
            method.teacher.compile()
    table = cost_table(engine.module, cfg.data.image_size)
    seed_all(cfg.seed + 1000 * rank)  # per-rank Gumbel / dropout streams

    found, same_world, client = load_resumable(cfg, engine, world)  # before the loaders: their state is per rank
    prog = restore(cfg, method, found, client, same_world) if found else Progress()
    changes = check_resume_config(cfg, client.get("config"), found[0] / found[1]) if found else []
    state = client["data"][rank] if client and same_world else None
    state = {"dali": state} if isinstance(state, str) else state  # checkpoints before the loader protocol
    train_loader, val_loader, train_files = build_loaders(cfg, method, plan, state)
    ckpt = Checkpointer(cfg.checkpoint.dir, cfg.checkpoint.keep_last)
    loop = TrainLoop(cfg, engine, method, table, train_loader, val_loader, prog,
                     Tracker.from_config(cfg, enabled=rank == 0), [*standard_hooks(cfg, optimizer, ckpt), *hooks],
                     last_ckpt=found[0] / found[1] if found else None,
                     train_batches=fresh_train_pass(cfg, plan, train_files))
    loop.config_changes = changes  # announced and recorded by the Tracking hook
    loop.load_hook_states(client.get("hooks") if client else None)
    loop.run()
    return loop.summary()
