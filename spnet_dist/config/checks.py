"""The config checks that need nothing but the config: secrets, interpolations, keys and value types against the
schema, impossible combinations (``check_config``, run by ``compose``), required values (``check_required``), and
``check_values`` for choices and ranges. The choices and ranges themselves live with what reads the keys — data/,
models/, each method class — and are gathered by ``spnet_dist.preflight`` (above them); only the run's own keys
(trainer, optim, checkpoint, eval, deepspeed) are listed here. Every failure is one ``ConfigError`` naming the
key, the bad value and the choices."""
from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError
from .compose import config_dir, one_line
from .schema import OPTIONAL_KEYS, Schema, schema, tag, unknown_key, walk_leaves
from .secrets import check_secrets

Range = tuple[float | None, float | None, bool]  # (low, high, low inclusive)

RUN_CHOICES: dict[str, tuple] = {
    "deepspeed.stage": (0, 1, 2),
    "eval.execution": ("dense", "skip"),
    "eval.gate_calibration_transform": ("eval", "train"),
    "trainer.on_nonfinite": ("stop", "skip"),
}
_WHY = {"deepspeed.stage": " (ZeRO stage 3 is not available; deepspeed=zero0|zero1|zero2 set it)"}
RUN_RANGES: dict[str, Range] = {
    "trainer.batch_size": (1, None, True), "trainer.nprocs": (1, None, True),
    "trainer.collective_timeout_s": (10, None, True), "trainer.epochs": (0, None, True),
    "trainer.log_every": (1, None, True), "trainer.threads": (1, None, True),
    "optim.lr": (0, None, True), "optim.momentum": (0, 1, True), "optim.weight_decay": (0, None, True),
    "optim.gamma": (0, None, False), "optim.router_lr_mult": (0, None, False), "optim.warmup_epochs": (0, None, True),
    "checkpoint.every_steps": (0, None, True), "checkpoint.keep_last": (1, None, True),
    "eval.every_epochs": (1, None, True), "eval.precise_bn_batches": (0, None, True),
    "eval.gate_calibration_batches": (0, None, True),
    "eval.gate_calibration_heldout": (0, None, True),
    "optim.grad_clamp": (0, None, False), "optim.lr_reference_batch": (1, None, True),
    "optim.recipe_global_batch": (1, None, True),
}
_NOUN = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
         "list": "a list, e.g. [1, 2]", "dict": "a mapping"}


def _type_ok(value: Any, tags: set[str]) -> bool:
    t = tag(value)
    tags = tags - {"null"}
    if not tags or "any" in tags or t in tags:
        return True
    if t == "int" and ("float" in tags or "str" in tags):
        return True
    return t == "float" and "str" in tags


def _expected(tags: set[str]) -> str:
    tags = tags - {"null"}
    if {"int", "float"} <= tags or tags == {"float"}:
        return "a number"
    return " or ".join(_NOUN.get(t, t) for t in sorted(tags)) or "a value"


def _show(v: Any) -> str:
    return repr(v) if isinstance(v, str) else ("null" if v is None else str(v))


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_config(cfg: DictConfig) -> None:
    """The static checks (no machine, no data): raise one ConfigError for the first problem found."""
    from omegaconf.errors import OmegaConfBaseException

    raw = OmegaConf.to_container(cfg, resolve=False)
    check_secrets(raw)
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except OmegaConfBaseException as err:
        key = str(getattr(err, "full_key", None) or "")
        value: Any = raw
        try:
            for part in key.split("."):
                value = value[part] if isinstance(value, dict) else value[int(part)]
        except (KeyError, IndexError, ValueError, TypeError):
            value = None
        shown = f"{key}={value}" if isinstance(value, str) else (key or "an interpolation")
        raise ConfigError(f"{shown}: cannot resolve the interpolation: {one_line(str(err).splitlines()[0])}"
                          ) from None
    check_secrets(data)
    leaves = dict(walk_leaves(data))
    _check_tree(leaves, schema(str(config_dir())))
    _check_combinations(leaves)


def _check_tree(leaves: dict[str, Any], sch: Schema) -> None:
    for path in sorted(sch.required, key=lambda p: (p.count("."), p)):
        parent = path.rsplit(".", 1)[0] if "." in path else None
        if path not in leaves and (parent is None or isinstance(leaves.get(parent), dict)):
            if path in sch.groups:
                raise ConfigError(f"{path} is missing (removed with '~{path}'?); choose one of "
                                  f"{', '.join(f'{path}={o}' for o in sch.groups[path])}")
            raise ConfigError(f"{path} is missing (removed with '~{path}'?); set it, e.g. {path}=<value>")
    for path, value in leaves.items():
        if any(path.startswith(m + ".") for m in sch.open_maps):
            continue
        if path in sch.maps:
            if not isinstance(value, dict):
                keys = sorted({p[len(path) + 1:].split(".")[0] for p in sch.leaves if p.startswith(path + ".")})
                raise ConfigError(f"{path}={_show(value)} is not valid: '{path}' is a group of keys ({', '.join(keys)})"
                                  f"; set them one by one, e.g. {path}.{keys[0] if keys else 'key'}=<value>")
            continue
        tags = sch.leaves.get(path) or OPTIONAL_KEYS.get(path)
        if tags is None:
            raise ConfigError(unknown_key(path, f"+{path}={_show(value)}", sch))
        if value is None:
            if "null" not in tags and tags != {"any"}:
                raise ConfigError(f"{path}=null is not valid; give {_expected(tags)}")
            continue
        if value == "???":
            continue  # a required value: ``check_required`` asks for it on the train path
        if not _type_ok(value, tags):
            hint = f"; choose one of {', '.join(map(str, RUN_CHOICES[path]))}" if path in RUN_CHOICES else ""
            raise ConfigError(f"{path}={_show(value)} is not {_expected(tags)}{hint}")
        elems = sch.elems.get(path)
        if isinstance(value, list) and elems and "any" not in elems:
            for x in value:
                if not _type_ok(x, elems):
                    raise ConfigError(f"{path}={_show(value)}: element {_show(x)} is not {_expected(elems)}")


def check_values(leaves: dict[str, Any], choices: dict[str, tuple], ranges: dict[str, Range]) -> None:
    """Each key of ``leaves`` (dotted key -> value) that has ``choices`` is one of them (same type), each number
    with a range lies in it; raises one ConfigError for the first that does not."""
    for path, allowed in choices.items():
        v = leaves.get(path)
        if v is not None and v != "???" and not any(v == c and type(v) is type(c) for c in allowed):
            raise ConfigError(f"{path}={_show(v)} is not valid; choose one of {', '.join(map(str, allowed))}"
                              f"{_WHY.get(path, '')}")
    for path, (lo, hi, lo_incl) in ranges.items():
        v = leaves.get(path)
        if not _num(v):
            continue
        if (lo is not None and (v < lo if lo_incl else v <= lo)) or (hi is not None and v > hi):
            if hi is None:
                want = f">= {lo}" if lo_incl else f"> {lo}"
            else:
                want = f"in [{lo}, {hi}]" if lo_incl else f"in ({lo}, {hi}]"
            raise ConfigError(f"{path}={_show(v)} is out of range; it must be {want}")


def _check_combinations(leaves: dict[str, Any]) -> None:
    if _num(leaves.get("data.val_resize")) and _num(leaves.get("data.image_size")):
        if leaves["data.val_resize"] < leaves["data.image_size"]:
            raise ConfigError(f"data.val_resize={leaves['data.val_resize']} is smaller than data.image_size="
                              f"{leaves['data.image_size']}: the val center crop would not fit; use data.val_resize"
                              f">={leaves['data.image_size']} (ImageNet: 256 for 224)")
    for path in ("optim.grad_clamp", "optim.lr_reference_batch", "optim.recipe_global_batch"):  # null-default numbers
        if leaves.get(path) is not None and not _num(leaves[path]):
            raise ConfigError(f"{path}={_show(leaves[path])} is not a number (null: off)")
    for path in ("model.layers", "model.widths", "optim.milestones"):
        v = leaves.get(path)
        if isinstance(v, list) and any(_num(x) and x < (0 if path == "optim.milestones" else 1) for x in v):
            raise ConfigError(f"{path}={v}: entries must be {'>= 0' if path == 'optim.milestones' else '>= 1'}")


def check_required(cfg: DictConfig) -> None:
    """One ConfigError naming the first required key (``???``) that has no value."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    missing += [str(k) for k in (cfg.get("required") or []) if OmegaConf.select(cfg, str(k)) in (None, "")]
    if missing:
        hints = {"data.root": " (the path of the prepared ImageNet, see `spnet prepare-imagenet`)",
                 "model.pretrained": " (this recipe starts from trained weights: a torchvision weights file or an "
                                     "earlier run's checkpoint tag dir, as its configs/recipe/ file says; README "
                                     "\"Paper rows\")"}
        hint = hints.get(missing[0], "")
        raise ConfigError(f"{missing[0]} is required and has no default: add {missing[0]}=<value>{hint}")
