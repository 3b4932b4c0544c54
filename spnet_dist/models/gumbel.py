"""Hard Gumbel-softmax with a straight-through estimator (ConvNet-AIG / SP-Net form, spec 1.2)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-10


def gumbel_st(logits: torch.Tensor, tau: float = 1.0, hard: bool = True, noise: bool = True) -> torch.Tensor:
    """Sample over the last dim of ``logits``.

    noise=True: g = -log(eps - log(u + eps)), y_soft = softmax((logits + g) / tau).
    noise=False (evaluation): y_soft = softmax(logits / tau), i.e. deterministic argmax.
    hard=True: the forward value is the exact one-hot of argmax(y_soft); the backward pass uses
    d y_soft (written as ``onehot + (y_soft - y_soft.detach())`` so the forward value is exactly 0/1).
    Computed in float32 (the 1e-10 epsilon underflows in half precision) and cast back.
    """
    x = logits.float()
    if noise:
        u = torch.rand_like(x)
        x = x - torch.log(EPS - torch.log(u + EPS))
    y_soft = F.softmax(x / tau, dim=-1)
    if not hard:
        return y_soft.to(logits.dtype)
    one_hot = torch.zeros_like(y_soft).scatter_(-1, y_soft.argmax(-1, keepdim=True), 1.0)
    return (one_hot + (y_soft - y_soft.detach())).to(logits.dtype)
