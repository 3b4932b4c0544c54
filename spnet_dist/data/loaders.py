"""Build the train/val loaders for a rank from the config."""
from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from .check import check_classes_agree, check_layout, usable_files
from .dali import DaliLoader, LoaderSpec, resolve_decode

__all__ = ["build_loader", "check_layout"]


def build_loader(cfg: Any, train: bool, shard_id: int, num_shards: int, checkpoint: str | None = None,
                 with_source_info: bool = False, exclude: Collection[str] = ()) -> DaliLoader:
    """The DALI loader of one shard; ``exclude`` lists ``<class>/<file>`` paths to leave out (labels unchanged)."""
    data = cfg.data
    check_layout(data.root)
    check_classes_agree(data.root)  # a val split missing a class would shift every later label
    split = Path(data.root) / ("train" if train else "val")
    on_corrupt = str(data.get("on_corrupt", "skip"))
    # every rank computes the same list from the same cached index, so shards stay consistent
    listing, _ = usable_files(split, str(data.get("scan", "quick")), on_corrupt, exclude=exclude)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", num_shards))
    spec = LoaderSpec(root=str(split), batch_size=cfg.trainer.batch_size,
                      shard_id=shard_id, num_shards=num_shards, train=train, crop=data.image_size,
                      val_resize=data.val_resize, num_threads=max(1, data.num_threads // max(1, local_world)),
                      seed=cfg.seed + (0 if train else 1), decode=data.decode, with_source_info=with_source_info,
                      # GPU decode: HWC batches, handed out as channels_last NCHW views (saves a transpose)
                      layout="HWC" if resolve_decode(data.decode) == "mixed" else "CHW",
                      file_list=listing, on_corrupt=on_corrupt)
    return DaliLoader(spec, checkpoint=checkpoint)
