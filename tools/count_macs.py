"""Print baseline ResNet MACs and an SP-Net model's expected MACs at a target execution rate.

Usage: python tools/count_macs.py [--rate 0.7] [--model resnet50] [--variant v1.5] [--router spnet]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spnet_dist.models import MODELS, build_model, cost_table  # noqa: E402

BASELINES = [("resnet32_cifar", None), ("resnet110_cifar", None), ("resnet50", "v1"), ("resnet50", "v1.5"),
             ("resnet101", "v1"), ("resnet101", "v1.5")]
CONVENTION = ("MACs = multiply-accumulates of Conv2d+Linear layers (no BN/ReLU/pool/bias); the papers' "
              "'GFLOPs' = 2 x MACs (their ResNet-50 baseline 7.72 = 2 x ResNet v1 MACs)")


def baseline_table() -> None:
    print(f"Baseline ResNets (plain backbone: no routers, no auxiliary heads). {CONVENTION}.")
    print(f"{'model':<18}{'layout':<8}{'input':>8}{'GMACs':>10}{'2xMAC (papers)':>16}")
    for name, variant in BASELINES:
        cfg = {"name": name} if variant is None else {"name": name, "variant": variant}
        t = cost_table(build_model(cfg, {"router": {"type": "none"}}))
        layout = variant or "basic/A"
        size = f"{t.image_size[0]}px"
        print(f"{name:<18}{layout:<8}{size:>8}{t.full() / 1e9:>10.4f}{2 * t.full() / 1e9:>16.4f}")


def rate_table(model: str, variant: str | None, router: str, rate: float, image_size: int | None) -> None:
    cfg = {"name": model} if variant is None else {"name": model, "variant": variant}
    m = build_model(cfg, {"router": {"type": router}, "multi_stage_heads": True})
    t = cost_table(m, image_size)
    exp = t.expected(rate)
    print(f"\n{model} ({t.variant}, {router} routers, {t.image_size[0]}x{t.image_size[1]}) at target rate t={rate}: "
          f"expected = fixed + t * sum(gated blocks) [+ ungated blocks]. {t.convention}.")
    rows = [("stem", t.breakdown["stem"]), ("projection shortcuts", t.breakdown["projections"]),
            ("routers", t.routers), ("final fc", t.breakdown["classifier"]), ("fixed (always run)", t.fixed),
            (f"residual branches, all {len(t.blocks)}", sum(t.blocks)), ("full execution", t.full()),
            (f"expected at t={rate}", exp),
            ("aux heads (training only, separate)", t.heads), (f"expected at t={rate} + aux heads", exp + t.heads)]
    print(f"{'':<40}{'GMACs':>10}{'2xMAC':>10}")
    for label, v in rows:
        print(f"{label:<40}{v / 1e9:>10.4f}{2 * v / 1e9:>10.4f}")
    if t.variant != "v1":
        v1 = cost_table(m, image_size, variant="v1")
        print(f"(same model counted in the v1 layout: expected {v1.expected(rate) / 1e9:.4f} GMACs = "
              f"{2 * v1.expected(rate) / 1e9:.4f} papers' GFLOPs; full {2 * v1.full() / 1e9:.4f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=0.7, help="target execution rate t of gated blocks")
    p.add_argument("--model", default="resnet50", choices=sorted(MODELS))
    p.add_argument("--variant", default=None, choices=["v1", "v1.5"], help="default: the model config's")
    p.add_argument("--router", default="spnet", choices=["spnet", "aig"])
    p.add_argument("--image-size", type=int, default=None, help="default: the model config's image_size")
    a = p.parse_args()
    if not 0.0 <= a.rate <= 1.0:
        p.error("--rate must be in [0, 1]")
    baseline_table()
    rate_table(a.model, a.variant, a.router, a.rate, a.image_size)


if __name__ == "__main__":
    main()
