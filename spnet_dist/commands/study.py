"""spnet study [--methods ...] [--targets ...] [--static-epochs N] [--epochs M] [--static CKPT] [overrides ...]"""
from __future__ import annotations

import argparse
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", help="overrides for every run (data.root=..., model=..., trainer.*)")
    p.add_argument("--name", default="study", help="study name: MLflow tag, parent run and checkpoint sub-folder; "
                                                   "the same name continues a study (default: study)")
    p.add_argument("--methods", nargs="+", default=["aig", "spnet_code"], help="configs/method presets to "
                                                                               "fine-tune (default: aig spnet_code)")
    p.add_argument("--targets", nargs="+", default=["0.3", "0.5", "0.7"], help="target execution rates")
    p.add_argument("--static-epochs", type=int, default=None, help="epochs of the static run (default: "
                                                                   "trainer.epochs)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of each fine-tune (default: trainer.epochs)")
    p.add_argument("--finetune-milestones", nargs="+", type=int, default=None, metavar="EPOCH",
                   help="epochs at which the fine-tunes' lr drops by optim.gamma (default: optim.milestones, as for "
                        "the static run)")
    p.add_argument("--static", default=None, metavar="CHECKPOINT",
                   help="reuse this static checkpoint (tag dir or its parent) instead of training one")
    p.add_argument("--finetune-lr", type=float, default=None, help="fine-tune learning rate (default: 0.1 x "
                                                                   "optim.lr)")
    p.add_argument("--calibrate", type=int, default=16, metavar="BATCHES",
                   help="eval.gate_calibration_batches of the gated runs (default 16; 0 = the papers' plain "
                        "argmax gates)")
    p.add_argument("--router-lr-mult", type=float, default=10.0, metavar="X",
                   help="optim.router_lr_mult of the gated runs: the fresh routers learn at X x the fine-tune lr "
                        "(default 10, i.e. at optim.lr when --finetune-lr is the default 0.1 x optim.lr)")
    p.add_argument("--rate-weight", default="per-block", type=_rate_weight, metavar="LAMBDA",
                   help="method.rate_weight of the gated fine-tunes: a number, 'per-block' (default: 2 x the "
                        "model's blocks, i.e. the CIFAR lambda = 2 for every block instead of averaged over them; "
                        "30 for resnet32_cifar) or 'preset' (each method's paper value); a method.rate_weight=... "
                        "override wins")
    p.add_argument("--cluster", default=None, help="run as `spnet submit` jobs on this cluster profile")


def _rate_weight(text: str) -> float | str | None:
    if text == "preset":
        return None
    if text == "per-block":
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate weight: give a number >= 0, 'per-block' or 'preset'")
    return value


def run(args: argparse.Namespace) -> dict[str, Any]:
    from ..errors import setup_logging
    from ..launch.study import StudySpec, parse_targets, print_table, study

    setup_logging(0)
    # key=value words after --methods / --targets are overrides (nargs="+" swallows them)
    overrides = [*args.overrides, *(w for w in [*args.methods, *args.targets] if "=" in w)]
    args.methods = [w for w in args.methods if "=" not in w]
    args.targets = [w for w in args.targets if "=" not in w]
    spec = StudySpec(name=args.name, methods=list(args.methods), targets=parse_targets(args.targets),
                     overrides=overrides, static_epochs=args.static_epochs, epochs=args.epochs,
                     static_checkpoint=args.static, finetune_lr=args.finetune_lr,
                     finetune_milestones=args.finetune_milestones,
                     calibration_batches=args.calibrate, router_lr_mult=args.router_lr_mult,
                     rate_weight=args.rate_weight,
                     cluster=args.cluster)
    summary = study(spec)
    print_table(summary)
    return summary
