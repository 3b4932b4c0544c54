"""Training-input throughput: the project's DALI CPU pipeline vs a torchvision DataLoader, side by side.

Usage:
    python tools/bench_data.py [--images 480] [--batch 32] [--workers 2] [--rounds 4]
                               [--loaders dali pil] [--data-dir outputs/bench/jpeg] [--wait-quiet 600]

Data: ``--images`` synthetic JPEGs (10 classes, ImageNet-like: both sides 300-500 px, quality 90, textured so
they compress like photos), made once with PIL and cached under ``--data-dir``.

Loaders, same augmentations (random-resized crop to 224 with scale [0.08, 1] and ratio [3/4, 4/3], horizontal
flip, float CHW normalised with the ImageNet mean/std), same batch, same parallelism (``--workers``):
  dali        the trainer's pipeline, ``spnet_dist.data.dali.DaliLoader`` (train=True, ``num_threads=workers``,
              decode on the CPU): file reader -> fused decode + random crop (only the crop window is decoded) ->
              resize -> crop_mirror_normalize
  pil         torchvision ``ImageFolder`` (PIL decode) + ``RandomResizedCrop`` / ``RandomHorizontalFlip`` /
              ``ToTensor`` / ``Normalize``, ``DataLoader(num_workers=workers, persistent_workers=True)``
  tvio        torchvision ``decode_jpeg`` + ``transforms.v2`` on uint8 tensors, same DataLoader (optional)
  dali-mixed  DALI with ``decode=mixed`` (nvJPEG) and HWC output; only when a GPU is present

Timing: one untimed warm-up epoch per loader, then ``--rounds`` rounds in which every loader runs one full epoch,
in a rotated order. Each epoch is measured in steady state: from the arrival of batch ``--skip`` to the last batch
(see ``Loader``). Reported per loader: median img/s, img/s per worker (thread or process), images per CPU-second
(user + system time of the process and its worker processes over the same window: the cost per image, robust to
other load on the machine), and the ratios to ``pil`` (medians of per-round ratios).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_common as bc  # noqa: E402

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CLASSES = 10
_TICK = os.sysconf("SC_CLK_TCK")


def make_jpegs(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` JPEGs with sides in [300, 500] under ``root/train/<wnid>/``; reused when already complete."""
    import numpy as np
    from PIL import Image

    from spnet_dist.data.tiny import _class_style, _draw, wnid

    train = root / "train"
    marker = root / f"complete-{n}-{seed}"
    if marker.exists():
        return train
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % CLASSES
        folder = train / wnid(c)
        folder.mkdir(parents=True, exist_ok=True)
        w, h = (int(v) for v in rng.integers(300, 501, size=2))
        img = _draw(c, _class_style(c, seed), rng).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32)
        # photo-like texture: smooth low-frequency variation plus fine noise (JPEGs of ~50-90 KB at quality 90)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        wave = 20 * np.sin(xx / rng.uniform(5, 30) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(5, 30))
        arr = arr + wave[..., None] + rng.normal(0, 10, size=arr.shape)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(folder / f"{wnid(c)}_{i}.JPEG", quality=90)
    marker.write_text("ok\n")
    return train


def cpu_seconds(pids: list[int]) -> float:
    """user + system CPU time of this process and of the given (child) processes."""
    t = sum(os.times()[:2])
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            t += (int(fields[11]) + int(fields[12])) / _TICK
        except (OSError, IndexError, ValueError):
            pass
    return t


class Loader:
    """One loader; ``epoch()`` runs a full epoch and keeps its steady-state rate and CPU cost.

    Steady state: the clock (and the CPU-time counter) starts when batch ``skip`` arrives and stops at the last one,
    so start-up effects are excluded alike for every loader (DataLoader workers restarting their prefetch, DALI
    handing out the batches it prefetched across the epoch boundary). After each epoch ``settle`` seconds pass
    untimed, so background prefetching of one loader never runs inside another loader's window.
    """

    def __init__(self, name: str, make: Callable[[], Any], skip: int, settle: float) -> None:
        self.name, self.skip, self.settle = name, skip, settle
        self.it = make()
        self.rates: list[float] = []
        self.per_cpu: list[float] = []
        self.epoch_images = 0

    def epoch(self) -> tuple[float, float, int]:
        it = iter(self.it)
        workers = [w.pid for w in getattr(it, "_workers", []) if w.pid]
        n = counted = 0
        t0 = c0 = None
        for i, batch in enumerate(it, start=1):
            n += int(batch[0].shape[0])
            if i == self.skip:
                t0, c0 = time.perf_counter(), cpu_seconds(workers)
            elif t0 is not None:
                counted += int(batch[0].shape[0])
        if t0 is None or counted == 0:
            raise SystemExit(f"{self.name}: an epoch has fewer than {self.skip + 1} batches; use more --images")
        wall, cpu = time.perf_counter() - t0, cpu_seconds(workers) - c0
        self.epoch_images = n
        time.sleep(self.settle)
        return counted / wall, (counted / cpu if cpu > 0 else float("nan")), n

    def record(self, res: tuple[float, float, int]) -> None:
        self.rates.append(res[0])
        self.per_cpu.append(res[1])


def dali_loader(train: Path, batch: int, workers: int, decode: str = "cpu", layout: str = "CHW") -> Any:
    from spnet_dist.data.dali import DaliLoader, LoaderSpec

    spec = LoaderSpec(root=str(train), batch_size=batch, shard_id=0, num_shards=1, train=True, crop=224,
                      val_resize=256, num_threads=workers, seed=0, decode=decode, layout=layout)
    return DaliLoader(spec)


def torch_loader(train: Path, batch: int, workers: int, kind: str) -> Any:
    import torch
    from torch.utils.data import DataLoader
    from torchvision import datasets

    if kind == "pil":
        from torchvision import transforms as T

        tf = T.Compose([T.RandomResizedCrop(224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)), T.RandomHorizontalFlip(),
                        T.ToTensor(), T.Normalize(MEAN, STD)])
        ds = datasets.ImageFolder(str(train), transform=tf)
    else:  # tvio: decode_jpeg on the file bytes, v2 transforms on uint8 tensors
        from torchvision.io import ImageReadMode, decode_jpeg, read_file
        from torchvision.transforms import v2

        tf = v2.Compose([v2.RandomResizedCrop(224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
                         v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
        ds = datasets.DatasetFolder(str(train), loader=lambda p: decode_jpeg(read_file(p), mode=ImageReadMode.RGB),
                                    extensions=(".jpeg",), transform=tf)
    return DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    import torch

    torch.set_num_threads(1)  # the consuming process only iterates
    train = make_jpegs(Path(args.data_dir), args.images)
    files = sorted(train.rglob("*.JPEG"))
    mean_kb = sum(f.stat().st_size for f in files) / len(files) / 1024
    names = list(args.loaders)
    if torch.cuda.is_available() and "dali-mixed" not in names:
        names.append("dali-mixed")
    makers = {"dali": lambda: dali_loader(train, args.batch, args.workers),
              "dali-mixed": lambda: dali_loader(train, args.batch, args.workers, decode="mixed", layout="HWC"),
              "pil": lambda: torch_loader(train, args.batch, args.workers, "pil"),
              "tvio": lambda: torch_loader(train, args.batch, args.workers, "tvio")}
    loaders = {n: Loader(n, makers[n], args.skip, args.settle) for n in names}
    la_start = bc.wait_for_quiet(args.wait_quiet, args.quiet_load) if args.wait_quiet else bc.load_avg()
    print(f"# {len(files)} JPEGs ({mean_kb:.1f} KB mean, sides 300-500 px) -> 224 px float, batch {args.batch}, "
          f"{args.workers} threads/workers, {args.rounds} epochs per loader, load average {la_start}", flush=True)
    bc.interleaved({n: ld.epoch for n, ld in loaders.items()}, rounds=args.rounds, warmup=1,
                   on_result=lambda n, res: loaders[n].record(res))
    la_end = bc.load_avg()
    ref = "pil" if "pil" in loaders else names[0]
    rows = []
    for n, ld in loaders.items():
        rate = bc.median(ld.rates)
        rows.append(bc.stamp({
            "bench": "bench_data", "loader": n, "images": len(files), "mean_kb": round(mean_kb, 1),
            "batch": args.batch, "workers": args.workers, "rounds": args.rounds, "images_per_epoch": ld.epoch_images,
            "steady_from_batch": args.skip, "img_per_s": round(rate, 1),
            "img_per_s_per_worker": round(rate / args.workers, 1),
            "img_per_cpu_s": round(bc.median(ld.per_cpu), 1), "ratio_vs": ref,
            "ratio": round(bc.ratio_median(ld.rates, loaders[ref].rates), 4),
            "ratio_per_cpu_s": round(bc.ratio_median(ld.per_cpu, loaders[ref].per_cpu), 4),
            "img_per_s_all": [round(r, 1) for r in ld.rates], "img_per_cpu_s_all": [round(c, 1) for c in ld.per_cpu],
        }, la_start, la_end))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=480)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DALI threads = DataLoader worker processes")
    p.add_argument("--rounds", type=int, default=4, help="timed epochs per loader")
    p.add_argument("--loaders", nargs="+", default=["dali", "pil"], choices=["dali", "pil", "tvio", "dali-mixed"])
    p.add_argument("--data-dir", default=str(bc.BENCH_DIR / "jpeg"))
    p.add_argument("--skip", type=int, default=3, help="batches per epoch before the steady-state clock starts")
    p.add_argument("--settle", type=float, default=0.5, help="untimed pause after every epoch (s)")
    bc.add_common_args(p, "bench_data")
    args = p.parse_args(argv)
    rows = run(args)
    bc.print_table(rows, [("loader", "loader", ""), ("images_per_epoch", "img/epoch", "d"),
                          ("img_per_s", "img/s", ".1f"), ("img_per_s_per_worker", "img/s/worker", ".1f"),
                          ("img_per_cpu_s", "img/CPU-s", ".1f"), ("ratio", f"img/s ÷ {rows[0]['ratio_vs']}", ".3f"),
                          ("ratio_per_cpu_s", "img/CPU-s ÷", ".3f")])
    print(f"# load average {rows[0]['load_avg_start']} -> {rows[0]['load_avg_end']}")
    bc.append_jsonl(args.jsonl, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
