"""ConvNet-AIG (Veit & Belongie), spec ``methods.md`` §2: ``L = CE + λ · (1/L) Σ_{gated, t_l<1} (t_l − r̄_l)²``.

Per-layer target schedules (README of the official repo), e.g. ResNet-50
``[1, 1, 0.8, 1, t, t, t, 1, t, t, t, t, t, 1, 0.7, 1]``: blocks with t = 1 are **not gated** by default (always
executed; spec §2.h), which is a *model* property. The trainer therefore resolves it before building the model::

    method_cfg = prepare_method_cfg(method_cfg, model_cfg)   # sets method_cfg["gate_mask"] via gate_mask_for()
    model = build_model(model_cfg, method_cfg)

Set ``gate_full_blocks: true`` to keep t = 1 blocks gated, as the official code does (they are then still excluded
from the rate loss, as in the official code). An explicit non-null ``gate_mask`` in the config always wins.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import GatedMethod, cfg_get, register_method, to_plain
from .losses import multi_head_ce

if TYPE_CHECKING:  # pragma: no cover
    from spnet_dist.models.output import ModelOutput

__all__ = ["ConvNetAIG", "gate_mask_for"]


def gate_mask_for(method_cfg: Mapping, num_blocks: int) -> list[bool] | None:
    """The ``gate_mask`` the model should be built with (``None`` = every block gated).

    Precedence: an explicit ``gate_mask`` list; else, with a ``target_schedule`` and ``gate_full_blocks`` false
    (default), ``[t < 1 for t in schedule]``; else ``None``.
    """
    explicit = cfg_get(method_cfg, "gate_mask")
    if explicit is not None:
        mask = [bool(m) for m in to_plain(explicit)]
        if len(mask) != num_blocks:
            raise ValueError(f"gate_mask has {len(mask)} entries, model has {num_blocks} blocks")
        return mask
    schedule = cfg_get(method_cfg, "target_schedule")
    if schedule is None or bool(cfg_get(method_cfg, "gate_full_blocks", False)):
        return None
    targets = [float(t) for t in to_plain(schedule)]
    if len(targets) != num_blocks:
        raise ValueError(f"target_schedule has {len(targets)} entries, model has {num_blocks} blocks")
    return [t < 1.0 for t in targets]


@register_method
class ConvNetAIG(GatedMethod):
    """CE (on the final head; weighted over heads if the model has several and ``head_weights`` is set)
    + ``rate_weight`` × two-sided rate loss (``rate_loss: one_sided`` is accepted too)."""

    name = "aig"
    default_rate_loss = "two_sided"

    @classmethod
    def prepare_cfg(cls, cfg: dict, num_blocks: int) -> dict:
        cfg["gate_mask"] = gate_mask_for(cfg, num_blocks)
        return cfg

    def __init__(self, cfg: Mapping, model: torch.nn.Module) -> None:
        super().__init__(cfg, model)
        self.head_weights: Any = cfg_get(self.cfg, "head_weights")

    def _loss(
        self, model: torch.nn.Module, images: Tensor, labels: Tensor, out: "ModelOutput"
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if len(out.head_logits) > 1:
            cls_loss, _ = multi_head_ce(out.head_logits, labels, self.head_weights)
            ce = F.cross_entropy(out.logits, labels)
        else:
            ce = F.cross_entropy(out.logits, labels)
            cls_loss = ce
        r_loss, _, logs = self.rate_terms(out)
        total = cls_loss + self.rate_weight * r_loss
        logs.update({"ce": ce.detach(), "cls": cls_loss.detach()})
        return total, logs
