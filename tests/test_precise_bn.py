"""PreciseBN: backbone BN statistics recomputed under the evaluation gates equal a recomputation by hand."""
from __future__ import annotations

import torch
from torch import nn

from spnet_dist.engine.precise_bn import backbone_batchnorms, recompute_bn_stats
from spnet_dist.models import build_model

from conftest import TINY_MODEL

ROUTER = {"router": {"type": "aig", "hidden": 16, "bias_init": [0.0, 0.0]}}


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model(TINY_MODEL, ROUTER)
    blocks = list(model.blocks())
    last = [m for m in blocks[1].router.modules() if isinstance(m, nn.Conv2d | nn.Linear)][-1]
    with torch.no_grad():  # block 1 never executes under argmax gates
        last.bias.copy_(torch.tensor([20.0, -20.0]))
    return model


def test_recomputed_statistics_match_a_manual_recomputation_over_executed_images(one_torch_thread):
    model = _model()
    batches = [(torch.randn(12, 3, 32, 32, generator=torch.Generator().manual_seed(i)), torch.zeros(12))
               for i in range(3)]
    bns = backbone_batchnorms(model)
    names = {bn: n for n, bn in model.named_modules() if bn in bns}
    router_bns = [m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and ".router." in n]
    assert router_bns and not set(router_bns) & set(bns)
    before = {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in model.named_modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)}

    # by hand: record what every backbone BN receives and how many images each router sends through its block
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in names.values()}
    executed: list[list[int]] = []
    handles = [bn.register_forward_pre_hook(lambda mod, inp: seen[names[mod]].append(inp[0].detach().clone()))
               for bn in bns]
    handles += [model.register_forward_hook(
        lambda mod, inp, out: executed.append(out.gates.sum(0).round().int().tolist()))]
    used = recompute_bn_stats(model, batches + batches, num_batches=3)  # stops after 3 batches
    for h in handles:
        h.remove()
    assert used == 3 and len(executed) == 3
    assert model.training  # the mode is restored

    blocks = list(model.blocks())
    for bn in bns:
        name = names[bn]
        inputs = seen[name]
        block = next((i for i, b in enumerate(model.block_names) if name.startswith(b + ".")), None)
        in_branch = block is not None and "downsample" not in name  # the residual branch, run only when executed
        if in_branch and block == 1:  # the never-executing block
            assert not inputs
            torch.testing.assert_close(bn.running_mean, before[name][0], rtol=0, atol=0)
            continue
        assert inputs, name
        if in_branch and blocks[block].router is not None:
            # the branch's BN saw exactly the images the argmax gates executed
            assert [x.shape[0] for x in inputs] == [e[block] for e in executed if e[block] > 0], name
        inputs = [x for x in inputs if x.numel() > x.shape[1]]  # one value per channel: no batch statistics
        if not inputs:
            torch.testing.assert_close(bn.running_mean, before[name][0], rtol=0, atol=0)
            continue
        means = torch.stack([x.transpose(0, 1).flatten(1).mean(1) for x in inputs])
        variances = torch.stack([x.transpose(0, 1).flatten(1).var(1, unbiased=True) for x in inputs])
        torch.testing.assert_close(bn.running_mean, means.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bn.running_var, variances.mean(0), rtol=1e-4, atol=1e-5)
    for bn in router_bns:  # the routers keep their statistics
        name = next(n for n, m in model.named_modules() if m is bn)
        torch.testing.assert_close(bn.running_mean, before[name][0], rtol=0, atol=0)
    assert any(0 < e[i] < 12 for e in executed for i in range(len(blocks)) if blocks[i].router is not None), \
        "the test needs a block that executes some images of a batch and skips others"


def test_precise_bn_changes_what_evaluation_sees(one_torch_thread):
    model = _model().train()
    x = torch.randn(16, 3, 32, 32)
    with torch.no_grad():
        model.eval()
        stale = model(x).logits
        recompute_bn_stats(model, [(x, None)], 1)
        model.eval()
        fresh = model(x).logits
    assert not torch.allclose(stale, fresh)
