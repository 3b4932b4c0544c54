"""Write scikit-image's bundled ``lfw_subset`` (real photographs: 100 faces and 100 non-face patches, 25×25 gray)
as an ImageNet-layout dataset for learning runs: OUT/{train,val}/{face,nonface}/*.JPEG.

Usage:
    python tools/make_lfw_subset.py OUT [--size 36] [--val-per-class 20]

Needs scikit-image (``pip install scikit-image``; the images ship inside the package, nothing is downloaded). The
split is fixed: the last ``--val-per-class`` images of each class are validation, the rest training. Images are
upscaled (bicubic) to ``--size`` px and stored as RGB JPEGs (quality 95), so every data backend reads them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out")
    p.add_argument("--size", type=int, default=36, help="side of the written images in pixels")
    p.add_argument("--val-per-class", type=int, default=20)
    args = p.parse_args(argv)
    try:
        from skimage.data import lfw_subset
    except ImportError:
        sys.exit("make_lfw_subset: needs scikit-image (pip install scikit-image)")
    import numpy as np
    from PIL import Image

    images = lfw_subset()  # (200, 25, 25) float in [0, 1]: 100 faces, then 100 non-faces
    if images.shape[0] != 200:
        sys.exit(f"make_lfw_subset: expected 200 images in lfw_subset, got {images.shape[0]}")
    out = Path(args.out)
    counts: dict[str, int] = {}
    for cls, block in (("face", images[:100]), ("nonface", images[100:])):
        for i, img in enumerate(block):
            split = "val" if i >= len(block) - args.val_per_class else "train"
            d = out / split / cls
            d.mkdir(parents=True, exist_ok=True)
            gray = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
            gray.resize((args.size, args.size), Image.BICUBIC).convert("RGB").save(d / f"{cls}_{i:03d}.JPEG",
                                                                                   quality=95)
            counts[split] = counts.get(split, 0) + 1
    print(json.dumps({"root": str(out), "classes": 2, **counts, "size": args.size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
