"""SP-Net (ECCV 2022), spec ``methods.md`` §5.

The "dynamic auxiliary module" is a momentum (EMA) copy of the whole student (§5.a, §5.d). Per iteration, inside
``loss()`` and in the official order (§5.d):

1. EMA update ``θ_t ← m·θ_t + (1−m)·θ_s`` with the student parameters *before* this iteration's optimizer step
   (``loss()`` runs after the student forward and before backward/step), fused ``torch._foreach_lerp_``;
2. teacher forward on the same images under ``torch.inference_mode()`` — train mode by default (``teacher_mode:
   train``: batch-statistics BN, router dropout, Gumbel noise, as in the official code), or eval mode;
3. ``L = L_cls + λ·L_rate + w_logits·L_logits + w_path·L_path + w_evo·L_evo`` (§5.c).

``inference_mode`` rather than ``no_grad`` (no autograd bookkeeping, no version counters); inference tensors cannot
be saved for the student's backward, and the MSE targets are, so the two small outputs the losses read (final
logits, router logits) are cloned into normal tensors; the other fields stay inference tensors (read-only use only).
Same kernels, same RNG draws: the values are bitwise those of a ``no_grad`` forward.

Gradient accumulation: the EMA runs once per ``loss()`` call (micro-batch). The student weights do not change between
micro-batches, so k calls per optimizer step equal one update with momentum m^k; set ``ema_momentum = m**(1/k)`` to get
per-step momentum m.

Placement: the teacher is a deep copy of the *unwrapped* student made at construction (build the method after
pretrained loading and, preferably, after moving the model to its device). If the student later moves device / dtype
the teacher follows on the next ``loss()``. The teacher is not registered anywhere in the student, so it is never in
the optimizer, DDP's buckets nor the student's ``state_dict``. DeepSpeed ZeRO-3 (partitioned parameters) is not
supported (shapes are checked); ZeRO 0–2 are fine. The teacher lives on every rank and is updated identically there
(students are identical after the gradient all-reduce), so no communication is needed.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .base import GatedMethod, cfg_get, register_method, unwrap_model
from .losses import evolution_loss, logits_distill, multi_head_ce, path_distill, within_stage_evolution_loss

if TYPE_CHECKING:  # pragma: no cover
    from spnet_dist.models.output import ModelOutput

__all__ = ["SPNet"]

DEFAULT_HEAD_WEIGHTS = (0.01, 0.1, 0.2, 1.0)  # for [o1, o2, o3, o4]
# consecutive: paper wording (spec §5.h.1); official: ImageNet code, d_k = f4 - f_k; within_stage: CIFAR code (§5.e)
EVO_FORMS = ("consecutive", "official", "within_stage")


@register_method
class SPNet(GatedMethod):
    """SP-Net objective with an EMA teacher. Config keys (besides GatedMethod's): ``head_weights``, ``w_logits``,
    ``w_path``, ``w_evo``, ``evo_form`` (consecutive|official|within_stage), ``ema_momentum``, ``teacher_mode``
    (train|eval), ``teacher_buffers`` (copy|ema|own), ``teacher_precision`` (fp32|bf16)."""

    name = "spnet"
    default_rate_loss = "one_sided"
    config_choices = {**GatedMethod.config_choices, "method.evo_form": EVO_FORMS,
                      "method.teacher_mode": ("train", "eval"), "method.teacher_buffers": ("copy", "ema", "own"),
                      "method.teacher_precision": ("fp32", "bf16")}
    config_ranges = {**GatedMethod.config_ranges, "method.ema_momentum": (0, 1, True)}

    def __init__(self, cfg: Mapping, model: torch.nn.Module) -> None:
        super().__init__(cfg, model)
        c = self.cfg
        self.head_weights = [float(w) for w in cfg_get(c, "head_weights", DEFAULT_HEAD_WEIGHTS)]
        self.w_logits = float(cfg_get(c, "w_logits", 0.1))
        self.w_path = float(cfg_get(c, "w_path", 0.1))
        self.w_evo = float(cfg_get(c, "w_evo", 1e-4))
        self.evo_form = str(cfg_get(c, "evo_form", "consecutive"))
        self.evo_skip_unchanged = bool(cfg_get(c, "evo_skip_unchanged", False))  # within_stage only (a deviation)
        self.momentum = float(cfg_get(c, "ema_momentum", 0.9))
        self.teacher_mode = str(cfg_get(c, "teacher_mode", "train"))
        self.teacher_buffers = str(cfg_get(c, "teacher_buffers", "copy"))
        self.teacher_precision = str(cfg_get(c, "teacher_precision", "fp32"))
        if self.evo_form not in EVO_FORMS:
            raise ValueError(f"evo_form must be one of {', '.join(EVO_FORMS)}, got {self.evo_form!r}")
        if not 0.0 <= self.momentum <= 1.0:
            raise ValueError(f"ema_momentum must lie in [0, 1], got {self.momentum}")
        if self.teacher_mode not in ("train", "eval"):
            raise ValueError(f"teacher_mode must be 'train' or 'eval', got {self.teacher_mode!r}")
        if self.teacher_buffers not in ("copy", "ema", "own"):
            raise ValueError(f"teacher_buffers must be 'copy', 'ema' or 'own', got {self.teacher_buffers!r}")
        if self.teacher_precision not in ("fp32", "bf16"):
            raise ValueError(f"teacher_precision must be 'fp32' or 'bf16', got {self.teacher_precision!r}")
        within = self.evo_form == "within_stage"
        if self.w_evo > 0 and not within and not bool(cfg_get(c, "multi_stage_heads", False)):
            raise ValueError("w_evo > 0 needs multi_stage_heads: true (L_evo uses the aligned stage features)")
        unwrap_model(model).stage_taps = within and self.w_evo != 0.0
        self.reset_teacher(model)
        self.teacher.stage_taps = False  # the teacher's features feed no loss

    # ------------------------------------------------------------------ teacher management
    def reset_teacher(self, model: torch.nn.Module) -> None:
        """θ_t := θ_s (deep copy of the unwrapped student, including its buffers). Called at construction."""
        student = unwrap_model(model)
        teacher = copy.deepcopy(student)
        for p in teacher.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.teacher = teacher
        self._cache_teacher_tensors()
        self._check_alignment(student)

    def _cache_teacher_tensors(self) -> None:
        self._t_params = list(self.teacher.parameters())
        self._t_buffers = list(self.teacher.buffers())

    def _check_alignment(self, student: torch.nn.Module) -> None:
        s_params = list(student.parameters())
        s_buffers = list(student.buffers())
        if len(s_params) != len(self._t_params) or len(s_buffers) != len(self._t_buffers):
            raise RuntimeError("student and teacher parameter/buffer lists differ in length")
        for s, t in zip(s_params + s_buffers, self._t_params + self._t_buffers):
            if s.shape != t.shape:
                raise RuntimeError(
                    f"student/teacher shape mismatch {tuple(s.shape)} vs {tuple(t.shape)} "
                    "(partitioned parameters, e.g. DeepSpeed ZeRO-3, are not supported)"
                )

    def _follow_placement(self, student: torch.nn.Module) -> None:
        ref = next(student.parameters())
        t_ref = self._t_params[0]
        if t_ref.device != ref.device or t_ref.dtype != ref.dtype:
            self.teacher.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
            self._cache_teacher_tensors()

    @torch.no_grad()
    def replicated_tensors(self) -> list[Tensor]:
        """The teacher's parameters: every rank applies the same EMA to the same student weights."""
        return self._t_params

    @torch.no_grad()  # no autograd dispatch, and the student parameters need no per-tensor detach()
    def ema_update(self, model: torch.nn.Module) -> None:
        """θ_t ← m·θ_t + (1−m)·θ_s for every parameter (fused foreach), then the buffer policy:

        * ``copy`` (default): teacher buffers := student buffers (BN running stats, counters). With the default
          train-mode teacher the outputs do not depend on BN running stats, so this matches the official outputs
          exactly; it makes ``teacher_mode: eval`` meaningful (the official code never copies buffers, §5.d/5.g) and
          keeps the checkpointed teacher evaluable.
        * ``ema``: floating buffers averaged like parameters; integer buffers copied.
        * ``own``: official behaviour — buffers copied once at construction, afterwards only changed by the teacher's
          own train-mode forwards.
        """
        student = unwrap_model(model)
        self._follow_placement(student)
        s_params = list(student.parameters())
        if len(s_params) != len(self._t_params):
            raise RuntimeError("student parameter list changed since the teacher was created")
        m = self.momentum
        torch._foreach_lerp_(self._t_params, s_params, 1.0 - m)  # θ_t + (1−m)(θ_s − θ_t): one pass, not two
        if self.teacher_buffers == "own":
            return
        s_buffers = list(student.buffers())
        if len(s_buffers) != len(self._t_buffers):
            raise RuntimeError("student buffer list changed since the teacher was created")
        if self.teacher_buffers == "copy":
            if self._t_buffers:
                torch._foreach_copy_(self._t_buffers, s_buffers)
            return
        float_t, float_s = [], []
        for t, s in zip(self._t_buffers, s_buffers):
            if t.is_floating_point():
                float_t.append(t)
                float_s.append(s)
            else:
                t.copy_(s)
        if float_t:
            torch._foreach_lerp_(float_t, float_s, 1.0 - m)

    teacher_inference_mode = True  # False: plain no_grad forward (tools/bench_step.py compares both)

    def teacher_forward(self, images: Tensor) -> "ModelOutput":
        """The teacher's outputs on ``images``; ``teacher_precision: bf16`` runs it under bf16 autocast (BN stays
        fp32; on CPU it cuts the teacher's share of the step by ~45 %, BENCHMARKS.md). Under the trainer's
        ``deepspeed.bf16_autocast`` the whole step, teacher included, is already bf16."""
        self.teacher.train(self.teacher_mode == "train")
        precision = (torch.autocast(images.device.type, dtype=torch.bfloat16) if self.teacher_precision == "bf16"
                     else contextlib.nullcontext())
        if not self.teacher_inference_mode:
            with torch.no_grad(), precision:
                return self.teacher(images)
        with torch.inference_mode(), precision:
            out = self.teacher(images)
        return dataclasses.replace(out, logits=out.logits.clone(), gate_logits=out.gate_logits.clone())

    # ------------------------------------------------------------------ objective
    def _loss(
        self, model: torch.nn.Module, images: Tensor, labels: Tensor, out: "ModelOutput"
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if self.step == 1:
            self._check_alignment(unwrap_model(model))
        # (1) EMA with θ_s^k (before this iteration's optimizer step), (2) teacher forward with the updated θ_t.
        self.ema_update(model)
        need_teacher = self.w_logits != 0.0 or self.w_path != 0.0
        t_out = self.teacher_forward(images) if need_teacher else None

        # (3) losses, §5.c
        cls_loss, per_head_ce = multi_head_ce(out.head_logits, labels, self.head_weights)
        r_loss, _, logs = self.rate_terms(out)
        zero = cls_loss.new_zeros(())
        if t_out is not None:
            l_logits, _ = logits_distill(out.head_logits, t_out.logits, self.head_weights)
            l_path = path_distill(out.gate_logits, t_out.gate_logits, self.gated_blocks)
        else:
            l_logits, l_path = zero, zero
        if self.w_evo == 0.0:
            l_evo = zero
        elif self.evo_form == "within_stage":
            l_evo = within_stage_evolution_loss(out.stage_taps, self.evo_skip_unchanged)
        else:
            l_evo = evolution_loss(out.stage_features, self.evo_form)

        total = (
            cls_loss
            + self.rate_weight * r_loss
            + self.w_logits * l_logits
            + self.w_path * l_path
            + self.w_evo * l_evo
        )
        logs.update(
            {
                "ce": per_head_ce[-1].detach(),
                "cls": cls_loss.detach(),
                "logits_kd": l_logits.detach(),
                "path_kd": l_path.detach(),
                "evo": l_evo.detach(),
            }
        )
        for k, ce_k in enumerate(per_head_ce[:-1], start=1):
            logs[f"ce_o{k}"] = ce_k.detach()
        return total, logs

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Step counter + the teacher's parameters *and* buffers (live references, like ``nn.Module.state_dict``)."""
        state = super().state_dict()
        state["teacher"] = self.teacher.state_dict()
        state["ema_momentum"] = self.momentum
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "teacher" not in state:
            raise KeyError("SP-Net method state has no 'teacher' entry")
        self.teacher.load_state_dict(state["teacher"], strict=True)
