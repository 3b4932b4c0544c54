"""RDI-Net model (ICCV 2021, spec ``methods.md`` §4.b): relational routers and 3-option blocks on DynamicResNet.

Per block one route r ∈ {skip, light, full} (index 0 / 1 / 2) from a ``RelationalRouter`` (models/routers.py):

* bottleneck: a = ReLU(BN1(conv1(x))) (max-pooled 3×3/2 to the output resolution when conv1 did not stride);
  light u₁ = BN3(conv3(a)) (the *same* conv3/BN3 as the full branch), full u₂ = BN3(conv3(ReLU(BN2(conv2(a)))));
  out = ReLU(shortcut(x) + r₁·u₁ + r₂·u₂).
* basic block (CIFAR): a = ReLU(BN1(conv1(x))); out = r₀·ReLU(sc) + r₁·ReLU(sc + a) + r₂·ReLU(sc + BN2(conv2(a))).

Routes are hard Gumbel straight-through one-hots (τ fixed) in training, argmax of the logits at evaluation
(``eval_noise`` reproduces the official noisy evaluation). The shortcut (projection) always runs.

**Gate representation.** ``ModelOutput.gates[:, b]`` holds the *executed fraction of block b's branch MACs*:
0 (skip), ρ_b (light) or 1 (full), with ρ_b = MACs(light layers) / MACs(branch) from ``cost.option_fractions``
(ResNet-50 non-first bottleneck: (conv1 + conv3) / (conv1 + conv2 + conv3) = 0.47; basic block: 0.5). So
``cost.macs_per_image(table, out.gates)`` counts skip / light / full exactly from the hard decisions, and the
batch mean of ``gates[:, b]`` is RDI-Net's relaxed execution v_b of the cost loss (Eq. 15; straight-through
gradients reach the router through the one-hot). ``gate_logits`` is B×L×3; the chosen option is recovered with
``route_of(gates)``.

**Binary option** (``router.options: 2``, the paper's §3.2): u_n ∈ {skip, execute} (index 0 / 1) from a 2-way
relational router; with ``router.relaxation: soft`` (the default for 2 options) training uses the relaxation of
Eq. 8–9: v_n = softmax((ℓ_n + G)/τ)[1] and x_{n+1} = v_n·F_n(x_n) + (1 − v_n)·x_n, with F_n(x) = ReLU(sc(x) +
branch(x)) the executed block and x_n → ReLU(sc(x)) the skipped one (= x_n for an identity shortcut; the projection
of a stage's first block always runs). Evaluation takes hard argmax decisions. ``gates`` hold v_n (0 / 1 at
evaluation), ``gate_logits`` are B×L×2. ``relaxation: hard_st`` gives hard straight-through decisions instead
(the mix is then the same inside or outside the ReLU). Three options with ``soft`` (the official code's training:
soft Gumbel-softmax mixing) are not supported: the training option counts assume hard routes.

Uniform Sampling Warm-up (Eq. 14): with ``uniform_routes = True`` and the model in training mode each image
draws an option uniformly per block (torch's global RNG, so the trainer's RNG checkpointing covers it) and
routers are not run (their gate_logits are zeros). ``force_gates(rate)`` forces exactly round(rate·B) images per
block onto the *full* path, the others skip (routers still run).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbone import BasicBlock, Bottleneck
from .cost import cost_table, option_fractions
from .dynamic_resnet import DynamicResNet
from .gumbel import gumbel_st
from .output import ModelOutput

SKIP, LIGHT, FULL = 0, 1, 2
NUM_ROUTES = 3
EXECUTE = 1  # binary option: index 1 = execute (Eq. 8's [1])
RELAXATIONS = ("hard_st", "soft")


def router_mode(router: dict[str, Any]) -> tuple[int, str]:
    """(options, relaxation) of the method's ``router`` mapping: 3 (skip/light/full, default) or 2 (skip/execute);
    ``relaxation`` null = hard_st for 3 options, soft (Eq. 8–9) for 2."""
    options = int(router.get("options") or NUM_ROUTES)
    if options not in (2, NUM_ROUTES):
        raise ValueError(f"RDI-Net routers have 3 options (skip/light/full) or 2 (skip/execute), got {options}")
    relax = router.get("relaxation") or ("hard_st" if options == NUM_ROUTES else "soft")
    if relax not in RELAXATIONS:
        raise ValueError(f"router.relaxation must be one of {list(RELAXATIONS)} (or null), got {relax!r}")
    if options == NUM_ROUTES and relax == "soft":
        raise ValueError("router.relaxation=soft needs router.options=2 (the paper's Eq. 8-9); the 3-option blocks "
                         "train with hard straight-through routes")
    return options, relax


def light_layers(blk: nn.Module) -> tuple[str, ...]:
    """The residual-branch layers the light path runs (for the MAC fraction ρ)."""
    if isinstance(blk, Bottleneck):
        return ("conv1", "conv3")
    if isinstance(blk, BasicBlock):
        return ("conv1",)
    raise TypeError(f"RDI-Net 3-option blocks support bottleneck and basic blocks, not {type(blk).__name__}")


def _bottleneck_a(blk: Bottleneck, x: torch.Tensor) -> torch.Tensor:
    return blk.relu(blk.bn1(blk.conv1(x)))


def _bottleneck_light(blk: Bottleneck, a: torch.Tensor) -> torch.Tensor:
    s = blk.conv2.stride[0]
    if s > 1:  # v1.5: conv1 ran at the input resolution; v1 strides conv1 and conv2.stride is 1
        a = F.max_pool2d(a, 3, s, 1)
    return blk.bn3(blk.conv3(a))


def _bottleneck_full(blk: Bottleneck, a: torch.Tensor) -> torch.Tensor:
    return blk.bn3(blk.conv3(blk.relu(blk.bn2(blk.conv2(a)))))


def _basic_a(blk: BasicBlock, x: torch.Tensor) -> torch.Tensor:
    return blk.relu(blk.bn1(blk.conv1(x)))


def route_of(gates: torch.Tensor) -> torch.Tensor:
    """Chosen option per image and block (B×L, long: 0 skip, 1 light, 2 full) from hard gate values 0 / ρ_b / 1
    (0 < ρ_b < 1 for every block, so the three values are distinct)."""
    route = torch.full(gates.shape, LIGHT, dtype=torch.long, device=gates.device)
    route[gates <= 1e-6] = SKIP
    route[gates >= 1.0 - 1e-6] = FULL
    return route


class RDIResNet(DynamicResNet):
    """DynamicResNet with relational routers and skip / light / full blocks (see the module docstring).

    Extra constructor keys come from the method config ``router`` mapping (type ``relational``: d, r, gamma,
    dropout, bias_init; tau, eval_noise). ``light_fractions`` (ρ_b) is computed once from ``cost.cost_table`` at
    ``image_size`` (the ratio does not depend on the resolution for even sizes).
    """

    num_options = NUM_ROUTES  # 2 with router.options: 2 (set per instance)

    def __init__(self, *args: Any, router: dict[str, Any] | None = None, **kwargs: Any) -> None:
        router = {"type": "relational", **dict(router or {})}
        options, self.relaxation = router_mode(router)
        router["options"] = options
        super().__init__(*args, router=router, **kwargs)
        self.num_options = options
        self.uniform_routes = False
        self._context: list[torch.Tensor] | None = None
        layers = [light_layers(blk) for blk in self.blocks()]
        for blk in self.blocks():
            blk.light_fraction = 0.0  # placeholder for the counting forward (it forces full / skip routes only)
        self.light_fractions = option_fractions(cost_table(self), layers)
        for blk, rho in zip(self.blocks(), self.light_fractions):
            blk.light_fraction = float(rho)  # plain attribute: not in the state dict

    # ---- decisions -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> ModelOutput:
        self._context = []  # router features s_1..s_{n-1} of this forward (relational context)
        try:
            return super().forward(x)
        finally:
            self._context = None

    def _gate(self, blk: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if blk.router is None:
            return None, None
        b, k = x.shape[0], self.num_options
        if self.uniform_routes and self.training and self._forced is None:  # USW: routers not used
            idx = torch.randint(0, k, (b,), device=x.device)
            return F.one_hot(idx, k).float(), x.new_zeros(b, k)
        logits = blk.router(x, self._context)
        if logits.shape[-1] != k:
            raise ValueError(f"router returned {logits.shape[-1]} options; these RDI-Net blocks have {k}")
        if self._forced is not None:
            z = self._forced_z(b, x.device)
            return torch.stack([1.0 - z, z] if k == 2 else [1.0 - z, torch.zeros_like(z), z], 1), logits
        hard = self.relaxation == "hard_st" or not self.training  # soft: Eq. 8 in training, argmax at evaluation
        return gumbel_st(logits, self.tau, hard=hard, noise=self.training or self.eval_noise), logits

    @staticmethod
    def _gate_value(blk: nn.Module, z: torch.Tensor) -> torch.Tensor:
        if z.shape[1] == 2:  # binary: v_n
            return z[:, EXECUTE]
        return z[:, LIGHT] * blk.light_fraction + z[:, FULL]

    # ---- execution -------------------------------------------------------------------------------
    @staticmethod
    def _dense_block(blk: nn.Module, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Every image through every needed path, mixed by the route weights (training; straight-through)."""
        if z is None:
            return blk(x)
        sc = blk.shortcut(x)
        if z.shape[1] == 2:  # binary, Eq. 9: v·F(x) + (1 − v)·x, mixed after the block's ReLU
            v = z[:, EXECUTE].to(sc.dtype).view(-1, 1, 1, 1)
            return v * F.relu(sc + blk.branch(x)) + (1.0 - v) * F.relu(sc)
        # With autograd on, every path runs even if no image takes it: the straight-through gradient needs the
        # branch outputs, and every rank must produce gradients for the same parameters (DDP / DeepSpeed buckets;
        # USW routes carry no gradient but differ per rank). Without autograd, unused paths are skipped.
        grad = torch.is_grad_enabled()
        need_light, need_full = grad or bool(z[:, LIGHT].any()), grad or bool(z[:, FULL].any())
        w = [z[:, i].to(sc.dtype).view(-1, 1, 1, 1) for i in range(NUM_ROUTES)]
        if isinstance(blk, Bottleneck):
            out = sc
            if need_light or need_full:
                a = _bottleneck_a(blk, x)
                if need_light:
                    out = out + w[LIGHT] * _bottleneck_light(blk, a)
                if need_full:
                    out = out + w[FULL] * _bottleneck_full(blk, a)
            return F.relu(out)
        out = w[SKIP] * F.relu(sc)
        if need_light or need_full:
            a = _basic_a(blk, x)
            if need_light:
                out = out + w[LIGHT] * F.relu(sc + a)
            if need_full:
                out = out + w[FULL] * F.relu(sc + blk.bn2(blk.conv2(a)))
        return out

    @staticmethod
    def _skip_block(blk: nn.Module, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """Inference: light images run conv1(+pool)+conv3, full images the whole branch, skipped ones nothing."""
        if z is None or z.shape[1] == 2:  # binary: hard 0 / 1 decisions at evaluation
            return DynamicResNet._skip_block(blk, x, None if z is None else z[:, EXECUTE])
        sc = blk.shortcut(x)
        idx_l = torch.nonzero(z[:, LIGHT], as_tuple=True)[0]
        idx_f = torch.nonzero(z[:, FULL], as_tuple=True)[0]
        n_l, n_f = idx_l.numel(), idx_f.numel()
        if n_l + n_f == 0:
            return F.relu(sc)
        everyone = x.shape[0] in (n_l, n_f)  # all light or all full: no gather
        xe = x if everyone else x.index_select(0, torch.cat([idx_l, idx_f]))
        if isinstance(blk, Bottleneck):
            a = _bottleneck_a(blk, xe)
            if n_l:
                sc = sc.index_add(0, idx_l, _bottleneck_light(blk, a[:n_l]))
            if n_f:
                sc = sc.index_add(0, idx_f, _bottleneck_full(blk, a[n_l:]))
        else:
            a = _basic_a(blk, xe)
            if n_l:
                sc = sc.index_add(0, idx_l, a[:n_l])
            if n_f:
                sc = sc.index_add(0, idx_f, blk.bn2(blk.conv2(a[n_l:])))
        return F.relu(sc)
