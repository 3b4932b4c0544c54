"""Process-group helpers, the one home of them: rank/world discovery, gathers, barriers and differentiable global
reductions. The lowest layer: models, data, methods, engine and launch all import it, it imports none of them."""
from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return dist.get_world_size() if is_dist() else int(os.environ.get("WORLD_SIZE", 1))


def comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for nccl, the CPU for gloo."""
    if is_dist() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def multi_rank() -> bool:
    """A process group with more than one rank (collectives are needed)."""
    return is_dist() and dist.get_world_size() > 1


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
    if not multi_rank():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def first_error(error: str | None) -> str | None:
    """Every rank learns whether any rank failed (so none waits at a barrier that another never reaches)."""
    return next((e for e in gather_objects(error) if e is not None), None)


def barrier() -> None:
    if multi_rank():
        dist.barrier()


def global_mean(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Mean of ``x`` over ``dim`` taken across the *global* batch of all ranks, differentiably.

    Sums and counts are all-reduced, so 2 ranks x batch B give the same value as 1 rank x batch 2B.
    The backward pass all-reduces the incoming gradient as well; together with the engine's gradient
    averaging this yields exactly the gradient of the global-batch statistic.
    """
    total = x.sum(dim=dim)
    count = torch.tensor(float(x.shape[dim]), dtype=x.dtype, device=x.device)
    if is_dist() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_reduce  # differentiable (its replacement is not yet)

        warnings.filterwarnings("ignore", message=".*distributed.nn.functional.all_reduce is deprecated")
        total = all_reduce(total)
        count = count.clone()
        dist.all_reduce(count)
    return total / count


@torch.no_grad()
def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks, in place.

    Training BN uses batch statistics, so this does not change the optimisation; it makes evaluation and
    checkpoints independent of which rank's statistics they would otherwise use.
    """
    if not is_dist() or dist.get_world_size() == 1:
        return
    bufs = [b for b in module.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.reshape(-1) for b in bufs])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for b in bufs:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()
