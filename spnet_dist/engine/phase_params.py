"""Parameters outside the current training phase are left out of the optimizer step.

A method can have parameters that receive no gradient in a phase (RDI-Net's routers during the uniform-sampling
warm-up: the routers do not run). DeepSpeed fills every missing gradient with zeros before the step (ZeRO 0:
``engine._get_gradients_for_reduction``; ZeRO 1/2: the flat gradient partition), and SGD then applies weight decay
and momentum to them anyway: the routers shrink (0.718x their norm after 40 warm-up steps at weight decay 0.01).
``Method.inactive_parameters()`` names such parameters; :func:`excluded_from_step` wraps ``engine.step()`` so that
they and their optimizer state stay bitwise unchanged:

* ZeRO 0 (the engine's optimizer is the torch optimizer): their ``.grad`` is set to None after DeepSpeed's
  all-reduce; torch's SGD skips a parameter without a gradient (no weight decay, no momentum update, no state).
* ZeRO 1/2 (one flat fp32 partition per parameter group): the inactive parameters must form whole parameter groups
  (the trainer gives a method's routers a group of their own, ``Method.router_param_group``); for this one step
  those groups run with lr = weight_decay = momentum = 0, which leaves the partition and its momentum buffer
  bitwise as they were (torch's SGD neither reads nor writes the momentum buffer when momentum is 0). A group
  that mixes inactive and active parameters is refused with one line.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

# the group keys set to "no update" for one step (ZeRO 1/2); nesterov needs momentum > 0 in some torch paths
_NO_UPDATE = {"lr": 0.0, "weight_decay": 0.0, "momentum": 0.0, "dampening": 0.0, "nesterov": False}


def frozen_groups(zero_groups: Sequence[Sequence[torch.nn.Parameter]], params: Sequence[torch.nn.Parameter]
                  ) -> list[int]:
    """Indices of the ZeRO parameter groups made only of ``params``; ValueError for a group that mixes them with
    other parameters (its flat partition cannot be stepped in part)."""
    ids = {id(p) for p in params}
    frozen = []
    for i, group in enumerate(zero_groups):
        inside = [id(p) in ids for p in group]
        if any(inside) and not all(inside):
            raise ValueError(
                f"ZeRO parameter group {i} mixes {sum(inside)} parameters inactive in this phase with "
                f"{len(inside) - sum(inside)} active ones; under ZeRO >= 1 a phase can only leave whole parameter "
                f"groups out of the step (give those parameters a group of their own, or use deepspeed=zero0)")
        if inside and all(inside):
            frozen.append(i)
    return frozen


@contextlib.contextmanager
def excluded_from_step(engine: Any, params: Sequence[torch.nn.Parameter]) -> Iterator[None]:
    """Around ``engine.step()``: ``params`` (and their optimizer state) are not updated by this step."""
    if not params:
        yield
        return
    opt = engine.optimizer
    zero_groups = getattr(opt, "bit16_groups", None)  # DeepSpeed ZeRO 1/2 optimizer
    if zero_groups is None:
        for p in params:  # ZeRO 0: torch's optimizer skips parameters without a gradient
            p.grad = None
        yield
        return
    base = opt.optimizer.param_groups  # index i = ZeRO group i (stage_1_and_2 builds them in this order)
    saved = {i: {k: base[i][k] for k in _NO_UPDATE if k in base[i]} for i in frozen_groups(zero_groups, params)}
    for i in saved:
        base[i].update({k: v for k, v in _NO_UPDATE.items() if k in base[i]})
    try:
        yield
    finally:
        for i, values in saved.items():
            base[i].update(values)
