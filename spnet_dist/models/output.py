"""The single forward-output type of every dynamic model."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ModelOutput:
    logits: torch.Tensor               # B×num_classes, final classifier (o_4)
    gates: torch.Tensor                # B×L hard decisions in {0,1} (float, straight-through grads in training); ungated = 1.0
    gate_logits: torch.Tensor          # B×L×K raw router logits (pre-Gumbel); ungated blocks = zeros
    head_logits: list[torch.Tensor]    # [o_1, o_2, o_3, o_4] with multi-stage heads, else [logits]
    stage_features: list[torch.Tensor] # aligned pooled features [f_1..f_4], each B×C_final (single head: [pooled final])
    # per stage (f_first, f_mid, f_last): pooled outputs of its first, middle and last block; only when the model's
    # ``stage_taps`` is on (SP-Net's official CIFAR L_evo, spec §5.e), else empty
    stage_taps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
