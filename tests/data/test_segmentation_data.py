"""Segmentation data: pairing, checks on bad masks, aligned augmentation, patient splits."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from medx.data.io import BadImageError
from medx.data.segmentation import PhantomSegDataModule, SegmentationDataModule
from medx.data.transforms import SegmentationTransform
from medx.errors import ConfigError, DataError


def _pair_folder(root: Path, n: int = 12, patients: int = 6) -> Path:
    """root/images (mixed JPEG/PNG, gray/RGB, mixed sizes) + root/masks + metadata.csv."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for i in range(n):
        h, w = 90 + 10 * i, 120 - 3 * i
        mask = np.zeros((h, w), np.uint8)
        cv2.ellipse(mask, (w // 3, h // 2), (w // 6, h // 3), 0, 0, 360, 255, -1)
        image = np.where(mask > 0, 60, 200).astype(np.uint8)
        suffix = ".jpg" if i % 2 else ".png"
        if i % 3 == 0:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        cv2.imwrite(str(root / "images" / f"img{i:02d}{suffix}"), image)
        cv2.imwrite(str(root / "masks" / f"img{i:02d}.png"), mask if i % 2 else mask // 255)
        rows.append({"image": f"img{i:02d}{suffix}", "patient_id": i % patients})
    with (root / "metadata.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["image", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def _module(root: Path, **kwargs) -> SegmentationDataModule:
    kwargs = {"image_size": 64, "num_workers": 0, "batch_size": 4, **kwargs}
    return SegmentationDataModule(root, val_from_train=0.2, test_from_train=0.2, **kwargs)


def test_mixed_images_are_resized_with_their_masks_and_split_by_patient(tmp_path: Path):
    dm = _module(_pair_folder(tmp_path / "pairs"))
    dm.setup()

    patients = {s: set(dm.splits[s].patients) for s in ("train", "val", "test")}
    assert patients["train"] and patients["val"] and patients["test"]
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    x, y, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 64, 64) and y.shape == (4, 1, 64, 64)
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    for image, mask in zip(*dm.arrays["val"], strict=True):
        dark = image[..., 0] < 130  # the ellipse is drawn dark: it must sit on the mask
        assert (dark == mask.astype(bool)).mean() > 0.97
    summary = dm.summary()["dataset.counts"]
    assert sum(summary[s]["images"] for s in summary) == 12


def test_augmentation_moves_image_and_mask_together():
    """An image that *is* its mask must still be its mask after every random transform."""
    mask = np.zeros((80, 80), np.uint8)
    mask[10:35, 12:60] = 1  # off-centre and asymmetric: any flip, shift or turn shows
    mask[35:70, 12:25] = 1
    image = np.repeat(mask[..., None] * 255, 3, axis=2)
    transform = SegmentationTransform(64, augment="strong")
    torch.manual_seed(0)
    for _ in range(20):
        x, y = transform(image, mask)
        assert set(y.unique().tolist()) <= {0.0, 1.0}
        agreement = ((x[0] > 0.5) == y[0].bool()).float().mean()
        assert agreement > 0.95


def test_phantom_masks_are_the_default_segmentation_data(phantom_cache: Path):
    dm = PhantomSegDataModule(phantom_cache, n_patients=20, image_size=64, num_workers=0)
    dm.setup()
    x, y, _ = next(iter(dm.val_dataloader()))
    assert x.shape[1:] == (3, 64, 64) and 0.05 < y.mean() < 0.6  # lungs, not all or nothing


def test_image_size_must_suit_the_encoder():
    with pytest.raises(ConfigError, match=r"image_size=100 must be a multiple of 32.*96"):
        SegmentationDataModule("/x", image_size=100)


def test_missing_mask_names_the_image(tmp_path: Path):
    root = _pair_folder(tmp_path / "pairs")
    (root / "masks" / "img03.png").unlink()

    with pytest.raises(DataError, match=r"img03\.jpg has no mask.*masks/img03\.png"):
        _module(root).setup()

    dm = _module(root, skip_bad_images=True)  # asked for: skip with a warning
    dm.setup()
    assert sum(len(p.images) for p in dm.splits.values()) == 11


def test_mask_of_another_size_names_both_files(tmp_path: Path):
    root = _pair_folder(tmp_path / "pairs")
    cv2.imwrite(str(root / "masks" / "img04.png"), np.zeros((20, 20), np.uint8))

    with pytest.raises(BadImageError, match=r"Mask .*img04\.png is 20x20 px but its image"):
        _module(root).setup()


@pytest.mark.parametrize(
    ("mask", "message"),
    [
        (np.full((90, 120), 128, np.uint8), r"values \{128\}.*only 0/255 or only 0/1"),
        (np.zeros((90, 120, 3), np.uint8), r"3 channels.*single-channel"),
    ],
)
def test_non_binary_or_colour_mask_names_the_file(tmp_path: Path, mask, message):
    root = _pair_folder(tmp_path / "pairs")
    cv2.imwrite(str(root / "masks" / "img00.png"), mask)

    with pytest.raises(BadImageError, match=r"img00\.png.*" + message):
        _module(root).setup()
    dm = _module(root, skip_bad_images=True)
    dm.setup()
    assert "img00.png" not in {p.name for s in dm.splits.values() for p in s.images}


def test_empty_image_folder_names_it(tmp_path: Path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match=r"images holds no images"):
        _module(tmp_path).setup()


def test_missing_root_says_what_to_set(tmp_path: Path):
    with pytest.raises(DataError, match=r"data\.root=.*nowhere does not exist"):
        _module(tmp_path / "nowhere").setup()


def _real_split_layout(lung_seg: Path, root: Path, sizes: dict[str, int]) -> dict[str, set[str]]:
    """root/{split}/{images,masks} of links to real CXRs (the smallest files, for speed)."""
    images = sorted((lung_seg / "images").iterdir(), key=lambda p: p.stat().st_size)
    given, start = {}, 0
    for split, n in sizes.items():
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True)
        for image in images[start : start + n]:
            mask = lung_seg / "masks" / f"{image.stem}.png"
            (root / split / "images" / image.name).symlink_to(image)
            (root / split / "masks" / mask.name).symlink_to(mask)
        given[split] = {p.name for p in images[start : start + n]}
        start += n
    (root / "metadata.csv").symlink_to(lung_seg / "metadata.csv")
    return given


def test_given_train_val_test_folders_are_used_as_they_are(medx_data: Path, tmp_path: Path):
    given = _real_split_layout(
        medx_data / "lung_seg", tmp_path / "split", {"train": 6, "val": 2, "test": 3}
    )
    dm = _module(tmp_path / "split")
    dm.setup()

    assert {s: {p.name for p in dm.splits[s].images} for s in given} == given  # nothing carved
    assert all(p.startswith("patient:") for p in dm.splits["train"].patients)  # metadata.csv
    x, y, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (3, 3, 64, 64) and 0.1 < y.mean() < 0.7  # real lungs, resized with images


def test_a_missing_val_folder_is_carved_from_train_only(medx_data: Path, tmp_path: Path):
    given = _real_split_layout(medx_data / "lung_seg", tmp_path / "split", {"train": 8, "test": 2})
    dm = _module(tmp_path / "split")
    dm.setup()

    names = {s: {p.name for p in dm.splits[s].images} for s in ("train", "val", "test")}
    assert names["test"] == given["test"]
    assert names["val"] and names["train"] | names["val"] == given["train"]
    assert not set(dm.splits["train"].patients) & set(dm.splits["val"].patients)


def test_metadata_csv_with_a_utf8_bom_is_read(tmp_path: Path):
    root = _pair_folder(tmp_path / "pairs")
    table = root / "metadata.csv"
    table.write_bytes(b"\xef\xbb\xbf" + table.read_bytes())  # as Excel saves "CSV UTF-8"

    dm = _module(root)
    dm.setup()

    patients = {p for s in dm.splits.values() for p in s.patients}
    assert patients == {f"patient:{i}" for i in range(6)}


def test_real_corrupt_jpeg_and_duplicates_across_splits(medx_data: Path, tmp_path: Path):
    given = _real_split_layout(
        medx_data / "lung_seg", tmp_path / "split", {"train": 6, "val": 2, "test": 3}
    )
    root = tmp_path / "split"
    train_image = sorted((root / "train" / "images").iterdir())[0]
    copy = root / "test" / "images" / f"copy_{train_image.name}"
    shutil.copy(train_image, copy)
    shutil.copy(
        root / "train" / "masks" / f"{train_image.stem}.png",
        root / "test" / "masks" / f"{copy.stem}.png",
    )

    dm = _module(root, duplicates="drop")
    dm.setup()
    assert dm.summary()["dataset.duplicates"]["test"] == 1
    assert {p.name for p in dm.splits["test"].images} == given["test"]
    assert len(dm.arrays["test"][0]) == len(dm.arrays["test"][1]) == 3

    jpeg = next(p for p in sorted(root.glob("*/images/*")) if p.suffix in (".jpg", ".jpeg"))
    data = bytearray(jpeg.read_bytes())
    jpeg.unlink()  # a link into $MEDX_DATA: replace it, never write through it
    mid = len(data) // 2
    data[mid - 1000 : mid + 1000] = bytes(2000)
    jpeg.write_bytes(data)
    with pytest.raises(BadImageError, match=rf"{jpeg.name} is corrupt.*Corrupt JPEG data"):
        _module(root).setup()
