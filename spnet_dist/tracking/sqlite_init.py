"""Create and migrate a SQLite MLflow store once, under a file lock, before any process uses it.

MLflow creates the tables of a fresh SQLite store (and runs its alembic migrations) in whichever process opens it
first, without a lock: two trainings started together on a new file race ("duplicate column name: step",
"table ... already exists") and one of them crashes. :func:`ensure_sqlite_store` serialises that step with an
exclusive ``fcntl.flock`` on ``<db>.init.lock`` next to the database; the first process creates the store while the
others wait, then each finds it complete. Every place that opens a SQLite store calls it first (the tracker's
:class:`~.store.Store`, :func:`~.runs.client` users, the frontier, ``spnet ui``).

Also here: :func:`is_sqlite_busy`, for "database is locked" errors of concurrent writers, which are retried
briefly rather than taken for an unreachable store.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".init.lock"
_done: set[str] = set()         # database files initialised by this process
_guard = threading.Lock()       # threads of one process: flock is per open file, not per thread


def sqlite_path(uri: str, cwd: str | Path | None = None) -> Path | None:
    """The database file of a ``sqlite:///`` URI (a relative path against ``cwd``, default the working
    directory); None for other URIs and in-memory databases."""
    uri = str(uri)
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:" or path.startswith("file::memory:"):
        return None
    return (Path(cwd) / path).absolute() if cwd is not None else Path(path).absolute()


def lock_path(db: Path) -> Path:
    """The lock file that guards the creation of ``db``: ``<db>.init.lock`` in the same folder."""
    return db.with_name(db.name + LOCK_SUFFIX)


def ensure_sqlite_store(uri: str, cwd: str | Path | None = None) -> None:
    """Make sure the SQLite MLflow store ``uri`` exists with its full schema and default experiment, created by
    exactly one process at a time; a no-op for other URIs and after the first call per database in a process.
    ``cwd``: where a relative path is resolved (a server started in another folder). Errors (a folder that cannot
    be written, an out-of-date schema) propagate with MLflow's message."""
    db = sqlite_path(uri, cwd)
    if db is None:
        return
    uri = "sqlite:///" + str(db) + (("?" + str(uri).split("?", 1)[1]) if "?" in str(uri) else "")
    key = str(db)
    with _guard:
        if key in _done:
            return
        import fcntl

        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            lock = open(lock_path(db), "a")
        except OSError as err:  # a read-only folder: nobody can create the store there, so no race to guard
            log.debug("no lock file for %s (%s); opening the store without it", db, err)
            _open_store(uri)
            _done.add(key)
            return
        with lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # blocks while another process creates the store
            try:
                _open_store(uri)
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        _done.add(key)


def _open_store(uri: str) -> None:
    """Open the store the way every MLflow client does (the store object is cached per process, so later clients
    reuse it): a fresh file gets its tables, migrations and default experiment here."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    client.get_experiment("0")  # the default experiment: created by the store's constructor


def client(uri: str) -> Any:
    """An ``MlflowClient`` for ``uri``, after :func:`ensure_sqlite_store`."""
    import mlflow

    ensure_sqlite_store(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


def is_sqlite_busy(err: BaseException) -> bool:
    """True for SQLite's "database is locked" / "database table is locked" (another writer held the file longer
    than the busy timeout): transient, worth retrying in place."""
    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text = str(e).lower()
        if "database is locked" in text or "database table is locked" in text or "database is busy" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def forget(uri: str | None = None) -> None:
    """Forget that ``uri`` (all when None) was initialised in this process (tests)."""
    with _guard:
        if uri is None:
            _done.clear()
        else:
            db = sqlite_path(uri)
            _done.discard(str(db) if db else "")

