"""A tiny, learnable ImageNet-format dataset of real JPEG files, deterministic from a seed.

Each class has its own shape (disc, square, triangle, ring, stripes, ...), colour and texture; images differ
in size, aspect ratio, position, scale, background and noise, so a small CNN must learn something to
beat chance. Layout: ``OUT/{train,val}/<wnid>/<wnid>_<i>.JPEG`` with wnid-like folder names.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("disc", "square", "triangle", "ring", "hstripes", "vstripes", "cross", "diamond", "checker", "dots")


def wnid(c: int) -> str:
    """ImageNet-like synset id for class ``c`` (n + 8 digits)."""
    return f"n{1440000 + 7919 * c:08d}"


def _class_style(c: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, 7, c])
    hue = np.array([(37 * c) % 256, (91 * c + 60) % 256, (151 * c + 120) % 256], dtype=float)
    return {"shape": SHAPES[c % len(SHAPES)], "color": hue, "period": 4 + (c * 3) % 9,
            "rot": rng.uniform(0, 360) if c >= len(SHAPES) else 0.0}


def _draw(c: int, style: dict, rng: np.random.Generator) -> Image.Image:
    w = int(rng.integers(72, 160))
    h = int(np.clip(w * rng.uniform(0.7, 1.4), 64, 180))
    bg = rng.uniform(40, 215, size=3)
    img = Image.new("RGB", (w, h), tuple(int(v) for v in bg))
    d = ImageDraw.Draw(img)
    color = tuple(int(v) for v in np.clip(style["color"] + rng.normal(0, 18, 3), 0, 255))
    s = min(w, h) * rng.uniform(0.35, 0.7)
    cx, cy = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.65)
    box = (cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2)
    shape, p = style["shape"], style["period"]
    if shape == "disc":
        d.ellipse(box, fill=color)
    elif shape == "square":
        d.rectangle(box, fill=color)
    elif shape == "triangle":
        d.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=color)
    elif shape == "ring":
        d.ellipse(box, outline=color, width=max(3, int(s / 7)))
    elif shape == "hstripes":
        for y in range(0, h, 2 * p):
            d.rectangle((0, y, w, y + p - 1), fill=color)
    elif shape == "vstripes":
        for x in range(0, w, 2 * p):
            d.rectangle((x, 0, x + p - 1, h), fill=color)
    elif shape == "cross":
        t = s / 5
        d.rectangle((box[0], cy - t, box[2], cy + t), fill=color)
        d.rectangle((cx - t, box[1], cx + t, box[3]), fill=color)
    elif shape == "diamond":
        d.polygon([(cx, box[1]), (box[2], cy), (cx, box[3]), (box[0], cy)], fill=color)
    elif shape == "checker":
        for y in range(0, h, p):
            for x in range((y // p) % 2 * p, w, 2 * p):
                d.rectangle((x, y, x + p - 1, y + p - 1), fill=color)
    else:  # dots
        for y in range(p, h, 3 * p):
            for x in range(p, w, 3 * p):
                d.ellipse((x - p / 2, y - p / 2, x + p / 2, y + p / 2), fill=color)
    if style["rot"]:
        img = img.rotate(style["rot"], fillcolor=tuple(int(v) for v in bg))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 12, size=(h, w, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 1.2))))


def make_tiny_imagenet(out: str | Path, classes: int = 10, train_per_class: int = 60, val_per_class: int = 20,
                       size: int | None = None, seed: int = 0) -> dict:
    """Write the dataset under ``out`` and return a summary dict. ``size`` fixes the shorter side if given."""
    if classes < 2:
        raise ValueError(f"--classes must be at least 2, got {classes}")
    out = Path(out)
    counts = {"train": 0, "val": 0}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            style = _class_style(c, seed)
            folder = out / split / wnid(c)
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, c])
            for i in range(per_class):
                img = _draw(c, style, rng)
                if size:
                    scale = size / min(img.size)
                    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
                img.save(folder / f"{wnid(c)}_{i}.JPEG", quality=90)
                counts[split] += 1
    summary = {"root": str(out), "classes": classes, **counts, "seed": seed}
    (out / "tiny_imagenet.json").write_text(json.dumps(summary, indent=2))
    return summary
