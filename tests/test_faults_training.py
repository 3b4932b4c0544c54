"""Numerical and disk faults during real training runs: one clear message, nothing good lost."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import last_json, run_spnet, tiny_train_args

from spnet_dist.engine.checkpoint import LATEST, complete_tags, problem_with


def _one_error_line(stderr: str, needle: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.startswith("spnet train: error:")]
    assert len(lines) == 1 and needle in lines[0], stderr[-3000:]
    assert "Traceback" not in stderr
    return lines[0]


def test_nan_loss_stops_naming_step_terms_and_last_good_checkpoint(tiny_data, tmp_path):
    proc = run_spnet(*tiny_train_args(tiny_data, tmp_path, "checkpoint.every_steps=3"), cwd=tmp_path,
                     check=False, env={"SPNET_FAILPOINT": "nan_loss:5"})
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr, "non-finite loss at step 5")
    ckpt = tmp_path / "ckpt"
    assert f"last good checkpoint: {ckpt / 'global_step3'}" in line and "ce=" in line
    assert complete_tags(ckpt) == ["global_step3"] and problem_with(ckpt, "global_step3") is None
    assert (ckpt / LATEST).read_text() == "global_step3"
    resumed = last_json(run_spnet(*tiny_train_args(tiny_data, tmp_path), cwd=tmp_path).stdout)
    assert resumed["steps"] == 8  # continues from step 3 to the end of the epoch


def test_nan_weights_with_a_finite_loss_are_never_checkpointed(tiny_data, tmp_path):
    """A NaN gradient with a finite loss passes the loss check; the save right after it must refuse."""
    proc = run_spnet(*tiny_train_args(tiny_data, tmp_path, "checkpoint.every_steps=2"), cwd=tmp_path,
                     check=False, env={"SPNET_FAILPOINT": "nan_weights:4"})
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr, "non-finite model weights at step 4")
    ckpt = tmp_path / "ckpt"
    assert f"last good checkpoint: {ckpt / 'global_step2'}" in line
    assert complete_tags(ckpt) == ["global_step2"] and not (ckpt / "global_step4").exists()
    assert (ckpt / LATEST).read_text() == "global_step2"


def test_nan_loss_skip_policy_on_two_ranks_skips_the_update(tiny_data, tmp_path):
    proc = run_spnet(*tiny_train_args(tiny_data, tmp_path, "trainer.nprocs=2", "trainer.batch_size=4",
                                      "trainer.on_nonfinite=skip"), cwd=tmp_path,
                     env={"SPNET_FAILPOINT": "nan_loss:2"})
    assert "non-finite loss at step 2" in proc.stderr and "update skipped" in proc.stderr
    assert last_json(proc.stdout)["steps"] == 8


@pytest.fixture
def small_disk(tmp_path):
    """A 2.5 MiB tmpfs: two tiny checkpoints (~1.1 MiB each with ZeRO-0) fit, the third does not."""
    mnt = tmp_path / "small_disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2560k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a size-limited tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_keeps_the_previous_checkpoint_and_says_so(tiny_data, tmp_path, small_disk):
    args = tiny_train_args(tiny_data, tmp_path, "checkpoint.every_steps=2", "trainer.nprocs=2",
                           "trainer.batch_size=4", f"checkpoint.dir={small_disk}")
    proc = run_spnet(*args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    line = _one_error_line(proc.stderr, "could not write checkpoint")
    failed = re.search(r"could not write checkpoint (\S+) \(the disk is full", line)
    kept = re.search(r"the previous checkpoint (\S+) is intact", line)
    assert failed and kept, line
    failed_tag, kept_tag = Path(failed.group(1)), Path(kept.group(1))
    assert failed_tag.parent == kept_tag.parent == small_disk
    assert complete_tags(small_disk)[-1] == kept_tag.name and problem_with(small_disk, kept_tag.name) is None
    assert (small_disk / LATEST).read_text() == kept_tag.name
    assert not failed_tag.exists()  # the partial write was removed
