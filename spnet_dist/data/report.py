"""What ``spnet check-data`` reports: every problem of every split at once (the pre-flight stops at the first)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .files import SPLITS, name_list
from .index import index_path, split_index


def _bad_in(idx: dict, c: str) -> int:
    return sum(1 for k in idx["bad"] if k.split("/", 1)[0] == c)


def _split_report(d: Path, idx: dict) -> dict[str, Any]:
    counts = idx["counts"]
    usable = {c: n - _bad_in(idx, c) for c, n in counts.items()}
    return {
        "classes": len(idx["classes"]), "images": sum(counts.values()), "usable_images": sum(usable.values()),
        "min_per_class": min(usable.values(), default=0), "max_per_class": max(usable.values(), default=0),
        "per_class": counts,
        "empty_classes": [c for c in idx["classes"] if usable[c] == 0],
        "undecodable": [{"file": str(d / k), "reason": v} for k, v in sorted(idx["bad"].items())],
        "loads_with_notes": [{"file": str(d / k), "note": v} for k, v in sorted(idx["notes"].items())],
        "ignored_files": [str(d / k) for k in idx["ignored_files"]],
        "nested_dirs": [str(d / k) for k in idx["nested_dirs"]],
        "index": str(index_path(d)),
    }


def _split_findings(s: str, d: Path, idx: dict, r: dict[str, Any]) -> tuple[list[str], list[str]]:
    errors, warnings = [], []
    if not idx["classes"]:
        errors.append(f"no class folders in {d}")
    if r["empty_classes"]:
        errors.append(f"{s}: {len(r['empty_classes'])} class folder(s) without usable images: "
                      f"{name_list(r['empty_classes'])}")
    hidden = [c for c in idx["classes"] if c.startswith(".")]
    if hidden:
        errors.append(f"{s}: hidden folder(s) {name_list(hidden)} are taken as classes by DALI; move them out")
    if r["undecodable"]:
        errors.append(f"{s}: {len(r['undecodable'])} undecodable file(s): "
                      f"{name_list([u['file'] + ' (' + u['reason'] + ')' for u in r['undecodable']])}; training "
                      f"leaves them out with data.on_corrupt=skip, stops with data.on_corrupt=fail")
    if r["ignored_files"]:
        warnings.append(f"{s}: {len(r['ignored_files'])} file(s) without an image extension are ignored by the "
                        f"reader: {name_list(r['ignored_files'])}")
    if r["nested_dirs"]:
        warnings.append(f"{s}: {len(r['nested_dirs'])} sub-folder(s) inside class folders are ignored by the "
                        f"reader: {name_list(r['nested_dirs'])}")
    if r["loads_with_notes"]:
        warnings.append(f"{s}: {len(r['loads_with_notes'])} file(s) are unusual but load fine: "
                        f"{name_list([n['file'] + ' (' + n['note'] + ')' for n in r['loads_with_notes']])}")
    return errors, warnings


def check_data(root: str | Path, decode: bool = True, num_classes: int | None = None,
               workers: int | None = None) -> dict[str, Any]:
    """The full report of ``spnet check-data``; refreshes the cached index (level ``decode`` or ``quick``), which
    lists and inspects each split once."""
    root = Path(root)
    report: dict[str, Any] = {"root": str(root), "level": "decode" if decode else "quick", "errors": [],
                              "warnings": [], "splits": {}}
    errors, warnings = report["errors"], report["warnings"]
    present = []
    for s in SPLITS:
        d = root / s
        if not d.is_dir():
            errors.append(f"missing folder {d} (expected {root}/{s}/<wnid>/*.JPEG)")
            continue
        idx = split_index(d, report["level"], refresh=True, workers=workers)
        present.append(s)
        report["splits"][s] = _split_report(d, idx)
        e, w = _split_findings(s, d, idx, report["splits"][s])
        errors += e
        warnings += w
    if present == list(SPLITS):
        train, val = report["splits"]["train"], report["splits"]["val"]
        t, v = set(train["per_class"]), set(val["per_class"])
        report["classes_only_in_train"] = sorted(t - v)
        report["classes_only_in_val"] = sorted(v - t)
        if t != v:
            errors.append(f"train and val class folders differ: {len(t - v)} only in train "
                          f"({name_list(sorted(t - v))}), {len(v - t)} only in val ({name_list(sorted(v - t))}); "
                          f"labels would not match")
        report["num_classes"] = len(t)
        if num_classes is not None and int(num_classes) != len(t):
            warnings.append(f"model.num_classes={num_classes} differs from the {len(t)} classes here; train with "
                            f"model.num_classes={len(t)}")
    report["ok"] = not errors
    return report
