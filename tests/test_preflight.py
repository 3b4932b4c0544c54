"""A start runs each data check once: the pre-flight lists each split once (through its cached index: a warm start
lists only the class folders, no image folder), and the loaders — held-out subsets included — read the plan's file
lists without listing anything again. Counted by wrapping the listing functions and ``os.scandir`` / ``os.listdir``,
in-process for the pre-flight + one rank's loaders, and in a real `spnet train` process. Also: a loader follows the
``Loader`` protocol and continues mid-epoch from its ``state_dict``."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import TINY_CLASSES, tiny_train_args

from spnet_dist.config import compose
from spnet_dist.data import files as listing, index as data_index
from spnet_dist.engine.trainer import build_loaders
from spnet_dist.preflight import preflight

# Wraps the listing functions and os.scandir/os.listdir; counts calls per split ("<what> <split>", "/*" for a class
# folder). Used in-process (install) and as the driver of a real `spnet train` process (__main__).
COUNTER = r'''
import collections, os
from pathlib import Path


def install(root, calls=None):
    root = Path(root).resolve()
    calls = collections.Counter() if calls is None else calls

    def where(path):
        try:
            parts = Path(os.fspath(path)).resolve().relative_to(root).parts
        except (TypeError, ValueError):
            return None
        return f"{parts[0]}/*" if len(parts) > 1 else (parts[0] if parts else None)

    def wrap(owner, name):
        real = getattr(owner, name)

        def counting(path=".", *args, **kwargs):
            split = where(path)
            if split in ("train", "val", "train/*", "val/*"):
                calls[f"{name} {split}"] += 1
            return real(path, *args, **kwargs)

        setattr(owner, name, counting)

    from spnet_dist.data import files, index
    for owner, name in ((os, "scandir"), (os, "listdir"), (files, "class_dirs"), (files, "image_files"),
                        (index, "build_index")):
        wrap(owner, name)
    return calls


if __name__ == "__main__":
    import json, sys

    calls = install(sys.argv[1])
    from spnet_dist.cli import main

    rc = main(["train", *sys.argv[3:]])
    Path(sys.argv[2]).write_text(json.dumps({"rc": rc, "calls": calls}))
'''


def expected(classes: int, cold: bool) -> Counter:
    """One listing of each split folder; on a cold cache also each class folder once and one index built."""
    out = Counter()
    for split in ("train", "val"):
        out.update({f"scandir {split}": 1, f"class_dirs {split}": 1})
        if cold:
            out.update({f"scandir {split}/*": classes, f"image_files {split}/*": classes, f"build_index {split}": 1})
    return out


@pytest.fixture()
def data(tiny_data, tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("SPNET_DATA_INDEX_DIR", raising=False)
    root = tmp_path / "data"
    shutil.copytree(tiny_data, root, ignore=shutil.ignore_patterns(".spnet"))  # no cached index: a cold start
    return root


@pytest.fixture()
def counted(data, monkeypatch) -> Counter:
    """Count the listings of ``data`` in this process (the wrappers are undone after the test)."""
    for owner, name in ((os, "scandir"), (os, "listdir"), (listing, "class_dirs"), (listing, "image_files"),
                        (data_index, "build_index")):
        monkeypatch.setattr(owner, name, getattr(owner, name))  # restored by monkeypatch
    namespace: dict = {}
    exec(compile(COUNTER, "counter", "exec"), namespace)
    return namespace["install"](data)


def test_preflight_and_one_ranks_loaders_list_each_split_once(data, counted):
    cfg = compose([f"data.root={data}", f"model.num_classes={TINY_CLASSES}", "trainer.batch_size=8",
                   "data.image_size=32", "data.val_resize=36", "data.decode=cpu"])
    for start, held_out in (("cold", 0), ("warm", 5)):
        counted.clear()
        plan = preflight(cfg, world=1)
        method = SimpleNamespace(train_exclusions=lambda files, k=held_out: sorted(files)[:k])  # BoostNet's hook
        train_loader, val_loader, _ = build_loaders(cfg, method, plan)
        held = val_loader.subset(sorted(plan.train.files)[:4], "train")  # BoostNet's held-out split at evaluation
        assert sum(len(labels) for _, labels in held) == 4
        assert counted == expected(TINY_CLASSES, cold=start == "cold"), start
        assert train_loader.shard_size == len(plan.train.files) - held_out == TINY_CLASSES * 16 - held_out
        assert val_loader.shard_size == plan.shard_sizes["val"][0] == TINY_CLASSES * 5
        assert train_loader.spec.file_list and val_loader.spec.file_list  # the reader lists nothing itself
        for loader in (train_loader, val_loader, held):
            loader.release()
    preflight(cfg, world=1)  # the counter sees a second pass: a second listing of each split folder
    assert counted["scandir train"] == counted["class_dirs val"] == 2


def test_a_real_spnet_train_start_lists_each_split_once(data, tmp_path):
    driver, out = tmp_path / "count_listings.py", tmp_path / "calls.json"
    driver.write_text(COUNTER)
    args = [*tiny_train_args(data, tmp_path, "trainer.max_steps=2", "data.decode=cpu")[1:]]
    proc = subprocess.run([sys.executable, str(driver), str(data), str(out), *args], cwd=tmp_path, text=True,
                          capture_output=True, timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["rc"] == 0
    assert Counter(result["calls"]) == expected(TINY_CLASSES, cold=True)


def test_loaders_follow_the_protocol_and_resume_mid_epoch_from_their_state(data):
    from spnet_dist.data.loader import Loader, build_loader

    cfg = compose([f"data.root={data}", f"model.num_classes={TINY_CLASSES}", "trainer.batch_size=8",
                   "data.image_size=32", "data.val_resize=36", "data.decode=cpu"])
    plan = preflight(cfg, world=1)
    first = build_loader(cfg, plan, train=True, shard_id=0, num_shards=1, with_source_info=True)
    assert isinstance(first, Loader) and len(first) == TINY_CLASSES * 16 // 8
    it = iter(first)
    next(it)
    state = first.state_dict()
    rest = [names for _, _, names in it]
    second = build_loader(cfg, plan, train=True, shard_id=0, num_shards=1, with_source_info=True)
    second.load_state_dict(state)
    assert [names for _, _, names in second] == rest  # the same files in the same order
    for loader in (first, second):
        loader.release()
