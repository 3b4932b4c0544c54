"""GFLOPs conventions (spec §1.3): ``gflops_paper`` is 2 x MACs in the papers' ResNet v1 layout (ResNet-50 at full
execution 7.716, the tables' 7.72) whatever layout is trained; ``gflops_trained`` is the trained layout's own count
(torchvision v1.5: 8.178). Known values are the spec's exact MAC counts, not the formulas of ``models.cost``."""
from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch
from conftest import TINY_CLASSES, last_json, run_spnet, tiny_train_args

from spnet_dist.models import build_model, cost_metrics, cost_params, cost_table, macs_per_image
from spnet_dist.models.cost import paper_gates

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _at_rates(table, rates: list[float]) -> dict:
    """cost_metrics of one image whose blocks executed with these gate values, counted in both layouts."""
    gates = torch.tensor([rates], dtype=torch.float64)
    return cost_metrics(table, float(macs_per_image(table, gates)),
                        float(macs_per_image(table.paper_view(), paper_gates(table, gates))))


@pytest.fixture(scope="module")
def rn50_spnet():
    return build_model("resnet50", {"router": {"type": "spnet"}, "multi_stage_heads": True})


def test_resnet50_full_execution_is_7716_in_the_papers_convention() -> None:
    plain = cost_table(build_model("resnet50", {"router": {"type": "none"}}))  # a static ResNet-50: 16 ungated
    m = _at_rates(plain, [1.0] * 16)
    assert round(m["gflops_paper"], 3) == 7.716          # spec 1.3: v1 2 x MAC = 7.7159 (the tables' 7.72)
    assert m["macs_paper"] == 3_857_973_248              # spec 1.3, exact v1 MACs
    assert round(m["gflops_trained"], 3) == 8.178        # the trained v1.5 layout counts more: 8.1784
    assert m["macs_per_image"] == 4_089_184_256          # spec 1.3, exact v1.5 MACs
    assert "v1 layout" in m["cost_convention"] and "v1.5 layout" in m["cost_convention"]
    params = cost_params(plain)
    assert params["cost.full_gflops_paper"] == "7.7159" and params["cost.full_gflops_trained"] == "8.1784"
    assert params["cost.paper_layout"] == "v1" and params["cost.trained_layout"] == "ResNet v1.5 layout"


def test_spnet_resnet50_full_execution_adds_only_its_routers(rn50_spnet) -> None:
    table = cost_table(rn50_spnet)
    m = _at_rates(table, [1.0] * 16)
    # the 16 SP-Net routers (C_in x 128 + 256 MACs each, spec 1.3: ~1.68 M together) always run, in both layouts
    routers = 2 * (64 + 3 * 256 + 4 * 512 + 6 * 1024 + 2 * 2048) * 128 / 1e9 + 2 * 16 * 256 / 1e9
    assert m["gflops_paper"] == pytest.approx(7.715946496 + routers, abs=1e-9)
    assert round(m["gflops_paper"] - routers, 3) == 7.716
    assert m["gflops_trained"] == pytest.approx(8.178368512 + routers, abs=1e-9)
    assert table.paper is not None and table.paper.variant == "v1" and table.variant == "v1.5"
    assert rn50_spnet.layer2[0].conv2.stride == (2, 2)  # counting the v1 layout left the model as it was


def test_no_execution_differs_only_by_the_first_blocks_of_stages() -> None:
    table = cost_table(build_model("resnet50", {"router": {"type": "spnet"}}))
    none, full = _at_rates(table, [0.0] * 16), _at_rates(table, [1.0] * 16)
    assert none["macs_paper"] == none["macs_per_image"]  # stem + projections + routers + fc: same in both layouts
    # residual branches, spec 1.3: v1 3.3782 G, v1.5 3.6095 G
    assert (full["macs_paper"] - none["macs_paper"]) / 1e9 == pytest.approx(3.3782, abs=1e-4)
    assert (full["macs_per_image"] - none["macs_per_image"]) / 1e9 == pytest.approx(3.6095, abs=1e-4)


def test_basic_block_resnets_have_one_layout() -> None:
    table = cost_table(build_model("resnet110_cifar", {"router": {"type": "none"}}))
    assert table.paper is None
    m = _at_rates(table, [1.0] * 54)
    assert m["gflops_paper"] == m["gflops_trained"] == pytest.approx(0.5058, abs=1e-4)  # spec 1.3: 252,887,680 x 2


def test_rdinet_light_path_is_recounted_in_the_v1_layout() -> None:
    from spnet_dist.models.rdinet import RDIResNet

    net = RDIResNet(router={"type": "relational"})  # ResNet-50, v1.5
    table = cost_table(net)
    rho = net.light_fractions[3]  # layer2.0: light = conv1 + conv3
    gates = torch.zeros(1, 16, dtype=torch.float64)
    light = gates.clone()
    light[0, 3] = rho
    own = float(macs_per_image(table, light) - macs_per_image(table, gates))
    v1 = float(macs_per_image(table.paper, paper_gates(table, light)) - macs_per_image(table.paper, gates))
    assert own == pytest.approx(256 * 128 * 56 * 56 + 128 * 512 * 28 * 28)  # v1.5: the 1x1 runs at 56x56
    assert v1 == pytest.approx(256 * 128 * 28 * 28 + 128 * 512 * 28 * 28)   # v1: the 1x1 strides to 28x28
    assert torch.equal(paper_gates(table, torch.ones(2, 16)), torch.ones(2, 16, dtype=torch.float64))


def _tiny_v1_macs(rates: list[float]) -> float:
    """resnet_tiny with AIG gates (hidden 16) at 32 px, counted by hand in the v1 layout (stride on the first 1x1)."""
    fixed = 7 * 7 * 3 * 16 * 16 * 16  # stem at 16x16, then max-pool to 8x8
    total, c_in, hw = 0.0, 16, 8
    for i, (w, r) in enumerate(zip((8, 16, 32, 64), rates)):
        out = hw if i == 0 else hw // 2
        total += r * (c_in * w * out * out + 9 * w * w * out * out + w * 4 * w * out * out)
        fixed += c_in * 4 * w * out * out + c_in * 16 + 16 * 2
        c_in, hw = 4 * w, out
    return fixed + c_in * TINY_CLASSES + total


def test_a_tiny_run_logs_both_conventions(tiny_data, tmp_path) -> None:
    summary = last_json(run_spnet(*tiny_train_args(tiny_data, tmp_path, "trainer.max_steps=2"), cwd=tmp_path).stdout)
    v1 = _tiny_v1_macs(summary["block_rates"])
    assert summary["macs_paper"] == pytest.approx(v1, rel=1e-4)  # block rates are rounded to 4 digits
    assert summary["gflops_paper"] == pytest.approx(2 * summary["macs_paper"] / 1e9)
    assert summary["gflops_trained"] == pytest.approx(2 * summary["macs_per_image"] / 1e9)
    assert summary["macs_per_image"] > summary["macs_paper"] or max(summary["block_rates"][1:]) == 0
    assert "v1 layout" in summary["cost_convention"]
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{Path(tmp_path) / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    m = run.data.metrics
    assert m["val/gflops_paper"] == pytest.approx(summary["gflops_paper"])
    assert m["val/gflops_trained"] == pytest.approx(summary["gflops_trained"])
    assert m["val/macs_paper"] == pytest.approx(summary["macs_paper"])
    assert run.data.params["cost.paper_layout"] == "v1"
    assert run.data.params["cost.convention"] == summary["cost_convention"]


def test_frontier_places_runs_in_the_papers_convention(tmp_path) -> None:
    """A run with the v1 count is drawn (and compared) at 2 x macs_paper, the reference rows' convention; a run
    logged before the v1 count is kept at its trained-layout count and flagged."""
    from spnet_dist.tracking.frontier import LEGACY, PAPER, frontier

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("conv", artifact_location=str(tmp_path / "artifacts"))
    ids = {}
    for name, metrics in {"new": {"val/macs_per_image": 4.0e9, "val/macs_paper": 3.0e9, "val/top1": 0.70},
                          "legacy": {"val/macs_per_image": 3.5e9, "val/top1": 0.69}}.items():
        r = client.create_run(exp, run_name=name)
        for k, v in metrics.items():
            client.log_metric(r.info.run_id, k, v, step=1)
        client.set_terminated(r.info.run_id, "FINISHED")
        ids[r.info.run_id] = name
    out = frontier(uri, "conv", reference=True)
    # v1: new at 6.0 GFLOPs dominates legacy at 7.0; in the trained layout (8.0 vs 7.0) both would be on the frontier
    assert [(ids[p["run_id"]], p["gflops_paper"]) for p in out["frontier"]] == [("new", 6.0)]
    assert out["legacy_cost_runs"] == 1
    path = client.download_artifacts(out["frontier_run_id"], "frontier.json", str(tmp_path))
    import json

    data = json.loads(Path(path).read_text())
    rows = [dict(zip(data["columns"], row)) for row in data["data"]]
    conv = {ids.get(r["run_id"], r["source"]): r["cost_convention"] for r in rows}
    assert conv["new"] == PAPER and conv["legacy"] == LEGACY and conv["paper"] == "papers' v1 layout" == PAPER
