"""`python -m medx.predict` on real checkpoints of short real runs, real images and DICOM."""

from __future__ import annotations

import csv
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from dicom_files import VARIANTS, cxr_gray, write_dicom_variants
from omegaconf import open_dict

from medx.data.io import read_image
from medx.data.transforms import ImageTransform
from medx.inference import Predictor
from medx.models.load import load
from medx.predict import main as predict_main
from medx.quality.degradations import gaussian_blur
from medx.train import train


def _train(make_cfg, out: Path, *overrides: str) -> Path:
    cfg = make_cfg(*overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    train(cfg)
    return next((out / "checkpoints").glob("epoch*.ckpt"))


def _png_bomb(path: Path, side: int = 20_000) -> Path:
    """A valid ~50 KB PNG that claims side × side gray pixels (all black)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = b"\x00" + b"\x00" * ((side + 7) // 8)  # 1-bit gray, filter 0
    pixels = zlib.compressobj(9)
    data = b"".join(pixels.compress(row) for _ in range(side)) + pixels.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")
    )
    return path


def _rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "predictions.csv").open() as f:
        return {Path(r["path"]).name: r for r in csv.DictReader(f)}


def test_a_folder_of_images_dicom_and_bad_files(make_cfg, medx_data: Path, tmp_path: Path, capsys):
    ckpt = _train(make_cfg, tmp_path / "run", "eval.bootstrap=20")
    studies = tmp_path / "studies"
    gray = cxr_gray(medx_data, size=128)
    dicoms = write_dicom_variants(gray, studies / "dicom")
    good = studies / "nested" / "deeper" / "chest.png"
    good.parent.mkdir(parents=True)
    cv2.imwrite(str(good), gray)
    jpeg = (medx_data / "chest_xray" / "train" / "NORMAL").glob("*.jpeg").__next__().read_bytes()
    (studies / "truncated.jpeg").write_bytes(jpeg[: len(jpeg) // 2])
    (studies / "empty.png").write_bytes(b"")
    bomb = _png_bomb(studies / "bomb.png")
    assert bomb.stat().st_size < 200_000

    rows = predict_main([str(ckpt), str(studies), "--out", str(tmp_path / "p"), "--workers", "1"])

    found = _rows(tmp_path / "p")
    assert len(rows) == len(found) == len(dicoms) + 4  # every file has its row
    assert "truncated" in found["truncated.jpeg"]["error"]
    assert "empty" in found["empty.png"]["error"]
    assert (
        "megapixels" in found["bomb.png"]["error"] and "--max-pixels" in found["bomb.png"]["error"]
    )
    reference = float(found["reference.png"]["p_OPACITY"])
    for name in VARIANTS:  # every DICOM encoding of the same pixels: the PNG's probability
        row = found[dicoms[name].name]
        assert row["error"] == "", (name, row["error"])
        assert float(row["p_OPACITY"]) == pytest.approx(reference, abs=1e-3), name
    card = load(ckpt).card
    op = card["operating_point"]
    row = found["chest.png"]
    assert row["decision"] == (
        "OPACITY" if float(row["p_OPACITY"]) >= float(row["threshold"]) else "NORMAL"
    )
    assert row["threshold_source"].startswith(f"val sensitivity {op['target_sensitivity']}")
    assert card["run"]["id"] in row["model"]
    out = capsys.readouterr().out
    assert f"{len(found)} images: {len(found) - 3} predicted, 3 failed" in out

    # one image: one line to the terminal; --threshold overrides the operating point
    predict_main([str(ckpt), str(good), "--threshold", "0.0"])
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{good}: ") and "(--threshold): OPACITY" in line

    # Grad-CAM overlays at each image's own size; a class that does not exist is named
    predict_main([str(ckpt), str(studies / "dicom"), "--out", str(tmp_path / "g"), "--gradcam",
                  "--workers", "0", "--no-progress"])  # fmt: skip
    overlay = cv2.imread(str(tmp_path / "g" / "gradcam" / "reference.png"))
    assert overlay.shape[:2] == gray.shape
    with pytest.raises(SystemExit, match="--gradcam-class 'CAT' is not one of"):
        predict_main([str(ckpt), str(good), "--gradcam", "--gradcam-class", "CAT", "--out",
                      str(tmp_path / "cat")])  # fmt: skip


def test_bad_arguments_get_one_line(make_cfg, tmp_path: Path):
    ckpt = _train(make_cfg, tmp_path / "run", "test=false", "trainer.max_epochs=1", "logger=none")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("no images here")
    cases = {
        "does not exist": [str(tmp_path / "none.ckpt"), str(tmp_path)],
        "Input .*nowhere does not exist": [str(ckpt), str(tmp_path / "nowhere")],
        "holds no images": [str(ckpt), str(tmp_path / "empty")],
        "not a PyTorch checkpoint": [str(tmp_path / "notes.txt"), str(tmp_path)],
    }
    for message, argv in cases.items():
        with pytest.raises(SystemExit, match=message) as stop:
            predict_main(argv)
        assert "\n" not in str(stop.value.code)


@pytest.mark.slow
def test_quality_gate_flags_degraded_copies_and_tta_uses_its_own_threshold(
    make_cfg, medx_data: Path, tmp_path: Path, caplog
):
    ckpt = _train(make_cfg, tmp_path / "run", "eval.bootstrap=20")
    qc = _train(
        make_cfg,
        tmp_path / "qc",
        "data=quality",
        "model=quality_logreg",
        "model.backbone=logreg",
        f"data.source_root={medx_data}/chest_xray/train",
        "data.max_sources=80",
        "data.image_size=128",
        "trainer.max_epochs=30",
        "eval.bootstrap=20",
    )
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    sources = sorted((medx_data / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[:4]
    for i, source in enumerate(sources):
        image = cv2.imread(str(source), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(images / f"clean{i}.png"), image)
        blurred = gaussian_blur(image, 1.0, rng)
        cv2.imwrite(str(images / f"blurred{i}.png"), blurred)

    args = [str(ckpt), str(images), "--workers", "0", "--no-progress", "--qc", str(qc)]
    predict_main([*args, "--out", str(tmp_path / "flag")])
    predict_main([*args, "--out", str(tmp_path / "refuse"), "--qc-mode", "refuse"])

    flagged, refused = _rows(tmp_path / "flag"), _rows(tmp_path / "refuse")
    for name, row in flagged.items():
        assert row["qc_verdict"] == ("bad" if name.startswith("blurred") else "good"), name
        assert row["predicted"]  # flag mode keeps the prediction
    for name, row in refused.items():
        refused_now = name.startswith("blurred")
        assert (row["predicted"] == "") == refused_now, name
        assert ("refused" in row["qc_reason"]) == refused_now

    # TTA: the checkpoint's threshold was chosen without TTA: said, and used with a warning
    caplog.clear()
    predict_main([str(ckpt), str(images), "--tta", "--workers", "0", "--no-progress"])
    assert "no operating point chosen on validation with TTA" in caplog.text
    model = load(ckpt)
    x = torch.stack([ImageTransform(64)(read_image(p)) for p in sorted(images.iterdir())])
    raw = Predictor(model, calibrated=False)
    plain, averaged = raw.probabilities(x), raw.configured(tta=True).probabilities(x)
    assert not torch.equal(plain, averaged)  # the views were really applied
    assert torch.allclose(averaged.sum(1), torch.ones(len(x)))  # a mean of probabilities


@pytest.mark.slow
def test_eval_tta_chooses_the_operating_point_that_predict_tta_uses(
    make_cfg, tracked_runs, phantom_cache: Path, tmp_path: Path, caplog
):
    ckpt = _train(make_cfg, tmp_path / "run", "eval.tta=true", "eval.bootstrap=20")
    (run,) = tracked_runs()
    card = load(ckpt).card
    assert card["operating_point_tta"]["tta"] is True
    assert card["operating_point_tta"]["threshold"] == run.data.metrics["test/threshold_at_op"]
    assert "operating_point" not in card  # a plain threshold was not chosen: none is claimed
    image = next(phantom_cache.rglob("*.png"))  # a phantom chest X-ray

    caplog.clear()
    (row,) = predict_main([str(ckpt), str(image), "--tta", "--workers", "0"])

    assert "with TTA" in row["threshold_source"]
    assert "no operating point chosen on validation with TTA" not in caplog.text
    (plain,) = predict_main([str(ckpt), str(image), "--workers", "0"])
    assert "decision" not in plain  # no plain operating point: no decision is made up
