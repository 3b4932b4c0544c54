"""Decode throughput of the torchvision backend: batched nvJPEG on the GPU vs CPU decoding in DataLoader workers.

Usage:
    python tools/bench_decode.py [--images 256] [--repeat 8] [--batch 64] [--workers 16] [--rounds 3]
                                 [--device auto|cpu|cuda] [--data-dir outputs/bench/jpeg-decode] [--jsonl ...]

Data: ``--images`` ImageNet-like JPEGs (sides 300-500 px, quality 90; ``bench_data.make_jpegs``), each listed
``--repeat`` times, so an epoch has images x repeat samples (enough batches to keep every worker busy) while the
files stay few and in the page cache: reads cost little, decoding is what is measured.

Modes (the first two are the trainer's loader, ``spnet_dist.data.torchvision_backend``, train=True, 224 px):
  cpu-loader  data.decode=cpu: ``--workers`` DataLoader workers read, decode, random-resized-crop, flip, normalize
  gpu-loader  data.decode=mixed: workers only read the bytes; each batch is decoded by nvJPEG in one batched call
              and cropped / normalized on the GPU (only with CUDA)
  gpu-decode  ``decode_jpeg(list, device="cuda")`` on in-memory bytes alone: the decoder's ceiling (only with CUDA)
  cpu-decode  ``decode_jpeg`` on the CPU of the same bytes, one thread in this process: the per-core rate

Timing: one untimed warm-up epoch per mode, then ``--rounds`` rounds in which every mode runs one epoch, in a
rotated order (``bench_common.interleaved``); on CUDA the clock stops after a synchronize. Reported: median img/s
and the ratio to ``cpu-loader``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402
import torch  # noqa: E402

MODES = ("cpu-loader", "gpu-loader", "gpu-decode", "cpu-decode")


def loader_epoch(train: Path, files: list[str], args: argparse.Namespace, decode: str) -> Callable[[], int]:
    """One epoch of the trainer's torchvision loader over ``files``; returns the images it yielded."""
    from spnet_dist.data.torchvision_backend import TorchvisionLoader, TvSpec

    labels = tuple(sorted({f.split("/", 1)[0] for f in files}).index(f.split("/", 1)[0]) for f in files)
    spec = TvSpec(root=str(train), files=tuple(files), labels=labels, batch_size=args.batch, shard_id=0,
                  num_shards=1, train=True, crop=224, val_resize=256, seed=0, workers=args.workers, decode=decode)
    loader = TorchvisionLoader(spec)

    def epoch() -> int:
        n = 0
        for images, _labels in loader:
            n += images.shape[0]
        if decode == "mixed":
            torch.cuda.synchronize()
        return n

    return epoch


def decode_epoch(datas: list[torch.Tensor], batch: int, device: str) -> Callable[[], int]:
    """Decode the in-memory JPEG bytes ``datas`` batch by batch on ``device``; returns the images decoded."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def epoch() -> int:
        n = 0
        for k in range(0, len(datas), batch):
            chunk = datas[k:k + batch]
            if device == "cuda":
                n += len(decode_jpeg(chunk, mode=ImageReadMode.RGB, device="cuda"))
            else:
                n += sum(1 for d in chunk if decode_jpeg(d, mode=ImageReadMode.RGB).shape[0] == 3)
        if device == "cuda":
            torch.cuda.synchronize()
        return n

    return epoch


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from bench_data import make_jpegs

    from spnet_dist.data.tv_images import read_bytes

    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    torch.set_num_threads(1)  # the consuming process only iterates (and decodes, for cpu-decode)
    train = make_jpegs(Path(args.data_dir), args.images)
    paths = sorted(train.rglob("*.JPEG"))
    files = [p.relative_to(train).as_posix() for p in paths] * args.repeat
    datas = [read_bytes(str(p)) for p in paths] * args.repeat
    mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
    names = [m for m in (args.modes or MODES) if cuda or not m.startswith("gpu")]
    makers = {"cpu-loader": lambda: loader_epoch(train, files, args, "cpu"),
              "gpu-loader": lambda: loader_epoch(train, files, args, "mixed"),
              "gpu-decode": lambda: decode_epoch(datas, args.batch, "cuda"),
              "cpu-decode": lambda: decode_epoch(datas[:args.cpu_decode_images], args.batch, "cpu")}
    epochs = {n: makers[n]() for n in names}
    counts: dict[str, int] = {}

    def timed(name: str) -> Callable[[], int]:
        def call() -> int:
            counts[name] = epochs[name]()
            return counts[name]
        return call

    la_start = bc.load_avg()
    print(f"# {len(paths)} JPEGs x {args.repeat} ({mean_kb:.1f} KB mean, sides 300-500 px) -> 224 px, batch "
          f"{args.batch}, {args.workers} workers, {args.rounds} rounds, cuda {cuda}, load average {la_start}",
          flush=True)
    times = bc.interleaved({n: timed(n) for n in names}, rounds=args.rounds, warmup=1)
    la_end = bc.load_avg()
    ref = "cpu-loader" if "cpu-loader" in times else names[0]
    rates = {n: [counts[n] / t for t in times[n]] for n in names}
    rows = []
    for n in names:
        rows.append(bc.stamp({
            "bench": "bench_decode", "mode": n, "images": len(paths), "repeat": args.repeat,
            "images_per_epoch": counts[n], "mean_kb": round(mean_kb, 1), "batch": args.batch,
            "workers": args.workers if n.endswith("loader") else (0 if n == "gpu-decode" else 1),
            "rounds": args.rounds, "img_per_s": round(bc.median(rates[n]), 1), "ratio_vs": ref,
            "ratio": round(bc.ratio_median(rates[n], rates[ref]), 4), "img_per_s_all": [round(r, 1) for r in rates[n]],
        }, la_start, la_end))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=256, help="distinct JPEG files")
    p.add_argument("--repeat", type=int, default=8, help="times each file is listed in an epoch")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=16, help="DataLoader worker processes of the loader modes")
    p.add_argument("--rounds", type=int, default=3, help="timed epochs per mode")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="cpu: leave out the GPU modes")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None, help="default: all that the device allows")
    p.add_argument("--cpu-decode-images", type=int, default=512, help="images per cpu-decode epoch (one thread)")
    p.add_argument("--data-dir", default=str(bc.BENCH_DIR / "jpeg-decode"))
    bc.add_common_args(p, "bench_decode")
    args = p.parse_args(argv)
    rows = run(args)
    bc.print_table(rows, [("mode", "mode", ""), ("workers", "workers", "d"), ("images_per_epoch", "img/epoch", "d"),
                          ("img_per_s", "img/s", ".1f"), ("ratio", f"÷ {rows[0]['ratio_vs']}", ".3f")])
    bc.append_jsonl(args.jsonl, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
