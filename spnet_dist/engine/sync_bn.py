"""``model.sync_bn``: BatchNorm statistics over the global batch instead of each rank's share.

Converts every BatchNorm (backbone BN2d, the SP-Net/AIG routers' BN1d, heads) to ``nn.SyncBatchNorm`` before the
optimizer and the method are built, so SP-Net's EMA teacher (a copy of the student, run in train mode) synchronises
its batch statistics too. The parameters and buffers keep their names: checkpoints load into either form.

torch's SyncBatchNorm synchronises only CUDA (XPU/HPU) tensors: on CPU its training forward raises under any
initialised process group, so a CPU multi-rank run with ``model.sync_bn=true`` is refused before training.
One rank has nothing to synchronise: the model stays as it is.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..preflight import check_sync_bn

log = logging.getLogger("spnet.train")


def convert_sync_bn(model: nn.Module, enabled: bool, world: int, cuda: bool | None = None) -> nn.Module:
    """``model`` with SyncBatchNorm layers when ``enabled`` and ``world`` > 1 (refused on CPU), else unchanged."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    check_sync_bn(enabled, world, cuda)
    if not enabled or world <= 1:
        return model
    before = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    log.info("model.sync_bn: %d BatchNorm layers synchronised over %d ranks", before, world)
    return model
