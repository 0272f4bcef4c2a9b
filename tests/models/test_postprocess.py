"""Lung post-processing on masks drawn by hand: what it keeps, what it removes, where it runs."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from medx.errors import ConfigError
from medx.inference import predict_mask
from medx.models.postprocess import keep_lungs, make_postprocess
from medx.models.segmentation import SegmentationModule


def _two_lungs() -> np.ndarray:
    """Two solid 'lungs' on a 64 x 64 image, the right one a little larger."""
    mask = np.zeros((64, 64), np.uint8)
    mask[8:56, 6:28] = 1
    mask[8:52, 36:58] = 1
    return mask


def test_specks_go_holes_fill_and_both_lungs_stay():
    truth = _two_lungs()
    predicted = truth.copy()
    predicted[20:26, 12:18] = 0  # a hole inside an opacity
    predicted[58:61, 30:33] = 1  # a speck below the lungs
    predicted[2, 62] = 1  # and one in a corner

    cleaned = keep_lungs(predicted)

    assert np.array_equal(cleaned, truth)
    assert cleaned.dtype == np.uint8


def test_merged_lungs_are_one_region_and_a_speck_is_not_a_second_lung():
    merged = _two_lungs()
    merged[30:34, 28:36] = 1  # a bridge: one region
    with_speck = merged.copy()
    with_speck[60:62, 2:4] = 1

    assert np.array_equal(keep_lungs(with_speck), merged)


def test_a_hole_open_to_the_border_is_not_filled_and_255_masks_stay_255():
    mask = _two_lungs() * 255
    mask[8:30, 6:10] = 0  # a notch reaching the lung's outer edge, not enclosed

    cleaned = keep_lungs(mask)

    assert np.array_equal(cleaned, mask) and set(np.unique(cleaned)) == {0, 255}


def test_empty_prediction_stays_empty():
    assert not keep_lungs(np.zeros((32, 32), np.uint8)).any()


def test_the_module_scores_post_processed_masks():
    """`binarize` is what val/test Dice and medx.predict see: the speck is gone there too."""
    prob = torch.zeros(2, 1, 64, 64)
    prob[:, 0] = torch.from_numpy(_two_lungs()).float() * 0.9
    prob[0, 0, 60:62, 60:62] = 0.8

    plain = SegmentationModule("unet", "tu-test_resnet").binarize(prob)
    lungs = SegmentationModule("unet", "tu-test_resnet", postprocess="lungs").binarize(prob)

    assert plain[0].sum() == lungs[0].sum() + 4
    assert torch.equal(lungs[0, 0], torch.from_numpy(_two_lungs()).float())
    assert torch.equal(lungs[1], plain[1])


def test_medx_predict_post_processes_at_the_image_size():
    """An untrained network's noisy mask: dozens of regions raw, at most two post-processed."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (150, 230, 3), dtype=np.uint8)  # not square, not 64 px
    torch.manual_seed(0)
    raw = SegmentationModule("unet", "tu-test_resnet", image_size=64).eval()
    lungs = SegmentationModule("unet", "tu-test_resnet", image_size=64, postprocess="lungs")
    lungs.load_state_dict(raw.state_dict())

    noisy = predict_mask(raw, image, threshold=0.5)
    cleaned = predict_mask(lungs.eval(), image, threshold=0.5)

    assert noisy.shape == cleaned.shape == (150, 230)
    assert _regions(noisy) > 2 and _regions(cleaned) <= 2
    assert np.array_equal(cleaned, keep_lungs(noisy))


def _regions(mask: np.ndarray) -> int:
    return cv2.connectedComponents((mask > 0).astype(np.uint8), connectivity=8)[0] - 1


def test_unknown_postprocess_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model\.postprocess='largest'.*none, lungs"):
        make_postprocess("largest")
