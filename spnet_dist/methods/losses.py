"""Loss terms shared by every dynamic-inference method (ConvNet-AIG, SP-Net, and later RDI-Net / BoostNet).

This module is the single home of these losses; methods import from here and never keep a private copy.

Conventions (spec ``methods.md`` §2.c, §5.c):

* ``rates`` are per-block *global-batch* execution rates, shape ``(L,)``, obtained by the caller as
  ``spnet_dist.distributed.global_mean(out.gates)`` so that they carry straight-through gradients and
  match the official DataParallel (global-batch) statistic under DDP.
* All MSEs are means over elements on raw logits (no softmax, no temperature), as in the official SP-Net code.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "as_bool_mask",
    "as_targets",
    "rate_loss",
    "multi_head_ce",
    "logits_distill",
    "path_distill",
    "evolution_loss",
    "within_stage_evolution_loss",
    "head_weights_for",
    "cost_loss",
    "histogram_features",
    "pairwise_l2",
    "srm_triplets",
    "rank_loss",
    "boosted_ce",
]


def as_bool_mask(mask: Sequence[bool] | Tensor | None, num_blocks: int, device: torch.device) -> Tensor:
    """``(L,)`` bool tensor; ``None`` means every block is gated."""
    if mask is None:
        return torch.ones(num_blocks, dtype=torch.bool, device=device)
    m = torch.as_tensor(list(mask) if not isinstance(mask, Tensor) else mask, device=device).to(torch.bool)
    if m.shape != (num_blocks,):
        raise ValueError(f"gated mask has shape {tuple(m.shape)}, expected ({num_blocks},)")
    return m


def as_targets(target: float | Sequence[float] | Tensor, num_blocks: int, like: Tensor) -> Tensor:
    """Broadcast a scalar target or validate a per-layer target list to an ``(L,)`` tensor like ``like``."""
    if isinstance(target, Tensor):
        t = target.to(device=like.device, dtype=like.dtype)
    elif isinstance(target, (int, float)):
        t = torch.tensor(float(target), device=like.device, dtype=like.dtype)
    else:
        t = torch.tensor([float(v) for v in target], device=like.device, dtype=like.dtype)
    if t.dim() == 0:
        t = t.expand(num_blocks)
    if t.shape != (num_blocks,):
        raise ValueError(f"target has {t.numel()} entries, expected 1 or {num_blocks} (one per block)")
    return t


def rate_loss(
    rates: Tensor,
    target: float | Sequence[float] | Tensor,
    gated_mask: Sequence[bool] | Tensor | None,
    one_sided: bool,
) -> Tensor:
    """Target-execution-rate loss, *without* the λ weight.

    * two-sided (ConvNet-AIG, SP-Net CIFAR): ``(1/L) · Σ_{l gated} (t_l − r_l)²``
    * one-sided (SP-Net ImageNet):           ``(1/L) · Σ_{l gated} max(0, r_l − t_l)²``

    ``L = rates.numel()`` is the total number of blocks: ungated blocks are excluded from the sum but still counted in
    the divisor (ConvNet-AIG convention for blocks with t = 1). ``target`` is a scalar or a per-block list.
    """
    if rates.dim() != 1:
        raise ValueError(f"rates must be a (L,) vector of per-block rates, got shape {tuple(rates.shape)}")
    num_blocks = rates.numel()
    t = as_targets(target, num_blocks, rates)
    mask = as_bool_mask(gated_mask, num_blocks, rates.device)
    diff = rates - t
    if one_sided:
        diff = diff.clamp(min=0.0)
    sq = diff.pow(2) * mask.to(rates.dtype)
    return sq.sum() / num_blocks


def head_weights_for(num_heads: int, weights: Sequence[float] | None) -> list[float]:
    """Weights ordered like ``head_logits`` ([o1, .., o_final]).

    ``None`` → 1.0 for every head. A model without multi-stage heads returns one head (the final one), which takes
    the *last* configured weight. Any other length mismatch is an error (a silent truncation would hide a config bug).
    """
    if weights is None:
        return [1.0] * num_heads
    w = [float(v) for v in weights]
    if len(w) == num_heads:
        return w
    if num_heads == 1:
        return [w[-1]]
    raise ValueError(f"{len(w)} head weights for {num_heads} heads")


def multi_head_ce(
    head_logits: Sequence[Tensor], labels: Tensor, weights: Sequence[float] | None = None
) -> tuple[Tensor, list[Tensor]]:
    """Weighted deep-supervision CE ``Σ_k w_k · CE(o_k, y)``; returns ``(total, [per-head CE])``.

    SP-Net ImageNet: weights (o1, o2, o3, o4) = (0.01, 0.1, 0.2, 1.0).
    """
    w = head_weights_for(len(head_logits), weights)
    per_head = [F.cross_entropy(o, labels) for o in head_logits]
    total = sum(wk * ce for wk, ce in zip(w, per_head))
    return total, per_head


def logits_distill(
    head_logits: Sequence[Tensor], teacher_logits: Tensor, weights: Sequence[float] | None = None
) -> tuple[Tensor, list[Tensor]]:
    """SP-Net L_logits (unscaled): ``Σ_k w_k · MSE(o_k^s, o_final^t)``: *every* student head mimics the teacher's
    *final* logits; MSE is the mean over B×K elements of raw logits. Returns ``(total, [per-head MSE])``."""
    w = head_weights_for(len(head_logits), weights)
    target = teacher_logits.detach()
    per_head = [F.mse_loss(o, target.to(o.dtype)) for o in head_logits]
    total = sum(wk * m for wk, m in zip(w, per_head))
    return total, per_head


def path_distill(
    gate_logits: Tensor, teacher_gate_logits: Tensor, gated_mask: Sequence[bool] | Tensor | None
) -> Tensor:
    """SP-Net L_path (unscaled): MSE between student and teacher *raw* router logits (B×L×2), over gated blocks only.

    Equal to the official mean over the batch-axis concatenation of the per-block (B×2) logits when all blocks are
    gated. Returns 0 (with a graph) when no block is gated.
    """
    if gate_logits.shape != teacher_gate_logits.shape:
        raise ValueError(f"gate logits {tuple(gate_logits.shape)} vs teacher {tuple(teacher_gate_logits.shape)}")
    num_blocks = gate_logits.shape[1]
    if gated_mask is None or isinstance(gated_mask, Tensor):
        mask = as_bool_mask(gated_mask, num_blocks, gate_logits.device).tolist()  # one host copy (tensor masks)
    else:
        mask = [bool(g) for g in gated_mask]
        if len(mask) != num_blocks:
            raise ValueError(f"gated mask has {len(mask)} entries, expected {num_blocks}")
    if not any(mask):
        return gate_logits.sum() * 0.0
    s, t = gate_logits, teacher_gate_logits.detach()
    if not all(mask):  # index_select: no host sync (boolean indexing would wait for the device)
        idx = torch.tensor([i for i, g in enumerate(mask) if g], device=s.device)
        s, t = s.index_select(1, idx), t.index_select(1, idx)
    return F.mse_loss(s, t.to(s.dtype))


def _one_minus_cos(a: Tensor, b: Tensor) -> Tensor:
    return (1.0 - F.cosine_similarity(a, b, dim=1, eps=1e-8)).mean()


def evolution_loss(features: Sequence[Tensor], form: str = "consecutive") -> Tensor:
    """SP-Net feature-evolution loss L_evo (unscaled) on aligned stage features ``[f1, .., fn]`` (each B×C).

    * ``"consecutive"`` (default; paper wording, spec §5.h.1): Δ_k = f_{k+1} − f_k,
      ``Σ_{k=1}^{n-2} mean_i (1 − cos(Δ_k,i, Δ_{k+1},i))``.
    * ``"official"`` (ImageNet code): d_k = f_n − f_k for k < n, summed over all pairs a < b of
      ``mean_i (1 − cos(d_a,i, d_b,i))`` — for n = 4 the pairs (1,2), (1,3), (2,3).

    Cosine similarity uses ``eps = 1e-8`` (``F.cosine_similarity``); a zero difference vector has cos 0.
    """
    feats = [f.flatten(1) for f in features]
    if len(feats) < 3:
        raise ValueError(f"evolution_loss needs at least 3 stage features, got {len(feats)}")
    if form == "consecutive":
        deltas = [feats[k + 1] - feats[k] for k in range(len(feats) - 1)]
        terms = [_one_minus_cos(deltas[k], deltas[k + 1]) for k in range(len(deltas) - 1)]
    elif form == "official":
        last = feats[-1]
        diffs = [last - f for f in feats[:-1]]
        terms = [_one_minus_cos(diffs[a], diffs[b]) for a, b in itertools.combinations(range(len(diffs)), 2)]
    else:
        raise ValueError(f"unknown evo_form {form!r} (expected 'consecutive' or 'official')")
    return torch.stack(terms).sum()


def within_stage_evolution_loss(taps: Sequence[tuple[Tensor, Tensor, Tensor]], skip_unchanged: bool = False
                                ) -> Tensor:
    """SP-Net's official CIFAR L_evo (unscaled; ``train_cifar.py``, spec §5.e): per stage the pooled outputs of its
    first, middle and last block, e₁ = f_mid − f_first, e₂ = f_last − f_mid, ``Σ_stages mean_i (1 − cos(e₁,i, e₂,i))``
    (the official ``--cos_margin`` is 0 by default and not offered).

    An image whose every block between two taps was skipped has e = 0 exactly (a skipped block passes its input on):
    its cosine is 0 and its gradient ~1/eps, which the official code's element-wise clamp cuts to ±0.5 per element.
    ``skip_unchanged`` (``method.evo_skip_unchanged``, a deviation) leaves such image-stage pairs out of the mean
    instead (their angle is undefined); a stage with none left adds 0."""
    if not taps:
        raise ValueError("within_stage L_evo needs the model's stage taps (DynamicResNet.stage_taps = True)")
    terms = []
    for first, mid, last in taps:
        e1, e2 = (mid - first).flatten(1), (last - mid).flatten(1)
        if not skip_unchanged:
            terms.append(_one_minus_cos(e1, e2))
            continue
        scale = torch.maximum(first.flatten(1).norm(dim=1), last.flatten(1).norm(dim=1))
        keep = (e1.norm(dim=1) > 1e-6 * scale) & (e2.norm(dim=1) > 1e-6 * scale)
        cos = F.cosine_similarity(e1[keep], e2[keep], dim=1, eps=1e-8)
        terms.append((1.0 - cos).sum() / max(int(keep.numel()), 1))  # mean over the stage's images, 0 for the left-out
    return torch.stack(terms).sum()


# ---------------------------------------------------------------------------------------------- RDI-Net (§4.c)
def cost_loss(
    rates: Tensor, target: float | Sequence[float] | Tensor, gated_mask: Sequence[bool] | Tensor | None
) -> Tensor:
    """RDI-Net cost loss, paper Eq. 15: ``Σ_n (v_n − t_n)²`` over gated blocks (a *sum*, not a mean).

    ``rates`` are the relaxed per-block executions v_n (for RDI-Net: the batch mean of the executed fraction of the
    block's MACs, ``models/rdinet.py``). Equals ``L · rate_loss(..., one_sided=False)``.
    """
    return rate_loss(rates, target, gated_mask, one_sided=False) * rates.numel()


def histogram_features(
    images: Tensor, bins: int = 32, value_range: tuple[float, float] = (-2.2, 2.7)
) -> Tensor:
    """SRM mapping H (paper Eq. 10, "histogram statistics"): per-channel intensity histograms of each image,
    ``bins`` bins over the fixed ``value_range`` of the *normalised* input (values outside are clamped into the
    end bins), each channel's histogram normalised to sum 1, concatenated → B×(C·bins). No gradient.

    The default range covers ImageNet mean/std normalisation of [0, 255] images ([-2.12, 2.64]).
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range must be increasing, got {value_range}")
    with torch.no_grad():
        x = images.detach().float().flatten(2)  # B×C×HW
        idx = ((x - lo) / (hi - lo) * bins).floor().clamp_(0, bins - 1).long()
        hist = torch.zeros(*x.shape[:2], bins, device=x.device, dtype=torch.float32)
        hist.scatter_add_(2, idx, torch.ones_like(x))
        hist /= x.shape[2]
    return hist.flatten(1)


def pairwise_l2(x: Tensor, eps: float = 0.0) -> Tensor:
    """B×B Euclidean distances ``‖x_i − x_j‖₂`` (rows of x flattened); ``eps`` inside the square root keeps the
    gradient finite for identical rows."""
    x = x.flatten(1)
    diff = x.unsqueeze(1) - x.unsqueeze(0)
    return (diff.pow(2).sum(-1) + eps).sqrt()


def srm_triplets(dist: Tensor, tie_tol: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    """SRM triplet sampling, paper Eq. 11–12: ``M = argsort(D)`` row-wise (ascending); for anchor i the sample
    itself is rank 1 and every two *adjacent* ranks (j, j+1), j = 2..L−1, form a triplet (anchor, positive = M_ij,
    negative = M_i,j+1): L−2 triplets per anchor.

    Near-ties are ignored (paper §4.1): a triplet is dropped when ``D[i, neg] − D[i, pos] ≤ tie_tol · D[i, neg]``
    (relative tolerance; exact ties always drop). The anchor is forced to rank 1 even if another sample is at
    distance 0. Returns index tensors (anchor, positive, negative) of the kept triplets.
    """
    d = dist.detach()
    n = d.shape[0]
    if d.shape != (n, n):
        raise ValueError(f"distance matrix must be square, got {tuple(d.shape)}")
    if n < 3:
        empty = torch.zeros(0, dtype=torch.long, device=d.device)
        return empty, empty, empty
    d = d.clone()
    d.fill_diagonal_(float("-inf"))
    order = torch.argsort(d, dim=1, stable=True)[:, 1:]  # ranks 2..L (self removed)
    pos, neg = order[:, :-1], order[:, 1:]
    anchor = torch.arange(n, device=d.device).unsqueeze(1).expand_as(pos)
    d_pos, d_neg = dist.detach().gather(1, pos), dist.detach().gather(1, neg)
    keep = (d_neg - d_pos) > tie_tol * d_neg
    return anchor[keep], pos[keep], neg[keep]


def rank_loss(
    paths: Tensor, anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = 0.5,
    reduction: str = "mean",
) -> Tensor:
    """SRM ranking loss, paper Eq. 12: ``[‖P_a − P_p‖₂ − ‖P_a − P_n‖₂ + φ]₊`` over the given triplets.

    ``paths`` is B×(anything) (flattened per sample). ``reduction``: ``mean`` over the kept triplets (default, so that
    α does not scale with the batch size), or ``sum`` (the literal Eq. 12 double sum). 0 (with a graph) if no triplet.
    """
    p = paths.flatten(1)
    if anchor.numel() == 0:
        return p.sum() * 0.0
    eps = 1e-12
    d_ap = ((p[anchor] - p[positive]).pow(2).sum(-1) + eps).sqrt()
    d_an = ((p[anchor] - p[negative]).pow(2).sum(-1) + eps).sqrt()
    hinge = F.relu(d_ap - d_an + margin)
    if reduction == "mean":
        return hinge.mean()
    if reduction == "sum":
        return hinge.sum()
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


# ---------------------------------------------------------------------------------------------- BoostNet (§6.c)
def boosted_ce(
    head_logits: Sequence[Tensor], labels: Tensor, t: float = 0.5, weights: Sequence[float] | None = None
) -> tuple[Tensor, list[Tensor]]:
    """BoostNet loss ``Σ_n w_n · CE(f_n + stopgrad(t·F_{n−1}), y)`` with F_1 = f_1, F_n = f_n + t·F_{n−1}
    (spec §6.b–c, paper Eq. 6; w_n = 1 by default). Returns ``(total, [per-exit CE])``."""
    from spnet_dist.models.boostnet import ensemble_logits

    boosted = ensemble_logits(head_logits, t, detach_previous=True)
    w = head_weights_for(len(boosted), weights)
    per_exit = [F.cross_entropy(z, labels) for z in boosted]
    return sum(wk * ce for wk, ce in zip(w, per_exit)), per_exit
