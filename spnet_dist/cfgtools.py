"""Reading configs that may be OmegaConf containers or plain dicts (the one home of these helpers)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg[key]`` for dicts and OmegaConf ``DictConfig`` alike; ``default`` when missing or ``None``."""
    value = cfg.get(key, None) if isinstance(cfg, Mapping) or hasattr(cfg, "get") else getattr(cfg, key, None)
    return default if value is None else value


def to_plain(obj: Any) -> Any:
    """An OmegaConf container (resolved) or any Mapping / Sequence -> plain dicts / lists, recursively."""
    try:  # omegaconf is optional for the model and method code
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(obj, (DictConfig, ListConfig)):
            return OmegaConf.to_container(obj, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence) and not isinstance(obj, (str, bytes)):
        return [to_plain(v) for v in obj]
    return obj
