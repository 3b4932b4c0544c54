"""MLflow tracking from rank 0 only; the run id is kept in checkpoints so a resumed job continues its run.

What a training run records (see README "Tracking and the MLflow UI"):

* params: the flattened resolved config; artifact ``config/resolved.yaml``;
* metrics, all with explicit steps (the global optimizer step): every scalar loss term, ``train/lr``,
  ``train/images_per_sec``; ``val/top1``, ``val/top5``, ``val/macs_per_image``, ``val/gflops_paper``
  (the papers' 2 x MACs convention), ``val/exec_rate`` and ``val/rate/<block>``; ``system/...`` samples;
* tags: method, backbone, target_rate, world_size, git commit, SLURM job id, the latest checkpoint;
* artifacts: ``block_rates/epoch_NNN_step_SSSSSSS.{csv,json}`` and ``block_rates/heatmap_...png`` per evaluation,
  ``checkpoints/<tag>.json`` per DeepSpeed save, and the final network as an MLflow PyTorch model ``model``.

Every call builds small records and hands them to the :class:`~.outbox.Outbox`: applied at once by the
:class:`~.store.Store` while it answers, else spooled and replayed later (by this tracker, the next tracker on the
same spool, or ``python -m spnet_dist.tracking.spool``). A run created while offline gets a local key
``local-<hex>`` (kept in the checkpoint) and the tag ``spnet.local_run_id``, by which the key is found again after
replay. Replay is idempotent: MLflow ignores a metric logged twice with the same key, value, timestamp and step;
params already present are skipped; a run is created only if no run carries its local key.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from .env import environment_tags, set_http_limits

log = logging.getLogger(__name__)


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """MLflow wrapper for the trainer. On ranks other than 0 (``enabled=False``) every method is a no-op.

    Keyword defaults are for direct use (tests, tools); a training run takes every value from the ``tracking``
    config group through :meth:`from_config` (configs/tracking/local.yaml is the one source of its defaults)."""

    def __init__(self, uri: str, experiment: str, enabled: bool = True, *, spool_dir: str | Path | None = None,
                 system_metrics: bool = False, system_metrics_interval: float = 10.0,
                 http_timeout: int | None = None, http_retries: int | None = None, retry_every_s: float = 30.0,
                 final_replay_s: float = 15.0, artifacts: bool = True, log_model: bool = False,
                 register_model: str | None = None, config: Any = None):
        self.enabled = enabled
        self.uri, self.experiment = str(uri), str(experiment)
        self.run_id: str | None = None  # the key the trainer keeps: MLflow run id, or local-<hex> until replayed
        if not enabled:
            return
        from .outbox import Outbox
        from .spool import Spool
        from .store import Store

        set_http_limits(self.uri, http_timeout, http_retries)
        self.spool = Spool(spool_dir if spool_dir else tempfile.mkdtemp(prefix="spnet-mlflow-spool-"))
        self.store = Store(self.uri, self.experiment, self.spool)
        self.outbox = Outbox(self.store, self.spool, retry_every_s)
        self.system_metrics, self.system_metrics_interval = system_metrics, system_metrics_interval
        self.final_replay_s = float(final_replay_s)
        self.artifacts, self.log_model_enabled, self.register_model = artifacts, log_model, register_model
        self.config = config
        self._sampler: Any = None
        self._step = 0
        self._speed: tuple[float, int] | None = None  # (time, images seen) at the last throughput reading
        self._t0 = time.perf_counter()
        self._images = 0

    @classmethod
    def from_config(cls, cfg: Any, enabled: bool = True) -> "Tracker":
        """Build from the ``tracking`` config group (keys and defaults: configs/tracking/local.yaml)."""
        t = cfg.tracking
        spool = t.spool_dir or str(Path(cfg.checkpoint.dir) / "mlflow_spool")
        return cls(t.uri, t.experiment, enabled=enabled, spool_dir=spool, system_metrics=bool(t.system_metrics),
                   system_metrics_interval=float(t.system_metrics_interval), http_timeout=t.http_timeout,
                   http_retries=t.http_retries, retry_every_s=float(t.retry_every_s),
                   final_replay_s=float(t.final_replay_s), artifacts=bool(t.artifacts),
                   log_model=bool(t.log_model), register_model=t.register_model, config=cfg)

    # ------------------------------------------------------------------ the API the trainer calls
    def start(self, run_id: str | None, run_name: str, tags: dict[str, str]) -> str | None:
        """Continue ``run_id`` if given and known to the store, else create a run. Returns the run key."""
        if not self.enabled:
            return None
        self.outbox.replay_pending()  # an earlier process left records: they go first
        tags = {**{k: str(v) for k, v in tags.items()}, **environment_tags(), "spnet.kind": "train"}
        if run_id:
            if not self.outbox.online or self._run_exists(run_id):
                self.run_id = run_id
                self._submit({"op": "resume", "run": run_id})
                self._submit({"op": "tags", "run": run_id, "tags": tags})
            else:
                log.warning("MLflow run %s from the checkpoint is not in the store; starting a new run", run_id)
        if self.run_id is None:
            from .store import LOCAL_PREFIX, LOCAL_TAG

            local = LOCAL_PREFIX + uuid.uuid4().hex
            rec = {"op": "create_run", "run": local, "experiment": self.experiment, "name": run_name,
                   "time": _now_ms(), "tags": {**tags, LOCAL_TAG: local}}
            self.run_id = self._submit(rec) or local
        self._log_config()
        if self.system_metrics:
            from .sysmetrics import SystemMetricsSampler

            self._sampler = SystemMetricsSampler(lambda m: self._metrics(m, self._step),
                                                 self.system_metrics_interval)
            self._sampler.start()
        return self.run_id

    def log_params(self, params: dict[str, Any]) -> None:
        if self.enabled:
            from ..config import redact

            self._submit({"op": "params", "run": self.run_id,
                          "params": {k: str(v)[:6000] for k, v in redact(dict(params)).items()}})

    def log_tags(self, tags: dict[str, Any]) -> None:
        if self.enabled:
            from ..config import redact

            self._submit({"op": "tags", "run": self.run_id, "tags": {k: str(v) for k, v in redact(dict(tags)).items()}})

    def log_metrics(self, metrics: dict[str, float], step: int, images_seen: int | None = None) -> None:
        """Log ``metrics`` at ``step``; with ``images_seen`` (global, cumulative) also ``train/images_per_sec``."""
        if not self.enabled:
            return
        self._step = int(step)
        metrics = dict(metrics)
        if images_seen is not None:
            now = time.perf_counter()
            if self._speed is not None and now > self._speed[0] and images_seen > self._speed[1]:
                metrics["train/images_per_sec"] = (images_seen - self._speed[1]) / (now - self._speed[0])
            self._speed = (now, int(images_seen))
            self._images = int(images_seen)
        self._metrics(metrics, step)

    def log_eval(self, metrics: dict[str, Any], step: int, epoch: int | None = None, table: Any = None) -> None:
        """Validation results: scalars as ``val/<key>``, per-block rates as ``val/rate/<block>``, and (per
        evaluation) the rate table as CSV + JSON and its heat map under ``block_rates/``."""
        if not self.enabled:
            return
        from .artifacts import finite, rate_rows, stage_rate_artifacts

        self._step = int(step)
        scalars = {f"val/{k}": float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and finite(v)}
        rates = metrics.get("block_rates")
        rows = rate_rows(rates, table) if isinstance(rates, (list, tuple)) and rates else []
        scalars.update({f"val/rate/{r['block']}": r["rate"] for r in rows})
        self._metrics(scalars, step)
        if rows and self.artifacts:
            rel, folder = self.spool.stage()
            stage_rate_artifacts(rows, folder, step, epoch)
            self._submit({"op": "artifacts", "run": self.run_id, "staged": rel, "artifact_path": "block_rates"})
        self._speed = None  # evaluation time is not training throughput

    def log_checkpoint(self, path: str | Path | None, step: int, epoch: int | None = None) -> None:
        """One DeepSpeed save: ``checkpoints/<tag>.json`` (location, tag, step, epoch) and the latest as tags."""
        if not self.enabled or path is None:
            return
        p = Path(path).resolve()
        info = {"tag": p.name, "dir": str(p.parent), "path": str(p), "step": int(step), "epoch": epoch,
                "time": _now_ms()}
        rel, folder = self.spool.stage()
        (folder / f"{p.name}.json").write_text(json.dumps(info, indent=1))
        self._submit({"op": "artifacts", "run": self.run_id, "staged": rel, "artifact_path": "checkpoints"})
        self._submit({"op": "tags", "run": self.run_id,
                      "tags": {"checkpoint": str(p), "checkpoint.tag": p.name, "checkpoint.step": str(step)}})
        self._speed = None

    def log_final(self, model: Any, checkpoint: str | Path | None, final: bool = True) -> None:
        """End of training: the latest checkpoint as tag; for a finished (not preempted) run the network as
        MLflow PyTorch model ``model`` (and a Model Registry version when ``tracking.register_model`` is set)."""
        if not self.enabled:
            return
        if checkpoint is not None:
            self._submit({"op": "tags", "run": self.run_id, "tags": {"checkpoint": str(Path(checkpoint).resolve())}})
        elapsed = time.perf_counter() - self._t0
        if self._images and elapsed > 0:
            self._metrics({"train/images_per_sec_overall": self._images / elapsed}, self._step)
        if final and self.log_model_enabled and model is not None:
            from .store import save_model, short

            rel, folder = self.spool.stage()
            try:  # serialise here: a local failure must not look like an unreachable store
                save_model(self._clean_model(model), folder / "model")
            except Exception as err:  # noqa: BLE001 - the checkpoint is the real result; the model is a copy
                self.spool.discard(rel)
                log.warning("the final model is not logged to MLflow (%s); the checkpoint %s has it",
                            short(err), checkpoint)
                return
            self._submit({"op": "model", "run": self.run_id, "step": self._step, "staged": rel,
                          "register": self.register_model, "checkpoint": str(checkpoint)})

    def finish(self, status: str = "FINISHED") -> str | None:
        """Close the run; try to replay what is spooled for up to ``final_replay_s``. Returns the run's MLflow id
        (its local key if it never reached the store)."""
        if not self.enabled or not self.run_id:
            return None
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        self._submit({"op": "terminate", "run": self.run_id, "status": status, "time": _now_ms()})
        left = self.outbox.close(self.final_replay_s)
        if left:
            log.info("MLflow store %s still unreachable: %d tracking records stay in %s; a run resumed from "
                     "this checkpoint directory replays them, or run: python -m spnet_dist.tracking.spool %s "
                     "--uri %s --experiment %s", self.uri, left, self.spool.file, self.spool.dir, self.uri,
                     self.experiment)
        elif left == 0:
            log.info("MLflow store %s reachable again: %d spooled tracking records replayed into run %s",
                     self.uri, self.outbox.replayed, self.store.known_id(self.run_id))
        return self.store.known_id(self.run_id)

    # ------------------------------------------------------------------ records
    def _submit(self, rec: dict[str, Any]) -> Any:
        return self.outbox.submit(rec)

    def _metrics(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            ts = _now_ms()
            self._submit({"op": "metrics", "run": self.run_id,
                          "metrics": [[k, float(v), ts, int(step)] for k, v in metrics.items()]})

    def _run_exists(self, key: str) -> bool:
        try:
            return self.store.run_exists(key)
        except Exception as err:  # noqa: BLE001 - the store is unreachable
            self.outbox.go_offline(err)
            return True  # cannot tell now: keep the key; replay resolves it

    def _log_config(self) -> None:
        if self.config is None:
            return
        from omegaconf import OmegaConf

        from ..config import redact

        text = OmegaConf.to_yaml(OmegaConf.create(redact(self.config)))  # resolved, secrets masked
        rel, folder = self.spool.stage()
        (folder / "resolved.yaml").write_text(text)
        self._submit({"op": "artifacts", "run": self.run_id, "staged": rel, "artifact_path": "config"})

    def _clean_model(self, model: Any) -> Any:
        """A fresh network with ``model``'s weights: the trained module carries DeepSpeed state (process groups on
        its parameters) that cannot be pickled. Falls back to ``model`` without a config."""
        cfg = self.config
        if cfg is None or not hasattr(cfg, "model") or not hasattr(cfg, "method"):
            return model
        from ..methods.build import build_from_config

        fresh, _ = build_from_config(cfg.model, cfg.method, pretrained=False)  # the weights come from ``model``
        fresh.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
        return fresh.eval()
