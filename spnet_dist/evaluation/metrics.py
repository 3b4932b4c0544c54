"""Validation: top-1/top-5, MACs per image from hard gate decisions (trained layout and the papers' v1 layout,
``models.cost.cost_metrics``), per-block execution rates (global)."""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist

from .. import distributed as D


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Iterable, table: Any, execution: str = "dense") -> dict[str, Any]:
    """Every validation image counts once across all ranks (sums are all-reduced). ``exec_rate`` is the mean rate of
    the gated blocks, 1.0 for a network without gates (every block runs, as ``Method.exec_rate`` counts it)."""
    from ..models import cost_metrics, macs_per_image
    from ..models.cost import paper_gates

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
        macs_v1 = macs_per_image(table.paper_view(), paper_gates(table, out.gates)).sum()
        row = torch.cat([torch.stack([correct1, correct5]).double(), macs.double().view(1),
                         torch.tensor([labels.numel()], dtype=torch.float64, device=device), out.gates.double().sum(0),
                         macs_v1.double().view(1)])
        sums = row if sums is None else sums + row
    if hasattr(model, "set_execution"):
        model.set_execution("dense")
    model.train(was_training)
    if sums is None:
        raise RuntimeError("the validation loader yielded no batches")
    if D.is_dist():
        dist.all_reduce(sums)
    n = float(sums[3])
    rates = (sums[4:-1] / n).tolist()
    gated = list(getattr(model, "gated_blocks", [True] * len(rates)))
    gated_rates = [r for r, g in zip(rates, gated) if g]
    return {"top1": float(sums[0]) / n, "top5": float(sums[1]) / n,
            **cost_metrics(table, float(sums[2]) / n, float(sums[-1]) / n),
            "exec_rate": sum(gated_rates) / len(gated_rates) if gated_rates else 1.0,
            "block_rates": [round(r, 4) for r in rates], "val_images": int(n)}
