"""The schema the ``configs/`` tree implies: leaf keys with the value types seen in any option, mapping keys,
config groups and their options, required keys — inferred from the YAML files, so a key added there is known
everywhere without a second list."""
from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

# Keys the code reads with a default (``cfg.x.get(key, default)``) that no yaml file sets; add them with '+'.
OPTIONAL_KEYS: dict[str, set[str]] = {
    "optim.no_decay_bn": {"bool"},
    "trainer.sync_check_every": {"int"},
}


class Schema:
    """What the configs/ tree allows: leaf keys with the types seen in any option, mapping keys, groups."""

    def __init__(self, cdir: Path):
        self.leaves: dict[str, set[str]] = {}
        self.elems: dict[str, set[str]] = {}
        self.maps: set[str] = set()
        self.open_maps: set[str] = set()
        self.groups: dict[str, list[str]] = {}
        self.required: set[str] = set()
        root = OmegaConf.to_container(OmegaConf.load(cdir / "config.yaml"))
        defaults = root.pop("defaults", [])
        self._walk("", root)
        self.required |= {p for p in self.leaves if "." in p or p in root} | {p for p in self.maps}
        selected = {next(iter(d)) for d in defaults if isinstance(d, dict)}
        for gdir in sorted(p for p in cdir.iterdir() if p.is_dir()):
            options = sorted(gdir.glob("*.yaml"))
            if not options:
                continue
            self.groups[gdir.name] = [o.stem for o in options]
            keysets = []
            for opt in options:
                head = opt.read_text().splitlines()[:3]
                pkg = next((ln.split("@package", 1)[1].strip() for ln in head if "@package" in ln), gdir.name)
                prefix = "" if pkg == "_global_" else pkg.replace("_group_", gdir.name) + "."
                body = OmegaConf.to_container(OmegaConf.load(opt)) or {}
                if prefix:
                    self.maps.add(prefix[:-1])
                keysets.append(self._walk(prefix, body))
            if gdir.name in selected and keysets and prefix:
                self.required |= {gdir.name} | set.intersection(*keysets)

    def _walk(self, prefix: str, node: dict) -> set[str]:
        seen = set()
        for k, v in node.items():
            path = f"{prefix}{k}"
            seen.add(path)
            if isinstance(v, dict):
                self.maps.add(path)
                if not v:
                    self.open_maps.add(path)
                seen |= self._walk(path + ".", v)
            else:
                self.leaves.setdefault(path, set()).add(tag(v))
                if isinstance(v, list) and v:
                    self.elems.setdefault(path, set()).update(tag(x) for x in v)
        return seen


@functools.lru_cache(maxsize=8)
def schema(cdir: str | Path) -> Schema:
    """The schema of the configs/ folder ``cdir`` (cached)."""
    return Schema(Path(cdir))


def tag(v: Any) -> str:
    """The schema type name of a YAML value."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "str"
    if isinstance(v, (list, tuple)):
        return "list"
    if isinstance(v, dict):
        return "dict"
    return "any"


def walk_leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every key of a nested dict, mappings included."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}{k}"
            out.append((path, v))
            if isinstance(v, dict):
                out += walk_leaves(v, path + ".")
    return out


def unknown_key(key: str, given: str, sch: Schema) -> str:
    """The message for a key the schema does not know: close matches, else the keys beside it."""
    known = sorted(set(sch.leaves) | set(sch.maps) | set(OPTIONAL_KEYS))
    close = [k for k in difflib.get_close_matches(key, known, n=4, cutoff=0.75) if not key.startswith(k + ".")][:3]
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = sorted({k[len(parent) + 1:].split(".")[0] for k in known if parent and k.startswith(parent + ".")})
    msg = f"unknown key '{key}' (from {given!r})"
    if close:
        msg += f"; did you mean {' or '.join(close)}?"
    if siblings:
        msg += f"{' ' if close else '; '}Keys under '{parent}': {', '.join(siblings)}"
    elif not parent:
        msg += f"{' ' if close else '; '}Top-level keys: {', '.join(sorted({k.split('.')[0] for k in known}))}"
    return msg
