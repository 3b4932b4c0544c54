"""SP-Net multi-stage heads: per-stage alignment to the final width plus a classifier (spec 5.b.4)."""
from __future__ import annotations

import torch
import torch.nn as nn


class MultiStageHeads(nn.Module):
    """Auxiliary heads for every stage but the last: f_k = align_k(g_k), o_k = fc_k(f_k).

    The last stage uses the identity alignment and the model's own ``fc`` (torchvision-loadable).
    """

    def __init__(self, stage_channels: list[int], num_classes: int) -> None:
        super().__init__()
        c_final = stage_channels[-1]
        self.align = nn.ModuleList(nn.Linear(c, c_final) for c in stage_channels[:-1])
        self.fc = nn.ModuleList(nn.Linear(c_final, num_classes) for _ in stage_channels[:-1])

    def forward(self, pooled: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """pooled: [g_1..g_{S-1}] → ([f_1..f_{S-1}], [o_1..o_{S-1}])."""
        feats = [a(g) for a, g in zip(self.align, pooled)]
        return feats, [fc(f) for fc, f in zip(self.fc, feats)]
