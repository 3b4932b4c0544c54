"""PreciseBN for dynamic networks: before every evaluation, recompute the backbone's BatchNorm statistics on
``eval.precise_bn_batches`` training batches under the *evaluation* gates.

During training a block's BN sees the images that the Gumbel-*sampled* gates sent through it; evaluation executes
the *argmax* gates, so the running statistics describe another population. Here the network runs as it is
evaluated — eval mode (hard argmax gates, routers on their running statistics) with real skipping, so a block's BN
sees exactly the images that execute it — while backbone BN layers take batch statistics and average them with
equal weight per batch (``momentum=None``, as detectron2's ``update_bn_stats``). A BN layer that no batch reached
(its block never executed) keeps its statistics. Deterministic and stateless: the batches come from a fresh pass
over this rank's shard seeded by the step, the forward draws no random numbers, so resumes stay exact.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .hook import Hook


def backbone_batchnorms(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BN layers of the plain ResNet (not the routers' nor the auxiliary heads')."""
    is_backbone = getattr(net, "is_backbone_key", lambda key: True)
    return [m for name, m in net.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and is_backbone(f"{name}.running_mean")]


def _batch_stats_if_possible(bn: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
    x = inputs[0]
    bn.train(x.numel() > x.shape[1])


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[Any], num_batches: int) -> int:
    """Recompute the backbone BN statistics of ``model`` from up to ``num_batches`` (images, labels) batches under
    hard evaluation gates with real skipping; returns the number of batches used."""
    from ..methods.base import unwrap_model

    net = unwrap_model(model)
    bns = backbone_batchnorms(net)
    was_training = net.training
    saved = [(bn.momentum, bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
             for bn in bns]
    net.eval()  # argmax gates, routers' BN on running statistics
    skip = hasattr(net, "set_execution")
    if skip:
        net.set_execution("skip")
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches that reach the layer
        bn.train()
    # one value per channel (a single executing image at 1x1) has no batch statistics: that call runs on the
    # running ones and adds nothing
    hooks = [bn.register_forward_pre_hook(_batch_stats_if_possible) for bn in bns]
    device = next(net.parameters()).device
    used = 0
    try:
        for images, _ in batches:
            if used >= num_batches:
                break
            net(images.to(device, non_blocking=True))
            used += 1
    finally:
        for h in hooks:
            h.remove()
        for bn, (momentum, mean, var, count) in zip(bns, saved):
            bn.momentum = momentum
            if int(bn.num_batches_tracked) == 0:  # never reached: keep what it had
                bn.running_mean.copy_(mean), bn.running_var.copy_(var), bn.num_batches_tracked.copy_(count)
            else:
                bn.num_batches_tracked.copy_(count + bn.num_batches_tracked)
        if skip:
            net.set_execution("dense")
        net.train(was_training)
    return used


class PreciseBN(Hook):
    """Runs ``recompute_bn_stats`` before every evaluation (``eval.precise_bn_batches`` > 0); the loop then averages
    the statistics over ranks as before any evaluation."""

    def __init__(self, num_batches: int) -> None:
        self.num_batches = num_batches

    def before_eval(self, loop: Any) -> None:
        if loop.train_batches is None:
            raise RuntimeError("PreciseBN needs the loop's train_batches (a fresh pass over the training shard)")
        loader = loop.train_batches(loop.cfg.seed + 7919 * (loop.progress.step + 1))
        try:
            recompute_bn_stats(loop.method.eval_model(loop.engine.module), loader, self.num_batches)
        finally:
            getattr(loader, "release", lambda: None)()
