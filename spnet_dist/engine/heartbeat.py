"""A heartbeat between the ranks: which rank stopped answering, and an end to a run that a frozen rank holds.

Every rank of a multi-rank run starts :func:`start` right after the process group exists. A daemon thread
increments the rank's counter in the rendezvous store (its own TCPStore connection to MASTER_ADDR:MASTER_PORT)
every ``INTERVAL_S`` seconds and reads every rank's counter back in one round trip. A rank whose counter has not
moved for ``stale_s`` seconds (= ``trainer.collective_timeout_s``), or a store that has not answered for that
long (its host, rank 0 or torchrun's agent, is frozen or gone), is *lost*.

Two ways out, whichever comes first:

* The collective the survivors wait in raises (gloo: ``Connection reset by peer`` at once when a peer died,
  ``Timed out waiting ...`` after the process-group timeout when it froze). :func:`peer_failure` classifies that
  error, waits ``PROBE_S`` for the heartbeat to show which ranks stopped beating, and returns the diagnosis.
* The watcher found a lost rank but the main thread is still stuck after ``grace_s`` (somewhere no timeout
  reaches): it reports the diagnosis and ends the process with :data:`EXIT_RANK_LOST`.

``set_reporter`` lets the launcher (local spawn, SLURM task) hand the diagnosis on: one line, an event.
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
from typing import Any, Callable

from .preempt import EXIT_RANK_LOST

INTERVAL_S = 2.0
PROBE_S = 2 * INTERVAL_S + 0.5
PEER_ERROR_TEXT = ("connection reset by peer", "connection closed by peer", "timed out waiting", "broken pipe",
                   "connection refused", "socket timeout", "recv operation", "send operation", "pair.cc",
                   "unbound_buffer.cc", "no route to host", "stopped answering")

_beat: "Heartbeat | None" = None
_reporter: list[Callable[[dict[str, Any]], None]] = []
_reported = threading.Event()


class Heartbeat(threading.Thread):
    def __init__(self, host: str, port: int, rank: int, world: int, stale_s: float) -> None:
        super().__init__(name="spnet-heartbeat", daemon=True)
        import torch.distributed as dist

        self.rank, self.world, self.stale_s = rank, world, float(stale_s)
        self.where = f"{host}:{port}"
        self.grace_s = max(10.0, 0.25 * self.stale_s)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"spnet/hb/{restart}/"
        self.store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=max(5.0, 2 * INTERVAL_S)))
        self.keys = [f"{self.prefix}{r}" for r in range(world)]
        self.node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        self.store.set(f"{self.prefix}info/{rank}", json.dumps({"node": self.node, "pid": os.getpid()}))
        self.store.add(self.keys[rank], 1)
        self.store.wait(self.keys, datetime.timedelta(seconds=max(60.0, self.stale_s)))  # every rank beat once
        self.info = {r: json.loads(self.store.get(f"{self.prefix}info/{r}")) for r in range(world)}
        now = time.monotonic()
        self.last_value: dict[int, bytes] = {}
        self.last_change = {r: now for r in range(world)}
        self.store_ok_at = now
        self.lost: list[dict[str, Any]] = []
        self.lost_at: float | None = None
        self.frozen_s = 0.0  # this rank itself stood still this long (SIGSTOP, a stalled machine)
        self.tick = now
        self.halt = threading.Event()

    def run(self) -> None:
        self.tick = time.monotonic()
        while not self.halt.wait(INTERVAL_S):
            now = time.monotonic()
            self.check_self(now)
            self.tick = now
            try:
                self.store.add(self.keys[self.rank], 1)
                values = self.store.multi_get(self.keys)
                now = time.monotonic()
                self.store_ok_at = now
                for r, v in enumerate(values):
                    if self.last_value.get(r) != v:
                        self.last_value[r], self.last_change[r] = v, now
            except Exception:  # noqa: BLE001 - the store's host is frozen or gone: judged by staleness below
                pass
            if not self.lost and not self.frozen_s:
                found = self.stale(now, since=now - self.stale_s)
                if found:
                    self.lost, self.lost_at = found, now
                    print(f"spnet: rank {self.rank}: {describe(found)}", file=sys.stderr, flush=True)
            elif self.lost_at is not None and now - self.lost_at >= self.grace_s:
                report(diagnosis(self.rank, self.lost, "the watchdog ended the stuck rank"))
                print(f"spnet train: rank {self.rank}: {describe(self.lost)}; this rank was still waiting after "
                      f"{self.grace_s:.0f} s more: ending it (exit {EXIT_RANK_LOST})", file=sys.stderr, flush=True)
                os._exit(EXIT_RANK_LOST)

    def check_self(self, now: float) -> None:
        """A long gap since the last beat: this rank itself was stopped; the others are not to blame."""
        if now - self.tick > max(3 * INTERVAL_S, 0.5 * self.stale_s):
            self.frozen_s = max(self.frozen_s, now - self.tick)
            self.last_change = {r: now for r in self.last_change}
            self.store_ok_at = now

    def stale(self, now: float, since: float) -> list[dict[str, Any]]:
        """The ranks (or the store) silent since monotonic time ``since``."""
        if self.store_ok_at < since:
            host = "torchrun's agent" if "TORCHELASTIC_RUN_ID" in os.environ else "rank 0"
            return [{**self._who(0), "silent_s": round(now - self.store_ok_at, 1),
                     "what": f"the rendezvous store at {self.where} ({host})"}]
        return [{**self._who(r), "silent_s": round(now - self.last_change[r], 1), "stale_s": self.stale_s}
                for r in range(self.world) if r != self.rank and self.last_change[r] < since]

    def _who(self, r: int) -> dict[str, Any]:
        return {"rank": r, **self.info.get(r, {})}


def describe(lost: list[dict[str, Any]]) -> str:
    parts = []
    for x in lost:
        who = x.get("what") or f"rank {x['rank']}"
        where = ", ".join(f"{k} {x[k]}" for k in ("node", "pid") if x.get(k) is not None)
        parts.append(f"{who} ({where}) stopped answering: no heartbeat for {x['silent_s']:.0f} s")
    return "; ".join(parts)


def diagnosis(rank: int, lost: list[dict[str, Any]], error: str) -> dict[str, Any]:
    return {"rank": rank, "lost": lost, "error": error, "message": describe(lost) if lost else error}


def start(rank: int, world: int, stale_s: float) -> None:
    """Start this rank's heartbeat (no-op for one rank, or when already running)."""
    global _beat
    if world <= 1 or _beat is not None:
        return
    _reported.clear()
    _beat = Heartbeat(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), rank, world, stale_s)
    _beat.start()


def stop() -> None:
    """End the heartbeat and wait for its thread: a daemon thread still inside a store call when the interpreter
    exits ends the process with std::terminate (SIGABRT, "terminate called without an active exception")."""
    global _beat
    if _beat is not None:
        beat, _beat = _beat, None
        beat.halt.set()
        if beat is not threading.current_thread():
            beat.join(timeout=3 * max(5.0, 2 * INTERVAL_S))  # a store call ends within its own timeout


def set_reporter(fn: Callable[[dict[str, Any]], None] | None) -> None:
    """``fn(diagnosis)`` is called once when this rank gives up on a lost peer (both ways out)."""
    _reporter.clear()
    if fn is not None:
        _reporter.append(fn)


def report(diag: dict[str, Any]) -> None:
    if _reported.is_set():
        return
    _reported.set()
    for fn in _reporter:
        try:
            fn(diag)
        except Exception as err:  # noqa: BLE001 - reporting must not hide the failure itself
            print(f"spnet: could not report the lost rank: {err}", file=sys.stderr, flush=True)


def _messages(err: BaseException) -> list[str]:
    out, seen = [], set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return out


def peer_failure(err: BaseException) -> dict[str, Any] | None:
    """The diagnosis when ``err`` ended this rank because a peer died or froze; None for any other error.

    A collective error (or any error once the watchdog found a lost rank) counts; the ranks whose heartbeat stops
    within ``PROBE_S`` are named."""
    beat = _beat
    if beat is None or isinstance(err, (KeyboardInterrupt, SystemExit)):
        return None
    text = " | ".join(_messages(err))
    collective = any(s in text.lower() for s in PEER_ERROR_TEXT) or "DistBackendError" in text \
        or "DistNetworkError" in text
    if not beat.lost and not collective:
        return None
    lost = beat.lost
    first = text.splitlines()[0] if text else ""
    beat.check_self(time.monotonic())
    if beat.frozen_s and not lost:
        return {**diagnosis(beat.rank, [], first[:300]), "frozen_s": round(beat.frozen_s, 1),
                "message": f"this rank stood still for {beat.frozen_s:.0f} s (stopped, or its machine stalled); "
                           f"the other ranks went on without it"}
    if not lost:
        t0 = time.monotonic()
        time.sleep(PROBE_S)
        lost = beat.stale(time.monotonic(), since=t0)
    diag = diagnosis(beat.rank, lost, first[:300])
    if not lost:
        diag["message"] = f"a collective failed ({first[:200]})"
    return diag
