"""Smoke test of the benchmarks (tools/bench_*.py): each runs end to end with tiny sizes, prints its table and
appends its JSON lines. Nothing is timed or compared here; BENCHMARKS.md holds the measurements."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_tool(name: str, *args: str, tmp: Path, timeout: float = 240) -> tuple[str, list[dict]]:
    jsonl = tmp / f"{name}.jsonl"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / f"{name}.py"), *args, "--jsonl", str(jsonl)],
                          cwd=tmp, env=env, text=True, capture_output=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    for r in rows:
        assert r["bench"] == name and r["machine"]["cores"] >= 1 and r["date"] and r["command"]
        assert isinstance(r["load_avg_start"], list)
    return proc.stdout, rows


def test_bench_step_tiny(tmp_path):
    out, rows = run_tool("bench_step", "--model", "resnet_tiny", "--image-size", "32", "--batch", "2",
                         "--threads", "1", "--rounds", "2", "--warmup", "1",
                         "--variants", "static", "aig", "spnet", "spnet:bf16teacher", tmp=tmp_path)
    assert "÷ static" in out and "teacher" in out and "load average" in out
    by = {r["variant"]: r for r in rows}
    assert set(by) == {"static", "aig", "spnet", "spnet:bf16teacher"}
    assert by["static"]["ratio"] == pytest.approx(1.0)
    sp = by["spnet"]["parts_ms"]
    assert sp["teacher"] > 0 and sp["ema"] > 0 and sp["forward"] > 0 and sp["backward"] > 0
    assert by["static"]["parts_ms"]["teacher"] == 0
    assert set(by["spnet"]["estimate_teacher_every_k"]) == {"2", "4", "8"}


def test_bench_data_tiny(tmp_path):
    out, rows = run_tool("bench_data", "--images", "40", "--batch", "4", "--workers", "1", "--rounds", "1",
                         "--skip", "2", "--settle", "0", "--data-dir", str(tmp_path / "jpeg"), tmp=tmp_path)
    assert "img/CPU-s" in out
    by = {r["loader"]: r for r in rows}
    assert {"dali", "pil"} <= set(by)
    assert by["dali"]["images_per_epoch"] == by["pil"]["images_per_epoch"] == 40
    assert all(r["img_per_s"] > 0 and r["img_per_cpu_s"] > 0 for r in rows)
    sizes = [p.stat().st_size for p in (tmp_path / "jpeg").rglob("*.JPEG")]
    assert len(sizes) == 40


def test_bench_scale_tiny(tmp_path):
    out, rows = run_tool("bench_scale", "--ranks", "1", "2", "--steps", "2", "--warmup", "1", "--rounds", "1",
                         "--batch", "4", "--image-size", "32", "--per-class", "4", "--method", "aig",
                         "--data", str(tmp_path / "tiny"), tmp=tmp_path)
    assert "allreduce" in out
    by = {r["ranks"]: r for r in rows}
    assert set(by) == {1, 2}
    assert by[1]["threads_per_rank"] >= by[2]["threads_per_rank"] >= 1
    assert by[2]["img_per_s"] > 0 and by[2]["parts_ms"]["backward"] > 0


def test_bench_checkpoint_tiny(tmp_path):
    out, rows = run_tool("bench_checkpoint", "--model", "resnet_tiny", "--rounds", "1", tmp=tmp_path)
    assert "hashed/plain" in out
    (row,) = rows
    assert row["mib"] > 0 and row["plain_s"] > 0 and row["hashed_s"] > 0 and row["verify_s"] > 0
