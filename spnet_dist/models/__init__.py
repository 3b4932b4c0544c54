"""Dynamic-inference ResNets: backbone, routers, gated execution, heads and compute accounting."""
from .backbone import StateDictError, load_torchvision_state_dict
from .cost import CostTable, cost_metrics, cost_params, cost_table, full_macs, macs_per_image
from .dynamic_resnet import DynamicResNet
from .gumbel import gumbel_st
from .output import ModelOutput
from .pretrained import load_pretrained
from .registry import MODELS, build_model, register_model, resolve_model_cfg
from .routers import ROUTERS, build_router, register_router

__all__ = ["build_model", "DynamicResNet", "ModelOutput", "cost_table", "macs_per_image", "full_macs",
           "cost_metrics", "cost_params", "CostTable", "load_torchvision_state_dict", "load_pretrained",
           "StateDictError", "gumbel_st", "MODELS",
           "ROUTERS", "build_router", "register_model", "register_router", "resolve_model_cfg"]
