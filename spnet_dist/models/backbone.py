"""ResNet building blocks with torchvision module names, and the torchvision state-dict loader.

Module names match torchvision (``conv1, bn1, layer{k}.{i}.conv{1,2,3}/bn{1,2,3}/downsample.{0,1}, fc``)
so that torchvision ResNet checkpoints load unchanged. Each block exposes ``branch(x)`` (the residual
branch F(x), including its last BN) and ``shortcut(x)``; the gating logic lives in ``dynamic_resnet``.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lean_ops import gated_residual

VARIANTS = ("v1", "v1.5")
STEMS = ("imagenet", "cifar")


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)


def conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride, bias=False)


class _Block(nn.Module):
    """Shared interface: residual branch, shortcut, optional router (set by DynamicResNet)."""

    expansion = 1
    downsample: nn.Module | None

    def __init__(self) -> None:
        super().__init__()
        self.register_module("router", None)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """out = ReLU(shortcut(x) + z·F(x)); z (shape B) = None means z = 1."""
        r = self.branch(x)
        if z is None:
            return F.relu(self.shortcut(x) + r)
        return F.relu(gated_residual(self.shortcut(x), r, z))


class Bottleneck(_Block):
    """1×1 → 3×3 → 1×1 (×4). ``variant`` v1: stride on conv1 (1×1); v1.5 (torchvision): stride on conv2 (3×3)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, variant: str = "v1.5") -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"unknown ResNet variant {variant!r}; valid: {list(VARIANTS)}")
        s1, s2 = (stride, 1) if variant == "v1" else (1, stride)
        out = planes * self.expansion
        self.conv1, self.bn1 = conv1x1(inplanes, planes, s1), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, s2), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = conv1x1(planes, out), nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:  # projection shortcut (option B), always executed
            self.downsample = nn.Sequential(conv1x1(inplanes, out, stride), nn.BatchNorm2d(out))

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        r = self.relu(self.bn1(self.conv1(x)))
        r = self.relu(self.bn2(self.conv2(r)))
        return self.bn3(self.conv3(r))


class BasicBlock(_Block):
    """Two 3×3 convs. Shape-changing shortcut: ``"A"`` = parameter-free subsample + zero channel pad
    (CIFAR ResNet-32/110 papers), ``"B"`` = 1×1 projection + BN (torchvision ResNet-18/34)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, variant: str = "v1.5",
                 shortcut: str = "A") -> None:
        super().__init__()
        self.conv1, self.bn1 = conv3x3(inplanes, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        self._pad: tuple[int, int, int] | None = None  # (stride, pad_front, pad_back) for option A
        if stride != 1 or inplanes != planes:
            if shortcut == "A":
                extra = planes - inplanes
                self._pad = (stride, extra // 2, extra - extra // 2)
            else:
                self.downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self._pad is None:
            return super().shortcut(x)
        s, front, back = self._pad
        return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, front, back))


BLOCKS: dict[str, type[_Block]] = {"bottleneck": Bottleneck, "basic": BasicBlock}


def stem_modules(kind: str, width: int) -> dict[str, nn.Module]:
    """Stem layers keyed by their torchvision attribute names."""
    if kind == "imagenet":  # 7×7/2 conv, BN, ReLU, 3×3/2 max-pool
        return {"conv1": nn.Conv2d(3, width, 7, 2, 3, bias=False), "bn1": nn.BatchNorm2d(width),
                "relu": nn.ReLU(inplace=True), "maxpool": nn.MaxPool2d(3, 2, 1)}
    if kind == "cifar":  # 3×3 conv, BN, ReLU
        return {"conv1": conv3x3(3, width), "bn1": nn.BatchNorm2d(width), "relu": nn.ReLU(inplace=True),
                "maxpool": nn.Identity()}
    raise ValueError(f"unknown stem {kind!r}; valid: {list(STEMS)}")


def make_stage(block: str, inplanes: int, planes: int, n: int, stride: int, variant: str,
               shortcut: str = "B") -> nn.Sequential:
    """One stage of ``n`` blocks; the first one changes stride/width. ``shortcut`` applies to basic blocks."""
    cls = BLOCKS[block]
    kw: dict[str, Any] = {"variant": variant}
    if cls is BasicBlock:
        kw["shortcut"] = shortcut
    layers = [cls(inplanes, planes, stride, **kw)]
    layers += [cls(planes * cls.expansion, planes, 1, **kw) for _ in range(n - 1)]
    return nn.Sequential(*layers)


def init_backbone(modules: Iterable[nn.Module]) -> None:
    """torchvision ResNet init: Kaiming-normal (fan_out) convs, BN γ=1, β=0."""
    for m in modules:
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class StateDictError(ValueError):
    """A checkpoint whose keys/shapes do not match the model backbone."""


def _unwrap(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    for k in ("state_dict", "model"):
        if k in sd and isinstance(sd[k], Mapping):
            sd = sd[k]
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _fmt(keys: list[str], n: int = 12) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def load_torchvision_state_dict(model: nn.Module, path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                                strict_backbone: bool = True, what: str = "torchvision state dict",
                                hint: str | None = None) -> dict[str, list[str]]:
    """Load a torchvision-format ResNet state dict from a LOCAL file (or a mapping) into the backbone.

    Backbone = stem, all blocks (without routers) and the final ``fc`` (= o_4). Routers and auxiliary
    heads are left untouched. Wrappers ``{"state_dict": ...}`` / ``{"model": ...}`` and a ``module.``
    prefix are accepted. torchvision weights are v1.5; a v1 model loads them too (same shapes).
    strict_backbone=True raises ``StateDictError`` naming missing / unexpected / shape-mismatched keys;
    False loads what matches and returns the lists. Returns {"loaded", "missing", "unexpected", "mismatched"}.
    ``what`` names the source in the error and ``hint`` replaces its advice (``models.pretrained`` passes both for
    this project's own checkpoints).
    """
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = Path(path_or_state_dict).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained state dict not found: {str(path)!r} (only local files are "
                                    "supported; nothing is downloaded)")
        sd = _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    else:
        sd = _unwrap(path_or_state_dict)
    own = model.state_dict()
    is_backbone = getattr(model, "is_backbone_key", lambda k: True)
    target = {k: v for k, v in own.items() if is_backbone(k)}
    missing = sorted(k for k in target if k not in sd)
    unexpected = sorted(k for k in sd if k not in target)
    mismatched = sorted(k for k in target if k in sd and tuple(sd[k].shape) != tuple(target[k].shape))
    if strict_backbone and (missing or unexpected or mismatched):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_fmt(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_fmt(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): " + _fmt(
                [f"{k} (checkpoint {list(sd[k].shape)} vs model {list(target[k].shape)})" for k in mismatched]))
        raise StateDictError(f"{what} does not match the model backbone: " + "; ".join(parts) + ". " + (
            hint or "Expected torchvision ResNet names (conv1, bn1, layerK.I.convJ/bnJ/downsample.{0,1}, fc) and "
            "the same depth/widths/num_classes; pass strict_backbone=False to load only the matching tensors."))
    ok = {k: sd[k] for k in target if k in sd and k not in mismatched}
    model.load_state_dict(ok, strict=False)
    return {"loaded": sorted(ok), "missing": missing, "unexpected": unexpected, "mismatched": mismatched}
