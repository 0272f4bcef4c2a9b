"""QualityDataModule: twins stay with their source, splits by patient, deterministic, cached."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from medx.cli import user_error
from medx.config import compose
from medx.data.quality import QualityDataModule, load_sample
from medx.errors import ConfigError


def quality(cache: Path, tmp_path: Path, **kwargs) -> QualityDataModule:
    kwargs = {
        "n_patients": 40,
        "num_workers": 0,
        "image_size": 64,
        "patient_pattern": r"patient(\d+)_",
        **kwargs,
    }
    return QualityDataModule(cache_dir=cache, feature_cache=tmp_path / "features", **kwargs)


def test_no_source_image_or_patient_in_two_splits(phantom_cache: Path, tmp_path: Path):
    dm = quality(phantom_cache, tmp_path)
    dm.setup()

    sources = {s: set(dm.splits[s].paths) for s in ("train", "val", "test")}
    patients = {s: set(dm.splits[s].patients) for s in ("train", "val", "test")}
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not sources[a] & sources[b], (a, b)
        assert not patients[a] & patients[b], (a, b)
    for split in dm.splits.values():  # every source once clean, three times degraded
        labels = np.asarray(split.labels)
        assert (labels == 0).sum() * 3 == (labels == 1).sum()
        clean = {p for p, d in zip(split.paths, split.degradations, strict=True) if not d}
        assert clean == set(split.paths)
    assert dm.model_kwargs()["class_counts"][1] == 3 * dm.model_kwargs()["class_counts"][0]


def test_same_seed_same_data_and_features_cached(phantom_cache: Path, tmp_path: Path):
    first, second = quality(phantom_cache, tmp_path), quality(phantom_cache, tmp_path)
    first.inputs = second.inputs = "features"

    x1, y1 = first.features("val")
    cached = list((tmp_path / "features").glob("*.npz"))
    x2, y2 = second.features("val")

    assert first.splits["val"].records() == second.splits["val"].records()
    assert len(cached) == 1 and np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert np.isfinite(x1).all()
    batch = next(iter(first.val_dataloader()))
    assert batch[0].shape[1] == len(first.model_kwargs()["feature_names"])
    other = quality(phantom_cache, tmp_path, seed=1)
    other.setup()
    assert other.splits["val"].records() != first.splits["val"].records()


def test_image_batches_hold_the_degraded_images(phantom_cache: Path, tmp_path: Path):
    dm = quality(phantom_cache, tmp_path, degradations={"overexposure": [1, 1]})
    images, labels = next(iter(dm.test_dataloader()))

    assert images.shape[1:] == (3, 64, 64)
    assert images[labels == 1].mean() > images[labels == 0].mean() + 0.3


def test_train_crop_trains_on_native_windows_and_tests_whole_images(
    phantom_cache: Path, tmp_path: Path
):
    dm = quality(phantom_cache, tmp_path, train_crop=40)
    window, _ = dm.train_dataloader().dataset[0]
    s = dm.splits["train"]
    gray = load_sample(s.paths[0], s.degradations[0], s.severities[0], s.seeds[0])
    whole = dm.eval_transform()(cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB))
    test_images, _ = next(iter(dm.test_dataloader()))

    assert window.shape == (3, 40, 40) and test_images.shape[1:] == (3, 64, 64)
    assert any(  # a window of the whole 64 px image, pixel for pixel, not a shrunk copy
        torch.equal(window, whole[:, i : i + 40, j : j + 40]) for i in range(25) for j in range(25)
    )
    with pytest.raises(ConfigError, match=r"data\.train_crop=65"):
        quality(phantom_cache, tmp_path, train_crop=65)


def test_train_repeats_serves_each_image_several_times_in_other_windows(
    phantom_cache: Path, tmp_path: Path
):
    once = quality(phantom_cache, tmp_path, train_crop=32).train_dataloader().dataset
    thrice = quality(phantom_cache, tmp_path, train_crop=32, train_repeats=3)
    dataset = thrice.train_dataloader().dataset
    n = len(once)

    assert len(dataset) == 3 * n and len(thrice.val_dataloader().dataset) < n
    windows = [dataset[i] for i in (0, n, 2 * n)]  # the same sample, three draws
    assert {label for _, label in windows} == {once[0][1]}
    assert not all(torch.equal(windows[0][0], w) for w, _ in windows[1:])
    with pytest.raises(ConfigError, match=r"data\.train_repeats=0"):
        quality(phantom_cache, tmp_path, train_repeats=0)


def test_unknown_degradation_is_a_config_error_listing_choices(tmp_path: Path):
    cfg = compose(["data=quality", f"paths.root_dir={tmp_path}", "+data.degradations.blurr=[0,1]"])
    with pytest.raises(Exception) as err:
        instantiate(cfg.data)
    cause = user_error(err.value)
    assert isinstance(cause, ConfigError)
    assert "'blurr'" in str(cause) and "motion_blur" in str(cause)


def test_real_source_folder_keeps_kermany_patients_together(medx_data: Path, tmp_path: Path):
    dm = quality(
        tmp_path / "unused",
        tmp_path,
        source_root=medx_data / "chest_xray" / "train",
        patient_pattern=r"person(\d+)_|IM-(\d+)-",
        max_sources=300,
    )
    dm.setup()

    assert dm.source_classes == ["NORMAL", "PNEUMONIA"]
    assert 290 <= sum(len(set(s.paths)) for s in dm.splits.values()) <= 303
    patients = [set(dm.splits[s].patients) for s in ("train", "val", "test")]
    assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
