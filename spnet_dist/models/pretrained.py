"""``model.pretrained``: the backbone a run starts from — a torchvision-style state-dict file, or a checkpoint of
this project's ``spnet train`` (the papers' recipe: a trained static ResNet, then the dynamic fine-tune).

A checkpoint is given as its tag folder (``<checkpoint.dir>/global_step90``), as the ``checkpoint.dir`` above it
(the tag its ``latest`` file names) or as the DeepSpeed model-states file itself. Only the backbone tensors
(``DynamicResNet.is_backbone_key``: stem, blocks, BN statistics, ``fc``) are loaded; routers, heads and the method
state stay as built. Any missing, extra or differently shaped backbone tensor (another depth, widths or number of
classes) is one ``StateDictError`` (a ValueError) naming the keys.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .backbone import load_torchvision_state_dict

# the layout ``engine/checkpoint.py`` writes (DeepSpeed's model-states file, its ``latest`` file and the project's
# client-state key); the engine is a layer above, so the names are repeated here (tests/test_pretrained.py checks)
MODEL_FILE = "mp_rank_00_model_states.pt"
LATEST = "latest"
CLIENT_KEY = "spnet"

__all__ = ["MODEL_FILE", "checkpoint_model_file", "load_pretrained", "pretrained_source"]


def checkpoint_model_file(path: str | os.PathLike) -> Path | None:
    """The model-states file of the ``spnet train`` checkpoint at ``path`` (a tag folder, its parent with a ``latest``
    file, or the file itself); None when ``path`` is a plain file (a torchvision-style state dict).
    FileNotFoundError when ``path`` does not exist or is a folder holding neither."""
    p = Path(path).expanduser()
    if p.is_file():
        return p if p.name == MODEL_FILE else None
    if not p.is_dir():
        raise FileNotFoundError(f"model.pretrained={str(path)!r} does not exist (only local files are supported: "
                                f"a torchvision-style state dict or a `spnet train` checkpoint folder; nothing is "
                                f"downloaded)")
    if (p / MODEL_FILE).is_file():
        return p / MODEL_FILE
    latest = p / LATEST
    tag = latest.read_text().strip() if latest.is_file() else ""
    if tag and (p / tag / MODEL_FILE).is_file():
        return p / tag / MODEL_FILE
    why = f"its {LATEST} file names {tag!r}, which has no {MODEL_FILE}" if tag else f"no {MODEL_FILE} and no {LATEST}"
    raise FileNotFoundError(f"model.pretrained={str(path)!r}: {why}; pass a checkpoint tag folder (e.g. "
                            f"outputs/checkpoints/global_step90), the checkpoint.dir above it, or a .pth file")


def pretrained_source(path: str | os.PathLike) -> str:
    """``"checkpoint"`` or ``"torchvision"``: what ``model.pretrained`` points at (checks it exists, reads nothing)."""
    return "torchvision" if checkpoint_model_file(path) is None else "checkpoint"


def _read_checkpoint(f: Path) -> dict[str, Any]:
    try:
        state = torch.load(f, map_location="cpu", weights_only=False)  # our own file: DeepSpeed pickles its config
    except Exception as err:  # noqa: BLE001 - any unpickling failure is an unreadable checkpoint
        raise ValueError(f"model.pretrained: {f} is unreadable ({type(err).__name__}: {err}); it may be truncated "
                         f"— pick another tag of that checkpoint.dir") from None
    if not isinstance(state, Mapping) or not isinstance(state.get("module"), Mapping):
        raise ValueError(f"model.pretrained: {f} holds no module state; is it a `spnet train` checkpoint?")
    return dict(state)


def _saved_model(state: Mapping[str, Any]) -> str:
    """The checkpoint's model keys that decide the backbone's shapes, for the error's advice."""
    model = ((state.get(CLIENT_KEY) or {}).get("config") or {}).get("model") or {}
    keys = ("name", "layers", "widths", "block", "stem", "stem_width", "num_classes")
    shown = " ".join(f"model.{k}={model[k]}" for k in keys if k in model)
    return f" (it was trained with {shown})" if shown else ""


def _blocks(keys: set[str]) -> list[str]:
    """The residual blocks (``layerK.I``) that ``keys`` belong to."""
    return sorted({".".join(k.split(".")[:2]) for k in keys if k.startswith("layer")})


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> dict[str, list[str]]:
    """Load ``model.pretrained`` into the backbone of ``model`` (see the module docstring); returns the key lists
    of ``load_torchvision_state_dict``."""
    f = checkpoint_model_file(path)
    if f is None:
        return load_torchvision_state_dict(model, path)
    state = _read_checkpoint(f)
    is_backbone = getattr(model, "is_backbone_key", lambda k: True)
    module = {k: v for k, v in state["module"].items() if is_backbone(k)}  # routers and heads stay fresh
    own = {k for k in model.state_dict() if is_backbone(k)}
    depth = "".join(f"{what}: {', '.join(blocks)}. " for what, blocks in (
        ("Blocks only in the model", _blocks(own - set(module))),
        ("Blocks only in the checkpoint", _blocks(set(module) - own))) if blocks)
    hint = (f"{depth}Start from a checkpoint of the same backbone{_saved_model(state)}: the same model.layers, "
            f"model.widths and model.num_classes.")
    return load_torchvision_state_dict(model, module, what=f"model.pretrained={str(path)!r} ({f.parent.name})",
                                       hint=hint)
