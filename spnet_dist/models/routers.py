"""Per-block routers (gates). Each maps a block input B×C×H×W to raw logits B×options.

Index 1 = "execute", index 0 = "skip" (AIG / SP-Net convention). RDI-Net's relational router has 3 options
(0 = skip, 1 = light, 2 = full) and also reads the features of the preceding routers (``context``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lean_ops import global_avg_pool


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
        h = self.fc1(global_avg_pool(x))
        return self.fc2(self.drop(F.relu(_bn(self.bn, h))))


AIG_INITS = ("official", "he_fan_out", "pytorch")


class AIGGate(nn.Module):
    """ConvNet-AIG gate: GAP → 1×1 conv(C→hidden, bias) → BN2d → ReLU → 1×1 conv(hidden→options).

    Init (``init_weights``, run again by ``DynamicResNet`` once the gates are attached, after the backbone init):
    ``init="official"`` (default; spec §2.b, official ``convnet_aig.py``): ImageNet models — fc1 weight
    N(0, √(2/(k·k·C_out))) = N(0, √(2/16)) from the official init loop over every Conv2d, fc1 bias PyTorch's
    default U(±1/√C_in) (the loop leaves conv biases alone); CIFAR models — fc1 PyTorch's default (the official
    ``ResNet_cifar`` loop only touches fc2). Always: fc2 weight N(0, 0.001), fc2 bias ``bias_init``; BN γ = 1, β = 0.
    ``he_fan_out``: the ImageNet fc1 rule for every stem; ``pytorch``: PyTorch's default fc1 for every stem.
    """

    def __init__(self, c_in: int, hidden: int = 16, bias_init: tuple[float, ...] = (0.1, 2.0),
                 options: int = 2, init: str = "official") -> None:
        super().__init__()
        if init not in AIG_INITS:
            raise ValueError(f"unknown AIG gate init {init!r}; valid: {list(AIG_INITS)}")
        self.init, self.bias_init, self.options = init, tuple(bias_init), options
        self.fc1 = nn.Conv2d(c_in, hidden, 1, bias=True)
        self.bn = nn.BatchNorm2d(hidden)
        self.fc2 = nn.Conv2d(hidden, options, 1, bias=True)
        self.init_weights()

    def init_weights(self, stem: str = "imagenet") -> None:
        """The gate's init for a model with this ``stem`` ("imagenet" | "cifar"); see the class docstring."""
        he = self.init == "he_fan_out" or (self.init == "official" and stem != "cifar")
        if he:
            k = self.fc1.kernel_size[0] * self.fc1.kernel_size[1] * self.fc1.out_channels
            nn.init.normal_(self.fc1.weight, 0.0, math.sqrt(2.0 / k))
            bound = 1.0 / math.sqrt(self.fc1.in_channels * self.fc1.kernel_size[0] * self.fc1.kernel_size[1])
            nn.init.uniform_(self.fc1.bias, -bound, bound)  # PyTorch's default conv bias, kept by the official loop
        else:
            self.fc1.reset_parameters()
        self.bn.reset_parameters()
        nn.init.normal_(self.fc2.weight, 0.0, 0.001)
        _init_bias(self.fc2, self.bias_init, self.options)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(_bn(self.bn, self.fc1(global_avg_pool(x)[:, :, None, None])))
        return torch.flatten(self.fc2(h), 1)


def init_routers(routers: Iterable[nn.Module | None], stem: str) -> None:
    """Explicit gate-init step after the routers are attached (the backbone init has run before them): every
    router with an ``init_weights(stem)`` method (ConvNet-AIG's) gets its official init for that stem."""
    for r in routers:
        if r is not None and hasattr(r, "init_weights"):
            r.init_weights(stem)


def relation_adjacency(r: int, gamma: float) -> torch.Tensor:
    """RDI-Net router-wise relation graph, paper Eq. 4: (r+1)×(r+1), A[m, n] = γ^(n−m) for n ≥ m, else 0.

    Nodes are ordered (s_{n−r}, …, s_{n−1}, s̃_n); A[m, n] is the effect of router m on router n, so the
    current node (index r) aggregates column r: Σ_m A[m, r]·S_m = Σ_k γ^k·S_{r−k} (Eq. 7 read with the effect
    matrix transposed — the literal row r of A would be (0, …, 0, 1), i.e. no relation at all).
    """
    if r < 0 or not 0.0 <= gamma <= 1.0:
        raise ValueError(f"need r >= 0 and gamma in [0, 1], got r={r}, gamma={gamma}")
    idx = torch.arange(r + 1, dtype=torch.float64)
    diff = idx.view(1, -1) - idx.view(-1, 1)  # n − m
    return torch.where(diff >= 0, torch.full_like(diff, float(gamma)) ** diff.clamp(min=0), torch.zeros_like(diff))


class RelationalRouter(nn.Module):
    """RDI-Net relational router (paper Eq. 5–8, spec §4.b), options 0 = skip, 1 = light, 2 = full.

    ŝ_n = GAP(x_n); s̃_n = ReLU(BN(FC_{C→d}(ŝ_n)))  (Eq. 6, BN as in the official code);
    s_n = ReLU( (Σ_{k=0}^{r'} γ^k · S_{n−k}) · W¹_n )  with S_n = s̃_n and S_{n−k} = s_{n−k} the propagated features
    of the r' = min(r, n−1) preceding routers (Eq. 4/7; the graph is truncated for the first blocks);
    logits = Dropout(FC_{d→options}(s_n))  (dropout on the logits as in the official code; training only).

    ``context`` is the list of the preceding routers' s (oldest first) of the current forward; the router appends its
    own s_n to it (not detached: gradients flow along the router chain). ``context=None`` = no relations (γ = 0).
    """

    def __init__(self, c_in: int, d: int = 256, r: int = 2, gamma: float = 0.5, dropout: float = 0.4,
                 options: int = 3, bias_init: tuple[float, ...] | list[float] | None = None) -> None:
        super().__init__()
        if d <= 0:
            raise ValueError(f"router feature dimension d must be positive, got {d}")
        self.r, self.gamma = int(r), float(gamma)
        col = relation_adjacency(self.r, self.gamma)[:, self.r].flip(0)  # [γ^0, γ^1, ..., γ^r] by distance
        self.register_buffer("decay", col.float(), persistent=False)
        self.fc1 = nn.Linear(c_in, d)
        self.bn = nn.BatchNorm1d(d)
        self.gcn = nn.Linear(d, d, bias=False)  # W¹_n of Eq. 7
        self.fc2 = nn.Linear(d, options)
        self.drop = nn.Dropout(dropout)
        if bias_init is not None:
            _init_bias(self.fc2, bias_init, options)

    def aggregate(self, current: torch.Tensor, context: list[torch.Tensor] | None) -> torch.Tensor:
        """Σ_k γ^k · S_{n−k}: the current node plus the r most recent entries of ``context``."""
        prev = list(context[-self.r:]) if (context and self.r > 0) else []
        nodes = [current] + prev[::-1]  # distance 0, 1, 2, ...
        w = self.decay.to(current.dtype)
        out = nodes[0] * w[0]
        for k in range(1, len(nodes)):
            out = out + w[k] * nodes[k]
        return out

    def forward(self, x: torch.Tensor, context: list[torch.Tensor] | None = None) -> torch.Tensor:
        s_tilde = F.relu(_bn(self.bn, self.fc1(global_avg_pool(x))))
        s = F.relu(self.gcn(self.aggregate(s_tilde, context)))
        if context is not None:
            context.append(s)
        return self.drop(self.fc2(s))


ROUTERS: dict[str, Callable[..., nn.Module]] = {"spnet": SPNetRouter, "aig": AIGGate, "relational": RelationalRouter}
# keys of the method's `router` mapping that configure the model, not the router module
MODEL_LEVEL_KEYS = ("type", "tau", "eval_noise", "relaxation")


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
