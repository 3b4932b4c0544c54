"""A SLURM job's training hook: record the MLflow run id in the job's ``events.jsonl`` as soon as the run exists,
so `spnet jobs status` names the run while the job is still training."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from ..engine.hook import Hook

log = logging.getLogger("spnet.launch")


class RunIdEvent(Hook):
    """Appends ``{"event": "tracking", "mlflow_run_id": ..., "step": ...}`` after the tracker started the run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def before_train(self, loop: Any) -> None:
        run_id = loop.progress.run_id
        if not run_id:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps({"event": "tracking", "time": time.time(), "mlflow_run_id": run_id,
                                    "step": loop.progress.step}) + "\n")
        except OSError as err:
            log.warning("could not record the MLflow run id in %s: %s", self.path, err)
