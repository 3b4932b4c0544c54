"""Small MLflow operations outside a training run (SLURM launch and submit go through these, not MLflow)."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri``."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def experiment_id(mlflow_client: Any, name: str) -> str:
    """Id of experiment ``name``, created when missing (also when another process creates it meanwhile)."""
    from mlflow.exceptions import MlflowException

    exp = mlflow_client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return mlflow_client.create_experiment(name)
    except MlflowException as err:  # created meanwhile by another process
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow_client.get_experiment_by_name(name).experiment_id


def ensure_experiment(uri: str, name: str) -> str:
    """Id of experiment ``name`` in ``uri`` (created, with a fresh SQLite schema, when missing)."""
    return experiment_id(client(uri), name)


def tag_run(uri: str, run_id: str, tags: Mapping[str, str], append: Mapping[str, str] | None = None,
            sep: str = ",") -> None:
    """Set ``tags`` on run ``run_id``; each ``append`` value is joined with ``sep`` to the tag's current value."""
    c = client(uri)
    tags = dict(tags)
    if append:
        current = c.get_run(run_id).data.tags
        for k, v in append.items():
            tags[k] = sep.join(x for x in (current.get(k, ""), v) if x)
    for k, v in tags.items():
        c.set_tag(run_id, k, v)
