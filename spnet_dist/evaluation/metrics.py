"""Validation: top-1/top-5, MACs per image from hard gate decisions, per-block execution rates (global)."""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist

from .. import distributed as D


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, table: Any, execution: str = "dense") -> dict[str, Any]:
    """Every validation image counts once across all ranks (sums are all-reduced). ``exec_rate`` is the mean rate of
    the gated blocks, 1.0 for a network without gates (every block runs, as ``Method.exec_rate`` counts it)."""
    from ..models import macs_per_image

    was_training = model.training
    model.eval()
    if hasattr(model, "set_execution"):
        model.set_execution(execution)
    sums = None
    device = next(model.parameters()).device
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        out = model(images)
        top5 = out.logits.topk(min(5, out.logits.shape[1]), dim=1).indices
        correct1 = (top5[:, 0] == labels).sum()
        correct5 = (top5 == labels[:, None]).any(dim=1).sum()
        macs = macs_per_image(table, out.gates).sum()
        row = torch.cat([torch.stack([correct1, correct5]).double(), macs.double().view(1),
                         torch.tensor([labels.numel()], dtype=torch.float64, device=device), out.gates.double().sum(0)])
        sums = row if sums is None else sums + row
    if hasattr(model, "set_execution"):
        model.set_execution("dense")
    model.train(was_training)
    if sums is None:
        raise RuntimeError("the validation loader yielded no batches")
    if D.is_dist():
        dist.all_reduce(sums)
    n = float(sums[3])
    rates = (sums[4:] / n).tolist()
    gated = list(getattr(model, "gated_blocks", [True] * len(rates)))
    gated_rates = [r for r, g in zip(rates, gated) if g]
    macs = float(sums[2]) / n
    return {"top1": float(sums[0]) / n, "top5": float(sums[1]) / n, "macs_per_image": macs,
            "gflops_paper": 2 * macs / 1e9, "exec_rate": sum(gated_rates) / len(gated_rates) if gated_rates else 1.0,
            "block_rates": [round(r, 4) for r in rates], "val_images": int(n)}
