"""data.backend=torchvision: training through the CLI, exact mid-epoch resume, exact validation over 2 ranks, and
the loader's state (CPU decode; the GPU decode path needs CUDA)."""
from __future__ import annotations

import random
import shutil
from dataclasses import replace
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import TINY_CLASSES, last_json, run_spnet, tiny_train_args

from spnet_dist.config import compose
from spnet_dist.data.index import CorruptDataError
from spnet_dist.data.options import STD
from spnet_dist.data.loader import Loader, build_loader
from spnet_dist.data.preflight import plan_data
from spnet_dist.data.torchvision_backend import TorchvisionLoader
from spnet_dist.data.tv_images import RATIO, SCALE, crop_box
from spnet_dist.engine.checkpoint import COMPLETE

TV = ["data.backend=torchvision", "data.decode=cpu"]
# 4 classes x 16 images, 1 rank x batch 8 -> 8 steps per epoch; the checkpoint at step 5 is mid-epoch
RESUME = ["trainer.epochs=2", "checkpoint.every_steps=5", *TV]


def _cfg(data: Path, *extra: str):
    return compose([f"data.root={data}", f"model.num_classes={TINY_CLASSES}", "trainer.batch_size=8",
                    "data.image_size=32", "data.val_resize=36", *TV, *extra])


def _history(db: Path, run_id: str, key: str) -> dict[int, float]:
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.fixture(scope="module")
def uninterrupted(tiny_data, tmp_path_factory) -> tuple[Path, dict]:
    """Two epochs of `spnet train data.backend=torchvision` (2 DataLoader workers) without interruption."""
    a = tmp_path_factory.mktemp("uninterrupted")
    proc = run_spnet(*tiny_train_args(tiny_data, a, *RESUME, "data.num_threads=2"), cwd=a)
    return a, last_json(proc.stdout)


def test_spnet_train_with_the_torchvision_backend_prints_its_summary(uninterrupted):
    _, summary = uninterrupted
    assert summary["steps"] == 16 and summary["epochs"] == 2 and summary["preempted"] is False
    assert 0.0 <= summary["top1"] <= 100.0 and Path(summary["checkpoint"]).is_dir()


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run_bitwise(tiny_data, tmp_path, uninterrupted):
    a, run_a = uninterrupted
    args = tiny_train_args(tiny_data, tmp_path, *RESUME, "data.num_threads=1")  # 1 worker here, 2 in run a
    killed = run_spnet(*args, cwd=tmp_path, check=False, env={"SPNET_FAILPOINT": "kill_after_save:5"})
    assert killed.returncode != 0
    ckpt = tmp_path / "ckpt"
    assert (ckpt / "global_step5" / COMPLETE).is_file() and not (ckpt / "global_step8").exists()
    proc = run_spnet(*args, cwd=tmp_path)
    assert "resumed from" in proc.stderr and "step 5" in proc.stderr
    run_b = last_json(proc.stdout)
    assert run_b["steps"] == run_a["steps"] == 16
    for key in ("train/loss", "train/exec_rate"):
        hist_a = _history(a / "mlflow.db", run_a["mlflow_run_id"], key)
        hist_b = _history(tmp_path / "mlflow.db", run_b["mlflow_run_id"], key)
        assert sorted(hist_b) == list(range(1, 17)), f"{key}: steps logged {sorted(hist_b)}"
        assert hist_a == hist_b, f"{key} differs after resume"
    assert run_a["top1"] == run_b["top1"]


def test_validation_reads_every_image_once_across_two_ranks(tiny_data):
    cfg = _cfg(tiny_data, "data.num_threads=1")
    plan = plan_data(cfg, world=2)
    names, sizes = [], []
    for shard in range(2):
        loader = build_loader(cfg, plan, train=False, shard_id=shard, num_shards=2, with_source_info=True)
        batches = list(loader)
        sizes.append([b[0].shape[0] for b in batches])
        names.append([f for _, labels, files in batches for f in files])
        assert loader.shard_size == plan.shard_sizes["val"][shard] == len(names[-1])
        assert len(loader) == len(batches)
        for images, labels, files in batches:
            assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
            assert labels.dtype == torch.int64
            assert labels.tolist() == [plan.classes.index(f.split("/")[0]) for f in files]
        loader.release()
    assert sorted(names[0] + names[1]) == sorted(plan.val.files)  # every val file once, nothing padded
    assert sizes == [[8, 2], [8, 2]]  # 20 images: 10 per shard, the last batch smaller
    train = [[f for _, _, files in build_loader(cfg, plan, train=True, shard_id=s, num_shards=2,
                                                with_source_info=True) for f in files] for s in range(2)]
    assert not set(train[0]) & set(train[1]) and all(len(t) == 32 for t in train)  # disjoint, DALI's shards


def _take(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _assert_same(a, b, levels: float = 0.0) -> None:
    """Same files, labels and images; ``levels`` > 0 allows that many uint8 gray levels of difference."""
    assert len(a) == len(b)
    for (xa, ya, fa), (xb, yb, fb) in zip(a, b):
        assert fa == fb and torch.equal(ya, yb)
        if levels:
            std = torch.tensor(STD).view(1, 3, 1, 1)
            assert ((xa - xb).abs() * std).max() <= levels + 1e-3
        else:
            assert torch.equal(xa, xb)


def test_state_dict_after_k_batches_restores_the_rest_bitwise_with_any_workers(tiny_data):
    cfg = _cfg(tiny_data, "data.num_threads=2")
    plan = plan_data(cfg, world=1)
    first = build_loader(cfg, plan, train=True, shard_id=0, num_shards=1, with_source_info=True)
    assert isinstance(first, Loader) and len(first) == 8
    rng = torch.get_rng_state()
    head = _take(first, 3)
    assert torch.equal(torch.get_rng_state(), rng)  # the global stream (Gumbel noise, ...) is not touched
    state = first.state_dict()
    assert state == {"backend": "torchvision", "epoch": 0, "position": 3, "seed": 0, "shard_size": 64,
                     "batch_size": 8}
    rest, following = list(first), _take(first, 2)  # the rest of epoch 0, then the start of epoch 1
    assert len(rest) == 5 and first.state_dict()["epoch"] == 1
    assert [f for b in following for f in b[2]] != [f for b in head + rest for f in b[2]][:16]  # reshuffled

    restored = build_loader(cfg, plan, train=True, shard_id=0, num_shards=1, state=state, with_source_info=True)
    _assert_same(list(restored), rest)
    _assert_same(_take(restored, 2), following)
    in_process = TorchvisionLoader(replace(first.spec, workers=0), plan=plan)  # no worker at all
    in_process.load_state_dict(state)
    _assert_same(list(in_process), rest)
    with pytest.raises(ValueError, match="another data.backend"):
        in_process.load_state_dict({"dali": "..."})
    for loader in (first, restored, in_process):
        loader.release()


def test_gpu_decode_path_gives_the_cpu_paths_batches(tiny_data, monkeypatch):
    """The ``mixed`` plumbing (bytes from the workers, decode + transform + normalize per batch in the main process)
    with the nvJPEG decode and the copies to CUDA replaced by their CPU equivalents (a mock: no GPU here): the CPU
    path's batches — validation bitwise; training within one gray level (the batched float resize of
    ``train_views_gpu`` against the CPU's uint8 kernel), same crops and flips."""
    import spnet_dist.data.tv_images as T

    monkeypatch.setattr(T, "gpu_decode", lambda datas, root, rels, on_corrupt: [
        T.load_rgb(root, rel, on_corrupt, data) for data, rel in zip(datas, rels)])
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    cfg = _cfg(tiny_data, "data.num_threads=1")
    plan = plan_data(cfg, world=1)
    for train in (True, False):
        cpu = build_loader(cfg, plan, train=train, shard_id=0, num_shards=1, with_source_info=True)
        mixed = TorchvisionLoader(replace(cpu.spec, decode="mixed"), plan=plan)
        _assert_same(_take(mixed, 3), _take(cpu, 3), levels=1.0 if train else 0.0)
        cpu.release(), mixed.release()


def test_subset_reads_the_files_once_with_the_evaluation_transform(tiny_data):
    cfg = _cfg(tiny_data, "data.num_threads=1")
    plan = plan_data(cfg, world=1)
    loader = build_loader(cfg, plan, train=True, shard_id=0, num_shards=1)
    files = list(plan.train.files[::5])
    held = loader.subset(files, "train")
    got = [(images, labels) for images, labels in held]
    assert sum(x.shape[0] for x, _ in got) == len(files)
    again = list(held)
    assert all(torch.equal(x, y) for (x, _), (y, _) in zip(got, again))  # no randomness
    assert torch.cat([y for _, y in got]).tolist() == [plan.classes.index(f.split("/")[0]) for f in files]
    held.release()
    loader.release()


def test_an_undecodable_file_is_named(tiny_data, tmp_path):
    data = tmp_path / "imagenet"
    shutil.copytree(tiny_data, data)
    cls = sorted(p.name for p in (data / "val").iterdir())[0]
    (data / "val" / cls / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    cfg = _cfg(data, "data.scan=off", "data.on_corrupt=fail", "data.num_threads=1")
    loader = build_loader(cfg, plan_data(cfg, world=1), train=False, shard_id=0, num_shards=1)
    with pytest.raises(CorruptDataError, match=rf"could not decode .*{cls}/broken\.JPEG .*data.on_corrupt=skip"):
        list(loader)
    loader.release()


def test_crop_boxes_follow_torchvisions_scale_and_ratio():
    for k in range(300):
        h, w = (64 + 7 * k % 120, 64 + 13 * k % 150)
        top, left, ch, cw = crop_box(h, w, random.Random(k))
        assert 0 <= top <= h - ch and 0 <= left <= w - cw and ch > 0 and cw > 0
        assert SCALE[0] * 0.9 <= ch * cw / (h * w) <= SCALE[1]
        assert RATIO[0] * 0.9 <= cw / ch <= RATIO[1] * 1.1
