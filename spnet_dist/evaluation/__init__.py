"""Evaluation protocols beyond the trainer's default pass: anytime and budgeted-batch early exiting (BoostNet)."""
from .budgeted import (anytime, assign_exits, budget_curve, budgeted_result, exit_proportions, fit_thresholds,
                       p_grid, search_budget)

__all__ = ["anytime", "assign_exits", "budget_curve", "budgeted_result", "exit_proportions", "fit_thresholds",
           "p_grid", "search_budget"]
