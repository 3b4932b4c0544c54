"""A start runs each data check once: the pre-flight lists each split once (through its cached index: a warm start
lists only the class folders, no image folder), and the loaders — held-out subsets included — read the plan's file
lists without listing anything again. Counted by wrapping the listing functions and ``os.scandir`` / ``os.listdir``,
in-process for the pre-flight + one rank's loaders, and in a real `spnet train` process. Also: a loader follows the
``Loader`` protocol and continues mid-epoch from its ``state_dict``. And the checks before any work: a read-only
checkpoint or spool folder and an unknown tracking scheme stop `spnet train` within seconds with one line, before
DeepSpeed, DALI or MLflow is even imported; `--cfg job` probes nothing."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

import pytest
from conftest import TINY_CLASSES, last_json, run_spnet, tiny_train_args

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


# ------------------------------------------------------------------ write probes and the tracking URI, before any work

# the real CLI (cli.py's __main__) with an atexit hook that writes the names of the heavy packages this process
# imported: none of DeepSpeed, DALI or MLflow may be loaded when the pre-flight stops a start
CLI_WITH_MODULES = r'''
import atexit, json, runpy, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(
    m for m in sys.modules if m.split(".")[0] in ("deepspeed", "mlflow") or m.startswith("nvidia.dali")))))
sys.argv[0] = "spnet"
runpy.run_module("spnet_dist.cli", run_name="__main__")
'''


def unprivileged(folder: Path) -> list[str]:
    """A command prefix under which the permission bits of ``folder`` hold: nothing for a normal user; for root
    (chmod does not stop root) ``setpriv`` without CAP_DAC_OVERRIDE. Skips when ``folder`` is writable anyway."""
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root, where chmod 0o555 does not stop writes, and no setpriv to drop "
                        "CAP_DAC_OVERRIDE")
        prefix = [shutil.which("setpriv"), "--bounding-set=-dac_override,-dac_read_search"]
    probe = subprocess.run([*prefix, sys.executable, "-c", f"open({str(folder / 'x')!r}, 'w')"],
                           capture_output=True)
    if probe.returncode == 0:
        (folder / "x").unlink()
        pytest.skip(f"{folder} (mode 0o555) is still writable for this test's processes")
    return prefix


def read_only(path: Path) -> Path:
    path.mkdir(parents=True)
    path.chmod(0o555)
    return path


def spnet_stopped_early(tmp_path: Path, *args: str, prefix: Sequence[str] = ()) -> tuple[list[str], float]:
    """Run the real `spnet` with ``args``; assert exit code 2 and that no DeepSpeed, DALI or MLflow was loaded;
    return (stderr lines, seconds)."""
    modules = tmp_path / "modules.json"
    start = time.monotonic()
    proc = subprocess.run([*prefix, sys.executable, "-c", CLI_WITH_MODULES, str(modules), *args], cwd=tmp_path,
                          text=True, capture_output=True, timeout=120,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    elapsed = time.monotonic() - start
    assert proc.returncode == 2 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr[-3000:])
    assert json.loads(modules.read_text()) == [], "work started before the pre-flight stopped it"
    return proc.stderr.splitlines(), elapsed


def test_a_read_only_checkpoint_dir_stops_train_in_seconds_with_one_line(tiny_data, tmp_path):
    ckpt = read_only(tmp_path / "ro_ckpt")
    try:
        prefix = unprivileged(ckpt)
        args = tiny_train_args(tiny_data, tmp_path, f"checkpoint.dir={ckpt}")
        lines, elapsed = spnet_stopped_early(tmp_path, *args, prefix=prefix)
        assert lines == [f"spnet train: config error: checkpoint.dir={ckpt} is not writable (PermissionError: "
                         f"Permission denied); point checkpoint.dir at a writable folder"]
        assert elapsed < 20, elapsed  # ~2 s here: imports and the config, no model, DeepSpeed or data loader
        assert list(ckpt.iterdir()) == [] and not (tmp_path / "mlflow.db").exists()
        # the spool elsewhere (tracking.spool_dir): also refused before any work, naming its key
        spool = read_only(tmp_path / "ro_spool")
        lines, _ = spnet_stopped_early(tmp_path, *tiny_train_args(tiny_data, tmp_path, f"tracking.spool_dir={spool}"),
                                       prefix=prefix)
        assert lines == [f"spnet train: config error: tracking.spool_dir={spool} is not writable (PermissionError: "
                         f"Permission denied); point tracking.spool_dir at a writable folder"]
        assert list(spool.iterdir()) == [] and not (tmp_path / "ckpt").exists()  # the probe left no folder
    finally:
        for p in tmp_path.glob("ro_*"):
            p.chmod(0o755)


def test_an_unknown_tracking_scheme_stops_train_before_any_work(tiny_data, tmp_path):
    lines, elapsed = spnet_stopped_early(tmp_path, *tiny_train_args(tiny_data, tmp_path,
                                                                     "tracking.uri=sqlit:///x.db"))
    assert len(lines) == 1 and lines[0].startswith(
        "spnet train: config error: tracking.uri='sqlit:///x.db': unknown scheme 'sqlit'; did you mean sqlite? "), lines
    assert elapsed < 20 and not (tmp_path / "ckpt").exists() and not (tmp_path / "x.db").exists()


def test_probe_and_scheme_rules(tmp_path):
    from spnet_dist.config import ConfigError
    from spnet_dist.preflight import check_tracking_uri, probe_writable

    probe_writable("checkpoint.dir", tmp_path / "a" / "b" / "c", keep=False)  # made, probed, removed again
    assert list(tmp_path.iterdir()) == []
    probe_writable("checkpoint.dir", tmp_path / "kept")
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []  # no probe file left
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=rf"^checkpoint.dir={tmp_path / 'file'} is a file, not a folder; "):
        probe_writable("checkpoint.dir", tmp_path / "file")
    with pytest.raises(ConfigError, match=r"^checkpoint.dir=.* is not writable \((NotADirectoryError|FileExistsError)"):
        probe_writable("checkpoint.dir", tmp_path / "file" / "sub")
    for uri in ("sqlite:///mlflow.db", "mlruns", "/abs/mlruns", "file:///x", "http://h:5000", "https://h",
                "postgresql+psycopg2://u@h/db", "mysql://h/db", "databricks", "databricks://profile", "C:\\mlruns"):
        check_tracking_uri(uri)
    for uri, hint in (("sqlit:///x.db", "did you mean sqlite?"), ("htps://h", "did you mean http"),
                      ("s3://bucket/x", "MLflow stores runs under")):
        with pytest.raises(ConfigError, match=rf"^tracking.uri='{re.escape(uri)}': unknown scheme .*{hint}"):
            check_tracking_uri(uri)


def test_printing_the_config_probes_nothing(tmp_path):
    new = tmp_path / "not" / "yet"
    proc = subprocess.run([sys.executable, "-m", "spnet_dist.cli", "train", "--cfg", "job", f"checkpoint.dir={new}"],
                          cwd=tmp_path, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 0 and f"dir: {new}" in proc.stdout, proc.stderr
    assert list(tmp_path.iterdir()) == []


def submit_args(data: Path, tmp: Path, *extra: str) -> list[str]:
    """`spnet train` overrides for `spnet submit` (cluster profile: local), without the tiny run's checkpoint.dir."""
    return [a for a in tiny_train_args(data, tmp)[1:] if not a.startswith("checkpoint.dir=")] + list(extra)


def test_spnet_submit_probes_the_checkpoint_dir_on_the_login_node(tiny_data, tmp_path):
    """The write probe of checkpoint.dir runs before anything is submitted (not only a --dry-run); the probe of a
    writable one leaves nothing behind."""
    ckpt = read_only(tmp_path / "shared" / "ro")
    try:
        prefix = unprivileged(ckpt)
        proc = subprocess.run([*prefix, sys.executable, "-m", "spnet_dist.cli", "submit", "--folder",
                               str(tmp_path / "slurm"), *submit_args(tiny_data, tmp_path, f"checkpoint.dir={ckpt}")],
                              cwd=tmp_path, text=True, capture_output=True, timeout=120)
        assert proc.returncode == 2 and proc.stdout == "", proc.stderr
        assert proc.stderr.splitlines() == [f"spnet submit: config error: checkpoint.dir={ckpt} is not writable "
                                            f"(PermissionError: Permission denied); point checkpoint.dir at a "
                                            f"writable folder"]
        assert not (tmp_path / "slurm").exists() and list(ckpt.iterdir()) == []
    finally:
        ckpt.chmod(0o755)
    r = run_spnet("submit", "--dry-run", "--folder", str(tmp_path / "slurm"),
                  *submit_args(tiny_data, tmp_path, f"checkpoint.dir={tmp_path / 'shared' / 'new' / 'ckpt'}"),
                  cwd=tmp_path)
    assert last_json(r.stdout)["dry_run"] and not (tmp_path / "shared" / "new").exists()
