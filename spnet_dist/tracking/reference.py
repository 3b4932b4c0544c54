"""Published ImageNet operating points, for ``spnet frontier --reference``.

Source: SP-Net (Slowly Progressing Dynamic Inference Networks, ECCV 2022), table "Comparison with
state-of-the-arts on ImageNet" (project overview, shared/papers/spnet-eccv2022-overview.txt). Numbers are copied
as printed. Convention of the papers: "GMACCs" = 2 x multiply-adds of ResNet v1 (ResNet-50: 7.72, spec §1.3), i.e.
the same number as ``gflops_paper`` / ``val/gflops_paper`` of a run here (counted in the v1 layout whatever layout was
trained; the trained layout's own count is ``gflops_trained``); ``macs_per_image`` = GFLOPs / 2 x 1e9. Top-1 in %.
The table's early-prediction rows on other backbones (MSDN, RA-Net, IamNN, ACT, SACT) are not included.
"""
from __future__ import annotations

# (method, backbone, GFLOPs in the papers' 2 x MAC convention, top-1 %, kind)
IMAGENET: list[tuple[str, str, float, float, str]] = [
    ("ResNet-50", "ResNet-50", 7.72, 75.36, "static"),
    ("ResNet-101", "ResNet-101", 15.26, 76.45, "static"),
    ("ConvAIG", "ResNet-50", 6.12, 76.18, "dynamic inference"),
    ("SkipNet", "ResNet-101", 13.40, 77.40, "dynamic inference"),
    ("SkipNet (light)", "ResNet-101", 7.20, 75.22, "dynamic inference"),
    ("LCNet", "ResNet-50", 5.78, 74.10, "dynamic inference"),
    ("BlockDrop", "ResNet-101", 14.64, 76.80, "dynamic inference"),
    ("DG-Net", "ResNet-101", 14.10, 76.80, "dynamic inference"),
    ("CoDiNet", "ResNet-50", 6.20, 76.63, "dynamic inference"),
    ("RDI-Net", "ResNet-50", 7.42, 76.96, "dynamic inference"),
    ("SP-Net", "ResNet-50", 7.24, 77.21, "ours (SP-Net paper)"),
    ("SP-Net (light)", "ResNet-50", 5.62, 76.41, "ours (SP-Net paper)"),
]


def reference_points() -> list[dict]:
    """The rows above as frontier points (``macs_per_image`` derived from the 2 x MAC figure)."""
    return [{"label": f"{m} ({b})", "method": m, "backbone": b, "gflops_paper": g, "top1": t / 100.0,
             "macs_per_image": g / 2 * 1e9, "cost_convention": "papers' v1 layout", "kind": k, "source": "paper"}
            for m, b, g, t, k in IMAGENET]
