"""System metrics (CPU, memory, disk, network, GPU when pynvml is there) sampled by MLflow's own monitors.

MLflow's ``SystemMetricsMonitor`` logs straight to the store from its thread and stops for good at the first
failed request; this sampler reuses the same monitor classes and metric names (``system/...``, shown in the UI's
"System metrics" tab) but hands each sample to the tracker, so samples share the tracker's spool and replay when
the store is unreachable. The step of a sample is the last training step the tracker saw.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)


def _monitors() -> list:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
    from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

    mons = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        mons.append(GPUMonitor())
    except Exception:  # noqa: BLE001 - no NVIDIA GPU or no pynvml
        pass
    return mons


class SystemMetricsSampler:
    def __init__(self, publish: Callable[[dict[str, float]], None], interval: float, node_id: str | None = None):
        self.publish = publish
        self.interval = max(0.1, float(interval))
        self.prefix = "system/" + (f"{node_id}/" if node_id else "")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self.monitors = _monitors()
            for m in self.monitors:  # the first psutil.cpu_percent() reading is meaningless; prime it
                m.collect_metrics()
                m.clear_metrics()
        except Exception as err:  # noqa: BLE001 - system metrics are a convenience
            log.warning("system metrics disabled: %s", err)
            return
        self._thread = threading.Thread(target=self._loop, name="spnet-system-metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception as err:  # noqa: BLE001
                log.debug("system metrics sample failed: %s", err)

    def sample(self) -> None:
        values: dict[str, float] = {}
        for m in self.monitors:
            m.collect_metrics()
            values.update(m.aggregate_metrics())
            m.clear_metrics()
        self.publish({self.prefix + k: float(v) for k, v in values.items()})

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
