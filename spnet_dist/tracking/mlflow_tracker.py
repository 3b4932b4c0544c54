"""MLflow tracking from rank 0 only; the run id is kept in checkpoints so a resumed job continues its run.

What a training run records (see README "Tracking and the MLflow UI"):

* params: the flattened resolved config; artifact ``config/resolved.yaml``;
* metrics, all with explicit steps (the global optimizer step): every scalar loss term, ``train/lr``,
  ``train/images_per_sec``; ``val/top1``, ``val/top5``, ``val/macs_per_image``, ``val/gflops_paper``
  (the papers' 2 x MACs convention), ``val/exec_rate`` and ``val/rate/<block>``; ``system/...`` samples;
* tags: method, backbone, target_rate, world_size, git commit, SLURM job id, the latest checkpoint;
* artifacts: ``block_rates/epoch_NNN_step_SSSSSSS.{csv,json}`` and ``block_rates/heatmap_...png`` per evaluation,
  ``checkpoints/<tag>.json`` per DeepSpeed save, and the final network as an MLflow PyTorch model ``model``.

Robustness: every operation is a small record. While the store answers, records are applied at once. The first
failure that is not the store rejecting the request itself (connection refused, timeout, 5xx, "database is
locked") switches the tracker to *offline*: one warning, and from then on records are appended to a JSONL spool
(``tracking.spool_dir``, by default next to the checkpoints) without touching the network, so training never
waits on it. A background thread probes the store every ``tracking.retry_every_s`` and replays the spool in order;
:meth:`Tracker.finish` tries once more for up to ``tracking.final_replay_s``. Whatever is still spooled then is
replayed by the next tracker that uses the same spool (a resumed job) or by ``python -m spnet_dist.tracking.spool``.
A run created while offline gets a local key ``local-<hex>`` (kept in the checkpoint) and the tag
``spnet.local_run_id``, by which the key is found again after replay. Replay is idempotent: MLflow ignores a
metric logged twice with the same key, value, timestamp and step; params already present are skipped; a run is
created only if no run carries its local key.
"""
from __future__ import annotations

import getpass
import logging
import os
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .spool import Spool

log = logging.getLogger(__name__)

# MLflow error codes meaning "the store answered and refused this request": retrying cannot help.
PERMANENT_ERRORS = {"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                    "BAD_REQUEST", "INVALID_STATE", "NOT_FOUND", "MALFORMED_REQUEST"}
LOCAL_PREFIX = "local-"
LOCAL_TAG = "spnet.local_run_id"
PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _permanent(err: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(err, MlflowException) and err.error_code in PERMANENT_ERRORS


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text[:240] + ("..." if len(text) > 240 else "")


def _now_ms() -> int:
    return int(time.time() * 1000)


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


class Tracker:
    """MLflow wrapper for the trainer. On ranks other than 0 every method is a no-op."""

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
        if self.uri.startswith(("http://", "https://")):
            if http_timeout is not None:
                os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(int(http_timeout))
            if http_retries is not None:
                os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(int(http_retries))
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        import mlflow

        mlflow.set_tracking_uri(self.uri)
        self._mlflow = mlflow
        self._client = mlflow.MlflowClient(tracking_uri=self.uri)
        self.spool = Spool(spool_dir if spool_dir else tempfile.mkdtemp(prefix="spnet-mlflow-spool-"))
        self.system_metrics, self.system_metrics_interval = system_metrics, system_metrics_interval
        self.retry_every_s, self.final_replay_s = float(retry_every_s), float(final_replay_s)
        self.artifacts, self.log_model_enabled, self.register_model = artifacts, log_model, register_model
        self.config = config
        self._lock = threading.RLock()          # spool, mode and the order of records
        self._replay_lock = threading.Lock()    # one replay at a time
        self._online = True
        self._warned = False
        self._dropped_ops: set[str] = set()
        self._ids: dict[str, str] = {}           # run key -> MLflow run id
        self._experiment_ids: dict[str, str] = {}
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._sampler = None
        self._step = 0
        self._speed: tuple[float, int] | None = None  # (time, images seen) at the last throughput reading
        self._t0 = time.perf_counter()
        self._images = 0
        self.replayed = 0

    @classmethod
    def from_config(cls, cfg: Any, enabled: bool = True) -> "Tracker":
        """Build from the ``tracking`` config group (keys: configs/tracking/local.yaml)."""
        t = cfg.tracking
        spool = t.get("spool_dir") or str(Path(cfg.checkpoint.dir) / "mlflow_spool")
        return cls(t.uri, t.experiment, enabled=enabled, spool_dir=spool,
                   system_metrics=bool(t.get("system_metrics", False)),
                   system_metrics_interval=float(t.get("system_metrics_interval", 10.0)),
                   http_timeout=t.get("http_timeout"), http_retries=t.get("http_retries"),
                   retry_every_s=float(t.get("retry_every_s", 30.0)),
                   final_replay_s=float(t.get("final_replay_s", 15.0)),
                   artifacts=bool(t.get("artifacts", True)), log_model=bool(t.get("log_model", False)),
                   register_model=t.get("register_model"), config=cfg)

    # ------------------------------------------------------------------ public API (called by the trainer)
    def start(self, run_id: str | None, run_name: str, tags: dict[str, str]) -> str | None:
        """Continue ``run_id`` if given and known to the store, else create a run. Returns the run key."""
        if not self.enabled:
            return None
        if len(self.spool):  # an earlier process left records: they go first
            if not self._replay():
                self._go_offline(self._last_error, pending=True)
        tags = {**{k: str(v) for k, v in tags.items()}, **environment_tags(), "spnet.kind": "train"}
        if run_id:
            with self._lock:
                online = self._online
            if not online or self._run_exists(run_id):
                self.run_id = run_id
                self._submit({"op": "resume", "run": run_id})
                self._submit({"op": "tags", "run": run_id, "tags": tags})
            else:
                log.warning("MLflow run %s from the checkpoint is not in the store; starting a new run", run_id)
        if self.run_id is None:
            local = LOCAL_PREFIX + uuid.uuid4().hex
            rec = {"op": "create_run", "run": local, "experiment": self.experiment, "name": run_name,
                   "time": _now_ms(), "tags": {**tags, LOCAL_TAG: local}}
            real = self._submit(rec)
            self.run_id = real or local
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
        from .artifacts import finite, rate_rows

        self._step = int(step)
        scalars = {f"val/{k}": float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and finite(v)}
        rates = metrics.get("block_rates")
        rows = rate_rows(rates, table) if isinstance(rates, (list, tuple)) and rates else []
        scalars.update({f"val/rate/{r['block']}": r["rate"] for r in rows})
        self._metrics(scalars, step)
        if rows and self.artifacts:
            self._log_rate_artifacts(rows, step, epoch)
        self._speed = None  # evaluation time is not training throughput

    def log_checkpoint(self, path: str | Path | None, step: int, epoch: int | None = None) -> None:
        """One DeepSpeed save: ``checkpoints/<tag>.json`` (location, tag, step, epoch) and the latest as tags."""
        if not self.enabled or path is None:
            return
        import json

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
            rel, folder = self.spool.stage()
            try:  # serialise here: a local failure must not look like an unreachable store
                self._save_model(self._clean_model(model), folder / "model")
            except Exception as err:  # noqa: BLE001 - the checkpoint is the real result; the model is a copy
                self.spool.discard(rel)
                log.warning("the final model is not logged to MLflow (%s); the checkpoint %s has it",
                            _short(err), checkpoint)
                return
            self._submit({"op": "model", "run": self.run_id, "step": self._step, "staged": rel,
                          "register": self.register_model, "checkpoint": str(checkpoint)})

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled:
            self._submit({"op": "tags", "run": self.run_id, "tags": {k: str(v) for k, v in tags.items()}})

    def log_dict(self, data: dict, path: str) -> None:
        if self.enabled:
            import json

            rel, folder = self.spool.stage()
            (folder / Path(path).name).write_text(json.dumps(data, indent=1))
            self._submit({"op": "artifacts", "run": self.run_id, "staged": rel,
                          "artifact_path": str(Path(path).parent) if Path(path).parent != Path(".") else None})

    def finish(self, status: str = "FINISHED") -> str | None:
        """Close the run; try to replay what is spooled for up to ``final_replay_s``. Returns the run's MLflow id
        (its local key if it never reached the store)."""
        if not self.enabled or not self.run_id:
            return None
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None
        self._submit({"op": "terminate", "run": self.run_id, "status": status, "time": _now_ms()})
        self._stop.set()
        worker = self._worker
        if worker is not None:
            worker.join(timeout=self.final_replay_s)
        with self._lock:
            offline = not self._online
        if offline:
            deadline = time.monotonic() + self.final_replay_s
            while not self._replay(wait=max(0.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    break
                time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            left = len(self.spool)
            if left:
                log.info("MLflow store %s still unreachable: %d tracking records stay in %s; a run resumed from "
                         "this checkpoint directory replays them, or run: python -m spnet_dist.tracking.spool %s "
                         "--uri %s --experiment %s", self.uri, left, self.spool.file, self.spool.dir, self.uri,
                         self.experiment)
            else:
                log.info("MLflow store %s reachable again: %d spooled tracking records replayed into run %s",
                         self.uri, self.replayed, self._ids.get(self.run_id, self.run_id))
        return self._ids.get(self.run_id, self.run_id)

    @property
    def online(self) -> bool:
        return self.enabled and self._online

    # ------------------------------------------------------------------ records
    def _metrics(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            ts = _now_ms()
            self._submit({"op": "metrics", "run": self.run_id,
                          "metrics": [[k, float(v), ts, int(step)] for k, v in metrics.items()]})

    def _log_config(self) -> None:
        if self.config is None:
            return
        from omegaconf import OmegaConf

        from ..config import redact

        text = OmegaConf.to_yaml(OmegaConf.create(redact(self.config)))  # resolved, secrets masked
        rel, folder = self.spool.stage()
        (folder / "resolved.yaml").write_text(text)
        self._submit({"op": "artifacts", "run": self.run_id, "staged": rel, "artifact_path": "config"})

    def _log_rate_artifacts(self, rows: list[dict[str, Any]], step: int, epoch: int | None) -> None:
        from .artifacts import rate_heatmap, write_rate_table

        label = (f"epoch_{epoch:03d}_" if epoch is not None else "") + f"step_{step:07d}"
        rel, folder = self.spool.stage()
        try:
            write_rate_table(rows, folder / f"{label}.csv", folder / f"{label}.json",
                             {"step": step, "epoch": epoch})
            title = (f"per-block execution rate, epoch {epoch}" if epoch is not None else "per-block execution rate")
            fig = rate_heatmap(rows, f"{title} (step {step})")
            fig.savefig(folder / f"heatmap_{label}.png")
        except Exception as err:  # noqa: BLE001 - a figure must never stop training
            log.warning("could not draw the block-rate artifacts: %s", _short(err))
        self._submit({"op": "artifacts", "run": self.run_id, "staged": rel, "artifact_path": "block_rates"})

    def _submit(self, rec: dict[str, Any]) -> Any:
        """Apply ``rec`` now when online, else (or when that fails for a reason other than a rejection) spool it."""
        with self._lock:
            if self._online:
                try:
                    return self._apply(rec)
                except Exception as err:  # noqa: BLE001 - tracking must never stop training
                    if _permanent(err):
                        self._dropped(rec, err)
                        return None
                    self._go_offline(err)
            self._to_spool(rec)
        return None

    def _to_spool(self, rec: dict[str, Any]) -> None:
        self.spool.append(rec)

    def _go_offline(self, err: BaseException | None, pending: bool = False) -> None:
        with self._lock:
            self._online = False
            if not self._warned:
                self._warned = True
                what = "records left by an earlier run could not be replayed" if pending else "unreachable"
                log.warning("MLflow tracking store %s: %s (%s). Training goes on; tracking records are kept in %s "
                            "and replayed when the store answers again (retry every %gs and at the end).",
                            self.uri, what, _short(err) if err else "?", self.spool.file, self.retry_every_s)
            if self._worker is None and not self._stop.is_set():
                self._worker = threading.Thread(target=self._retry_loop, name="spnet-mlflow-replay", daemon=True)
                self._worker.start()

    def _retry_loop(self) -> None:
        while not self._stop.wait(self.retry_every_s):
            if self._replay():
                log.info("MLflow store %s reachable again: %d spooled tracking records replayed; logging directly "
                         "again", self.uri, self.replayed)
                break
        with self._lock:
            self._worker = None

    def _replay(self, wait: float = -1) -> bool:
        """Apply the spooled records in order; True when the spool is empty (and the tracker is online again).
        ``wait``: seconds to wait for a replay already running in another thread (-1: as long as it takes)."""
        if not self._replay_lock.acquire(timeout=wait):
            return False
        try:
            while True:
                with self._lock:
                    records = self.spool.read()
                    if not records:
                        self._online = True
                        return True
                done, ok = 0, True
                for rec in records:
                    try:
                        self._apply(rec, replaying=True)
                    except Exception as err:  # noqa: BLE001
                        if _permanent(err):
                            self._dropped(rec, err)
                        else:
                            self._last_error, ok = err, False
                            break
                    done += 1
                with self._lock:
                    self.spool.drop_first(done)
                    self.replayed += done
                if not ok:
                    return False
        finally:
            self._replay_lock.release()

    _last_error: BaseException | None = None

    def _dropped(self, rec: dict[str, Any], err: BaseException) -> None:
        self.spool.discard(rec.get("staged"))
        if rec["op"] not in self._dropped_ops:
            self._dropped_ops.add(rec["op"])
            log.warning("MLflow rejected a %r record for run %s (%s); it is skipped", rec["op"], rec.get("run"),
                        _short(err))

    # ------------------------------------------------------------------ talking to the store
    def _experiment_id(self, name: str) -> str:
        if name not in self._experiment_ids:
            from mlflow.exceptions import MlflowException

            exp = self._client.get_experiment_by_name(name)
            if exp is None:
                try:
                    self._experiment_ids[name] = self._client.create_experiment(name)
                except MlflowException as err:  # created meanwhile by another process
                    if err.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                    self._experiment_ids[name] = self._client.get_experiment_by_name(name).experiment_id
            else:
                self._experiment_ids[name] = exp.experiment_id
        return self._experiment_ids[name]

    def _find_local(self, key: str, experiment: str) -> str | None:
        runs = self._client.search_runs([self._experiment_id(experiment)],
                                        filter_string=f"tags.`{LOCAL_TAG}` = '{key}'", max_results=1)
        return runs[0].info.run_id if runs else None

    def _resolve(self, key: str) -> str:
        if key not in self._ids:
            if key.startswith(LOCAL_PREFIX):
                found = self._find_local(key, self.experiment)
                if found is None:
                    from mlflow.exceptions import MlflowException

                    raise MlflowException(f"no run carries {LOCAL_TAG}={key}", error_code="RESOURCE_DOES_NOT_EXIST")
                self._ids[key] = found
            else:
                self._ids[key] = self._client.get_run(key).info.run_id
        return self._ids[key]

    def _run_exists(self, key: str) -> bool:
        try:
            self._resolve(key)
            return True
        except Exception as err:  # noqa: BLE001
            if _permanent(err):
                return False
            self._go_offline(err)
            return True  # cannot tell now: keep the key; replay resolves it

    def _apply(self, rec: dict[str, Any], replaying: bool = False) -> Any:
        from mlflow.entities import Metric, Param, RunTag

        op, c = rec["op"], self._client
        if op == "create_run":
            # replaying: the run may have been created by an earlier attempt whose answer was lost
            rid = self._find_local(rec["run"], rec["experiment"]) if replaying else None
            if rid is None:
                run = c.create_run(self._experiment_id(rec["experiment"]), start_time=rec["time"],
                                   tags=rec["tags"], run_name=rec["name"])
                rid = run.info.run_id
            self._ids[rec["run"]] = rid
            return rid
        rid = self._resolve(rec["run"])
        if rec.get("staged") and not (self.spool.dir / rec["staged"]).is_dir():
            from mlflow.exceptions import MlflowException

            raise MlflowException(f"staged files {self.spool.dir / rec['staged']} are gone",
                                  error_code="RESOURCE_DOES_NOT_EXIST")  # permanent: skip, do not block the spool
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
            c.log_artifacts(rid, str(self.spool.dir / rec["staged"]), rec.get("artifact_path"))
            self.spool.discard(rec["staged"])
        elif op == "model":
            import mlflow.pytorch

            model = mlflow.pytorch.load_model(str(self.spool.dir / rec["staged"] / "model"))
            self._log_model(rid, model, rec)
            self.spool.discard(rec["staged"])
        elif op == "terminate":
            c.set_terminated(rid, status=rec["status"], end_time=rec["time"])
        else:
            raise ValueError(f"unknown tracking record {op!r}")
        return rid

    # ------------------------------------------------------------------ the model
    @staticmethod
    def _model_kwargs() -> dict[str, Any]:
        import torch

        return {"serialization_format": "pickle",  # pt2 would trace the data-dependent gating
                "pip_requirements": [f"torch=={torch.__version__.split('+')[0]}"],
                "code_paths": [str(PACKAGE_DIR)]}  # spnet_dist travels with the model: loadable anywhere

    def _clean_model(self, model: Any) -> Any:
        """A fresh network with ``model``'s weights: the trained module carries DeepSpeed state (process groups on
        its parameters) that cannot be pickled. Falls back to ``model`` without a config."""
        cfg = self.config
        if cfg is None or not hasattr(cfg, "model") or not hasattr(cfg, "method"):
            return model
        import copy

        from ..methods import prepare_method_cfg
        from ..models import build_model

        model_cfg = copy.deepcopy(cfg.model)
        if "pretrained" in model_cfg:
            model_cfg.pretrained = None  # the weights come from the trained network
        fresh = build_model(model_cfg, prepare_method_cfg(cfg.method, model_cfg))
        fresh.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
        return fresh.eval()

    def _save_model(self, model: Any, path: Path) -> None:
        import mlflow.pytorch

        with _quiet("mlflow.pytorch"):
            mlflow.pytorch.save_model(model, str(path), **self._model_kwargs())

    def _log_model(self, rid: str, model: Any, rec: dict[str, Any]) -> None:
        import mlflow.pytorch

        exp_id = self._client.get_run(rid).info.experiment_id
        self._mlflow.set_tracking_uri(self.uri)
        self._mlflow.set_experiment(experiment_id=exp_id)  # LoggedModels go to the active experiment
        with _quiet("mlflow.pytorch"):
            info = mlflow.pytorch.log_model(model, name="model", run_id=rid, step=int(rec.get("step", 0)),
                                            registered_model_name=rec.get("register") or None,
                                            tags={"checkpoint": str(rec.get("checkpoint"))},
                                            **self._model_kwargs())
        self._client.set_tag(rid, "model_uri", info.model_uri)
        if rec.get("register"):
            self._client.set_tag(rid, "registered_model", str(rec["register"]))


class _quiet:
    """Raise a logger's level for a moment (MLflow warns about pickle, which is chosen on purpose)."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def replay_spool(spool_dir: str | Path, uri: str, experiment: str = "spnet") -> int:
    """Replay a spool into ``uri`` (outside training); returns the number of records left."""
    t = Tracker(uri, experiment, spool_dir=spool_dir)
    t._replay()
    return len(t.spool)
