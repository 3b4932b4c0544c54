"""Where a tracking record goes: to the store while it answers, else to the spool, replayed in the background.

The first failure that is not the store rejecting the request itself (connection refused, timeout, 5xx,
"database is locked") switches to *offline*: one warning, and from then on records are appended to the spool
without touching the network, so training never waits on it. A background thread probes the store every
``retry_every_s`` and replays the spool in order; :meth:`Outbox.close` tries once more for a bounded time.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from .spool import Spool, replay
from .store import Store, short

log = logging.getLogger(__name__)


class Outbox:
    """Delivers records to ``store`` or ``spool``, in the order they were submitted."""

    def __init__(self, store: Store, spool: Spool, retry_every_s: float = 30.0):
        self.store, self.spool = store, spool
        self.retry_every_s = float(retry_every_s)
        self._lock = threading.RLock()          # spool, mode and the order of records
        self._replay_lock = threading.Lock()    # one replay at a time
        self._online = True
        self._warned = False
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.last_error: BaseException | None = None
        self.replayed = 0

    @property
    def online(self) -> bool:
        with self._lock:
            return self._online

    def submit(self, rec: dict[str, Any]) -> Any:
        """Apply ``rec`` now when online, else (or when that fails for a reason other than a rejection) spool it.
        Returns what the store returned (the MLflow run id), or None when spooled or rejected."""
        with self._lock:
            if self._online:
                try:
                    return self.store.apply(rec)
                except Exception as err:  # noqa: BLE001 - tracking must never stop training
                    if self.store.skip_rejected(rec, err):
                        return None
                    self.go_offline(err)
            self.spool.append(rec)
        return None

    def go_offline(self, err: BaseException | None, pending: bool = False) -> None:
        """Spool from now on (one warning per process) and start the background replay."""
        with self._lock:
            self._online = False
            if not self._warned:
                self._warned = True
                what = "records left by an earlier run could not be replayed" if pending else "unreachable"
                log.warning("MLflow tracking store %s: %s (%s). Training goes on; tracking records are kept in %s "
                            "and replayed when the store answers again (retry every %gs and at the end).",
                            self.store.uri, what, short(err) if err else "?", self.spool.file, self.retry_every_s)
            if self._worker is None and not self._stop.is_set():
                self._worker = threading.Thread(target=self._retry_loop, name="spnet-mlflow-replay", daemon=True)
                self._worker.start()

    def replay_pending(self) -> None:
        """Records an earlier process left go first; when they cannot, go offline."""
        if len(self.spool) and not self.replay():
            self.go_offline(self.last_error, pending=True)

    def replay(self, wait: float = -1) -> bool:
        """Apply the spooled records in order; True when the spool is empty (and the outbox online again).
        ``wait``: seconds to wait for a replay already running in another thread (-1: as long as it takes)."""
        if not self._replay_lock.acquire(timeout=wait):
            return False
        try:
            done, err = replay(self.spool, lambda rec: self.store.apply(rec, replaying=True),
                               self.store.skip_rejected, self._lock, self._back_online)
            self.replayed += done
            if err is not None:
                self.last_error = err
            return err is None
        finally:
            self._replay_lock.release()

    def close(self, final_replay_s: float) -> int | None:
        """Stop the background replay; when offline, keep replaying for up to ``final_replay_s``.
        Returns the number of records left in the spool, or None when the store answered throughout."""
        self._stop.set()
        worker = self._worker
        if worker is not None:
            worker.join(timeout=final_replay_s)
        if self.online:
            return None
        deadline = time.monotonic() + final_replay_s
        while not self.replay(wait=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                break
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        return len(self.spool)

    def _back_online(self) -> None:
        self._online = True

    def _retry_loop(self) -> None:
        while not self._stop.wait(self.retry_every_s):
            if self.replay():
                log.info("MLflow store %s reachable again: %d spooled tracking records replayed; logging directly "
                         "again", self.store.uri, self.replayed)
                break
        with self._lock:
            self._worker = None
