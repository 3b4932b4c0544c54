"""`spnet ui` and test servers: ``mlflow server`` on loopback without stray worker processes.

The server runs with ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`` (otherwise it spawns a job runner and seven huey
consumers, ~1.6 GB) and ``--workers 1``, in its own session, and is always stopped as a process group: killing only
the server's pid orphans its children.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Sequence

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def server_command(uri: str, host: str, port: int, artifacts_destination: str | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
           "--port", str(port), "--workers", "1"]
    if artifacts_destination:
        cmd += ["--artifacts-destination", artifacts_destination]
    return cmd


def server_env() -> dict[str, str]:
    return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def healthy(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def start_server(uri: str, host: str = "127.0.0.1", port: int = 5000, artifacts_destination: str | None = None,
                 log: str | Path | None = None, cwd: str | Path | None = None) -> subprocess.Popen:
    """Start the server in its own session (stdout/stderr to ``log`` if given); does not wait for it."""
    from .sqlite_init import ensure_sqlite_store

    ensure_sqlite_store(uri, cwd)  # a fresh SQLite store is created once, not raced by trainings starting now
    out = open(log, "ab") if log else None
    try:
        return subprocess.Popen(server_command(uri, host, port, artifacts_destination), env=server_env(),
                                cwd=cwd, start_new_session=True, stdout=out, stderr=subprocess.STDOUT if out else None)
    finally:
        if out:
            out.close()


def wait_ready(proc: subprocess.Popen, url: str, timeout: float = 90.0) -> bool:
    """True once ``url``/health answers; False if the server exited or ``timeout`` passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if healthy(url):
            return True
        time.sleep(0.25)
    return False


def stop_server(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the server's process group, SIGKILL whatever is left after ``grace`` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; make sure nothing else of the group survives
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        break


def check_port(port: int, given_as: str = "--port") -> int:
    """``port`` as an int in 1..65535, else one ConfigError naming where it came from (``given_as``)."""
    from ..errors import ConfigError

    shown = f"{given_as} {port}" if given_as.startswith("-") else f"{given_as}={port}"
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        example = "--port 5000" if given_as.startswith("-") else f"{given_as}=5000"
        raise ConfigError(f"{shown} is not a TCP port; choose one between 1 and 65535, e.g. {example}")
    return port


def serve(uri: str, host: str = "127.0.0.1", port: int = 5000, ready_timeout: float = 90.0) -> int:
    """Run the UI until Ctrl-C (or SIGTERM / SIGHUP); returns the exit code."""
    check_port(port)
    if uri.startswith(("http://", "https://")):
        print(f"tracking.uri {uri} is already an MLflow server: open {uri} in a browser", flush=True)
        return 0
    if host not in LOOPBACK:
        print(f"warning: --host {host} exposes the MLflow UI (no authentication) beyond this machine",
              file=sys.stderr, flush=True)
    if port_in_use(host, port):
        raise ValueError(f"port {port} on {host} is already in use; pick another with --port "
                         f"(or tracking.ui.port=...)")
    proc = start_server(uri, host, port)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def _stop(signum, frame):  # noqa: ARG001 - SIGTERM / SIGHUP: the same clean stop as Ctrl-C
        raise KeyboardInterrupt

    old = {s: signal.signal(s, _stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        if wait_ready(proc, url, ready_timeout):
            print(f"MLflow UI on {url}  (store {uri}); training runs: {url}/#/experiments; Ctrl-C stops it",
                  flush=True)
        elif proc.poll() is not None:
            print(f"spnet ui: the MLflow server exited with code {proc.returncode}", file=sys.stderr, flush=True)
            return proc.returncode or 1
        else:
            print(f"spnet ui: the MLflow server did not answer on {url} within {ready_timeout:.0f}s; still waiting",
                  file=sys.stderr, flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        print("stopping the MLflow UI", file=sys.stderr, flush=True)
        return 0
    finally:
        stop_server(proc)
        for s, h in old.items():
            signal.signal(s, h)


def ui_urls(base: str, experiment_id: str, run_ids: Sequence[str] = ()) -> dict[str, str]:
    """Pages of the MLflow 3 UI: the runs table, and the compare view of ``run_ids``."""
    import json

    return {"runs": f"{base}/#/experiments/{experiment_id}/runs",
            "compare": f"{base}/#/compare-runs?runs={json.dumps(list(run_ids))}"
                       f"&experiments={json.dumps([experiment_id])}"}
