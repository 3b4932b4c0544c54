"""RDI-Net (Wang et al., ICCV 2021), spec ``methods.md`` §4; paper ``rdinet-iccv2021.txt`` Eq. 4, 10–16.

Model (``arch: rdinet``, ``models/rdinet.py``): relational routers (GCN over the r preceding router features with
decay γ, d = 256) and skip / light / full blocks. ``gates`` hold the executed fraction of each block's MACs
(0 / ρ_b / 1), so the trainer's default MAC accounting is exact and the batch mean of a block's gate is v_n.

Objective (Eq. 16)::

    L = CE + rate_weight · L_cost + α · L_rank
    L_cost = Σ_n (v_n − t)²                           (Eq. 15; gated blocks; global-batch v_n)
    L_rank = mean over SRM triplets [‖P_i − P_pos‖ − ‖P_i − P_neg‖ + φ]₊   (Eq. 10–12, φ = 0.5, α = 0.2)

SRM: H = per-channel intensity histograms of the input images (``losses.histogram_features``), D_ij = ‖H_i − H_j‖₂,
row-wise argsort, every adjacent rank pair is a (positive, negative) triplet, near-ties (relative ``tie_tol``)
ignored; the path P_i = the routers' option probabilities softmax(ℓ/τ) over all gated blocks (B×L·3), i.e. the
noise-free relaxation of the decisions. Computed per rank on the local batch.

Binary option (``router.options: 2``, paper §3.2, Eq. 8–9; ``models/rdinet.py``): gates hold the relaxed decision
v_n (soft in training), the cost loss is Eq. 15 on the batch mean of v_n, and the SRM path is P_i = (v_1, …, v_N)
with the noise-free v_n = softmax(ℓ/τ)[1]. Default: 3 options with hard straight-through routes (the official code
has 3 options; it mixes them with *soft* Gumbel-softmax weights, which this project does not train).

Uniform Sampling Warm-up (Eq. 14), ``stage``:
  ``both``  (default) one run: the first ``usw_epochs`` epochs train the network with CE only on uniformly sampled
            routes (routers unused), then the joint phase — one LR schedule for both.
  ``usw``   the whole run is the warm-up (the official stage 1, its own schedule);
  ``joint`` the whole run is the joint phase (the official stage 2: start it from the warm-up's checkpoint with
            ``model.pretrained=<tag dir>``, which loads the backbone and classifier, not the routers — as the official
            ``main.py --resume`` skips every ``router`` key).
During the warm-up the routers are left out of the optimizer step (``inactive_parameters``): no weight decay or
momentum reaches them. The trainer calls ``on_epoch_start(epoch)``; the phase and epoch are in ``state_dict()`` so
a resume lands in the right phase.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .aig import gate_mask_for
from .base import GatedMethod, cfg_get, register_method, unwrap_model
from .losses import cost_loss, histogram_features, pairwise_l2, rank_loss, srm_triplets

if TYPE_CHECKING:  # pragma: no cover
    from spnet_dist.models.output import ModelOutput

__all__ = ["RDINet"]

PHASES = ("usw", "joint")
STAGES = ("both", "usw", "joint")


@register_method
class RDINet(GatedMethod):
    """Config keys (besides GatedMethod's ``target_rate``/``target_schedule``/``rate_weight``): ``stage``
    (both | usw | joint), ``usw_epochs``, ``router.options`` (3 | 2), ``router.relaxation`` (null | hard_st | soft),
    ``cost_reduction`` (sum | mean), ``srm_weight`` (α), ``srm_margin`` (φ), ``tie_tol``, ``hist_bins``,
    ``hist_range``, ``rank_reduction`` (mean | sum)."""

    name = "rdinet"
    default_rate_loss = "two_sided"
    router_param_group = True  # the warm-up leaves the routers out of the step, also under ZeRO >= 1
    config_choices = {**GatedMethod.config_choices, "method.stage": STAGES, "method.router.options": (2, 3),
                      "method.router.relaxation": (None, "hard_st", "soft")}

    @classmethod
    def prepare_cfg(cls, cfg: dict, num_blocks: int) -> dict:
        arch = cfg.get("arch") or "rdinet"
        if arch != "rdinet":
            raise ValueError(f"method rdinet needs arch: rdinet, got {arch!r}")
        cfg["arch"] = arch
        router = dict(cfg.get("router") or {})
        router.setdefault("type", "relational")
        if router["type"] != "relational":
            raise ValueError(f"method rdinet needs router.type: relational, got {router['type']!r}")
        cfg["router"] = router
        cfg["gate_mask"] = gate_mask_for(cfg, num_blocks)
        return cfg

    def __init__(self, cfg: Mapping, model: torch.nn.Module) -> None:
        super().__init__(cfg, model)
        c = self.cfg
        net = unwrap_model(model)
        if not hasattr(net, "uniform_routes"):
            raise TypeError(f"method rdinet needs an RDIResNet (arch: rdinet), got {type(net).__name__}")
        self.net = net  # reference only (not part of the method state)
        self.usw_epochs = int(cfg_get(c, "usw_epochs", 10))
        self.stage = str(cfg_get(c, "stage", "both"))
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {list(STAGES)}, got {self.stage!r}")
        self.binary = int(getattr(net, "num_options", 3)) == 2
        self.cost_reduction = str(cfg_get(c, "cost_reduction", "sum"))
        self.srm_weight = float(cfg_get(c, "srm_weight", 0.2))
        self.srm_margin = float(cfg_get(c, "srm_margin", 0.5))
        self.tie_tol = float(cfg_get(c, "tie_tol", 0.01))
        self.hist_bins = int(cfg_get(c, "hist_bins", 32))
        self.hist_range = tuple(float(v) for v in cfg_get(c, "hist_range", (-2.2, 2.7)))
        self.rank_reduction = str(cfg_get(c, "rank_reduction", "mean"))
        if self.cost_reduction not in ("sum", "mean"):
            raise ValueError(f"cost_reduction must be 'sum' or 'mean', got {self.cost_reduction!r}")
        if self.rank_reduction not in ("sum", "mean"):
            raise ValueError(f"rank_reduction must be 'sum' or 'mean', got {self.rank_reduction!r}")
        if self.usw_epochs < 0:
            raise ValueError(f"usw_epochs must be >= 0, got {self.usw_epochs}")
        self.tau = float(getattr(net, "tau", 1.0))
        self.epoch = 0
        self.phase = self.phase_for(0)
        self._apply_phase()

    # ------------------------------------------------------------------ phases (USW, Eq. 14)
    def phase_for(self, epoch: int) -> str:
        if self.stage != "both":
            return self.stage
        return "usw" if epoch < self.usw_epochs else "joint"

    def _apply_phase(self) -> None:
        self.net.uniform_routes = self.phase == "usw"

    def on_epoch_start(self, epoch: int) -> None:
        """Called by the trainer before each (possibly resumed) epoch: USW for epochs < usw_epochs, then joint."""
        self.epoch = int(epoch)
        self.phase = self.phase_for(self.epoch)
        self._apply_phase()

    def inactive_parameters(self) -> list[torch.nn.Parameter]:
        """The routers during USW (they do not run): the optimizer step leaves them and their momentum untouched
        (no weight-decay shrinkage before the joint phase; the official code's SGD skips their None gradients)."""
        return list(self.net.router_parameters()) if self.phase == "usw" else []

    # ------------------------------------------------------------------ objective
    def srm_loss(self, images: Tensor, out: "ModelOutput") -> tuple[Tensor, int]:
        """L_rank on the local batch; returns (loss, number of kept triplets)."""
        hist = histogram_features(images, self.hist_bins, self.hist_range)
        dist = pairwise_l2(hist)
        a, p, n = srm_triplets(dist, self.tie_tol)
        gated = self.gated_index(out.gate_logits.device)
        paths = F.softmax(out.gate_logits.index_select(1, gated).float() / self.tau, dim=-1)
        if self.binary:  # P_i = (v_1, ..., v_N): the execute probability per block
            paths = paths[..., 1]
        return rank_loss(paths, a, p, n, self.srm_margin, self.rank_reduction), int(a.numel())

    def _loss(
        self, model: torch.nn.Module, images: Tensor, labels: Tensor, out: "ModelOutput"
    ) -> tuple[Tensor, dict[str, Tensor]]:
        from spnet_dist.models.rdinet import route_of

        ce = F.cross_entropy(out.logits, labels)
        rates = self.block_rates(out)  # v_n: global-batch mean executed fraction (straight-through)
        l_cost = cost_loss(rates, self.targets, self.rate_loss_mask)
        if self.cost_reduction == "mean":
            l_cost = l_cost / rates.numel()
        zero = ce.new_zeros(())
        usw = self.phase == "usw"
        if usw:  # Eq. 14: CE only on uniformly sampled paths
            l_rank, n_trip = zero, 0
            total = ce
        else:
            l_rank, n_trip = self.srm_loss(images, out) if self.srm_weight != 0.0 else (zero, 0)
            total = ce + self.rate_weight * l_cost + self.srm_weight * l_rank
        gated = self.gated_index(rates.device)
        if self.binary:  # mean relaxed decisions (exact counts for hard ones): skip 1 − v, full v
            v = out.gates.detach().index_select(1, gated).float()
            counts = [(1.0 - v).mean(), zero, v.mean()] if v.numel() else [zero] * 3
        else:
            route = route_of(out.gates.detach()).index_select(1, gated)
            counts = [(route == k).float().mean() if route.numel() else zero for k in range(3)]
        logs = {
            "ce": ce.detach(),
            "rate_loss": l_cost.detach(),
            "rank_loss": l_rank.detach(),
            "srm_triplets": torch.tensor(float(n_trip)),
            "exec_rate": self.exec_rate(rates),
            "block_rates": rates.detach(),
            "skip_rate": counts[0],
            "light_rate": counts[1],
            "full_rate": counts[2],
            "usw": torch.tensor(1.0 if usw else 0.0),
        }
        return total, logs

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model: torch.nn.Module, loader: Any, table: Any, execution: str = "dense") -> dict[str, Any]:
        """The trainer's default evaluation (top-1/5, MACs from hard skip/light/full decisions, ``block_rates`` =
        mean executed fraction per block, ``exec_rate`` their mean over gated blocks) plus, from the same pass,
        ``option_rates`` (per block [skip, light, full] fractions) and ``skip_rate`` / ``light_rate`` /
        ``full_rate`` over gated blocks."""
        import torch.distributed as dist

        from spnet_dist import distributed as D
        from spnet_dist.evaluation.metrics import evaluate
        from spnet_dist.models.rdinet import route_of

        net = unwrap_model(model)
        counts: dict[str, Tensor] = {}

        def hook(mod: torch.nn.Module, inp: Any, out: "ModelOutput") -> None:
            route = route_of(out.gates.detach())
            c = F.one_hot(route, 3).double().sum(0)  # L×3
            counts["c"] = c if "c" not in counts else counts["c"] + c

        handle = net.register_forward_hook(hook)
        try:
            metrics = evaluate(model, loader, table, execution)
        finally:
            handle.remove()
        c = counts["c"]
        if D.is_dist():
            dist.all_reduce(c)
        frac = c / c.sum(1, keepdim=True).clamp(min=1.0)
        gated = torch.tensor(self.gated_blocks, dtype=torch.bool)
        g = frac[gated.to(frac.device)] if bool(gated.any()) else frac
        metrics.update({
            "option_rates": [[round(float(v), 4) for v in row] for row in frac],
            "skip_rate": float(g[:, 0].mean()), "light_rate": float(g[:, 1].mean()),
            "full_rate": float(g[:, 2].mean()),
        })
        return metrics

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update({"phase": self.phase, "epoch": self.epoch, "usw_epochs": self.usw_epochs})
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.epoch = int(state.get("epoch", 0))
        phase = str(state.get("phase", self.phase_for(self.epoch))) if self.stage == "both" else self.stage
        if phase not in PHASES:
            raise ValueError(f"RDI-Net method state has unknown phase {phase!r}")
        self.phase = phase
        self._apply_phase()
