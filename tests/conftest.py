"""Shared fixtures: a tiny ImageNet-format dataset and a helper that runs the real `spnet` CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spnet_dist.data.tiny import make_tiny_imagenet

sys.path.insert(0, str(Path(__file__).parent))
from slurm_fixtures import slurm_cluster  # noqa: E402,F401  (one session-wide test cluster for every module)

TINY_CLASSES = 4
# the resnet_tiny model config as a plain dict (configs/model/resnet_tiny.yaml)
TINY_MODEL = dict(name="resnet_tiny", block="bottleneck", layers=[1, 1, 1, 1], widths=[8, 16, 32, 64],
                  stem="imagenet", stem_width=16, variant="v1.5", num_classes=10, image_size=64, pretrained=None)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread: small convs gain nothing from more, and it is robust on a busy 2-core host."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "imagenet"
    make_tiny_imagenet(root, classes=TINY_CLASSES, train_per_class=16, val_per_class=5, seed=1)
    return root


def run_spnet(*args: str, cwd: Path, timeout: float = 300, check: bool = True,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "spnet_dist.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"spnet {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def tiny_train_args(data: Path, tmp: Path, *extra: str) -> list[str]:
    return ["train", f"data.root={data}", f"model.num_classes={TINY_CLASSES}", f"checkpoint.dir={tmp / 'ckpt'}",
            f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}", "trainer.batch_size=8", "trainer.epochs=1",
            "trainer.progress=false", "data.image_size=32", "data.val_resize=36", *extra]
