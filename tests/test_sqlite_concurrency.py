"""Concurrent first use of a SQLite MLflow store: created and migrated once under ``<db>.init.lock``.

Without the lock, processes opening a fresh file together race MLflow's table creation and alembic migrations
("duplicate column name: step", "table ... already exists") and some of them crash.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import last_json, tiny_train_args
from spnet_dist.tracking import sqlite_init
from spnet_dist.tracking.sqlite_init import ensure_sqlite_store, is_sqlite_busy, lock_path, sqlite_path


def _init_and_use(uri: str, barrier, results) -> None:  # a spawned process: opens the store with the others
    try:
        barrier.wait(timeout=120)
        from spnet_dist.tracking.runs import experiment_id
        from spnet_dist.tracking.sqlite_init import client

        c = client(uri)
        experiment_id(c, "together")  # every process also creates (or finds) the same experiment
        results.put("ok")
    except Exception as err:  # noqa: BLE001 - reported to the test
        results.put(f"{type(err).__name__}: {' '.join(str(err).split())[:300]}")


def test_four_processes_create_a_fresh_store_together(tmp_path):
    db = tmp_path / "sub" / "mlflow.db"  # the folder does not exist yet either
    uri = f"sqlite:///{db}"
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_init_and_use, args=(uri, barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    outcomes = [results.get(timeout=5) for _ in procs]
    assert outcomes == ["ok"] * 4, outcomes
    assert all(p.exitcode == 0 for p in procs)
    assert lock_path(db).is_file() and db.is_file()

    import mlflow

    c = mlflow.MlflowClient(tracking_uri=uri)
    assert [e.name for e in c.search_experiments() if e.name == "together"] == ["together"]


def test_sqlite_path_and_lock_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sqlite_path("sqlite:///mlflow.db") == tmp_path / "mlflow.db"
    assert sqlite_path("sqlite:////abs/dir/m.db?timeout=30") == Path("/abs/dir/m.db")
    assert sqlite_path("sqlite:///x.db", cwd="/elsewhere") == Path("/elsewhere/x.db")
    for other in ("http://127.0.0.1:5000", "file:///tmp/mlruns", "sqlite://", "sqlite:///:memory:", "databricks"):
        assert sqlite_path(other) is None
    assert lock_path(tmp_path / "mlflow.db") == tmp_path / "mlflow.db.init.lock"
    ensure_sqlite_store("http://127.0.0.1:1")  # not SQLite: nothing happens, nothing is contacted
    ensure_sqlite_store("sqlite:///rel.db")  # relative: next to the working directory
    assert (tmp_path / "rel.db").is_file() and (tmp_path / "rel.db.init.lock").is_file()
    sqlite_init.forget("sqlite:///rel.db")


def test_store_retries_database_is_locked_as_a_replay(monkeypatch, tmp_path):
    """'database is locked' from another writer is retried in place (as a replay), not taken for an outage."""
    from mlflow.exceptions import MlflowException

    from spnet_dist.tracking import store as store_mod
    from spnet_dist.tracking.spool import Spool

    monkeypatch.setattr(store_mod, "BUSY_BACKOFF_S", 0.01)
    s = store_mod.Store(f"sqlite:///{tmp_path / 'mlflow.db'}", "spnet", Spool(tmp_path / "spool"))
    calls: list[bool] = []

    def flaky(rec, replaying):
        calls.append(replaying)
        if len(calls) < 3:
            raise MlflowException("(sqlite3.OperationalError) database is locked", error_code="TEMPORARILY_UNAVAILABLE")
        return "rid"

    monkeypatch.setattr(s, "_apply", flaky)
    assert s.apply({"op": "tags", "run": "x", "tags": {}}) == "rid"
    assert calls == [False, True, True] and s.busy_retries == 2

    def down(rec, replaying):
        raise ConnectionError("connection refused")

    monkeypatch.setattr(s, "_apply", down)
    with pytest.raises(ConnectionError):  # anything else propagates at once: the outbox spools
        s.apply({"op": "tags", "run": "x", "tags": {}})
    assert s.busy_retries == 2
    assert is_sqlite_busy(RuntimeError("x")) is False


def _train_cmd(data: Path, run_dir: Path, uri: str) -> list[str]:
    args = [a for a in tiny_train_args(data, run_dir, "trainer.max_steps=2") if not a.startswith("tracking.uri=")]
    return [sys.executable, "-m", "spnet_dist.cli", *args, f"tracking.uri={uri}"]


@pytest.mark.parametrize("n", [2, 4])
def test_trainings_started_together_on_a_fresh_sqlite_store_all_finish(tiny_data, tmp_path, n):
    db = tmp_path / "mlflow.db"
    assert not db.exists()
    uri = f"sqlite:///{db}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    procs = []
    for i in range(n):
        run_dir = tmp_path / f"run{i}"
        run_dir.mkdir()
        out, err = open(run_dir / "stdout.txt", "w"), open(run_dir / "stderr.txt", "w")
        procs.append((run_dir, subprocess.Popen(_train_cmd(tiny_data, run_dir, uri), cwd=run_dir, env=env,
                                                stdout=out, stderr=err, text=True)))
        out.close()
        err.close()
    try:
        codes = [p.wait(timeout=900) for _, p in procs]
    finally:
        for _, p in procs:
            if p.poll() is None:
                p.kill()
    logs = {str(d.name): (d / "stderr.txt").read_text() for d, _ in procs}
    assert codes == [0] * n, {k: v[-3000:] for k, v in logs.items()}
    for text in logs.values():  # every record reached the store directly: nothing was taken for an outage
        assert "unreachable" not in text and "duplicate column" not in text and "already exists" not in text

    summaries = [last_json((d / "stdout.txt").read_text()) for d, _ in procs]
    ids = {s["mlflow_run_id"] for s in summaries}
    assert len(ids) == n and not any(i.startswith("local-") for i in ids)

    import mlflow

    c = mlflow.MlflowClient(tracking_uri=uri)
    exp = c.get_experiment_by_name("spnet")
    runs = c.search_runs([exp.experiment_id])
    assert sorted(r.info.run_id for r in runs) == sorted(ids)
    assert [r.info.status for r in runs] == ["FINISHED"] * n
    for r in runs:  # each run has its metrics, not only a row
        assert "val/top1" in r.data.metrics and r.data.params


def test_an_existing_store_in_a_read_only_folder_opens_without_a_lock_file(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    uri = f"sqlite:///{ro / 'mlflow.db'}"
    ensure_sqlite_store(uri)  # created while writable
    lock_path(ro / "mlflow.db").unlink()
    sqlite_init.forget(uri)
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as root: the folder stays writable")
        ensure_sqlite_store(uri)
        assert not lock_path(ro / "mlflow.db").exists()
    finally:
        ro.chmod(0o755)
