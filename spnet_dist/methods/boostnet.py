"""BoostNet (Yu et al., AAAI 2023) on ResNet, spec ``methods.md`` §6 (ResNet adaptation §6.b [RECON]).

Model (``arch: early_exit``, ``models/boostnet.py``): the plain ResNet (no routers) with one exit per stage
(multi-stage heads), optional gradient rescaling on the trunk at every exit.

Training (§6.c, paper Eq. 6): ``L = Σ_n w_n · CE(f_n + stopgrad(t·F_{n−1}), y)``, F_n = f_n + t·F_{n−1}, t = 0.5,
w_n = 1.

Evaluation (``evaluate``, this method's override of the ``Method`` hook):

* anytime — top-1 of argmax F_n at every exit on the validation set, with the cumulative MACs of that exit
  (earlier heads included; ``cost.exit_macs``);
* budgeted batch — confidence thresholds fitted on a held-out split of the *training* folder (deterministic
  validation transform) with geometric exit proportions q_n ∝ p^n; p is searched so that the held-out expected MACs
  match the budget ``target_rate`` × (what a gated ResNet executing that fraction of every residual branch costs:
  stem + projections + classifier + t·Σ branches). The validation set is then run with **real early exits**
  (``EarlyExitResNet.early_exit_forward``: the batch is subset after each exit), giving ``top1``, ``macs_per_image``
  (per-image exit costs), ``exit_fractions`` and ``block_rates`` (fraction of images that ran each block). The
  official p = k/20 sweep is reported as ``budget_curve``.

Held-out split: ``heldout`` (fraction < 1 or an image count; default 0.039 ≈ ImageNet's 50,000 of 1,281,167) of a
seeded permutation of the sorted usable training files of the pre-flight plan (``heldout_seed``); the indices are
method state (checkpointed and reused on resume/evaluation). The trainer leaves the split out of the training loader
(``train_exclusions``, which sets ``heldout_trained_on: false``); evaluation reads it through the validation loader's
``subset`` (validation transform, labels of the full class list).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from spnet_dist import distributed as D
from spnet_dist.data.heldout import heldout_indices, heldout_size

from .base import Method, cfg_get, register_method, unwrap_model
from .losses import boosted_ce

if TYPE_CHECKING:  # pragma: no cover
    from spnet_dist.models.output import ModelOutput

__all__ = ["BoostNet", "heldout_indices", "heldout_size"]


def _gather_cat(t: Tensor, dim: int) -> Tensor:
    """Concatenate a CPU tensor of every rank along ``dim`` (rank order; sizes may differ)."""
    return torch.cat(D.gather_objects(t.cpu()), dim)


def _all_reduce(t: Tensor) -> Tensor:
    import torch.distributed as dist

    if D.multi_rank():
        dist.all_reduce(t)
    return t


@register_method
class BoostNet(Method):
    """Config keys: ``ensemble_weight`` (t = 0.5), ``exit_weights`` (w_n, default 1), ``grad_rescale`` (model),
    ``target_rate`` (budget rate for the budgeted-batch point), ``heldout``, ``heldout_seed``, ``flat_curve``
    (``budget_curve`` with the official monotone rule, default true: ``evaluation.budgeted.budget_curve``)."""

    name = "boostnet"

    @classmethod
    def prepare_cfg(cls, cfg: dict, num_blocks: int) -> dict:
        arch = cfg.get("arch") or "early_exit"
        if arch != "early_exit":
            raise ValueError(f"method boostnet needs arch: early_exit, got {arch!r}")
        router = dict(cfg.get("router") or {"type": "none"})
        if router.get("type", "none") != "none":
            raise ValueError("method boostnet runs without routers (router.type: none); early exits are its only "
                             f"dynamic decision, got router.type={router.get('type')!r}")
        cfg.update(arch=arch, router={"type": "none"}, multi_stage_heads=True, gate_mask=None)
        return cfg

    def __init__(self, cfg: Mapping, model: torch.nn.Module) -> None:
        super().__init__(cfg, model)
        c = self.cfg
        net = unwrap_model(model)
        if not hasattr(net, "early_exit_forward"):
            raise TypeError(f"method boostnet needs an EarlyExitResNet (arch: early_exit), got {type(net).__name__}")
        self.t = float(cfg_get(c, "ensemble_weight", 0.5))
        w = cfg_get(c, "exit_weights")
        self.exit_weights = None if w is None else [float(v) for v in w]
        self.target_rate = float(cfg_get(c, "target_rate", 0.7))
        self.heldout_spec = cfg_get(c, "heldout", 0.039)
        self.heldout_seed = int(cfg_get(c, "heldout_seed", 0))
        self.flat_curve = bool(cfg_get(c, "flat_curve", True))  # official eval scripts pass --flat_curve (§6.f)
        self.heldout: dict[str, Any] | None = None  # {"indices", "n_train", "seed"} once known
        self.heldout_loader: Iterable | None = None  # programmatic override (tests); else built from the val loader
        self.heldout_trained_on = True  # until the trainer leaves the split out (train_exclusions)

    # ------------------------------------------------------------------ objective
    def _loss(
        self, model: torch.nn.Module, images: Tensor, labels: Tensor, out: "ModelOutput"
    ) -> tuple[Tensor, dict[str, Tensor]]:
        total, per_exit = boosted_ce(out.head_logits, labels, self.t, self.exit_weights)
        rates = self.block_rates(out)
        logs = {
            "ce": per_exit[-1].detach(),
            "rate_loss": total.new_zeros(()),
            "exec_rate": self.exec_rate(rates),
            "block_rates": rates.detach(),
        }
        for k, ce in enumerate(per_exit, start=1):
            logs[f"ce_exit{k}"] = ce.detach()
        return total, logs

    # ------------------------------------------------------------------ held-out split (method state)
    def ensure_split(self, train_files: Sequence[str]) -> list[str]:
        """The held-out files among ``train_files`` (the usable ``<class>/<file>`` training files; drawn once from
        their sorted list, then taken from the method state and checked against the list's length)."""
        files = sorted(train_files)
        if self.heldout is None:
            k = heldout_size(self.heldout_spec, len(files))
            self.heldout = {"indices": heldout_indices(len(files), k, self.heldout_seed), "n_train": len(files),
                            "seed": self.heldout_seed}
        elif self.heldout["n_train"] != len(files):
            raise ValueError(f"the method state's held-out split was drawn from {self.heldout['n_train']} training "
                             f"images, the training split has {len(files)}")
        return [files[i] for i in self.heldout["indices"].tolist()]

    def train_exclusions(self, train_files: Sequence[str]) -> list[str]:
        """The held-out split, which the training loader leaves out. Calling it records that the split is not
        trained on."""
        files = self.ensure_split(train_files)
        self.heldout_trained_on = False
        return files

    def _heldout_stats(self, net: torch.nn.Module, loader: Any) -> tuple[Tensor, Tensor] | None:
        """Per-exit confidence and correctness on the held-out split, read through ``loader.subset``; None when the
        loader is no ``data.loader.Loader`` (a plain iterable: calibrate on val) or the split is empty."""
        if self.heldout_loader is not None:
            return self._collect(net, self.heldout_loader)
        from spnet_dist.data.loader import Loader

        if not isinstance(loader, Loader):
            return None
        files = self.ensure_split(loader.plan.train.files)
        if not files:
            return None
        held = loader.subset(files, "train")
        try:
            return self._collect(net, held)
        finally:
            held.release()

    # ------------------------------------------------------------------ evaluation
    def _collect(self, net: torch.nn.Module, loader: Iterable) -> tuple[Tensor, Tensor]:
        """Per-exit confidence max softmax(F_n) and correctness (N×M each, all ranks concatenated)."""
        from spnet_dist.models.boostnet import ensemble_logits

        confs, corrects = [], []
        for batch in loader:
            images, labels = batch[0], batch[1]
            out = net(images)
            ens = ensemble_logits(out.head_logits, self.t)
            confs.append(torch.stack([F.softmax(z.float(), 1).max(1).values for z in ens]).cpu())
            corrects.append(torch.stack([z.argmax(1) == labels for z in ens]).cpu())
        if not confs:
            return torch.zeros(net.num_exits, 0), torch.zeros(net.num_exits, 0, dtype=torch.bool)
        return _gather_cat(torch.cat(confs, 1), 1), _gather_cat(torch.cat(corrects, 1), 1)

    def budget_macs(self, table: Any) -> float:
        """The budget: stem + projections + classifier + target_rate · Σ residual branches (no heads, no routers)."""
        fixed = table.breakdown.get("stem", 0.0) + table.breakdown.get("projections", 0.0) \
            + table.breakdown.get("classifier", 0.0)
        return fixed + self.target_rate * sum(table.blocks)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, loader: Any, table: Any, execution: str = "dense") -> dict[str, Any]:
        from spnet_dist.evaluation.budgeted import anytime, budget_curve, budgeted_result, search_budget
        from spnet_dist.models.cost import cost_metrics, exit_macs

        net = unwrap_model(model)
        was_training = net.training
        net.eval()
        net.set_execution(execution)
        try:
            costs = exit_macs(table)
            costs_paper = exit_macs(table.paper_view())  # the papers' v1 layout (spec §1.3)
            conf_val, correct_val = self._collect(net, loader)
            held = self._heldout_stats(net, loader)
            calib = "heldout" if held is not None and held[0].shape[1] > 0 else "val"
            conf_fit, correct_fit = held if calib == "heldout" else (conf_val, correct_val)
            budget = self.budget_macs(table)
            p, thr, fit_macs = search_budget(conf_fit, costs, budget)
            real = self._early_exit_pass(net, loader, thr, costs, costs_paper)
        finally:
            net.set_execution("dense")
            net.train(was_training)
        sim = budgeted_result(conf_val, correct_val, thr, costs)
        exits = anytime(correct_val, costs)
        metrics: dict[str, Any] = {
            **real, **cost_metrics(table, real["macs_per_image"], real["macs_paper"]),
            "budget_macs": budget, "budget_fit_macs": fit_macs, "budget_p": p, "calibration": calib,
            "heldout_images": int(conf_fit.shape[1]) if calib == "heldout" else 0,
            "heldout_trained_on": self.heldout_trained_on if calib == "heldout" else None,
            "thresholds": [float(v) for v in thr], "simulated_top1": sim["top1"], "simulated_macs": sim["macs"],
            "exits": exits, "anytime_top1": exits[-1]["top1"], "full_macs": costs[-1],
            "budget_curve": budget_curve(conf_fit, conf_val, correct_val, costs, correct_fit=correct_fit,
                                         flat=self.flat_curve),
        }
        for e in exits:
            metrics[f"exit{e['exit']}_top1"] = e["top1"]
            metrics[f"exit{e['exit']}_macs"] = e["macs"]
        return metrics

    def _early_exit_pass(self, net: torch.nn.Module, loader: Iterable, thr: Tensor, costs: list[float],
                         costs_paper: list[float] | None = None) -> dict[str, Any]:
        """Validation with real early exits; sums all-reduced over ranks. ``macs_paper``: the same exits counted
        with ``costs_paper`` (default ``costs``)."""
        n_exits, n_blocks = len(costs), net.num_blocks
        c = torch.tensor(costs, dtype=torch.float64)
        cp = torch.tensor(costs_paper if costs_paper is not None else costs, dtype=torch.float64)
        sums = torch.zeros(5 + n_exits + n_blocks, dtype=torch.float64)  # top1, top5, macs, n, exits, blocks, v1
        for batch in loader:
            images, labels = batch[0], batch[1]
            res = net.early_exit_forward(images, thr.tolist(), self.t)
            top5 = res.logits.topk(min(5, res.logits.shape[1]), dim=1).indices
            ex = res.exit_index.cpu()
            row = torch.cat([
                torch.stack([(top5[:, 0] == labels).sum(), (top5 == labels[:, None]).any(1).sum()]).double().cpu(),
                c[ex].sum().view(1), torch.tensor([float(labels.numel())], dtype=torch.float64),
                torch.bincount(ex, minlength=n_exits).double(), res.reached.double().sum(0).cpu(),
                cp[ex].sum().view(1)])
            sums += row
        sums = _all_reduce(sums.to(D.comm_device())).cpu()
        n = max(1.0, float(sums[3]))
        rates = (sums[4 + n_exits:-1] / n).tolist()
        return {"top1": float(sums[0]) / n, "top5": float(sums[1]) / n, "macs_per_image": float(sums[2]) / n,
                "macs_paper": float(sums[-1]) / n, "exec_rate": sum(rates) / max(1, len(rates)),
                "block_rates": [round(r, 4) for r in rates],
                "exit_fractions": [round(float(v) / n, 4) for v in sums[4:4 + n_exits]], "val_images": int(n)}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.heldout is not None:
            state["heldout"] = dict(self.heldout)
        state["heldout_trained_on"] = self.heldout_trained_on
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        held = state.get("heldout")
        if held is not None:
            self.heldout = {"indices": torch.as_tensor(held["indices"], dtype=torch.long),
                            "n_train": int(held["n_train"]), "seed": int(held["seed"])}
        self.heldout_trained_on = bool(state.get("heldout_trained_on", self.heldout_trained_on))
