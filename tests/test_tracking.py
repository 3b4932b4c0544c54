"""MLflow tracking: what a training run records, one run for two ranks, and a store that goes away mid-run."""
from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from conftest import TINY_CLASSES, last_json, run_spnet, tiny_train_args

from spnet_dist.tracking.env import environment_tags, git_tags
from spnet_dist.tracking.spool import Spool, replay_spool
from spnet_dist.tracking.store import LOCAL_TAG
from spnet_dist.tracking.tracker import Tracker
from spnet_dist.tracking.ui import free_port, start_server, stop_server, wait_ready

REPO = Path(__file__).resolve().parents[1]
UNREACHABLE = "MLflow tracking store"  # start of the one warning a run prints when the store is unreachable


def _only_run(uri: str, experiment: str = "spnet"):
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], run_view_type=mlflow.entities.ViewType.ALL)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return client, runs[0]


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def two_rank_run(tiny_data, tmp_path_factory):
    """One 2-rank CLI training run, shared by the assertions below (it costs most of this file's time)."""
    tmp = tmp_path_factory.mktemp("tracked")
    proc = run_spnet(*tiny_train_args(tiny_data, tmp, "trainer.nprocs=2", "trainer.batch_size=4", "trainer.epochs=2",
                                      "tracking.system_metrics_interval=1"),
                     cwd=tmp, env={"SLURM_JOB_ID": "4242"})
    return tmp, last_json(proc.stdout), proc.stderr


def test_two_ranks_log_one_run_with_params_metrics_and_tags(two_rank_run):
    tmp, summary, stderr = two_rank_run
    client, run = _only_run(f"sqlite:///{tmp / 'mlflow.db'}")  # rank 1 logged nothing: no duplicate run
    rid = run.info.run_id
    assert rid == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    assert UNREACHABLE not in stderr
    steps = TINY_CLASSES * 16 // (2 * 4) * 2

    p = run.data.params  # the flattened resolved config
    assert p["trainer.nprocs"] == "2" and p["trainer.batch_size"] == "4" and p["model.name"] == "resnet_tiny"
    assert p["tracking.spool_dir"] == f"{tmp / 'ckpt'}/mlflow_spool"

    m = run.data.metrics
    for key in ("train/loss", "train/lr"):
        assert _steps(client, rid, key) == list(range(1, steps + 1)), key
    terms = {k for k in m if k.startswith("train/")} - {"train/loss", "train/lr", "train/images_per_sec",
                                                          "train/images_per_sec_overall", "train/exec_rate"}
    assert terms, "no loss term logged"  # e.g. train/ce, train/rate_loss
    assert m["train/images_per_sec"] > 0 and m["train/images_per_sec_overall"] > 0
    assert _steps(client, rid, "val/top1") == [steps // 2, steps]
    assert m["val/top1"] == pytest.approx(summary["top1"]) and m["val/top5"] == pytest.approx(summary["top5"])
    rates = {k: v for k, v in m.items() if k.startswith("val/rate/")}
    assert sorted(rates) == [f"val/rate/layer{i}.0" for i in range(1, 5)]
    assert [rates[f"val/rate/layer{i}.0"] for i in range(1, 5)] == pytest.approx(summary["block_rates"], abs=1e-4)
    fixed, blocks = _tiny_aig_macs()  # expected cost at the logged execution rates, counted by hand
    macs = fixed + sum(r * b for r, b in zip(summary["block_rates"], blocks))
    assert m["val/macs_per_image"] == pytest.approx(summary["macs_per_image"]) == pytest.approx(macs, rel=1e-4)
    assert m["val/gflops_trained"] == pytest.approx(2 * macs / 1e9, rel=1e-4)  # 2 x MACs of the trained layout
    assert m["val/gflops_paper"] == pytest.approx(2 * summary["macs_paper"] / 1e9)  # papers' v1 layout (spec 1.3)
    _check_system_metrics(client, rid, m, steps)

    t = run.data.tags
    assert (t["method"], t["backbone"], t["target_rate"], t["world_size"]) == ("aig", "resnet_tiny", "0.7", "2")
    assert t["slurm.job_id"] == "4242"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert t["git_commit"] == head.stdout.strip() == t["mlflow.source.git.commit"]
    assert t["checkpoint"] == str(Path(summary["checkpoint"]).resolve())


def _tiny_aig_macs() -> tuple[int, list[int]]:
    """resnet_tiny (bottleneck, layers 1-1-1-1, widths 8-16-32-64, stem 16, v1.5) at 32 px with TINY_CLASSES
    classes and AIG gates (hidden 16), counted by hand: conv k*k*C_in*C_out*H_out*W_out, fc C_in*C_out.
    Returns (always-executed MACs: stem, projections, gates, classifier; residual-branch MACs per block)."""
    fixed = 7 * 7 * 3 * 16 * 16 * 16  # stem 7x7/2 at 16x16, then a 3x3/2 max-pool to 8x8
    blocks, c_in, hw = [], 16, 8
    for i, w in enumerate((8, 16, 32, 64)):
        out = hw if i == 0 else hw // 2  # v1.5: the stride sits in the 3x3
        blocks.append(c_in * w * hw * hw + 9 * w * w * out * out + w * 4 * w * out * out)  # 1x1, 3x3, 1x1
        fixed += c_in * 4 * w * out * out + c_in * 16 + 16 * 2  # projection 1x1; gate 1x1 C->16, 16->2 after GAP
        c_in, hw = 4 * w, out
    return fixed + c_in * TINY_CLASSES, blocks


def _check_system_metrics(client, rid: str, m: dict[str, float], steps: int) -> None:
    """System samples (every second here): MLflow's monitor names under system/, sensible units, and the
    training step the tracker saw last as their step."""
    import shutil

    import psutil

    keys = {k for k in m if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/system_memory_usage_percentage", "system/disk_usage_megabytes",
            "system/disk_available_megabytes", "system/network_receive_megabytes"} <= keys, keys
    assert 0 <= m["system/cpu_utilization_percentage"] <= 100
    assert 0 < m["system/system_memory_usage_megabytes"] <= psutil.virtual_memory().total / 1e6
    disk = shutil.disk_usage(os.sep)
    assert m["system/disk_usage_megabytes"] + m["system/disk_available_megabytes"] == pytest.approx(
        (disk.used + disk.free) / 1e6, rel=0.05)
    history = sorted(client.get_metric_history(rid, "system/cpu_utilization_percentage"), key=lambda x: x.timestamp)
    sample_steps = [x.step for x in history]
    assert sample_steps and sample_steps == sorted(sample_steps) and 0 <= sample_steps[-1] <= steps, sample_steps


def test_run_artifacts_checkpoints_and_model(two_rank_run, tmp_path):
    tmp, summary, _ = two_rank_run
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client, run = _only_run(uri)
    rid = run.info.run_id

    cfg = yaml.safe_load(Path(client.download_artifacts(rid, "config/resolved.yaml", str(tmp_path))).read_text())
    assert cfg["trainer"]["nprocs"] == 2 and cfg["tracking"]["uri"] == uri

    rate_files = sorted(a.path for a in client.list_artifacts(rid, "block_rates"))
    assert rate_files == ["block_rates/epoch_001_step_0000008.csv", "block_rates/epoch_001_step_0000008.json",
                          "block_rates/epoch_002_step_0000016.csv", "block_rates/epoch_002_step_0000016.json",
                          "block_rates/heatmap_epoch_001_step_0000008.png",
                          "block_rates/heatmap_epoch_002_step_0000016.png"]
    last = Path(client.download_artifacts(rid, rate_files[2], str(tmp_path)))
    with open(last) as f:
        rows = list(csv.DictReader(f))
    assert [r["block"] for r in rows] == [f"layer{i}.0" for i in range(1, 5)]
    assert [float(r["rate"]) for r in rows] == pytest.approx(summary["block_rates"], abs=1e-4)
    png = Path(client.download_artifacts(rid, rate_files[5], str(tmp_path))).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"

    saves = {a.path for a in client.list_artifacts(rid, "checkpoints")}
    assert saves == {"checkpoints/global_step8.json", "checkpoints/global_step16.json"}
    info = json.loads(Path(client.download_artifacts(rid, "checkpoints/global_step16.json", str(tmp_path))).read_text())
    assert info["path"] == str(Path(summary["checkpoint"]).resolve()) and info["tag"] == "global_step16"
    assert info["step"] == 16 and info["epoch"] == 2
    assert run.data.tags["checkpoint.tag"] == "global_step16"

    # the final network: an MLflow PyTorch model of the run (loadable without DeepSpeed)
    assert run.data.tags["model_uri"].startswith("models:/")
    mlflow.set_tracking_uri(uri)
    try:
        net = mlflow.pytorch.load_model(f"runs:/{rid}/model")
        with torch.no_grad():
            out = net(torch.zeros(2, 3, 32, 32))
        assert out.logits.shape == (2, TINY_CLASSES)
    finally:
        mlflow.set_tracking_uri(None)
    assert not (tmp / "ckpt" / "mlflow_spool").exists()  # nothing left behind when the store was reachable


def test_system_samples_carry_the_last_training_step(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(uri, "exp", spool_dir=tmp_path / "spool", system_metrics=True, system_metrics_interval=0.1)
    key = t.start(None, "sys", {})
    t.log_metrics({"train/loss": 1.0}, step=7)
    client, deadline, steps = mlflow.MlflowClient(tracking_uri=uri), time.monotonic() + 30, set()
    while 7 not in steps and time.monotonic() < deadline:
        time.sleep(0.1)
        steps = {x.step for x in client.get_metric_history(key, "system/cpu_utilization_percentage")}
    t.finish()
    assert 7 in steps and steps <= {0, 7}, steps  # before the first training step: step 0


def test_environment_tags(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    tags = environment_tags()
    assert tags["slurm.job_id"] == "77" and tags["slurm.array_task_id"] == "3"
    assert git_tags(tmp_path) == {}  # not a git checkout: no tag, no error


def test_unreachable_store_spools_then_replays_without_duplicates(tmp_path, caplog):
    """A store that is down from the start: training calls return at once, one warning, everything in the spool;
    replaying twice gives one complete run, and a resumed tracker finds that run by its local key."""
    dead = f"http://127.0.0.1:{free_port()}"
    spool = tmp_path / "spool"
    t = Tracker(dead, "exp", spool_dir=spool, http_timeout=2, http_retries=0, retry_every_s=0.2, final_replay_s=0.5,
                log_model=True, register_model="offline-model", config={"x": {"y": 1}})
    net = torch.nn.Linear(3, 2)
    with caplog.at_level(logging.INFO, logger="spnet_dist.tracking"):
        t0 = time.monotonic()
        key = t.start(None, "offline-run", {"method": "aig"})
        t.log_params({"x.y": 1})
        for step in range(1, 6):
            t.log_metrics({"train/loss": 1.0 / step}, step=step, images_seen=8 * step)
        t.log_eval({"top1": 0.5, "macs_per_image": 2e6, "gflops_paper": 0.004, "block_rates": [0.5, 1.0]},
                   step=5, epoch=1)
        t.log_checkpoint(tmp_path / "ckpt" / "global_step5", step=5, epoch=1)
        t.log_metrics({"bad#key": 1.0}, step=5)  # rejected by the store later: dropped, not retried forever
        t.log_final(net, tmp_path / "ckpt" / "global_step5")  # the model waits in the spool too
        assert t.finish() == key and key.startswith("local-")
        assert time.monotonic() - t0 < 20
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and UNREACHABLE in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    ops = [r["op"] for r in Spool(spool).read()]
    assert ops[0] == "create_run" and ops[-1] == "terminate" and "artifacts" in ops

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert replay_spool(spool, uri, "exp") == 0
    assert not spool.exists()
    assert replay_spool(spool, uri, "exp") == 0  # nothing left: a second replay adds nothing
    client, run = _only_run(uri, "exp")
    assert run.info.status == "FINISHED" and run.info.run_name == "offline-run"
    assert run.data.tags[LOCAL_TAG] == key and run.data.params == {"x.y": "1"}
    assert _steps(client, run.info.run_id, "train/loss") == [1, 2, 3, 4, 5]
    assert run.data.metrics["val/rate/block1"] == 1.0 and "bad#key" not in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"block_rates", "checkpoints", "config"}
    versions = client.search_model_versions("name='offline-model'")
    assert [v.run_id for v in versions] == [run.info.run_id]  # registered once, for this run
    mlflow.set_tracking_uri(uri)
    try:
        loaded = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    finally:
        mlflow.set_tracking_uri(None)
    assert torch.equal(loaded.weight, net.weight)

    again = Tracker(uri, "exp", spool_dir=tmp_path / "spool2")  # a resumed job: the checkpoint holds the local key
    assert again.start(key, "offline-run", {}) == key
    again.log_metrics({"train/loss": 0.1}, step=6)
    assert again.finish() == run.info.run_id
    client, run = _only_run(uri, "exp")
    assert _steps(client, run.info.run_id, "train/loss") == [1, 2, 3, 4, 5, 6]


def _server(db: Path, port: int, log: Path) -> subprocess.Popen:
    proc = start_server(f"sqlite:///{db}", port=port, artifacts_destination=str(db.parent / "artifacts"), log=log)
    if not wait_ready(proc, f"http://127.0.0.1:{port}", timeout=120):
        stop_server(proc)
        pytest.fail(f"mlflow server did not start: {log.read_text()[-2000:]}")
    return proc


def test_server_killed_mid_run_training_goes_on_and_metrics_are_replayed(tiny_data, tmp_path):
    """Kill the tracking server (the whole process group, SIGKILL) once the run logged its first step; training
    goes on into the spool; restart the server on the same store and port; the run ends up complete."""
    db, port = tmp_path / "server.db", free_port()
    server = _server(db, port, tmp_path / "server1.log")
    watch = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")  # read the server's store directly
    args = tiny_train_args(tiny_data, tmp_path, "trainer.epochs=3", f"tracking.uri=http://127.0.0.1:{port}",
                           "tracking.retry_every_s=1", "tracking.final_replay_s=120", "tracking.http_timeout=5",
                           "tracking.system_metrics=false")
    out_f, err_f = open(tmp_path / "train.out", "w"), open(tmp_path / "train.err", "w")  # no pipe to fill up
    train = subprocess.Popen([sys.executable, "-m", "spnet_dist.cli", *args], cwd=tmp_path, stdout=out_f,
                             stderr=err_f, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    spool = Spool(tmp_path / "ckpt" / "mlflow_spool")
    try:
        deadline = time.monotonic() + 240
        run_id = None
        while run_id is None and time.monotonic() < deadline and train.poll() is None:
            try:
                exp = watch.get_experiment_by_name("spnet")
                runs = watch.search_runs([exp.experiment_id]) if exp else []
                if runs and watch.get_metric_history(runs[0].info.run_id, "train/loss"):
                    run_id = runs[0].info.run_id
                    break
            except mlflow.exceptions.MlflowException:  # the server is creating its tables / writing
                pass
            time.sleep(0.1)
        assert run_id, "training logged nothing to the server"
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        assert watch.get_run(run_id).info.status == "RUNNING"  # killed mid-run
        while not spool.file.is_file() and train.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert spool.file.is_file(), "nothing was spooled while the server was down"
        server = _server(db, port, tmp_path / "server2.log")  # same store, same port
        train.wait(timeout=max(10.0, deadline - time.monotonic()))
        out, err = (tmp_path / "train.out").read_text(), (tmp_path / "train.err").read_text()
        assert train.returncode == 0, err[-4000:]
        summary = last_json(out)
        assert summary["mlflow_run_id"] == run_id and summary["steps"] == 3 * TINY_CLASSES * 16 // 8
        assert err.count(UNREACHABLE) == 1, err[-4000:]  # said once, not per step
        assert not spool.file.exists()  # everything was replayed

        client, run = _only_run(f"http://127.0.0.1:{port}")
        assert run.info.run_id == run_id and run.info.status == "FINISHED"
        assert _steps(client, run_id, "train/loss") == list(range(1, summary["steps"] + 1))
        assert len(_steps(client, run_id, "val/top1")) == 3
        assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {
            f"checkpoints/global_step{s}.json" for s in (8, 16, 24)}
        assert run.data.tags["model_uri"].startswith("models:/")
    finally:
        if train.poll() is None:
            train.kill()
        out_f.close()
        err_f.close()
        stop_server(server)
