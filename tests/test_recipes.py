"""One command per paper row (``configs/recipe/``): every recipe's key values against its source, the CLI's
resolved recipe, and SP-Net's CIFAR recipe (within-stage L_evo, three heads) training on tiny 32-px data.

The expected values are copied from the sources named beside them (spec ``methods.md`` sections, the papers'
official scripts), not from the yaml files: a recipe that drifts from its source fails here.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_CLASSES, last_json, run_spnet, tiny_train_args
from omegaconf import OmegaConf

from spnet_dist.config import compose
from spnet_dist.config.compose import config_dir
from spnet_dist.methods.losses import within_stage_evolution_loss
from spnet_dist.models import build_model
from spnet_dist.models.dynamic_resnet import stage_tap_indices

RECIPES = sorted(p.stem for p in (config_dir() / "recipe").glob("*.yaml"))

SPNET_IMAGENET = {  # official code/train_img.py + train_img.sh (spec §5.c, §5.e)
    "model.name": "resnet50", "model.variant": "v1.5", "data.name": "imagenet", "data.image_size": 224,
    "data.val_resize": 256, "method.name": "spnet", "method.target_rate": 0.7, "method.rate_loss": "one_sided",
    "method.rate_weight": 2.0, "method.ema_momentum": 0.9, "method.head_weights": [0.01, 0.1, 0.2, 1.0],
    "method.w_logits": 0.1, "method.w_path": 0.1, "method.w_evo": 0.1, "method.evo_form": "official",
    "method.teacher_mode": "train", "optim.lr": 0.05, "optim.momentum": 0.9, "optim.weight_decay": 1e-4,
    "optim.milestones": [44, 89, 127, 144], "optim.gamma": 0.1, "optim.warmup_epochs": 0, "trainer.epochs": 149,
    "trainer.batch_size": 64, "optim.recipe_global_batch": 256, "required": ["model.pretrained"],
}
SPNET_CIFAR = {  # official code/train_cifar.py + launch lines (spec §5.e)
    "model.name": "resnet110_cifar", "data.name": "cifar10", "data.image_size": 32, "method.name": "spnet",
    "method.target_rate": 0.8, "method.rate_loss": "two_sided", "method.rate_weight": 2.0,
    "method.ema_momentum": 0.6, "method.head_weights": [0.1, 0.2, 1.0], "method.w_logits": 0.1,
    "method.w_path": 0.1, "method.w_evo": 1e-4, "method.evo_form": "within_stage", "optim.lr": 0.1,
    "optim.weight_decay": 1e-4, "optim.momentum": 0.9, "optim.milestones": [149, 249], "trainer.epochs": 349,
    "trainer.batch_size": 128, "optim.grad_clamp": 0.5, "required": ["model.pretrained"],
}
AIG_IMAGENET = {  # official train_img.py (spec §2.c, §2.e)
    "model.name": "resnet50", "data.name": "imagenet", "method.name": "aig", "method.rate_loss": "two_sided",
    "method.rate_weight": 1.0, "method.router.tau": 1.0, "optim.lr": 0.1, "optim.weight_decay": 1e-4,
    "optim.milestones": [29, 59, 89], "trainer.epochs": 99, "trainer.batch_size": 64, "model.pretrained": None,
    "method.target_schedule": [1, 1, 0.8, 1, 0.7, 0.7, 0.7, 1, 0.7, 0.7, 0.7, 0.7, 0.7, 1, 0.7, 1],
}
TORCHVISION = {"optim.lr": 0.1, "optim.weight_decay": 1e-4, "optim.milestones": [30, 60], "trainer.epochs": 90,
               "trainer.batch_size": 64, "optim.recipe_global_batch": 256}  # references/classification ResNet

RDINET_IMAGENET = {  # official launch_ImageNet.sh + main.py (spec §4.e); paper §4 (d, gamma, alpha, phi)
    "model.name": "resnet50", "data.name": "imagenet", "method.name": "rdinet", "method.router.options": 3,
    "method.router.d": 256, "method.router.gamma": 0.5, "method.srm_weight": 0.2, "method.srm_margin": 0.5,
    "optim.lr": 0.075, "optim.momentum": 0.9, "optim.weight_decay": 1e-4, "optim.gamma": 0.1,
    "optim.warmup_epochs": 0, "trainer.batch_size": 48, "optim.recipe_global_batch": 192,
}

EXPECTED: dict[str, dict] = {
    "rdinet_r50_imagenet_warmup": {**RDINET_IMAGENET, "method.stage": "usw", "optim.milestones": [30, 60],
                                   "trainer.epochs": 90, "model.pretrained": None},
    "rdinet_r50_imagenet_joint": {**RDINET_IMAGENET, "method.stage": "joint", "optim.milestones": [30, 60, 90],
                                  "trainer.epochs": 100, "method.target_rate": 0.84,  # reconstruction (recipe)
                                  "required": ["model.pretrained"]},
    "spnet_r50_imagenet": SPNET_IMAGENET,
    "spnet_r50_imagenet_light": {**SPNET_IMAGENET, "method.target_rate": 0.5},  # reconstruction (spec §5.h.5)
    "spnet_r101_imagenet": {**SPNET_IMAGENET, "model.name": "resnet101"},  # spec §5.e: R-50 settings, 33 gates
    "spnet_r110_cifar": SPNET_CIFAR,
    "spnet_r110_cifar_light": {**SPNET_CIFAR, "method.target_rate": 0.2},  # the CIFAR sweep's lowest t
    "spnet_r32_cifar": {**SPNET_CIFAR, "model.name": "resnet32_cifar"},
    "aig_r50_imagenet": AIG_IMAGENET,
    "aig_r101_imagenet": {**AIG_IMAGENET, "model.name": "resnet101",  # official README: [1]x8 + [t]x25
                          "method.target_schedule": [1] * 8 + [0.5] * 25},
    "aig_r110_cifar": {  # official train.py (spec §2.e)
        "model.name": "resnet110_cifar", "data.name": "cifar10", "method.name": "aig", "method.target_rate": 0.6,
        "method.rate_weight": 2.0, "optim.lr": 0.1, "optim.weight_decay": 5e-4, "optim.milestones": [150, 250],
        "trainer.epochs": 350, "trainer.batch_size": 256, "model.pretrained": None},
    "boostnet_r50_imagenet": {  # official ImageNet scripts (spec §6.e, §6.f)
        **TORCHVISION, "model.name": "resnet50", "method.name": "boostnet", "method.heldout": 50000,
        "method.ensemble_weight": 0.5, "method.grad_rescale": True, "method.flat_curve": True},
    "static_r50_imagenet": {**TORCHVISION, "model.name": "resnet50", "method.name": "static"},
    "static_r110_cifar": {  # He et al. 2016 §4.2
        "model.name": "resnet110_cifar", "method.name": "static", "data.name": "cifar10", "optim.lr": 0.1,
        "optim.weight_decay": 1e-4, "optim.milestones": [82, 123], "trainer.epochs": 164, "trainer.batch_size": 128},
}


def test_every_recipe_has_its_expected_values():
    assert sorted(EXPECTED) == RECIPES, "a recipe without expected values from its source (or a stale entry)"


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_matches_its_source(recipe):
    cfg = compose([f"recipe={recipe}", "data.root=/data/x"])
    got = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v := OmegaConf.select(cfg, k)) else v
           for k in EXPECTED[recipe]}
    assert got == EXPECTED[recipe]
    header = (config_dir() / "recipe" / f"{recipe}.yaml").read_text()
    assert "Paper row:" in header and "Source:" in header, "a recipe names its row and its source"


def test_cli_prints_the_resolved_recipe_and_asks_for_the_init(tmp_path):
    cmd = [sys.executable, "-m", "spnet_dist.cli", "train", "--cfg", "job", "recipe=spnet_r50_imagenet",
           "data.root=/data/imagenet", "model.pretrained=/weights/resnet50.pth"]
    out = subprocess.run(cmd, cwd=tmp_path, text=True, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    job = OmegaConf.create(out.stdout)
    assert (job.optim.lr, list(job.optim.milestones), job.method.w_evo, job.model.pretrained) == \
        (0.05, [44, 89, 127, 144], 0.1, "/weights/resnet50.pth")
    no_init = subprocess.run([sys.executable, "-m", "spnet_dist.cli", "train", "recipe=spnet_r110_cifar",
                              "data.root=/data/cifar10"], cwd=tmp_path, text=True, capture_output=True, timeout=120)
    assert no_init.returncode == 2 and len(no_init.stderr.splitlines()) == 1, no_init.stderr
    assert "model.pretrained is required" in no_init.stderr and list(tmp_path.iterdir()) == []


def test_within_stage_evolution_loss_on_a_hand_example():
    """Stage 1 turns by 90° between its halves (1 − cos = 1), stage 2 goes straight on (0), stage 3 reverses (2)."""
    t = lambda *v: torch.tensor([v], dtype=torch.float64)  # noqa: E731 - one image, 2 features
    taps = [(t(0, 0), t(1, 0), t(1, 1)), (t(0, 0), t(1, 1), t(3, 3)), (t(1, 1), t(2, 1), t(1, 1))]
    assert within_stage_evolution_loss(taps).item() == pytest.approx(3.0)


@pytest.mark.parametrize("name, first_mid_last", [("resnet32_cifar", (0, 2, 4)), ("resnet110_cifar", (0, 9, 17))])
def test_stage_taps_pool_the_first_middle_and_last_block(name, first_mid_last):
    model = build_model({"name": name, "num_classes": 10}, {"router": {"type": "spnet"}, "multi_stage_heads": True})
    model.eval()
    assert stage_tap_indices(len(model.layer1)) == first_mid_last
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        model.stage_taps = True
        out = model(x)
    assert plain.stage_taps == [] and [len(s) for s in out.stage_taps] == [3, 3, 3]
    assert [s[0].shape[1] for s in out.stage_taps] == [16, 32, 64]
    torch.testing.assert_close(out.stage_taps[-1][-1], out.stage_features[-1], rtol=0, atol=0)
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=0)


def test_spnet_cifar_recipe_trains_on_tiny_32px_data(tiny_data, tmp_path):
    """The CIFAR SP-Net settings (schedule=cifar_spnet: gradient clamp 0.5; method=spnet_cifar: three heads,
    within-stage L_evo) on ResNet-32 for a few steps; L_evo is logged and nonzero."""
    import mlflow

    r = run_spnet(*tiny_train_args(tiny_data, tmp_path, "model=resnet32_cifar", "method=spnet_cifar",
                                   "schedule=cifar_spnet", "trainer.epochs=1", "trainer.batch_size=8",
                                   "trainer.max_steps=3", "method.w_evo=1.0"), cwd=tmp_path)
    summary = last_json(r.stdout)
    assert summary["steps"] == 3, summary
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    evo = [m.value for m in client.get_metric_history(run.info.run_id, "train/evo")]
    assert len(evo) == 3 and all(0.0 < v <= 6.0 for v in evo), evo  # 3 stages x (1 - cos) in [0, 2]
    assert run.data.params["method.evo_form"] == "within_stage" and int(run.data.params["model.num_classes"]) \
        == TINY_CLASSES


def test_within_stage_evolution_loss_and_a_stage_whose_blocks_were_skipped():
    """Image 0 skipped every block between first and middle tap (e₁ = 0 exactly): officially its cosine is 0 (loss 1)
    with a ~1/eps gradient; with skip_unchanged it leaves the mean (its angle is undefined). Image 1 turns by 90°."""
    def taps():
        first = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
        mid = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64, requires_grad=True)
        last = torch.tensor([[2.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
        return mid, [(first, mid, last)]

    mid, official = taps()
    loss = within_stage_evolution_loss(official)
    loss.backward()
    assert loss.item() == pytest.approx(1.0) and mid.grad[0].abs().max() > 1e6  # what the official clamp cuts
    mid, skipping = taps()
    loss = within_stage_evolution_loss(skipping, skip_unchanged=True)
    loss.backward()
    assert loss.item() == pytest.approx(0.5) and mid.grad.abs().max() < 10 and mid.grad[0].abs().max() == 0
