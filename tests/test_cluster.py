"""Integration tests for cluster/slurm.sh: a real slurmctld + slurmd on this host (skipped without SLURM)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

try:
    from slurm_fixtures import make_cluster, require_slurm  # the cluster fixture comes from conftest
except ImportError:  # tests/ imported as a package
    from tests.slurm_fixtures import make_cluster, require_slurm

REPO = Path(__file__).resolve().parents[1]


def test_cluster_configs_have_the_same_keys():
    files = sorted((REPO / "configs" / "cluster").glob("*.yaml"))
    assert {f.stem for f in files} >= {"local", "example_gpu"}
    keys = {f.stem: list(yaml.safe_load(f.read_text())) for f in files}
    assert len({tuple(k) for k in keys.values()}) == 1, keys
    local = yaml.safe_load((REPO / "configs" / "cluster" / "local.yaml").read_text())
    assert local["partition"] == "debug" and local["gpus_per_node"] == 0


def test_conf_renders_without_starting(tmp_path):
    require_slurm()
    c = make_cluster(tmp_path / "s", nodes=3)
    conf = c.script("conf").stdout
    assert f"SlurmctldPort={c.port}" in conf
    for i in (1, 2, 3):
        assert f"NodeName=n{i} NodeHostname=localhost NodeAddr=127.0.0.1 Port={c.port + i} CPUs=4" in conf
    for line in ("AuthInfo=cred_expire=10", "JobRequeue=1", "SlurmdParameters=config_overrides",
                 "AuthType=auth/none", "SlurmctldParameters=preempt_send_user_signal"):
        assert line in conf
    assert not (tmp_path / "s" / "run").exists()


def test_second_start_is_a_fast_noop(slurm_cluster):
    pids = sorted(p.read_text() for p in (slurm_cluster.base / "run").glob("*.pid"))
    t0 = time.monotonic()
    r = slurm_cluster.start()
    assert time.monotonic() - t0 < 2
    assert "already running" in r.stdout
    assert f"export SLURM_CONF={slurm_cluster.conf}" in r.stdout
    assert sorted(p.read_text() for p in (slurm_cluster.base / "run").glob("*.pid")) == pids
    assert slurm_cluster.script("status").returncode == 0


def test_srun_spans_two_nodes(slurm_cluster):
    r = slurm_cluster.run("srun", "-N2", "-n2", "bash", "-c", 'echo "$SLURM_PROCID $SLURMD_NODENAME"')
    lines = sorted(r.stdout.split("\n")[:-1])
    assert lines == ["0 n1", "1 n2"], r.stdout + r.stderr


def test_two_tasks_fit_on_one_node(slurm_cluster):
    r = slurm_cluster.run("srun", "-N1", "-n2", "bash", "-c", 'echo "$SLURM_PROCID $SLURMD_NODENAME"')
    lines = sorted(r.stdout.split("\n")[:-1])
    assert [x.split()[0] for x in lines] == ["0", "1"] and len({x.split()[1] for x in lines}) == 1


def test_sbatch_wrap_completes(slurm_cluster, tmp_path):
    out = tmp_path / "out-%j.txt"
    r = slurm_cluster.run("sbatch", "--parsable", "-o", str(out), "--wrap", 'echo "hello from $SLURMD_NODENAME"')
    job = r.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 20
    state = ""
    while time.monotonic() < deadline:
        show = slurm_cluster.run("scontrol", "show", "job", job, "-o").stdout
        state = show.split("JobState=")[1].split()[0]
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            break
        time.sleep(0.2)
    assert state == "COMPLETED", show
    text = Path(str(out).replace("%j", job)).read_text()
    assert text.startswith("hello from n"), text


def test_stop_twice_and_restart(tmp_path):
    require_slurm()
    c = make_cluster(tmp_path / "s", nodes=1)
    try:
        c.start()
        assert c.run("srun", "-n2", "bash", "-c", "echo $SLURMD_NODENAME").stdout.split() == ["localhost"] * 2
        # a different node count on a running cluster is refused, not silently mixed
        assert c.script("start", "2", check=False).returncode != 0
    finally:
        r1 = c.stop()
    assert "stopped" in r1.stdout and not list((c.base / "run").glob("*.pid"))
    r2 = c.stop()
    assert r2.returncode == 0 and "stopped" in r2.stdout
    assert c.script("status", check=False).returncode != 0
