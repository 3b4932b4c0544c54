"""A local, append-only JSONL journal of MLflow operations that could not reach the tracking store.

Every record is one JSON object per line, ``{"op": ..., "run": <run key>, ...}``, appended in the order the
trainer produced it; files an operation needs (figures, tables, a saved model) are copied under ``staging/``
first, so a record never points at something that may change. :func:`replay` applies the journal in order when
the store answers again and drops each record once it was applied; what applies a record is passed in (this
module imports neither the tracker nor the store at import time).

Replay by hand (e.g. the server was down until after training ended and the job will not resume)::

    python -m spnet_dist.tracking.spool outputs/checkpoints/mlflow_spool --uri http://host:5000 --experiment spnet
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, ContextManager

SPOOL_FILE = "spool.jsonl"


class Spool:
    """The journal ``<dir>/spool.jsonl`` and the staged files of its records (``<dir>/staging/<hex>/``)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.file = self.dir / SPOOL_FILE

    def append(self, record: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.file, "a+", encoding="utf-8") as f:
            if f.tell() > 0:  # a line torn by a crash mid-write must not swallow this record
                f.seek(f.tell() - 1)
                if f.read(1) != "\n":
                    f.write("\n")
            f.write(json.dumps(record, separators=(",", ":")) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """All complete records, oldest first (a line torn by a crash mid-write is skipped)."""
        if not self.file.is_file():
            return []
        out = []
        for line in self.file.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    def __len__(self) -> int:
        return len(self.read())

    def drop_first(self, n: int) -> None:
        """Remove the ``n`` oldest records (and torn lines among them); records appended meanwhile are kept.
        No file is left when nothing remains."""
        if n <= 0 or not self.file.is_file():
            return
        lines = self.file.read_text(encoding="utf-8").splitlines()
        i = dropped = 0
        while i < len(lines) and dropped < n:
            try:
                json.loads(lines[i])
                dropped += 1
            except json.JSONDecodeError:
                pass
            i += 1
        rest = [ln for ln in lines[i:] if ln.strip()]
        if not rest:
            self.file.unlink()
            self._prune_empty()
            return
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text("\n".join(rest) + "\n", encoding="utf-8")
        os.replace(tmp, self.file)

    def stage(self) -> tuple[str, Path]:
        """A fresh folder for the files of one record: (path relative to the spool folder, absolute path)."""
        rel = f"staging/{uuid.uuid4().hex}"
        path = self.dir / rel
        path.mkdir(parents=True, exist_ok=True)
        return rel, path

    def discard(self, rel: str | None) -> None:
        """Remove a record's staging folder once the record was applied."""
        if rel and rel.startswith("staging/"):
            shutil.rmtree(self.dir / rel, ignore_errors=True)
            self._prune_empty()

    def _prune_empty(self) -> None:
        """Leave nothing behind once everything is uploaded."""
        for folder in (self.dir / "staging", self.dir):
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue
            except OSError:  # not empty
                return


def replay(spool: Spool, apply: Callable[[dict[str, Any]], Any],
           skip: Callable[[dict[str, Any], BaseException], bool] = lambda rec, err: False,
           lock: ContextManager[Any] | None = None,
           on_empty: Callable[[], None] | None = None) -> tuple[int, BaseException | None]:
    """Apply the spooled records oldest first with ``apply``, dropping each applied one, until the spool is empty.

    A record whose ``apply`` fails is dropped too when ``skip(record, error)`` says so (the store refused it);
    any other failure stops the replay. ``lock`` is held while the spool is read or shortened (records may be
    appended meanwhile); ``on_empty`` runs under it once the spool is empty. Returns (records applied or
    skipped, the error that stopped the replay or None).
    """
    lock = lock if lock is not None else contextlib.nullcontext()
    total = 0
    while True:
        with lock:
            records = spool.read()
            if not records:
                if on_empty is not None:
                    on_empty()
                return total, None
        done, error = 0, None
        for rec in records:
            try:
                apply(rec)
            except Exception as err:  # noqa: BLE001 - tracking must never stop training
                if not skip(rec, err):
                    error = err
                    break
            done += 1
        with lock:
            spool.drop_first(done)
        total += done
        if error is not None:
            return total, error


def replay_spool(spool_dir: str | Path, uri: str, experiment: str = "spnet") -> int:
    """Replay a spool into ``uri`` (outside training); returns the number of records left."""
    from .store import Store  # the store does not import this module: no cycle

    spool = Spool(spool_dir)
    store = Store(uri, experiment, spool)
    replay(spool, lambda rec: store.apply(rec, replaying=True), store.skip_rejected)
    return len(spool)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spnet_dist.tracking.spool",
                                description="replay a tracking spool into an MLflow store")
    p.add_argument("spool_dir")
    p.add_argument("--uri", required=True)
    p.add_argument("--experiment", default="spnet")
    args = p.parse_args(argv)
    left = replay_spool(args.spool_dir, args.uri, args.experiment)
    print(json.dumps({"spool": args.spool_dir, "uri": args.uri, "records_left": left}))
    return 0 if left == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
