"""Applies tracking records to an MLflow store: runs by local key, params, metrics, tags, artifacts, the model.

A record is a small dict ``{"op": ..., "run": <run key>, ...}`` built by :class:`~.tracker.Tracker`; the run key
is an MLflow run id, or ``local-<hex>`` for a run created while the store was unreachable (found again by its
tag ``spnet.local_run_id``). Files a record needs lie in a staging folder of the spool, passed in as ``staged``.
It imports neither the spool nor the tracker (both use it).
"""
from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, Protocol

from .env import PACKAGE_DIR

log = logging.getLogger(__name__)

# MLflow error codes meaning "the store answered and refused this request": retrying cannot help.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                    "BAD_REQUEST", "INVALID_STATE", "NOT_FOUND", "MALFORMED_REQUEST"}
# SQLite "database is locked" (MLflow's 20 s busy timeout ran out, or SQLite refused to wait to avoid a deadlock
# between writers): retried for up to BUSY_RETRY_S, ~0.5, 1, 1.5 ... s apart, before the outbox spools.
BUSY_RETRY_S, BUSY_BACKOFF_S = 30.0, 0.5
LOCAL_PREFIX = "local-"
LOCAL_TAG = "spnet.local_run_id"


def is_rejection(err: BaseException) -> bool:
    """True when the store answered and refused the request (retrying cannot help)."""
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.error_code in PERMANENT_ERRORS


def short(err: BaseException) -> str:
    """One line of at most 240 characters for a log message."""
    text = " ".join(str(err).split())
    return text[:240] + ("..." if len(text) > 240 else "")


class StagedFiles(Protocol):
    """Where a record's files lie (the spool): ``dir / rec["staged"]``; ``discard`` once applied."""

    dir: Path

    def discard(self, rel: str | None) -> None: ...


def _gone(what: str) -> Exception:
    from mlflow.exceptions import MlflowException

    return MlflowException(what, error_code="RESOURCE_DOES_NOT_EXIST")  # a rejection: skipped, never retried


class Store:
    """One MLflow store (``uri``); ``experiment`` is where local run keys are looked up."""

    def __init__(self, uri: str, experiment: str, staged: StagedFiles):
        import mlflow

        from .sqlite_init import ensure_sqlite_store

        self.uri, self.experiment, self.staged = str(uri), str(experiment), staged
        ensure_sqlite_store(self.uri)  # a fresh SQLite file: created and migrated once, under a lock
        mlflow.set_tracking_uri(self.uri)
        self._mlflow = mlflow
        self.client = mlflow.MlflowClient(tracking_uri=self.uri)
        self._ids: dict[str, str] = {}  # run key -> MLflow run id
        self._experiment_ids: dict[str, str] = {}
        self._skipped_ops: set[str] = set()
        self.busy_retries = 0  # "database is locked" retries so far

    def experiment_id(self, name: str) -> str:
        if name not in self._experiment_ids:
            from .runs import experiment_id

            self._experiment_ids[name] = experiment_id(self.client, name)
        return self._experiment_ids[name]

    def find_local(self, key: str, experiment: str) -> str | None:
        """The MLflow id of the run tagged with local key ``key``, if any."""
        runs = self.client.search_runs([self.experiment_id(experiment)],
                                       filter_string=f"tags.`{LOCAL_TAG}` = '{key}'", max_results=1)
        return runs[0].info.run_id if runs else None

    def resolve(self, key: str) -> str:
        """MLflow run id of run key ``key`` (raises when the store has no such run)."""
        if key not in self._ids:
            if key.startswith(LOCAL_PREFIX):
                found = self.find_local(key, self.experiment)
                if found is None:
                    raise _gone(f"no run carries {LOCAL_TAG}={key}")
                self._ids[key] = found
            else:
                self._ids[key] = self.client.get_run(key).info.run_id
        return self._ids[key]

    def known_id(self, key: str) -> str:
        """The MLflow run id of ``key`` if it was resolved in this process, else ``key`` itself."""
        return self._ids.get(key, key)

    def run_exists(self, key: str) -> bool:
        """False when the store says there is no such run; other errors (store unreachable) propagate."""
        try:
            self.resolve(key)
            return True
        except Exception as err:  # noqa: BLE001
            if is_rejection(err):
                return False
            raise

    def skip_rejected(self, rec: dict[str, Any], err: BaseException) -> bool:
        """True (and the record's files removed, one warning per kind of record) when ``err`` is a rejection."""
        if not is_rejection(err):
            return False
        self.staged.discard(rec.get("staged"))
        if rec["op"] not in self._skipped_ops:
            self._skipped_ops.add(rec["op"])
            log.warning("MLflow rejected a %r record for run %s (%s); it is skipped", rec["op"], rec.get("run"),
                        short(err))
        return True

    def apply(self, rec: dict[str, Any], replaying: bool = False) -> Any:
        """Apply one record; returns the run's MLflow id. ``replaying``: the record may have been applied before.
        SQLite's "database is locked" (other writers on the same file) is retried here a few times, as a replay
        (idempotent), before it propagates and the outbox spools."""
        from .sqlite_init import is_sqlite_busy

        deadline, attempt = time.monotonic() + BUSY_RETRY_S, 0
        while True:
            try:
                return self._apply(rec, replaying or attempt > 0)
            except Exception as err:  # noqa: BLE001
                if not is_sqlite_busy(err) or time.monotonic() >= deadline:
                    raise
                attempt += 1
                self.busy_retries += 1
                log.info("SQLite store %s busy applying a %r record (%s); retry %d", self.uri, rec["op"],
                         short(err), attempt)
                time.sleep(BUSY_BACKOFF_S * attempt * (0.5 + random.random()))

    def _apply(self, rec: dict[str, Any], replaying: bool) -> Any:
        from mlflow.entities import Metric, Param, RunTag

        op, c = rec["op"], self.client
        if op == "create_run":
            # replaying: the run may have been created by an earlier attempt whose answer was lost
            rid = self.find_local(rec["run"], rec["experiment"]) if replaying else None
            if rid is None:
                run = c.create_run(self.experiment_id(rec["experiment"]), start_time=rec["time"],
                                   tags=rec["tags"], run_name=rec["name"])
                rid = run.info.run_id
            self._ids[rec["run"]] = rid
            return rid
        rid = self.resolve(rec["run"])
        files = self.staged.dir / rec["staged"] if rec.get("staged") else None
        if files is not None and not files.is_dir():
            raise _gone(f"staged files {files} are gone")  # skip it, do not block the spool
        if op == "resume":
            c.update_run(rid, status="RUNNING")
        elif op == "params":
            existing = c.get_run(rid).data.params
            items = [Param(k, v) for k, v in rec["params"].items() if k not in existing]
            for i in range(0, len(items), 100):
                c.log_batch(rid, params=items[i:i + 100])
        elif op == "metrics":
            ms = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in rec["metrics"]]
            for i in range(0, len(ms), 1000):
                c.log_batch(rid, metrics=ms[i:i + 1000])
        elif op == "tags":
            c.log_batch(rid, tags=[RunTag(k, str(v)) for k, v in rec["tags"].items()])
        elif op == "artifacts":
            c.log_artifacts(rid, str(files), rec.get("artifact_path"))
            self.staged.discard(rec["staged"])
        elif op == "model":
            import mlflow.pytorch

            self._log_model(rid, mlflow.pytorch.load_model(str(files / "model")), rec)
            self.staged.discard(rec["staged"])
        elif op == "terminate":
            c.set_terminated(rid, status=rec["status"], end_time=rec["time"])
        else:
            raise ValueError(f"unknown tracking record {op!r}")
        return rid

    def _log_model(self, rid: str, model: Any, rec: dict[str, Any]) -> None:
        import mlflow.pytorch

        exp_id = self.client.get_run(rid).info.experiment_id
        self._mlflow.set_tracking_uri(self.uri)
        self._mlflow.set_experiment(experiment_id=exp_id)  # LoggedModels go to the active experiment
        with _quiet("mlflow.pytorch"):
            info = mlflow.pytorch.log_model(model, name="model", run_id=rid, step=int(rec.get("step", 0)),
                                            registered_model_name=rec.get("register") or None,
                                            tags={"checkpoint": str(rec.get("checkpoint"))}, **_model_kwargs())
        self.client.set_tag(rid, "model_uri", info.model_uri)
        if rec.get("register"):
            self.client.set_tag(rid, "registered_model", str(rec["register"]))


def save_model(model: Any, path: Path) -> None:
    """Write ``model`` as an MLflow PyTorch model folder (what a ``model`` record stages)."""
    import mlflow.pytorch

    with _quiet("mlflow.pytorch"):
        mlflow.pytorch.save_model(model, str(path), **_model_kwargs())


def _model_kwargs() -> dict[str, Any]:
    import torch

    return {"serialization_format": "pickle",  # pt2 would trace the data-dependent gating
            "pip_requirements": [f"torch=={torch.__version__.split('+')[0]}"],
            "code_paths": [str(PACKAGE_DIR)]}  # spnet_dist travels with the model: loadable anywhere


class _quiet:
    """Raise a logger's level for a moment (MLflow warns about pickle, which is chosen on purpose)."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def __enter__(self) -> None:
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        self.logger.setLevel(self.level)
