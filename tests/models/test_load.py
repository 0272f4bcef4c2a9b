"""`medx.models.load`: a checkpoint is one self-contained thing, opened one way, safely."""

from __future__ import annotations

import csv
import functools
import http.server
import json
import pickle
import shutil
import threading
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from mlflow import MlflowClient
from omegaconf import open_dict

from medx.config import compose
from medx.errors import CheckpointError
from medx.eval import main as eval_main
from medx.eval import run as eval_run
from medx.models.load import load, model_card, read_checkpoint
from medx.predict import main as predict_main
from medx.score import main as score_main
from medx.train import train


def test_a_checkpoint_copied_alone_is_the_whole_model(
    make_cfg, tracked_runs, mlflow_client: MlflowClient, tmp_path: Path, capsys
):
    """Trained from a local weights file that is then deleted; copied alone to an empty folder,
    the best checkpoint loads, predicts the run's own test probabilities, carries the run's
    operating point and temperature, and evaluates to the run's test metrics."""
    weights = tmp_path / "start.pth"
    torch.save(timm.create_model("test_resnet", num_classes=2).state_dict(), weights)
    cfg = make_cfg(f"model.weights={weights}", "eval.bootstrap=50")
    train(cfg)
    weights.unlink()
    (run,) = tracked_runs()
    (best,) = (tmp_path / "run" / "checkpoints").glob("epoch*.ckpt")
    alone = tmp_path / "elsewhere" / "model.ckpt"
    alone.parent.mkdir()
    shutil.copy(best, alone)
    shutil.rmtree(tmp_path / "run" / "checkpoints")

    model = load(alone)
    card = model.card
    assert not model.training and model.task == "classification"
    assert card["class_names"] == ["NORMAL", "OPACITY"]
    assert card["input"]["image_size"] == 64
    assert model.mean == pytest.approx((0.485, 0.456, 0.406))  # started from weights: ImageNet's
    assert card["run"]["id"] == run.info.run_id
    assert card["run"]["git_commit"] == run.data.tags["mlflow.source.git.commit"]
    assert card["data"]["name"] == "phantom"
    assert card["data"]["patient_pattern"] == r"patient(\d+)_"
    metrics = run.data.metrics
    assert card["operating_point"]["threshold"] == metrics["test/threshold_at_op"]
    assert card["operating_point"]["target_sensitivity"] == 0.95
    assert card["calibration"]["temperature"] == metrics["test/temperature"]

    # medx.predict on the run's test images gives the clinical evaluation's probabilities
    with (tmp_path / "run" / "evaluation" / "test_predictions.csv").open() as f:
        expected = {row["path"]: row for row in csv.DictReader(f)}
    images = tmp_path / "images"
    for i, path in enumerate(expected):
        (images / Path(path).parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, images / Path(path).parent.name / f"{i:03d}_{Path(path).name}")
    for flag, column in (([], "probability_calibrated"), (["--no-calibration"], "probability")):
        rows = predict_main([str(alone), str(images), "--out", str(tmp_path / "p"), *flag,
                             "--workers", "0", "--no-progress", "--labels"])  # fmt: skip
        wanted = sorted(float(r[column]) for r in expected.values())
        got = sorted(float(r["p_OPACITY"]) for r in rows)
        assert got == pytest.approx(wanted, abs=2e-6)
    labelled = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert labelled["auroc"] == pytest.approx(metrics["test/auroc"], abs=1e-6)
    assert labelled["images"] == len(expected)

    again = eval_run(compose([f"ckpt_path={alone}", "eval.bootstrap=50"], "eval"))
    assert again["test/auroc"] == pytest.approx(metrics["test/auroc"], abs=1e-6)
    assert again["test/threshold_at_op"] == pytest.approx(metrics["test/threshold_at_op"])


def test_a_model_trained_from_downloaded_weights_loads_with_no_network(
    make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """model.pretrained=true, the weights served by a loopback HTTP server (a mirror); once
    trained, the server is gone and the download cache deleted: the checkpoint still loads."""
    served = tmp_path / "served"
    served.mkdir()
    start = timm.create_model("test_resnet", num_classes=2)
    torch.save(start.state_dict(), served / "test_resnet.pth")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    url = f"http://127.0.0.1:{server.server_address[1]}/test_resnet.pth"
    try:
        cfg = make_cfg("model.pretrained=true", f"model.pretrained_url={url}", "test=false",
                       "trainer.max_epochs=1", "logger=none")  # fmt: skip
        train(cfg)
    finally:
        server.shutdown()
    shutil.rmtree(tmp_path / "torch_home")
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    saved = read_checkpoint(ckpt)["hyper_parameters"]
    assert saved["pretrained"] is True and saved["pretrained_url"] == url

    model = load(ckpt)

    x = torch.rand(2, 3, 64, 64)
    state = read_checkpoint(ckpt)["state_dict"]
    assert torch.equal(model.net.conv1[0].weight, state["net.conv1.0.weight"])
    assert model.mean == pytest.approx((0.485, 0.456, 0.406))
    assert torch.isfinite(model(x)).all()


class _CreatesAFile:
    """A pickle payload: unpickling it would create the file `target`."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def _write_ckpt(path: Path, payload: object) -> Path:
    torch.save(payload, path)
    return path


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_and_never_runs(tmp_path: Path, capsys):
    target = tmp_path / "pwned"
    ckpt = _write_ckpt(
        tmp_path / "evil.ckpt",
        {"state_dict": {}, "hyper_parameters": {"backbone": _CreatesAFile(target)}},
    )

    with pytest.raises(CheckpointError, match=r"evil\.ckpt was refused: it holds Python objects"):
        load(ckpt)
    for command in (
        lambda: eval_main(compose([f"ckpt_path={ckpt}"], "eval")),
        lambda: predict_main([str(ckpt), str(tmp_path)]),
        lambda: score_main([str(tmp_path), "--checkpoint", str(ckpt)]),
    ):
        with pytest.raises(SystemExit, match=r"evil\.ckpt was refused"):
            command()
    assert not target.exists()
    with pytest.raises(pickle.UnpicklingError):  # the payload is real: unpickled, it would run
        torch.load(ckpt, weights_only=True)


def _unreadable(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Files a user may pass for a checkpoint, with what the error must say."""
    real = tmp_path / "real.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "hyper_parameters": {}}, real)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    text = tmp_path / "notes.ckpt"
    text.write_text("epoch=3 val_auroc=0.97\n")
    jpeg = tmp_path / "photo.ckpt"
    jpeg.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 200 + b"\xff\xd9")
    plain = _write_ckpt(tmp_path / "state_dict.ckpt", {"w": torch.zeros(3)})
    no_hparams = _write_ckpt(tmp_path / "lightning.ckpt", {"state_dict": {"w": torch.zeros(3)}})
    return {
        "empty": (empty, "is empty"),
        "truncated": (truncated, "no zip archive|cannot be read"),
        "text": (text, "no zip archive"),
        "jpeg": (jpeg, "no zip archive"),
        "plain dict": (plain, "not a medx checkpoint"),
        "no hyper-parameters": (no_hparams, "without `hyper_parameters`"),
        "missing": (tmp_path / "nowhere.ckpt", "does not exist"),
    }


def test_unreadable_checkpoints_get_one_line_naming_the_file_before_any_run(
    tmp_path: Path, tracked_runs, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    for name, (path, reason) in _unreadable(tmp_path).items():
        with pytest.raises(CheckpointError, match=reason) as err:
            model_card(path)
        assert str(path) in str(err.value), name
        for command in (
            lambda p=path: eval_main(compose([f"ckpt_path={p}"], "eval")),
            lambda p=path: predict_main([str(p), str(tmp_path)]),
            lambda p=path: score_main([str(tmp_path), "--checkpoint", str(p)]),
        ):
            with pytest.raises(SystemExit) as stop:
                command()
            assert str(path) in str(stop.value.code) and "\n" not in str(stop.value.code), name
    assert tracked_runs() == []  # medx.eval opened no MLflow run for a file it could not read


def test_a_tampered_checkpoint_that_no_longer_fits_its_model_is_named(make_cfg, tmp_path: Path):
    cfg = make_cfg("test=false", "trainer.max_epochs=1", "logger=none")
    with open_dict(cfg):
        cfg.trainer.max_epochs = 1
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    content = read_checkpoint(ckpt)
    del content["state_dict"]["net.fc.weight"]
    torch.save(content, tmp_path / "tampered.ckpt")
    assert zipfile.is_zipfile(tmp_path / "tampered.ckpt")

    with pytest.raises(CheckpointError, match=r"tampered\.ckpt does not fit.*1 missing"):
        load(tmp_path / "tampered.ckpt")
