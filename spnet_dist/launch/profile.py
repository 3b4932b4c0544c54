"""Cluster profiles: configs/cluster/<name>.yaml, selected with ``--cluster <name>`` or ``cluster=<name>``.

The profile is not part of the training config (the root config has no ``cluster`` group): `spnet submit` takes
``cluster=<name>`` and ``cluster.<key>=<value>`` out of the overrides, loads the profile itself and passes the
remaining overrides unchanged to `spnet train` in every task. The training run (and its MLflow params) thus do
not depend on where it ran; the job records that as MLflow tags (``slurm.*``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from omegaconf import OmegaConf

from ..config import ConfigError, config_dir

DEFAULT_PROFILE_ENV = "SPNET_CLUSTER"
KEYS = ("partition", "nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min",
        "signal_delay_s", "max_requeues", "max_failures", "account", "qos", "constraint", "additional_parameters", "setup")


def profile_dir() -> Path:
    return config_dir() / "cluster"


def available_profiles() -> list[str]:
    d = profile_dir()
    return sorted(p.stem for p in d.glob("*.yaml")) if d.is_dir() else []


def split_cluster_overrides(overrides: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
    """Split overrides into (profile from ``cluster=<name>``, ``cluster.<key>=v`` items, training overrides)."""
    name, items, rest = None, [], []
    for o in overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        if key == "cluster":
            if "=" not in o or not o.split("=", 1)[1]:
                raise ConfigError(f"{o!r}: use cluster=<profile>, one of {available_profiles()}")
            name = o.split("=", 1)[1]
        elif key.startswith("cluster."):
            if "=" not in o:
                raise ConfigError(f"{o!r}: use cluster.<key>=<value> with <key> one of {list(KEYS)}")
            items.append(o.lstrip("+"))
        else:
            rest.append(o)
    return name, items, rest


def load_profile(name: str | None = None, items: Sequence[str] = ()) -> dict[str, Any]:
    """The profile ``name`` (default: $SPNET_CLUSTER, else ``local``) with ``cluster.<key>=v`` items applied."""
    name = name or os.environ.get(DEFAULT_PROFILE_ENV) or "local"
    path = profile_dir() / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"cluster={name!r}: no profile {path}; available: {available_profiles()} "
                          f"(copy configs/cluster/example_gpu.yaml to configs/cluster/<site>.yaml for a new site)")
    prof = OmegaConf.load(path)
    unknown = [k for k in prof if k not in KEYS]
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {unknown}; valid keys: {list(KEYS)}")
    for item in items:
        key = item.split("=", 1)[0][len("cluster."):]
        top = key.split(".", 1)[0]
        if top not in KEYS:
            raise ConfigError(f"{item!r}: unknown cluster key {top!r}; valid keys: {list(KEYS)}")
    if items:
        dot = OmegaConf.from_dotlist([i[len("cluster."):] for i in items])
        prof = OmegaConf.merge(prof, dot)
    out: dict[str, Any] = {k: None for k in KEYS}
    out.update(OmegaConf.to_container(prof, resolve=True))  # type: ignore[arg-type]
    out["additional_parameters"] = dict(out["additional_parameters"] or {})
    out["setup"] = list(out["setup"] or [])
    out["name"] = name
    validate(out)
    return out


def validate(p: dict[str, Any]) -> None:
    where = f"cluster={p['name']}"

    def need_int(key: str, lo: int) -> int:
        v = p[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ConfigError(f"{where}: {key}={v!r} must be an integer >= {lo}")
        return v

    need_int("nodes", 1)
    need_int("tasks_per_node", 1)
    need_int("cpus_per_task", 1)
    need_int("max_requeues", 0)
    need_int("max_failures", 0)
    if p["gpus_per_node"] is not None:
        need_int("gpus_per_node", 0)
    timeout = need_int("timeout_min", 1)
    if timeout < 2:
        raise ConfigError(f"{where}: timeout_min={timeout} is too short; use timeout_min >= 2 (SLURM's warning "
                          "signal may arrive up to ~30 s early, before the job can handle it)")
    delay = need_int("signal_delay_s", 1)
    if delay >= timeout * 60:
        raise ConfigError(f"{where}: signal_delay_s={delay} must be shorter than timeout_min*60={timeout * 60} s")
    if p["mem_gb"] is not None and not (isinstance(p["mem_gb"], (int, float)) and p["mem_gb"] > 0):
        raise ConfigError(f"{where}: mem_gb={p['mem_gb']!r} must be a positive number (GB per node) or null")
    if not all(isinstance(s, str) for s in p["setup"]):
        raise ConfigError(f"{where}: setup must be a list of shell lines")


def executor_parameters(p: dict[str, Any], job_name: str) -> dict[str, Any]:
    """submitit AutoExecutor.update_parameters(...) keywords for profile ``p``."""
    additional = {"requeue": True, **p["additional_parameters"]}  # sites with JobRequeue=0 need --requeue
    params: dict[str, Any] = {
        "name": job_name,
        "nodes": p["nodes"],
        "tasks_per_node": p["tasks_per_node"],
        "cpus_per_task": p["cpus_per_task"],
        "timeout_min": p["timeout_min"],
        "slurm_signal_delay_s": p["signal_delay_s"],
        "slurm_additional_parameters": additional,
        "slurm_setup": p["setup"],
    }
    if p["mem_gb"] is not None:
        params["mem_gb"] = p["mem_gb"]
    if p["gpus_per_node"]:
        params["gpus_per_node"] = p["gpus_per_node"]
    for key in ("partition", "account", "qos", "constraint"):
        if p[key]:
            params[f"slurm_{key}"] = p[key]
    return params


def sbatch_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """The same parameters in submitit's SlurmExecutor (sbatch) naming, for ``--dry-run`` without SLURM."""
    from submitit.slurm.slurm import _convert_mem

    rename = {"name": "job_name", "timeout_min": "time", "tasks_per_node": "ntasks_per_node", "mem_gb": "mem"}
    out: dict[str, Any] = {}
    for k, v in params.items():
        k = k[len("slurm_"):] if k.startswith("slurm_") else rename.get(k, k)
        out[k] = _convert_mem(v) if k == "mem" else v
    return out
