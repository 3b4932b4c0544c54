"""The pre-flight of a start: everything ``spnet train`` must know before any work, checked once.

``preflight(cfg)`` = the static checks (``check_static``: the config checks of ``compose`` plus the choices and
ranges declared by what reads each key — ``data.options``, ``models.registry``, the method class of
``method.name``, and the run's own keys in ``config.checks``), required values (``???``), this machine (a GPU
for ``data.decode=mixed``, cores for ``trainer.nprocs``) and the data plan (``data.preflight.plan_data``:
layout, train/val classes, undecodable files per ``data.scan``/``data.on_corrupt``, ``model.num_classes``,
batch size vs. dataset), ``model.pretrained``, and that ``checkpoint.dir`` and the MLflow spool folder are
writable (``check_folders``: a write probe). The static part also knows the scheme of ``tracking.uri``
(``check_tracking_uri``) and the range of ``tracking.ui.port``. It writes the data's class count into ``model.num_classes=auto``
and returns the ``DataPlan`` the trainer and its loaders use, or raises one ConfigError / ValueError. ``spnet
submit`` runs the machine-independent part on the login node.
"""
from __future__ import annotations

import difflib
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from .config import ConfigError, compose, redact, scrub
from .config.checks import RUN_CHOICES, RUN_RANGES, Range, check_config, check_required, check_values
from .config.schema import walk_leaves
from .data.options import CONFIG_CHOICES as DATA_CHOICES, CONFIG_RANGES as DATA_RANGES
from .data.preflight import DataPlan, num_classes_setting, plan_data, resolve_num_classes
from .osutil import usable_cores


TRACKING_RANGES: dict[str, Range] = {"tracking.ui.port": (1, 65535, True)}  # `spnet ui`
# the tracking-store schemes of MLflow (its store registry; a database URI may name a driver: postgresql+psycopg2)
TRACKING_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc",
                    "uc")
_URI_EXAMPLES = "sqlite:///mlflow.db, http://<server>:<port>, a folder"


def _plugin_schemes() -> set[str]:
    """Schemes that MLflow plugins add (entry points ``mlflow.tracking_store``), read without importing MLflow."""
    from importlib.metadata import entry_points

    try:
        return {ep.name.lower() for ep in entry_points(group="mlflow.tracking_store")}
    except Exception:  # noqa: BLE001 - broken package metadata: the built-in list only
        return set()


def check_tracking_uri(uri: Any, key: str = "tracking.uri") -> None:
    """``uri`` has a scheme MLflow can store runs under (see ``TRACKING_SCHEMES``; plain paths are file stores,
    and so is a one-letter scheme, a Windows drive); otherwise one ConfigError with the closest known scheme."""
    from urllib.parse import urlparse

    if not isinstance(uri, str) or not uri or uri == "???":
        return
    try:
        scheme = urlparse(uri).scheme.lower()
    except ValueError as err:
        raise ConfigError(f"{key}={uri!r} is not a URI ({err}); use e.g. {_URI_EXAMPLES}") from None
    base = scheme.split("+", 1)[0]
    if len(scheme) <= 1 or base in TRACKING_SCHEMES or scheme in _plugin_schemes():
        return
    close = difflib.get_close_matches(base, TRACKING_SCHEMES, n=1, cutoff=0.5)
    hint = f"did you mean {close[0]}? " if close else ""
    raise ConfigError(f"{key}={uri!r}: unknown scheme {scheme!r}; {hint}MLflow stores runs under "
                      f"{', '.join(s + ':' for s in TRACKING_SCHEMES[:-2])} or a plain folder, e.g. {_URI_EXAMPLES}")


def rules(method_name: Any = None) -> tuple[dict[str, tuple], dict[str, Range]]:
    """(choices, ranges) by key, in checking order: data, run, model, method (of the method ``method_name``;
    ``method.name`` itself from the method registry)."""
    from .methods import METHODS
    from .models.registry import CONFIG_CHOICES as MODEL_CHOICES, CONFIG_RANGES as MODEL_RANGES

    choices = {**DATA_CHOICES, **RUN_CHOICES, **MODEL_CHOICES, "method.name": tuple(METHODS)}
    ranges = {**RUN_RANGES, **DATA_RANGES, **MODEL_RANGES, **TRACKING_RANGES}
    method = METHODS.get(method_name) if isinstance(method_name, str) else None
    if method is not None:
        choices.update(method.config_choices)
        ranges.update(method.config_ranges)
    return choices, ranges


def check_static(cfg: Any) -> None:
    """Everything that holds on any machine: the config checks and every declared choice and range."""
    check_config(cfg)
    leaves = dict(walk_leaves(OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)))
    check_values(leaves, *rules(leaves.get("method.name")))
    check_tracking_uri(leaves.get("tracking.uri"))
    try:
        num_classes_setting(leaves.get("model.num_classes"))
    except ValueError as err:
        raise ConfigError(str(err)) from None
    layers, widths = leaves.get("model.layers"), leaves.get("model.widths")
    if isinstance(layers, list) and isinstance(widths, list):
        from .models.dynamic_resnet import check_stages

        try:
            check_stages(layers, widths)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        check_head_weights(leaves, len(layers))


def check_head_weights(leaves: dict[str, Any], stages: int) -> None:
    """Multi-stage heads: one ``method.head_weights`` entry per stage (the model's heads), named when not."""
    weights = leaves.get("method.head_weights")
    if leaves.get("method.multi_stage_heads") and isinstance(weights, list) and len(weights) != stages:
        raise ConfigError(f"method.head_weights has {len(weights)} entries but model={leaves.get('model.name')} has "
                          f"{stages} stages, hence {stages} heads: give {stages} weights ([stage 1, ..., final]), "
                          f"e.g. method=spnet_cifar for the 3-stage CIFAR ResNets")


def job_yaml(overrides: Sequence[str]) -> str:
    """The text ``spnet train --cfg job`` prints: the composed, statically checked, resolved config with secrets
    masked."""
    cfg = compose(overrides)
    try:
        check_static(cfg)
    except ConfigError as err:
        raise ConfigError(scrub(str(err), overrides)) from None
    return OmegaConf.to_yaml(OmegaConf.create(redact(cfg)))


def launched() -> bool:
    """True under a launcher (torchrun, a SLURM task, env vars set by hand): it decides the ranks."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_machine(cfg: Any) -> None:
    """This machine can run ``cfg``: a CUDA GPU for ``data.decode=mixed``; ``trainer.nprocs`` local ranks (unless
    a launcher decides the ranks) within the usable CPU cores."""
    if str(cfg.data.decode) == "mixed":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("data.decode=mixed needs a CUDA GPU, but this machine has none; choose one of auto, "
                              "cpu (auto picks mixed on a GPU, cpu otherwise)")
    nprocs, cores = int(cfg.trainer.nprocs), usable_cores()
    if not launched() and nprocs > cores:
        raise ConfigError(f"trainer.nprocs={nprocs} is more than the {cores} CPU cores available here; choose "
                          f"trainer.nprocs between 1 and {cores}")
    if "model" in cfg and cfg.model.get("sync_bn"):  # SyncBatchNorm runs on CUDA only (see check_sync_bn)
        import torch

        check_sync_bn(True, int(os.environ["WORLD_SIZE"]) if launched() else nprocs, torch.cuda.is_available())



def check_sync_bn(enabled: bool, world: int, cuda: bool) -> None:
    """Refuse ``model.sync_bn=true`` where torch cannot run it (several ranks on CPU; engine/sync_bn.py)."""
    if enabled and world > 1 and not cuda:
        raise ConfigError(f"model.sync_bn=true needs CUDA: torch's SyncBatchNorm does not run on CPU (gloo), and "
                          f"this run has {world} CPU ranks; use model.sync_bn=false (per-rank BatchNorm, as SP-Net's "
                          f"official code) or run on GPUs")

def check_pretrained(cfg: Any) -> None:
    """``model.pretrained`` exists (a file, or a `spnet train` checkpoint folder) and lies outside this run's
    ``checkpoint.dir``, where this run would resume from it or prune it."""
    from pathlib import Path

    from .models.pretrained import pretrained_source

    given = cfg.model.get("pretrained") if "model" in cfg else None
    if not given:
        return
    pretrained_source(str(given))
    source, own = Path(str(given)).expanduser().resolve(), Path(str(cfg.checkpoint.dir)).expanduser().resolve()
    if source == own or own in source.parents:
        raise ConfigError(f"model.pretrained={given} lies in this run's checkpoint.dir={cfg.checkpoint.dir}, which "
                          f"this run would resume from (resume=auto) or prune; give this run a checkpoint.dir of its "
                          f"own, e.g. checkpoint.dir={own.parent / (own.name + '_' + str(cfg.method.name))}")


PROBE_PREFIX = ".spnet-write-probe-"


def probe_writable(key: str, folder: Any, keep: bool = True) -> None:
    """``folder`` (the value of config key ``key``) can hold this run's files: create it (parents too) when
    missing, write and delete a small file in it. ``keep=False`` removes again the (empty) folders the probe
    created, so the probe leaves no trace. One ConfigError
    naming the key, the path, the OS reason and what to do."""
    path = Path(str(folder)).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}={folder} is a file, not a folder; point {key} at a folder (it is created when "
                          f"missing)")
    created, p = [], path.absolute()
    while not p.exists() and p != p.parent:
        created.append(p)  # deepest first
        p = p.parent
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=path)
        try:
            os.write(fd, b"spnet write probe\n")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        where = f": {err.filename}" if err.filename and PROBE_PREFIX not in str(err.filename) else ""
        raise ConfigError(f"{key}={folder} is not writable ({type(err).__name__}: {err.strerror or err}{where}); "
                          f"point {key} at a writable folder") from None
    finally:
        if not keep:
            for d in created:
                try:
                    d.rmdir()
                except OSError:
                    break


def spool_folder(cfg: Any) -> str:
    """The MLflow spool folder of a run: ``tracking.spool_dir``, else ``<checkpoint.dir>/mlflow_spool`` (as
    ``Tracker.from_config``)."""
    given = cfg.tracking.get("spool_dir") if "tracking" in cfg else None
    return str(given) if given else str(Path(str(cfg.checkpoint.dir)) / "mlflow_spool")


def check_folders(cfg: Any) -> None:
    """The write probes of ``checkpoint.dir`` and of the MLflow spool folder. Folders the probe makes are removed
    again, so a start stopped by a later check leaves nothing behind (the checkpointer and the tracker make them);
    under a launcher they stay: every rank probes at once, and one rank's clean-up would pull the folder from under
    another's probe."""
    keep = launched()
    probe_writable("checkpoint.dir", cfg.checkpoint.dir, keep=keep)
    probe_writable("tracking.spool_dir", spool_folder(cfg), keep=keep)


def plan_checked(cfg: Any, world: int, scan: str | None = None) -> DataPlan:
    """``plan_data`` with the keys that do not fit the data (``model.num_classes``, ``trainer.batch_size``) as a
    ConfigError; a broken dataset stays a DataError / FileNotFoundError."""
    try:
        return plan_data(cfg, world, scan=scan)
    except ValueError as err:
        if str(err).startswith(("model.num_classes=", "trainer.batch_size=")):
            raise ConfigError(str(err)) from None
        raise


def preflight(cfg: Any, world: int | None = None, data: bool = True) -> DataPlan | None:
    """All checks of a start (see the module docstring) for ``world`` ranks (default: the launcher's
    WORLD_SIZE, else ``trainer.nprocs``); the data plan, or None without ``data``."""
    check_static(cfg)
    check_required(cfg)
    check_machine(cfg)
    check_folders(cfg)
    check_pretrained(cfg)
    if not data:
        return None
    if world is None:
        world = int(os.environ["WORLD_SIZE"]) if launched() else int(cfg.trainer.nprocs)
    plan = plan_checked(cfg, world)
    resolve_num_classes(cfg, plan)  # model.num_classes=auto -> the class folders of train/, before any model
    return plan
