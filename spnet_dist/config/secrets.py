"""Secrets never enter the config: ``check_secrets`` refuses them (by key name, by ``${oc.env:SECRET}``, in a URI,
or by value); ``redact`` masks them in anything printed or logged, ``scrub`` in an error message.

The value rule covers every free-text (string) value of the config — ``name``, ``tracking.experiment``, paths,
URIs, strings in lists — whatever the length of the secret: the value of a secret-named environment variable is
refused anywhere inside a string when it has 4 or more characters (``MLFLOW_TRACKING_TOKEN=tk42``: ``name=tk42``,
``name=run-tk42``, ``name=runtk42x``; the same length from which ``redact`` masks it), and a 1-3 character one
when it is the whole string or a whole word of it (``name=ab``, ``name=run-ab``; not ``data.root=/lab``), so a
tiny value does not turn every string holding its letters into an error. Empty values, on/off flags
(``TOKENIZERS_PARALLELISM=false``) and numbers under 6 digits are no secrets (``secret_env_values``)."""
from __future__ import annotations

import os
import re
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, ListConfig, OmegaConf

from ..errors import ConfigError
from .schema import walk_leaves

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


def scrub(text: str, overrides: Sequence[str] = ()) -> str:
    """Mask secret override values and secret env values in an error message."""
    for o in overrides:
        if "=" in o and is_secret_name(override_key(o)):
            value = o.split("=", 1)[1]
            if value:
                text = text.replace(value, MASK)
    return _redact_str(text, secret_env_values())


def secret_key_message(path: str) -> str:
    """Why a secret-named key is refused, and where the secret goes instead."""
    return (f"{path}: secrets do not belong in the config (it is printed by --cfg job, logged to MLflow and "
            f"saved in checkpoints); remove it and export the secret in the environment instead, e.g. "
            f"MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN")


def check_secrets(raw: dict) -> None:
    """No secret in the config: by key name, by ${oc.env:SECRET} interpolation, in a URI, or by value (any
    length; see the module docstring)."""
    secrets = secret_env_values(min_len=1)
    for path, leaf in walk_leaves(raw):
        name = path.rsplit(".", 1)[-1]
        if is_secret_name(name):
            raise ConfigError(secret_key_message(path))
        for value in _strings(leaf):
            _check_string(path, value, secrets)


def _check_string(path: str, value: str, secrets: list[str]) -> None:
    for var in _ENV_INTERPOLATION.findall(value):
        if is_secret_name(var):
            raise ConfigError(f"{path} reads the secret environment variable {var} into the config, where it "
                              f"would be printed, logged and saved; leave it in the environment (MLflow and "
                              f"boto read MLFLOW_TRACKING_* / AWS_* themselves)")
    if _URI_CREDENTIALS.search(value):
        raise ConfigError(f"{path} holds a password inside a URI ({_redact_str(value, [])}); use the URI "
                          f"without it and export MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD")
    for secret in secrets:
        if _contains_secret(value, secret):
            var = next(k for k, v in os.environ.items() if v == secret and is_secret_name(k))
            raise ConfigError(f"{path} contains the value of the secret environment variable {var}; do not "
                              f"copy secrets into the config (it is printed, logged and saved)")


def _contains_secret(value: str, secret: str) -> bool:
    """``secret`` in ``value``: anywhere for 4 or more characters, as a whole word for shorter ones."""
    if len(secret) >= 4:
        return secret in value
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", value) is not None


def _strings(value: Any) -> list[str]:
    """The strings of a leaf value: itself, or those in a list (nested lists included)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return []


def override_key(o: str) -> str:
    """The key of an override (``+a.b=1`` -> ``a.b``)."""
    return o.split("=", 1)[0].lstrip("+~").split("@", 1)[0].strip()
