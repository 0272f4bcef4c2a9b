"""A team tracking server: a real `mlflow server` on a loopback port, a run logged to it over
HTTP, and the run found again through the REST API with plain HTTP, as any other tool would."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from medx.train import train

START_TIMEOUT_S = 180  # a cold `mlflow server` on two busy cores takes 10-30 s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(uri: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(
                f"mlflow server exited with {server.returncode}:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"{uri}/health did not answer in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def tracking_server(tmp_path: Path) -> Iterator[str]:
    """`mlflow server` as `make mlflow-server` starts it: sqlite backend, artifacts proxied by
    the server into its own folder (clients need no access to the storage)."""
    uri, log = f"http://127.0.0.1:{free_port()}", tmp_path / "server.log"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{tmp_path}/server.db",
        "--artifacts-destination",
        str(tmp_path / "server_artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        uri.rsplit(":", 1)[1],
        "--workers",
        "1",
    ]
    with log.open("w") as out:
        server = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_until_healthy(uri, server, log)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and its workers
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def rest(uri: str, endpoint: str, body: dict[str, Any] | None = None, **query: str) -> Any:
    """GET (or POST with a JSON body) on the MLflow REST API; the decoded JSON answer."""
    url = f"{uri}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)


@pytest.mark.slow
def test_a_run_on_a_tracking_server_is_found_through_the_rest_api(
    make_cfg, tracking_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_server)
    cfg = make_cfg("trainer.max_epochs=1", "eval.bootstrap=50", "logger.experiment_name=team")
    metrics = train(cfg)

    experiment = rest(tracking_server, "experiments/get-by-name", experiment_name="team")
    found = rest(
        tracking_server,
        "runs/search",
        {"experiment_ids": [experiment["experiment"]["experiment_id"]]},
    )
    (run,) = found["runs"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["model.backbone"] == "test_resnet"
    # where a run ran is a tag, not a parameter: comparing runs shows what differs in them
    assert "logger.tracking_uri" not in params
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    assert tags["logger.tracking_uri"] == tracking_server
    logged = {m["key"]: m["value"] for m in run["data"]["metrics"]}
    assert logged["test/auroc"] == pytest.approx(metrics["test/auroc"])
    assert "val/auroc" in logged

    run_id = run["info"]["run_id"]
    files = {f["path"] for f in rest(tracking_server, "artifacts/list", run_id=run_id)["files"]}
    assert {"config.yaml", "overrides.yaml", "evaluation"} <= files
    url = f"{tracking_server}/get-artifact?path=config.yaml&run_uuid={run_id}"
    with urllib.request.urlopen(url, timeout=30) as answer:
        assert "backbone: test_resnet" in answer.read().decode()
    # uploaded through the server into its storage, not written by the client next to the run
    assert list((tmp_path / "server_artifacts").rglob("config.yaml"))
