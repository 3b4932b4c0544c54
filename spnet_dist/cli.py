"""`spnet` — one entry point; each verb parses, composes the config and calls one function."""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def _quiet_libraries() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("DeepSpeed", "deepspeed", "torch.distributed", "mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    _quiet_libraries()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(local_rank: int, cfg_dict: dict, world: int, port: int, result_path: str) -> None:
    """Entry of one locally spawned rank."""
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _setup_logging(local_rank)
    from omegaconf import OmegaConf

    from .engine.trainer import train

    summary = train(OmegaConf.create(cfg_dict))
    if local_rank == 0:
        Path(result_path).write_text(json.dumps(summary))


def cmd_train(overrides: Sequence[str], print_cfg: str | None) -> dict[str, Any] | None:
    from omegaconf import OmegaConf

    from .config import compose, to_container
    from .data.loaders import check_layout

    cfg = compose(overrides)
    if print_cfg:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return None
    check_layout(cfg.data.root)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun, SLURM task, or env vars set by hand
        from .engine.trainer import train

        _setup_logging(int(os.environ["RANK"]))
        summary = train(cfg)
        return summary if int(os.environ["RANK"]) == 0 else None
    nprocs = int(cfg.trainer.nprocs)
    if nprocs <= 1:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
        _setup_logging(0)
        from .engine.trainer import train

        return train(cfg)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "summary.json"
        mp.start_processes(_rank_main, args=(to_container(cfg), nprocs, _free_port(), str(result)),
                           nprocs=nprocs, join=True, start_method="spawn")
        return json.loads(result.read_text())


def cmd_eval(overrides: Sequence[str]) -> dict[str, Any]:
    from .engine.eval_checkpoint import eval_checkpoint

    _setup_logging(0)
    return eval_checkpoint(overrides)


def cmd_make_tiny(args: argparse.Namespace) -> dict[str, Any]:
    from .data.tiny import make_tiny_imagenet

    return make_tiny_imagenet(args.out, classes=args.classes, train_per_class=args.train_per_class,
                              val_per_class=args.val_per_class, size=args.size, seed=args.seed)


def cmd_ui(args: argparse.Namespace) -> int:
    from .tracking.ui import serve

    return serve(args.uri, host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spnet", description="Train and evaluate dynamic-inference ResNets.")
    sub = p.add_subparsers(dest="verb", required=True)
    t = sub.add_parser("train", help="train with Hydra overrides key=value ...")
    t.add_argument("overrides", nargs="*")
    t.add_argument("--cfg", choices=["job"], help="print the composed config and exit")
    e = sub.add_parser("eval", help="evaluate a checkpoint: spnet eval checkpoint=<path> data.root=<path>")
    e.add_argument("overrides", nargs="*")
    m = sub.add_parser("make-tiny-imagenet", help="write a tiny learnable ImageNet-format dataset")
    m.add_argument("out")
    m.add_argument("--classes", type=int, default=10)
    m.add_argument("--train-per-class", type=int, default=60)
    m.add_argument("--val-per-class", type=int, default=20)
    m.add_argument("--size", type=int, default=None, help="shorter side in pixels (default: varied 64-180)")
    m.add_argument("--seed", type=int, default=0)
    u = sub.add_parser("ui", help="start the MLflow UI on 127.0.0.1 against the tracking store")
    u.add_argument("--uri", default="sqlite:///mlflow.db")
    u.add_argument("--host", default="127.0.0.1")
    u.add_argument("--port", type=int, default=5000)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError

    try:
        if args.verb == "train":
            result = cmd_train(args.overrides, args.cfg)
        elif args.verb == "eval":
            result = cmd_eval(args.overrides)
        elif args.verb == "make-tiny-imagenet":
            result = cmd_make_tiny(args)
        else:
            return cmd_ui(args)
    except ConfigError as err:
        print(f"spnet {args.verb}: config error: {err}", file=sys.stderr)
        return 2
    except USER_ERRORS as err:
        if os.environ.get("SPNET_DEBUG"):
            raise
        print(f"spnet {args.verb}: error: {err}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
