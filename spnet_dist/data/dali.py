"""DALI pipelines over the ImageNet folder layout, sharded by *global* rank.

Train: file reader (random shuffle, padded last batch) -> decode -> random-resized-crop (``data.train_aug=pad_crop``:
resize to crop x crop if needed, then a crop x crop window at a random integer offset in [-pad, pad] per axis,
zero-filled outside the image) -> flip + normalize.
Val: file reader (no shuffle, padded last batch) -> decode -> resize shorter side -> center crop + normalize.
Decoding runs on the CPU (``device_id=None``) unless a GPU is present and ``decode`` is ``auto`` or ``mixed``.

The reader always gets a ``file_list`` (``write_file_list``: the pre-flight plan's usable files, or a subset of
them, labelled by position in the full class list), so it never lists the folders itself. A file DALI still fails
on stops the pipeline for good (DALI 2.4 has no skip option); ``DaliLoader`` turns that "Critical error in
pipeline" into a ``CorruptDataError`` naming the file, and with ``on_corrupt='skip'`` records it so the next run
leaves it out. Where DALI does not name the file (``nvImageCodec failure: '#3'``: a JPEG whose header is cut but
still ends in an end marker passes the quick sniff and fails so), ``find_undecodable`` decodes the files of this
rank's shard with PIL (then the other shards, in the order DALI's reader moves on to them) and names those.

``build`` is this backend's entry for ``loader.build_loader`` (``data.backend=dali``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

from ..osutil import write_atomic
from .index import CorruptDataError, cache_dir, record_bad_file
from .options import MEAN, STD, resolve_decode
from .sniff import inspect_folders

log = logging.getLogger("spnet.data")

__all__ = ["CorruptDataError", "DaliLoader", "LoaderSpec", "MEAN", "STD", "build", "resolve_decode", "write_file_list"]

if TYPE_CHECKING:  # pragma: no cover
    from .preflight import DataPlan


@pipeline_def(enable_checkpointing=True)
def _imagenet_pipe(root: str, shard_id: int, num_shards: int, train: bool, crop: int, val_resize: int,
                   decode: str, with_source_info: bool, layout: str, file_list: str | None = None,
                   train_aug: str = "random_resized_crop", pad: int = 4):
    listing = {"file_list": file_list} if file_list else {}
    jpegs, labels = fn.readers.file(file_root=root, shard_id=shard_id, num_shards=num_shards,
                                    random_shuffle=train, pad_last_batch=True, name="Reader", **listing)
    if train and train_aug == "pad_crop":
        images = _pad_crop(fn.decoders.image(jpegs, device=decode, output_type=types.RGB), crop, pad)
        mirror = fn.random.coin_flip(probability=0.5)
    elif train:
        images = fn.decoders.image_random_crop(jpegs, device=decode, output_type=types.RGB,
                                               random_area=[0.08, 1.0], random_aspect_ratio=[0.75, 4 / 3])
        images = fn.resize(images, resize_x=crop, resize_y=crop)
        mirror = fn.random.coin_flip(probability=0.5)
    else:
        images = fn.decoders.image(jpegs, device=decode, output_type=types.RGB)
        images = fn.resize(images, resize_shorter=val_resize)
        mirror = False
    images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout=layout, crop=(crop, crop),
                                      mean=MEAN, std=STD, mirror=mirror)
    labels = labels.gpu() if decode == "mixed" else labels
    if with_source_info:
        return images, labels, fn.pad(fn.get_property(jpegs, key="source_info"), fill_value=0)  # uniform length
    return images, labels


def _pad_crop(images: Any, crop: int, pad: int) -> Any:
    """torchvision's ``RandomCrop(crop, padding=pad)`` on uint8 HWC images: a crop x crop window whose start is
    uniform in [-pad, pad] per axis (``values``: exact integers, unlike an integer-typed ``range``), the part outside
    the image filled with 0 (before normalization, as zero padding). Images that are not crop x crop (CIFAR-10's
    are 32x32 already) are resized to it first, ignoring the aspect ratio (an exact identity for crop x crop)."""
    images = fn.resize(images, resize_x=crop, resize_y=crop)
    if not pad:
        return images
    start = fn.random.uniform(values=list(range(-pad, pad + 1)), shape=[2], dtype=types.INT32)
    return fn.slice(images, start=start, shape=[crop, crop], axis_names="HW", out_of_bounds_policy="pad",
                    fill_values=0)


@dataclass
class LoaderSpec:
    root: str
    batch_size: int
    shard_id: int
    num_shards: int
    train: bool
    crop: int
    val_resize: int
    num_threads: int = 2
    seed: int = 0
    decode: str = "auto"
    layout: str = "CHW"
    with_source_info: bool = False
    file_list: str | None = None  # DALI file_list ("<class>/<file> <label>" lines, relative to root); None: all
    on_corrupt: str = "fail"      # what a file DALI cannot decode means: fail | skip (recorded for the next run)
    scan: str = "quick"           # the data.scan the file list was checked with (named in unattributed errors)
    train_aug: str = "random_resized_crop"  # training crop: random_resized_crop | pad_crop (zero pad ``pad``)
    pad: int = 4


_FILE_PATTERNS = (re.compile(r"Failed to decode sample #\d+\s*:\s*(.+?)\s*$", re.M),
                  re.compile(r"File mapping failed:\s*(.+?)\s*$", re.M),
                  re.compile(r"(?:Failed to open file|Could not open file|No such file or directory)[:\s]+(\S.*?)\s*$",
                             re.M))
_DATA_ERROR = re.compile(r"nvImageCodec failure|decod|File mapping failed|Failed to open|Could not open", re.I)


def _dali_reason(text: str) -> str:
    """The useful part of a DALI error: the line after 'encountered:' (without the C++ context)."""
    m = re.search(r"encountered:\s*(.+?)\s*(?:C\+\+ context|Current pipeline object|$)", text, re.S)
    reason = m.group(1) if m else text.strip().splitlines()[-1]
    return " ".join(reason.split())[:300]


def translate_dali_error(err: BaseException, spec: LoaderSpec) -> BaseException:
    """A CorruptDataError naming the file for DALI's file/decode errors; other errors unchanged."""
    text = str(err)
    if not isinstance(err, RuntimeError) or not _DATA_ERROR.search(text):
        return err
    reason = _dali_reason(text)
    root = Path(spec.root)
    for i, pat in enumerate(_FILE_PATTERNS):
        m = pat.search(text)
        if m:
            path = Path(m.group(1))
            path = path if path.is_absolute() else root / path
            reason = ("the decoder failed: truncated or corrupt image data", "empty or unreadable file",
                      "cannot open the file")[i]
            break
    else:
        return _unattributed(spec, reason)
    try:
        rel = path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        rel = None
    if spec.on_corrupt == "skip" and rel:
        where = record_bad_file(root, rel, f"DALI: {reason}")
        return CorruptDataError(
            f"DALI could not decode {path} ({reason}); it is now listed as bad in {where}, so the next run leaves "
            f"it out (data.on_corrupt=skip with data.scan=quick or decode): run the same command again, resume=auto "
            f"continues from the last checkpoint")
    return CorruptDataError(f"DALI could not decode {path} ({reason}); replace or delete the file, or set "
                            f"data.on_corrupt=skip")


def _file_list(spec: LoaderSpec) -> list[str]:
    """The files (relative to ``spec.root``) of the reader's ``file_list``, in its order."""
    if not spec.file_list:
        from .files import class_dirs, image_files

        return [f"{c}/{n}" for c in class_dirs(spec.root) for n in image_files(Path(spec.root) / c)[0]]
    lines = Path(spec.file_list).read_text().splitlines()
    return [ln.rsplit(" ", 1)[0] for ln in lines if ln.strip()]


def find_undecodable(spec: LoaderSpec) -> tuple[dict[str, str], int]:
    """(``{file: reason}``, files decoded): a full PIL decode of this rank's shard of the reader's files (DALI's
    shard ``[n*i//w, n*(i+1)//w)``), then of the next shards (the reader moves on to them epoch by epoch), until one
    holds undecodable files."""
    files = _file_list(spec)
    n, w = len(files), max(1, spec.num_shards)
    decoded = 0
    for k in range(w):
        i = (spec.shard_id + k) % w
        shard = files[n * i // w: n * (i + 1) // w]
        by_class: dict[str, list[str]] = {}
        for rel in shard:
            folder, _, name = rel.rpartition("/")
            by_class.setdefault(folder, []).append(name)
        jobs = [(str(Path(spec.root) / c), names, True) for c, names in by_class.items()]
        bad = {f"{c}/{name}": why for c, (b, _) in zip(by_class, inspect_folders(jobs, decode=True))
               for name, why in b.items()}
        decoded += len(shard)
        if bad:
            return bad, decoded
    return {}, decoded


def _unattributed(spec: LoaderSpec, reason: str) -> CorruptDataError:
    """DALI failed on a file it does not name: find it by decoding the shard, name it (and record it for
    ``on_corrupt=skip``)."""
    root = Path(spec.root)
    log.warning("data: DALI could not decode an image in %s (%s) and does not say which; decoding this rank's "
                "files with PIL to find it", root, reason)
    bad, decoded = find_undecodable(spec)
    if not bad:
        scan = "" if spec.scan == "off" else f" (data.scan={spec.scan} found nothing either)"
        hint = (", or train with data.scan=quick (the default) so undecodable files are found before training"
                if spec.scan == "off" else "")
        return CorruptDataError(
            f"DALI could not decode an image in {root} ({reason}) and does not say which; a full decode of the "
            f"{decoded} file(s) this rank reads found no undecodable one{scan}; run `spnet check-data "
            f"data.root={root.parent}` to check the whole dataset{hint}")
    by = f"DALI did not name {'it' if len(bad) == 1 else 'them'}, a decode of the {decoded} file(s) this rank reads did"
    if len(bad) == 1:
        ((rel, why),) = bad.items()
        what = f"{root / rel} ({why}; {by})"
    else:
        what = (f"{len(bad)} files in {root} ({by}): "
                f"{'; '.join(f'{root / r} ({w})' for r, w in sorted(bad.items())[:10])}"
                f"{f' and {len(bad) - 10} more' if len(bad) > 10 else ''}")
    if spec.on_corrupt == "skip":
        where = None
        for rel, why in bad.items():
            where = record_bad_file(root, rel, f"DALI (found by decoding): {why}") or where
        return CorruptDataError(
            f"DALI could not decode {what}; now listed as bad in {where}, so the next run leaves "
            f"{'it' if len(bad) == 1 else 'them'} out (data.on_corrupt=skip with data.scan=quick or decode): run the "
            f"same command again, resume=auto continues from the last checkpoint")
    return CorruptDataError(f"DALI could not decode {what}; replace or delete "
                            f"{'the file' if len(bad) == 1 else 'them'}, or set data.on_corrupt=skip")


class DaliLoader:
    """Iterates ``(images, labels)`` (and file names with ``with_source_info``) for one shard.

    Train drops the ragged last batch so every rank runs the same number of steps; val keeps every image
    exactly once (padding duplicates are dropped by the iterator). ``state_dict`` holds the DALI checkpoint
    (reader position + RNG states) for exact mid-epoch resume. ``plan``: the pre-flight plan the spec's file list
    comes from (needed by ``subset``).
    """

    def __init__(self, spec: LoaderSpec, checkpoint: str | None = None, plan: DataPlan | None = None):
        self.spec = spec
        self.plan = plan
        self._build(checkpoint)

    def _build(self, checkpoint: str | None) -> None:
        spec = self.spec
        decode = resolve_decode(spec.decode)
        device_id = torch.cuda.current_device() if decode == "mixed" else None
        self.pipe = _imagenet_pipe(root=spec.root, shard_id=spec.shard_id, num_shards=spec.num_shards,
                                   train=spec.train, crop=spec.crop, val_resize=spec.val_resize, decode=decode,
                                   with_source_info=spec.with_source_info, layout=spec.layout,
                                   batch_size=spec.batch_size, num_threads=spec.num_threads, device_id=device_id,
                                   seed=spec.seed + 7919 * spec.shard_id, checkpoint=checkpoint,
                                   prefetch_queue_depth=2, file_list=spec.file_list, train_aug=spec.train_aug,
                                   pad=spec.pad)
        names = ["data", "label"] + (["source_info"] if spec.with_source_info else [])
        policy = LastBatchPolicy.DROP if spec.train else LastBatchPolicy.PARTIAL
        try:
            self.pipe.build()
            self.iterator = DALIGenericIterator([self.pipe], names, reader_name="Reader", last_batch_policy=policy,
                                                auto_reset=True)
        except RuntimeError as err:
            raise translate_dali_error(err, spec) from None

    def __len__(self) -> int:
        return len(self.iterator)

    @property
    def shard_size(self) -> int:
        return self.iterator.size

    def _batches(self) -> Iterator[Any]:
        it = iter(self.iterator)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            except RuntimeError as err:
                raise translate_dali_error(err, self.spec) from None
            yield batch

    def __iter__(self) -> Iterator[Any]:
        for batch in self._batches():
            b = batch[0]
            images, labels = b["data"], b["label"].reshape(-1).long()
            if self.spec.layout == "HWC":  # N×H×W×C -> an N×C×H×W view: channels_last memory, no transpose
                images = images.permute(0, 3, 1, 2)
            if self.spec.with_source_info:
                yield images, labels, [bytes(t.tolist()).decode().rstrip("\x00") for t in b["source_info"]]
            else:
                yield images, labels

    def state_dict(self) -> dict:
        return {"dali": self.iterator.checkpoints()[0]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (a ``state_dict()``): the pipeline is rebuilt from the DALI checkpoint."""
        self.release()
        self._build(state["dali"])

    def subset(self, files: Sequence[str], split: str) -> DaliLoader:
        """This loader's settings with the evaluation transform over ``files`` of ``split`` (see ``Loader``)."""
        if self.plan is None:
            raise ValueError("subset() needs a loader made by build_loader (from a pre-flight plan)")
        return DaliLoader(replace(self.spec, root=str(self.plan.split(split).dir), train=False,
                                  with_source_info=False, file_list=write_file_list(self.plan, split, files)),
                          plan=self.plan)

    def release(self) -> None:
        self.__dict__.pop("iterator", None)
        self.__dict__.pop("pipe", None)


def write_file_list(plan: DataPlan, split: str, files: Sequence[str]) -> str:
    """A DALI ``file_list`` (``<class>/<file> <label>`` lines, relative to the split folder; label = position in
    the plan's class list, as ``file_root`` would number it) of ``files``, cached in the data's cache folder under
    a name that changes with its content."""
    text = "".join(f"{f} {label}\n" for f, label in zip(files, plan.labels(files)))
    digest = hashlib.sha1(text.encode()).hexdigest()[:16]
    path = cache_dir(plan.root) / f"files-{split}-{digest}.txt"
    if not path.is_file():
        write_atomic(path, text)
    return str(path)


def build(cfg: Any, plan: DataPlan, split: str, train: bool, shard_id: int, num_shards: int, files: Sequence[str],
          state: dict | None = None, with_source_info: bool = False) -> DaliLoader:
    """The DALI loader of one shard of ``files`` (see ``loader.build_loader``)."""
    data = cfg.data
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", num_shards))
    spec = LoaderSpec(root=str(plan.split(split).dir), batch_size=cfg.trainer.batch_size,
                      shard_id=shard_id, num_shards=num_shards, train=train, crop=data.image_size,
                      val_resize=data.val_resize, num_threads=max(1, data.num_threads // max(1, local_world)),
                      seed=cfg.seed + (0 if train else 1), decode=data.decode, with_source_info=with_source_info,
                      # GPU decode: HWC batches, handed out as channels_last NCHW views (saves a transpose)
                      layout="HWC" if resolve_decode(data.decode) == "mixed" else "CHW",
                      file_list=write_file_list(plan, split, files), on_corrupt=str(data.get("on_corrupt", "skip")),
                      scan=str(data.get("scan", "quick")), train_aug=str(data.get("train_aug", "random_resized_crop")),
                      pad=int(data.get("pad", 4)))
    return DaliLoader(spec, checkpoint=state["dali"] if state else None, plan=plan)
