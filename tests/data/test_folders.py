"""Class-folder datamodules: layouts, patient-grouped carving, image formats, bad input."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra.utils import instantiate

from medx.config import compose
from medx.data.folders import ImageFolderDataModule
from medx.data.io import BadImageError
from medx.errors import DataError


def _write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), image)
    return path


def _folder_tree(root: Path, n: int = 12) -> Path:
    """Gray 8-bit, 16-bit, RGB and RGBA images in two class folders, two images per patient."""
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        for i in range(n):
            kind = i % 4
            shape = {0: (40, 50), 1: (40, 50), 2: (40, 50, 3), 3: (40, 50, 4)}[kind]
            dtype = np.uint16 if kind == 1 else np.uint8
            image = rng.integers(0, 255 if dtype == np.uint8 else 4095, shape).astype(dtype)
            _write(root / label / f"p{i // 2}_{label}_{i}.png", image)
    return root


def test_pool_layout_carves_val_and_test_by_patient(tmp_path: Path):
    dm = ImageFolderDataModule(
        _folder_tree(tmp_path),
        image_size=32,
        batch_size=4,
        num_workers=0,
        val_from_train=0.25,
        test_from_train=0.25,
        patient_pattern=r"p(\d+)_",
    )
    dm.setup()

    assert dm.classes == ["cats", "dogs"] and dm.num_classes == 2
    assert sum(sum(c) for c in dm.class_counts.values()) == 24
    patients = {s: set(dm.splits[s].patients) for s in ("train", "val", "test")}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype.is_floating_point  # 16-bit and RGBA too


def test_kermany_layout_uses_given_splits_and_swap(tmp_path: Path):
    image = np.full((32, 32), 128, np.uint8)
    for split, n in (("train", 6), ("val", 2), ("test", 4)):
        for label in ("NORMAL", "PNEUMONIA"):
            for i in range(n):
                _write(tmp_path / split / label / f"person{i}_{split}.png", image)
    dm = ImageFolderDataModule(
        tmp_path, classes=["NORMAL", "PNEUMONIA"], swap_val_test=True, num_workers=0
    )
    dm.setup()

    assert len(dm.splits["train"].paths) == 12
    assert {p.parent.parent.name for p in dm.splits["val"].paths} == {"test"}
    assert {p.parent.parent.name for p in dm.splits["test"].paths} == {"val"}


def test_real_kermany_train_only_is_carved_without_patient_leaks(medx_data: Path):
    cfg = compose(["data=pneumonia", f"data.root={medx_data / 'chest_xray'}"])
    dm = instantiate(cfg.data, _convert_="object")
    dm.setup()

    sizes = {s: len(dm.splits[s].paths) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 5216
    assert 0.08 < sizes["val"] / 5216 < 0.12 and 0.08 < sizes["test"] / 5216 < 0.12
    train, val, test = (set(dm.splits[s].patients) for s in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert dm.class_counts["train"][1] > dm.class_counts["train"][0]  # PNEUMONIA is the majority


def test_missing_root_says_how_to_get_the_data(tmp_path: Path):
    cfg = compose(["data=pneumonia", f"data.root={tmp_path / 'chest_xray'}"])
    with pytest.raises(DataError, match=r"data.root=.*Kermany.*data.root=/path/to/chest_xray"):
        instantiate(cfg.data).setup()


def test_empty_class_folder_is_named(tmp_path: Path):
    _write(tmp_path / "a" / "x.png", np.zeros((8, 8), np.uint8))
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match=r"Class folder .*/b has no images"):
        ImageFolderDataModule(tmp_path).setup()


def test_corrupt_image_is_named_or_skipped(tmp_path: Path, caplog):
    root = _folder_tree(tmp_path)
    bad = root / "dogs" / "broken.png"
    bad.write_bytes(b"not an image at all")

    settings = dict(patient_pattern=r"p(\d+)_", val_from_train=0.25, test_from_train=0.25)
    with pytest.raises(BadImageError, match=r"broken\.png"):
        ImageFolderDataModule(root, **settings).setup()

    dm = ImageFolderDataModule(root, skip_bad_images=True, **settings)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    assert "broken.png" in caplog.text
    assert bad not in {p for s in dm.splits.values() for p in s.paths}
