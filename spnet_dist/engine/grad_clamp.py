"""``optim.grad_clamp``: SP-Net's official CIFAR gradient operation (spec methods.md §5.e, ``code/train_cifar.py``):
after the backward pass every gradient element is clamped to [-b, b] before the optimizer step. It is NOT a norm
clip (``deepspeed.gradient_clipping`` rescales the whole gradient vector; this changes only the elements outside
the bound).

Installed as a step pre-hook of the torch optimizer, so it sees the gradients the step itself uses: under ZeRO-0
the parameters' all-reduced ``.grad``, under ZeRO-1/2 the flat fp32 partitions DeepSpeed hands to the same
optimizer object (an element-wise clamp does not care about the flattening). The clamp precedes what SGD adds
inside its step (weight decay, momentum), as ``clamp_`` before ``optimizer.step()`` does in the official code.
"""
from __future__ import annotations

from typing import Any

import torch


def clamp_gradients(optimizer: torch.optim.Optimizer, bound: float) -> None:
    """Clamp every gradient element of ``optimizer``'s parameters to [-bound, bound], in place."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    for g in grads:
        g.clamp_(-bound, bound)


def install_grad_clamp(optimizer: torch.optim.Optimizer, bound: float | None) -> Any:
    """Clamp before every ``optimizer.step()`` (bound None: nothing installed); returns the hook handle or None."""
    if bound is None:
        return None
    bound = float(bound)
    if not bound > 0:
        raise ValueError(f"optim.grad_clamp={bound} must be > 0 (null: off)")
    return optimizer.register_step_pre_hook(lambda opt, args, kwargs: clamp_gradients(opt, bound))
