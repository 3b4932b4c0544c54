"""Memory-bound pieces of the gated ResNet with lean backward passes: global average pooling, the gated residual.

Routers and stage heads pool activations that also feed the next convolution, so autograd adds the pooling's
gradient to the convolution's. ``F.adaptive_avg_pool2d(x, 1)`` differentiates as ``mean``, whose backward
materialises ``grad.expand(x.shape) / (H·W)`` as a fresh tensor in the default (NCHW) layout; under channels_last
the accumulation then adds an NCHW tensor to a channels_last one: a full-size write plus a mixed-layout add per
gated block (measured on one H200: ConvNet-AIG's backward 52 ms against the static ResNet's 31.5 ms at batch
256, BENCHMARKS.md). Here the division happens on the pooled B×C gradient and the returned gradient is an
expanded view, which autograd adds in the convolution gradient's own layout. Values are bitwise those of
``mean`` (same reduction forward; the same per-element division, done before the broadcast).
"""
from __future__ import annotations

from typing import Any

import torch


class _GlobalAvgPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return x.mean((2, 3))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        b, c, h, w = ctx.shape
        return (grad / (h * w)).to(ctx.dtype).view(b, c, 1, 1).expand(b, c, h, w)


def global_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """B×C×H×W → B×C spatial mean (the ``torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)`` of torchvision)."""
    if x.dim() != 4:
        raise ValueError(f"global_avg_pool expects a B×C×H×W tensor, got shape {tuple(x.shape)}")
    if not torch.is_grad_enabled() or not x.requires_grad:
        return x.mean((2, 3))
    return _GlobalAvgPool.apply(x)


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, sc: torch.Tensor, r: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        zv = z.to(r.dtype).view(-1, 1, 1, 1)
        ctx.save_for_backward(r, zv)
        ctx.z_dtype = z.dtype
        return torch.addcmul(sc, r, zv)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        r, zv = ctx.saved_tensors
        need_sc, need_r, need_z = ctx.needs_input_grad
        grad_z = None
        if need_z:  # ⟨grad_b, r_b⟩ per image (a batched matmul was slower on the CPU)
            grad_z = (grad * r).sum((1, 2, 3), dtype=torch.float32).to(ctx.z_dtype)
        return (grad if need_sc else None), (grad * zv if need_r else None), grad_z


def gated_residual(sc: torch.Tensor, r: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``sc + z·r`` for a per-image gate ``z`` (B) on B×C×H×W tensors: one fused kernel forward (addcmul) instead
    of a broadcast multiply and an add (the multiply ran in PyTorch's generic broadcast kernel: ~9 ms of
    ConvNet-AIG's H200 step at batch 256, BENCHMARKS.md); backward ∂/∂r = grad·z, ∂/∂z = Σ grad·r per image,
    without the extra full-size ``·value`` pass of addcmul's own derivative."""
    if sc.dtype != r.dtype or not torch.is_grad_enabled():
        return sc + r * z.to(r.dtype).view(-1, 1, 1, 1)
    return _GatedResidual.apply(sc, r, z)
