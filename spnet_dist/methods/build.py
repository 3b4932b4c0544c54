"""The network a saved or composed config describes: model config + method config -> the network.

It lives with the methods because a method fills the model keys it derives (``prepare_method_cfg``: AIG's and
RDI-Net's gate_mask, BoostNet's early exits) before the model is built. The trainer, ``spnet eval`` and the
tracker's final-model copy all build the network through :func:`build_from_config`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..models import DynamicResNet, build_model, resolve_model_cfg
from .base import prepare_method_cfg


def build_from_config(model_cfg: Mapping[str, Any] | str, method_cfg: Mapping[str, Any], *,
                      pretrained: bool = True) -> tuple[DynamicResNet, dict[str, Any]]:
    """The network of (``model_cfg``, ``method_cfg``) and the prepared method config ``build_method`` takes.

    ``pretrained=False`` skips ``model.pretrained``: for a rebuild whose weights come from a checkpoint or a
    trained module.
    """
    if not pretrained:
        model_cfg = {**resolve_model_cfg(model_cfg), "pretrained": None}
    prepared = prepare_method_cfg(method_cfg, model_cfg)
    return build_model(model_cfg, prepared), prepared
