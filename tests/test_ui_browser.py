"""`spnet ui` in headless Chromium: the runs table, the compare view and the frontier plot render; Ctrl-C stops it.

Screenshots are kept in test-artifacts/ (git-ignored); with SPNET_UPDATE_DOCS=1 they are also copied to docs/.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spnet_dist.tracking.ui import free_port, healthy, ui_urls

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
RUNS = {"aig-t0.5-browser": (0.6123, 2.0e6), "spnet-t0.7-browser": (0.7345, 3.0e6)}  # name: (top-1, MACs/image)

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"{CHROMIUM} is missing (install it: `make system-deps` or apt-get install "
                                       "chromium); the browser test needs it")


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture
def ui_server(tmp_path):
    """`spnet ui` (hence `mlflow server`) on a free loopback port against a fresh SQLite store."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "ui.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "spnet_dist.cli", "ui", "--uri",
                             f"sqlite:///{tmp_path / 'mlflow.db'}", "--port", str(port)],
                            cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not healthy(base) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.25)
    if not healthy(base):
        proc.kill()
        pytest.fail(f"spnet ui did not come up: {(tmp_path / 'ui.log').read_text()[-2000:]}")
    yield base, proc
    if proc.poll() is None:
        for pid in _descendants(proc.pid):  # clean up after a failed test
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        proc.kill()
    log.close()


def _log_runs(base: str) -> tuple[str, list[str], str]:
    import mlflow

    from spnet_dist.tracking.frontier import frontier

    client = mlflow.MlflowClient(tracking_uri=base)
    exp = client.create_experiment("browser")
    ids = []
    for name, (top1, macs) in RUNS.items():
        run = client.create_run(exp, run_name=name, tags={"method": name.split("-")[0]})
        client.log_param(run.info.run_id, "method.target_rate", name.split("-")[1][1:])
        for step, value in ((1, top1 - 0.1), (2, top1)):
            client.log_metric(run.info.run_id, "val/top1", value, step=step)
        client.log_metric(run.info.run_id, "val/macs_per_image", macs, step=2)
        client.set_terminated(run.info.run_id)
        ids.append(run.info.run_id)
    front = frontier(base, "browser", reference=True)
    return exp, ids, front["frontier_run_id"]


def test_runs_compare_and_frontier_pages_render(ui_server):
    from playwright.sync_api import sync_playwright

    base, proc = ui_server
    exp, ids, frontier_id = _log_runs(base)
    urls = ui_urls(base, exp, ids)
    pages = {  # name: (url, texts that must be rendered)
        "ui-runs": (urls["runs"] + "?orderByKey=metrics.%60val%2Ftop1%60&orderByAsc=false",
                    [*RUNS, "val/top1"]),
        "ui-compare": (urls["compare"], [*RUNS, "Comparing 2 Runs", "val/top1", *(str(v[0]) for v in RUNS.values())]),
        "ui-frontier": (f"{base}/#/experiments/{exp}/runs/{frontier_id}/artifacts/pareto.png",
                        ["pareto.png", "frontier.json"]),
    }
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                          "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            for name, (url, texts) in pages.items():
                page.goto(url, wait_until="domcontentloaded")  # "networkidle" never fires: the UI polls
                for text in texts:
                    page.get_by_text(text, exact=False).first.wait_for(timeout=60_000)
                if name == "ui-frontier":
                    page.locator("img[src^='blob:']").first.wait_for(timeout=60_000)  # the PNG preview
                try:  # the side panel of the MLflow assistant takes a third of the page
                    page.get_by_role("button", name="Close").first.click(timeout=2_000)
                except Exception:  # noqa: BLE001 - not there in every version
                    pass
                time.sleep(1.0)  # let charts settle for the screenshot
                body = page.inner_text("body")
                assert all(t in body for t in texts), (name, [t for t in texts if t not in body])
                page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
        finally:
            browser.close()
    if os.environ.get("SPNET_UPDATE_DOCS"):
        for name in pages:
            shutil.copy(ARTIFACTS / f"{name}.png", REPO / "docs" / f"{name}.png")

    # Ctrl-C (SIGINT to `spnet ui` only: the server runs in its own session) stops the server's whole group
    server_pids = _descendants(proc.pid)
    assert server_pids, "spnet ui started no server process"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=180) == 0  # generous: on a loaded machine the server stops slowly
    time.sleep(0.5)
    import psutil

    alive = [pid for pid in server_pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert not alive and not healthy(base)
