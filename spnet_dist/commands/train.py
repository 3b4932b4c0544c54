"""spnet train [key=value ...]: train locally (1 or trainer.nprocs ranks) or as one rank of a launcher."""
from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Sequence

NAME = "train"
HELP = "train with Hydra overrides key=value ..."


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*")
    p.add_argument("--cfg", choices=["job"], help="print the composed config and exit")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(local_rank: int, cfg_dict: dict, world: int, port: int, result_path: str) -> None:
    """Entry of one locally spawned rank."""
    from ..cli import setup_logging

    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    setup_logging(local_rank)
    from omegaconf import OmegaConf

    from ..engine.trainer import train

    summary = train(OmegaConf.create(cfg_dict))
    if local_rank == 0:
        Path(result_path).write_text(json.dumps(summary))


def train_from_overrides(overrides: Sequence[str]) -> dict[str, Any] | None:
    """Compose the config and train; returns rank 0's summary (None on other ranks)."""
    from ..cli import setup_logging
    from ..config import compose, to_container
    from ..data.loaders import check_layout
    from ..engine.trainer import train

    cfg = compose(overrides)
    check_layout(cfg.data.root)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun, a SLURM task, or env vars set by hand
        rank = int(os.environ["RANK"])
        setup_logging(rank)
        summary = train(cfg)
        return summary if rank == 0 else None
    nprocs = int(cfg.trainer.nprocs)
    if nprocs <= 1:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        setup_logging(0)
        return train(cfg)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "summary.json"
        mp.start_processes(_rank_main, args=(to_container(cfg), nprocs, free_port(), str(result)),
                           nprocs=nprocs, join=True, start_method="spawn")
        return json.loads(result.read_text())


def run(args: argparse.Namespace) -> dict[str, Any] | int | None:
    if args.cfg:
        from omegaconf import OmegaConf

        from ..config import compose

        print(OmegaConf.to_yaml(compose(args.overrides), resolve=True))
        return None
    return train_from_overrides(args.overrides)
