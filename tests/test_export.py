"""`medx.export`: an ONNX file that agrees with PyTorch away from the export's shapes, carries
the model card, is logged to its training run, and refuses what it cannot vouch for."""

from __future__ import annotations

import json
import logging
import socket
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from mlflow import MlflowClient
from onnx import numpy_helper
from test_predict_edges import read_only

from medx.data.io import read_image
from medx.export import (
    CheckError,
    ExportError,
    as_batch,
    check_images,
    export,
    export_model,
    set_metadata,
    verify,
)
from medx.export import main as export_main
from medx.inference import OnnxModel, OnnxModelError, Predictor, find_inputs, predict_mask
from medx.inference.onnx_model import pad_to_stride
from medx.models.classifier import ClassificationModule
from medx.models.load import load
from medx.train import train


def _trained(make_cfg, *overrides: str) -> tuple[Path, Path]:
    """A tiny model trained one epoch (tested, so its card has an operating point and a
    temperature): (its best checkpoint, the phantom image folder it was trained on)."""
    cfg = make_cfg("trainer.max_epochs=1", "eval.bootstrap=20", *overrides)
    train(cfg)
    (best,) = (Path(cfg.paths.output_dir) / "checkpoints").glob("epoch*.ckpt")
    return best, Path(cfg.data.cache_dir)


def _images(folder: Path, n: int, size: int) -> torch.Tensor:
    """n real image files from folder as a [0, 1] batch, independent of medx.export's picks."""
    paths = find_inputs(folder)[-n:]
    return as_batch([read_image(p) for p in paths], n, size, size)


def test_a_classifier_export_agrees_with_pytorch_carries_its_card_and_lands_in_its_run(
    make_cfg, tracked_runs, mlflow_client: MlflowClient, tmp_path: Path, capsys
):
    ckpt, phantom = _trained(make_cfg)
    out = tmp_path / "export" / "model.onnx"

    export_main([str(ckpt), "--out", str(out), "--check-images", str(phantom)])

    printed = capsys.readouterr().out
    assert f"Exported {out}" in printed and "largest |logit difference|" in printed
    assert "batch 3, 64x64 px" in printed and f"images from {phantom}" in printed
    model, onnx_model = load(ckpt), OnnxModel(out)
    x = _images(phantom, 3, 64)  # batch 3: the export's dummy had batch 2
    with torch.inference_mode():
        expected = model(x)
    got = onnx_model(x)
    assert isinstance(got, torch.Tensor) and got.shape == (3, 2)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)
    assert np.allclose(onnx_model(x[:1].numpy()), expected[:1].numpy(), atol=1e-4, rtol=0)

    # the metadata round-trips: what medx.predict needs comes back equal to the card's
    card = model.card
    (run,) = tracked_runs()
    assert onnx_model.task == "classification"
    assert onnx_model.class_names == card["class_names"] == ["NORMAL", "OPACITY"]
    assert onnx_model.threshold == card["operating_point"]["threshold"]
    assert onnx_model.temperature == card["calibration"]["temperature"] != 1.0
    assert onnx_model.metadata["medx.target_sensitivity"] == 0.95
    assert onnx_model.metadata["medx.run_id"] == run.info.run_id == card["run"]["id"]
    assert onnx_model.input["image_size"] == 64 and onnx_model.input["range"] == [0.0, 1.0]
    assert onnx_model.input["mean"] == pytest.approx(list(model.mean))
    assert {k: v for k, v in onnx_model.card.items() if k != "onnx"} == json.loads(json.dumps(card))
    assert onnx_model.card["onnx"]["check"]["max_abs_diff"] <= 1e-4
    assert onnx_model.card["onnx"]["export"]["opset"] == 17
    props = {p.key: json.loads(p.value) for p in onnx.load(str(out)).metadata_props}
    assert props["medx.class_names"] == card["class_names"]
    assert props["medx.temperature"] == card["calibration"]["temperature"]
    # the threshold says its scale (the card's: raw softmax); files from before still read
    threshold = card["operating_point"]["threshold"]
    assert props["medx.threshold"] == {"value": threshold, "scale": "raw"}
    assert onnx_model.threshold_scale == "raw"
    older = onnx.load(str(out))
    set_metadata(older, {"medx.threshold": threshold})
    onnx.save(older, str(tmp_path / "older.onnx"))
    old = OnnxModel(tmp_path / "older.onnx")
    assert (old.threshold, old.threshold_scale) == (threshold, "raw")

    # the inference core's calibrated probabilities take the ONNX model in place of the module
    assert Predictor(onnx_model).temperature == onnx_model.temperature
    probs = Predictor(onnx_model).probabilities(x)
    assert torch.allclose(probs, Predictor(model).probabilities(x), atol=1e-5)

    # logged to the training run, which had finished
    assert run.info.status == "FINISHED"
    logged = mlflow_client.list_artifacts(run.info.run_id, "onnx")
    assert [a.path for a in logged] == ["onnx/model.onnx"]
    tags = mlflow_client.get_run(run.info.run_id).data.tags
    assert tags["medx.onnx"] == "onnx/model.onnx"

    with pytest.raises(OnnxModelError, match="takes 64x64 images, not 96x96"):
        onnx_model(torch.rand(1, 3, 96, 96))
    with pytest.raises(OnnxModelError, match="float images in"):
        onnx_model(np.zeros((1, 3, 64, 64), np.uint8))

    # a tampered file fails the check, naming itself and the difference
    proto = onnx.load(str(out))
    conv = next(t for t in proto.graph.initializer if len(t.dims) == 4)
    conv.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(conv) + 0.05, conv.name))
    tampered = tmp_path / "tampered.onnx"
    onnx.save(proto, str(tampered))
    images, described = check_images(phantom)
    with pytest.raises(CheckError, match=r"tampered\.onnx disagrees.*difference") as err:
        verify(model, tampered, images, described)
    assert err.value.diff > 1e-4 and "the export is wrong" in str(err.value)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_a_unet_export_agrees_at_other_sizes_and_pads_like_its_contract(
    make_cfg, tracked_runs, mlflow_client: MlflowClient, tmp_path: Path, caplog
):
    ckpt, phantom = _trained(make_cfg, "model=unet", "data=phantom_seg")
    out = tmp_path / "unet.onnx"
    nowhere = f"http://127.0.0.1:{_closed_port()}"

    with caplog.at_level(logging.WARNING, logger="medx.export"):
        done = export(ckpt, out, phantom, tracking_uri=nowhere)

    assert not done.logged and f"{nowhere} is not reachable" in caplog.text  # warned, and went on
    (run,) = tracked_runs()
    assert mlflow_client.list_artifacts(run.info.run_id, "onnx") == []
    assert "batch 3, 96x128 px" in done.check.cases
    model, onnx_model = load(ckpt), OnnxModel(out)
    assert onnx_model.task == "segmentation" and onnx_model.stride == 32
    assert onnx_model.threshold == model.threshold
    assert onnx_model.input["shape"] == ["batch", 3, "height", "width"]

    files = find_inputs(phantom)[-3:]
    x = as_batch([read_image(p) for p in files], 3, 96, 160)  # export: 2 x 64 x 64
    with torch.inference_mode():
        expected = model(x)
    got = onnx_model(x)
    assert got.shape == (3, 1, 96, 160)
    assert torch.allclose(got, expected, atol=1e-4, rtol=0)

    # a size that is no multiple of the stride: padded at the bottom/right with edge pixels,
    # the logits cropped back, as the input contract tells callers to do
    odd = as_batch([read_image(p) for p in files], 2, 70, 90)
    padded = torch.from_numpy(pad_to_stride(odd.numpy(), 32))
    assert padded.shape[-2:] == (96, 96)
    with torch.inference_mode():
        expected = model(padded)[..., :70, :90]
    assert torch.allclose(onnx_model(odd), expected, atol=1e-4, rtol=0)

    # a limit below float32 precision fails too, and the message tells rounding from a bug
    images, described = check_images(phantom)
    with pytest.raises(CheckError, match=r"unet\.onnx disagrees.*export is right.*--tolerance"):
        verify(model, out, images, described, tolerance=0.0)

    # the inference core's mask function takes the ONNX model in place of the module
    image = read_image(files[0])
    masks = [predict_mask(m, image, model.threshold) for m in (model, onnx_model)]
    assert masks[0].shape == image.shape[:2]
    assert np.mean(masks[0] != masks[1]) < 1e-3


def test_bad_inputs_get_one_line_naming_the_file(tmp_path: Path):
    notes = tmp_path / "model.ckpt"
    notes.write_text("epoch=3 val_auroc=0.97\n")
    with pytest.raises(SystemExit) as stop:
        export_main([str(notes), "--out", str(tmp_path / "m.onnx")])
    message = str(stop.value.code)
    assert message.startswith("medx.export: ") and str(notes) in message and "\n" not in message
    assert not (tmp_path / "m.onnx").exists()

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not a model")
    with pytest.raises(OnnxModelError, match=r"garbage\.onnx cannot be opened by onnxruntime"):
        OnnxModel(garbage)
    model = ClassificationModule("test_resnet", num_classes=2)
    with pytest.raises(ExportError, match="--opset 23: the TorchScript exporter writes opsets"):
        export_model(model, tmp_path / "m.onnx", [], "", opset=23, size=64)
    foreign = tmp_path / "foreign.onnx"
    with pytest.warns(DeprecationWarning):
        torch.onnx.export(torch.nn.Linear(3, 2), (torch.rand(1, 3),), str(foreign), dynamo=False)
    with pytest.raises(OnnxModelError, match=r"foreign\.onnx is an ONNX model but not a medx"):
        OnnxModel(foreign)


def test_an_export_is_checked_on_real_chest_x_rays(medx_data: Path, tmp_path: Path):
    """An untrained test_resnet classifier (no card: the size is given) on 3 real CXRs."""
    model = ClassificationModule("test_resnet", num_classes=2).eval()
    images, described = check_images(medx_data / "chest_xray" / "train")
    assert len(images) == 3 and "images from" in described
    assert len({im.tobytes() for im in images}) == 3  # three different X-rays

    check = export_model(model, tmp_path / "m.onnx", images, described, size=96)

    assert check.max_abs_diff <= 1e-4 and check.cases[1] == "batch 3, 96x96 px"
    assert OnnxModel(tmp_path / "m.onnx").card["onnx"]["check"]["images"] == described


_EXPORT_INTO = """
import sys
from pathlib import Path
from medx.errors import MedxError
from medx.export import export_model
from medx.models.classifier import ClassificationModule

try:  # straight to the exporter: no folder check before it
    export_model(ClassificationModule("test_resnet", num_classes=2).eval(), Path(sys.argv[1]),
                 [], "", size=64)
except MedxError as err:
    print(f"{type(err).__name__}: {err}")
"""


def test_an_out_that_cannot_be_written_is_one_line_and_nothing_is_left_behind(
    make_cfg, tmp_path: Path
):
    ckpt, _ = _trained(make_cfg, "logger=none")
    notes = tmp_path / "notes.txt"
    notes.write_text("a file, not a folder")
    with pytest.raises(SystemExit) as stop:
        export_main([str(ckpt), "--out", str(notes / "model.onnx"), "--no-mlflow"])
    message = str(stop.value.code)
    assert message.startswith("medx.export: ") and "\n" not in message
    assert f"--out {notes} is a file" in message

    # a read-only file system: the command says so at once; the exporter itself, which gets
    # there only when the folder turns read-only meanwhile, says so too, without a second
    # error from cleaning up the file it could not write
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    done = read_only(shelf, sys.executable, "-m", "medx.export", str(ckpt), "--out",
                     str(shelf / "model.onnx"), "--no-mlflow")  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("medx.export:")]
    assert "--out" in line and "cannot be written (Read-only file system)" in line
    inner = read_only(shelf, sys.executable, "-c", _EXPORT_INTO, str(shelf / "m.onnx"))
    assert "Traceback" not in inner.stderr, inner.stderr
    assert inner.stdout.startswith("DataError: Could not write") and "Read-only" in inner.stdout
    assert list(shelf.iterdir()) == []
