"""`spnet prepare-imagenet` on tiny but real fakes of both source layouts: the official ILSVRC2012 archives
(nested tars, a devkit .tar.gz with a scipy-written meta.mat) and the Kaggle folders + LOC_val_solution.csv."""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from conftest import last_json, run_spnet
from PIL import Image

from spnet_dist.data import prepare as P

WNIDS = ["n01440764", "n01443537", "n01484850"]
# ILSVRC2012_ID -> wnid deliberately not in wnid order: the val labels must come from meta.mat, not positions
IDS = {1: "n01484850", 2: "n01440764", 3: "n01443537"}
TRAIN_PER_CLASS = 3
# val image k (1-based) has ILSVRC2012_ID VAL_IDS[k-1]; two per class
VAL_IDS = [2, 3, 1, 1, 2, 3]


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, size=(20, 24, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_300_000_000
    tar.addfile(info, io.BytesIO(data))


def val_name(k: int) -> str:
    return f"ILSVRC2012_val_{k:08d}.JPEG"


def expected_val() -> dict[str, str]:
    """val file name -> wnid, from the devkit's point of view."""
    return {val_name(k): IDS[i] for k, i in enumerate(VAL_IDS, start=1)}


def meta_mat() -> bytes:
    """meta.mat with the devkit's layout: a 1 x N struct array `synsets` (leaves 1..3, one inner node)."""
    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images"]
    rows = [(i, w, f"class {w}", "a leaf", 0, np.zeros((1, 0)), 0, TRAIN_PER_CLASS) for i, w in IDS.items()]
    rows.append((1001, "n00001740", "entity", "the root", 3, np.array([[1.0, 2.0, 3.0]]), 4, 0))
    arr = np.zeros((len(rows), 1), dtype=[(f, "O") for f in fields])
    for r, row in enumerate(rows):
        arr[r, 0] = tuple(np.array([[float(v)]]) if isinstance(v, int) else v for v in row)
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": arr})
    return buf.getvalue()


def make_ilsvrc(src: Path) -> None:
    src.mkdir(parents=True)
    with tarfile.open(src / P.ILSVRC_TRAIN, "w") as outer:
        for c, w in enumerate(WNIDS):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as t:
                for i in range(TRAIN_PER_CLASS):
                    add_bytes(t, f"{w}_{i}.JPEG", jpeg(100 * c + i))
            add_bytes(outer, f"{w}.tar", inner.getvalue())
    with tarfile.open(src / P.ILSVRC_VAL, "w") as t:
        for k in range(1, len(VAL_IDS) + 1):
            add_bytes(t, val_name(k), jpeg(1000 + k))
    gt = "".join(f"{i}\n" for i in VAL_IDS).encode()
    with tarfile.open(src / P.ILSVRC_DEVKIT, "w:gz") as t:
        add_bytes(t, "ILSVRC2012_devkit_t12/data/meta.mat", meta_mat())
        add_bytes(t, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", gt)
        add_bytes(t, "ILSVRC2012_devkit_t12/readme.txt", b"devkit")


def make_kaggle(src: Path) -> None:
    train = src / P.KAGGLE_TRAIN
    for c, w in enumerate(WNIDS):
        (train / w).mkdir(parents=True)
        for i in range(TRAIN_PER_CLASS):
            (train / w / f"{w}_{i}.JPEG").write_bytes(jpeg(100 * c + i))
    val = src / P.KAGGLE_VAL
    val.mkdir(parents=True)
    rows = ["ImageId,PredictionString"]
    for k, (name, w) in enumerate(sorted(expected_val().items()), start=1):
        val.joinpath(name).write_bytes(jpeg(1000 + k))
        rows.append(f"{name[:-5]},{w} 10 12 30 40 {w} 1 2 3 4")
    (src / P.KAGGLE_CSV).write_text("\n".join(rows) + "\n")
    (src / "LOC_synset_mapping.txt").write_text("".join(f"{w} class {w}\n" for w in WNIDS))


def snapshot(root: Path) -> dict[str, tuple]:
    """content hash + mtime + mode of every file under root (to prove the source is untouched)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (hashlib.sha1(p.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_mode)
    return out


def tree(out: Path) -> dict[str, list[str]]:
    return {f"{s}/{c.name}": sorted(f.name for f in c.iterdir())
            for s in ("train", "val") for c in sorted((out / s).iterdir())}


def assert_prepared(out: Path) -> None:
    t = tree(out)
    assert set(t) == {f"{s}/{w}" for s in ("train", "val") for w in WNIDS}
    for w in WNIDS:
        assert t[f"train/{w}"] == [f"{w}_{i}.JPEG" for i in range(TRAIN_PER_CLASS)]
        assert t[f"val/{w}"] == sorted(n for n, x in expected_val().items() if x == w)
    # pixels survive: every output file is a decodable JPEG
    for p in (out / "val").rglob("*.JPEG"):
        Image.open(p).load()
    assert not (out / ".spnet" / "prepare" / "tmp").exists()


def test_ilsvrc_archives_prepare_is_idempotent_and_leaves_the_source_alone(tmp_path):
    src, out = tmp_path / "archives", tmp_path / "imagenet"
    make_ilsvrc(src)
    before = snapshot(src)
    proc = run_spnet("prepare-imagenet", "--src", str(src), "--out", str(out), cwd=tmp_path)
    summary = last_json(proc.stdout)
    assert summary["layout"] == "ilsvrc" and summary["classes"] == 3
    assert summary["train_images"] == 3 * TRAIN_PER_CLASS and summary["val_images"] == len(VAL_IDS)
    assert summary["classes_done_now"] == {"train": 3, "val": 3}
    assert_prepared(out)
    # val image k went to the wnid of ILSVRC2012_ID VAL_IDS[k-1] and kept its bytes
    with tarfile.open(src / P.ILSVRC_VAL) as t:
        for m in t:
            assert (out / "val" / expected_val()[m.name] / m.name).read_bytes() == t.extractfile(m).read()

    inodes = {p: p.stat().st_ino for p in out.rglob("*.JPEG")}
    again = last_json(run_spnet("prepare-imagenet", "--src", str(src), "--out", str(out), "--layout", "ilsvrc",
                                cwd=tmp_path).stdout)
    assert again["classes_done_now"] == {"train": 0, "val": 0}
    assert again["classes_done_before"] == {"train": 3, "val": 3}
    assert {p: p.stat().st_ino for p in out.rglob("*.JPEG")} == inodes  # nothing rewritten
    assert snapshot(src) == before

    report = run_spnet("check-data", f"data.root={out}", cwd=tmp_path)
    rep = last_json(report.stdout)
    assert rep["ok"] and rep["num_classes"] == 3
    assert rep["splits"]["val"]["per_class"] == {w: 2 for w in WNIDS}


def test_kaggle_layout_hardlinks_and_is_idempotent(tmp_path):
    src, out = tmp_path / "kaggle", tmp_path / "imagenet"
    make_kaggle(src)
    before = snapshot(src)
    summary = last_json(run_spnet("prepare-imagenet", "--src", str(src), "--out", str(out), cwd=tmp_path).stdout)
    assert summary["layout"] == "kaggle"
    assert summary["files"] == {"hardlinked": 3 * TRAIN_PER_CLASS + len(VAL_IDS), "copied": 0}
    assert_prepared(out)
    a = out / "val" / "n01440764" / val_name(1)
    assert a.stat().st_ino == (src / P.KAGGLE_VAL / val_name(1)).stat().st_ino  # a link, not a copy
    again = last_json(run_spnet("prepare-imagenet", "--src", str(src), "--out", str(out), cwd=tmp_path).stdout)
    assert again["classes_done_now"] == {"train": 0, "val": 0}
    assert snapshot(src) == before

    copied = tmp_path / "copied"
    s2 = last_json(run_spnet("prepare-imagenet", "--src", str(src), "--out", str(copied), "--link", "copy",
                             cwd=tmp_path).stdout)
    assert s2["files"]["copied"] == 3 * TRAIN_PER_CLASS + len(VAL_IDS)
    assert tree(copied) == tree(out)
    assert snapshot(src) == before


@pytest.mark.parametrize("layout", ["ilsvrc", "kaggle"])
def test_an_interrupted_prepare_resumes(tmp_path, monkeypatch, layout):
    src, out = tmp_path / "src", tmp_path / "imagenet"
    (make_ilsvrc if layout == "ilsvrc" else make_kaggle)(src)
    before = snapshot(src)
    real_publish = P._Out.publish
    calls = {"n": 0}

    def publish_then_die(self, split, wnid):
        # die while the second train class sits half-done in the temp area (after its files were written)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        real_publish(self, split, wnid)

    monkeypatch.setattr(P._Out, "publish", publish_then_die)
    with pytest.raises(KeyboardInterrupt):
        P.prepare_imagenet(src, out, layout=layout)
    monkeypatch.setattr(P._Out, "publish", real_publish)
    # only whole classes are visible in out; the half-done one is in the temp area
    assert [p.name for p in (out / "train").iterdir()] == [WNIDS[0]]
    assert len(list((out / "train" / WNIDS[0]).iterdir())) == TRAIN_PER_CLASS
    assert list((out / "val").iterdir()) == []
    assert (out / ".spnet" / "prepare" / "tmp" / "train" / WNIDS[1]).is_dir()

    summary = last_json(run_spnet("prepare-imagenet", "--src", str(src), "--out", str(out), cwd=tmp_path).stdout)
    assert summary["classes_done_before"] == {"train": 1, "val": 0}
    assert summary["classes_done_now"] == {"train": 2, "val": 3}
    assert_prepared(out)
    assert snapshot(src) == before


def test_an_interruption_while_publishing_val_resumes(tmp_path, monkeypatch):
    src, out = tmp_path / "src", tmp_path / "imagenet"
    make_ilsvrc(src)
    real_publish = P._Out.publish

    def die_on_second_val(self, split, wnid):
        if split == "val" and self.done_now["val"] == 1:
            raise KeyboardInterrupt
        real_publish(self, split, wnid)

    monkeypatch.setattr(P._Out, "publish", die_on_second_val)
    with pytest.raises(KeyboardInterrupt):
        P.prepare_imagenet(src, out)
    monkeypatch.setattr(P._Out, "publish", real_publish)
    assert len(list((out / "val").iterdir())) == 1 and not (out / ".spnet" / "prepare" / "val.done").exists()
    summary = P.prepare_imagenet(src, out)
    assert summary["classes_done_now"] == {"train": 0, "val": 2}
    assert_prepared(out)


def test_source_errors_are_one_line_and_name_what_is_missing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_spnet("prepare-imagenet", "--src", str(empty), "--out", str(tmp_path / "o"), cwd=tmp_path,
                     check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("spnet prepare-imagenet: error:")
    for name in (P.ILSVRC_TRAIN, P.ILSVRC_VAL, P.ILSVRC_DEVKIT, P.KAGGLE_CSV):
        assert name in line

    src = tmp_path / "archives"
    make_ilsvrc(src)
    (src / P.ILSVRC_DEVKIT).unlink()
    proc = run_spnet("prepare-imagenet", "--src", str(src), "--out", str(tmp_path / "o"), "--layout", "ilsvrc",
                     cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"spnet prepare-imagenet: error: --src {src} lacks {P.ILSVRC_DEVKIT} (the official ILSVRC2012 archives); "
        f"download them from image-net.org, or use --layout kaggle for the Kaggle download"]


def test_kaggle_val_image_missing_from_disk_is_named(tmp_path):
    src = tmp_path / "kaggle"
    make_kaggle(src)
    (src / P.KAGGLE_VAL / val_name(4)).unlink()
    with pytest.raises(P.PrepareError, match=f"not in .*{val_name(4)[:-5]}"):
        P.prepare_imagenet(src, tmp_path / "o")
    assert os.listdir(tmp_path / "o" / "val") == []  # nothing labelled from an incomplete source


def test_devkit_meta_mat_is_read_by_id(tmp_path):
    src = tmp_path / "archives"
    make_ilsvrc(src)
    mapping, truth = P.read_devkit(src / P.ILSVRC_DEVKIT)
    assert {k: mapping[k] for k in IDS} == IDS and mapping[1001] == "n00001740"
    assert truth == VAL_IDS
    json.dumps(mapping)  # plain ints and strings
