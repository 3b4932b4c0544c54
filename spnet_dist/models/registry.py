"""Model registry (named configs, same keys as configs/model/*.yaml) and the ``build_model`` factory."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..cfgtools import to_plain
from .backbone import BLOCKS, STEMS, VARIANTS
from .boostnet import EarlyExitResNet
from .dynamic_resnet import DynamicResNet, check_stages
from .pretrained import load_pretrained
from .rdinet import RDIResNet
from .routers import ROUTERS

MODEL_KEYS = ("name", "block", "layers", "widths", "stem", "stem_width", "variant", "num_classes",
              "image_size", "pretrained")
RUN_KEYS = ("sync_bn",)  # model.* keys read by the engine (engine/sync_bn.py), not by the network builder
# config keys read here with a fixed set of values / a numeric range (low, high, low inclusive), checked before a
# run, by the pre-flight (spnet_dist.preflight; method.router.type: the model builds the routers)
CONFIG_CHOICES: dict[str, tuple] = {"model.block": tuple(BLOCKS), "model.stem": STEMS, "model.variant": VARIANTS,
                                    "method.router.type": (*ROUTERS, "none")}
CONFIG_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "model.num_classes": (1, None, True), "model.image_size": (1, None, True), "model.stem_width": (1, None, True)}

# Network classes selected by the method config's ``arch`` key (default ``dynamic_resnet``). A class may define
# ``arch_kwargs(method_cfg) -> dict`` for extra constructor arguments taken from the method config.
ARCHS: dict[str, type[DynamicResNet]] = {"dynamic_resnet": DynamicResNet, "rdinet": RDIResNet,
                                          "early_exit": EarlyExitResNet}

MODELS: dict[str, dict[str, Any]] = {}


def register_model(name: str, **cfg: Any) -> dict[str, Any]:
    """Register a named model config (all of ``MODEL_KEYS``)."""
    cfg = {"name": name, "pretrained": None, **cfg}
    missing = [k for k in MODEL_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"model config {name!r} lacks {missing}")
    MODELS[name] = cfg
    return cfg


_IMAGENET = dict(block="bottleneck", widths=[64, 128, 256, 512], stem="imagenet", stem_width=64,
                 variant="v1.5", num_classes=1000, image_size=224)
_CIFAR = dict(block="basic", widths=[16, 32, 64], stem="cifar", stem_width=16, variant="v1.5",
              num_classes=10, image_size=32)
register_model("resnet50", layers=[3, 4, 6, 3], **_IMAGENET)
register_model("resnet101", layers=[3, 4, 23, 3], **_IMAGENET)
register_model("resnet_tiny", block="bottleneck", layers=[1, 1, 1, 1], widths=[8, 16, 32, 64], stem="imagenet",
               stem_width=16, variant="v1.5", num_classes=10, image_size=64)
register_model("resnet32_cifar", layers=[5, 5, 5], **_CIFAR)
register_model("resnet110_cifar", layers=[18, 18, 18], **_CIFAR)


def _check_choice(key: str, value: Any, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"model.{key}={value!r} is not valid; choose one of {list(valid)}")


def resolve_model_cfg(model_cfg: Mapping[str, Any] | str) -> dict[str, Any]:
    """Fill a (partial) model config from the registered config of the same ``name`` and validate it."""
    cfg = {"name": model_cfg} if isinstance(model_cfg, str) else to_plain(model_cfg)
    cfg = {k: v for k, v in cfg.items() if k not in RUN_KEYS}  # how the run uses the network, not its shape
    unknown = sorted(set(cfg) - set(MODEL_KEYS))
    if unknown:
        raise ValueError(f"unknown model config key(s) {unknown}; valid keys: {list(MODEL_KEYS)}")
    name = cfg.get("name")
    if name in MODELS:
        cfg = {**MODELS[name], **cfg}
    missing = [k for k in MODEL_KEYS if k not in cfg]
    if missing:
        raise ValueError(f"model config {name!r} is not registered (known: {sorted(MODELS)}) and lacks {missing}")
    _check_choice("block", cfg["block"], sorted(BLOCKS))
    _check_choice("stem", cfg["stem"], STEMS)
    _check_choice("variant", cfg["variant"], VARIANTS)
    check_stages(cfg["layers"], cfg["widths"])
    if cfg["num_classes"] == "auto":
        raise ValueError("model.num_classes=auto is the number of class folders in data.root/train/, set by the "
                         "pre-flight of `spnet train`; building a model without data needs a number, e.g. "
                         "model.num_classes=1000")
    for k in ("stem_width", "num_classes", "image_size"):
        if not isinstance(cfg[k], int) or cfg[k] <= 0:
            raise ValueError(f"model.{k} must be a positive int, got {cfg[k]!r}")
    return cfg


def build_model(model_cfg: Mapping[str, Any] | str, method_cfg: Mapping[str, Any] | None = None) -> DynamicResNet:
    """Build a DynamicResNet from a model config (see ``MODEL_KEYS``) and the method's model-facing keys.

    method_cfg (all optional): ``router`` {type: spnet|aig|relational|none, hidden, dropout, bias_init, tau,
    eval_noise, ...}, ``multi_stage_heads`` (bool, default False), ``gate_mask`` (null or list of bools, one per
    block), ``arch`` (dynamic_resnet | rdinet | early_exit, see ``ARCHS``), ``grad_rescale`` (early_exit).
    Other keys of method_cfg are ignored here. None → SP-Net routers, single head.
    """
    cfg = resolve_model_cfg(model_cfg)
    method = to_plain(method_cfg) if method_cfg is not None else {}
    router = method.get("router") or {"type": "spnet"}
    if not isinstance(router, Mapping):
        raise ValueError(f"method.router must be a mapping with a 'type' key, got {router!r}")
    rtype = router.get("type", "spnet")
    if rtype not in ROUTERS and rtype != "none":
        raise ValueError(f"method.router.type={rtype!r} is not valid; choose one of {sorted(ROUTERS) + ['none']}")
    arch = method.get("arch") or "dynamic_resnet"
    if arch not in ARCHS:
        raise ValueError(f"method.arch={arch!r} is not valid; choose one of {sorted(ARCHS)}")
    cls = ARCHS[arch]
    extra = cls.arch_kwargs(method) if hasattr(cls, "arch_kwargs") else {}
    model = cls(block=cfg["block"], layers=cfg["layers"], widths=cfg["widths"], stem=cfg["stem"],
                stem_width=cfg["stem_width"], variant=cfg["variant"], num_classes=cfg["num_classes"],
                router=router, multi_stage_heads=bool(method.get("multi_stage_heads", False)),
                gate_mask=method.get("gate_mask"), image_size=cfg["image_size"], name=cfg["name"], **extra)
    if cfg.get("pretrained"):  # a torchvision-style file or a `spnet train` checkpoint: the backbone only
        load_pretrained(model, cfg["pretrained"])
    return model

