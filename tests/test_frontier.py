"""`spnet frontier`: the Pareto set of hand-made runs (ties, dominated points, unfinished runs) and what it logs."""
from __future__ import annotations

import json
import random
from pathlib import Path

import mlflow
import pytest
from conftest import last_json, run_spnet

from spnet_dist.tracking.frontier import dominated_by, frontier, pareto_flags
from spnet_dist.tracking.reference import IMAGENET, reference_points

# name: (macs per image, top-1) — logged as val/macs_per_image and val/top1 of a FINISHED run
POINTS = {
    "cheapest": (0.5e6, 0.30),       # frontier: nothing is cheaper
    "a": (1.0e6, 0.50),              # frontier
    "tie-1": (2.0e6, 0.60),          # frontier, tied with tie-2 (equal points do not dominate each other)
    "tie-2": (2.0e6, 0.60),          # frontier
    "same-cost-worse": (2.0e6, 0.55),  # dominated by the ties (equal cost, lower top-1)
    "same-acc-dearer": (3.0e6, 0.60),  # dominated by the ties (equal top-1, higher cost)
    "f": (3.0e6, 0.70),              # frontier
    "g": (4.0e6, 0.65),              # dominated by f
}
FRONTIER = {"cheapest", "a", "tie-1", "tie-2", "f", "gflops-only"}


def brute_force(points):
    return [not any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for j, (c2, a2) in enumerate(points) if j != i)
            for i, (c, a) in enumerate(points)]


def test_pareto_flags_match_the_definition():
    rng = random.Random(0)
    for _ in range(300):  # small integer grids force many ties
        pts = [(rng.randint(0, 6), rng.randint(0, 6)) for _ in range(rng.randint(1, 25))]
        assert pareto_flags(pts) == brute_force(pts), pts
    assert pareto_flags([]) == []
    assert pareto_flags([(1.0, 0.5)]) == [True]
    assert pareto_flags([(1.0, 0.5), (1.0, 0.5)]) == [True, True]       # exact tie: both stay
    assert pareto_flags([(1.0, 0.5), (1.0, 0.4)]) == [True, False]      # equal cost, lower accuracy
    assert pareto_flags([(1.0, 0.5), (2.0, 0.5)]) == [True, False]      # equal accuracy, higher cost
    assert dominated_by([(1.0, 0.5), (2.0, 0.5), (0.5, 0.6)], 1) == 2   # the cheapest dominating point


def test_reference_rows_are_the_papers_imagenet_table():
    rows = {m: (g, t) for m, _, g, t, _ in IMAGENET}
    assert rows["ResNet-50"] == (7.72, 75.36) and rows["ResNet-101"] == (15.26, 76.45)
    assert rows["SP-Net"] == (7.24, 77.21) and rows["SP-Net (light)"] == (5.62, 76.41)
    assert rows["ConvAIG"] == (6.12, 76.18) and rows["SkipNet"] == (13.40, 77.40)
    assert rows["BlockDrop"] == (14.64, 76.80) and rows["CoDiNet"] == (6.20, 76.63)
    assert rows["RDI-Net"] == (7.42, 76.96) and rows["LCNet"] == (5.78, 74.10) and rows["DG-Net"] == (14.10, 76.80)
    ref = {p["method"]: p for p in reference_points()}
    assert ref["ResNet-50"]["macs_per_image"] == pytest.approx(3.86e9)  # papers' GFLOPs = 2 x MACs


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with hand-made runs logged directly through the MLflow client."""
    tmp = tmp_path_factory.mktemp("frontier")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("sweep", artifact_location=str(tmp / "artifacts"))
    ids = {}

    def run(name, metrics, status="FINISHED", tags=None):
        r = client.create_run(exp, run_name=name, tags=tags or {"method": "aig"})
        for step, values in enumerate(metrics, 1):
            for k, v in values.items():
                client.log_metric(r.info.run_id, k, v, step=step)
        client.set_terminated(r.info.run_id, status) if status != "RUNNING" else None
        ids[name] = r.info.run_id

    for name, (macs, top1) in POINTS.items():
        run(name, [{"val/macs_per_image": macs, "val/top1": top1}])
    run("gflops-only", [{"val/gflops_paper": 0.01, "val/top1": 0.75}])           # 5e6 MACs: frontier
    run("latest-counts", [{"val/macs_per_image": 1.0e6, "val/top1": 0.99},        # step 1 would dominate all
                          {"val/macs_per_image": 1.0e6, "val/top1": 0.40}])       # latest (step 2): dominated
    run("running", [{"val/macs_per_image": 0.1e6, "val/top1": 0.99}], status="RUNNING")
    run("failed", [{"val/macs_per_image": 0.1e6, "val/top1": 0.99}], status="FAILED")
    run("no-top1", [{"val/macs_per_image": 0.1e6}])
    run("old-frontier", [{"val/macs_per_image": 0.1e6, "val/top1": 0.99}], tags={"spnet.kind": "frontier"})
    return tmp, uri, client, exp, ids


def _table(client, run_id, tmp: Path) -> list[dict]:
    path = client.download_artifacts(run_id, "frontier.json", str(tmp))
    data = json.loads(Path(path).read_text())
    return [dict(zip(data["columns"], row)) for row in data["data"]]


def test_frontier_of_hand_made_runs_is_exactly_the_pareto_set(store, tmp_path):
    _, uri, client, exp, ids = store
    summary = frontier(uri, "sweep")
    names = {ids[n]: n for n in ids}
    assert {names[p["run_id"]] for p in summary["frontier"]} == FRONTIER
    assert summary["runs"] == len(POINTS) + 2          # + gflops-only, latest-counts
    assert summary["skipped_runs"] == 1                # no-top1
    ties = {names[p["run_id"]]: p["tied_with"] for p in summary["frontier"]}
    assert ties["tie-1"] == ids["tie-2"] and ties["tie-2"] == ids["tie-1"] and ties["a"] == ""
    gflops_only = next(p for p in summary["frontier"] if p["run_id"] == ids["gflops-only"])
    assert gflops_only["macs_per_image"] == pytest.approx(5e6)

    rid = summary["frontier_run_id"]
    run = client.get_run(rid)
    assert run.info.run_name == "frontier" and run.info.status == "FINISHED"
    assert run.data.tags["spnet.kind"] == "frontier"
    assert run.data.metrics["frontier/points"] == len(FRONTIER)
    assert {a.path for a in client.list_artifacts(rid)} == {"pareto.png", "frontier.json", "frontier.csv"}
    rows = {names[r["run_id"]]: r for r in _table(client, rid, tmp_path)}
    assert {n for n, r in rows.items() if r["on_frontier"]} == FRONTIER
    assert rows["same-cost-worse"]["dominated_by"] in (ids["tie-1"], ids["tie-2"])
    assert rows["same-acc-dearer"]["dominated_by"] in (ids["tie-1"], ids["tie-2"])
    assert rows["g"]["dominated_by"] == ids["f"]
    assert rows["latest-counts"]["dominated_by"] == ids["a"] and rows["latest-counts"]["top1"] == 0.40
    assert not {"running", "failed", "no-top1", "old-frontier"} & set(rows)

    again = frontier(uri, "sweep")  # the first frontier run is not a point of the second
    assert again["runs"] == summary["runs"] and again["frontier"] == summary["frontier"]


def test_frontier_cli_with_reference_rows(store, tmp_path):
    _, uri, client, _, ids = store
    out = last_json(run_spnet("frontier", "--uri", uri, "--experiment", "sweep", "--reference", cwd=tmp_path).stdout)
    assert out["reference"] is True and len(out["frontier"]) == len(FRONTIER)
    rows = _table(client, out["frontier_run_id"], tmp_path)
    refs = {r["label"]: r for r in rows if r["source"] == "paper"}
    assert len(refs) == len(IMAGENET)
    assert refs["SP-Net (ResNet-50)"]["gflops_paper"] == 7.24 and refs["SP-Net (ResNet-50)"]["on_frontier"]
    assert not refs["RDI-Net (ResNet-50)"]["on_frontier"]  # SP-Net: cheaper and more accurate
    bad = run_spnet("frontier", "--uri", uri, "--experiment", "nope", cwd=tmp_path, check=False)
    assert bad.returncode == 2 and "no experiment named 'nope'" in bad.stderr and "Traceback" not in bad.stderr
