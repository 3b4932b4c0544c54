"""data.train_aug=pad_crop (the CIFAR scripts' RandomCrop(32, padding=4) + flip) in both backends: every training
image is a 32x32 window of the zero-padded image at a shift in [-4, 4]^2 (possibly mirrored), the shifts vary, the
padded pixels normalize as 0 does; the default stays random_resized_crop; the keys are checked and guarded on
resume; `spnet train` runs with it (DALI and torchvision, CPU decode)."""
from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import last_json, run_spnet, tiny_train_args
from PIL import Image

from spnet_dist.config import ConfigError, compose, to_container
from spnet_dist.data import tv_images as T
from spnet_dist.data.loader import build_loader
from spnet_dist.data.preflight import plan_data
from spnet_dist.data.torchvision_backend import TorchvisionLoader
from spnet_dist.engine.resume_config import check_resume_config
from spnet_dist.preflight import check_static

CROP, PAD, CLASSES, PER_CLASS = 32, 4, 2, 8
ZERO = -torch.tensor(T.MEAN).view(3, 1, 1) / torch.tensor(T.STD).view(3, 1, 1)  # a padded (0) pixel, normalized


@pytest.fixture(scope="module")
def cifar_like(tmp_path_factory) -> Path:
    """root/{train,val}/<class>/*.png of 32x32 random pixels in 1..255 (no 0: a padded pixel is told apart)."""
    root = tmp_path_factory.mktemp("cifar") / "data"
    rng = np.random.default_rng(0)
    for split, n in (("train", PER_CLASS), ("val", 2)):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(1, 256, (CROP, CROP, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def _cfg(root: Path, backend: str, *extra: str):
    return compose([f"data.root={root}", f"model.num_classes={CLASSES}", "trainer.batch_size=4",
                    f"data.image_size={CROP}", f"data.val_resize={CROP}", f"data.backend={backend}",
                    "data.decode=cpu", "data.num_threads=1", *extra])


def _windows(src: torch.Tensor) -> dict[tuple[int, int, bool], torch.Tensor]:
    """Every pad_crop output of a uint8 CHW image, normalized, by (dy, dx, mirrored); shifts in [-PAD, PAD]."""
    padded = torch.nn.functional.pad(src, [PAD] * 4)
    out = {}
    for dy in range(-PAD, PAD + 1):
        for dx in range(-PAD, PAD + 1):
            win = padded[:, PAD + dy:PAD + dy + CROP, PAD + dx:PAD + dx + CROP]
            out[(dy, dx, False)], out[(dy, dx, True)] = T.normalize(win), T.normalize(win.flip(-1))
    return out


def _shifts(root: Path, batches) -> list[tuple[int, int, bool]]:
    """The (dy, dx, mirrored) of each training image; fails on one that is no zero-padded window."""
    found, cache = [], {}
    for images, _, files in batches:
        for x, rel in zip(images, files):
            if rel not in cache:
                cache[rel] = _windows(T.load_rgb(str(root / "train"), rel, "fail"))
            hits = [k for k, w in cache[rel].items() if torch.allclose(x, w, atol=1e-4, rtol=0)]
            assert hits, f"{rel}: not a {CROP}x{CROP} window of the {PAD}-pixel zero-padded image"
            dy, dx, _ = hits[0]
            if dy < 0:  # rows above the image: exactly the normalized 0
                assert torch.allclose(x[:, :-dy, :], ZERO.expand(3, -dy, CROP), atol=1e-5, rtol=0)
            if dx > 0 and not hits[0][2]:  # columns right of the image (not mirrored)
                assert torch.allclose(x[:, :, CROP - dx:], ZERO.expand(3, CROP, dx), atol=1e-5, rtol=0)
            found.append(hits[0])
    return found


def _epochs(loader, n: int) -> list:
    return [b for _ in range(n) for b in loader]


def _assert_varied(shifts: list[tuple[int, int, bool]]) -> None:
    assert len(shifts) == 6 * CLASSES * PER_CLASS
    assert {dy for dy, _, _ in shifts} == set(range(-PAD, PAD + 1)) == {dx for _, dx, _ in shifts}
    assert {m for _, _, m in shifts} == {False, True} and len(set(shifts)) > 40


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_pad_crop_gives_shifted_windows_of_the_zero_padded_image(cifar_like, backend):
    cfg = _cfg(cifar_like, backend, "data.train_aug=pad_crop", f"data.pad={PAD}")
    loader = build_loader(cfg, plan_data(cfg, world=1), train=True, shard_id=0, num_shards=1, with_source_info=True)
    _assert_varied(_shifts(cifar_like, _epochs(loader, 6)))
    loader.release()


def test_dali_pad_crop_resumes_exactly(cifar_like):
    cfg = _cfg(cifar_like, "dali", "data.train_aug=pad_crop")
    plan = plan_data(cfg, world=1)
    first = build_loader(cfg, plan, train=True, shard_id=0, num_shards=1, with_source_info=True)
    it = iter(first)
    next(it)
    state = first.state_dict()
    rest = [next(it) for _ in range(2)]
    restored = build_loader(cfg, plan, train=True, shard_id=0, num_shards=1, state=state, with_source_info=True)
    again = [b for b, _ in zip(restored, range(2))]
    for (xa, ya, fa), (xb, yb, fb) in zip(rest, again):
        assert fa == fb and torch.equal(ya, yb) and torch.equal(xa, xb)
    first.release(), restored.release()


def test_torchvision_gpu_batch_path_gives_the_cpu_paths_pad_crops(cifar_like, monkeypatch):
    """The ``mixed`` path (``train_views_gpu``) with nvJPEG and the copies to CUDA mocked by CPU ops: bitwise the
    CPU path's batches (same draws from the same per-sample streams, no resampling)."""
    monkeypatch.setattr(T, "gpu_decode", lambda datas, root, rels, on_corrupt: [
        T.load_rgb(root, rel, on_corrupt, data) for data, rel in zip(datas, rels)])
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    cfg = _cfg(cifar_like, "torchvision", "data.train_aug=pad_crop")
    cpu = build_loader(cfg, plan_data(cfg, world=1), train=True, shard_id=0, num_shards=1, with_source_info=True)
    mixed = TorchvisionLoader(replace(cpu.spec, decode="mixed"), plan=cpu.plan)
    a, b = _epochs(cpu, 3), _epochs(mixed, 3)
    assert [f for _, _, f in a] == [f for _, _, f in b]
    assert all(torch.equal(xa, xb) for (xa, _, _), (xb, _, _) in zip(a, b))
    _shifts(cifar_like, b)
    cpu.release(), mixed.release()


def test_pad_crop_view_resizes_other_sizes_first_and_pad_0_is_only_a_flip():
    img = torch.randint(1, 256, (3, 40, 48), dtype=torch.uint8)
    small = T.F.resize(img, [CROP, CROP], antialias=True)
    for seed in range(20):
        out = T.pad_crop_view(img, CROP, PAD, random.Random(seed))
        assert out.shape == (3, CROP, CROP)
        assert any(torch.equal(T.normalize(out), w) for w in _windows(small).values())
        same = T.pad_crop_view(small, CROP, 0, random.Random(seed))
        assert torch.equal(same, small) or torch.equal(same, small.flip(-1))


def test_the_default_stays_random_resized_crop(cifar_like):
    for data in ("tiny", "imagenet"):
        cfg = compose([f"data={data}", "data.root=x"])
        assert (cfg.data.train_aug, cfg.data.pad) == ("random_resized_crop", 4)
    cifar = compose(["data=cifar10", "data.root=x"])
    assert (cifar.data.train_aug, cifar.data.pad) == ("pad_crop", 4)
    cfg = _cfg(cifar_like, "torchvision")
    plan = plan_data(cfg, world=1)
    default = build_loader(cfg, plan, train=True, shard_id=0, num_shards=1, with_source_info=True)
    assert default.spec.train_aug == "random_resized_crop"
    batches = _epochs(default, 2)
    windows = {rel: _windows(T.load_rgb(str(cifar_like / "train"), rel, "fail")) for _, _, f in batches for rel in f}
    rescaled = sum(not any(torch.allclose(x, w, atol=1e-4, rtol=0) for w in windows[rel].values())
                   for images, _, files in batches for x, rel in zip(images, files))
    assert rescaled > len(windows)  # random-resized crops, not padded windows
    default.release()


def test_the_keys_are_checked_and_a_change_on_resume_is_refused_unless_allowed(tmp_path):
    with pytest.raises(ConfigError, match="data.train_aug='flip' is not valid; choose one of random_resized_crop, "
                                          "pad_crop"):
        check_static(compose(["data.train_aug=flip"]))
    with pytest.raises(ConfigError, match="data.pad=-1 is out of range"):
        check_static(compose(["data.pad=-1"]))
    saved = to_container(compose([]))
    for change in ("data.train_aug=pad_crop", "data.pad=2"):
        with pytest.raises(ConfigError, match=f"resume_allow=\\[{change.split('=')[0]}\\]"):
            check_resume_config(compose([change]), saved, tmp_path)
        key = change.split("=")[0]
        assert check_resume_config(compose([change, f"resume_allow=[{key}]"]), saved, tmp_path)[0][0] == key


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_spnet_train_with_pad_crop(tiny_data, tmp_path, backend):
    proc = run_spnet(*tiny_train_args(tiny_data, tmp_path, "model=resnet32_cifar", "data.train_aug=pad_crop",
                                      f"data.backend={backend}", "data.decode=cpu", "trainer.max_steps=2",
                                      "data.num_threads=1"), cwd=tmp_path)
    assert last_json(proc.stdout)["steps"] == 2
