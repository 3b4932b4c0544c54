"""SP-Net through the full stack (Hydra -> DALI -> DeepSpeed -> MLflow), and the training-recipe presets.

The training test is the method's end-to-end check: with a strong rate loss the execution rate logged per step
(``train/exec_rate``) falls from ~0.87 (router bias init) toward the target, the EMA teacher is saved inside the
DeepSpeed checkpoint, and real skipping evaluates exactly like the dense masked network.
"""
from __future__ import annotations

import math
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import last_json, run_spnet, tiny_train_args

from spnet_dist.config import compose
from spnet_dist.preflight import check_static
from spnet_dist.engine.schedule import EpochClock, lr_factor

TARGET = 0.3
FIRST = LAST = 4  # steps averaged at the start / end of training (2 epochs x 8 steps)


def _exec_rate_history(db: Path, run_id: str) -> list[float]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    hist = sorted(client.get_metric_history(run_id, "train/exec_rate"), key=lambda m: m.step)
    return [m.value for m in hist]


def test_spnet_code_trains_toward_target_saves_teacher_and_skip_matches_dense(tiny_data, tmp_path):
    # rate_weight=0 leaves the rate at ~0.9 and fails the first assertion below (checked by hand).
    proc = run_spnet(*tiny_train_args(tiny_data, tmp_path, "method=spnet_code", "model=resnet_tiny",
                                      f"method.target_rate={TARGET}", "method.rate_weight=2", "trainer.epochs=2",
                                      "eval.every_epochs=2"), cwd=tmp_path)
    summary = last_json(proc.stdout)
    assert summary["method"] == "spnet" and summary["steps"] == 16

    # 1. the mean execution rate moves toward the target (one-sided loss: only rates above t are penalised)
    rates = _exec_rate_history(tmp_path / "mlflow.db", summary["mlflow_run_id"])
    assert len(rates) == summary["steps"]
    first, last = sum(rates[:FIRST]) / FIRST, sum(rates[-LAST:]) / LAST
    assert first > 0.7, rates  # routers start ~87% open
    assert last < first - 0.3, f"exec rate did not fall: first {first:.3f}, last {last:.3f}: {rates}"
    assert abs(last - TARGET) < abs(first - TARGET) - 0.2, rates
    # ... and per block: the training rates of every block are logged, and their mean is the execution rate
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    metrics = client.get_run(summary["mlflow_run_id"]).data.metrics
    per_block = [v for k, v in metrics.items() if k.startswith("train/rate/")]
    assert len(per_block) == len(summary["block_rates"]) and "train/rate/layer1.0" in metrics
    assert sum(per_block) / len(per_block) == pytest.approx(metrics["train/exec_rate"], abs=1e-6)

    # 2. the EMA teacher is in the checkpoint's client state, a full set of weights that differs from the student
    ckpt = Path(summary["checkpoint"])
    state = torch.load(ckpt / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    method_state = state["spnet"]["method"]
    assert method_state["name"] == "spnet" and method_state["step"] == summary["steps"]
    teacher, student = method_state["teacher"], state["module"]
    assert set(teacher) == set(student)
    assert all(teacher[k].shape == student[k].shape for k in student)
    assert all(torch.isfinite(v).all() for v in teacher.values() if v.is_floating_point())
    assert any(not torch.equal(teacher[k], student[k]) for k in student if ".conv" in k), "teacher == student"

    # 3. real skipping gives the dense result (same gates, same predictions) on a network with mixed gates
    ev = {mode: last_json(run_spnet("eval", f"checkpoint={ckpt}", f"data.root={tiny_data}",
                                    f"eval.execution={mode}", cwd=tmp_path).stdout) for mode in ("dense", "skip")}
    assert ev["skip"]["execution"] == "skip" and ev["dense"]["execution"] == "dense"
    assert 0.0 < ev["dense"]["exec_rate"] < 1.0, ev["dense"]  # the skip path really skips some images
    assert ev["skip"]["top1"] == ev["dense"]["top1"]
    assert ev["skip"]["top5"] == ev["dense"]["top5"]
    assert ev["skip"]["block_rates"] == ev["dense"]["block_rates"]
    assert ev["skip"]["macs_per_image"] == pytest.approx(ev["dense"]["macs_per_image"])
    assert ev["dense"]["top1"] == pytest.approx(summary["top1"])


# ---- training-recipe presets (configs/schedule/) -----------------------------------------------------------
# Official per-epoch learning rates, 1-based epoch e as in the official loops `for epoch in range(1, N)`.
def _spnet_imagenet(e: int) -> float:  # SP-Net code/train_img.py: 30*1.5, 60*1.5, 85*1.5, 150-5
    return 0.05 * 0.1 ** sum(e >= t for t in (45, 90, 128, 145))


def _aig_imagenet(e: int) -> float:  # ConvNet-AIG train_img.py: lr * 0.1 ** (epoch // lrdecay), lrdecay 30
    return 0.1 * 0.1 ** (e // 30)


def _spnet_cifar(e: int) -> float:  # SP-Net code/train_cifar.py
    return 0.1 * 0.1 ** sum(e >= t for t in (150, 250))


def _torchvision(e: int) -> float:  # torchvision references/classification train.py: StepLR(30, 0.1), 0-based epoch
    return 0.1 * 0.1 ** ((e - 1) // 30)


PRESETS = {
    # name: (optim keys, trainer.epochs, global batch, official lr(e), official epoch count)
    "imagenet_spnet": ({"lr": 0.05, "milestones": [44, 89, 127, 144]}, 149, 256, _spnet_imagenet, 149),
    "imagenet_aig": ({"lr": 0.1, "milestones": [29, 59, 89]}, 99, 256, _aig_imagenet, 99),
    "cifar_spnet": ({"lr": 0.1, "milestones": [149, 249]}, 349, 128, _spnet_cifar, 349),
    "imagenet_torchvision": ({"lr": 0.1, "milestones": [30, 60]}, 90, 256, _torchvision, 90),
}
RANKS = {256: 4, 128: 1}  # the per-rank batch in the presets is written for these world sizes


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_schedule_preset_composes_with_the_official_recipe(name: str) -> None:
    optim, epochs, global_batch, official_lr, official_epochs = PRESETS[name]
    cfg = compose([f"schedule={name}"])
    check_static(cfg)
    assert cfg.optim.lr == optim["lr"] and list(cfg.optim.milestones) == optim["milestones"]
    assert cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4 and cfg.optim.nesterov is False
    assert cfg.optim.gamma == 0.1 and cfg.optim.warmup_epochs == 0
    assert cfg.trainer.epochs == epochs == official_epochs
    assert cfg.trainer.batch_size * RANKS[global_batch] == global_batch  # batch_size is per rank

    # the trainer's schedule (milestones = completed epochs) reproduces the official lr in every epoch
    clock = EpochClock(steps_per_epoch=10)
    factor = lr_factor(cfg.optim, clock)
    for e in range(1, cfg.trainer.epochs + 1):
        for frac in (0.0, 0.5, 0.9):  # start, middle and end of 0-based epoch e - 1
            clock.epochs = e - 1 + frac
            assert math.isclose(cfg.optim.lr * factor(0), official_lr(e), rel_tol=1e-12), (name, e, frac)

    # the command line still wins over the preset, and other keys keep their defaults
    over = compose([f"schedule={name}", "optim.lr=0.2", "trainer.batch_size=16"])
    assert over.optim.lr == 0.2 and over.trainer.batch_size == 16 and over.trainer.epochs == epochs
    assert over.trainer.max_steps == compose([]).trainer.max_steps


def test_default_schedule_leaves_the_root_config() -> None:
    base, default = compose([]), compose(["schedule=default"])
    assert base.optim == default.optim and base.trainer == default.trainer
