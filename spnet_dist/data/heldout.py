"""Held-out splits of the training set: seeded, drawn from the sorted file list, so every rank and every restart
draws the same files. BoostNet's budget calibration and the gate calibration's ``eval.gate_calibration_heldout``
use them."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

CALIBRATION_KEY = "eval.gate_calibration_heldout"


def heldout_size(spec: float | int, n_train: int, key: str = "method.heldout") -> int:
    """``spec`` < 1: a fraction of the training set; ≥ 1: a count. Must leave at least one training image."""
    k = round(float(spec) * n_train) if float(spec) < 1 else int(spec)
    if k < 0 or k >= n_train:
        raise ValueError(f"held-out split of {k} images from {n_train} training images is impossible; set "
                         f"{key} to a fraction < 1 or a smaller count")
    return k


def heldout_indices(n_train: int, size: int, seed: int) -> Tensor:
    """The last ``size`` entries of a seeded permutation of range(n_train), sorted (long tensor)."""
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n_train, generator=g)
    return perm[n_train - size:].sort().values if size else torch.zeros(0, dtype=torch.long)


def calibration_heldout(cfg: Any, train_files: Sequence[str]) -> list[str]:
    """The training files that ``eval.gate_calibration_heldout`` (fraction < 1 or count; 0: none) keeps out of
    training for the gate calibration (seed 0, whatever the run's seed: a study's static run and its fine-tunes
    leave out the same images)."""
    spec = cfg.eval.get("gate_calibration_heldout", 0) or 0
    if not spec:
        return []
    files = sorted(train_files)
    k = heldout_size(spec, len(files), CALIBRATION_KEY)
    if k == 0:
        raise ValueError(f"{CALIBRATION_KEY}={spec} holds out no image of {len(files)} training images; set it to "
                         "0 (calibrate on training images) or to at least one image")
    return [files[i] for i in heldout_indices(len(files), k, 0).tolist()]
