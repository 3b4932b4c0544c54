"""BoostNet on ResNet (AAAI 2023, spec ``methods.md`` §6, ResNet adaptation [RECON] §6.b): one exit per stage.

The exits are DynamicResNet's multi-stage heads (``heads.MultiStageHeads``: pooled stage features → alignment
Linear → classifier; the last stage's exit is the model's own ``fc``), so exit k's raw logits f_k are
``ModelOutput.head_logits[k]``. BoostNet runs without routers (every block executes; ``gates`` are all 1).

* Additive ensemble: F_1 = f_1, F_k = f_k + t·F_{k−1} (t = 0.5), ``ensemble_logits``.
* Gradient rescaling (optional, §6.b, paper Eq. 7): after stage k (1-based) of N, the trunk tensor feeds the exit-k
  head through an identity whose backward multiplies by 1/(N−k+1) and the next stage through an identity with
  backward (N−k)/(N−k+1). Implemented with forward pre-hooks on the exit-k alignment layer and on the first block
  of stage k+1 (the identities commute with the global pooling), so DynamicResNet's forward is unchanged.
* ``early_exit_forward``: inference with confidence thresholds; after each exit the images whose max softmax of
  F_k reaches T_k stop and the batch is subset — later stages only run on the remaining images.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dynamic_resnet import DynamicResNet
from .lean_ops import global_avg_pool


class _GradScale(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``factor`` in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


def grad_scale(x: torch.Tensor, factor: float) -> torch.Tensor:
    return _GradScale.apply(x, float(factor))


class _ScaleFirstInput:
    """Forward pre-hook: the module's first input passes ``grad_scale`` (a picklable callable, not a closure)."""

    def __init__(self, factor: float) -> None:
        self.factor = float(factor)

    def __call__(self, mod: nn.Module, args: tuple) -> tuple:
        return (grad_scale(args[0], self.factor),) + tuple(args[1:])


def ensemble_logits(head_logits: Sequence[torch.Tensor], t: float = 0.5,
                    detach_previous: bool = False) -> list[torch.Tensor]:
    """Boosted ensembles [F_1..F_N]: F_1 = f_1, F_k = f_k + t·F_{k−1}.

    ``detach_previous=True`` gives BoostNet's training logits f_k + stopgrad(t·F_{k−1}) (spec §6.b/6.c): the loss of
    exit k then reaches only f_k (its head and the trunk below exit k), never an earlier head through the ensemble
    term. The values are the same either way.
    """
    out: list[torch.Tensor] = []
    for f in head_logits:
        if not out:
            out.append(f)
        else:
            prev = out[-1].detach() if detach_previous else out[-1]
            out.append(f + t * prev)
    return out


@dataclass
class ExitResult:
    logits: torch.Tensor      # B×C: the ensemble logits F_k of the exit each image took
    exit_index: torch.Tensor  # B (long): 0-based exit each image took
    reached: torch.Tensor     # B×L bool: which blocks ran for each image


class EarlyExitResNet(DynamicResNet):
    """DynamicResNet with an exit after every stage (multi-stage heads forced on) for BoostNet.

    Args (besides DynamicResNet's): ``grad_rescale`` — install the gradient-rescaling identities (default True).
    """

    def __init__(self, *args: Any, grad_rescale: bool = True, **kwargs: Any) -> None:
        kwargs["multi_stage_heads"] = True
        kwargs.setdefault("router", {"type": "none"})
        super().__init__(*args, **kwargs)
        self.grad_rescale = bool(grad_rescale)
        self._rescale_hooks = []
        if self.grad_rescale:
            self._install_grad_rescale()

    @property
    def num_exits(self) -> int:
        return len(self.stage_names)

    def rescale_factors(self) -> list[tuple[float, float]]:
        """Per exit k (1-based) < N: (head-branch factor 1/(N−k+1), trunk factor (N−k)/(N−k+1))."""
        n = self.num_exits
        return [(1.0 / (n - k + 1), (n - k) / (n - k + 1)) for k in range(1, n)]

    def _install_grad_rescale(self) -> None:
        for k, (f_head, f_trunk) in enumerate(self.rescale_factors()):
            first_next = getattr(self, self.stage_names[k + 1])[0]
            self._rescale_hooks.append(self.aux.align[k].register_forward_pre_hook(_ScaleFirstInput(f_head)))
            self._rescale_hooks.append(first_next.register_forward_pre_hook(_ScaleFirstInput(f_trunk)))

    def exit_logits(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Raw logits f_k of exit k (0-based) from the stage-k output feature map x."""
        pooled = global_avg_pool(x)
        if k == self.num_exits - 1:
            return self.fc(pooled)
        return self.aux.fc[k](self.aux.align[k](pooled))

    @torch.no_grad()
    def early_exit_forward(self, x: torch.Tensor, thresholds: Sequence[float], t: float = 0.5) -> ExitResult:
        """Inference with real early exits: after exit k the images with max softmax(F_k) ≥ thresholds[k] stop.

        ``thresholds`` has one entry per exit; the last exit takes everyone left (its threshold is ignored).
        Runs under ``torch.no_grad`` in the current train/eval mode and execution mode (dense | skip).
        """
        if len(thresholds) != self.num_exits:
            raise ValueError(f"{len(thresholds)} thresholds for {self.num_exits} exits")
        skip = self.execution == "skip"
        b = x.shape[0]
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        active = torch.arange(b, device=x.device)
        logits_out: torch.Tensor | None = None
        exit_index = torch.full((b,), -1, dtype=torch.long, device=x.device)
        reached = torch.zeros(b, self.num_blocks, dtype=torch.bool, device=x.device)
        prev: torch.Tensor | None = None
        bi = 0
        for k, s in enumerate(self.stage_names):
            for blk in getattr(self, s):
                z, _ = self._gate(blk, x)
                x = self._skip_block(blk, x, z) if skip else self._dense_block(blk, x, z)
                reached[active, bi] = True
                bi += 1
            f = self.exit_logits(k, x)
            cur = f if prev is None else f + t * prev
            if logits_out is None:
                logits_out = cur.new_zeros(b, cur.shape[1])
            if k == self.num_exits - 1:
                go = torch.ones(active.numel(), dtype=torch.bool, device=x.device)
            else:
                go = F.softmax(cur.float(), dim=1).max(dim=1).values >= float(thresholds[k])
            logits_out[active[go]] = cur[go]
            exit_index[active[go]] = k
            stay = ~go
            if not bool(stay.any()):
                break
            if not bool(go.any()):
                prev = cur
                continue
            x, prev, active = x[stay], cur[stay], active[stay]
        return ExitResult(logits=logits_out, exit_index=exit_index, reached=reached)

    @classmethod
    def arch_kwargs(cls, method_cfg: dict[str, Any]) -> dict[str, Any]:
        return {"grad_rescale": bool(method_cfg.get("grad_rescale", True))}
