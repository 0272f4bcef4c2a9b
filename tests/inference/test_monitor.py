"""The shift monitor through every front door, and site calibration as they all decide by it.

A tiny classifier is trained once for the module on the phantom (val large enough for a shift
reference on its card); a "new site" is the phantom drawn with another seed (other patients,
the same distribution), and its strongly shifted copies (medx.data.acquisition) play another
scanner. What is checked is what a user meets: `medx.predict`'s CSV, shift.json and summary
line, the service's /predict and /drift (the real app, in process), the MLflow pyfunc, and
`medx.calibrate` followed by each of them. The Kermany-level behaviour of the monitor is in
test_shift_kermany.py (slow).
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

import medx.tracking.pyfunc
from medx.calibrate import main as calibrate_main
from medx.config import compose
from medx.data.acquisition import apply
from medx.data.phantom import write_phantom
from medx.export import export
from medx.inference import Predictor, find_inputs, to_scale
from medx.inference.shift import WINDOW
from medx.models.card import ModelCard
from medx.models.load import model_card, update_card
from medx.predict import main as predict_main
from medx.serve.app import create_app
from medx.serve.settings import DRIFT_WINDOW, Settings
from medx.tracking.registry import signature
from medx.train import train


@dataclass
class Site:
    """The model, and images of a new site: as they are, and under a strong shift."""

    checkpoint: Path
    images: Path  # images/{NORMAL,OPACITY}/*.png, the phantom's distribution
    shifted: Path  # the same images, darker (gamma 2.3): another detector response


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, phantom_cache: Path) -> Site:
    root = tmp_path_factory.mktemp("monitor")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        cfg = compose(
            [f"paths.root_dir={root}", f"paths.cache_dir={phantom_cache}",
             "model.backbone=test_resnet", "data.n_patients=60", "data.val_from_train=0.3",
             "data.image_size=64", "data.num_workers=0", "trainer.max_epochs=2",
             "eval.bootstrap=20", "callbacks.rich_progress_bar=null",
             "trainer.enable_progress_bar=false"]
        )  # fmt: skip
        with open_dict(cfg):
            cfg.paths.output_dir = str(root / "run")
        HydraConfig().set_config(cfg)
        train(cfg)
    (checkpoint,) = (root / "run" / "checkpoints").glob("epoch*.ckpt")
    images = write_phantom(root / "site", n_patients=30, seed=1)  # 60 images of new patients
    shutil.rmtree(images / "masks")
    shifted = root / "shifted"
    for i, path in enumerate(find_inputs(images)):
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        target = shifted / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), apply(gray, "gamma", 3, np.random.default_rng(i)))
    return Site(checkpoint, images, shifted)


def _predict(model: Path, images: Path, out: Path, *flags: str) -> dict[str, dict[str, str]]:
    predict_main([str(model), str(images), "--out", str(out), "--workers", "0", "--no-progress",
                  *flags])  # fmt: skip
    with (out / "predictions.csv").open() as f:
        return {r["path"]: r for r in csv.DictReader(f)}


def test_a_folder_is_tested_as_a_set_and_each_image_gets_its_ood_score(
    site: Site, tmp_path: Path, capsys
):
    rows = _predict(site.checkpoint, site.images, tmp_path / "as_is")
    found = json.loads((tmp_path / "as_is" / "shift.json").read_text())
    assert found["status"] == "tested" and found["images"] == 60
    assert not found["shifted"] and found["p_value"] > 0.05, found
    assert found["reference"]["fitted_on"] == "val"
    line = capsys.readouterr().out
    assert "shift monitor: no shift detected" in line and f"p = {found['p_value']:.3g}" in line
    assert all(r["ood_score"] and r["ood_flag"] in ("yes", "no") for r in rows.values())

    # the same images through the Python API: the same per-image scores and set test
    predictor = Predictor.from_checkpoint(site.checkpoint)
    answers = predictor.predict(find_inputs(site.images))
    for answer in answers:
        assert float(rows[answer.source]["ood_score"]) == pytest.approx(answer.ood_score, abs=1e-4)
    assert predictor.shift_test(answers).p_value == pytest.approx(found["p_value"])

    # another scanner: the verdict flips, with a large effect, and images are flagged
    shifted = _predict(site.checkpoint, site.shifted, tmp_path / "shifted")
    report = json.loads((tmp_path / "shifted" / "shift.json").read_text())
    assert report["shifted"] and report["p_value"] < 0.01 and report["effect"] > 3, report
    assert report["ood_rate"] > found["ood_rate"]
    assert "shift monitor: SHIFT" in capsys.readouterr().out
    median = lambda r: np.median([float(v["ood_score"]) for v in r.values()])  # noqa: E731
    assert median(shifted) > 2 * median(rows)

    # one image: its own columns, no set test (a set test needs a set)
    (one,) = _predict(site.checkpoint, find_inputs(site.shifted)[0], tmp_path / "one").values()
    assert one["ood_flag"] in ("yes", "no") and not (tmp_path / "one" / "shift.json").exists()
    assert "shift monitor" not in capsys.readouterr().out


def test_a_model_without_a_reference_says_so_once_and_predicts(
    site: Site, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    old = tmp_path / "old.ckpt"  # as a checkpoint from before the monitor
    shutil.copyfile(site.checkpoint, old)
    update_card(old, shift_reference=None)
    with caplog.at_level(logging.WARNING):
        rows = _predict(old, site.images, tmp_path / "out", "--batch-size", "8")
    said = [r.getMessage() for r in caplog.records if "shift monitor" in r.getMessage()]
    assert len(said) == 1, said  # once, not once per batch
    assert "no shift reference" in said[0] and f"python -m medx.eval ckpt_path={old}" in said[0]
    assert len(rows) == 60 and all(r["p_OPACITY"] and r["error"] == "" for r in rows.values())
    assert "ood_score" not in next(iter(rows.values()))
    found = json.loads((tmp_path / "out" / "shift.json").read_text())
    assert found == {"status": "unavailable", "reason": said[0]}

    # an ONNX export outputs logits only: no monitor, said so, the probabilities all the same
    onnx = export(site.checkpoint, tmp_path / "model.onnx", mlflow=False).path
    by_onnx = Predictor.from_checkpoint(onnx)
    assert by_onnx.shift_monitor is None and "ONNX export" in by_onnx.shift_unavailable
    (answer,) = by_onnx.predict(find_inputs(site.images)[:1])
    assert answer.probabilities and answer.ood_score is None and answer.ood_flag is None


def _client_ready(client: TestClient) -> None:
    deadline = time.monotonic() + 120
    while client.get("/ready").status_code != 200:
        assert time.monotonic() < deadline, client.get("/ready").text
        time.sleep(0.1)


def _post(client: TestClient, path: Path) -> dict:
    answer = client.post("/predict", files={"file": (path.name, path.read_bytes())})
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_the_service_tests_its_recent_requests_at_drift(site: Site):
    assert DRIFT_WINDOW == WINDOW  # the service's default is the core's
    app = create_app(Settings(model=str(site.checkpoint), threads=1, drift_window=40))
    images, shifted = find_inputs(site.images), find_inputs(site.shifted)
    with TestClient(app) as client:
        _client_ready(client)
        start = client.get("/drift").json()
        assert start["status"] == "collecting" and start["seen"] == 0  # warm-up is no request
        assert start["window"] == 40 and start["model"]["backend"] == "pytorch"

        with ThreadPoolExecutor(4) as pool:  # requests in parallel worker threads
            answers = list(pool.map(lambda p: _post(client, p), images[:32]))
        assert all(isinstance(a["ood_score"], float) and a["ood_flag"] in (True, False)
                   for a in answers)  # fmt: skip
        calm = client.get("/drift").json()
        assert calm["status"] == "tested" and calm["seen"] == 32 and calm["images"] == 32
        assert not calm["shifted"] and calm["p_value"] > 0.01, calm

        for path in shifted[:40]:  # the window now holds the new scanner's images only
            _post(client, path)
        alarm = client.get("/drift").json()
        assert alarm["seen"] == 72 and alarm["images"] == 40
        assert alarm["shifted"] and alarm["effect"] > 3, alarm
        assert client.get("/drift").json() == alarm  # tested once per state of the window

        schema = client.get("/openapi.json").json()  # /docs shows the answer's fields
        assert {"p_value", "shifted", "effect", "status"} <= set(
            schema["components"]["schemas"]["DriftAnswer"]["properties"]
        )

    old = site.checkpoint.parent / "no_reference.ckpt"
    shutil.copyfile(site.checkpoint, old)
    update_card(old, shift_reference=None)
    with TestClient(create_app(Settings(model=str(old), threads=1))) as client:
        _client_ready(client)
        off = client.get("/drift").json()
        assert off["status"] == "unavailable" and "python -m medx.eval" in off["reason"]
        answer = _post(client, images[0])
        assert answer["probabilities"] and answer["ood_score"] is None


def test_a_site_calibrated_threshold_is_what_every_door_decides_by(site: Site, tmp_path: Path):
    new = tmp_path / "site.ckpt"
    calibrate_main([str(site.checkpoint), str(site.shifted), "--out", str(new),
                    "--bootstrap", "50", "--workers", "0"])  # fmt: skip
    card = ModelCard.from_dict(model_card(new))
    point = card.operating_point
    assert point.chosen_on == "site" and point.provenance["images"] == 60
    assert point.provenance["shift"]["shifted"]  # the sample's own shift test, kept
    date = point.provenance["date"][:10]
    source = f"site calibration {date} on 60 images, sensitivity {point.target_sensitivity}"
    threshold = to_scale(point.threshold, "raw", "calibrated", card.temperature)

    predictor = Predictor.from_checkpoint(new)
    assert (predictor.rule.source, predictor.rule.scale) == (source, "calibrated")
    assert predictor.rule.threshold == pytest.approx(threshold)
    images = find_inputs(site.shifted)
    answers = predictor.predict(images)
    for answer in answers:  # decided at the new threshold
        positive = answer.probabilities["OPACITY"] >= predictor.rule.threshold
        assert answer.decision.label == ("OPACITY" if positive else "NORMAL")

    rows = _predict(new, site.shifted, tmp_path / "csv")
    assert {(r["threshold_source"], r["threshold_scale"]) for r in rows.values()} == {
        (source, "calibrated")
    }
    assert all(float(r["threshold"]) == pytest.approx(threshold, abs=1e-6) for r in rows.values())
    assert [rows[str(p)]["decision"] for p in images] == [a.decision.label for a in answers]

    with TestClient(create_app(Settings(model=str(new), threads=1))) as client:
        _client_ready(client)
        assert client.get("/metadata").json()["decision"]["source"] == source
        decision = _post(client, images[0])["decision"]
        assert (decision["source"], decision["scale"]) == (source, "calibrated")
        assert decision["threshold"] == pytest.approx(threshold)
        assert decision["class"] == answers[0].decision.label

    saved = tmp_path / "pyfunc"
    mlflow.pyfunc.save_model(
        saved,
        python_model=medx.tracking.pyfunc.__file__,
        artifacts={"checkpoint": str(new)},
        signature=signature(card),
    )
    frame = pd.DataFrame({"image": [p.read_bytes() for p in images]})
    out = mlflow.pyfunc.load_model(str(saved)).predict(frame)
    assert set(out["threshold_source"]) == {source} and set(out["threshold_scale"]) == {
        "calibrated"
    }
    assert list(out["decision"]) == [a.decision.label for a in answers]
    assert np.allclose(out["ood_score"], [a.ood_score for a in answers], rtol=1e-5)
    assert list(out["ood_flag"]) == [a.ood_flag for a in answers]


def test_the_drift_window_is_a_setting(monkeypatch: pytest.MonkeyPatch):
    from medx.errors import ConfigError
    from medx.serve.settings import from_args

    assert from_args(["model.ckpt"]).drift_window == DRIFT_WINDOW
    monkeypatch.setenv("MEDX_SERVE_DRIFT_WINDOW", "500")
    assert from_args(["model.ckpt"]).drift_window == 500
    settings = from_args(["model.ckpt", "--drift-window", "50"])  # a flag wins
    assert settings.drift_window == 50 and Settings.from_env(settings.to_env()) == settings
    with pytest.raises(ConfigError, match=r"--drift-window 1: .* at least 2 images"):
        from_args(["model.ckpt", "--drift-window", "1"])
