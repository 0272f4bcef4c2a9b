"""`data.intensity`: per-image standardisation, the same in training, evaluation and prediction."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from medx.cli import user_error
from medx.data.intensity import METHODS
from medx.data.io import read_image
from medx.errors import ConfigError
from medx.models.load import load
from medx.predict import main as predict_main
from medx.train import train

STANDARDISING = [m for m in METHODS if m != "none"]


def _cxr16(medx_data: Path) -> np.ndarray:
    """A real chest X-ray as 16-bit data of a detector (12 useful bits, an offset)."""
    files = sorted((medx_data / "chest_xray" / "train" / "PNEUMONIA").glob("*.jpeg"))
    gray = cv2.imread(str(files[0]), cv2.IMREAD_GRAYSCALE).astype(np.float64)
    smooth = cv2.GaussianBlur(gray, (0, 0), 1.0)  # sub-grey-level detail for 16 bits to keep
    return np.rint(smooth * 16 + 200).astype(np.uint16)


@pytest.mark.parametrize("method", STANDARDISING)
def test_an_image_and_its_affinely_rescaled_copy_read_the_same(
    method: str, medx_data: Path, tmp_path: Path
):
    raw = _cxr16(medx_data)
    brighter = (raw.astype(np.int64) * 3 + 1000).astype(np.uint16)  # another gain and offset
    cv2.imwrite(str(tmp_path / "a.png"), raw)
    cv2.imwrite(str(tmp_path / "b.png"), brighter)

    a, b = read_image(tmp_path / "a.png", method), read_image(tmp_path / "b.png", method)

    assert a.shape == (*raw.shape, 3) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= (0 if method == "equalize" else 1)
    assert not np.array_equal(a, read_image(tmp_path / "a.png"))  # it did change the image


def test_equalisation_keeps_16_bit_precision(tmp_path: Path):
    """Detail packed into one 8-bit step of a 16-bit image (an outlier stretches the range):
    the 8-bit window flattens it, equalisation on the 16-bit values keeps it."""
    rng = np.random.default_rng(0)
    img = (30000 + rng.integers(0, 200, (64, 64))).astype(np.uint16)
    img[0, 0], img[0, 1] = 0, 65535
    cv2.imwrite(str(tmp_path / "deep.png"), img)

    windowed = read_image(tmp_path / "deep.png")
    equalised = read_image(tmp_path / "deep.png", "equalize")

    assert len(np.unique(windowed[1:, :, 0])) <= 2
    assert len(np.unique(equalised[1:, :, 0])) >= 150


def test_an_unknown_method_is_a_config_error(make_cfg):
    with pytest.raises(ConfigError, match=r"data\.intensity='gamma' must be one of none, zscore"):
        train(make_cfg("data.intensity=gamma"))
    with pytest.raises(Exception) as err:  # raised while Hydra instantiates the data module
        train(make_cfg("data=quality", "data.intensity=clahe"))
    assert "data.intensity=clahe with data=quality" in str(user_error(err.value))


def test_the_checkpoint_carries_it_and_prediction_applies_it(make_cfg, tmp_path: Path):
    cfg = make_cfg("data.intensity=clahe", "eval.bootstrap=20")
    train(cfg)
    (best,) = (tmp_path / "run" / "checkpoints").glob("epoch*.ckpt")
    assert load(best).card["input"]["intensity"] == "clahe"
    with (tmp_path / "run" / "evaluation" / "test_predictions.csv").open() as f:
        expected = {Path(r["path"]).name: float(r["probability"]) for r in csv.DictReader(f)}
    images = tmp_path / "images"
    images.mkdir()
    for row_path in list(expected)[:12]:
        shutil.copy(next(Path(cfg.paths.cache_dir).rglob(row_path)), images / row_path)

    rows = predict_main([str(best), str(images), "--no-calibration", "--workers", "0",
                         "--no-progress"])  # fmt: skip

    for row in rows:
        name = Path(row["path"]).name
        assert float(row["p_OPACITY"]) == pytest.approx(expected[name], abs=2e-6), name
