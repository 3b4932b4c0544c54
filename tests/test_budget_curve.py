"""BoostNet's budget curve with the official flat rule (``adaptive_inference.py --flat_curve``, paper §Budgeted-batch
"we do not increase confidence threshold if this change does not bring performance improvement", spec §6.f.5).

Hand example: 4 images, 2 exits, costs 1 and 3. Exit-1 confidences 0.9 > 0.8 > 0.7 > 0.6, so with q_1 = 1/(1+p)
the thresholds let floor(4 q_1) images exit early: p = 0.2 -> 3, p = 0.6 -> 2, p = 2.0 -> 1.
"""
from __future__ import annotations

import pytest
import torch

from spnet_dist.evaluation.budgeted import budget_curve

CONF = torch.tensor([[0.9, 0.8, 0.7, 0.6], [0.5, 0.5, 0.5, 0.5]])
COSTS = [1.0, 3.0]
PS = [0.2, 0.6, 2.0]
# test set: exit 1 right on images 0-2, exit 2 right on images 0 and 3 -> going deeper loses accuracy
CORRECT = torch.tensor([[True, True, True, False], [True, False, False, True]])


def _xy(curve):
    return [(c["macs"], c["top1"]) for c in curve]


def test_raw_sweep_falls_and_the_flat_curve_does_not() -> None:
    raw = budget_curve(CONF, CONF, CORRECT, COSTS, PS, flat=False)
    assert _xy(raw) == [(1.5, 1.0), (2.0, 0.75), (2.5, 0.5)]  # (3*1 + 1*3)/4, (2+6)/4, (1+9)/4
    flat = budget_curve(CONF, CONF, CORRECT, COSTS, PS, correct_fit=CORRECT)  # default: flat
    assert _xy(flat) == [(1.5, 1.0), (2.0, 1.0), (2.5, 1.0)]  # x stays the new p's MACs, as the official code
    assert [c["p_used"] for c in flat] == [0.2, 0.2, 0.2] and [c["macs_used"] for c in flat] == [1.5] * 3


def test_the_decision_is_taken_on_the_heldout_set() -> None:
    # held-out: exit 1 right on images 0, 1; exit 2 always right -> p = 0.6 gains (0.75 -> 1.0), p = 2.0 does not
    fit = torch.tensor([[True, True, False, False], [True, True, True, True]])
    flat = budget_curve(CONF, CONF, CORRECT, COSTS, PS, correct_fit=fit)
    assert [c["p_used"] for c in flat] == [0.2, 0.6, 0.6]
    assert [c["heldout_top1"] for c in flat] == [0.75, 1.0, 1.0]
    # reported: the test accuracy of the kept thresholds (the official code; the test curve may still dip)
    assert _xy(flat) == [(1.5, 1.0), (2.0, 0.75), (2.5, 0.75)]


def test_flat_curve_needs_heldout_correctness() -> None:
    with pytest.raises(ValueError, match="correct_fit"):
        budget_curve(CONF, CONF, CORRECT, COSTS, PS)


def test_boostnet_default_is_the_flat_curve() -> None:
    from spnet_dist.config import compose

    assert compose(["method=boostnet"]).method.flat_curve is True
