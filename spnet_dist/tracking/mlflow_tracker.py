"""MLflow tracking from rank 0 only; the run id is kept in checkpoints so a resumed job continues its run."""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class Tracker:
    """Thin MLflow wrapper. On ranks other than 0 every method is a no-op."""

    def __init__(self, uri: str, experiment: str, enabled: bool = True):
        self.enabled = enabled
        self.run_id: str | None = None
        self._client = None
        if not enabled:
            return
        import mlflow

        mlflow.set_tracking_uri(uri)
        self._mlflow = mlflow
        self._client = mlflow.MlflowClient(tracking_uri=uri)
        exp = self._client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self._client.create_experiment(experiment)

    def start(self, run_id: str | None, run_name: str, tags: dict[str, str]) -> str | None:
        """Resume ``run_id`` if given (and it exists), else create a new run. Returns the run id."""
        if not self.enabled:
            return None
        if run_id:
            try:
                self._client.get_run(run_id)
                self._client.update_run(run_id, status="RUNNING")
                self.run_id = run_id
            except Exception:  # noqa: BLE001 - a run deleted from the store: start anew, say so
                log.warning("MLflow run %s from the checkpoint is not in the store; starting a new run", run_id)
        if self.run_id is None:
            run = self._client.create_run(self.experiment_id, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Param

        existing = self._client.get_run(self.run_id).data.params
        items = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled or not metrics:
            return
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, v)

    def log_dict(self, data: dict, path: str) -> None:
        if self.enabled:
            self._client.log_dict(self.run_id, data, path)

    def finish(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self._client.set_terminated(self.run_id, status=status)
