"""What a user sees, in a real browser: the MLflow UI medx links to, and medx.serve's /docs.

A real 2-job sweep (`python -m medx.train -m`, tiny settings) fills a sqlite store; `mlflow
server` serves it on a loopback port; Debian's chromium (`apt-get install chromium`, as
.ci/run does), driven by Playwright, opens the links. Playwright's own browser download cannot
work here, hence `executable_path`. The sweep's learning rates are chosen so that a job's best
epoch is not its last: the ranking must follow the selected checkpoint, not the last epoch.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from medx_cli import run_train, store, sweep_runs
from mlflow import MlflowClient

from medx import compare, ui

pytestmark = pytest.mark.slow  # a real sweep, an MLflow server and a browser

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 90_000  # the UI's first load on a busy CI machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Sweep:
    store: str
    parent: str
    jobs: dict[str, str]  # run name -> run id
    link: str  # the one link the sweep printed


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, phantom_cache: Path) -> Sweep:
    root = tmp_path_factory.mktemp("sweep")
    out = run_train(
        root,
        phantom_cache,
        "optimizer.lr=1e-3,3e-2",
        "trainer.max_epochs=3",
        "callbacks.early_stopping=null",
        multirun=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    printed = out.stdout + out.stderr  # Hydra logs to stdout
    links = re.findall(r"Compare this sweep's runs in the MLflow UI.*:\s+(http\S+)", printed)
    assert len(links) == 1, out.stderr[-3000:]
    parent, jobs = sweep_runs(root, "medx")
    return Sweep(
        store(root), parent.info.run_id, {r.info.run_name: r.info.run_id for r in jobs}, links[0]
    )


@pytest.fixture(scope="module")
def mlflow_ui(sweep: Sweep, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """`mlflow server` on the sweep's store, on a free loopback port (its port)."""
    port = free_port()
    log = tmp_path_factory.mktemp("mlflow") / "server.log"
    mlflow = Path(sys.executable).parent / "mlflow"
    command = [str(mlflow), "server", "--backend-store-uri", sweep.store]
    command += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("w") as sink:
        server = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
        yield port
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        yield chromium
        chromium.close()


def run_names_in_order(page) -> list[str]:
    """The runs table's run names, top to bottom."""
    page.locator('.ag-row [col-id="attributes.`Run Name`"]').first.wait_for(timeout=WAIT_MS)
    rows = page.evaluate(
        """() => [...document.querySelectorAll('.ag-row')]
              .map(r => [Number(r.getAttribute('row-index')),
                         r.querySelector('[col-id="attributes.`Run Name`"]')])
              .filter(([, cell]) => cell)
              .map(([i, cell]) => [i, cell.textContent.replace(/^#[0-9a-f]{6}/, '')])"""
    )
    return [name for _, name in sorted(rows)]


def in_model_training_mode(page) -> bool:
    """The side bar of "Model training": the experiment's Runs and Models, no GenAI pages."""
    links = page.evaluate("() => [...document.querySelectorAll('a')].map(a => a.textContent)")
    runs = page.locator('a[href*="/runs?"][href*="workflowType=machine_learning"]')
    return runs.count() > 0 and "Models" in links and not {"Judges", "Sessions"} & set(links)


def wait_for_first_columns(page, expected: list[str]) -> None:
    """Until the table's first metric and param columns are `expected` (the view applies its
    column order once the runs have loaded); a timeout if they never are."""
    page.wait_for_function(
        """expected => {
            const ids = [...document.querySelectorAll('.ag-header-cell[col-id]')]
                .sort((a, b) => a.getBoundingClientRect().x - b.getBoundingClientRect().x)
                .map(c => c.getAttribute('col-id'))  // left to right as shown, not DOM order
                .filter(id => id.startsWith('metrics.') || id.startsWith('params.'));
            return expected.every((id, i) => ids[i] === id);
        }""",
        arg=expected,
        timeout=WAIT_MS,
    )


def test_a_sweep_whose_best_epoch_is_not_its_last_ranks_by_the_best(sweep: Sweep, capsys):
    client = MlflowClient(sweep.store)
    best = {}
    for name, run_id in sweep.jobs.items():
        history = client.get_metric_history(run_id, "val/auroc")
        top = max(history, key=lambda m: (m.value, -m.step))
        best[name] = top.value
        run = client.get_run(run_id)
        assert run.data.metrics["val/auroc_best"] == pytest.approx(top.value)
        assert run.data.metrics["val/auroc_best_epoch"] == top.step
        last = max(history, key=lambda m: m.step)
        best[name, "peaked early"] = top.step < last.step and top.value > last.value
    assert any(best[n, "peaked early"] for n in sweep.jobs), "no job peaked before its last epoch"
    ranked = sorted(sweep.jobs, key=lambda n: -best[n])

    parent = client.get_run(sweep.parent)
    assert parent.data.tags["medx.best_run_name"] == ranked[0]
    assert parent.data.metrics["val/auroc_best"] == pytest.approx(best[ranked[0]])
    assert (
        parent.data.params["best.optimizer.lr"]
        == client.get_run(sweep.jobs[ranked[0]]).data.params["optimizer.lr"]
    )
    assert parent.data.tags["mlflow.note.content"].startswith(f"**Best: {ranked[0]}**")
    board = Path(client.download_artifacts(sweep.parent, "leaderboard.csv"))
    with board.open() as file:
        assert [row["run_name"] for row in csv.DictReader(file)] == ranked

    compare.main(["--tracking-uri", sweep.store, "--parent", sweep.parent])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines[1:]] == ranked
    assert set(sweep.jobs) == {"lr=0.001", "lr=0.03"}  # named by the swept value


def test_the_link_medx_ui_prints_opens_the_runs_table_in_model_training_mode(
    sweep: Sweep, mlflow_ui: int, browser
):
    lines = ui.main(["--backend-store-uri", sweep.store, "--port", str(mlflow_ui)])
    url = lines.splitlines()[0].split(": ", 1)[1]
    page = browser.new_page(viewport={"width": 1600, "height": 1000})

    page.goto(url)

    names = run_names_in_order(page)
    assert sorted(names) == sorted(sweep.jobs)  # both jobs, no sweep parent row
    assert in_model_training_mode(page)
    selected = ["metrics.`val/auroc_best`", "metrics.`val/auroc_best_epoch`"]
    wait_for_first_columns(page, [*selected, "metrics.`test/auroc`"])
    client = MlflowClient(sweep.store)
    by_best = sorted(
        sweep.jobs, key=lambda n: -client.get_run(sweep.jobs[n]).data.metrics["val/auroc_best"]
    )
    assert names == by_best
    page.close()


def test_the_link_a_sweep_prints_shows_its_jobs_by_the_selection_metric_and_swept_params(
    sweep: Sweep, mlflow_ui: int, browser
):
    served = urlsplit(sweep.link)._replace(netloc=f"127.0.0.1:{mlflow_ui}").geturl()
    page = browser.new_page(viewport={"width": 1600, "height": 1000})

    page.goto(served)

    names = run_names_in_order(page)
    assert sorted(names) == sorted(sweep.jobs)
    assert in_model_training_mode(page)
    selected = ["metrics.`val/auroc_best`", "metrics.`val/auroc_best_epoch`"]
    wait_for_first_columns(page, [*selected, "params.`optimizer.lr`"])
    assert page.get_by_text("Sort: val/auroc_best").count() == 1
    page.close()


def test_the_api_page_renders_predict_with_no_request_leaving_the_machine(browser, tmp_path):
    import uvicorn

    from medx.serve.app import create_app
    from medx.serve.settings import Settings

    port = free_port()
    settings = Settings(model=str(tmp_path / "absent.ckpt"), port=port, token="secret-token")
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    requested: list[str] = []
    page = browser.new_page()
    page.on("request", lambda request: requested.append(request.url))
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive()
            time.sleep(0.1)

        page.goto(f"http://127.0.0.1:{port}/docs")

        operation = page.locator(".opblock-summary-path", has_text="/predict").first
        operation.wait_for(timeout=WAIT_MS)  # Swagger UI ran, and read the API
        assert page.locator(".opblock-post").count() >= 1
        page.wait_for_load_state("networkidle")
    finally:
        page.close()
        server.should_exit = True
        thread.join(30)
    hosts = {urlsplit(url).netloc for url in requested if not url.startswith("data:")}
    assert hosts == {f"127.0.0.1:{port}"}, requested  # no CDN, no validator, nothing else
    assert any(url.endswith("/docs/assets/swagger-ui-bundle.js") for url in requested)
