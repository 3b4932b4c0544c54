"""The walking skeleton end to end through the real stack: Hydra -> DALI -> model -> DeepSpeed -> MLflow."""
from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from conftest import TINY_CLASSES, TINY_MODEL, last_json, run_spnet, tiny_train_args

from spnet_dist.config import compose
from spnet_dist.data.loader import build_loader
from spnet_dist.data.preflight import plan_data

SUMMARY_KEYS = {"top1", "macs_per_image", "exec_rate", "checkpoint", "mlflow_run_id", "steps"}


def expected_macs(block_rates: list[float]) -> float:
    """MACs per image of the tiny model (ConvNet-AIG gates, 32 px) whose blocks ran for these fractions of the
    validation images: hard gates make the count linear in them."""
    import torch

    from spnet_dist.models import build_model, cost_table, macs_per_image

    model = build_model({**TINY_MODEL, "num_classes": TINY_CLASSES}, {"router": {"type": "aig", "hidden": 16}})
    table = cost_table(model, 32)
    return float(macs_per_image(table, torch.tensor([block_rates], dtype=torch.float64)))


def _runs(db: Path, experiment: str = "spnet"):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id])


def test_one_rank_trains_checkpoints_logs_and_evaluates(tiny_data, tmp_path):
    proc = run_spnet(*tiny_train_args(tiny_data, tmp_path, "trainer.epochs=2"), cwd=tmp_path)
    summary = last_json(proc.stdout)
    assert SUMMARY_KEYS <= summary.keys()
    steps_per_epoch = TINY_CLASSES * 16 // 8
    assert summary["steps"] == 2 * steps_per_epoch
    assert summary["val_images"] == TINY_CLASSES * 5
    assert summary["top1"] * summary["val_images"] == pytest.approx(round(summary["top1"] * summary["val_images"]))
    assert summary["macs_per_image"] == pytest.approx(expected_macs(summary["block_rates"]), rel=1e-6)

    ckpt = Path(summary["checkpoint"])
    assert (ckpt / "mp_rank_00_model_states.pt").is_file() and (ckpt / "spnet_complete.json").is_file()

    client, runs = _runs(tmp_path / "mlflow.db")
    assert [r.info.run_id for r in runs] == [summary["mlflow_run_id"]]
    run = runs[0]
    assert run.data.params["trainer.batch_size"] == "8" and run.data.params["model.name"] == "resnet_tiny"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in loss) == list(range(1, summary["steps"] + 1))
    top1 = client.get_metric_history(run.info.run_id, "val/top1")
    assert len(top1) == 2 and top1[-1].value == pytest.approx(summary["top1"])
    assert client.get_metric_history(run.info.run_id, "val/macs_per_image")[-1].value == pytest.approx(
        summary["macs_per_image"])

    # the checkpoint is loadable: evaluation alone reproduces the deterministic validation result
    ev = last_json(run_spnet("eval", f"checkpoint={ckpt}", f"data.root={tiny_data}", cwd=tmp_path).stdout)
    assert ev["top1"] == pytest.approx(summary["top1"])
    assert ev["macs_per_image"] == pytest.approx(summary["macs_per_image"])
    assert ev["steps"] == summary["steps"]


def test_two_ranks_train_into_one_run(tiny_data, tmp_path):
    proc = run_spnet(*tiny_train_args(tiny_data, tmp_path, "trainer.nprocs=2", "trainer.batch_size=4"),
                     cwd=tmp_path)
    summary = last_json(proc.stdout)
    assert summary["world_size"] == 2
    assert summary["steps"] == TINY_CLASSES * 16 // (2 * 4)
    assert summary["val_images"] == TINY_CLASSES * 5  # every validation image counted exactly once
    _, runs = _runs(tmp_path / "mlflow.db")
    assert len(runs) == 1 and runs[0].data.params["trainer.nprocs"] == "2"


def test_config_overrides_and_bad_key(tmp_path):
    out = run_spnet("train", "--cfg", "job", "trainer.batch_size=7", "method=spnet_code", cwd=tmp_path).stdout
    assert "batch_size: 7" in out and "name: spnet" in out
    bad = run_spnet("train", "trainer.batch_sise=7", cwd=tmp_path, check=False)
    assert bad.returncode == 2
    assert "batch_sise" in bad.stderr and "Traceback" not in bad.stderr


def test_dali_shards_are_disjoint_across_two_ranks(tiny_data):
    cfg = compose([f"data.root={tiny_data}", "trainer.batch_size=8", "data.image_size=32", "data.val_resize=36",
                   f"model.num_classes={TINY_CLASSES}"])
    plan = plan_data(cfg, world=2)
    all_val = {p.name for p in (tiny_data / "val").rglob("*.JPEG")}
    for train in (True, False):
        names = []
        for shard in range(2):
            loader = build_loader(cfg, plan, train=train, shard_id=shard, num_shards=2, with_source_info=True)
            names.append([Path(f).name for _, _, files in loader for f in files])
        assert names[0] and names[1]
        assert not set(names[0]) & set(names[1]), "ranks read overlapping files"
        if not train:  # validation: each image exactly once over the two shards
            assert sorted(names[0] + names[1]) == sorted(all_val)
