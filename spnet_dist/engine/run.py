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

from ..errors import USER_ERRORS, RankLostExit, SpnetError, setup_logging
from .hook import Hook


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_rank(cfg: Any, hooks: Sequence[Hook] = (), plan: Any = None) -> dict[str, Any]:
    """``train`` on this rank; a failure caused by another rank (dead, or silent for
    ``trainer.collective_timeout_s``) becomes one line and :class:`RankLostExit` (exit 76), not a traceback."""
    from . import heartbeat
    from .preempt import EXIT_RANK_LOST
    from .trainer import train

    try:
        return train(cfg, hooks, plan=plan)
    except BaseException as err:
        diag = heartbeat.peer_failure(err)
        if diag is None:
            raise
        heartbeat.report(diag)
        print(f"spnet train: rank {diag['rank']}: {diag['message']}; ending this rank (exit {EXIT_RANK_LOST})",
              file=sys.stderr, flush=True)
        raise RankLostExit(EXIT_RANK_LOST, diag) from None
    finally:
        heartbeat.stop()


def train_from_overrides(overrides: Sequence[str], hooks: Sequence[Hook] = ()) -> dict[str, Any] | None:
    """Compose the config and train; returns this process's summary (rank 0's holds the run's results).
    ``hooks`` join the standard ones where this process is the rank (a launcher's rank, or one local rank)."""
    from ..config import compose, to_container
    from ..preflight import preflight
    cfg = compose(overrides)
    plan = preflight(cfg)  # keys, values, this machine, the data (cheap, cached): one clear error before any work
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun, a SLURM task, or env vars set by hand
        setup_logging(int(os.environ["RANK"]))
        return train_rank(cfg, hooks, plan=plan)
    nprocs = int(cfg.trainer.nprocs)
    if nprocs <= 1:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        setup_logging(0)
        return train_rank(cfg, hooks, plan=plan)
    if hooks:
        raise ValueError("extra training hooks need this process to be the rank (trainer.nprocs=1 or a launcher)")
    return spawn_local(to_container(cfg), nprocs, plan)


def _rank_main(local_rank: int, cfg_dict: dict, world: int, port: int, result_path: str, plan: Any) -> None:
    """Entry of one locally spawned rank."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    setup_logging(local_rank)
    from omegaconf import OmegaConf

    from .run_id_event import RunIdEvent
    from . import heartbeat

    tmp = Path(result_path).parent
    heartbeat.set_reporter(lambda d: (tmp / f"lost.rank{local_rank}").write_text(json.dumps(d)))
    hooks = [RunIdEvent(tmp / RUN_ID_FILE)] if local_rank == 0 else []  # the parent marks it if rank 0 dies
    try:
        summary = train_rank(OmegaConf.create(cfg_dict), hooks, plan=plan)
    except USER_ERRORS as err:  # handed to the parent, which prints it as one line
        (tmp / f"error.rank{local_rank}").write_text(str(err))
        sys.exit(2)
    if local_rank == 0:
        Path(result_path).write_text(json.dumps(summary))


RUN_ID_FILE = "run.jsonl"
GRACE_S = 10.0  # after the first rank failed: time the others get to end (and say why) before they are killed


def _signal_name(code: int) -> str:
    import signal

    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _wait_ranks(procs: list[Any]) -> set[int]:
    """Until every rank ended well, or one failed and the others ended or had ``GRACE_S`` to; kills the rest
    and returns their indices."""
    import time
    from multiprocessing.connection import wait

    failed_at, ours = None, set()
    while any(p.exitcode is None for p in procs):
        if any(p.exitcode not in (None, 0) for p in procs):
            failed_at = failed_at or time.monotonic()
            if time.monotonic() - failed_at > GRACE_S:
                break
        wait([p.sentinel for p in procs if p.exitcode is None], timeout=1.0)
    for i, p in enumerate(procs):
        if p.exitcode is None:
            p.kill()  # also a stopped (SIGSTOP) rank
            ours.add(i)
        p.join()
    return ours


def _failure(tmp: Path, procs: list[Any], ours: set[int], error_files: list[str]) -> BaseException:
    """The one error a failed local run ends with: a rank killed by a signal, or lost by the others ->
    RankLostExit (one line, exit 76); a rank's user error -> SpnetError; any other error -> torch's exception."""
    import pickle

    import torch.multiprocessing as mp

    from . import heartbeat
    from .preempt import EXIT_RANK_LOST

    codes = {i: p.exitcode for i, p in enumerate(procs)}
    killed = [i for i, c in codes.items() if c is not None and c < 0 and i not in ours]
    messages = sorted(tmp.glob("error.rank*"))
    bad = [i for i, c in codes.items() if c not in (0, EXIT_RANK_LOST) and i not in ours]
    lost: dict[int, Any] = {}
    for f in sorted(tmp.glob("lost.rank*")):
        for x in json.loads(f.read_text()).get("lost", []):
            lost.setdefault(x["rank"], x)
    if killed:
        i = killed[0]
        text = (f"rank {i} (pid {procs[i].pid}) was killed by {_signal_name(codes[i])}; the other ranks ended "
                f"(exit {EXIT_RANK_LOST})")
    elif messages:
        return SpnetError(messages[0].read_text())
    elif bad and Path(error_files[bad[0]]).is_file():
        i = bad[0]
        return mp.ProcessRaisedException(f"\n\n-- Process {i} terminated with the following error:\n"
                                         + pickle.loads(Path(error_files[i]).read_bytes()), i, procs[i].pid)
    elif bad:
        i = bad[0]
        return mp.ProcessExitedException(f"process {i} terminated with exit code {codes[i]}", error_index=i,
                                         error_pid=procs[i].pid, exit_code=codes[i])
    elif lost:
        text = heartbeat.describe(list(lost.values())) + f"; the run ended (exit {EXIT_RANK_LOST})"
    else:
        text = f"ranks {sorted(i for i, c in codes.items() if c)} lost contact with the others (exit {EXIT_RANK_LOST})"
    print(f"spnet train: error: {text}", file=sys.stderr, flush=True)
    return RankLostExit(EXIT_RANK_LOST, {"message": text, "codes": codes, "lost": list(lost.values())})


def _mark_run_failed(tmp: Path) -> None:
    """Rank 0 died before it could close its MLflow run: close it here (FAILED)."""
    path = tmp / RUN_ID_FILE
    if not path.is_file():
        return
    try:
        rec = [json.loads(x) for x in path.read_text().splitlines() if x.strip()][-1]
        from ..tracking.runs import client

        c = client(rec["tracking_uri"])
        if c.get_run(rec["mlflow_run_id"]).info.status == "RUNNING":
            c.set_terminated(rec["mlflow_run_id"], "FAILED")
    except Exception as err:  # noqa: BLE001 - the failure itself is what matters
        print(f"spnet train: could not mark the MLflow run FAILED: {err}", file=sys.stderr)


def spawn_local(cfg_dict: dict, nprocs: int, plan: Any = None) -> dict[str, Any]:
    """Start ``nprocs`` ranks on this machine with the parent's data ``plan``; SIGTERM/SIGUSR2 to this process
    are forwarded to every rank. A rank that dies (or stops answering) ends the run with one line and exit 76."""
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
            ours = _wait_ranks(ctx.processes)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if any(p.exitcode != 0 for p in ctx.processes):
            if ctx.processes[0].exitcode != 0:
                _mark_run_failed(Path(tmp))
            raise _failure(Path(tmp), ctx.processes, ours, ctx.error_files)
        return json.loads(result.read_text())
