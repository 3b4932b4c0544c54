"""The loader seam: what the trainer and the methods see of a data loader, and ``build_loader``.

``build_loader`` dispatches on ``data.backend`` through ``BACKENDS``: a backend is one module in this package
with ``build(cfg, plan, split, train, shard_id, num_shards, files, state=None, with_source_info=False) ->
Loader``. A new backend is that module plus one entry in ``options.BACKENDS``. Loaders read the file lists of the pre-flight plan
(``preflight.DataPlan``); none lists the dataset again.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from .options import BACKENDS

if TYPE_CHECKING:  # pragma: no cover
    from .preflight import DataPlan


@runtime_checkable
class Loader(Protocol):
    """One rank's shard of a split. Iterating yields ``(images, labels)`` batches (plus the file names with
    ``with_source_info``); a training loader drops the ragged last batch, a validation loader reads every file of
    its shard once. A loader restored from ``state_dict()`` continues where that one stopped (mid-epoch)."""

    plan: DataPlan  # the pre-flight plan whose file lists it reads

    @property
    def shard_size(self) -> int:
        """Images in this rank's shard."""

    def __iter__(self) -> Iterator[Any]: ...

    def __len__(self) -> int:
        """Batches per epoch."""

    def state_dict(self) -> dict[str, Any]:
        """The reader position and random state, for an exact mid-epoch resume."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def subset(self, files: Sequence[str], split: str) -> Loader:
        """A loader with this one's settings and the evaluation transform (no shuffle, every file once) over
        ``files`` (``<class>/<file>`` of ``split``; labels as in the full class list), e.g. BoostNet's held-out
        split of the training images."""

    def release(self) -> None:
        """Free the backend's pipelines and workers; the loader is unusable afterwards."""


def build_loader(cfg: Any, plan: DataPlan, train: bool, shard_id: int, num_shards: int,
                 state: dict[str, Any] | None = None, files: Sequence[str] | None = None, *,
                 split: str | None = None, with_source_info: bool = False) -> Loader:
    """The ``data.backend`` loader of shard ``shard_id`` of ``num_shards``: training transform and shuffling with
    ``train``, else the evaluation transform. It reads ``files`` (``<class>/<file>``; default: the plan's usable
    files of ``split``, which defaults to train/val by ``train``), continues from ``state`` (a ``state_dict()``)
    and with ``with_source_info`` also yields each batch's file names."""
    backend = str(cfg.data.get("backend", "dali"))
    if backend not in BACKENDS:
        raise ValueError(f"data.backend={backend!r} is not valid; choose one of {', '.join(BACKENDS)}")
    split = split or ("train" if train else "val")
    chosen = plan.split(split).files if files is None else tuple(files)
    module = importlib.import_module(f".{BACKENDS[backend]}", __package__)
    return module.build(cfg, plan, split, train, shard_id, num_shards, chosen, state=state,
                        with_source_info=with_source_info)
