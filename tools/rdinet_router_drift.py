"""Router drift through RDI-Net's uniform-sampling warm-up: 2 ranks (gloo), tiny data, the routers' norm at the
start and after the warm-up, and whether they are bitwise unchanged. One JSON line.

    python tools/rdinet_router_drift.py WORKDIR [--deepspeed zero0|zero1|zero2] [--epochs 10] [--wd 0.01]

Tiny data: 4 classes x 16 images, batch 8 per rank -> 4 steps per epoch (10 epochs = 40 steps). The start is the
network the trainer builds (same composed config, same seed).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from spnet_dist.config import compose
from spnet_dist.data.tiny import make_tiny_imagenet
from spnet_dist.engine.rng import seed_all
from spnet_dist.methods.build import build_from_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--deepspeed", default="zero0", choices=["zero0", "zero1", "zero2"])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--wd", type=float, default=0.01)
    a = p.parse_args()
    data, out = a.workdir / "imagenet", a.workdir / a.deepspeed
    if not data.exists():
        make_tiny_imagenet(data, classes=4, train_per_class=16, val_per_class=5, seed=1)
    over = ["method=rdinet", "model.num_classes=4", f"deepspeed={a.deepspeed}", f"optim.weight_decay={a.wd}",
            f"method.usw_epochs={a.epochs}", f"trainer.epochs={a.epochs}", "method.router.d=32"]
    args = ["train", f"data.root={data}", f"checkpoint.dir={out / 'ckpt'}", f"tracking.uri=sqlite:///{out / 'm.db'}",
            "trainer.batch_size=8", "trainer.progress=false", "data.image_size=32", "data.val_resize=36",
            "trainer.nprocs=2", "resume=none", *over]
    proc = subprocess.run([sys.executable, "-m", "spnet_dist.cli", *args], capture_output=True, text=True,
                          cwd=a.workdir)
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg = compose(over)
    seed_all(int(cfg.seed))
    net, _ = build_from_config(cfg.model, cfg.method)
    keys = [n for n, _ in net.named_parameters() if ".router." in n]
    init = net.state_dict()
    after = torch.load(Path(summary["checkpoint"]) / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)["module"]
    norm = lambda sd: float(torch.sqrt(sum((sd[k].double() ** 2).sum() for k in keys)))  # noqa: E731
    print(json.dumps({"deepspeed": a.deepspeed, "steps": summary["steps"], "weight_decay": a.wd,
                      "router_norm_start": norm(init), "router_norm_after": norm(after),
                      "ratio": norm(after) / norm(init),
                      "bitwise_unchanged": all(torch.equal(init[k], after[k]) for k in keys)}))


if __name__ == "__main__":
    main()
