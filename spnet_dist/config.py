"""Compose the Hydra config tree in ``configs/`` and turn config mistakes into one clear message.

* ``compose(overrides)`` composes and runs the *static* checks (``check_config``): unknown keys and group
  options, value types, choices and ranges, impossible combinations, secrets in the config. They hold on any
  machine (``spnet submit`` composes on a login node).
* ``validate(cfg)`` adds the checks that depend on this machine and the data: required values (``???``),
  ``data.decode=mixed`` without a GPU, ``trainer.nprocs`` above the CPU cores, and the cheap data check
  (layout, class agreement, ``model.num_classes``, batch size vs. dataset, undecodable files). The train path
  calls it right after ``compose``.
* ``redact(mapping)`` masks secrets in anything that is printed or logged; ``job_yaml`` is ``--cfg job``'s text.

Every failure is one ``ConfigError`` (a ValueError) whose message names the key, the bad value and the choices.
"""
from __future__ import annotations

import difflib
import functools
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf


class ConfigError(ValueError):
    """A bad config key or value; the message names the key, the bad value and what would be right."""


def config_dir() -> Path:
    """The ``configs/`` tree: $SPNET_CONFIG_DIR, else the one beside the package."""
    env = os.environ.get("SPNET_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[1] / "configs"
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in {path}; set SPNET_CONFIG_DIR to the project's configs/ folder")
    return path


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose ``config_name`` with Hydra overrides (``key=value``, ``group=option``) and check it statically."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [str(o) for o in overrides]
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_scrub(_explain(err, overrides), overrides)) from None
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:  # odd input Hydra did not expect
        raise ConfigError(_scrub(f"cannot apply the overrides {' '.join(overrides)!r}: {_one_line(err)}",
                                 overrides)) from None
    if config_name == "config":
        try:
            check_config(cfg)
        except ConfigError as err:
            raise ConfigError(_scrub(str(err), overrides)) from None
    return cfg


def _one_line(err: Exception | str) -> str:
    text = " ".join(str(err).split())
    text = text.split(" full_key:")[0]
    return text.split(" Config search path:")[0]


# ------------------------------------------------------------------------------------------- Hydra's errors

def _override_key(o: str) -> str:
    return o.split("=", 1)[0].lstrip("+~").split("@", 1)[0].strip()


def _explain(err: Exception, overrides: Sequence[str]) -> str:
    """Hydra's multi-line errors as one line naming the key, the value and the choices."""
    text = str(err)
    m = re.search(r"Could not find '([^']+)/([^']*)'", text)
    if m and "Available options" in text:
        group, option = m.group(1), m.group(2)
        opts = re.findall(r"^\s+(\S+)\s*$", text.split("Available options", 1)[1], re.M)
        return f"{group}={option}: no such option in group '{group}'; choose one of {', '.join(opts)}"
    m = re.search(r"Could not override '([^']*)'", text)
    if m:
        key = m.group(1)
        given = next((o for o in overrides if _override_key(o) == key), f"{key}=...")
        if not key:
            return f"cannot parse override {given!r}: nothing before '='; write key=value or group=option"
        if is_secret_name(key.rsplit(".", 1)[-1]):
            return _secret_key_message(key)
        groups = sorted(_schema(str(config_dir())).groups)
        if key in groups and "=" in given:
            return (f"{given!r}: the '{key}' group is not in the defaults of configs/config.yaml; add it with "
                    f"+{given.lstrip('+')}")
        if "No match in the defaults list" in text or "/" in key:
            close = difflib.get_close_matches(key, groups, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            return (f"{given!r}: '{key}' is not a config group; {hint}groups: {', '.join(groups)} (keys are set "
                    f"with '.', e.g. trainer.batch_size=32)")
        return _unknown_key(key, given)
    m = re.search(r"Could not append to config. An item is already at '([^']*)'", text)
    if m:
        return f"+{m.group(1)}: the key exists already; set it without '+': {m.group(1)}=<value>"
    m = re.search(r"Multiple values for (\S+?)\.? To override a value use", text)
    if m:
        given = next((o for o in overrides if _override_key(o) == m.group(1)), m.group(1))
        return f"{given!r}: group '{m.group(1)}' is already selected; choose its option without '+': " \
               f"{given.lstrip('+')}"
    if "override_grammar" in text or type(err).__name__ == "OverrideParseException":
        bad = _unparsable(overrides)
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("See ")
                 and not ln.startswith("Error parsing override") and ln.strip() != "^"]
        detail = _one_line(" ".join(lines)) if lines else "syntax error"
        return (f"cannot parse override {bad!r}: {detail}; write key=value or group=option, quote values with "
                f"special characters (grammar: https://hydra.cc/docs/advanced/override_grammar/basic)")
    return _one_line(text)


def _unparsable(overrides: Sequence[str]) -> str:
    """The first override Hydra's grammar rejects."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for o in overrides:
        try:
            parser.parse_overrides([o])
        except Exception:  # noqa: BLE001 - the parser's own exception types
            return o
    return " ".join(overrides)


def _unknown_key(key: str, given: str) -> str:
    schema = _schema(str(config_dir()))
    known = sorted(set(schema.leaves) | set(schema.maps) | set(OPTIONAL_KEYS))
    close = [k for k in difflib.get_close_matches(key, known, n=4, cutoff=0.75) if not key.startswith(k + ".")][:3]
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = sorted({k[len(parent) + 1:].split(".")[0] for k in known if parent and k.startswith(parent + ".")})
    msg = f"unknown key '{key}' (from {given!r})"
    if close:
        msg += f"; did you mean {' or '.join(close)}?"
    if siblings:
        msg += f"{' ' if close else '; '}Keys under '{parent}': {', '.join(siblings)}"
    elif not parent:
        msg += f"{' ' if close else '; '}Top-level keys: {', '.join(sorted({k.split('.')[0] for k in known}))}"
    return msg


# --------------------------------------------------------------------------------------------------- secrets

SECRET_NAME = re.compile(r"passw(?:or)?d|token|secret|api[_-]?key|access[_-]?key|private[_-]?key|credential", re.I)
_URI_CREDENTIALS = re.compile(r"([a-zA-Z][a-zA-Z0-9+.\-]*://[^/@\s:]*):([^/@\s]+)@")
_ENV_INTERPOLATION = re.compile(r"\$\{\s*(?:oc\.env|env)\s*:\s*([A-Za-z_][A-Za-z0-9_]*)")
MASK = "***"


def is_secret_name(name: str) -> bool:
    """Names of secrets: *PASSWORD*, *TOKEN*, *SECRET*, *API_KEY*, *ACCESS_KEY*, ... (any case)."""
    return bool(SECRET_NAME.search(str(name)))


def secret_env_values(env: Mapping[str, str] | None = None, min_len: int = 4) -> list[str]:
    """Values of secret-named environment variables (MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY, ...)."""
    env = os.environ if env is None else env
    flags = {"true", "false", "yes", "no", "on", "off", "none", "null"}  # e.g. TOKENIZERS_PARALLELISM=false
    return sorted({v for k, v in env.items() if is_secret_name(k) and len(v) >= min_len and v.lower() not in flags
                   and not (v.isdigit() and len(v) < 6)}, key=len, reverse=True)


def _redact_str(s: str, secrets: list[str]) -> str:
    s = _URI_CREDENTIALS.sub(rf"\1:{MASK}@", s)
    for v in secrets:
        if v in s:
            s = s.replace(v, MASK)
    return s


def redact(mapping: Any, env: Mapping[str, str] | None = None) -> Any:
    """A copy of ``mapping`` (dict/DictConfig, nested or flattened ``a.b`` keys, lists) safe to print or log:
    values of secret-named keys become '***', passwords in URIs (``http://user:pw@host``) are masked, and any
    occurrence of a secret environment variable's value is masked."""
    secrets = secret_env_values(env)
    if isinstance(mapping, (DictConfig, ListConfig)):
        try:
            mapping = OmegaConf.to_container(mapping, resolve=True, throw_on_missing=False)
        except Exception:  # noqa: BLE001 - an unresolvable interpolation: show it unresolved
            mapping = OmegaConf.to_container(mapping, resolve=False)

    def walk(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {k: (MASK if is_secret_name(str(k)) and v[k] not in (None, "") else walk(v[k])) for k in v}
        if isinstance(v, (list, tuple)):
            return type(v)(walk(x) for x in v) if isinstance(v, tuple) else [walk(x) for x in v]
        if isinstance(v, str):
            return _redact_str(v, secrets)
        return v

    return walk(mapping)


def _scrub(text: str, overrides: Sequence[str] = ()) -> str:
    """Mask secret override values and secret env values in an error message."""
    for o in overrides:
        if "=" in o and is_secret_name(_override_key(o)):
            value = o.split("=", 1)[1]
            if value:
                text = text.replace(value, MASK)
    return _redact_str(text, secret_env_values())


def job_yaml(overrides: Sequence[str]) -> str:
    """The text ``spnet train --cfg job`` prints: the composed, checked, resolved config with secrets masked."""
    cfg = compose(overrides)
    return OmegaConf.to_yaml(OmegaConf.create(redact(cfg)))


def _secret_key_message(path: str) -> str:
    return (f"{path}: secrets do not belong in the config (it is printed by --cfg job, logged to MLflow and "
            f"saved in checkpoints); remove it and export the secret in the environment instead, e.g. "
            f"MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")


def _check_secrets(raw: dict) -> None:
    """No secret in the config: by key name, by ${oc.env:SECRET} interpolation, in a URI, or by value."""
    secrets = secret_env_values(min_len=8)
    for path, value in _walk_leaves(raw):
        name = path.rsplit(".", 1)[-1]
        if is_secret_name(name):
            raise ConfigError(_secret_key_message(path))
        if not isinstance(value, str):
            continue
        for var in _ENV_INTERPOLATION.findall(value):
            if is_secret_name(var):
                raise ConfigError(f"{path} reads the secret environment variable {var} into the config, where it "
                                  f"would be printed, logged and saved; leave it in the environment (MLflow and "
                                  f"boto read MLFLOW_TRACKING_* / AWS_* themselves)")
        if _URI_CREDENTIALS.search(value):
            raise ConfigError(f"{path} holds a password inside a URI ({_redact_str(value, [])}); use the URI "
                              f"without it and export MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
        for secret in secrets:
            if secret in value:
                var = next(k for k, v in os.environ.items() if v == secret and is_secret_name(k))
                raise ConfigError(f"{path} contains the value of the secret environment variable {var}; do not "
                                  f"copy secrets into the config (it is printed, logged and saved)")


# ---------------------------------------------------------------------------------------------------- schema

class _Schema:
    """What the configs/ tree allows: leaf keys with the types seen in any option, mapping keys, groups."""

    def __init__(self, cdir: Path):
        self.leaves: dict[str, set[str]] = {}
        self.elems: dict[str, set[str]] = {}
        self.maps: set[str] = set()
        self.open_maps: set[str] = set()
        self.groups: dict[str, list[str]] = {}
        self.required: set[str] = set()
        root = OmegaConf.to_container(OmegaConf.load(cdir / "config.yaml"))
        defaults = root.pop("defaults", [])
        self._walk("", root)
        self.required |= {p for p in self.leaves if "." in p or p in root} | {p for p in self.maps}
        selected = {next(iter(d)) for d in defaults if isinstance(d, dict)}
        for gdir in sorted(p for p in cdir.iterdir() if p.is_dir()):
            options = sorted(gdir.glob("*.yaml"))
            if not options:
                continue
            self.groups[gdir.name] = [o.stem for o in options]
            keysets = []
            for opt in options:
                head = opt.read_text().splitlines()[:3]
                pkg = next((ln.split("@package", 1)[1].strip() for ln in head if "@package" in ln), gdir.name)
                prefix = "" if pkg == "_global_" else pkg.replace("_group_", gdir.name) + "."
                body = OmegaConf.to_container(OmegaConf.load(opt)) or {}
                if prefix:
                    self.maps.add(prefix[:-1])
                keysets.append(self._walk(prefix, body))
            if gdir.name in selected and keysets and prefix:
                self.required |= {gdir.name} | set.intersection(*keysets)

    def _walk(self, prefix: str, node: dict) -> set[str]:
        seen = set()
        for k, v in node.items():
            path = f"{prefix}{k}"
            seen.add(path)
            if isinstance(v, dict):
                self.maps.add(path)
                if not v:
                    self.open_maps.add(path)
                seen |= self._walk(path + ".", v)
            else:
                self.leaves.setdefault(path, set()).add(_tag(v))
                if isinstance(v, list) and v:
                    self.elems.setdefault(path, set()).update(_tag(x) for x in v)
        return seen


@functools.lru_cache(maxsize=8)
def _schema(cdir: str) -> _Schema:
    return _Schema(Path(cdir))


def _tag(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "str"
    if isinstance(v, (list, tuple)):
        return "list"
    if isinstance(v, dict):
        return "dict"
    return "any"


def _walk_leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}{k}"
            out.append((path, v))
            if isinstance(v, dict):
                out += _walk_leaves(v, path + ".")
    return out


# Keys the code reads with a default (``cfg.x.get(key, default)``) that no yaml file sets; add them with '+'.
OPTIONAL_KEYS: dict[str, set[str]] = {
    "optim.no_decay_bn": {"bool"},
    "trainer.sync_check_every": {"int"},
}

CHOICES: dict[str, tuple] = {
    "data.decode": ("auto", "cpu", "mixed"),
    "data.on_corrupt": ("skip", "fail"),
    "data.scan": ("quick", "decode", "off"),
    "data.backend": ("dali",),
    "deepspeed.stage": (0, 1, 2),
    "eval.execution": ("dense", "skip"),
    "trainer.on_nonfinite": ("stop", "skip"),
    "model.block": ("bottleneck", "basic"),
    "model.stem": ("imagenet", "cifar"),
    "model.variant": ("v1", "v1.5"),
    "method.name": ("aig", "spnet", "rdinet", "boostnet"),
    "method.rate_loss": ("one_sided", "two_sided"),
    "method.evo_form": ("consecutive", "official"),
    "method.teacher_mode": ("train", "eval"),
    "method.teacher_buffers": ("copy", "ema", "own"),
    "method.teacher_precision": ("fp32", "bf16"),
    "method.router.type": ("aig", "spnet", "relational", "none"),
}
_WHY = {"deepspeed.stage": " (ZeRO stage 3 is not available; deepspeed=zero0|zero1|zero2 set it)"}

# (low, high, low inclusive) for numeric keys
RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "trainer.batch_size": (1, None, True), "trainer.nprocs": (1, None, True), "trainer.epochs": (0, None, True),
    "trainer.log_every": (1, None, True), "trainer.threads": (1, None, True),
    "optim.lr": (0, None, True), "optim.momentum": (0, 1, True), "optim.weight_decay": (0, None, True),
    "optim.gamma": (0, None, False), "optim.warmup_epochs": (0, None, True),
    "checkpoint.every_steps": (0, None, True), "checkpoint.keep_last": (1, None, True),
    "eval.every_epochs": (1, None, True),
    "data.image_size": (1, None, True), "data.val_resize": (1, None, True), "data.num_threads": (1, None, True),
    "model.num_classes": (1, None, True), "model.image_size": (1, None, True), "model.stem_width": (1, None, True),
    "method.target_rate": (0, 1, False), "method.ema_momentum": (0, 1, True), "method.rate_weight": (0, None, True),
}
_NOUN = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
         "list": "a list, e.g. [1, 2]", "dict": "a mapping"}


def _type_ok(value: Any, tags: set[str]) -> bool:
    t = _tag(value)
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


def check_config(cfg: DictConfig) -> None:
    """The static checks (no machine, no data): raise one ConfigError for the first problem found."""
    from omegaconf.errors import OmegaConfBaseException

    raw = OmegaConf.to_container(cfg, resolve=False)
    _check_secrets(raw)
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
        raise ConfigError(f"{shown}: cannot resolve the interpolation: {_one_line(str(err).splitlines()[0])}"
                          ) from None
    _check_secrets(data)
    schema = _schema(str(config_dir()))
    _check_tree(data, schema)
    _check_values(data, schema)


def _check_tree(data: dict, schema: _Schema) -> None:
    leaves = dict(_walk_leaves(data))
    for path in sorted(schema.required, key=lambda p: (p.count("."), p)):
        parent = path.rsplit(".", 1)[0] if "." in path else None
        if path not in leaves and (parent is None or isinstance(leaves.get(parent), dict)):
            if path in schema.groups:
                raise ConfigError(f"{path} is missing (removed with '~{path}'?); choose one of "
                                  f"{', '.join(f'{path}={o}' for o in schema.groups[path])}")
            raise ConfigError(f"{path} is missing (removed with '~{path}'?); set it, e.g. {path}=<value>")
    for path, value in leaves.items():
        if any(path.startswith(m + ".") for m in schema.open_maps):
            continue
        if path in schema.maps:
            if not isinstance(value, dict):
                keys = sorted({p[len(path) + 1:].split(".")[0] for p in schema.leaves if p.startswith(path + ".")})
                raise ConfigError(f"{path}={_show(value)} is not valid: '{path}' is a group of keys ({', '.join(keys)})"
                                  f"; set them one by one, e.g. {path}.{keys[0] if keys else 'key'}=<value>")
            continue
        tags = schema.leaves.get(path) or OPTIONAL_KEYS.get(path)
        if tags is None:
            raise ConfigError(_unknown_key(path, f"+{path}={_show(value)}"))
        if value is None:
            if "null" not in tags and tags != {"any"}:
                raise ConfigError(f"{path}=null is not valid; give {_expected(tags)}")
            continue
        if value == "???":
            continue  # a required value: ``validate`` asks for it on the train path
        if not _type_ok(value, tags):
            choices = CHOICES.get(path)
            hint = f"; choose one of {', '.join(map(str, choices))}" if choices else ""
            raise ConfigError(f"{path}={_show(value)} is not {_expected(tags)}{hint}")
        elems = schema.elems.get(path)
        if isinstance(value, list) and elems and "any" not in elems:
            for x in value:
                if not _type_ok(x, elems):
                    raise ConfigError(f"{path}={_show(value)}: element {_show(x)} is not {_expected(elems)}")


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_values(data: dict, schema: _Schema) -> None:  # noqa: ARG001
    leaves = dict(_walk_leaves(data))
    for path, choices in CHOICES.items():
        if path in leaves and leaves[path] is not None and leaves[path] != "???":
            v = leaves[path]
            ok = any(v == c and type(v) is type(c) for c in choices)
            if not ok:
                raise ConfigError(f"{path}={_show(v)} is not valid; choose one of {', '.join(map(str, choices))}"
                                  f"{_WHY.get(path, '')}")
    for path, (lo, hi, lo_incl) in RANGES.items():
        v = leaves.get(path)
        if not _num(v):
            continue
        bad = (lo is not None and (v < lo if lo_incl else v <= lo)) or (hi is not None and v > hi)
        if bad:
            if hi is None:
                want = f">= {lo}" if lo_incl else f"> {lo}"
            else:
                want = f"in [{lo}, {hi}]" if lo_incl else f"in ({lo}, {hi}]"
            raise ConfigError(f"{path}={_show(v)} is out of range; it must be {want}")
    if _num(leaves.get("data.val_resize")) and _num(leaves.get("data.image_size")):
        if leaves["data.val_resize"] < leaves["data.image_size"]:
            raise ConfigError(f"data.val_resize={leaves['data.val_resize']} is smaller than data.image_size="
                              f"{leaves['data.image_size']}: the val center crop would not fit; use data.val_resize"
                              f">={leaves['data.image_size']} (ImageNet: 256 for 224)")
    layers, widths = leaves.get("model.layers"), leaves.get("model.widths")
    if isinstance(layers, list) and isinstance(widths, list) and len(layers) != len(widths):
        raise ConfigError(f"model.layers={layers} and model.widths={widths} must have the same length (one entry "
                          f"per stage)")
    for path in ("model.layers", "model.widths", "optim.milestones"):
        v = leaves.get(path)
        if isinstance(v, list) and any(_num(x) and x < (0 if path == "optim.milestones" else 1) for x in v):
            raise ConfigError(f"{path}={v}: entries must be {'>= 0' if path == 'optim.milestones' else '>= 1'}")


# ------------------------------------------------------------------------------------------- the train path

def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def check_required(cfg: DictConfig) -> None:
    """One ConfigError naming the first required key (``???``) that has no value."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        hint = " (the path of the prepared ImageNet, see `spnet prepare-imagenet`)" if "data.root" in missing else ""
        raise ConfigError(f"{missing[0]} is required and has no default: add {missing[0]}=<value>{hint}")


def validate(cfg: DictConfig, data: bool = True) -> None:
    """Everything ``spnet train`` must know before any work starts: the static checks, required values, this
    machine (GPU for ``data.decode=mixed``, cores for ``trainer.nprocs``) and, with ``data``, the cheap data
    check (layout, train/val classes, ``model.num_classes``, batch size vs. dataset, undecodable files per
    ``data.scan``/``data.on_corrupt``; cached under the data root). Raises one ConfigError / ValueError."""
    check_config(cfg)
    check_required(cfg)
    launcher = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if str(cfg.data.decode) == "mixed":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("data.decode=mixed needs a CUDA GPU, but this machine has none; choose one of auto, "
                              "cpu (auto picks mixed on a GPU, cpu otherwise)")
    nprocs = int(cfg.trainer.nprocs)
    if not launcher and nprocs > _cores():
        raise ConfigError(f"trainer.nprocs={nprocs} is more than the {_cores()} CPU cores available here; choose "
                          f"trainer.nprocs between 1 and {_cores()}")
    if not data:
        return
    from .data.check import check_classes_agree, check_layout, usable_files

    world = int(os.environ["WORLD_SIZE"]) if launcher else nprocs
    root = Path(str(cfg.data.root))
    check_layout(root)
    check_classes_agree(root)
    scan, on_corrupt = str(cfg.data.get("scan", "quick")), str(cfg.data.get("on_corrupt", "skip"))
    for split in ("train", "val"):
        usable_files(root / split, scan, on_corrupt)  # fills the cached index the ranks' loaders read
    check_data_fits(cfg, world)


def check_data_fits(cfg: DictConfig, world: int) -> None:
    """Layout, classes vs ``model.num_classes`` and one step of ``trainer.batch_size`` × ``world`` images (no file
    is opened). A key that does not fit the data is a ConfigError; a broken dataset a DataError."""
    from .data.check import quick_check

    try:
        quick_check(cfg.data, int(cfg.model.num_classes), batch_size=int(cfg.trainer.batch_size), world=world)
    except ValueError as err:
        if str(err).startswith(("model.num_classes=", "trainer.batch_size=")):
            raise ConfigError(str(err)) from None
        raise


def to_container(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are kept as values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
