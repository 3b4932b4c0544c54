"""tools/gpu_check.sh --cpu: the device machine's GPU check, run end to end at tiny sizes on the CPU, so that the
script that a lent GPU runs (rarely, within minutes) is known to work before it gets there."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from numbers import Number
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = {"install", "imports", "step", "make_data", "train_epoch1", "train_resume", "eval_skip", "skip_fp32",
         "skip_bf16", "decode", "step_compile"}


def test_gpu_check_cpu_mode_runs_every_step_and_reports_numbers(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_check.sh"), "--cpu"], cwd=tmp_path, env=env,
                          text=True, capture_output=True, timeout=480)
    report = tmp_path / "out" / "gpu_check.json"
    assert report.is_file(), f"no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rep = json.loads(report.read_text())
    failed = {s["name"]: s.get("log_tail") for s in rep["steps"] if s["rc"] != 0}
    assert not failed, f"steps failed: {json.dumps(failed, indent=1)[-4000:]}"
    assert proc.returncode == 0 and rep["all_steps_ok"] and {s["name"] for s in rep["steps"]} == STEPS
    assert rep["mode"] == "cpu" and rep["machine"]["torch"] and rep["machine"]["deepspeed"]

    st = rep["step_throughput"]
    eager = {r["variant"]: r for r in st["eager"]}
    assert set(eager) == {"static:cl+bf16", "aig:cl+bf16", "spnet:cl+bf16", "static:cl", "spnet:cl",
                          "spnet:cl+bf16teacher"}
    assert all(r["img_per_s"] > 0 and r["img_s_vs_static"] > 0 for r in eager.values())
    assert eager["static:cl"]["img_s_vs_static"] == 1.0 and eager["spnet:cl+bf16"]["parts_ms"]["teacher"] > 0
    assert {r["variant"] for r in st["compiled"]} == {"static:cl+bf16", "spnet:cl+bf16"}
    assert all(r["compile"] == "eager" and r["img_per_s"] > 0 for r in st["compiled"])
    assert set(st["compiled_over_eager"]) == {"static:cl+bf16", "spnet:cl+bf16"}

    train = rep["train"]
    assert train["train_epoch1"]["steps"] == 8 and train["train_epoch1"]["epochs"] == 1
    assert train["train_resume"]["steps"] == 16 and train["train_resume"]["epochs"] == 2 and train["resumed"]
    assert train["eval_skip"]["execution"] == "skip" and train["eval_skip"]["val_images"] == 8
    for summary in (train["train_epoch1"], train["train_resume"], train["eval_skip"]):
        assert isinstance(summary["top1"], Number) and summary["macs_per_image"] > 0

    skip = rep["skip"]
    assert {(r["precision"], r["batch"], r["t"]) for r in skip} == {
        (p, b, t) for p in ("fp32", "bf16") for b in (1, 4) for t in (0.3, 0.5, 0.7)}
    assert all(r["dense_ms"] > 0 and r["skip_ms"] > 0 and r["device"] == "cpu" for r in skip)

    decode = {r["mode"]: r for r in rep["decode"]}
    assert set(decode) == {"cpu-loader", "cpu-decode"} and all(r["img_per_s"] > 0 for r in decode.values())
    assert decode["cpu-loader"]["images_per_epoch"] == 32

    table = (tmp_path / "out" / "gpu_check.txt").read_text()
    assert proc.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])  # the table is printed last
    assert "training step" in table and "real skipping" in table and "decode" in table
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"gpu_check.json", "gpu_check.txt", "gpu_check.log"}
