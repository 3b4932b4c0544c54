"""Compose the Hydra config tree in ``configs/`` and run the config checks (``checks.check_config``); Hydra's
multi-line errors become one ``ConfigError`` line naming the key, the value and the choices."""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

from ..errors import ConfigError
from .schema import schema, unknown_key
from .secrets import is_secret_name, override_key, scrub, secret_key_message


def config_dir() -> Path:
    """The ``configs/`` tree: $SPNET_CONFIG_DIR, else the one beside the package."""
    env = os.environ.get("SPNET_CONFIG_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "configs"
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"no config.yaml in {path}; set SPNET_CONFIG_DIR to the project's configs/ folder")
    return path


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> DictConfig:
    """Compose ``config_name`` with Hydra overrides (``key=value``, ``group=option``) and run the config checks
    (keys, types, secrets, impossible combinations; the declared choices and ranges are the pre-flight's)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [str(o) for o in overrides]
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(scrub(_explain(err, overrides), overrides)) from None
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as err:  # odd input Hydra did not expect
        raise ConfigError(scrub(f"cannot apply the overrides {' '.join(overrides)!r}: {one_line(err)}",
                                 overrides)) from None
    if config_name == "config":
        from .checks import check_config

        try:
            check_config(cfg)
        except ConfigError as err:
            raise ConfigError(scrub(str(err), overrides)) from None
    return cfg


def one_line(err: Exception | str) -> str:
    """An error message as one line, without OmegaConf's key dump and Hydra's search path."""
    text = " ".join(str(err).split())
    text = text.split(" full_key:")[0]
    return text.split(" Config search path:")[0]


# ------------------------------------------------------------------------------------------- Hydra's errors

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
        given = next((o for o in overrides if override_key(o) == key), f"{key}=...")
        if not key:
            return f"cannot parse override {given!r}: nothing before '='; write key=value or group=option"
        if is_secret_name(key.rsplit(".", 1)[-1]):
            return secret_key_message(key)
        groups = sorted(schema(str(config_dir())).groups)
        if key in groups and "=" in given:
            return (f"{given!r}: the '{key}' group is not in the defaults of configs/config.yaml; add it with "
                    f"+{given.lstrip('+')}")
        if "No match in the defaults list" in text or "/" in key:
            close = difflib.get_close_matches(key, groups, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            return (f"{given!r}: '{key}' is not a config group; {hint}groups: {', '.join(groups)} (keys are set "
                    f"with '.', e.g. trainer.batch_size=32)")
        return unknown_key(key, given, schema(str(config_dir())))
    m = re.search(r"Could not append to config. An item is already at '([^']*)'", text)
    if m:
        return f"+{m.group(1)}: the key exists already; set it without '+': {m.group(1)}=<value>"
    m = re.search(r"Multiple values for (\S+?)\.? To override a value use", text)
    if m:
        given = next((o for o in overrides if override_key(o) == m.group(1)), m.group(1))
        return f"{given!r}: group '{m.group(1)}' is already selected; choose its option without '+': " \
               f"{given.lstrip('+')}"
    if "override_grammar" in text or type(err).__name__ == "OverrideParseException":
        bad = _unparsable(overrides)
        lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("See ")
                 and not ln.startswith("Error parsing override") and ln.strip() != "^"]
        detail = one_line(" ".join(lines)) if lines else "syntax error"
        return (f"cannot parse override {bad!r}: {detail}; write key=value or group=option, quote values with "
                f"special characters (grammar: https://hydra.cc/docs/advanced/override_grammar/basic)")
    return one_line(text)


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
