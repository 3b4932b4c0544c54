"""The ``data.*`` config keys this package reads: their choices and numeric ranges (checked by the pre-flight),
the loader backends ``data.backend`` selects, and what every backend shares (normalization, ``resolve_decode``)."""
from __future__ import annotations

# data.backend -> the module (in spnet_dist.data) whose ``build`` makes the loader (see ``loader.build_loader``)
BACKENDS: dict[str, str] = {"dali": "dali", "torchvision": "torchvision_backend"}

SCAN_CHOICES = ("quick", "decode", "off")
ON_CORRUPT_CHOICES = ("skip", "fail")
DECODE_CHOICES = ("auto", "cpu", "mixed")
# training crop: random_resized_crop (ImageNet; scale 0.08-1, ratio 3/4-4/3) | pad_crop (CIFAR: zero-pad data.pad
# pixels, random crop x crop window; both then a horizontal flip)
TRAIN_AUG_CHOICES = ("random_resized_crop", "pad_crop")

CONFIG_CHOICES: dict[str, tuple] = {
    "data.decode": DECODE_CHOICES,
    "data.on_corrupt": ON_CORRUPT_CHOICES,
    "data.scan": SCAN_CHOICES,
    "data.train_aug": TRAIN_AUG_CHOICES,
    "data.backend": tuple(BACKENDS),
}
# (low, high, low inclusive)
CONFIG_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "data.image_size": (1, None, True), "data.val_resize": (1, None, True), "data.num_threads": (1, None, True),
    "data.pad": (0, None, True),
}

# ImageNet normalization on the 0-255 scale (every backend: (pixel - MEAN) / STD per RGB channel)
MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


def resolve_decode(decode: str) -> str:
    """'auto' -> 'mixed' when CUDA is available, else 'cpu'. 'mixed' without a GPU is an error."""
    import torch

    if decode == "auto":
        return "mixed" if torch.cuda.is_available() else "cpu"
    if decode == "mixed" and not torch.cuda.is_available():
        raise ValueError("data.decode=mixed needs a CUDA GPU, but none is available; use data.decode=cpu or auto")
    if decode not in DECODE_CHOICES:
        raise ValueError(f"data.decode={decode!r} is not valid; choose one of {', '.join(DECODE_CHOICES)}")
    return decode
