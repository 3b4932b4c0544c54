"""The ``data.*`` config keys this package reads: their choices and numeric ranges (checked by the pre-flight),
and the loader backends ``data.backend`` selects."""
from __future__ import annotations

# data.backend -> the module (in spnet_dist.data) whose ``build`` makes the loader (see ``loader.build_loader``)
BACKENDS: dict[str, str] = {"dali": "dali"}

SCAN_CHOICES = ("quick", "decode", "off")
ON_CORRUPT_CHOICES = ("skip", "fail")
DECODE_CHOICES = ("auto", "cpu", "mixed")

CONFIG_CHOICES: dict[str, tuple] = {
    "data.decode": DECODE_CHOICES,
    "data.on_corrupt": ON_CORRUPT_CHOICES,
    "data.scan": SCAN_CHOICES,
    "data.backend": tuple(BACKENDS),
}
# (low, high, low inclusive)
CONFIG_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "data.image_size": (1, None, True), "data.val_resize": (1, None, True), "data.num_threads": (1, None, True),
}
