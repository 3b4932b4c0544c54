"""Bad input on disk, through the real components: truncated JPEGs, a PNG and a CMYK JPEG named .JPEG (both in
real ImageNet), 0-byte and non-image files, empty class folders, a val split missing a class — via the real CLI
(`spnet check-data`, `spnet train`), the real DALI pipelines and the data checks."""
from __future__ import annotations

import io
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import last_json, run_spnet, tiny_train_args
from PIL import Image

from spnet_dist.config import ConfigError, compose
from spnet_dist.data.dali import CorruptDataError
from spnet_dist.data.files import class_dirs
from spnet_dist.data.index import build_index, split_index
from spnet_dist.data.loader import build_loader
from spnet_dist.data.preflight import DataError, plan_data
from spnet_dist.preflight import preflight
from spnet_dist.data.tiny import make_tiny_imagenet

CLASSES = 4
# train: (class index, file name, kind); kinds are made by `bad_file`
TRAIN_BAD = [(0, "trunc_body.JPEG", "truncated"), (0, "trunc_header.JPEG", "header"),
             (2, "zero.JPEG", "empty"), (2, "notes.JPEG", "text"), (3, "anim.JPEG", "gif")]
TRAIN_ODD = [(1, "cmyk.JPEG", "cmyk"), (1, "png_inside.JPEG", "png"), (3, "gray.JPEG", "gray")]
VAL_BAD = [(3, "trunc_val.JPEG", "truncated")]


def _photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(6, 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((80, 60), Image.BILINEAR)


def bad_file(path: Path, kind: str, seed: int = 0) -> None:
    buf = io.BytesIO()
    img = _photo(seed)
    if kind in ("truncated", "header", "header_eoi"):
        img.save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        cut = {"truncated": data[: len(data) // 2], "header": data[:300],
               "header_eoi": data[:300] + b"\xff\xd9"}  # header_eoi: ends in an end marker, passes the quick sniff
        path.write_bytes(cut[kind])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image\n" * 20)
    elif kind == "gif":
        img.save(path, format="GIF")
    elif kind == "cmyk":
        img.convert("CMYK").save(path, format="JPEG", quality=90)
    elif kind == "png":
        img.save(path, format="PNG")
    elif kind == "gray":
        img.convert("L").save(path, format="JPEG")
    else:
        raise ValueError(kind)


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean") / "data"
    make_tiny_imagenet(root, classes=CLASSES, train_per_class=10, val_per_class=4, size=40, seed=3)
    return root


@pytest.fixture()
def data(clean_data, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(clean_data, root)
    return root


def add(root: Path, split: str, files: list) -> list[Path]:
    classes = class_dirs(root / split)
    out = []
    for i, (c, name, kind) in enumerate(files):
        p = root / split / classes[c] / name
        bad_file(p, kind, seed=i)
        out.append(p)
    return out


def args(root: Path, tmp: Path, *extra: str) -> list[str]:
    return [*tiny_train_args(root, tmp, *extra), "data.decode=cpu"]


def test_check_data_names_every_bad_file_and_what_loads(data, tmp_path):
    bad = add(data, "train", TRAIN_BAD) + add(data, "val", VAL_BAD)
    odd = add(data, "train", TRAIN_ODD)
    (data / "train" / class_dirs(data / "train")[0] / "README.txt").write_text("ignored")
    proc = run_spnet("check-data", f"data.root={data}", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    report = last_json(proc.stdout)  # the whole report arrives even though the check failed
    assert proc.stdout.count("\n") == 1
    assert not report["ok"]
    found = {u["file"]: u["reason"] for s in ("train", "val") for u in report["splits"][s]["undecodable"]}
    assert set(found) == {str(p) for p in bad}
    by_name = {Path(f).name: r for f, r in found.items()}
    assert by_name["trunc_body.JPEG"].startswith("truncated JPEG (OSError: image file is truncated")
    assert by_name["trunc_header.JPEG"].startswith("truncated JPEG")
    assert by_name["zero.JPEG"] == "empty file (0 bytes)"
    assert by_name["notes.JPEG"].startswith("not an image (starts with b'this is ")
    assert by_name["anim.JPEG"].startswith("GIF image: DALI cannot decode GIF")
    assert by_name["trunc_val.JPEG"].startswith("truncated JPEG")
    notes = {Path(n["file"]).name: n["note"] for n in report["splits"]["train"]["loads_with_notes"]}
    assert notes == {"cmyk.JPEG": "CMYK JPEG (loads; DALI converts it to RGB)",
                     "png_inside.JPEG": "PNG data in a .JPEG file (loads)"}
    assert {Path(p).name for p in report["splits"]["train"]["ignored_files"]} == {"README.txt"}
    assert report["splits"]["train"]["images"] == CLASSES * 10 + len(TRAIN_BAD) + len(odd)
    assert report["splits"]["train"]["usable_images"] == CLASSES * 10 + len(odd)
    assert report["splits"]["val"]["per_class"][class_dirs(data / "val")[3]] == 5
    # stderr: one line per problem, then the notes; every undecodable file named there too
    problems = [ln for ln in proc.stderr.splitlines() if ln.startswith("spnet check-data: problem:")]
    assert len(problems) == 2 and "train: 5 undecodable file(s)" in problems[0]
    assert "trunc_val.JPEG" in problems[1]


def test_dali_decodes_cmyk_png_and_gray_named_jpeg_like_pil(data):
    from nvidia.dali import fn, pipeline_def, types

    odd = add(data, "train", TRAIN_ODD)

    @pipeline_def
    def pipe():
        jpegs, _ = fn.readers.file(files=[str(p) for p in odd], name="R")
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)

    p = pipe(batch_size=len(odd), num_threads=1, device_id=None)
    p.build()
    (images,) = p.run()
    for i, path in enumerate(odd):
        want = np.asarray(Image.open(path).convert("RGB"))
        got = np.asarray(images[i])
        assert got.shape == want.shape
        assert np.abs(got.astype(int) - want).mean() < 1.0, path.name


def _loader_files(cfg, train: bool) -> list[tuple[str, int]]:
    plan = plan_data(cfg, world=1)
    loader = build_loader(cfg, plan, train=train, shard_id=0, num_shards=1, with_source_info=True)
    return [(f, int(label)) for _, labels, files in loader for f, label in zip(files, labels)]


def test_training_loaders_leave_out_bad_files_and_keep_labels(data, caplog):
    bad = add(data, "train", TRAIN_BAD) + add(data, "val", VAL_BAD)
    add(data, "train", TRAIN_ODD)
    cfg = compose([f"data.root={data}", "trainer.batch_size=1", "data.image_size=32", "data.val_resize=36",
                   "data.decode=cpu", f"model.num_classes={CLASSES}"])
    classes = class_dirs(data / "train")
    with caplog.at_level(logging.WARNING, logger="spnet.data"):
        val = _loader_files(cfg, train=False)
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "leaving out 1 undecodable image file(s)" in warning and "trunc_val.JPEG" in warning
    good_val = {f"{c}/{p.name}" for c in classes for p in (data / "val" / c).iterdir()} - {
        f"{p.parent.name}/{p.name}" for p in bad}
    assert sorted(f for f, _ in val) == sorted(good_val)  # each good val image exactly once, no bad one
    train = _loader_files(cfg, train=True)
    good_train = {f"{c}/{p.name}" for c in classes for p in (data / "train" / c).iterdir()} - {
        f"{p.parent.name}/{p.name}" for p in bad}
    assert sorted(f for f, _ in train) == sorted(good_train)  # CMYK, PNG-in-JPEG and gray included
    for f, label in train + val:  # the label is still the folder's index in the full class list
        assert label == classes.index(f.split("/")[0]), f


def test_on_corrupt_fail_stops_before_training_naming_the_files(data, tmp_path):
    bad = add(data, "train", TRAIN_BAD)
    proc = run_spnet(*args(data, tmp_path, "data.on_corrupt=fail"), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"spnet train: error: {len(bad)} undecodable image file(s) in {data / 'train'} "
                               f"(data.on_corrupt=fail): ")
    for p in bad:
        assert str(p) in lines[0]
    assert lines[0].endswith("Replace or delete them, or set data.on_corrupt=skip to train without them")
    assert not (tmp_path / "ckpt").exists()  # no work started


def test_on_corrupt_skip_trains_and_names_the_skipped_files(data, tmp_path):
    bad = add(data, "train", TRAIN_BAD[:2]) + add(data, "val", VAL_BAD)
    add(data, "train", TRAIN_ODD[:2])
    proc = run_spnet(*args(data, tmp_path, "trainer.batch_size=8"), cwd=tmp_path)
    summary = last_json(proc.stdout)
    assert summary["val_images"] == CLASSES * 4 and summary["steps"] == (CLASSES * 10 + 2) // 8
    warnings = [ln for ln in proc.stderr.splitlines() if "leaving out" in ln]
    assert any("2 undecodable image file(s)" in w and str(bad[0]) in w and str(bad[1]) in w for w in warnings)
    assert any("1 undecodable image file(s)" in w and str(bad[2]) in w for w in warnings)
    assert "Traceback" not in proc.stderr and "Critical error in pipeline" not in proc.stderr


def test_a_file_dali_fails_on_at_run_time_is_named_and_recorded(data):
    """data.scan=off: no pre-scan, so DALI meets the truncated file itself; the error names it."""
    (bad,) = add(data, "val", VAL_BAD)
    cfg = compose([f"data.root={data}", "trainer.batch_size=4", "data.image_size=32", "data.val_resize=36",
                   "data.decode=cpu", "data.scan=off", "data.on_corrupt=fail", f"model.num_classes={CLASSES}"])
    with pytest.raises(CorruptDataError) as err:
        _loader_files(cfg, train=False)
    assert str(err.value) == (f"DALI could not decode {bad} (the decoder failed: truncated or corrupt image data); "
                              f"replace or delete the file, or set data.on_corrupt=skip")
    cfg = compose([f"data.root={data}", "trainer.batch_size=4", "data.image_size=32", "data.val_resize=36",
                   "data.decode=cpu", "data.scan=off", "data.on_corrupt=skip", f"model.num_classes={CLASSES}"])
    with pytest.raises(CorruptDataError, match=f"DALI could not decode {bad} .*now listed as bad in"):
        _loader_files(cfg, train=False)
    idx = split_index(data / "val")
    assert f"{bad.parent.name}/{bad.name}" in idx["runtime_bad"]
    # the next run (default scan) leaves it out: every other val image, exactly once
    cfg = compose([f"data.root={data}", "trainer.batch_size=4", "data.image_size=32", "data.val_resize=36",
                   "data.decode=cpu", f"model.num_classes={CLASSES}"])
    assert len(_loader_files(cfg, train=False)) == CLASSES * 4


def _val_cfg(data: Path, *extra: str):
    return compose([f"data.root={data}", "trainer.batch_size=4", "data.image_size=32", "data.val_resize=36",
                    "data.decode=cpu", f"model.num_classes={CLASSES}", *extra])


def test_a_file_dali_does_not_name_is_found_by_decoding_the_shard(data):
    """A JPEG cut after its header but ending in an end marker passes the quick sniff (data.scan=quick, the
    default); DALI fails on it with only "nvImageCodec failure: '#3'". The loader decodes the shard's files with
    PIL, names the file, and with on_corrupt=skip records it so the next run leaves it out."""
    (bad,) = add(data, "val", [(3, "hdr_eoi.JPEG", "header_eoi")])
    reason = "undecodable JPEG (OSError: Truncated File Read)"
    with pytest.raises(CorruptDataError) as err:
        _loader_files(_val_cfg(data, "data.on_corrupt=fail"), train=False)
    assert str(err.value) == (f"DALI could not decode {bad} ({reason}; DALI did not name it, a decode of the "
                              f"{CLASSES * 4 + 1} file(s) this rank reads did); replace or delete the file, or set "
                              f"data.on_corrupt=skip")
    with pytest.raises(CorruptDataError, match=f"DALI could not decode {bad} .*now listed as bad in .*the next run "
                                               f"leaves it out"):
        _loader_files(_val_cfg(data, "data.on_corrupt=skip"), train=False)
    idx = split_index(data / "val")
    assert idx["runtime_bad"] == {f"{bad.parent.name}/{bad.name}": f"DALI (found by decoding): {reason}"}
    assert len(_loader_files(_val_cfg(data), train=False)) == CLASSES * 4  # the next run: every other image once
    # the same file as a cut header without the end marker: the quick sniff catches it before DALI sees it; with
    # data.scan=off DALI meets it, and the shard's decode names it again
    bad.unlink()
    (cut,) = add(data, "val", [(3, "hdr.JPEG", "header")])
    with pytest.raises(CorruptDataError, match=rf"^DALI could not decode {cut} \(truncated JPEG .*DALI did not name"):
        _loader_files(_val_cfg(data, "data.scan=off", "data.on_corrupt=fail"), train=False)


def test_a_file_dali_does_not_name_stops_spnet_train_naming_it(data, tmp_path):
    """The real CLI: the file passes the pre-flight's quick sniff, training starts, DALI fails on the first train
    batch; the one error line names the file."""
    (bad,) = add(data, "train", [(1, "hdr_eoi.JPEG", "header_eoi")])
    proc = run_spnet(*args(data, tmp_path, "data.on_corrupt=fail", "trainer.max_steps=2"), cwd=tmp_path,
                     check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("spnet train: error: ")]
    assert errors == [f"spnet train: error: DALI could not decode {bad} (undecodable JPEG (OSError: Truncated File "
                      f"Read); DALI did not name it, a decode of the {CLASSES * 10 + 1} file(s) this rank reads "
                      f"did); replace or delete the file, or set data.on_corrupt=skip"], proc.stderr[-3000:]


def test_when_the_decode_finds_nothing_the_message_says_so(data, tmp_path):
    """A real DALI error without a file name, handed to the loader's translation for a shard whose files all
    decode (no corruption that DALI fails on and PIL decodes could be made: it is the case of a file changed since,
    or of DALI's own failure): no file named, no data.scan=quick advice when the scan was on."""
    from nvidia.dali import fn, pipeline_def, types

    from spnet_dist.data.dali import LoaderSpec, translate_dali_error

    bad = tmp_path / "hdr_eoi.JPEG"
    bad_file(bad, "header_eoi")

    @pipeline_def
    def pipe():
        jpegs, _ = fn.readers.file(files=[str(bad)], name="R")
        return fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)

    p = pipe(batch_size=1, num_threads=1, device_id=None)
    p.build()
    with pytest.raises(RuntimeError) as dali_err:
        p.run()
    assert str(bad) not in str(dali_err.value)  # DALI does not name it
    spec = LoaderSpec(root=str(data / "val"), batch_size=4, shard_id=0, num_shards=1, train=False, crop=32,
                      val_resize=36)
    msg = str(translate_dali_error(dali_err.value, spec))
    assert msg.startswith(f"DALI could not decode an image in {data / 'val'} (nvImageCodec failure") and msg.endswith(
        f"and does not say which; a full decode of the {CLASSES * 4} file(s) this rank reads found no undecodable "
        f"one (data.scan=quick found nothing either); run `spnet check-data data.root={data}` to check the whole "
        f"dataset"), msg
    msg = str(translate_dali_error(dali_err.value, replace(spec, scan="off")))
    assert msg.endswith("or train with data.scan=quick (the default) so undecodable files are found before "
                        "training"), msg


def test_missing_val_class_fails_before_training_with_one_line(data, tmp_path):
    missing = class_dirs(data / "val")[2]
    shutil.rmtree(data / "val" / missing)
    proc = run_spnet(*args(data, tmp_path), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert lines[0].startswith(f"spnet train: error: data.root='{data}': val has no folder for 1 of the 4 train "
                               f"classes ({missing}).")
    # the plan refuses too (eval plans its data the same way)
    cfg = compose([f"data.root={data}", "data.image_size=32", "data.val_resize=36"])
    with pytest.raises(DataError, match="labels would not match"):
        plan_data(cfg, world=1, for_training=False)


def _plan(data: Path, num_classes: int = CLASSES, batch_size: int = 1):
    return plan_data(compose([f"data.root={data}", f"model.num_classes={num_classes}",
                              f"trainer.batch_size={batch_size}"]), world=1)


def test_empty_and_hidden_class_folders_and_class_count(data, tmp_path):
    _plan(data)  # clean: fine
    with pytest.raises(DataError, match=rf"model.num_classes=10 but data.root='{data}' has {CLASSES} classes .*"
                                        rf"set model.num_classes={CLASSES}"):
        _plan(data, 10)
    with pytest.raises(DataError, match=r"trainer.batch_size=64 is too large: 1 rank\(s\) x 64 = 64 images per step"
                                        r", but .* has 40 usable training images"):
        _plan(data, batch_size=64)
    for split in ("train", "val"):
        (data / split / "n09999999").mkdir()
    (data / "val" / "n09999999" / "x.JPEG").write_bytes((data / "val").joinpath(
        class_dirs(data / "val")[0]).iterdir().__next__().read_bytes())
    with pytest.raises(DataError, match=r"1 class folder\(s\) without usable images: train/n09999999"):
        _plan(data, CLASSES + 1)
    shutil.rmtree(data / "train" / "n09999999")
    shutil.rmtree(data / "val" / "n09999999")
    for split in ("train", "val"):
        shutil.copytree(data / split / class_dirs(data / split)[0], data / split / ".ipynb_checkpoints")
    with pytest.raises(DataError, match=r"hidden folder\(s\) .ipynb_checkpoints .* taken as classes by DALI"):
        _plan(data, CLASSES + 1)


def test_class_count_mismatch_via_the_cli(data, tmp_path):
    proc = run_spnet(*[a for a in args(data, tmp_path) if not a.startswith("model.num_classes")],
                     "model.num_classes=10", cwd=tmp_path, check=False)  # an explicit number must fit (auto counts)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"spnet train: config error: model.num_classes=10 but data.root='{data}' has {CLASSES} classes (folders in "
        f"train/); set model.num_classes={CLASSES}"]


def test_the_plan_is_cached_and_sees_new_files(data):
    c0 = class_dirs(data / "train")[0]
    in_c0 = [f for f in _plan(data).train.files if f.startswith(f"{c0}/")]
    assert len(in_c0) == 10
    (data / "train" / c0 / "new.JPEG").write_bytes(next((data / "train" / c0).iterdir()).read_bytes())
    assert f"{c0}/new.JPEG" in _plan(data).train.files  # the index notices the folder changed


def test_preflight_runs_the_data_check_for_train(data):
    cfg = compose([f"data.root={data}", "model.num_classes=3"])
    with pytest.raises(ConfigError, match=r"^model.num_classes=3 but data.root="):
        preflight(cfg)
    plan = preflight(compose([f"data.root={data}", f"model.num_classes={CLASSES}"]))
    assert len(plan.train.files) == CLASSES * 10 and plan.shard_sizes == {"train": (40,), "val": (16,)}


def test_full_decode_of_many_files_runs_in_worker_processes(tmp_path, caplog):
    """check-data's decode level on > 400 files uses a process pool (PIL holds the GIL); results are the same."""
    split = tmp_path / "data" / "train"
    good = io.BytesIO()
    _photo(1).save(good, format="JPEG")
    for c in range(3):
        (split / f"n0000000{c}").mkdir(parents=True)
        for i in range(150):
            (split / f"n0000000{c}" / f"{i}.JPEG").write_bytes(good.getvalue())
    bad_file(split / "n00000001" / "cut.JPEG", "truncated")
    with caplog.at_level(logging.WARNING, logger="spnet.data"):
        idx = build_index(split, "decode", workers=2)
    assert not caplog.records  # no fallback to threads
    assert sum(idx["counts"].values()) == 451
    assert list(idx["bad"]) == ["n00000001/cut.JPEG"] and idx["bad"]["n00000001/cut.JPEG"].startswith("truncated JPEG")
