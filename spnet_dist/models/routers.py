"""Per-block routers (gates). Each maps a block input B×C×H×W to raw logits B×options.

Index 1 = "execute", index 0 = "skip" (AIG / SP-Net convention).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


def _bn(bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm that tolerates batch size 1 in training.

    After global pooling a batch of 1 has a single value per channel, which PyTorch refuses to
    normalise in training. Choice: such batches use the running statistics (as in eval) and do
    not update them; every other batch is the ordinary training BN.
    """
    if bn.training and x.shape[0] == 1:
        return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return bn(x)


def _init_bias(linear: nn.Module, bias_init: tuple[float, ...] | list[float], options: int) -> None:
    if len(bias_init) != options:
        raise ValueError(f"router bias_init has {len(bias_init)} values, expected one per option ({options})")
    with torch.no_grad():
        linear.bias.copy_(torch.tensor([float(b) for b in bias_init]))


class SPNetRouter(nn.Module):
    """SP-Net router: GAP → Linear(C→hidden) → BN1d → ReLU → Dropout → Linear(hidden→options).

    Last bias initialised to ``bias_init`` (≈87% open at start); weights use the PyTorch default init.
    """

    def __init__(self, c_in: int, hidden: int = 128, dropout: float = 0.4,
                 bias_init: tuple[float, ...] = (0.1, 2.0), options: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c_in, hidden)
        self.bn = nn.BatchNorm1d(hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, options)
        _init_bias(self.fc2, bias_init, options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))
        return self.fc2(self.drop(F.relu(_bn(self.bn, h))))


class AIGGate(nn.Module):
    """ConvNet-AIG gate: GAP → 1×1 conv(C→hidden, bias) → BN2d → ReLU → 1×1 conv(hidden→options).

    Last conv: weight N(0, 0.001), bias ``bias_init``.
    """

    def __init__(self, c_in: int, hidden: int = 16, bias_init: tuple[float, ...] = (0.1, 2.0),
                 options: int = 2) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c_in, hidden, 1, bias=True)
        self.bn = nn.BatchNorm2d(hidden)
        self.fc2 = nn.Conv2d(hidden, options, 1, bias=True)
        nn.init.normal_(self.fc2.weight, 0.0, 0.001)
        _init_bias(self.fc2, bias_init, options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(_bn(self.bn, self.fc1(F.adaptive_avg_pool2d(x, 1))))
        return torch.flatten(self.fc2(h), 1)


ROUTERS: dict[str, Callable[..., nn.Module]] = {"spnet": SPNetRouter, "aig": AIGGate}
# keys of the method's `router` mapping that configure the model, not the router module
MODEL_LEVEL_KEYS = ("type", "tau", "eval_noise")


def register_router(name: str) -> Callable:
    """Decorator adding a router class to ``ROUTERS`` (constructor signature ``(c_in, **hparams)``)."""
    def deco(cls: Callable) -> Callable:
        ROUTERS[name] = cls
        return cls
    return deco


def build_router(cfg: Mapping[str, Any], c_in: int) -> nn.Module | None:
    """Build a router from ``cfg`` (``type`` plus optional hyper-parameters). ``type: none`` → None."""
    rtype = str(cfg.get("type", "spnet")).lower()
    if rtype == "none":
        return None
    if rtype not in ROUTERS:
        raise ValueError(f"unknown router type {rtype!r}; valid: {sorted(ROUTERS) + ['none']}")
    kwargs = {k: (tuple(v) if k == "bias_init" else v) for k, v in cfg.items()
              if k not in MODEL_LEVEL_KEYS and v is not None}
    try:
        return ROUTERS[rtype](c_in, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad hyper-parameters {sorted(kwargs)} for router type {rtype!r}: {e}") from e
