"""The cost of checkpoint content hashes: a save of a real DeepSpeed engine with and without the SHA-256 pass.

Usage:
    python tools/bench_checkpoint.py [--model resnet50] [--method spnet_code] [--rounds 3]

One rank (gloo, ZeRO 0) of the given model and method, one optimizer step so the SGD momentum exists, then in
every round both variants, interleaved: ``plain`` = ``engine.save_checkpoint`` (what DeepSpeed writes: module,
optimizer, the client state with the SP-Net teacher), ``hashed`` = the same save followed by
``checkpoint.file_digests`` over every file of the tag, as ``Checkpointer.save`` does before writing the
completion marker. Reports bytes per tag, median seconds of each and their ratio; the resume-side verification
costs the same read once more (``problem_with`` → ``file_digests``), timed as ``verify``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (add_common_args, append_jsonl, interleaved, load_avg, median, print_table,  # noqa: E402
                          ratio_median, stamp)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--method", default="spnet_code")
    p.add_argument("--rounds", type=int, default=3)
    add_common_args(p, "bench_checkpoint")
    args = p.parse_args()

    import deepspeed
    import torch
    from omegaconf import OmegaConf

    from spnet_dist.config import config_dir
    from spnet_dist.engine.checkpoint import CLIENT_KEY, file_digests
    from spnet_dist.engine.setup import init_distributed
    from spnet_dist.methods import build_method
    from spnet_dist.methods.build import build_from_config

    os.environ.update(MASTER_PORT=str(29700 + os.getpid() % 200))
    init_distributed()
    model_cfg = OmegaConf.load(config_dir() / "model" / f"{args.model}.yaml")
    model_cfg.num_classes = 1000
    method_cfg = OmegaConf.load(config_dir() / "method" / f"{args.method}.yaml")
    model, mcfg = build_from_config(model_cfg, method_cfg, pretrained=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config={
        "train_micro_batch_size_per_gpu": 2, "train_batch_size": 2, "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9})
    method = build_method(mcfg, engine.module)
    x = torch.randn(2, 3, 64, 64)
    out = engine(x)
    loss, _ = method.loss(engine.module, x, torch.tensor([0, 1]), out)
    engine.backward(loss)
    engine.step()
    client = {CLIENT_KEY: {"method": method.state_dict()}}

    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        state = {"n": 0, "bytes": 0}

        def save(hashed: bool) -> None:
            state["n"] += 1
            tag = f"t{state['n']}"
            engine.save_checkpoint(tmp, tag=tag, client_state=client, save_latest=False)
            tag_dir = Path(tmp) / tag
            names = [str(f.relative_to(tag_dir)) for f in tag_dir.rglob("*") if f.is_file()]
            state["bytes"] = sum((tag_dir / n).stat().st_size for n in names)
            if hashed:
                file_digests(tag_dir, names)
            shutil.rmtree(tag_dir)

        la0 = load_avg()
        times = interleaved({"plain": lambda: save(False), "hashed": lambda: save(True)}, args.rounds)
        engine.save_checkpoint(tmp, tag="v", client_state=client, save_latest=False)
        names = [str(f.relative_to(Path(tmp) / "v")) for f in (Path(tmp) / "v").rglob("*") if f.is_file()]
        t0 = time.perf_counter()
        file_digests(Path(tmp) / "v", names)
        verify = time.perf_counter() - t0
        la1 = load_avg()
    row = {"bench": "bench_checkpoint", "model": args.model, "method": args.method, "mib": state["bytes"] / 2**20,
           "plain_s": median(times["plain"]), "hashed_s": median(times["hashed"]), "verify_s": verify,
           "ratio": ratio_median(times["hashed"], times["plain"])}
    print_table([row], [("model", "model", ""), ("method", "method", ""), ("mib", "MiB/tag", ".0f"),
                        ("plain_s", "save s", ".2f"), ("hashed_s", "save+hash s", ".2f"),
                        ("verify_s", "verify s", ".2f"), ("ratio", "hashed/plain", ".3f")])
    append_jsonl(args.jsonl, [stamp(row, la0, la1)])


if __name__ == "__main__":
    main()
