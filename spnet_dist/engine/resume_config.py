"""What a resume may change: the new config against the one the checkpoint was trained with.

Three kinds of keys:

* **safe** (``SAFE``): the learning rate and its schedule, the optimizer's momentum and weight decay, epochs and
  max_steps, evaluation / logging / checkpoint cadence, tracking, where the data lives and how it is read, the
  run's name. They apply from the resume step on; the change is announced in one line and recorded in MLflow.
* **structural** (``STRUCTURAL``): the network's shape and what the optimizer state is laid out for (``model.*``,
  ZeRO stage, parameter groups). The checkpoint cannot be loaded into anything else: a new run is the only way.
* everything else (the method and its targets, the per-rank batch, ``model.sync_bn``, the seed, the image size, keys
  this module does not know): it changes what is being trained, so it is refused unless listed in
  ``resume_allow=[key, ...]``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError, flatten, to_container

SAFE = ("optim.lr", "optim.milestones", "optim.gamma", "optim.warmup_epochs", "optim.momentum",
        "optim.weight_decay", "optim.nesterov", "optim.fused", "trainer.epochs", "trainer.max_steps",
        "trainer.nprocs", "trainer.threads", "trainer.log_every", "trainer.progress", "trainer.on_nonfinite",
        "trainer.sync_check_every", "trainer.channels_last", "trainer.cpu_malloc_tuning", "trainer.compile",
        "trainer.collective_timeout_s", "checkpoint.", "eval.", "tracking.", "data.root", "data.backend",
        "data.decode", "data.on_corrupt", "data.scan", "data.num_threads", "data.val_resize", "data.workers",
        "deepspeed.gradient_clipping", "deepspeed.bf16_autocast", "model.pretrained", "name", "resume",
        "resume_allow", "required", "optim.grad_clamp", "optim.lr_reference_batch", "optim.recipe_global_batch")
# model.* keys that do not change the network or its state dict: refused unless in resume_allow (like the batch)
NOT_STRUCTURAL = ("model.sync_bn",)
STRUCTURAL = ("model.", "deepspeed.stage", "optim.no_decay_bn", "optim.router_lr_mult")
UNSET = "<unset>"


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every leaf that differs; keys the old config lacks (added to the code
    since the checkpoint was written) are not changes."""
    a, b = flatten(old), flatten(new)
    return [(k, a[k], b.get(k, UNSET)) for k in sorted(a) if b.get(k, UNSET) != a[k]]


def show(changes: list[tuple[str, Any, Any]]) -> str:
    return "; ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes)


def check_resume_config(cfg: Any, saved: dict[str, Any] | None, where: Path) -> list[tuple[str, Any, Any]]:
    """The safe changes of resuming ``where`` (trained with ``saved``) with ``cfg``; a ConfigError naming every
    other changed key with both values and the way out. ``saved`` None (a checkpoint from before the config was
    recorded in its marker): nothing to compare."""
    if not saved:
        return []
    changes = config_changes(saved, to_container(cfg))
    allowed = {str(k) for k in (cfg.get("resume_allow") or [])}
    structural = [c for c in changes if _matches(c[0], STRUCTURAL) and not _matches(c[0], SAFE + NOT_STRUCTURAL)]
    refused = [c for c in changes if not _matches(c[0], SAFE) and c not in structural and c[0] not in allowed]
    if structural:
        raise ConfigError(
            f"resume: checkpoint {where} cannot continue with these changes: {show(structural + refused)}. "
            f"The checkpoint holds a network and optimizer state of the old {', '.join(k for k, _, _ in structural)}; "
            f"start a new run instead (another checkpoint.dir, or resume=none; model.pretrained={where} starts "
            f"it from this checkpoint's backbone), or drop the change to continue")
    if refused:
        keys = ",".join(k for k, _, _ in refused)
        raise ConfigError(
            f"resume: checkpoint {where} was trained with other settings: {show(refused)}. These change what is "
            f"being trained; drop them to continue, start a new run (another checkpoint.dir, or resume=none), or "
            f"continue with them deliberately: add resume_allow=[{keys}]")
    return [c for c in changes if c[0] not in ("resume", "resume_allow")]
