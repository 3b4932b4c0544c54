"""Gated (dynamic-inference) ResNet: stem, stages of gateable blocks, final / multi-stage heads.

Block output: ReLU(shortcut(x) + z·F(x)), z ∈ {0,1} per image from the block's router (computed on the
block input); the shortcut (projection or option-A pad) always runs. Execution modes:
  dense  F(x) computed for every image and multiplied by z (training; straight-through gradients);
  skip   inference only: F runs on the images with z = 1 only and is scatter-added into the shortcut.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn as nn

from .backbone import BLOCKS, init_backbone, make_stage, stem_modules
from .gumbel import gumbel_st
from .heads import MultiStageHeads
from .output import ModelOutput
from .lean_ops import global_avg_pool
from .routers import build_router, init_routers

EXECUTION_MODES = ("dense", "skip")
NUM_OPTIONS = 2  # skip / execute; index 1 = execute
ROUTER_ATTR, AUX_ATTR = "router", "aux"


def check_stages(layers: Any, widths: Any) -> None:
    """One entry per stage in ``model.layers`` and ``model.widths`` (the one home of this check)."""
    if len(layers) != len(widths) or not len(layers):
        raise ValueError(f"model.layers={list(layers)} and model.widths={list(widths)} must have the same length "
                         f"(one entry per stage)")


def stage_tap_indices(n_blocks: int) -> tuple[int, int, int]:
    """First, middle and last block of a stage of ``n_blocks`` (SP-Net's CIFAR L_evo, spec §5.e; the middle is
    block ``n // 2``, e.g. 0/2/4 of ResNet-32's 5 and 0/9/17 of ResNet-110's 18 — the official index is a
    reconstruction)."""
    return 0, n_blocks // 2, n_blocks - 1


class DynamicResNet(nn.Module):
    """ResNet whose residual blocks are executed per image according to learned gates.

    Args:
        block: "bottleneck" | "basic".  layers / widths: blocks and planes per stage.
        stem: "imagenet" | "cifar".  variant: "v1" (stride on the first 1×1) | "v1.5" (stride on the 3×3).
        router: mapping with ``type`` (spnet | aig | none), ``tau``, ``eval_noise`` and router hyper-params.
        multi_stage_heads: add SP-Net alignment layers + per-stage classifiers.
        gate_mask: per-block bools; False = block always executes (gate 1, no router).
    """

    num_options = NUM_OPTIONS  # router outputs per block (subclasses with 3-option blocks override)

    def __init__(self, block: str = "bottleneck", layers: list[int] | tuple[int, ...] = (3, 4, 6, 3),
                 widths: list[int] | tuple[int, ...] = (64, 128, 256, 512), stem: str = "imagenet",
                 stem_width: int = 64, variant: str = "v1.5", num_classes: int = 1000,
                 router: Mapping[str, Any] | None = None, multi_stage_heads: bool = False,
                 gate_mask: list[bool] | None = None, image_size: int = 224, name: str = "resnet") -> None:
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"unknown block {block!r}; valid: {sorted(BLOCKS)}")
        check_stages(layers, widths)
        self.name, self.variant, self.image_size, self.num_classes = name, variant, image_size, num_classes
        for k, m in stem_modules(stem, stem_width).items():
            setattr(self, k, m)
        expansion = BLOCKS[block].expansion
        shortcut = "A" if (block == "basic" and stem == "cifar") else "B"
        c, self.stage_names, self.stage_channels = stem_width, [], []
        for i, (n, w) in enumerate(zip(layers, widths)):
            name_i = f"layer{i + 1}"
            setattr(self, name_i, make_stage(block, c, w, n, 1 if i == 0 else 2, variant, shortcut))
            c = w * expansion
            self.stage_names.append(name_i)
            self.stage_channels.append(c)
        self.num_features = c
        self.fc = nn.Linear(c, num_classes)
        init_backbone(self.modules())

        # gates
        router = dict(router or {"type": "spnet"})
        self.tau = float(router.get("tau", 1.0))
        self.eval_noise = bool(router.get("eval_noise", False))
        self.block_names = [f"{s}.{i}" for s in self.stage_names for i in range(len(getattr(self, s)))]
        n_blocks = len(self.block_names)
        if gate_mask is None:
            gate_mask = [True] * n_blocks
        gate_mask = [bool(g) for g in gate_mask]
        if len(gate_mask) != n_blocks:
            raise ValueError(f"gate_mask has {len(gate_mask)} entries but the model has {n_blocks} blocks")
        for blk, g in zip(self.blocks(), gate_mask):
            if g:
                blk.router = build_router(router, blk.conv1.in_channels)
        self.gated_blocks = [blk.router is not None for blk in self.blocks()]
        init_routers((blk.router for blk in self.blocks()), stem)  # gate init after the backbone's (AIG: spec §2.b)

        self.aux = MultiStageHeads(self.stage_channels, num_classes) if multi_stage_heads else None
        self.multi_stage_heads = bool(multi_stage_heads)
        self.execution = "dense"
        self._forced: tuple[float, torch.Generator | None] | None = None
        self.stage_taps = False  # pooled first/middle/last block outputs per stage (methods/spnet.py, within_stage)

    # ---- structure -------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.block_names)

    def blocks(self) -> Iterator[nn.Module]:
        for s in self.stage_names:
            yield from getattr(self, s)

    def is_backbone_key(self, key: str) -> bool:
        """True for state-dict keys of the plain ResNet (what torchvision checkpoints hold)."""
        return f".{ROUTER_ATTR}." not in key and not key.startswith(f"{AUX_ATTR}.")

    def router_parameters(self) -> Iterator[nn.Parameter]:
        for blk in self.blocks():
            if blk.router is not None:
                yield from blk.router.parameters()

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Auxiliary alignment layers + stage classifiers (not the final ``fc``)."""
        if self.aux is not None:
            yield from self.aux.parameters()

    # ---- execution control -----------------------------------------------------------------------
    def set_execution(self, mode: str) -> None:
        """"dense" (default, any mode) or "skip" (eval mode under torch.no_grad only)."""
        if mode not in EXECUTION_MODES:
            raise ValueError(f"unknown execution mode {mode!r}; valid: {list(EXECUTION_MODES)}")
        self.execution = mode

    def force_gates(self, rate: float | None, generator: torch.Generator | None = None) -> None:
        """Replace every gated block's decision by exactly round(rate·B) random images executing.

        Routers still run (their cost and logits are real); ``None`` restores router decisions.
        """
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise ValueError(f"forced gate rate must be in [0, 1], got {rate}")
        self._forced = None if rate is None else (float(rate), generator)

    def _forced_z(self, b: int, device: torch.device) -> torch.Tensor:
        rate, gen = self._forced
        k = round(rate * b)
        z = torch.zeros(b, device=device)
        if k == b:
            return z.fill_(1.0)
        if k:
            perm = torch.randperm(b, generator=gen, device=gen.device if gen is not None else "cpu")
            z[perm[:k].to(device)] = 1.0
        return z

    # ---- forward ---------------------------------------------------------------------------------
    def _gate(self, blk: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if blk.router is None:
            return None, None
        logits = blk.router(x)
        if logits.shape[-1] != self.num_options:
            raise ValueError(f"router returned {logits.shape[-1]} options; {type(self).__name__} expects "
                             f"{self.num_options}")
        if self._forced is not None:
            return self._forced_z(x.shape[0], x.device), logits
        offset = getattr(blk, "gate_offset", 0.0)  # evaluation-only calibration (engine/gate_calibration.py)
        if offset and not self.training:
            logits = logits + logits.new_tensor([0.0, offset])
        y = gumbel_st(logits, self.tau, hard=True, noise=self.training or self.eval_noise)
        return y[:, 1], logits

    # Hooks for subclasses with other decisions per block (models/rdinet.py: B×3 routes skip/light/full).
    @staticmethod
    def _dense_block(blk: nn.Module, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        return blk(x, z)

    @staticmethod
    def _gate_value(blk: nn.Module, z: torch.Tensor) -> torch.Tensor:
        """What ``ModelOutput.gates`` holds for a decision ``z``: the executed fraction of the block (B)."""
        return z

    @staticmethod
    def _skip_block(blk: nn.Module, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Real skipping (inference): F runs on the executing images only; same values as the dense block.

        Works in place to avoid full-size temporaries (fresh large CPU tensors cost page faults): ``x`` is an
        internal activation (stem or previous block output, so ≥ 0) that the caller drops, and with an identity
        shortcut the skipped images' output ReLU(x + 0) is x itself, left untouched; only the executing rows are
        gathered, run, added to their shortcut rows, rectified and written back. Additions are the dense ones
        (shortcut + branch), so results match the dense mode exactly.
        """
        sc = blk.shortcut(x)  # identity: x itself
        if z is None:  # ungated block
            return blk.branch(x).add_(sc).relu_()
        idx = torch.nonzero(z, as_tuple=True)[0]
        n = idx.numel()
        if n == 0:  # nobody executes: shortcut only
            return sc if sc is x else sc.relu_()
        if n == x.shape[0]:  # everybody executes: no gather/scatter
            return blk.branch(x).add_(sc).relu_()
        xs = x[idx]  # advanced-indexing gather (faster than index_select on CPU)
        r = blk.branch(xs)
        if sc is x:  # identity shortcut: shortcut rows = xs; skipped rows stay as they are
            return x.index_copy_(0, idx, r.add_(xs).relu_())
        return sc.index_add_(0, idx, r).relu_()  # projection / padded shortcut: a fresh tensor, ours to modify

    def forward(self, x: torch.Tensor) -> ModelOutput:
        skip = self.execution == "skip"
        if skip and (self.training or torch.is_grad_enabled()):
            raise RuntimeError("execution mode 'skip' is inference-only: call model.eval() and run under "
                               "torch.no_grad() (or set_execution('dense') for training)")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        b = x.shape[0]
        dt = torch.promote_types(x.dtype, torch.float32)  # gates / gate logits: float32 (float64 for .double())
        gates, gate_logits, pooled, taps = [], [], [], []
        for s in self.stage_names:
            stage = getattr(self, s)
            tap_at = stage_tap_indices(len(stage)) if self.stage_taps else ()
            tapped: dict[int, torch.Tensor] = {}
            for i, blk in enumerate(stage):
                z, logits = self._gate(blk, x)
                x = self._skip_block(blk, x, z) if skip else self._dense_block(blk, x, z)
                if i in tap_at:
                    tapped[i] = global_avg_pool(x)
                gates.append(torch.ones(b, device=x.device, dtype=dt) if z is None
                             else self._gate_value(blk, z).to(dt))
                gate_logits.append(x.new_zeros(b, self.num_options, dtype=dt) if logits is None else logits.to(dt))
            if tap_at:
                taps.append(tuple(tapped[j] for j in tap_at))
            if self.aux is not None or s == self.stage_names[-1]:
                pooled.append(tapped[tap_at[-1]] if tap_at else global_avg_pool(x))
        final = pooled[-1]
        logits = self.fc(final)
        if self.aux is not None:
            feats, aux_logits = self.aux(pooled[:-1])
            head_logits, stage_features = aux_logits + [logits], feats + [final]
        else:
            head_logits, stage_features = [logits], [final]
        return ModelOutput(logits=logits, gates=torch.stack(gates, 1), gate_logits=torch.stack(gate_logits, 1),
                           head_logits=head_logits, stage_features=stage_features, stage_taps=taps)
