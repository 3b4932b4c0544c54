"""Report of ``tools/gpu_check.sh``: one JSON file and a short table from its work folder.

Usage (by gpu_check.sh): python tools/gpu_check_report.py --work DIR --out DIR --mode gpu|cpu [--seconds N]

Reads ``WORK/steps.jsonl`` (one record per step: name, rc, seconds, limit_s, note), the benchmarks' JSON lines in
``WORK/json/`` and the steps' logs in ``WORK/logs/`` (the summary JSON line that ``spnet train`` / ``spnet eval``
print last). Writes ``OUT/gpu_check.json`` with the sections machine, steps, step_throughput, train, skip, decode
and targets (the issue's GPU targets, judged only in GPU mode), and ``OUT/gpu_check.txt``, which it prints.
Exit status 1 when a step did not exit 0.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TEACHER_OPTIONS = {"bf16teacher", "nograd", "noteacher"}
# the issue's targets on one H200
TARGET_STATIC_IMG_S = 3500.0
TARGET_SPNET_RATIO = 0.72
TARGET_REALISED_B64 = 0.60


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def last_json(log: Path) -> dict[str, Any] | None:
    """The last line of ``log`` that is a JSON object (the CLI's summary)."""
    if not log.is_file():
        return None
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def tail(log: Path, n: int = 25) -> list[str]:
    return log.read_text(errors="replace").splitlines()[-n:] if log.is_file() else []


def machine() -> dict[str, Any]:
    import platform

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for pkg in ("torchvision", "deepspeed", "mlflow-skinny", "mlflow", "hydra-core", "omegaconf", "pydantic",
                "numpy"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    sys.path.insert(0, str(ROOT / "tools"))
    import bench_common as bc

    info.update(host=platform.node(), cpu=bc.cpu_model(), cores=bc.usable_cores(), date=bc.now_utc())
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total",
                                         "--format=csv,noheader"], capture_output=True, text=True,
                                        timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["driver"] = None
    try:
        info["commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def split_variant(name: str) -> tuple[str, frozenset[str], frozenset[str]]:
    """variant -> (base, precision/layout options, teacher options)."""
    base, _, opts = name.partition(":")
    options = frozenset(filter(None, opts.split("+")))
    return base, options - TEACHER_OPTIONS, options & TEACHER_OPTIONS


def step_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: img/s, step ms, parts and img/s ÷ the static step of the same precision and layout."""
    static = {split_variant(r["variant"])[1]: r["img_per_s"] for r in rows if r["variant"].startswith("static")}
    out = []
    for r in rows:
        _, opts, _ = split_variant(r["variant"])
        ref = static.get(opts)
        out.append({"variant": r["variant"], "img_per_s": r["img_per_s"], "step_ms": r["step_ms"],
                    "img_s_vs_static": round(r["img_per_s"] / ref, 4) if ref else None,
                    "parts_ms": r["parts_ms"], "batch": r["batch"], "model": r["model"],
                    "image_size": r["image_size"], "compile": r.get("compile"), "device": r.get("device")})
    return out


def build(work: Path, mode: str, seconds: float | None) -> dict[str, Any]:
    steps = read_jsonl(work / "steps.jsonl")
    for s in steps:
        if s["rc"] != 0:
            s["log_tail"] = tail(work / "logs" / f"{s['name']}.log")
    eager = step_rows(read_jsonl(work / "json" / "step.jsonl"))
    compiled = step_rows(read_jsonl(work / "json" / "step_compile.jsonl"))
    by_eager = {r["variant"]: r["img_per_s"] for r in eager}
    speedup = {r["variant"]: round(r["img_per_s"] / by_eager[r["variant"]], 4)
               for r in compiled if by_eager.get(r["variant"])}
    train: dict[str, Any] = {name: last_json(work / "logs" / f"{name}.log")
                             for name in ("train_epoch1", "train_resume", "eval_skip")}
    resume_log = work / "logs" / "train_resume.log"
    train["resumed"] = resume_log.is_file() and "resumed from" in resume_log.read_text(errors="replace")
    skip = []
    for precision in ("fp32", "bf16"):
        for r in read_jsonl(work / "json" / f"skip_{precision}.jsonl"):
            skip.append({"precision": precision, **{k: r.get(k) for k in (
                "batch", "t", "gate_rate", "dense_ms", "skip_ms", "measured_saving", "theoretical_saving_gates",
                "realised_fraction", "max_abs_logit_diff", "device")}})
    decode = [{k: r.get(k) for k in ("mode", "workers", "batch", "images_per_epoch", "img_per_s", "ratio",
                                     "mean_kb")} for r in read_jsonl(work / "json" / "decode.jsonl")]
    return {"mode": mode, "seconds": seconds, "machine": machine(), "steps": steps,
            "all_steps_ok": bool(steps) and all(s["rc"] == 0 for s in steps),
            "step_throughput": {"eager": eager, "compiled": compiled, "compiled_over_eager": speedup},
            "train": train, "skip": skip, "decode": decode, "targets": targets(mode, eager, skip)}


def targets(mode: str, eager: list[dict[str, Any]], skip: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's GPU targets with the measured values (``met`` is None in CPU mode: tiny sizes say nothing)."""
    by = {r["variant"]: r for r in eager}
    static = by.get("static:cl+bf16", {}).get("img_per_s")
    ratio = by.get("spnet:cl+bf16", {}).get("img_s_vs_static")
    judge = (lambda v, t: None if mode != "gpu" or v is None else v >= t)
    out = {"static_img_per_s": {"value": static, "target": TARGET_STATIC_IMG_S,
                                "met": judge(static, TARGET_STATIC_IMG_S)},
           "spnet_over_static_img_per_s": {"value": ratio, "target": TARGET_SPNET_RATIO,
                                           "met": judge(ratio, TARGET_SPNET_RATIO)}}
    for precision in ("bf16", "fp32"):  # the worst t at batch 64
        b64 = [r["realised_fraction"] for r in skip if r["precision"] == precision and r["batch"] == 64
               and r["realised_fraction"] is not None]
        realised = min(b64) if b64 else None
        out[f"realised_skip_saving_b64_{precision}"] = {"value": realised, "target": TARGET_REALISED_B64,
                                                        "met": judge(realised, TARGET_REALISED_B64)}
    return out


def fmt(v: Any, spec: str = "") -> str:
    return "-" if v is None else format(v, spec)


def table(rep: dict[str, Any]) -> str:
    m = rep["machine"]
    lines = [f"GPU check ({rep['mode']} mode, {fmt(rep['seconds'])} s): {m['gpu'] or m['cpu']}, torch {m['torch']}, "
             f"CUDA {m['cuda']}, Python {m['python']}, deepspeed {m['deepspeed']}, {m['date']}",
             "", "steps:  " + "  ".join(f"{s['name']} {s['rc']} ({s['seconds']} s)" for s in rep["steps"])]
    st = rep["step_throughput"]
    if st["eager"]:
        r0 = st["eager"][0]
        lines += ["", f"training step, {r0['model']} @ {r0['image_size']} px, batch {r0['batch']} "
                      f"(cl = channels_last, bf16 = bf16 autocast step):",
                  f"  {'variant':<28}{'img/s':>10}{'÷ static':>10}{'compiled':>10}{'×eager':>8}"]
        comp = {r["variant"]: r["img_per_s"] for r in st["compiled"]}
        for r in st["eager"]:
            lines.append(f"  {r['variant']:<28}{fmt(r['img_per_s'], '.1f'):>10}{fmt(r['img_s_vs_static'], '.3f'):>10}"
                         f"{fmt(comp.get(r['variant']), '.1f'):>10}"
                         f"{fmt(st['compiled_over_eager'].get(r['variant']), '.2f'):>8}")
    tr = rep["train"]
    lines += ["", "spnet train (torchvision loader, DeepSpeed, 1 rank):"]
    for name, s in tr.items():
        if name == "resumed":
            lines.append(f"  resumed from the epoch-1 checkpoint: {s}")
        elif s is None:
            lines.append(f"  {name:<14} no summary")
        else:
            lines.append(f"  {name:<14} steps {s.get('steps')}  epochs {s.get('epochs', '-')}  "
                         f"top1 {fmt(s.get('top1'), '.3f')}  img/s {fmt(s.get('train_images_per_sec'), '.1f')}  "
                         f"exec rate {fmt(s.get('exec_rate'), '.3f')}  val images {s.get('val_images', '-')}")
    if rep["skip"]:
        lines += ["", "real skipping (saving = 1 - skip/dense; realised = measured / theoretical from the gates):",
                  f"  {'prec':<5}{'batch':>6}{'t':>5}{'dense ms':>10}{'skip ms':>9}{'saving':>8}{'theo':>7}"
                  f"{'realised':>9}"]
        for r in rep["skip"]:
            lines.append(f"  {r['precision']:<5}{r['batch']:>6}{r['t']:>5}{fmt(r['dense_ms'], '.2f'):>10}"
                         f"{fmt(r['skip_ms'], '.2f'):>9}{fmt(r['measured_saving'], '.1%'):>8}"
                         f"{fmt(r['theoretical_saving_gates'], '.1%'):>7}{fmt(r['realised_fraction'], '.1%'):>9}")
    if rep["decode"]:
        lines += ["", "decode (224-px training batches; loaders are the trainer's torchvision backend):"]
        for r in rep["decode"]:
            lines.append(f"  {r['mode']:<12} workers {r['workers']:>2}  {fmt(r['img_per_s'], '.1f'):>9} img/s  "
                         f"÷ cpu-loader {fmt(r['ratio'], '.2f')}")
    lines += ["", "targets (H200): " + "  ".join(
        f"{k} {fmt(v['value'], '.3f')} (target {v['target']}, met {fmt(v['met'])})" for k, v in rep["targets"].items())]
    lines.append(f"all steps exited 0: {rep['all_steps_ok']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=("gpu", "cpu"), required=True)
    p.add_argument("--seconds", type=float, default=None, help="the whole check's wall time so far")
    args = p.parse_args(argv)
    rep = build(Path(args.work), args.mode, args.seconds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(rep, indent=1, sort_keys=True, default=str) + "\n")
    text = table(rep)
    (out / "gpu_check.txt").write_text(text)
    print(text, end="")
    return 0 if rep["all_steps_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
