"""Image decoding and transforms of the torchvision backend, the same ops on CPU (DataLoader workers) and GPU.

Train (``data.train_aug``): ``random_resized_crop`` (scale (0.08, 1), ratio (3/4, 4/3): torchvision's defaults
and DALI's) to ``crop`` x ``crop``, or ``pad_crop`` (torchvision's ``RandomCrop(crop, padding=pad)`` on the uint8
image: zero padding, so padded pixels normalize to -MEAN/STD); then a horizontal flip with probability 1/2.
Val: resize the shorter side to ``val_resize``, center crop ``crop``. Both normalize with the ImageNet ``MEAN`` /
``STD`` DALI uses (float32, CHW).

The randomness of one sample comes from its own ``random.Random`` seeded by (seed, epoch, file index), never from
a global or per-worker stream, so a batch is the same whichever worker or process makes it and whenever.
"""
from __future__ import annotations

import io
import math
import random
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as F

from .index import CorruptDataError, record_bad_file
from .options import MEAN, STD

RRC, PAD_CROP = "random_resized_crop", "pad_crop"
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)


def sample_rng(seed: int, epoch: int, index: int) -> random.Random:
    """The random stream of file ``index`` in ``epoch`` (string seeds are hashed with SHA-512: stable everywhere)."""
    return random.Random(f"tv-aug:{seed}:{epoch}:{index}")


def crop_box(height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random-resized crop: torchvision's ``RandomResizedCrop.get_params`` drawn from
    ``rng`` (10 tries of area in ``SCALE`` and log-uniform aspect in ``RATIO``, else a center crop)."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(RATIO):
        w, h = width, int(round(width / min(RATIO)))
    elif in_ratio > max(RATIO):
        h, w = height, int(round(height * max(RATIO)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def pad_crop_view(img: torch.Tensor, crop: int, pad: int, rng: random.Random) -> torch.Tensor:
    """torchvision's ``RandomCrop(crop, padding=pad)`` + ``RandomHorizontalFlip()`` of a uint8 CHW image (any
    device), drawn from ``rng``: zero-pad ``pad`` pixels on every side, take the ``crop`` x ``crop`` window at
    (top, left) uniform in [0, 2*pad]^2 (RandomCrop's draw order), mirror on a coin flip. An image that is not
    ``crop`` x ``crop`` (CIFAR-10's are 32x32 already) is first resized to it, ignoring its aspect ratio."""
    if tuple(img.shape[-2:]) != (crop, crop):
        img = F.resize(img, [crop, crop], antialias=True)
    top, left = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
    out = F.crop(F.pad(img, [pad], fill=0), top, left, crop, crop) if pad else img
    return F.horizontal_flip(out) if rng.random() < 0.5 else out


def train_view(img: torch.Tensor, crop: int, rng: random.Random, aug: str = RRC, pad: int = 4) -> torch.Tensor:
    """The ``aug`` crop (``pad_crop``: ``pad_crop_view``; else random-resized-crop) to ``crop`` x ``crop`` and a
    coin-flip mirror of a uint8 CHW image (any device)."""
    if aug == PAD_CROP:
        return pad_crop_view(img, crop, pad, rng)
    top, left, h, w = crop_box(img.shape[-2], img.shape[-1], rng)
    out = F.resized_crop(img, top, left, h, w, [crop, crop], antialias=True)
    return F.horizontal_flip(out) if rng.random() < 0.5 else out


def train_views_gpu(imgs: list[torch.Tensor], crop: int, rngs: list[random.Random], aug: str = RRC,
                    pad: int = 4) -> torch.Tensor:
    """``train_view`` of a batch of uint8 CHW GPU images as one float32 N×3×crop×crop tensor (values 0..255,
    rounded as the uint8 path rounds): the same boxes and flips drawn from the same streams, with three plain
    kernels per image (crop-view → float, antialiased bilinear resize, flip-copy into the batch) instead of
    ``F.resized_crop``'s per-image dispatch and its uint8 round trip (torchvision resizes CUDA uint8 in float).
    ``pad_crop``: ``pad_crop_view`` per image (no resampling for crop x crop images: exactly the CPU's pixels)."""
    if aug == PAD_CROP:
        return torch.stack([pad_crop_view(img, crop, pad, rng) for img, rng in zip(imgs, rngs)]).float()
    out = torch.empty((len(imgs), 3, crop, crop), device=imgs[0].device)
    for k, (img, rng) in enumerate(zip(imgs, rngs)):
        top, left, h, w = crop_box(img.shape[-2], img.shape[-1], rng)
        x = torch.nn.functional.interpolate(img[None, :, top:top + h, left:left + w].float(), size=(crop, crop),
                                            mode="bilinear", antialias=True, align_corners=False)[0]
        out[k] = x.flip(-1) if rng.random() < 0.5 else x
    return out.clamp_(0, 255).round_()


def val_view(img: torch.Tensor, crop: int, val_resize: int) -> torch.Tensor:
    """Shorter side to ``val_resize``, then the center ``crop`` x ``crop`` of a uint8 CHW image (any device)."""
    return F.center_crop(F.resize(img, [val_resize], antialias=True), [crop, crop])


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or float 0..255) (N)CHW RGB -> float32 ``(x - MEAN) / STD`` on the images' device."""
    mean = torch.tensor(MEAN, device=images.device).view(3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(3, 1, 1)
    return (images.float() - mean) / std


def is_jpeg(data: torch.Tensor) -> bool:
    return data.numel() > 3 and int(data[0]) == 0xFF and int(data[1]) == 0xD8 and int(data[2]) == 0xFF


def read_bytes(path: str) -> torch.Tensor:
    """The file as a 1-D uint8 tensor (what GPU decoding takes)."""
    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)


def decode_rgb(data: torch.Tensor) -> torch.Tensor:
    """uint8 CHW RGB on the CPU: torchvision's decoders (JPEG, PNG, GIF, WebP), PIL for the rest (BMP, TIFF, ...)."""
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        import numpy as np
        from PIL import Image

        with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
            arr = np.asarray(im.convert("RGB"))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def corrupt(root: str, rel: str, err: BaseException, on_corrupt: str) -> CorruptDataError:
    """The error for a file that cannot be read or decoded; with ``on_corrupt='skip'`` it is recorded in the
    split's index first, so the next run leaves it out (as the DALI backend does)."""
    path = Path(root) / rel
    reason = " ".join(str(err).split())[:200] or type(err).__name__
    if on_corrupt == "skip":
        where = record_bad_file(root, rel, f"torchvision: {reason}")
        if where:
            return CorruptDataError(
                f"could not decode {path} ({reason}); it is now listed as bad in {where}, so the next run leaves "
                f"it out (data.on_corrupt=skip with data.scan=quick or decode): run the same command again, "
                f"resume=auto continues from the last checkpoint")
    return CorruptDataError(f"could not decode {path} ({reason}); replace or delete the file, or set "
                            f"data.on_corrupt=skip")


def load_rgb(root: str, rel: str, on_corrupt: str, data: torch.Tensor | None = None) -> torch.Tensor:
    """File ``rel`` of ``root`` (or its bytes ``data``) decoded on the CPU; CorruptDataError names a bad file."""
    try:
        return decode_rgb(read_bytes(str(Path(root) / rel)) if data is None else data)
    except Exception as err:  # noqa: BLE001 - any read/decode failure is a data error naming the file
        raise corrupt(root, rel, err, on_corrupt) from None


def gpu_decode(datas: list[torch.Tensor], root: str, rels: list[str], on_corrupt: str) -> list[torch.Tensor]:
    """uint8 CHW RGB images on the current CUDA device: JPEGs batched through nvJPEG
    (``decode_jpeg(list, device="cuda")``), other formats and anything nvJPEG refuses decoded on the CPU and
    moved (run on the device by tools/gpu_check.sh; the development machines have no GPU)."""
    out: list[torch.Tensor | None] = [None] * len(datas)
    jpegs = [i for i, d in enumerate(datas) if is_jpeg(d)]
    if jpegs:
        try:
            for i, img in zip(jpegs, decode_jpeg([datas[i] for i in jpegs], mode=ImageReadMode.RGB,
                                                 device="cuda")):
                out[i] = img
        except RuntimeError:  # one bad file fails the batch: decode one by one on the CPU to name it
            pass
    for i, img in enumerate(out):
        if img is None:
            out[i] = load_rgb(root, rels[i], on_corrupt, datas[i]).cuda(non_blocking=True)
    return out  # type: ignore[return-value]
