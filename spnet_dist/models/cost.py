"""Compute accounting — the one place where MACs are counted (spec 1.3, recommended accounting).

cost(x) = fixed + Σ_b z_b(x)·blocks[b] (+ heads), with
  fixed  = stem + projection shortcuts + routers + final pool/fc (always executed),
  blocks = residual-branch MACs per block (ungated blocks too; their gate is always 1),
  heads  = SP-Net auxiliary alignment layers + stage classifiers (training-time only, counted separately).
Per-layer MACs come from forward hooks on Conv2d/Linear during one dense forward with all gates open:
Conv2d k_h·k_w·C_in/groups·C_out·H_out·W_out, Linear C_in·C_out (biases, BN, ReLU, pooling not counted).

Finer views of the same count (for peer methods):
  block_layers  per block, MACs of each residual-branch layer (RDI-Net light path = conv1 + conv3 of a bottleneck,
                conv1 of a basic block: ``option_fractions``);
  block_fixed   per block, the always-executed part (projection shortcut + router);
  head_macs     per auxiliary head k (alignment + classifier of stage k);
  ``exit_macs`` cumulative MACs per image up to each stage's exit, earlier exits' heads included (BoostNet).

Two conventions are reported side by side (spec §1.3 "log both v1 and v1.5 figures; state which one is used"):
  ``gflops_paper``   2 × MACs counted in the papers' ResNet v1 layout (stride on the first 1×1; ResNet-50 at full
                     execution 7.716, the tables' 7.72), with the same per-image gate decisions;
  ``gflops_trained`` 2 × MACs of the trained network's own layout (torchvision v1.5: 8.178 for ResNet-50), = 2 ×
                     ``macs_per_image``. Basic-block (CIFAR) ResNets have one layout: both agree.
``CostTable.paper`` holds the v1 table (None when the own layout already is the papers').
"""
from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .backbone import Bottleneck


@dataclass
class CostTable:
    fixed: float                 # MACs per image that always run (incl. routers)
    blocks: list[float]          # residual-branch MACs per block, length L
    heads: float                 # auxiliary alignment + stage classifiers
    convention: str
    backbone_full: float = 0.0   # plain ResNet figure: stem + projections + all branches + fc (no routers/heads)
    routers: float = 0.0         # all routers together (part of ``fixed``)
    breakdown: dict[str, float] = field(default_factory=dict)  # stem / projections / routers / classifier
    block_names: list[str] = field(default_factory=list)
    gated: list[bool] = field(default_factory=list)
    image_size: tuple[int, int] = (0, 0)
    variant: str = ""
    block_layers: list[dict[str, float]] = field(default_factory=list)  # per block: {layer name in block: MACs}
    block_fixed: list[float] = field(default_factory=list)  # per block: projection + router (always run)
    head_macs: list[float] = field(default_factory=list)    # per auxiliary head (stage k < last): align + fc
    layout: str = ""             # "ResNet v1.5 layout" | "ResNet v1 layout" | "basic blocks"
    paper: "CostTable | None" = None  # the same network counted in the papers' v1 layout (None: same as this)

    def paper_view(self) -> "CostTable":
        """The table in the papers' convention (ResNet v1 layout, spec §1.3): ``paper`` or this table."""
        return self.paper if self.paper is not None else self

    def full(self, include_heads: bool = False) -> float:
        """MACs per image with every block executed."""
        return self.fixed + sum(self.blocks) + (self.heads if include_heads else 0.0)

    def expected(self, rate: float, include_heads: bool = False) -> float:
        """MACs per image when every gated block executes with probability ``rate`` (ungated always)."""
        blocks = sum(b * (rate if g else 1.0) for b, g in zip(self.blocks, self.gated))
        return self.fixed + blocks + (self.heads if include_heads else 0.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PAPER_LAYOUT = "v1"  # spec §1.3: the papers' 7.72 GFLOPs for ResNet-50 = 2 x MACs of ResNet v1


def cost_convention(table: CostTable) -> str:
    """One line naming both conventions (MLflow param ``cost.convention``, JSON key ``cost_convention``)."""
    return (f"gflops_paper = 2 x MACs in the papers' ResNet {PAPER_LAYOUT} layout (stride on the first 1x1; "
            f"spec 1.3); gflops_trained = 2 x macs_per_image in the trained network's {table.layout}; "
            f"Conv2d+Linear multiply-accumulates from the hard gate decisions per image")


def cost_metrics(table: CostTable, macs: float, macs_paper: float) -> dict[str, Any]:
    """Evaluation keys for mean per-image MACs in the trained layout (``macs``) and in the papers' (``macs_paper``)."""
    return {"macs_per_image": macs, "gflops_trained": 2 * macs / 1e9, "macs_paper": macs_paper,
            "gflops_paper": 2 * macs_paper / 1e9, "cost_convention": cost_convention(table)}


def cost_params(table: CostTable) -> dict[str, str]:
    """MLflow params naming the convention and the full-execution figures of both layouts."""
    paper = table.paper_view()
    return {"cost.convention": cost_convention(table), "cost.paper_layout": PAPER_LAYOUT,
            "cost.trained_layout": table.layout,
            "cost.full_gflops_paper": f"{2 * paper.full() / 1e9:.4f}",
            "cost.full_gflops_trained": f"{2 * table.full() / 1e9:.4f}"}


def full_macs(table: CostTable, include_heads: bool = False) -> float:
    return table.full(include_heads)


def macs_per_image(table: CostTable, gates: torch.Tensor, include_heads: bool = False) -> torch.Tensor:
    """Per-image MACs (float64, shape B) from hard gate decisions ``gates`` (B×L); differentiable in gates."""
    if gates.shape[-1] != len(table.blocks):
        raise ValueError(f"gates have {gates.shape[-1]} blocks, cost table has {len(table.blocks)}")
    blocks = torch.tensor(table.blocks, dtype=torch.float64, device=gates.device)
    extra = table.fixed + (table.heads if include_heads else 0.0)
    return gates.to(torch.float64) @ blocks + extra


def _subset_fractions(table: CostTable, b: int) -> list[tuple[float, float]]:
    """(fraction of block b's branch MACs in this layout, the same layers' fraction in the papers') per layer subset."""
    import itertools

    paper = table.paper_view()
    own, ref = table.block_layers[b], paper.block_layers[b]
    names = sorted(own)
    out = []
    for k in range(1, len(names)):
        for sub in itertools.combinations(names, k):
            out.append((sum(own[n] for n in sub) / table.blocks[b], sum(ref[n] for n in sub) / paper.blocks[b]))
    return out


def paper_gates(table: CostTable, gates: torch.Tensor) -> torch.Tensor:
    """Gate values (executed fraction of each branch's MACs) re-expressed for ``table.paper_view()``.

    0 and 1 stay; a partial value (RDI-Net's light path: ``option_fractions``) is matched to the subset of the block's
    layers with that fraction in this layout and replaced by the same layers' fraction in the v1 layout (a stride
    moved from the 3×3 to the first 1×1 changes how much of the branch a 1×1 path costs).
    """
    if table.paper is None:
        return gates
    g = gates.to(torch.float64)
    partial = (g > 1e-6) & (g < 1 - 1e-6)
    if not bool(partial.any()):
        return g
    out = g.clone()
    for b in torch.nonzero(partial.any(0)).flatten().tolist():
        pairs = _subset_fractions(table, b)
        own = torch.tensor([f for f, _ in pairs], dtype=torch.float64, device=g.device)
        ref = torch.tensor([f for _, f in pairs], dtype=torch.float64, device=g.device)
        col = g[:, b]
        nearest = (col[:, None] - own[None, :]).abs().argmin(1)
        close = (col - own[nearest]).abs() < 1e-3
        out[:, b] = torch.where(partial[:, b] & close, ref[nearest], col)  # unknown partial values stay as given
    return out


def option_fractions(table: CostTable, layers: Sequence[Sequence[str]]) -> list[float]:
    """Per block, the MACs of the named residual-branch layers as a fraction of the block's branch MACs.

    ``layers[b]`` names layers inside block b (e.g. ``("conv1", "conv3")``); used for RDI-Net's light path so
    that a gate value equal to this fraction makes ``macs_per_image`` count the light path exactly.
    """
    if len(layers) != len(table.blocks):
        raise ValueError(f"{len(layers)} layer lists for {len(table.blocks)} blocks")
    out = []
    for b, names in enumerate(layers):
        missing = [n for n in names if n not in table.block_layers[b]]
        if missing:
            raise ValueError(f"block {table.block_names[b]} has no layer(s) {missing}; "
                             f"known: {sorted(table.block_layers[b])}")
        out.append(sum(table.block_layers[b][n] for n in names) / table.blocks[b] if table.blocks[b] else 0.0)
    return out


def exit_macs(table: CostTable) -> list[float]:
    """Cumulative MACs per image of an early-exit network with one exit per stage (BoostNet), full blocks.

    Exit k (0-based) = stem + every block of stages ≤ k (branch + projection + router) + heads 0..k, where the
    last stage's head is the final classifier. So ``exit_macs(t)[-1] == t.full(include_heads=True)``: an image
    that reaches the last exit has paid for every earlier exit's head (spec §6.f).
    """
    stages: list[str] = []
    for name in table.block_names:
        s = name.split(".")[0]
        if s not in stages:
            stages.append(s)
    n_exits = len(stages)
    if len(table.head_macs) != n_exits - 1:
        raise ValueError(f"cost table has {len(table.head_macs)} auxiliary heads; an exit per stage needs "
                         f"{n_exits - 1} (build the model with multi_stage_heads)")
    per_stage = [0.0] * n_exits
    for name, branch, fixed in zip(table.block_names, table.blocks, table.block_fixed):
        per_stage[stages.index(name.split(".")[0])] += branch + fixed
    heads = list(table.head_macs) + [table.breakdown.get("classifier", 0.0)]
    out, acc = [], table.breakdown.get("stem", 0.0)
    for k in range(n_exits):
        acc += per_stage[k] + heads[k]
        out.append(acc)
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    while not hasattr(model, "block_names") and hasattr(model, "module"):  # DDP / DeepSpeed wrappers
        model = model.module
    return model


@contextlib.contextmanager
def _as_variant(model: nn.Module, variant: str | None) -> Iterator[str]:
    """Temporarily move bottleneck strides to the ``variant`` layout (v1: first 1×1, v1.5: the 3×3)."""
    own = getattr(model, "variant", "v1.5")
    saved = []
    if variant is not None and variant != own:
        for blk in model.blocks():
            if isinstance(blk, Bottleneck):
                saved.append((blk, blk.conv1.stride, blk.conv2.stride))
                s = max(blk.conv1.stride[0], blk.conv2.stride[0])
                blk.conv1.stride, blk.conv2.stride = ((s, s), (1, 1)) if variant == "v1" else ((1, 1), (s, s))
    try:
        yield variant or own
    finally:
        for blk, s1, s2 in saved:
            blk.conv1.stride, blk.conv2.stride = s1, s2


def _category(name: str, block_names: list[str]) -> tuple[str, int]:
    for i, b in enumerate(block_names):
        if name.startswith(b + "."):
            rest = name[len(b) + 1:]
            if rest.startswith("router."):
                return "routers", i
            if rest.startswith("downsample."):
                return "projections", i
            return "block", i
    if name.startswith("aux."):
        return "heads", -1
    if name == "fc":
        return "classifier", -1
    return "stem", -1


def _layer_macs(mod: nn.Module, out: torch.Tensor) -> float:
    b = out.shape[0]
    if isinstance(mod, nn.Conv2d):
        kh, kw = mod.kernel_size
        return kh * kw * (mod.in_channels // mod.groups) * out[0].numel()
    return mod.in_features * out.numel() / b  # Linear: C_in·C_out per row


def cost_table(model: nn.Module, image_size: int | tuple[int, int] | None = None,
               variant: str | None = None, paper: bool = True) -> CostTable:
    """Per-image MAC table of a DynamicResNet at ``image_size`` (default: the model's ``image_size``).

    ``variant`` ("v1" | "v1.5") counts a bottleneck model in the other stride layout without changing it
    (the papers' ResNet-50 baseline 7.72 GFLOPs = 2 × v1 MACs; the trained torchvision layout is v1.5).
    ``paper``: also count the papers' v1 layout into ``.paper`` when this table's layout differs from it.
    """
    m = _unwrap(model)
    size = image_size if image_size is not None else m.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    names = list(m.block_names)
    acc = {"stem": 0.0, "projections": 0.0, "routers": 0.0, "classifier": 0.0, "heads": 0.0}
    blocks = [0.0] * len(names)
    block_layers: list[dict[str, float]] = [{} for _ in names]
    block_fixed = [0.0] * len(names)
    n_heads = len(getattr(getattr(m, "aux", None), "fc", None) or [])
    head_macs = [0.0] * n_heads
    hooks = []
    for name, mod in m.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            cat, i = _category(name, names)
            rest = name[len(names[i]) + 1:] if i >= 0 else ""
            head = re.match(r"aux\.\w+\.(\d+)$", name) if cat == "heads" else None
            k = int(head.group(1)) if head else -1

            def hook(mod: nn.Module, inp: Any, out: torch.Tensor, cat: str = cat, i: int = i, rest: str = rest,
                     k: int = k) -> None:
                macs = _layer_macs(mod, out)
                if cat == "block":
                    blocks[i] += macs
                    block_layers[i][rest] = block_layers[i].get(rest, 0.0) + macs
                else:
                    acc[cat] += macs
                    if i >= 0:
                        block_fixed[i] += macs
                    if 0 <= k < n_heads:
                        head_macs[k] += macs
            hooks.append(mod.register_forward_hook(hook))
    state = (m.training, m.execution, m._forced)
    p = next(m.parameters())
    try:
        m.eval()
        m.set_execution("dense")
        m.force_gates(1.0)
        with _as_variant(m, variant) as used, torch.no_grad():
            m(torch.zeros(1, 3, h, w, device=p.device, dtype=p.dtype))
    finally:
        for hk in hooks:
            hk.remove()
        m.train(state[0])
        m.execution, m._forced = state[1], state[2]
    fixed = acc["stem"] + acc["projections"] + acc["routers"] + acc["classifier"]
    bottleneck = any(isinstance(b, Bottleneck) for b in m.blocks())
    layout = f"ResNet {used} layout" if bottleneck else "basic blocks"
    convention = (f"MACs = multiply-accumulates of Conv2d+Linear layers (no BN/ReLU/pool/bias), {layout}, "
                  f"{h}x{w} input; GFLOPs = 2 x MACs (the papers' tables: ResNet v1 layout, spec 1.3)")
    table = CostTable(fixed=fixed, blocks=blocks, heads=acc["heads"], convention=convention,
                      backbone_full=acc["stem"] + acc["projections"] + acc["classifier"] + sum(blocks),
                      routers=acc["routers"], breakdown={k: v for k, v in acc.items() if k != "heads"},
                      block_names=names, gated=list(m.gated_blocks), image_size=(h, w), variant=used,
                      block_layers=block_layers, block_fixed=block_fixed, head_macs=head_macs, layout=layout)
    if paper and bottleneck and used != PAPER_LAYOUT:
        table.paper = cost_table(m, (h, w), variant=PAPER_LAYOUT, paper=False)
    return table
