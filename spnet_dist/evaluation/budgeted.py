"""Anytime and budgeted-batch evaluation of early-exit networks (BoostNet, spec ``methods.md`` §6.f).

Inputs are per-exit statistics of a set of images: ``conf`` (N×M, max softmax of the ensemble logits F_n at exit n)
and ``correct`` (N×M bool, argmax F_n == label), and ``costs`` (N, cumulative MACs per image up to exit n including
every earlier exit's head: ``models.cost.exit_macs``).

* Anytime: accuracy of every exit with its cost.
* Budgeted batch: exit proportions q_n ∝ p^n (n = 1..N); thresholds are fitted on a held-out set by walking each
  exit's confidence ranking, counting only images that have not exited yet, until ⌊q_n·M⌋ of them exit
  (``fit_thresholds``; T_N = −10⁸, an unreachable count leaves T_n = +10⁸). An image exits at the first n with
  conf_n ≥ T_n; expected MACs = Σ_n (fraction exiting at n)·costs[n]. ``search_budget`` finds p (bisection on log p)
  whose held-out expected MACs match a requested budget; ``budget_curve`` sweeps the official grid p = k/20, by
  default with the official flat rule (a threshold change is kept only if it raises held-out accuracy).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

NO_EXIT, ALWAYS_EXIT = 1e8, -1e8


def p_grid() -> list[float]:
    """The official sweep p = k/20, k = 1..39."""
    return [k / 20 for k in range(1, 40)]


def exit_proportions(p: float, n_exits: int) -> Tensor:
    """q_n ∝ p^n for n = 1..N, normalised to sum 1 (float64; computed in log space, stable for any p > 0)."""
    if p <= 0:
        raise ValueError(f"p must be positive, got {p}")
    logq = torch.arange(1, n_exits + 1, dtype=torch.float64) * math.log(p)
    return torch.softmax(logq, 0)


def fit_thresholds(conf: Tensor, q: Tensor) -> Tensor:
    """Thresholds T (N, float64) from held-out confidences ``conf`` (N×M) and exit proportions ``q`` (N)."""
    n_exits, m = conf.shape
    conf = conf.double()
    exited = torch.zeros(m, dtype=torch.bool)
    thr = torch.full((n_exits,), NO_EXIT, dtype=torch.float64)
    thr[-1] = ALWAYS_EXIT
    for n in range(n_exits - 1):
        k = math.floor(float(q[n]) * m)
        order = torch.argsort(conf[n], descending=True, stable=True)
        remaining = order[~exited[order]]
        if 0 < k <= remaining.numel():
            thr[n] = conf[n, remaining[k - 1]]
        exited |= conf[n] >= thr[n]
    return thr


def assign_exits(conf: Tensor, thresholds: Tensor) -> Tensor:
    """Exit index (M, long) of every image: the first n with conf_n ≥ T_n (the last exit takes the rest)."""
    n_exits = conf.shape[0]
    passes = conf.double() >= thresholds.double().view(-1, 1)
    passes[-1] = True
    first = torch.arange(n_exits).view(-1, 1).expand_as(passes).masked_fill(~passes, n_exits)
    return first.min(0).values


def budgeted_result(conf: Tensor, correct: Tensor | None, thresholds: Tensor, costs: Sequence[float]) -> dict[str, Any]:
    """Accuracy (if ``correct`` is given), expected MACs per image and exit fractions under ``thresholds``."""
    exits = assign_exits(conf, thresholds)
    m = exits.numel()
    frac = torch.bincount(exits, minlength=conf.shape[0]).double() / max(1, m)
    c = torch.tensor([float(v) for v in costs], dtype=torch.float64)
    out: dict[str, Any] = {"macs": float((frac * c).sum()), "exit_fractions": [float(v) for v in frac]}
    if correct is not None:
        out["top1"] = float(correct[exits, torch.arange(m)].double().mean()) if m else 0.0
    return out


def search_budget(conf: Tensor, costs: Sequence[float], budget: float, lo: float = 1e-4, hi: float = 1e4,
                  iters: int = 80) -> tuple[float, Tensor, float]:
    """p, thresholds and achieved held-out MACs for the geometric-proportion thresholds closest to ``budget``.

    Expected MACs grow with p (more mass on later exits); bisection on log p keeps the best point seen. A budget below
    costs[0] / above costs[-1] returns the cheapest / most expensive reachable point.
    """
    n = conf.shape[0]

    def at(p: float) -> tuple[Tensor, float]:
        thr = fit_thresholds(conf, exit_proportions(p, n))
        return thr, budgeted_result(conf, None, thr, costs)["macs"]

    best: tuple[float, float, Tensor, float] | None = None  # (|gap|, p, thr, macs)
    a, b = math.log(lo), math.log(hi)
    for _ in range(iters):
        mid = 0.5 * (a + b)
        thr, macs = at(math.exp(mid))
        gap = abs(macs - budget)
        if best is None or gap < best[0]:
            best = (gap, math.exp(mid), thr, macs)
        if macs < budget:
            a = mid
        else:
            b = mid
        if gap == 0.0:
            break
    for p in (lo, hi):  # the ends (budgets outside the reachable range)
        thr, macs = at(p)
        if abs(macs - budget) < best[0]:
            best = (abs(macs - budget), p, thr, macs)
    _, p, thr, macs = best
    return p, thr, macs


def budget_curve(conf_fit: Tensor, conf_test: Tensor, correct_test: Tensor, costs: Sequence[float],
                 ps: Sequence[float] | None = None, correct_fit: Tensor | None = None,
                 flat: bool = True) -> list[dict[str, Any]]:
    """Accuracy-vs-MACs points: thresholds fitted on ``conf_fit`` for each p, evaluated on the test statistics.

    ``flat`` (default; official ``adaptive_inference.py --flat_curve``, used by every budgeted evaluation script,
    paper §Budgeted-batch: "we do not increase confidence threshold if this change does not bring performance
    improvement", spec §6.f step 5): walking p upwards, a new p's thresholds are kept only if their *held-out*
    accuracy (``correct_fit``) is strictly higher than that of the last kept ones; otherwise the point reports the
    last kept thresholds' test accuracy at the new p's test MACs (``macs``, the budget; the official x value).
    ``p_used`` / ``macs_used`` name the thresholds actually reported. Needs ``correct_fit``; ``flat=False`` reports
    every p's own thresholds (the raw sweep).
    """
    if flat and correct_fit is None:
        raise ValueError("the flat (monotone) budget curve needs the held-out correctness correct_fit")
    out: list[dict[str, Any]] = []
    fit_best, kept = -1.0, None  # official acc_val_last = -1: the first p is always kept
    for p in ps if ps is not None else p_grid():
        thr = fit_thresholds(conf_fit, exit_proportions(p, conf_fit.shape[0]))
        r = budgeted_result(conf_test, correct_test, thr, costs)
        point: dict[str, Any] = {"p": float(p), "top1": r["top1"], "macs": r["macs"]}
        if flat:
            fit_top1 = budgeted_result(conf_fit, correct_fit, thr, costs)["top1"]
            if fit_top1 > fit_best:
                fit_best, kept = fit_top1, (float(p), r["top1"], r["macs"])
            point.update(top1=kept[1], p_used=kept[0], macs_used=kept[2], heldout_top1=fit_best)
        out.append(point)
    return out


def anytime(correct: Tensor, costs: Sequence[float]) -> list[dict[str, float]]:
    """Per exit: top-1 of argmax F_n over all images and the cost of reaching exit n."""
    return [{"exit": n + 1, "top1": float(correct[n].double().mean()), "macs": float(costs[n])}
            for n in range(correct.shape[0])]
