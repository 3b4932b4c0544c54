"""The static baseline: the plain ResNet (no routers, gates or heads) trained with cross-entropy only, as in the
torchvision classification reference recipe. It is the reference point of every cost–accuracy frontier: every block
executes (execution rate 1) and the MACs per image are the backbone count (``CostTable.backbone_full``).

Its config (``configs/method/static.yaml``) builds the model with ``router.type: none`` and no heads; the pre-flight
refuses anything else (``config_choices``), so ``method=static`` cannot silently train gates.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Method, register_method, unwrap_model

if TYPE_CHECKING:  # pragma: no cover
    from spnet_dist.models.output import ModelOutput

__all__ = ["StaticResNet"]


@register_method
class StaticResNet(Method):
    """``L = CE(final logits, y)``; logs ``ce``, ``exec_rate`` (1) and ``block_rates`` (ones) like the gated
    methods, without a collective: every block runs on every image of every rank."""

    name = "static"
    config_choices = {**Method.config_choices, "method.router.type": ("none",),
                      "method.multi_stage_heads": (False,)}
    config_ranges: dict = {}  # no target rate

    def __init__(self, cfg: Mapping, model: torch.nn.Module) -> None:
        super().__init__(cfg, model)
        net = unwrap_model(model)
        if any(self.gated_blocks) or getattr(net, "aux", None) is not None:
            raise ValueError("method=static trains the plain ResNet: build it with method.router.type=none and "
                             "method.multi_stage_heads=false (configs/method/static.yaml)")

    def _loss(
        self, model: torch.nn.Module, images: Tensor, labels: Tensor, out: "ModelOutput"
    ) -> tuple[Tensor, dict[str, Tensor]]:
        ce = F.cross_entropy(out.logits, labels)
        rates = out.gates.detach().mean(0)  # all ones: no gate exists
        return ce, {"ce": ce.detach(), "exec_rate": self.exec_rate(rates), "block_rates": rates}
