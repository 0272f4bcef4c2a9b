"""`python -m medx.serve`: real uvicorn servers on loopback ports, driven over HTTP with httpx.

The main server is the command line itself, in a subprocess (its memory is measured apart
from the tests'), serving a tiny classifier trained for one epoch on CLAHE-standardised
images (so the service must apply the card's intensity step as medx.predict does) with a
quality model beside it, a bearer token and a 2 MB upload limit. ONNX and segmentation
servers run `create_app` in a thread of the test process.
"""

from __future__ import annotations

import base64
import csv
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import httpx
import numpy as np
import psutil
import pytest
import torch
from dicom_files import (
    VARIANTS,
    cxr_gray,
    dicom_dataset,
    j2k_zeros,
    save,
    size_lie,
    variant_dataset,
    write_dicom_variants,
)
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image
from pydicom import uid
from test_predict import _png_bomb

from medx.config import compose
from medx.inference import Predictor
from medx.predict import main as predict_main
from medx.predict import predict_folder
from medx.serve.__main__ import main as serve_main
from medx.serve.app import create_app
from medx.serve.settings import Settings, from_args
from medx.train import train

pytestmark = pytest.mark.slow  # a real uvicorn server per module: heavy for make test

TOKEN = "test-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_BYTES = 2_000_000
MB = 1_000_000


def _train(out: Path, cache: Path, *overrides: str) -> Path:
    """A real training run (test_resnet, 40 phantom patients at 64 px, one epoch)."""
    network = (
        [] if any(o.startswith("model=") for o in overrides) else ["model.backbone=test_resnet"]
    )
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{out}/mlflow.db")
        cfg = compose(
            [
                f"paths.root_dir={out}",
                f"paths.cache_dir={cache}",
                *network,
                "data.n_patients=40",
                "data.image_size=64",
                "data.num_workers=0",
                "callbacks.rich_progress_bar=null",
                "trainer.enable_progress_bar=false",
                "trainer.max_epochs=1",
                "eval.bootstrap=20",
                *overrides,
            ]
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(out / "run")
        HydraConfig().set_config(cfg)
        train(cfg)
    return next((out / "run" / "checkpoints").glob("epoch*.ckpt"))


@dataclass
class Models:
    classifier: Path
    qc: Path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, phantom_cache: Path) -> Models:
    root = tmp_path_factory.mktemp("models")
    qc = ("data=quality", "model=quality_logreg", "data.n_patients=20", "trainer.max_epochs=10")
    return Models(
        classifier=_train(root / "classifier", phantom_cache, "data.intensity=clahe"),
        qc=_train(root / "qc", phantom_cache, *qc),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, status: int, seconds: float, alive=lambda: True) -> httpx.Response:
    """GET url until it answers `status` (the server is starting up, or loading)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            answer = httpx.get(url, timeout=5)
            if answer.status_code == status:
                return answer
        except httpx.TransportError:
            pass
        if not alive():
            raise AssertionError(f"the server stopped while waiting for {url}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer {status} within {seconds} s")
        time.sleep(0.05)


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path
    first_ready: httpx.Response  # /ready's answer as soon as /health answered

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss


@pytest.fixture(scope="module")
def server(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`python -m medx.serve` in a subprocess, as a user starts it."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    port = _free_port()
    command = [
        *(sys.executable, "-m", "medx.serve", str(models.classifier)),
        *("--host", "127.0.0.1", "--port", str(port), "--threads", "1"),
        *("--max-bytes", str(MAX_BYTES), "--qc", str(models.qc)),
    ]
    env = {**os.environ, "MEDX_SERVE_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        alive = lambda: process.poll() is None  # noqa: E731
        _wait(f"{url}/health", 200, 120, alive)
        first_ready = httpx.get(f"{url}/ready", timeout=5)
        _wait(f"{url}/ready", 200, 600, alive)
        yield Server(url, process, log, first_ready)
    except AssertionError as err:
        raise AssertionError(f"{err}; server log:\n{log.read_text()[-3000:]}") from err
    finally:
        process.terminate()
        process.wait(30)


@contextmanager
def serving(settings: Settings, ready: int = 200) -> Iterator[str]:
    """`create_app(settings)` under a real uvicorn server in a thread; its URL once /ready
    answers `ready` (503: the model failed to load)."""
    import uvicorn

    app = create_app(settings)
    port = _free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(f"{url}/ready", ready, 300, thread.is_alive)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def _post(url: str, path: Path, name: str | None = None, **params: str) -> httpx.Response:
    files = {"file": (name or path.name, path.read_bytes())}
    return httpx.post(f"{url}/predict", files=files, params=params, headers=AUTH, timeout=120)


def _assert_error(answer: httpx.Response, status: int, *words: str) -> str:
    """An error a person can act on: JSON {status, error, message} naming what went wrong."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert set(body) >= {"status", "error", "message"} and body["status"] == status
    message = body["message"]
    for word in words:
        assert word in message, (word, message)
    assert "medx-serve-" not in message and "skip_bad_images" not in message  # no internals
    return message


# --- the tests ------------------------------------------------------------------------------


def test_ready_is_false_until_the_model_is_loaded(server: Server):
    first = server.first_ready
    assert first.status_code == 503 and first.json()["ready"] is False
    assert "still loading" in first.json()["message"]
    ready = httpx.get(f"{server.url}/ready").json()
    assert ready["ready"] is True and ready["model"]["backend"] == "pytorch"
    assert httpx.get(f"{server.url}/health").json() == {"status": "alive"}


def test_jpeg_png_and_dicom_answer_as_medx_predict(
    server: Server, models: Models, medx_data: Path, tmp_path: Path
):
    images = tmp_path / "images"
    written = write_dicom_variants(cxr_gray(medx_data, size=128), images)
    jpeg = sorted((medx_data / "chest_xray" / "train" / "PNEUMONIA").glob("*.jpeg"))[0]
    shutil.copy(jpeg, images / "chest.jpeg")
    out = tmp_path / "predicted"
    predict_main(
        [str(models.classifier), str(images), "--out", str(out), "--qc", str(models.qc),
         "--gradcam", "--workers", "0", "--no-progress"]
    )  # fmt: skip
    with (out / "predictions.csv").open() as f:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(f)}
    assert len(rows) == len(VARIANTS) + 2

    sent = {path.name: (path, path.name) for path in [*written.values(), images / "chest.jpeg"]}
    # the type is told from the bytes: a PNG named .dcm and a JPEG named .png are served
    sent["reference.png"] = (written["png"], "scan.dcm")
    sent["chest.jpeg"] = (images / "chest.jpeg", "photo.png")
    for name, (path, upload_name) in sent.items():
        row, answer = rows[name], _post(server.url, path, upload_name)
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert got["file"] == upload_name
        assert got["type"] == {".png": "png", ".jpeg": "jpeg"}.get(path.suffix, "dicom")
        for c in ("NORMAL", "OPACITY"):
            assert got["probabilities"][c] == pytest.approx(float(row[f"p_{c}"]), abs=2e-6), name
        assert got["predicted"] == row["predicted"]
        assert got["decision"]["class"] == row["decision"]
        assert got["decision"]["threshold"] == pytest.approx(float(row["threshold"]), abs=1e-6)
        assert got["decision"]["source"] == row["threshold_source"]
        assert got["quality"]["verdict"] == row["qc_verdict"]
        assert got["quality"]["p_bad"] == pytest.approx(float(row["qc_p_bad"]), abs=1e-4)
        assert got["model"]["id"] == row["model"] and got["model"]["version"].startswith("sha")
        assert set(got["timing_ms"]) >= {"decode", "inference", "total"}
    # the DICOM variants hold the PNG's pixels: the same probability as the PNG
    p_png = _post(server.url, written["png"]).json()["probabilities"]["OPACITY"]
    assert float(rows["monochrome1.dcm"]["p_OPACITY"]) == pytest.approx(p_png, abs=1e-3)

    # Grad-CAM: the overlay at the image's own size, as medx.predict --gradcam draws it
    explained = _post(server.url, images / "chest.jpeg", explain="true").json()
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(explained["gradcam_png"]), np.uint8), 1)
    drawn = cv2.imread(str(out / "gradcam" / "chest.png"))
    assert overlay.shape == drawn.shape == (*cv2.imread(str(jpeg)).shape[:2], 3)
    assert np.abs(overlay.astype(int) - drawn).mean() < 2.0

    card = httpx.get(f"{server.url}/metadata", headers=AUTH).json()
    assert card["card"]["class_names"] == ["NORMAL", "OPACITY"] and "config" not in card["card"]
    assert card["card"]["operating_point"]["threshold"] is not None
    assert card["limits"]["max_bytes"] == MAX_BYTES and card["limits"]["token_required"]
    assert card["model"]["run_id"] in rows["chest.jpeg"]["model"]


def test_refusals_are_json_a_person_can_act_on(server: Server, medx_data: Path, tmp_path: Path):
    url = server.url
    png = tmp_path / "chest.png"
    cv2.imwrite(str(png), cxr_gray(medx_data, size=96))

    # a token is set: nothing but the probes and the API's description without it
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        files = {"file": ("chest.png", png.read_bytes())}
        answer = httpx.post(f"{url}/predict", files=files, headers=headers)
        _assert_error(answer, 401, "Authorization: Bearer")
        assert answer.headers["www-authenticate"] == "Bearer"
        assert answer.headers["connection"] == "close"  # the upload is not read
        _assert_error(httpx.get(f"{url}/metadata", headers=headers), 401)
    for open_path in ("/health", "/ready", "/docs", "/openapi.json"):
        assert httpx.get(url + open_path).status_code == 200, open_path

    # too many bytes: refused on the declared length, and cut off while streaming
    big = tmp_path / "big.png"
    big.write_bytes(png.read_bytes() + b"\0" * (MAX_BYTES + 1))
    _assert_error(_post(url, big), 413, "2.0 MB", "--max-bytes", "Content-Length")
    sent = 0

    def endless() -> Iterator[bytes]:  # a chunked upload with no length, ever growing
        nonlocal sent
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\n\r\n'
        while sent < 500 * MB:
            sent += 64 * 1024
            yield b"\0" * (64 * 1024)

    multipart = {"Content-Type": "multipart/form-data; boundary=b", **AUTH}
    answer = httpx.post(f"{url}/predict", content=endless(), headers=multipart, timeout=120)
    _assert_error(answer, 413, "cut off", "--max-bytes")
    assert answer.headers["connection"] == "close"
    assert sent < 100 * MB  # the server stopped reading: the client could not send it all

    # too many pixels: refused before decoding (400 M gray pixels would take > 1 GB as RGB)
    before = server.rss()
    _assert_error(_post(url, _png_bomb(tmp_path / "bomb.png")), 413, "400.0 megapixels")
    assert server.rss() - before < 100 * MB

    # the type comes from the bytes
    (tmp_path / "notes.png").write_text("not an image")
    accepted = "JPEG, PNG, BMP, TIFF, WebP or DICOM"
    _assert_error(_post(url, tmp_path / "notes.png"), 415, "'notes.png'", accepted)
    gif = tmp_path / "chest.gif"
    Image.fromarray(cxr_gray(medx_data, size=64)).save(gif)
    _assert_error(_post(url, gif, "chest.png"), 415, "47 49 46")
    raw = httpx.post(f"{url}/predict", content=png.read_bytes(), headers=AUTH)
    _assert_error(raw, 415, "multipart/form-data", "-F file=@")

    # unreadable files: 422 with the reason
    jpeg = sorted((medx_data / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[0].read_bytes()
    (tmp_path / "cut.jpeg").write_bytes(jpeg[: len(jpeg) // 2])
    _assert_error(_post(url, tmp_path / "cut.jpeg"), 422, "'cut.jpeg'", "truncated")
    (tmp_path / "empty.png").write_bytes(b"")
    _assert_error(_post(url, tmp_path / "empty.png"), 422, "empty")
    dicom = write_dicom_variants(cxr_gray(medx_data, size=64), tmp_path / "dicom")["rle"]
    (tmp_path / "cut.dcm").write_bytes(dicom.read_bytes()[:1000])
    _assert_error(_post(url, tmp_path / "cut.dcm"), 422, "truncated or corrupt DICOM")
    tiny = tmp_path / "tiny.png"
    cv2.imwrite(str(tiny), np.zeros((8, 8), np.uint8))
    _assert_error(_post(url, tiny), 422, "too small")
    form = b'--b\r\nContent-Disposition: form-data; name="image"\r\n\r\nx\r\n--b--\r\n'
    no_file = httpx.post(f"{url}/predict", content=form, headers=multipart)
    _assert_error(no_file, 422, "field named 'file'")

    # the framework's own errors are JSON too
    _assert_error(httpx.get(f"{url}/nowhere", headers=AUTH), 404, "/docs")
    _assert_error(httpx.get(f"{url}/predict", headers=AUTH), 405, "GET")
    _assert_error(_post(url, png, explain="maybe"), 422, "explain")
    segment = httpx.post(f"{url}/segment", files={"file": png.open("rb")}, headers=AUTH)
    _assert_error(segment, 400, "classification model", "/predict")

    # and the service still serves
    assert _post(url, png).status_code == 200
    assert server.process.poll() is None


def test_tiff_bmp_and_webp_are_read_as_medx_predict_reads_them(
    server: Server, medx_data: Path, tmp_path: Path
):
    gray = cxr_gray(medx_data, 1, size=96)
    png = tmp_path / "chest.png"
    cv2.imwrite(str(png), gray)
    reference = _post(server.url, png).json()["probabilities"]
    lossless = {"tiff": ".tif", "bmp": ".bmp", "webp": ".webp"}
    for kind, suffix in lossless.items():
        path = tmp_path / f"chest{suffix}"
        cv2.imwrite(str(path), gray, [cv2.IMWRITE_WEBP_QUALITY, 101] if kind == "webp" else [])
        answer = _post(server.url, path, f"scan-{kind}.dat")  # told from the bytes
        assert answer.status_code == 200, answer.text
        assert answer.json()["type"] == kind
        for c, p in reference.items():
            assert answer.json()["probabilities"][c] == pytest.approx(p, abs=1e-6), kind

    # the scheme of the Authorization header is case-insensitive (RFC 9110)
    for scheme in ("bearer", "BEARER"):
        files = {"file": ("chest.png", png.read_bytes())}
        headers = {"Authorization": f"{scheme} {TOKEN}"}
        assert httpx.post(f"{server.url}/predict", files=files, headers=headers).status_code == 200


def _peak_mb(pid: int) -> float:
    """The highest resident memory a process has had (VmHWM), in MB."""
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def test_a_dicom_whose_codestream_lies_about_its_size_is_refused_with_bounded_memory(
    server: Server, medx_data: Path, tmp_path: Path
):
    gray = cxr_gray(medx_data)  # 224 x 224 in the header; 8000 x 8000 in 252 bytes of J2K
    lie = size_lie(gray, j2k_zeros(8000), uid.JPEG2000Lossless, tmp_path / "lie.dcm")
    ok = save(variant_dataset("jpeg2000", gray), tmp_path / "ok.dcm")
    assert _post(server.url, ok).status_code == 200  # the JPEG 2000 decoder is loaded
    before = _peak_mb(server.process.pid)

    answer = _post(server.url, lie)

    _assert_error(answer, 413, "'lie.dcm'", "64.0 megapixels", "--max-pixels")
    assert _peak_mb(server.process.pid) - before < 100


def test_a_dicom_of_a_kind_medx_does_not_read_is_told_what_to_send(
    server: Server, medx_data: Path, tmp_path: Path
):
    gray = cxr_gray(medx_data, size=64)
    cine = save(dicom_dataset(np.stack([gray, gray, gray])), tmp_path / "cine.dcm")
    colour = dicom_dataset(np.zeros((64, 64), np.uint8))
    colour.set_pixel_data(cv2.merge([gray, gray, gray]), "RGB", 8)
    colour = save(colour, tmp_path / "colour.dcm")

    for path, words in ((cine, ("3 frames", "one file per frame")), (colour, ("RGB", "grayscale"))):
        message = _assert_error(_post(server.url, path), 422, f"'{path.name}'", *words)
        assert "single-frame grayscale" in message and "uncorrupted" not in message


def test_eight_clients_at_once_without_errors_or_growing_memory(server: Server, medx_data: Path):
    images = [cv2.imencode(".png", cxr_gray(medx_data, i, size=128))[1].tobytes() for i in range(4)]
    expected = [
        httpx.post(f"{server.url}/predict", files={"file": ("x.png", im)}, headers=AUTH).json()
        for im in images
    ]
    failures: list[str] = []

    def client(requests: int) -> None:
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as http:
            for i in range(requests):
                k = i % len(images)
                answer = http.post("/predict", files={"file": ("x.png", images[k])})
                if answer.status_code != 200:
                    failures.append(f"{answer.status_code}: {answer.text[:200]}")
                elif answer.json()["probabilities"] != expected[k]["probabilities"]:
                    failures.append(f"different answer for image {k}")

    def wave(requests: int) -> int:
        clients = [threading.Thread(target=client, args=(requests,)) for _ in range(8)]
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        return server.rss()

    rss = [wave(10) for _ in range(5)]  # 8 clients x 50 requests, the memory after each tenth
    assert failures == []
    grown = [round((b - a) / MB, 1) for a, b in itertools.pairwise(rss)]
    assert max(rss[2:]) - rss[1] < 20 * MB, f"RSS grew by {grown} MB per wave"


def test_an_onnx_export_is_served_by_onnxruntime(server: Server, models: Models, tmp_path: Path):
    from medx.export import export

    png = tmp_path / "square.png"
    image = np.zeros((80, 96), np.uint8)
    cv2.circle(image, (40, 40), 25, 200, -1)
    cv2.imwrite(str(png), image)
    onnx = export(models.classifier, tmp_path / "model.onnx", mlflow=False).path
    eager = _post(server.url, png).json()
    with serving(Settings(model=str(onnx), threads=1)) as url:
        card = httpx.get(f"{url}/metadata").json()
        assert card["model"]["backend"] == "onnxruntime" and card["model"]["id"].startswith("model")
        answer = httpx.post(f"{url}/predict", files={"file": png.open("rb")}).json()
        for c, p in eager["probabilities"].items():
            assert answer["probabilities"][c] == pytest.approx(p, abs=1e-4)
        assert answer["decision"]["threshold"] == eager["decision"]["threshold"]
        explain = httpx.post(f"{url}/predict?explain=true", files={"file": png.open("rb")})
        _assert_error(explain, 400, "PyTorch checkpoint")


def test_a_segmenter_answers_with_the_mask_of_medx_predict(make_cfg, tmp_path: Path):
    cfg = make_cfg("model=unet", "data=phantom_seg", "trainer.max_epochs=1", "logger=none")
    train(cfg)
    ckpt = next((Path(cfg.paths.output_dir) / "checkpoints").glob("epoch*.ckpt"))
    folder = tmp_path / "images"
    folder.mkdir()
    image = np.zeros((80, 112), np.uint8)  # not the model's size, nor square
    cv2.ellipse(image, (56, 40), (30, 20), 0, 0, 360, 180, -1)
    cv2.imwrite(str(folder / "scan.png"), image)
    (expected,) = predict_folder(ckpt, folder, tmp_path / "masks")
    with serving(Settings(model=str(ckpt))) as url:
        answer = httpx.post(f"{url}/segment", files={"file": (folder / "scan.png").open("rb")})
        assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
        mask = cv2.imdecode(np.frombuffer(answer.content, np.uint8), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(mask, cv2.imread(str(expected), cv2.IMREAD_UNCHANGED))
        wrong = httpx.post(f"{url}/predict", files={"file": (folder / "scan.png").open("rb")})
        _assert_error(wrong, 400, "segmentation model", "/segment")


def test_a_model_that_cannot_load_is_reported_and_browsers_get_cors(tmp_path: Path):
    broken = tmp_path / "broken.ckpt"
    broken.write_text("not a checkpoint")
    origin = "https://viewer.example"
    settings = Settings(model=str(broken), cors_origins=(origin,), token=TOKEN)
    with serving(settings, ready=503) as url:
        deadline = time.monotonic() + 300
        while "still loading" in (answer := httpx.get(f"{url}/ready")).text:
            assert time.monotonic() < deadline, "the loading thread never gave up"
            time.sleep(0.1)
        _assert_error(answer, 503, "could not be loaded", "broken.ckpt")
        answer = httpx.post(f"{url}/predict", files={"file": ("x.png", b"")}, headers=AUTH)
        _assert_error(answer, 503, "not a PyTorch checkpoint")
        assert httpx.get(f"{url}/health").status_code == 200
        # a browser page on an allowed origin: the preflight passes without the token, and
        # the refusal of a request without it is readable by the page
        preflight = httpx.options(
            f"{url}/predict",
            headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization"},
        )  # fmt: skip
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin
        refused = httpx.post(f"{url}/predict", headers={"Origin": origin})
        _assert_error(refused, 401)
        assert refused.headers["access-control-allow-origin"] == origin
        other = httpx.get(f"{url}/health", headers={"Origin": "https://elsewhere.example"})
        assert "access-control-allow-origin" not in other.headers


SECRET_URI = "https://alice:s3cret@mlflow.example.org/?token=t0k3n"


def test_credentials_in_a_tracking_uri_never_reach_metadata_or_the_card(
    models: Models, tmp_path: Path
):
    # a card as an older medx or another tool wrote it: the credentials stored in the file
    stored = torch.load(models.classifier, weights_only=True)
    stored["medx"]["run"]["tracking_uri"] = SECRET_URI
    stored["medx"]["registry"] = {"uri": "postgresql://bob:hunter2@db.example/mlflow"}
    checkpoint = tmp_path / "site" / "model.ckpt"
    checkpoint.parent.mkdir()
    torch.save(stored, checkpoint)
    secrets = ("s3cret", "t0k3n", "hunter2", "alice", "bob")

    with serving(Settings(model=str(checkpoint), threads=1)) as url:
        shown = httpx.get(f"{url}/metadata").text

    for secret in (*secrets, str(tmp_path)):
        assert secret not in shown, secret
    assert "REDACTED@mlflow.example.org" in shown  # what is not secret stays
    card = Predictor.from_checkpoint(checkpoint).card.to_dict()
    assert not any(secret in json.dumps(card) for secret in secrets)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_server_whose_model_cannot_load_exits_non_zero(tmp_path: Path, workers: int):
    broken = tmp_path / "broken.ckpt"
    broken.write_text("not a checkpoint")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDX_SERVE_")}
    command = [sys.executable, "-m", "medx.serve", str(broken), "--host", "0.0.0.0", "--port",
               str(_free_port()), "--workers", str(workers), "--threads", "1"]  # fmt: skip
    log = tmp_path / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        status = process.wait(120)  # torch's import, then the load fails: seconds
    finally:
        if process.poll() is None:
            process.kill()
    printed = log.read_text()
    assert status == 1, printed[-3000:]
    assert "without a token" in printed  # 0.0.0.0 and no token: said at start
    assert 1 <= printed.count("cannot serve") <= workers, printed[-3000:]  # said once a worker
    assert "not a PyTorch checkpoint" in printed


def test_a_threshold_that_is_no_probability_is_refused(tmp_path: Path):
    for value in ("nan", "1.5"):
        with pytest.raises(SystemExit, match=f"--qc-threshold {value}: a threshold is") as stop:
            serve_main(["model.ckpt", "--qc", "qc.ckpt", "--qc-threshold", value])
        assert "\n" not in str(stop.value.code)


def test_settings_come_from_flags_over_environment(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setenv("MEDX_SERVE_MAX_BYTES", "1e6")
    monkeypatch.setenv("MEDX_SERVE_PORT", "9000")
    monkeypatch.setenv("MEDX_SERVE_CORS_ORIGINS", "https://a.example, https://b.example")
    settings = from_args(["model.ckpt", "--port", "9100"])
    assert (settings.port, settings.max_bytes) == (9100, 1_000_000)
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert Settings.from_env({**settings.to_env()}) == settings  # what workers receive
    with pytest.raises(SystemExit, match=r"MODEL .*none\.ckpt is not a file") as stop:
        serve_main([str(tmp_path / "none.ckpt")])
    assert "\n" not in str(stop.value.code)
    monkeypatch.setenv("MEDX_SERVE_MAX_PIXELS", "lots")
    with pytest.raises(SystemExit, match="MEDX_SERVE_MAX_PIXELS='lots' is not a number"):
        serve_main(["model.ckpt"])
