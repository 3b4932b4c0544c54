"""The ``Method`` interface and the method registry.

A *method* owns the training objective of a dynamic network and any cross-iteration state it needs (SP-Net: the EMA
teacher). The trainer owns the model, optimizer and data; per iteration it does::

    out = model(images)                                   # student forward (DDP / DeepSpeed wrapped is fine)
    loss, logs = method.loss(model, images, labels, out)  # method-specific objective (may run a teacher forward)
    loss.backward(); optimizer.step()

Hooks the trainer calls on every method (the base class's are no-ops or the default): ``on_epoch_start(epoch)``
before every (possibly resumed) epoch (RDI-Net: uniform-sampling warm-up phase), ``evaluate(model, loader, table,
execution) -> dict`` (default ``evaluation.metrics.evaluate``; RDI-Net: + skip/light/full rates; BoostNet: anytime and
budgeted batch) and ``train_exclusions(train_files)`` (training files to leave out; BoostNet: its held-out split).

Construction order expected from the trainer (see ``prepare_method_cfg``)::

    method_cfg = prepare_method_cfg(method_cfg, model_cfg)   # fills method-derived model keys (e.g. AIG gate_mask)
    model = build_model(model_cfg, method_cfg)
    ... load pretrained weights, move to device ...
    method = build_method(method_cfg, model)                 # SP-Net deep-copies the student here
    ... wrap the model (DDP / deepspeed.initialize) ...
"""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from spnet_dist.cfgtools import cfg_get, to_plain
from spnet_dist.distributed import global_mean

from .losses import rate_loss

if TYPE_CHECKING:  # pragma: no cover
    from spnet_dist.models.output import ModelOutput

__all__ = [
    "Method",
    "GatedMethod",
    "METHODS",
    "register_method",
    "build_method",
    "prepare_method_cfg",
    "unwrap_model",
    "cfg_get",
    "to_plain",
]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / DataParallel / DeepSpeedEngine / torch.compile wrappers (the trainer may pass either)."""
    seen = 0
    while seen < 8:
        seen += 1
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif type(model).__name__ == "DeepSpeedEngine":
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            break
    return model


class Method:
    """Training objective of a dynamic-inference method. Plain Python object (not an ``nn.Module``), so its tensors
    never end up in the student's ``state_dict`` nor in the optimizer.

    Subclasses set ``name`` and implement ``_loss``; the common bookkeeping (global per-block rates, the logging
    dict, the step counter) lives here.
    """

    name: ClassVar[str] = "base"
    # the optimizer puts the model's router parameters in a parameter group of their own (same hyper-parameters),
    # so that a phase can leave them out of the step under ZeRO >= 1 (``inactive_parameters``)
    router_param_group: ClassVar[bool] = False
    # the method.* keys this method reads with a fixed set of values / a numeric range (low, high, low inclusive),
    # checked by the pre-flight (spnet_dist.preflight) before a run; a subclass extends its parent's
    config_choices: ClassVar[dict[str, tuple]] = {}
    config_ranges: ClassVar[dict[str, tuple[float | None, float | None, bool]]] = {
        "method.target_rate": (0, 1, False)}

    def __init__(self, cfg: Mapping, model: torch.nn.Module) -> None:
        self.cfg = to_plain(cfg)
        net = unwrap_model(model)
        gated = getattr(net, "gated_blocks", None)
        if gated is None:
            raise AttributeError("model has no `gated_blocks` attribute (expected a spnet_dist DynamicResNet)")
        self.gated_blocks: list[bool] = [bool(g) for g in gated]
        self.num_blocks = len(self.gated_blocks)
        self.step = 0  # number of loss() calls (micro-batches) so far
        self._gated_index: dict[torch.device, Tensor] = {}

    # ------------------------------------------------------------------ config-time hook
    @classmethod
    def prepare_cfg(cls, cfg: dict, num_blocks: int) -> dict:
        """Fill method-derived keys that the *model* reads (called by ``prepare_method_cfg`` before build_model)."""
        return cfg

    # ------------------------------------------------------------------ per-iteration objective
    def gated_index(self, device: torch.device) -> Tensor:
        """Indices of the gated blocks on ``device`` (cached: no host-to-device copy per step). ``index_select``
        with it needs no host sync, unlike boolean-mask indexing."""
        device = torch.device(device)
        if device not in self._gated_index:
            idx = [i for i, g in enumerate(self.gated_blocks) if g]
            self._gated_index[device] = torch.tensor(idx, dtype=torch.long, device=device)
        return self._gated_index[device]

    def block_rates(self, out: "ModelOutput") -> Tensor:
        """Per-block execution rates over the *global* batch (differentiable; straight-through through the gates)."""
        return global_mean(out.gates, dim=0)

    def exec_rate(self, rates: Tensor) -> Tensor:
        """Mean global rate over gated blocks (1.0 when nothing is gated); no host sync."""
        r = rates.detach()
        if not any(self.gated_blocks):
            return torch.ones((), dtype=r.dtype, device=r.device)
        return r.index_select(0, self.gated_index(r.device)).mean()

    def loss(
        self, model: torch.nn.Module, images: Tensor, labels: Tensor, out: "ModelOutput"
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and a dict of detached logging terms.

        ``out = model(images)`` is the trainer's student forward. Always logged: ``loss``, ``ce`` (final head),
        ``rate_loss`` (unweighted), ``exec_rate`` (mean global rate over gated blocks), ``block_rates`` (L-vector),
        plus per-method terms (all *unweighted*; the weights are in the config).
        """
        if out.gates.shape[1] != self.num_blocks:
            raise ValueError(f"model output has {out.gates.shape[1]} gates, method expects {self.num_blocks}")
        self.step += 1
        total, logs = self._loss(model, images, labels, out)
        logs = {k: v.detach() if isinstance(v, Tensor) else torch.as_tensor(v) for k, v in logs.items()}
        logs["loss"] = total.detach()
        return total, logs

    def _loss(
        self, model: torch.nn.Module, images: Tensor, labels: Tensor, out: "ModelOutput"
    ) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    # ------------------------------------------------------------------ state / evaluation
    def state_dict(self) -> dict:
        """Everything that must survive a resume. Tensors only inside nested dicts (torch.save-able)."""
        return {"name": self.name, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        name = state.get("name", self.name)
        if name != self.name:
            raise ValueError(f"checkpoint holds method state for {name!r}, this method is {self.name!r}")
        self.step = int(state.get("step", 0))

    def on_epoch_start(self, epoch: int) -> None:
        """Called before every (possibly resumed) epoch with the number of completed epochs."""

    def inactive_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters that receive no gradient in the current phase: the trainer leaves them and their optimizer
        state out of the optimizer step (``engine/phase_params.py``; RDI-Net: the routers during the warm-up).
        Under ZeRO >= 1 they must form whole parameter groups: see ``router_param_group``."""
        return []

    def evaluate(self, model: torch.nn.Module, loader: Any, table: Any, execution: str = "dense") -> dict[str, Any]:
        """Validation metrics of ``model`` (top-1/5, MACs from hard decisions, per-block rates)."""
        from spnet_dist.evaluation.metrics import evaluate

        return evaluate(model, loader, table, execution)

    def train_exclusions(self, train_files: Sequence[str]) -> list[str]:
        """Of ``train_files`` (the pre-flight plan's usable ``<class>/<file>`` training files), those this method
        keeps out of training (none by default)."""
        return []

    def eval_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The network evaluated on the validation set: the student for all current methods."""
        return model

    def gate_targets(self) -> list[float] | None:
        """Per-block target execution rates (gated methods), or None."""
        return None

    def replicated_tensors(self) -> list[Tensor]:
        """Cross-iteration tensors that must be identical on every rank (checked periodically by the trainer).

        BatchNorm running statistics are per rank (as with DDP without SyncBN) and are not listed.
        """
        return []


METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise KeyError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


def method_class(cfg: Mapping) -> type[Method]:
    """The registered class of the method named ``cfg.name``."""
    return _method_class(cfg)


def _method_class(cfg: Mapping) -> type[Method]:
    name = cfg_get(cfg, "name")
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def build_method(cfg: Mapping, model: torch.nn.Module) -> Method:
    """Instantiate the method named ``cfg.name`` for ``model`` (call after pretrained loading; see module doc)."""
    return _method_class(cfg)(cfg, model)


def num_blocks_of(model_cfg: Mapping | str) -> int:
    """Number of residual blocks of a model config (``sum(layers)``; a bare name or partial config is resolved
    through the model registry)."""
    layers: Sequence[int] | None = None if isinstance(model_cfg, str) else cfg_get(model_cfg, "layers")
    if layers is None:
        from spnet_dist.models import resolve_model_cfg

        layers = resolve_model_cfg(model_cfg)["layers"]
    return int(sum(int(n) for n in layers))


def prepare_method_cfg(
    method_cfg: Mapping, model_cfg: Mapping | str | None = None, num_blocks: int | None = None
) -> dict:
    """Return a plain-dict copy of ``method_cfg`` with method-derived *model* keys filled in.

    Call it before ``build_model(model_cfg, method_cfg)`` and pass the result to both ``build_model`` and
    ``build_method``. Currently it resolves ``gate_mask`` for ConvNet-AIG per-layer schedules (blocks with target 1
    are not gated, spec §2.h); for other methods it is a plain copy. ``num_blocks`` defaults to ``sum(model_cfg.layers)``.
    """
    cfg = copy.deepcopy(to_plain(method_cfg))
    if num_blocks is None:
        if model_cfg is None:
            raise ValueError("need model_cfg or num_blocks")
        num_blocks = num_blocks_of(model_cfg)
    return _method_class(cfg).prepare_cfg(cfg, num_blocks)


class GatedMethod(Method):
    """Common part of gate-based methods with a target-execution-rate loss (ConvNet-AIG, SP-Net, ...).

    Config keys: ``target_rate`` (scalar t), ``target_schedule`` (per-block list, overrides ``target_rate``),
    ``rate_loss`` (``one_sided`` | ``two_sided``), ``rate_weight`` (λ).

    The loss sums over blocks that are gated *and* have t_l < 1 (ConvNet-AIG: gates with t = 1 are excluded from the
    sum but counted in the 1/L divisor; for the one-sided loss t = 1 contributes 0 anyway).
    """

    default_rate_loss: ClassVar[str] = "two_sided"
    config_choices = {**Method.config_choices, "method.rate_loss": ("one_sided", "two_sided")}
    config_ranges = {**Method.config_ranges, "method.rate_weight": (0, None, True)}

    def __init__(self, cfg: Mapping, model: torch.nn.Module) -> None:
        super().__init__(cfg, model)
        schedule = cfg_get(self.cfg, "target_schedule")
        if schedule is not None:
            targets = [float(t) for t in schedule]
            if len(targets) != self.num_blocks:
                raise ValueError(f"target_schedule has {len(targets)} entries, model has {self.num_blocks} blocks")
        else:
            targets = [float(cfg_get(self.cfg, "target_rate", 0.7))] * self.num_blocks
        self.targets = targets
        form = str(cfg_get(self.cfg, "rate_loss", self.default_rate_loss))
        if form not in ("one_sided", "two_sided"):
            raise ValueError(f"rate_loss must be 'one_sided' or 'two_sided', got {form!r}")
        self.one_sided = form == "one_sided"
        self.rate_weight = float(cfg_get(self.cfg, "rate_weight", 1.0))
        self.rate_loss_mask = [g and t < 1.0 for g, t in zip(self.gated_blocks, targets)]

    def gate_targets(self) -> list[float]:
        return list(self.targets)

    def rate_terms(self, out: "ModelOutput") -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Returns (unweighted rate loss, global per-block rates, logging dict)."""
        rates = self.block_rates(out)
        r_loss = rate_loss(rates, self.targets, self.rate_loss_mask, one_sided=self.one_sided)
        logs = {
            "rate_loss": r_loss.detach(),
            "exec_rate": self.exec_rate(rates),
            "block_rates": rates.detach(),
        }
        return r_loss, rates, logs
