"""Class-folder datamodules: layouts, patient-grouped carving, image formats, bad input."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from hydra.utils import instantiate
from mlflow import MlflowClient
from PIL import Image

from medx.config import compose
from medx.data.folders import ImageFolderDataModule
from medx.data.io import BadImageError, list_images, read_image
from medx.errors import ConfigError, DataError
from medx.train import train


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
    _write(tmp_path / "a" / "x.png", np.zeros((32, 32), np.uint8))
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


def test_macosx_and_dot_folders_are_not_classes(tmp_path: Path):
    root = _folder_tree(tmp_path / "pool")
    for junk in ("__MACOSX/cats", ".thumbnails"):
        _write(root / junk / "._p0_cats_0.png", np.zeros((32, 32), np.uint8))
    split_root = tmp_path / "split"
    for split in ("train", "test"):
        shutil.copytree(root / "cats", split_root / split / "cats")
        shutil.copytree(root / "dogs", split_root / split / "dogs")
    (split_root / "test" / "__MACOSX").mkdir()
    settings = dict(patient_pattern=r"p(\d+)_", val_from_train=0.25, test_from_train=0.25)

    pool = ImageFolderDataModule(root, **settings)
    pool.setup()
    split = ImageFolderDataModule(split_root, **settings)
    split.setup()

    assert pool.classes == split.classes == ["cats", "dogs"]


def test_a_val_class_that_train_lacks_is_an_error_naming_it(tmp_path: Path):
    image = np.full((32, 32), 128, np.uint8)
    for split, labels in (("train", ("a", "b")), ("val", ("a", "b", "c"))):
        for label in labels:
            for i in range(4):
                _write(tmp_path / split / label / f"x{i}.png", image)

    with pytest.raises(DataError, match=r"Class folder .*val/c has no counterpart in .*train"):
        ImageFolderDataModule(tmp_path).setup()


def test_split_errors_name_the_class_not_its_index(tmp_path: Path):
    root = _folder_tree(tmp_path, n=40)
    _write(root / "rare" / "p99_rare_0.png", np.full((32, 32), 9, np.uint8))  # one patient

    dm = ImageFolderDataModule(
        root, patient_pattern=r"p(\d+)_", val_from_train=0.25, test_from_train=0.25
    )
    with pytest.raises(ConfigError, match=r"class rare has only 1"):
        dm.setup()


def test_webp_gif_tiny_and_unreadable_files_are_read_refused_or_reported(tmp_path: Path, caplog):
    root = _folder_tree(tmp_path)
    rgb = np.random.default_rng(1).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    assert cv2.imwrite(str(root / "cats" / "p0_cats_webp.webp"), rgb)
    Image.fromarray(rgb[:, :, 0]).save(root / "dogs" / "p1_dogs_gif.gif")
    (root / "dogs" / "p2_moved.png").symlink_to(tmp_path / "nowhere.png")
    (root / "dogs" / "p3_dogs.heic").write_bytes(b"not read")
    tiny = _write(root / "dogs" / "p4_dogs_tiny.png", np.zeros((1, 1), np.uint8))
    settings = dict(patient_pattern=r"p(\d+)_", val_from_train=0.25, test_from_train=0.25)

    with pytest.raises(BadImageError, match=r"p4_dogs_tiny\.png is too small \(1x1 px\)"):
        ImageFolderDataModule(root, **settings).setup()

    dm = ImageFolderDataModule(root, skip_bad_images=True, **settings)
    with caplog.at_level(logging.WARNING):
        dm.setup()
    paths = {p.name for s in dm.splits.values() for p in s.paths}
    assert {"p0_cats_webp.webp", "p1_dogs_gif.gif"} <= paths and tiny.name not in paths
    assert len(paths) == 26
    assert dm.summary()["dataset.skipped"] == {"bad_image": 1, "broken_symlink": 1, "other_type": 1}
    assert "1 broken symlink (its target does not exist): p2_moved.png" in caplog.text
    assert "p3_dogs.heic" in caplog.text


# Duplicates across splits, on real chest X-rays ($MEDX_DATA)


def _kermany_with_leaks(medx_data: Path, root: Path) -> list[str]:
    """train/ (10 per class) and test/ (4 per class) of real X-rays, test/ holding three leaks:
    a byte copy of a train image under another name, a PNG re-encoding of another (the same
    pixels, other bytes), and the Kermany twin of a train image (byte-identical in the data
    set, under two names of one patient). Returns the leaks, as paths under root."""
    source = medx_data / "chest_xray" / "train"
    twins = ("person1481_bacteria_3862.jpeg", "person1481_bacteria_3863.jpeg")
    for label in ("NORMAL", "PNEUMONIA"):
        images = [p for p in list_images(source / label) if "person1481_" not in p.name][:14]
        for split, part in (("train", images[:10]), ("test", images[10:])):
            (root / split / label).mkdir(parents=True)
            for path in part:
                shutil.copy(path, root / split / label / path.name)
    normal = sorted((root / "train" / "NORMAL").iterdir())
    shutil.copy(normal[0], root / "test" / "NORMAL" / "renamed.jpeg")
    rgb = read_image(normal[1])
    assert cv2.imwrite(str(root / "test" / "NORMAL" / "reencoded.png"), rgb[:, :, ::-1])
    shutil.copy(source / "PNEUMONIA" / twins[0], root / "train" / "PNEUMONIA" / twins[0])
    shutil.copy(source / "PNEUMONIA" / twins[1], root / "test" / "PNEUMONIA" / twins[1])
    return ["test/NORMAL/renamed.jpeg", "test/NORMAL/reencoded.png", f"test/PNEUMONIA/{twins[1]}"]


def _kermany_module(root: Path, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(
        root,
        classes=["NORMAL", "PNEUMONIA"],
        patient_pattern=r"person(\d+)_|IM-(\d+)-",
        val_from_train=0.2,
        num_workers=0,
        **kwargs,
    )


def test_duplicates_across_splits_are_reported_with_their_pairs(
    medx_data: Path, tmp_path: Path, caplog
):
    leaks = _kermany_with_leaks(medx_data, tmp_path)
    dm = _kermany_module(tmp_path)

    with caplog.at_level(logging.WARNING):
        dm.setup()

    assert dm.summary()["dataset.duplicates"] == {
        "policy": "warn",
        "groups": 3,
        "val": 0,
        "test": 3,
        "dropped": 0,
        "within_split": 0,
    }
    assert all(leak in caplog.text for leak in leaks)
    assert "= train/NORMAL/" in caplog.text and "data.duplicates=drop" in caplog.text
    assert len(dm.splits["test"].paths) == 11  # warn keeps them


def test_duplicates_error_refuses_and_drop_removes_the_later_copies(
    medx_data: Path, tmp_path: Path
):
    leaks = _kermany_with_leaks(medx_data, tmp_path)

    with pytest.raises(DataError, match=r"3 group\(s\) of identical images span splits.*drop"):
        _kermany_module(tmp_path, duplicates="error").setup()

    dm = _kermany_module(tmp_path, duplicates="drop")
    dm.setup()
    kept = {str(p.relative_to(tmp_path)) for s in dm.splits.values() for p in s.paths}
    assert not kept & set(leaks) and len(dm.splits["test"].paths) == 8
    assert sum(len(dm.splits[s].paths) for s in ("train", "val")) == 21  # training untouched
    assert dm.summary()["dataset.duplicates"]["dropped"] == 3

    with pytest.raises(ConfigError, match=r"data.duplicates='ignore' is not one of"):
        _kermany_module(tmp_path, duplicates="ignore")


def test_duplicate_and_skipped_counts_reach_mlflow(
    make_cfg, mlflow_client: MlflowClient, tracked_runs, medx_data: Path, tmp_path: Path
):
    root = tmp_path / "chest_xray"
    _kermany_with_leaks(medx_data, root)
    (root / "train" / "NORMAL" / "moved.jpeg").symlink_to(tmp_path / "nowhere.jpeg")
    cfg = make_cfg("data=pneumonia", f"data.root={root}", "data.val_from_train=0.2", "debug=fdr")

    train(cfg)

    (run,) = tracked_runs()
    params = run.data.params
    assert params["dataset.duplicates.policy"] == "warn"
    assert params["dataset.duplicates.test"] == "3" and params["dataset.duplicates.groups"] == "3"
    assert params["dataset.skipped.broken_symlink"] == "1"
