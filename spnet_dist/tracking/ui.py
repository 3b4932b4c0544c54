"""`spnet ui`: the MLflow UI on loopback, without stray worker processes, stopped cleanly by Ctrl-C."""
from __future__ import annotations

import os
import signal
import subprocess
import sys


def server_command(uri: str, host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", host,
            "--port", str(port), "--workers", "1"]


def serve(uri: str, host: str = "127.0.0.1", port: int = 5000) -> int:
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(server_command(uri, host, port), env=env, start_new_session=True)
    print(f"MLflow UI on http://{host}:{port}  (store {uri}); Ctrl-C stops it", flush=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        return 0
