"""The run entry below ``commands/`` and ``launch/``: compose the config, check it once, set up this process's rank
(or spawn ``trainer.nprocs`` local ranks) and train."""
from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from ..errors import USER_ERRORS, SpnetError, setup_logging
from .hook import Hook


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_from_overrides(overrides: Sequence[str], hooks: Sequence[Hook] = ()) -> dict[str, Any] | None:
    """Compose the config and train; returns this process's summary (rank 0's holds the run's results).
    ``hooks`` join the standard ones where this process is the rank (a launcher's rank, or one local rank)."""
    from ..config import compose, to_container
    from ..preflight import preflight
    from .trainer import train

    cfg = compose(overrides)
    plan = preflight(cfg)  # keys, values, this machine, the data (cheap, cached): one clear error before any work
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun, a SLURM task, or env vars set by hand
        setup_logging(int(os.environ["RANK"]))
        return train(cfg, hooks, plan=plan)
    nprocs = int(cfg.trainer.nprocs)
    if nprocs <= 1:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        setup_logging(0)
        return train(cfg, hooks, plan=plan)
    if hooks:
        raise ValueError("extra training hooks need this process to be the rank (trainer.nprocs=1 or a launcher)")
    return spawn_local(to_container(cfg), nprocs, plan)


def _rank_main(local_rank: int, cfg_dict: dict, world: int, port: int, result_path: str, plan: Any) -> None:
    """Entry of one locally spawned rank."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    setup_logging(local_rank)
    from omegaconf import OmegaConf

    from .trainer import train

    try:
        summary = train(OmegaConf.create(cfg_dict), plan=plan)
    except USER_ERRORS as err:  # handed to the parent, which prints it as one line
        (Path(result_path).parent / f"error.rank{local_rank}").write_text(str(err))
        sys.exit(2)
    if local_rank == 0:
        Path(result_path).write_text(json.dumps(summary))


def spawn_local(cfg_dict: dict, nprocs: int, plan: Any = None) -> dict[str, Any]:
    """Start ``nprocs`` ranks on this machine with the parent's data ``plan``; SIGTERM/SIGUSR2 to this process
    are forwarded to every rank."""
    import signal

    import torch.multiprocessing as mp

    from .preempt import STOP_SIGNALS

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "summary.json"
        ctx = mp.start_processes(_rank_main, args=(cfg_dict, nprocs, free_port(), str(result), plan), nprocs=nprocs,
                                 join=False, start_method="spawn")

        def forward(signum: int, _frame: Any) -> None:
            for proc in ctx.processes:
                if proc.is_alive():
                    os.kill(proc.pid, signum)

        previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
        try:
            while not ctx.join():
                pass
        except (mp.ProcessExitedException, mp.ProcessRaisedException):  # a rank's one-line error stays one line
            messages = sorted(Path(tmp).glob("error.rank*"))
            if messages:
                raise SpnetError(messages[0].read_text()) from None
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return json.loads(result.read_text())
