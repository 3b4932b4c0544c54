"""Training objectives of dynamic-inference methods (ConvNet-AIG, SP-Net, RDI-Net, BoostNet), the static baseline
and their shared losses.

Trainer usage::

    from spnet_dist.methods import build_method, prepare_method_cfg
    method_cfg = prepare_method_cfg(method_cfg, model_cfg)   # resolves model keys derived from the method (gate_mask)
    model = build_model(model_cfg, method_cfg)               # + pretrained loading, .to(device)
    method = build_method(method_cfg, model)                 # SP-Net deep-copies the student (teacher) here
    ...
    out = model(images)
    loss, logs = method.loss(model, images, labels, out)
"""
import importlib
import pkgutil

from .aig import ConvNetAIG, gate_mask_for
from .base import METHODS, GatedMethod, Method, build_method, prepare_method_cfg, register_method, unwrap_model
from .boostnet import BoostNet
from .rdinet import RDINet
from .spnet import SPNet
from .static import StaticResNet

# registration: every module of this package is imported, so a new method is its file (+ its configs/method yaml)
for _mod in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_mod.name}")

__all__ = [
    "METHODS",
    "Method",
    "GatedMethod",
    "ConvNetAIG",
    "SPNet",
    "RDINet",
    "BoostNet",
    "StaticResNet",
    "build_method",
    "prepare_method_cfg",
    "register_method",
    "gate_mask_for",
    "unwrap_model",
]
