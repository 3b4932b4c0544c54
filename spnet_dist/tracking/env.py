"""What a run records about where it runs (host, user, SLURM ids, git commit), and the MLflow client's
process-wide HTTP settings."""
from __future__ import annotations

import getpass
import os
import socket
import subprocess
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # spnet_dist/: travels with a logged model


def git_tags(path: Path = PACKAGE_DIR) -> dict[str, str]:
    """Commit (and dirty flag) of the checkout the code runs from; {} when it is not a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True, text=True, timeout=5)
        if head.returncode != 0 or not head.stdout.strip():
            return {}
        commit = head.stdout.strip()
        tags = {"git_commit": commit, "mlflow.source.git.commit": commit}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=5)
        if dirty.returncode == 0:
            tags["git_dirty"] = str(bool(dirty.stdout.strip())).lower()
        return tags
    except (OSError, subprocess.SubprocessError):
        return {}


def environment_tags() -> dict[str, str]:
    """Host, user, SLURM job / array ids and the git commit, as run tags."""
    tags = {"host": socket.gethostname(), "mlflow.source.name": "spnet train", "mlflow.source.type": "LOCAL"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        pass
    for env, key in (("SLURM_JOB_ID", "slurm.job_id"), ("SLURM_ARRAY_JOB_ID", "slurm.array_job_id"),
                     ("SLURM_ARRAY_TASK_ID", "slurm.array_task_id")):
        if os.environ.get(env):
            tags[key] = os.environ[env]
    return {**tags, **git_tags()}


def set_http_limits(uri: str, timeout: int | None, retries: int | None) -> None:
    """For an ``http(s)://`` store, the MLflow client's request timeout and retries (process-wide environment
    variables, read by MLflow at each request); ``None`` leaves a setting alone."""
    if not uri.startswith(("http://", "https://")):
        return
    if timeout is not None:
        os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(timeout))
    if retries is not None:
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(int(retries))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
