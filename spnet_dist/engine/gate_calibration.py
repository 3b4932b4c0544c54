"""Gate calibration (opt-in, ``eval.gate_calibration_batches`` > 0): before every evaluation, shift each gated
router's *execute* logit so that its deterministic (argmax) gate executes the target fraction of training images.

Why: training constrains the Gumbel-*sampled* rate, E σ(m) with m = l_execute − l_skip, while argmax evaluation
executes E 1[m > 0]; routers that learn near-constant margins (typical when fine-tuning from a static network) then
execute ≈ all (t > 0.5) or ≈ none (t < 0.5) at evaluation, whatever their training rate. The offset is the
(1 − t) quantile of the margins, found block by block in network order (a shift changes what later routers see),
averaged over ranks, and applied only in eval mode: training, its losses and the papers' objective are unchanged.
The calibration images are a seeded sample of training images under the *evaluation* transform
(``eval.gate_calibration_transform: eval``, the default), i.e. the images as evaluation sees them; ``train`` uses
augmented batches instead. ``eval.gate_calibration_heldout`` (a fraction or count, 0 by default) calibrates on
training images kept out of training instead: routers skip memorised images more readily than unseen ones, so on a
small training set the rate on unseen images runs above the target (measured in the README's study section).
Routers that give most images one margin are handled in ``calibrate_gates``.
Measured on a small real image set (issue note of the cost–accuracy study): eval rates within about ±0.05 of
t = 0.3 / 0.5 / 0.7 where uncalibrated argmax gave 0.15 / 0.96 / 0.96. The offsets are this hook's state (saved in
every checkpoint, restored on resume, applied by ``spnet eval``).
"""
from __future__ import annotations

from itertools import islice
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from .. import distributed as D
from .hook import Hook


def set_offsets(model: torch.nn.Module, offsets: list[float]) -> None:
    """Put per-block execute-logit offsets on the blocks of ``model`` (0 for ungated blocks)."""
    from ..methods.base import unwrap_model

    for blk, off in zip(unwrap_model(model).blocks(), offsets):
        blk.gate_offset = float(off)


STUCK_TOLERANCE = 0.05  # a block whose argmax rate stays this far from its target cannot be split by a threshold


def _global_mean(value: float) -> float:
    if not D.multi_rank():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=D.comm_device())
    dist.all_reduce(t)
    return float(t) / D.world_size()


def _fit_block(net: torch.nn.Module, blk: torch.nn.Module, batches: Callable[[], Iterable[Any]], num_batches: int,
               target: float, device: torch.device) -> tuple[float, float]:
    """(offset, the argmax rate it gives on these images): the offset is minus the (1 − target) quantile of the
    block's margins, averaged over ranks."""
    margins: list[torch.Tensor] = []
    handle = blk.router.register_forward_hook(
        lambda mod, inp, out: margins.append((out[:, 1] - out[:, 0]).float().cpu()))
    try:
        for images, _ in islice(batches(), num_batches):
            net(images.to(device, non_blocking=True))
    finally:
        handle.remove()
    m = torch.cat(margins)
    offset = -_global_mean(float(torch.quantile(m, 1.0 - target)))
    return offset, _global_mean(float((m + offset > 0).float().mean()))  # a tie (margin = -offset) skips


@torch.no_grad()
def calibrate_gates(model: torch.nn.Module, batches: Callable[[], Iterable[Any]], targets: list[float],
                    num_batches: int) -> list[float]:
    """Offsets that make each gated block's argmax gate execute ``targets[i]`` of the images of ``batches()`` (a
    fresh, identical pass per block); blocks with target 1 or without router get 0. Returns the offsets, which are
    also set on the model.

    A router whose margin is the same for most images (e.g. its hidden units inactive on them) cannot be split at
    its target by any threshold: it runs almost none or almost all of them. Such *stuck* blocks keep their offset,
    and a second pass refits the others to targets shifted by the stuck blocks' mean shortfall (clipped to [0, 1]),
    so that the network's execution rate stays at the mean target."""
    from ..methods.base import unwrap_model

    net = unwrap_model(model)
    blocks = list(net.blocks())
    offsets = [0.0] * len(blocks)
    set_offsets(net, offsets)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    gated = [i for i, (blk, t) in enumerate(zip(blocks, targets))
             if blk.router is not None and t < 1.0 and getattr(net, "num_options", 2) == 2]
    try:
        achieved = {}
        for i in gated:
            offsets[i], achieved[i] = _fit_block(net, blocks[i], batches, num_batches, targets[i], device)
            blocks[i].gate_offset = offsets[i]
        stuck = [i for i in gated if abs(achieved[i] - targets[i]) > STUCK_TOLERANCE]
        free = [i for i in gated if i not in stuck]
        if stuck and free:
            shift = sum(targets[i] - achieved[i] for i in stuck) / len(free)
            for i in free:
                target = min(max(targets[i] + shift, 0.0), 1.0)
                offsets[i], _ = _fit_block(net, blocks[i], batches, num_batches, target, device)
                blocks[i].gate_offset = offsets[i]
    finally:
        net.train(was_training)
    return offsets


class GateCalibration(Hook):
    """Calibrates the gates before every evaluation; its offsets survive a restart."""

    name = "gate_calibration"

    def __init__(self, num_batches: int, transform: str = "eval") -> None:
        self.num_batches = num_batches
        self.transform = transform
        self.offsets: list[float] | None = None

    def before_train(self, loop: Any) -> None:
        if self.offsets is not None:  # restored: evaluate as the checkpointed run did
            set_offsets(loop.engine.module, self.offsets)

    def before_eval(self, loop: Any) -> None:
        targets = loop.method.gate_targets()
        if targets is None:
            return
        seed = loop.cfg.seed + 7907 * (loop.progress.step + 1)
        heldout = bool(loop.cfg.eval.get("gate_calibration_heldout", 0))

        def batches() -> Iterable[Any]:
            if self.transform == "eval":  # the images as evaluation sees them (no augmentation)
                limit = self.num_batches * int(loop.cfg.trainer.batch_size) * loop.world
                loader = loop.train_batches(seed, eval_transform=True, limit=limit, heldout=heldout)
            else:
                loader = loop.train_batches(seed, heldout=heldout)
            try:
                yield from loader
            finally:
                getattr(loader, "release", lambda: None)()

        self.offsets = calibrate_gates(loop.method.eval_model(loop.engine.module), batches, targets,
                                       self.num_batches)

    def state_dict(self) -> dict[str, Any]:
        return {"offsets": self.offsets}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.offsets = state.get("offsets")
