"""``data.backend=torchvision``: the loader seam over ``torch.utils.data.DataLoader`` and torchvision's decoders.

The same file lists as DALI (the pre-flight plan's, labelled by position in its class list) and the same shards:
rank i of w reads files [n*i//w, n*(i+1)//w) (``preflight.shard_sizes``). Train shuffles its shard every epoch
(seed, epoch, shard) and drops the ragged last batch; val reads its shard in order, every file once, the last
batch possibly smaller. Transforms: ``tv_images`` (training crop: ``data.train_aug``, ``data.pad``).

Decoding: ``data.decode`` resolved as for DALI. ``cpu``: workers read, decode, crop and normalize. ``mixed``
(CUDA): workers only read the bytes; the batch is decoded by nvJPEG and cropped on the GPU (``tv_images.gpu_decode``;
run on the device by tools/gpu_check.sh; the development machines have no GPU).

Resume: batch k of epoch e holds the files at positions [k*B, (k+1)*B) of that epoch's permutation, and each
sample's randomness comes from (seed, epoch, file index), so ``{epoch, position, seed}`` is the whole RNG state: a
loader restored from ``state_dict()`` yields bit-identical batches to the uninterrupted one, with any number of
workers.
"""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset

from . import tv_images as T
from .index import CorruptDataError
from .options import resolve_decode

if TYPE_CHECKING:  # pragma: no cover
    from .preflight import DataPlan

log = logging.getLogger("spnet.data")
BACKEND = "torchvision"


@dataclass(frozen=True)
class TvSpec:
    """One shard's loader settings (``files``: the whole list that is sharded, ``<class>/<file>``)."""

    root: str                    # the split folder
    files: tuple[str, ...]
    labels: tuple[int, ...]
    batch_size: int
    shard_id: int
    num_shards: int
    train: bool
    crop: int
    val_resize: int
    seed: int = 0
    workers: int = 2
    decode: str = "cpu"          # resolved: cpu | mixed
    with_source_info: bool = False
    on_corrupt: str = "skip"
    train_aug: str = T.RRC       # training crop: random_resized_crop | pad_crop (``tv_images``)
    pad: int = 4                 # pad_crop's zero padding

    @property
    def shard(self) -> range:
        """Indices into ``files`` of this shard (DALI's rule)."""
        n, i, w = len(self.files), self.shard_id, self.num_shards
        return range(n * i // w, n * (i + 1) // w)


class _Images(Dataset):
    """Sample ``(file index, epoch)`` -> (image, label, index): the transformed float32 CHW image on CPU decode,
    the file's bytes on GPU decode."""

    def __init__(self, spec: TvSpec):
        self.spec = spec

    def __len__(self) -> int:
        return len(self.spec.files)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        s = self.spec
        index, epoch = key
        rel = s.files[index]
        if s.decode == "mixed":
            try:
                return T.read_bytes(os.path.join(s.root, rel)), s.labels[index], index
            except OSError as err:
                raise T.corrupt(s.root, rel, err, s.on_corrupt) from None
        img = T.load_rgb(s.root, rel, s.on_corrupt)
        img = (T.train_view(img, s.crop, T.sample_rng(s.seed, epoch, index), s.train_aug, s.pad) if s.train
               else T.val_view(img, s.crop, s.val_resize))
        return T.normalize(img), s.labels[index], index


def _collate(items: list[tuple[torch.Tensor, int, int]]) -> tuple[Any, torch.Tensor, list[int]]:
    images, labels, index = zip(*items)
    same = len({tuple(x.shape) for x in images}) == 1 and images[0].dtype == torch.float32
    return (torch.stack(images) if same else list(images)), torch.tensor(labels, dtype=torch.int64), list(index)


class _Batches:
    """The batch sampler: the keys of batches ``start..`` of ``epoch`` (set by the loader before each pass)."""

    def __init__(self, spec: TvSpec):
        self.spec, self.epoch, self.start = spec, 0, 0

    def order(self, epoch: int) -> list[int]:
        s = self.spec
        order = list(s.shard)
        if s.train:
            random.Random(f"tv-shuffle:{s.seed}:{epoch}:{s.shard_id}:{s.num_shards}").shuffle(order)
        return order

    def count(self) -> int:
        n, b = len(self.spec.shard), self.spec.batch_size
        return n // b if self.spec.train else -(-n // b)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order, b = self.order(self.epoch), self.spec.batch_size
        for k in range(self.start, self.count()):
            yield [(i, self.epoch) for i in order[k * b:(k + 1) * b]]

    def __len__(self) -> int:
        return max(0, self.count() - self.start)


class TorchvisionLoader:
    """One shard of a split (see the module docstring and ``loader.Loader``). ``epoch`` / ``position``: the
    current epoch and the batches of it handed out; a training pass continues from ``position`` (a finished
    epoch moves on to the next), a validation pass always reads the whole shard."""

    def __init__(self, spec: TvSpec, plan: DataPlan | None = None, state: dict[str, Any] | None = None):
        self.spec, self.plan = spec, plan
        self.epoch = self.position = 0
        self._sampler = _Batches(spec)
        self._loader: DataLoader | None = None
        if state is not None:
            self.load_state_dict(state)

    @property
    def shard_size(self) -> int:
        return len(self.spec.shard)

    def __len__(self) -> int:
        return self._sampler.count()

    def _data(self) -> DataLoader:
        if self._loader is None:
            s, workers = self.spec, self.spec.workers
            # a private generator: the DataLoader draws its worker base seed from it, never from the global
            # torch RNG, whose stream (Gumbel noise, dropout) a resumed run must see unchanged
            self._loader = DataLoader(_Images(s), batch_sampler=self._sampler, num_workers=workers,
                                      collate_fn=_collate, persistent_workers=workers > 0,
                                      pin_memory=s.decode == "cpu" and torch.cuda.is_available(),
                                      generator=torch.Generator().manual_seed(s.seed))
        return self._loader

    def __iter__(self) -> Iterator[Any]:
        if not self.spec.train:
            self.epoch, self.position = 0, 0
        elif self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        self._sampler.epoch, self._sampler.start = self.epoch, self.position
        batches = iter(self._data())
        while True:
            try:
                images, labels, index = next(batches)
            except StopIteration:
                return
            except CorruptDataError as err:  # re-raised from a worker with its traceback: keep the message
                raise CorruptDataError(str(err).rsplit("CorruptDataError: ", 1)[-1].strip()) from None
            if self.spec.decode == "mixed":
                images, labels = self._on_gpu(images, index), labels.cuda(non_blocking=True)
            self.position += 1
            if self.spec.with_source_info:
                yield images, labels, [self.spec.files[i] for i in index]
            else:
                yield images, labels

    def _on_gpu(self, datas: list[torch.Tensor], index: list[int]) -> torch.Tensor:
        """Decode a batch of file bytes on the GPU and apply the transform there (run by tools/gpu_check.sh)."""
        s = self.spec
        imgs = T.gpu_decode(datas, s.root, [s.files[i] for i in index], s.on_corrupt)
        if s.train:
            rngs = [T.sample_rng(s.seed, self.epoch, i) for i in index]
            return T.normalize(T.train_views_gpu(imgs, s.crop, rngs, s.train_aug, s.pad))
        return T.normalize(torch.stack([T.val_view(img, s.crop, s.val_resize) for img in imgs]))

    def state_dict(self) -> dict[str, Any]:
        """``{backend, epoch, position, seed, shard_size, batch_size}``: position = batches of ``epoch`` handed
        out; (seed, epoch) fix the order and every sample's randomness, so this is the whole RNG state."""
        s = self.spec
        return {"backend": BACKEND, "epoch": self.epoch, "position": self.position, "seed": s.seed,
                "shard_size": self.shard_size, "batch_size": s.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (a ``state_dict()``): the rest of its epoch, then the following epochs."""
        if state.get("backend") != BACKEND:
            raise ValueError("this checkpoint's data-loader position was written by another data.backend "
                             f"({'dali' if 'dali' in state else state.get('backend')}); resume with that backend, "
                             "or start a new run (checkpoint.dir) with data.backend=torchvision")
        if (state["shard_size"], state["batch_size"]) != (self.shard_size, self.spec.batch_size):
            log.warning("data: the shard (%d images, batch %d) differs from the checkpoint's (%d, %d); epoch %d "
                        "continues at batch %d in a new order", self.shard_size, self.spec.batch_size,
                        state["shard_size"], state["batch_size"], state["epoch"], state["position"])
        if state["seed"] != self.spec.seed:
            self._rebuild(replace(self.spec, seed=int(state["seed"])))
        self.epoch, self.position = int(state["epoch"]), min(int(state["position"]), len(self))

    def _rebuild(self, spec: TvSpec) -> None:
        self.release()
        self.spec, self._sampler = spec, _Batches(spec)

    def subset(self, files: Sequence[str], split: str) -> TorchvisionLoader:
        """This loader's settings with the evaluation transform over ``files`` of ``split`` (see ``Loader``)."""
        if self.plan is None:
            raise ValueError("subset() needs a loader made by build_loader (from a pre-flight plan)")
        return TorchvisionLoader(replace(self.spec, root=str(self.plan.split(split).dir), files=tuple(files),
                                         labels=self.plan.labels(files), train=False, with_source_info=False),
                                 plan=self.plan)

    def release(self) -> None:
        """Stop the DataLoader's workers (also at garbage collection); the next pass would start new ones."""
        loader, self._loader = self._loader, None
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()


def build(cfg: Any, plan: DataPlan, split: str, train: bool, shard_id: int, num_shards: int, files: Sequence[str],
          state: dict[str, Any] | None = None, with_source_info: bool = False) -> TorchvisionLoader:
    """The torchvision loader of one shard of ``files`` (see ``loader.build_loader``); DataLoader workers:
    ``data.num_threads`` divided over the node's ranks."""
    data = cfg.data
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", num_shards))
    spec = TvSpec(root=str(plan.split(split).dir), files=tuple(files), labels=plan.labels(files),
                  batch_size=int(cfg.trainer.batch_size), shard_id=shard_id, num_shards=num_shards, train=train,
                  crop=int(data.image_size), val_resize=int(data.val_resize), seed=int(cfg.seed),
                  workers=max(1, int(data.num_threads) // max(1, local_world)),
                  decode=resolve_decode(str(data.decode)), with_source_info=with_source_info,
                  on_corrupt=str(data.get("on_corrupt", "skip")),
                  train_aug=str(data.get("train_aug", T.RRC)), pad=int(data.get("pad", 4)))
    return TorchvisionLoader(spec, plan=plan, state=state)
