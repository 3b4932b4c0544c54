"""One rank's process set-up: process group, threads and backend switches, the optimizer and DeepSpeed's config."""
from __future__ import annotations

import datetime
import os
import socket
import sys
from pathlib import Path
from typing import Any

import torch

from .. import distributed as D
from ..osutil import usable_cores
from . import preempt
from .grad_clamp import install_grad_clamp
from .malloc import keep_freed_memory


def deepspeed_config(cfg: Any, world: int) -> dict[str, Any]:
    ds = cfg.deepspeed
    conf: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.trainer.batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.trainer.batch_size * world,
        "zero_optimization": {"stage": ds.stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    # always explicit: DeepSpeed's own default is a norm clip at 1.0 (GRADIENT_CLIPPING_DEFAULT, deepspeed 0.19)
    conf["gradient_clipping"] = float(ds.gradient_clipping or 0.0)
    if ds.bf16_autocast:
        conf["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return conf


def extensions_dir_per_environment() -> None:
    """Build DeepSpeed's JIT ops (the CPU ``deepspeed_shm_comm``) inside this Python environment: in the shared
    ``~/.cache/torch_extensions`` two virtualenvs invalidate each other's build (it records their include paths)
    and rebuild it in turn (~30 s each time). An explicit ``TORCH_EXTENSIONS_DIR`` wins; a read-only environment
    keeps torch's default."""
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return
    target = Path(sys.prefix) / "torch_extensions"
    try:
        target.mkdir(exist_ok=True)
    except OSError:
        return
    if os.access(target, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(target)


LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0


def loopback_store(rank: int, world: int, timeout: datetime.timedelta) -> Any:
    """The rendezvous store of a run whose MASTER_ADDR is this host's loopback: rank 0 listens on loopback only
    (torch's own TCPStore server listens on every interface)."""
    import torch.distributed as dist

    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    if rank != 0:
        return dist.TCPStore(host, port, world, False, timeout=timeout)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1" if host == "localhost" else host, port))
    sock.listen(128)
    return dist.TCPStore(host, port, world, True, timeout=timeout, master_listen_fd=sock.detach(), use_libuv=False)


def init_distributed(collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> None:
    """The process group, with ``collective_timeout_s`` as the timeout of every collective (a frozen peer makes
    gloo raise after it) and of the rendezvous. A run whose MASTER_ADDR is loopback stays on loopback."""
    import deepspeed
    import torch.distributed as dist

    extensions_dir_per_environment()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                         ("MASTER_PORT", str(29500 + os.getpid() % 2000))):
        os.environ.setdefault(key, default)
    if D.is_dist():
        return
    timeout = datetime.timedelta(seconds=float(collective_timeout_s))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    local = os.environ["MASTER_ADDR"] in LOOPBACK and "TORCHELASTIC_RUN_ID" not in os.environ
    if local:
        if Path("/sys/class/net/lo").exists():
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's own sockets on loopback too
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, store=loopback_store(rank, world, timeout), rank=rank, world_size=world,
                                timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)


def param_groups(model: torch.nn.Module, no_decay_bn: bool, lr: float, router_lr_mult: float = 1.0,
                 router_group: bool = False) -> list[dict[str, Any]]:
    """One group (the papers' recipe); with ``router_lr_mult`` ≠ 1 (or ``router_group``: the method's phases leave
    the routers out of some steps, ``Method.router_param_group``) the routers' parameters in a group of their own
    at ``lr`` × that (its ``lr_mult`` key tells the LR schedule); with ``+optim.no_decay_bn=true`` the 1-D
    parameters (BN scales/shifts, biases) of each group in a group without weight decay."""
    routers = (list(model.router_parameters())
               if (router_lr_mult != 1.0 or router_group) and hasattr(model, "router_parameters") else [])
    ids = {id(p) for p in routers}
    parts: list[tuple[dict[str, Any], list[torch.nn.Parameter]]] = [
        ({}, [p for p in model.parameters() if id(p) not in ids])]
    if routers:
        parts.append(({"lr": lr * router_lr_mult, "lr_mult": router_lr_mult}, routers))
    groups = []
    for extra, params in parts:
        if no_decay_bn:
            groups += [{"params": [p for p in params if p.ndim > 1], **extra},
                       {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, **extra}]
        else:
            groups.append({"params": params, **extra})
    return groups


def with_method_clamp(optim: Any, method_cfg: Any) -> Any:
    """``optim`` with the method's own ``grad_clamp`` (``method.grad_clamp``, e.g. SP-Net's CIFAR code) where
    ``optim.grad_clamp`` is null; an explicit ``optim.grad_clamp`` wins."""
    from omegaconf import OmegaConf

    if optim.get("grad_clamp") is not None or method_cfg.get("grad_clamp") is None:
        return optim
    return OmegaConf.merge(optim, {"grad_clamp": float(method_cfg.get("grad_clamp"))})


def build_optimizer(model: torch.nn.Module, optim: Any, router_group: bool = False) -> torch.optim.SGD:
    """SGD of ``optim`` (lr, momentum, weight_decay, nesterov, fused, no_decay_bn, router_lr_mult, grad_clamp).
    ``fused``: one multi-tensor kernel per step (CPU and CUDA) instead of torch's per-parameter loop (SP-Net
    ResNet-50 on CPU under ZeRO-1: 203 → 151 ms per optimizer step, BENCHMARKS.md)."""
    groups = param_groups(model, bool(optim.get("no_decay_bn", False)), float(optim["lr"]),
                          float(optim.get("router_lr_mult", 1.0)), router_group)
    sgd = torch.optim.SGD(groups, lr=optim["lr"],
                          momentum=optim["momentum"], weight_decay=optim["weight_decay"],
                          nesterov=bool(optim.get("nesterov", False)), fused=bool(optim.get("fused", False)) or None)
    install_grad_clamp(sgd, optim.get("grad_clamp"))  # SP-Net CIFAR: element-wise clamp before each step
    return sgd


def setup_process(cfg: Any) -> tuple[int, int]:
    """Signal handlers, process group, threads and backend switches of this rank; returns (rank, world size)."""
    from . import heartbeat

    preempt.install()
    timeout_s = float(cfg.trainer.get("collective_timeout_s") or DEFAULT_COLLECTIVE_TIMEOUT_S)
    init_distributed(timeout_s)
    rank, world = D.rank(), D.world_size()
    heartbeat.start(rank, world, stale_s=timeout_s)  # names a rank that dies or freezes; ends a run it holds
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(cfg.trainer.threads or max(1, usable_cores() // local_world))
    # GPU path (CUDA only; CPU runs keep their exact, bitwise-resumable behaviour): cuDNN autotuning
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    elif cfg.trainer.get("cpu_malloc_tuning", True):
        keep_freed_memory()  # CPU: no page faults for the activations every step re-allocates
    return rank, world
