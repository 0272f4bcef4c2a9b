"""The MLflow Model Registry: `logger.register_as` registers the selected model; `models:/`
URIs open it in medx.predict, medx.eval and the loader; `mlflow models serve` answers as
medx.predict does; the team set-up (`make mlflow-server` on PostgreSQL) is run for real."""

from __future__ import annotations

import base64
import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import mlflow
import pandas as pd
import pytest
import torch
from dicom_files import dicom_dataset, save
from mlflow import MlflowClient
from omegaconf import open_dict

import medx
from medx import eval as medx_eval
from medx import predict, ui
from medx.cli import user_error
from medx.config import compose
from medx.errors import CheckpointError, ConfigError, MedxError
from medx.inference import open_model
from medx.models.load import model_card, read_checkpoint
from medx.tracking import registry, runs
from medx.train import train

NAME = "pneumonia"
TINY = [  # a tiny network on 40 phantom patients, one epoch
    "model.backbone=test_resnet",
    "data.n_patients=40",
    "data.image_size=48",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "eval.bootstrap=20",
    "callbacks.rich_progress_bar=null",
    "trainer.enable_progress_bar=false",
]
START_TIMEOUT_S = 240  # a cold server imports torch and medx: 10-60 s on two busy cores
REPO = Path(medx.__file__).resolve().parents[1]


@dataclass
class Registered:
    """A training run that registered its model as NAME version 1, in a sqlite store."""

    store: str
    run_id: str
    checkpoint: Path  # the checkpoint the run selected and tested
    metrics: dict[str, float]
    images: list[Path]  # phantom PNGs and one DICOM copy, for predictions


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory, phantom_cache: Path) -> Registered:
    """One tiny training with logger.register_as, shared by the tests of this module."""
    root = tmp_path_factory.mktemp("registry")
    store = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", store)
        env.setenv("MEDX_MODEL_CACHE", str(root / "model_cache"))
        cfg = tiny_config(root, phantom_cache, f"logger.register_as={NAME}")
        metrics = train(cfg)
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("medx").experiment_id])
    checkpoint = Path(client.get_model_version(NAME, "1").tags["medx.checkpoint"])
    return Registered(store, run.info.run_id, checkpoint, metrics, some_images(phantom_cache, root))


@pytest.fixture(autouse=True)
def registry_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, request) -> None:
    """Each test resolves `models:/` in the module's store, into its own download cache."""
    if "registered" in request.fixturenames:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", request.getfixturevalue("registered").store)
    monkeypatch.setenv("MEDX_MODEL_CACHE", str(tmp_path / "model_cache"))


def tiny_config(root: Path, cache: Path, *overrides: str):
    cfg = compose([f"paths.root_dir={root}", f"paths.cache_dir={cache}", *TINY, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(root / "run")
    return cfg


def some_images(phantom_cache: Path, folder: Path) -> list[Path]:
    """Two phantom PNGs of each class, and the first one again as an extensionless DICOM."""
    pngs = []
    for label in ("NORMAL", "OPACITY"):
        pngs += sorted(phantom_cache.rglob(f"{label}/*.png"))[:2]
    gray = cv2.imread(str(pngs[0]), cv2.IMREAD_GRAYSCALE)
    dicom = save(dicom_dataset(gray), folder / "dicom" / "IM0001")
    return [*pngs, dicom]


def predicted(checkpoint: str | Path, images: list[Path], *flags: str) -> list[dict]:
    """medx.predict's rows for each image, as its command line gives them."""
    rows = []
    for image in images:  # one file at a time: the CLI's answer for that file
        rows += predict.main([str(checkpoint), str(image), "--workers", "0", *flags])
    return rows


def assert_same_answers(answers: pd.DataFrame, rows: list[dict]) -> None:
    """Probabilities (medx.predict prints 6 decimals), predicted class and decision."""
    assert len(answers) == len(rows)
    for (_, got), want in zip(answers.iterrows(), rows, strict=True):
        for column in ("p_NORMAL", "p_OPACITY"):
            assert got[column] == pytest.approx(float(want[column]), abs=1e-6)
        assert got["predicted"] == want["predicted"]
        assert got["decision"] == want["decision"]
        assert got["threshold"] == pytest.approx(float(want["threshold"]), abs=1e-6)
        assert got["threshold_scale"] == want["threshold_scale"] == "calibrated"
        assert got["error"] == ""


# --- registering ----------------------------------------------------------------------------


def test_training_registers_the_tested_model_with_its_card_and_signature(
    registered: Registered,
):
    client = MlflowClient(registered.store)
    (version,) = client.search_model_versions(f"name = '{NAME}'")
    assert str(version.version) == "1" and version.run_id == registered.run_id
    run = client.get_run(registered.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["medx.registered_model"] == f"{NAME}/1"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[runs.EXPERIMENT_KIND] == "custom_model_development"

    # the model is the selected checkpoint after the clinical evaluation wrote its choices
    card = model_card(registered.checkpoint)
    assert card["operating_point"]["chosen_on"] == "val"
    assert card["calibration"]["temperature"] == pytest.approx(
        registered.metrics["test/temperature"]
    )
    assert version.tags["medx.threshold"] == str(card["operating_point"]["threshold"])
    assert version.tags["medx.threshold_scale"] == card["operating_point"]["scale"] == "raw"
    info = mlflow.models.get_model_info(f"models:/{NAME}/1")
    assert info.metadata["medx"]["operating_point"] == card["operating_point"]
    assert info.metadata["medx"]["calibration"] == card["calibration"]
    assert info.metadata["medx"]["class_names"] == ["NORMAL", "OPACITY"]
    assert info.signature.inputs.input_names() == ["image"]
    assert info.signature.inputs.to_dict()[0]["type"] == "binary"
    outputs = info.signature.outputs.input_names()
    assert outputs[:3] == ["p_NORMAL", "p_OPACITY", "predicted"] and "decision" in outputs
    assert {p.name for p in info.signature.params} == {"tta", "calibrated"}
    # code, not a pickle, builds the model ("models from code")
    assert info.flavors["python_function"]["loader_module"].endswith(".code_model")
    assert "python_model" not in info.flavors["python_function"]

    registered_weights = read_checkpoint(registry.resolve_model_uri(f"models:/{NAME}/1"))
    registered_weights = registered_weights["state_dict"]
    selected_weights = read_checkpoint(registered.checkpoint)["state_dict"]
    assert registered_weights.keys() == selected_weights.keys()
    for key, tensor in selected_weights.items():
        assert torch.equal(registered_weights[key], tensor), key


def test_a_bad_registered_model_name_fails_before_training(make_cfg, tracked_runs):
    with pytest.raises(Exception) as raised:
        train(make_cfg("logger.register_as=chest/xray"))
    error = user_error(raised.value)  # what the command line prints, alone, on one line
    assert isinstance(error, ConfigError)
    assert str(error).startswith("logger.register_as='chest/xray' is no Model Registry name")
    assert tracked_runs() == []


# --- the pyfunc -----------------------------------------------------------------------------


def test_the_registered_pyfunc_answers_as_medx_predict(registered: Registered):
    model = mlflow.pyfunc.load_model(f"models:/{NAME}/1")
    images = registered.images
    frame = pd.DataFrame({"image": [p.read_bytes() for p in images] + [b"not an image", b""]})
    answers = model.predict(frame)
    assert_same_answers(answers.iloc[: len(images)], predicted(registered.checkpoint, images))
    # the DICOM copy is read as the PNG it was made from
    dicom, png = answers.loc[len(images) - 1, "p_OPACITY"], answers.loc[0, "p_OPACITY"]
    assert dicom == pytest.approx(png, abs=1e-7)
    bad, empty = answers.iloc[-2], answers.iloc[-1]
    assert bad["error"].startswith("Image row 5 cannot be") and "not a DICOM, PNG" in bad["error"]
    assert pd.isna(bad["p_NORMAL"])
    assert "skip_bad_images" not in bad["error"]  # training-data advice, not for a client
    assert "row 6: no image bytes" in empty["error"]

    raw = model.predict(frame.iloc[:2], params={"calibrated": False})
    rows = predicted(registered.checkpoint, images[:2], "--no-calibration")
    for (_, got), want in zip(raw.iterrows(), rows, strict=True):
        assert got["p_OPACITY"] == pytest.approx(float(want["p_OPACITY"]), abs=1e-6)
        assert got["temperature"] == 1.0
    assert raw.loc[0, "p_OPACITY"] != pytest.approx(answers.loc[0, "p_OPACITY"], abs=1e-4)


# --- models:/ URIs --------------------------------------------------------------------------


def test_models_uris_open_wherever_a_checkpoint_is_taken(
    registered: Registered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    MlflowClient(registered.store).set_registered_model_alias(NAME, "champion", "1")
    model = open_model(f"models:/{NAME}@champion")
    assert model.card["registered_as"] == NAME and model.card["registered_version"] == "1"
    assert model.card["checkpoint"] == f"models:/{NAME}@champion"
    assert model.card["run"]["id"] == registered.run_id

    images = registered.images[:2]
    by_alias = predicted(f"models:/{NAME}@champion", images)
    by_file = predicted(registered.checkpoint, images)
    for alias_row, file_row in zip(by_alias, by_file, strict=True):
        assert alias_row["model"] == f"{NAME}@{registered.run_id}"
        for key in ("p_NORMAL", "p_OPACITY", "decision", "threshold", "temperature"):
            assert alias_row[key] == file_row[key]

    # downloaded once: the second use reads the cached file
    cached = registry.resolve_model_uri(f"models:/{NAME}/1")
    stamp = cached.stat().st_mtime_ns
    assert registry.resolve_model_uri(f"models:/{NAME}@champion") == cached
    assert cached.stat().st_mtime_ns == stamp

    monkeypatch.chdir(tmp_path)
    metrics = medx_eval.run(compose([f"ckpt_path=models:/{NAME}/1", "eval.bootstrap=20"], "eval"))
    assert metrics["test/auroc"] == pytest.approx(registered.metrics["test/auroc"])


def test_models_uris_that_name_nothing_say_what_exists(
    registered: Registered, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    with pytest.raises(CheckpointError, match=rf"models:/{NAME}/7 .* has versions \['1'\]"):
        registry.resolve_model_uri(f"models:/{NAME}/7")
    with pytest.raises(CheckpointError, match=r"no registered model 'nobody'.*register_as"):
        open_model("models:/nobody/1")
    with pytest.raises(CheckpointError, match=r"@nope .* aliases"):
        registry.resolve_model_uri(f"models:/{NAME}@nope")
    with pytest.raises(ConfigError, match=r"models:/NAME/VERSION .* models:/NAME@ALIAS"):
        registry.resolve_model_uri(f"models:/{NAME}")
    with pytest.raises(SystemExit, match=r"^medx.predict: models:/nobody/1 cannot be opened"):
        predict.main(["models:/nobody/1", str(registered.images[0])])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/typo.db")
    with pytest.raises(MedxError, match=r"typo.db does not exist \(nothing created\)"):
        open_model(f"models:/{NAME}/1")
    assert not (tmp_path / "typo.db").exists()


# --- make ui --------------------------------------------------------------------------------


def test_make_ui_prints_the_link_to_the_runs_table(registered: Registered, tmp_path: Path):
    experiment = MlflowClient(registered.store).get_experiment_by_name("medx").experiment_id
    line = ui.main(["--backend-store-uri", registered.store, "--port", "5123"])
    runs = f"http://127.0.0.1:5123/#/experiments/{experiment}/runs?workflowType=machine_learning"
    assert runs in line and line.endswith("viewStateShareKey=medx")
    missing = f"sqlite:///{tmp_path}/none.db"
    assert "no runs yet" in ui.main(["--backend-store-uri", missing])
    assert not (tmp_path / "none.db").exists()  # printing a link creates no database


# --- mlflow models serve --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running(command: list[str], log: Path, ready: str, **env: str) -> Iterator[subprocess.Popen]:
    """A server in its own process group, until `ready` answers 200; stopped (with every
    worker it started) on the way out."""
    # `mlflow models serve` execs `uvicorn`: the venv's bin on PATH, as an activated venv has
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    with log.open("w") as out:
        server = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PATH": path, **env},
            start_new_session=True,
            cwd=REPO,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if server.poll() is not None:
                pytest.fail(f"{command[:3]} exited with {server.returncode}:\n{tail(log)}")
            try:
                with urllib.request.urlopen(ready, timeout=10) as answer:
                    if answer.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{ready} did not answer in {START_TIMEOUT_S} s:\n{tail(log)}")
            time.sleep(0.5)
        yield server
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def tail(log: Path) -> str:
    return log.read_text()[-3000:]


@contextmanager
def model_server(uri: str, tracking_uri: str, log: Path) -> Iterator[str]:
    """`mlflow models serve -m URI --env-manager local` on a free loopback port."""
    port = free_port()
    command = [
        *[str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", uri],
        *["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "-w", "1"],
    ]
    base = f"http://127.0.0.1:{port}"
    with running(command, log, f"{base}/ping", MLFLOW_TRACKING_URI=tracking_uri):
        yield base


def invoke(base: str, images: list[Path]) -> pd.DataFrame:
    """POST the images, base64 in a `dataframe_split`, to /invocations."""
    rows = [[base64.b64encode(p.read_bytes()).decode()] for p in images]
    body = {"dataframe_split": {"columns": ["image"], "data": rows}}
    request = urllib.request.Request(
        f"{base}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as answer:
        return pd.DataFrame(json.load(answer)["predictions"])


@pytest.mark.slow
def test_mlflow_models_serve_answers_as_medx_predict(registered: Registered, tmp_path: Path):
    with model_server(f"models:/{NAME}/1", registered.store, tmp_path / "serve.log") as base:
        answers = invoke(base, registered.images)
    assert_same_answers(answers, predicted(registered.checkpoint, registered.images))


# --- the team set-up: make mlflow-server on PostgreSQL ------------------------------------


def postgres_bin() -> Path:
    """The newest installed PostgreSQL server's bin folder (Debian's layout), else skip."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major)
    if not found:
        pytest.skip(
            "PostgreSQL is not installed: `apt-get install -y postgresql` (Debian/Ubuntu; "
            "CI's .ci/run installs it) to run the team tracking-server test"
        )
    if shutil.which("make") is None or not (REPO / "Makefile").is_file():
        pytest.skip("needs `make` and medx's Makefile (a checkout of medx)")
    pytest.importorskip(  # SQLAlchemy 2.1's driver for postgresql:// URIs
        "psycopg", reason="MLflow needs psycopg for PostgreSQL: pip install 'psycopg[binary]'"
    )
    return Path(found[-1]).parent


def _major(path: str) -> int:
    version = Path(path).parents[1].name
    return int(version) if version.isdigit() else 0


@contextmanager
def postgres_cluster(bin_dir: Path) -> Iterator[str]:
    """A throwaway cluster in a temporary folder on a loopback port, run by an unprivileged
    user (PostgreSQL refuses root); yields the URI of its empty `mlflow` database."""
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="medx-postgres-"))  # pytest's tmp is root-only
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        as_user = ["runuser", "-u", "nobody", "--"]
    data, port = folder / "data", free_port()
    pg = [*as_user, str(bin_dir / "pg_ctl"), "-D", str(data)]
    try:
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "mlflow", "--auth=trust"]
        subprocess.run(
            [*as_user, *initdb, "--no-sync", "-E", "UTF8"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        options = f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off"
        started = subprocess.run(
            [*pg, "-l", str(folder / "postgres.log"), "-o", options, "-w", "-t", "60", "start"],
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert started.returncode == 0, started.stdout + started.stderr
        createdb = [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port)]
        subprocess.run(
            [*createdb, "-U", "mlflow", "mlflow"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*pg, "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.slow
def test_team_server_on_postgresql_trains_registers_and_serves(
    make_cfg, tmp_path: Path, phantom_cache: Path, monkeypatch: pytest.MonkeyPatch
):
    bin_dir = postgres_bin()
    import psycopg

    with postgres_cluster(bin_dir) as database:
        port = free_port()
        server_uri = f"http://127.0.0.1:{port}"
        make = [  # the README's team set-up, as `make mlflow-server` runs it
            *["make", "-C", str(REPO), "-o", "install", "mlflow-server"],
            *[f"BIN={Path(sys.executable).parent}", f"MLFLOW_BACKEND={database}"],
            *[f"PORT={port}", f"ARTIFACTS={tmp_path / 'artifacts'}", "SERVER_ARGS=--workers 1"],
        ]
        # ready when it answers from the database (the first query of a fresh one is slow)
        ready = f"{server_uri}/api/2.0/mlflow/experiments/search?max_results=1"
        with running(make, tmp_path / "server.log", ready):
            monkeypatch.setenv("MLFLOW_TRACKING_URI", server_uri)
            train(make_cfg("trainer.max_epochs=1", "eval.bootstrap=20", "logger.register_as=team"))

            with psycopg.connect(database) as db, db.cursor() as sql:  # stored in PostgreSQL
                sql.execute("SELECT name FROM registered_models")
                assert sql.fetchall() == [("team",)]
                sql.execute("SELECT status FROM runs")
                assert sql.fetchall() == [("FINISHED",)]
            experiment = MlflowClient(server_uri).get_experiment_by_name("medx")
            assert experiment.tags[runs.EXPERIMENT_KIND] == "custom_model_development"
            # artifacts went through the server into its own storage
            assert list((tmp_path / "artifacts").rglob("model.ckpt"))

            images = some_images(phantom_cache, tmp_path)[:2]
            uri = "models:/team/1"
            with model_server(uri, server_uri, tmp_path / "serve.log") as base:
                answers = invoke(base, images)
            assert_same_answers(answers, predicted(uri, images))
