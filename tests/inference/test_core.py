"""Pieces of the inference core that need no trained model: the decision's scales, threshold
validation, reading from a file, bytes or an array, and output names no two inputs share."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from medx.errors import ConfigError
from medx.inference import DecisionRule, PixelLimitError, check_threshold, read, to_scale
from medx.inference.naming import output_names
from medx.models.card import ModelCard

CARD = ModelCard.from_dict(
    {
        "class_names": ["NORMAL", "OPACITY"],
        "operating_point": {"threshold": 0.0879, "target_sensitivity": 0.95, "tta": False},
        "calibration": {"temperature": 1.3},
        "run": {"id": "r1"},
    }
)


def test_the_operating_point_is_moved_onto_the_reported_scale_and_says_so():
    raw = DecisionRule.of(CARD, CARD.class_names, "raw", CARD.temperature)
    calibrated = DecisionRule.of(CARD, CARD.class_names, "calibrated", CARD.temperature)
    assert (raw.threshold, raw.scale) == (0.0879, "raw")
    z = math.log(0.0879 / (1 - 0.0879)) / 1.3
    assert calibrated.threshold == pytest.approx(1 / (1 + math.exp(-z)))
    assert calibrated.scale == "calibrated" and calibrated.source == "val sensitivity 0.95, run r1"
    assert to_scale(calibrated.threshold, "calibrated", "raw", 1.3) == pytest.approx(0.0879)
    # the same logit decides the same on either scale
    for logit in (-2.4, -2.33, -2.3, 0.0):
        p_raw, p_cal = 1 / (1 + math.exp(-logit)), 1 / (1 + math.exp(-logit / 1.3))
        assert raw(p_raw).label == calibrated(p_cal).label
    by_hand = DecisionRule.of(CARD, CARD.class_names, "calibrated", 1.3, threshold=0.4)
    assert (by_hand.threshold, by_hand.scale, by_hand.source) == (0.4, "calibrated", "--threshold")
    assert DecisionRule.of(ModelCard(), ["a", "b"], "raw", 1.0) is None  # none made up


@pytest.mark.parametrize("value", [math.nan, 1.5, -0.1, math.inf])
def test_a_threshold_that_is_no_probability_is_refused(value: float):
    with pytest.raises(ConfigError, match="between 0 and 1"):
        check_threshold(value)
    with pytest.raises(ConfigError, match="--threshold"):
        DecisionRule.of(CARD, CARD.class_names, "raw", 1.0, threshold=value)


def test_a_file_its_bytes_and_its_pixels_read_the_same(medx_data: Path, tmp_path: Path):
    jpeg = sorted((medx_data / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[0]
    for intensity in ("none", "zscore", "equalize", "clahe"):
        from_file = read(jpeg, intensity=intensity)
        assert np.array_equal(read(jpeg.read_bytes(), intensity=intensity), from_file)
        assert np.array_equal(read(read(jpeg), intensity=intensity), from_file), intensity
    with pytest.raises(PixelLimitError, match="megapixels") as err:
        read(jpeg, max_pixels=1000)
    assert err.value.pixels > 1000
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(Exception, match="Image row 3 ") as err:
        read(broken.read_bytes(), name="row 3")
    assert "skip_bad_images" not in str(err.value) and "medx-bytes" not in str(err.value)


def test_outputs_of_inputs_with_the_same_stem_get_their_own_files(tmp_path: Path):
    names = ["a/x.jpeg", "a/x.png", "b/x.jpeg", "1.2.840.3.1", "1.2.840.3.2", "c/IM0001.dcm"]
    paths = [tmp_path / n for n in names]
    got = output_names(paths, tmp_path)
    assert len({str(n).lower() for n in got}) == len(paths)
    assert got[2] == Path("b/x.png") and got[5] == Path("c/IM0001.png")  # the tree mirrored
    assert got[0].parent == Path("a") and got[0] != got[1]
    assert output_names(paths, tmp_path) == got  # the same run twice: the same names
