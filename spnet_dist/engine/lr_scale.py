"""Scale rules for the learning rate (``optim.lr_reference_batch``, ``optim.recipe_global_batch``).

``optim.lr`` is the rate of a reference GLOBAL batch when ``optim.lr_reference_batch`` is set: the rate used is
``lr × global batch / reference`` (the linear scaling rule, Goyal et al. 2017, "Accurate, Large Minibatch SGD").
Without it the lr is used as given; a schedule preset that declares its source's global batch
(``optim.recipe_global_batch``) then gets a one-line warning when the run's global batch differs.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("spnet.train")


def scaled_lr(optim: Any, global_batch: int) -> float:
    """The base lr this run uses: ``optim.lr``, × global batch / ``optim.lr_reference_batch`` when that is set."""
    ref = optim.get("lr_reference_batch")
    lr = float(optim.lr)
    return lr * global_batch / float(ref) if ref else lr


def lr_note(optim: Any, global_batch: int, per_rank: int, world: int) -> tuple[str, str] | None:
    """(level, one line) about the lr scaling of this run, or None when there is nothing to say."""
    ref, recipe = optim.get("lr_reference_batch"), optim.get("recipe_global_batch")
    shown = f"global batch {global_batch} ({world} ranks x {per_rank})"
    if ref:
        return "info", (f"lr scaled linearly: optim.lr {float(optim.lr):g} x {shown} / optim.lr_reference_batch "
                        f"{int(ref)} = {scaled_lr(optim, global_batch):g}")
    if recipe and int(recipe) != global_batch:
        return "warning", (f"{shown} differs from the recipe's global batch {int(recipe)} and optim.lr="
                           f"{float(optim.lr):g} is used as given; set optim.lr_reference_batch={int(recipe)} to "
                           f"scale it linearly (lr {float(optim.lr) * global_batch / int(recipe):g}), or use "
                           f"{int(recipe)} images per step")
    return None


def announce_lr(optim: Any, global_batch: int, per_rank: int, world: int, rank: int) -> float:
    """Log the scaling note on rank 0 and return the base lr to use."""
    note = lr_note(optim, global_batch, per_rank, world)
    if note and rank == 0:
        getattr(log, note[0])(note[1])
    return scaled_lr(optim, global_batch)
