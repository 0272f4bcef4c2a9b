"""The front doors agree (issue 20, Required 6): for a classifier trained with each
`data.intensity`, the same real images give the same calibrated probabilities and decision
through the Python API (`medx.inference.Predictor`), the `medx.predict` CSV,
`mlflow.pyfunc.load_model("models:/...")`, the ONNX export run by onnxruntime, `medx.serve`
with each backend and `mlflow models serve`, and the same shift monitor's `ood_score` (the
models keep a shift reference; an ONNX export has no monitor and says so with none); a
segmenter gives the same mask through the API, `medx.predict`, the pyfunc and `medx.serve`.

The in-process doors run in every test run; the server doors (real uvicorn, a real `mlflow
models serve` subprocess) are `slow`. The models are trained once per intensity (module
fixtures), on the phantom, tiny, and registered in a sqlite MLflow store of their own.
"""

from __future__ import annotations

import base64
import csv
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from dicom_files import cxr_gray, dicom_dataset, save
from hydra.core.hydra_config import HydraConfig
from mlflow import MlflowClient
from omegaconf import open_dict
from test_registry import invoke, model_server
from test_serve import serving

from medx.config import compose
from medx.export import export
from medx.inference import Predictor, Segmenter, find_inputs, read
from medx.predict import main as predict_main
from medx.predict import predict_folder
from medx.serve.settings import Settings
from medx.train import train

INTENSITIES = ("none", "zscore", "equalize", "clahe")
TOLERANCE = {"pytorch": 1e-5, "onnxruntime": 1e-4}
TINY = [
    "model.backbone=test_resnet",
    "data.n_patients=40",
    "data.val_from_train=0.3",  # 24 val images: enough for a shift reference
    "data.image_size=48",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "eval.bootstrap=20",
    "callbacks.rich_progress_bar=null",
    "trainer.enable_progress_bar=false",
]


@dataclass
class Trained:
    """A model trained and registered as `name` version 1 in its own store."""

    name: str
    checkpoint: Path
    store: str
    root: Path


def _train_and_register(root: Path, cache: Path, name: str, *overrides: str) -> Trained:
    store = f"sqlite:///{root}/mlflow.db"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", store)
        env.setenv("MEDX_MODEL_CACHE", str(root / "model_cache"))
        cfg = compose(
            [f"paths.root_dir={root}", f"paths.cache_dir={cache}", *overrides,
             f"logger.register_as={name}"]
        )  # fmt: skip
        with open_dict(cfg):
            cfg.paths.output_dir = str(root / "run")
        HydraConfig().set_config(cfg)
        train(cfg)
    version = MlflowClient(store).get_model_version(name, "1")
    return Trained(name, Path(version.tags["medx.checkpoint"]), store, root)


@pytest.fixture(scope="module", params=INTENSITIES)
def classifier(request, tmp_path_factory: pytest.TempPathFactory, phantom_cache: Path) -> Trained:
    intensity = request.param
    root = tmp_path_factory.mktemp(f"doors-{intensity}")
    return _train_and_register(
        root, phantom_cache, f"doors_{intensity}", *TINY, f"data.intensity={intensity}"
    )


@pytest.fixture(scope="module")
def images(medx_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real chest X-rays as a hospital sends them: JPEGs at full size, a 16-bit PNG (the
    intensity step works at full depth), a MONOCHROME1 DICOM."""
    folder = tmp_path_factory.mktemp("images")
    chest = medx_data / "chest_xray" / "train"
    paths = []
    for label in ("NORMAL", "PNEUMONIA"):
        source = sorted((chest / label).glob("*.jpeg"))[1]
        paths.append(folder / f"{label.lower()}.jpeg")
        paths[-1].write_bytes(source.read_bytes())
    gray = cxr_gray(medx_data, 2, size=256).astype(np.uint16)
    deep = gray * 64 + np.random.default_rng(0).integers(0, 64, gray.shape, dtype=np.uint16)
    paths.append(folder / "deep.png")
    cv2.imwrite(str(paths[-1]), deep)
    inverted = 255 - cxr_gray(medx_data, 3, size=160)
    paths.append(save(dicom_dataset(inverted, "MONOCHROME1"), folder / "study.dcm"))
    return sorted(paths)


@dataclass
class Answer:
    """What must agree: probabilities, the decision, its threshold and scale, and the shift
    monitor's out-of-distribution score."""

    probabilities: dict[str, float]
    decision: str | None
    threshold: float | None
    scale: str | None
    ood_score: float | None = None


def _from_api(result) -> Answer:
    d = result.decision
    return Answer(
        result.probabilities,
        d and d.label,
        d and d.threshold,
        d and d.scale,
        result.ood_score,
    )


def _number(value) -> float | None:
    """A CSV cell, a pyfunc or JSON value as a float (None: empty, absent, NaN)."""
    if value in (None, ""):
        return None
    number = float(value)
    return None if np.isnan(number) else number


def _from_row(row: dict, classes: list[str]) -> Answer:
    """A medx.predict CSV row, a pyfunc or `mlflow models serve` row (dict-like)."""
    return Answer(
        {c: float(row[f"p_{c}"]) for c in classes},
        row.get("decision") or None,
        _number(row.get("threshold")),
        row.get("threshold_scale") or None,
        _number(row.get("ood_score")),
    )


def _from_json(body: dict) -> Answer:
    d = body["decision"]
    return Answer(
        body["probabilities"],
        d and d["class"],
        d and d["threshold"],
        d and d["scale"],
        body["ood_score"],
    )


def _assert_agree(
    reference: list[Answer], got: list[Answer], door: str, tolerance: float, monitor: bool = True
):
    """`got` answers as `reference`; without a `monitor` (ONNX) with no ood_score at all."""
    assert len(got) == len(reference), door
    for i, (want, have) in enumerate(zip(reference, got, strict=True)):
        assert have.probabilities.keys() == want.probabilities.keys(), door
        for c, p in want.probabilities.items():
            assert have.probabilities[c] == pytest.approx(p, abs=tolerance), (door, i, c)
        assert (have.decision, have.scale) == (want.decision, want.scale), (door, i)
        assert have.threshold == pytest.approx(want.threshold, abs=1e-6), (door, i)
        if not monitor:
            assert have.ood_score is None, (door, i)
        else:  # the CSV writes 4 decimals
            assert have.ood_score == pytest.approx(want.ood_score, rel=1e-5, abs=1e-4), (door, i)


def _csv_answers(model: str, folder: Path, out: Path, classes: list[str], *flags: str):
    predict_main([model, str(folder), "--out", str(out), "--workers", "1", "--no-progress", *flags])
    with (out / "predictions.csv").open() as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    assert all(r["error"] == "" for r in rows.values())
    return [_from_row(rows[str(p)], classes) for p in find_inputs(folder)]


def test_every_door_in_process_gives_the_same_answer(
    classifier: Trained, images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Calibrated, as the doors answer by default, and raw (`--no-calibration`): a tiny
    phantom model's temperature is large, which squeezes calibrated probabilities together;
    on the raw scale a door that read other pixels could not hide."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", classifier.store)
    monkeypatch.setenv("MEDX_MODEL_CACHE", str(tmp_path / "cache"))
    uri, folder = f"models:/{classifier.name}/1", images[0].parent
    pyfunc = mlflow.pyfunc.load_model(uri)
    frame = pd.DataFrame({"image": [p.read_bytes() for p in images]})
    onnx = export(classifier.checkpoint, tmp_path / "model.onnx", mlflow=False).path
    for calibrated in (True, False):
        scale = "calibrated" if calibrated else "raw"
        flags = [] if calibrated else ["--no-calibration"]
        predictor = Predictor.from_checkpoint(classifier.checkpoint, calibrated=calibrated)
        classes = predictor.classes
        reference = [_from_api(r) for r in predictor.predict(images)]
        assert all(a.decision is not None and a.scale == scale for a in reference)
        assert all(a.ood_score is not None and a.ood_score > 0 for a in reference)

        doors = {
            "medx.predict CSV": _csv_answers(
                str(classifier.checkpoint), folder, tmp_path / scale / "csv", classes, *flags
            ),
            "medx.predict models:/": _csv_answers(
                uri, folder, tmp_path / scale / "uri", classes, *flags
            ),
            "pyfunc": [
                _from_row(row, classes)
                for _, row in pyfunc.predict(frame, params={"calibrated": calibrated}).iterrows()
            ],
        }
        for door, answers in doors.items():
            _assert_agree(reference, answers, f"{door} ({scale})", TOLERANCE["pytorch"])
        by_onnx = Predictor.from_checkpoint(onnx, calibrated=calibrated).predict(images)
        answers = [_from_api(r) for r in by_onnx]
        door = f"onnxruntime ({scale})"
        _assert_agree(reference, answers, door, TOLERANCE["onnxruntime"], monitor=False)

    # the card's intensity step is applied: without it the model answers otherwise
    plain = torch.stack([predictor.model_input(read(p)) for p in images])
    wanted = torch.tensor([list(a.probabilities.values()) for a in reference])
    same = torch.allclose(predictor.probabilities(plain), wanted, atol=1e-4, rtol=0)
    assert same == (predictor.intensity == "none"), predictor.intensity


@pytest.mark.slow
def test_every_server_gives_the_same_answer(
    classifier: Trained, images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", classifier.store)
    predictor = Predictor.from_checkpoint(classifier.checkpoint)
    reference = [_from_api(r) for r in predictor.predict(images)]
    onnx = export(classifier.checkpoint, tmp_path / "model.onnx", mlflow=False).path

    for model, backend in ((classifier.checkpoint, "pytorch"), (onnx, "onnxruntime")):
        with serving(Settings(model=str(model), threads=1)) as url:
            answers = []
            for path in images:
                answer = httpx.post(f"{url}/predict", files={"file": path.open("rb")}, timeout=60)
                assert answer.status_code == 200, answer.text
                answers.append(_from_json(answer.json()))
            monitor = backend == "pytorch"
            door = f"medx.serve {backend}"
            _assert_agree(reference, answers, door, TOLERANCE[backend], monitor)
            metadata = httpx.get(f"{url}/metadata").json()
            drift = httpx.get(f"{url}/drift").json()  # too few requests yet for a test
            assert drift["status"] == ("collecting" if monitor else "unavailable"), drift
            assert drift.get("seen") == (len(images) if monitor else None)
        # both thresholds are labelled: the card's (raw) and the one the service applies
        assert metadata["card"]["operating_point"]["scale"] == "raw"
        assert metadata["decision"]["scale"] == "calibrated"
        assert metadata["decision"]["threshold"] == pytest.approx(reference[0].threshold)
        assert str(classifier.root) not in json.dumps(metadata)  # no local paths served

    raw = [_from_api(r) for r in predictor.configured(calibrated=False).predict(images)]
    with model_server(f"models:/{classifier.name}/1", classifier.store, tmp_path / "log") as base:
        served = invoke(base, images)
        served_raw = _invoke(base, images, {"calibrated": False})
    for want, got, scale in ((reference, served, "calibrated"), (raw, served_raw, "raw")):
        answers = [_from_row(row, predictor.classes) for _, row in got.iterrows()]
        _assert_agree(want, answers, f"mlflow models serve ({scale})", TOLERANCE["pytorch"])


def _invoke(base: str, images: list[Path], params: dict) -> pd.DataFrame:
    """POST the images to /invocations with MLflow's `params` (the pyfunc's calibrated)."""
    rows = [[base64.b64encode(p.read_bytes()).decode()] for p in images]
    body = {"dataframe_split": {"columns": ["image"], "data": rows}, "params": params}
    answer = httpx.post(f"{base}/invocations", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    return pd.DataFrame(answer.json()["predictions"])


# --- a segmenter ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory, phantom_cache: Path) -> Trained:
    root = tmp_path_factory.mktemp("doors-seg")
    overrides = ["model=unet", "data=phantom_seg", "model.encoder=tu-test_resnet",
                 "data.n_patients=40", "data.image_size=64", "data.num_workers=0",
                 "trainer.max_epochs=1", "callbacks.rich_progress_bar=null",
                 "trainer.enable_progress_bar=false"]  # fmt: skip
    return _train_and_register(root, phantom_cache, "doors_lungs", *overrides)


@pytest.fixture(scope="module")
def lung_images(medx_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("lungs")
    sources = sorted((medx_data / "lung_seg" / "images").iterdir())[:2]
    for source in sources:
        (folder / source.name).write_bytes(source.read_bytes())
    return sorted(folder.iterdir())


def _masks(segmenter: Trained, images: list[Path]) -> list[np.ndarray]:
    """The masks of the Python API: what every other door must draw."""
    return [r.mask for r in Segmenter.from_checkpoint(segmenter.checkpoint).segment(images)]


def test_a_segmenter_draws_the_same_mask_through_every_door(
    segmenter: Trained, lung_images: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", segmenter.store)
    monkeypatch.setenv("MEDX_MODEL_CACHE", str(tmp_path / "cache"))
    reference = _masks(segmenter, lung_images)
    for mask, path in zip(reference, lung_images, strict=True):
        assert mask.shape == cv2.imread(str(path)).shape[:2]
    assert 0 < np.mean([m.mean() for m in reference]) < 255  # a real mask, not a blank

    written = predict_folder(segmenter.checkpoint, lung_images[0].parent, tmp_path / "masks")
    by_cli = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in written]
    pyfunc = mlflow.pyfunc.load_model(f"models:/{segmenter.name}/1")
    answers = pyfunc.predict(pd.DataFrame({"image": [p.read_bytes() for p in lung_images]}))
    by_pyfunc = [cv2.imdecode(np.frombuffer(m, np.uint8), 0) for m in answers["mask"]]
    for door, masks in (("medx.predict", by_cli), ("pyfunc", by_pyfunc)):
        for want, have in zip(reference, masks, strict=True):
            assert np.array_equal(have, want), door


@pytest.mark.slow
def test_a_served_segmenter_draws_the_same_mask(segmenter: Trained, lung_images: list[Path]):
    reference = _masks(segmenter, lung_images)
    with serving(Settings(model=str(segmenter.checkpoint), threads=1)) as url:
        for path, want in zip(lung_images, reference, strict=True):
            answer = httpx.post(f"{url}/segment", files={"file": path.open("rb")}, timeout=60)
            assert answer.status_code == 200, answer.text
            mask = cv2.imdecode(np.frombuffer(answer.content, np.uint8), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(mask, want), path.name
