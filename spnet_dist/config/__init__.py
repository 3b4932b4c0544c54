"""The config: compose the Hydra tree in ``configs/`` and turn config mistakes into one clear message.

* ``compose.py``: ``compose(overrides)`` composes and runs the config checks (``checks.check_config``): secrets,
  interpolations, unknown keys and group options, value types, impossible combinations. They hold on any machine
  (``spnet submit`` composes on a login node).
* ``schema.py``: what the YAML files allow (keys, types, groups), inferred from them.
* ``checks.py``: those checks, required values, and ``check_values`` for the choices and ranges that data/,
  models/ and the method classes declare (gathered by ``spnet_dist.preflight``, which also checks this machine
  and the data).
* ``secrets.py``: secrets never enter the config; ``redact`` / ``scrub`` mask them in output and messages.

Every failure is one ``ConfigError`` (a ValueError) whose message names the key, the bad value and the choices.
"""
from ..errors import ConfigError
from .compose import compose, config_dir, flatten, one_line, to_container
from .secrets import MASK, is_secret_name, redact, scrub, secret_env_values

__all__ = ["ConfigError", "MASK", "compose", "config_dir", "flatten", "is_secret_name", "one_line", "redact", "scrub",
           "secret_env_values", "to_container"]
