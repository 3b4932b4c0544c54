"""A training hook of SLURM jobs and local multi-rank runs: record the MLflow run id in a JSON-lines file (a job's
``events.jsonl``) as soon as the run exists, so `spnet jobs status` names the run while the job is still training,
and a launcher can mark the run when its rank 0 dies."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from .hook import Hook

log = logging.getLogger("spnet.launch")


def absolute_uri(uri: str) -> str:
    """A relative ``sqlite:///x.db`` as an absolute one (another process in another folder opens the same file)."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).absolute())
    return uri


class RunIdEvent(Hook):
    """Appends ``{"event": "tracking", "mlflow_run_id": ..., "step": ..., "tracking_uri": ...}`` after the tracker started the run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def before_train(self, loop: Any) -> None:
        run_id = loop.progress.run_id
        if not run_id:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({"event": "tracking", "time": time.time(), "mlflow_run_id": run_id,
                                    "step": loop.progress.step, "tracking_uri": absolute_uri(
                                        str(loop.cfg.tracking.uri))}) + "\n")
        except OSError as err:
            log.warning("could not record the MLflow run id in %s: %s", self.path, err)
