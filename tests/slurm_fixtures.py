"""Reusable pytest fixture: a real single-host SLURM cluster (cluster/slurm.sh) for the whole test session.

Use it from any test module with ``from slurm_fixtures import slurm_cluster  # noqa: F401`` or register it once
in tests/conftest.py with ``pytest_plugins = ["slurm_fixtures"]``.

    def test_x(slurm_cluster):
        subprocess.run(["sbatch", "--wrap", "true"], env=slurm_cluster.environ(), check=True)

Jobs ids restart at 1 for every new cluster state folder: give submitit a fresh folder per test (tmp_path).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM_SH = REPO / "cluster" / "slurm.sh"
SLURM_BINARIES = ("slurmctld", "slurmd", "sinfo", "srun", "sbatch", "squeue", "scontrol")
SLURM_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"])


def missing_slurm_binaries() -> list[str]:
    return [b for b in SLURM_BINARIES if shutil.which(b, path=SLURM_PATH) is None]


def free_port_block(n: int, lo: int = 20000, hi: int = 40000) -> int:
    """A port p such that p..p+n-1 are all free on 127.0.0.1 (slurmctld on p, slurmd i on p+i)."""
    start = lo + (os.getpid() * 7919 + time.monotonic_ns()) % (hi - lo - n)
    for p in range(start, start + 2000):
        socks = []
        try:
            for q in range(p, p + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("0.0.0.0", q))  # slurm daemons listen on all interfaces
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return p
    raise RuntimeError("no block of free ports found")


@dataclass
class SlurmCluster:
    base: Path  # SLURM_BASE: conf, logs, pids, state
    nodes: int
    port: int  # CTLD_PORT
    env: dict[str, str] = field(default_factory=dict)  # SLURM_CONF and PATH (plus the script's settings)

    @property
    def conf(self) -> Path:
        return self.base / "etc" / "slurm.conf"

    def environ(self, **extra: str) -> dict[str, str]:
        """os.environ without inherited SLURM_* job variables, plus ``env`` and ``extra``: for subprocesses."""
        out = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        out.update(self.env)
        out.update(extra)
        return out

    def script(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run cluster/slurm.sh with this cluster's SLURM_BASE/CTLD_PORT/node count."""
        env = self.environ(SLURM_BASE=str(self.base), CTLD_PORT=str(self.port), SLURM_NODES=str(self.nodes))
        r = subprocess.run(["bash", str(SLURM_SH), *args], env=env, capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"slurm.sh {' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def run(self, *cmd: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a client command (srun, sbatch, ...) against this cluster; raises on failure."""
        return subprocess.run(list(cmd), env=self.environ(), capture_output=True, text=True, check=True,
                              timeout=timeout, **kw)

    def start(self) -> subprocess.CompletedProcess:
        return self.script("start", str(self.nodes))

    def stop(self) -> subprocess.CompletedProcess:
        return self.script("stop")


def make_cluster(base: Path, nodes: int) -> SlurmCluster:
    port = free_port_block(nodes + 1)
    env = {"SLURM_CONF": str(base / "etc" / "slurm.conf"), "PATH": SLURM_PATH}
    return SlurmCluster(base=Path(base), nodes=nodes, port=port, env=env)


def require_slurm() -> None:
    missing = missing_slurm_binaries()
    if missing:
        pytest.skip(f"SLURM binaries not installed ({', '.join(missing)}); run cluster/install.sh")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running 2-node cluster (n1, n2; 4 CPUs each, partition "debug") for the whole session."""
    require_slurm()
    cluster = make_cluster(tmp_path_factory.mktemp("slurm"), nodes=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
