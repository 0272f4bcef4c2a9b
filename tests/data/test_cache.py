"""The decoded store (`data.cache`): exact pixels, built once, rebuilt when it must, shared by
DataLoader workers, safe when two runs build it at once, and a fallback on a disk that fails."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
import torch
from dicom_files import cxr_gray, twelve_bit
from omegaconf import open_dict
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import medx
from medx.data.cache import (
    SUFFIX,
    Decoded,
    Item,
    fit,
    geometry,
    image_entry,
    open_store,
)
from medx.data.folders import ImageFolderDataModule
from medx.data.io import check_images, read_image
from medx.data.quality import QualityDataModule
from medx.data.segmentation import SegmentationDataModule
from medx.train import train

LOGGER = "medx.data.cache"


def _write(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image), path
    return path


def _write_la(path: Path, image: np.ndarray) -> Path:
    """Gray + alpha, which OpenCV cannot write."""
    Image.fromarray(image, "LA").save(path)
    return path


def _real_images(medx_data: Path, folder: Path) -> dict[str, Path]:
    """Real chest X-rays (280x230 px, not square) saved as every kind of file medx reads."""
    gray = cv2.resize(cxr_gray(medx_data, 3), (280, 230), interpolation=cv2.INTER_AREA)
    tinted = cv2.merge([gray, (gray * 0.8).astype(np.uint8), np.flipud(gray)])  # true colour
    alpha = np.full_like(gray, 200)
    return {
        "gray_png": _write(folder / "gray.png", gray),
        "gray_as_rgb_jpeg": _write(folder / "kermany_like.jpeg", cv2.merge([gray] * 3)),
        "colour_jpeg": _write(folder / "colour.jpg", tinted),
        "colour_png": _write(folder / "colour.png", tinted),
        "sixteen_bit_png": _write(folder / "deep.png", twelve_bit(gray) * 3 + 7),
        "gray_alpha_png": _write_la(folder / "gray_alpha.png", np.dstack([gray, alpha])),
        "rgba_png": _write(folder / "rgba.png", cv2.merge([*cv2.split(tinted), alpha])),
    }


def _store(paths: list[Path], directory: Path, intensity="none", size=96, augment="light"):
    shape = geometry(size, augment)
    return open_store(
        [Item((p,)) for p in paths],
        partial(image_entry, intensity=intensity, shape=shape),
        mode="disk",
        directory=directory,
        name="test",
        settings={"intensity": intensity, "geometry": shape},
    )


@pytest.mark.parametrize("intensity", ["none", "clahe"])
@pytest.mark.parametrize("augment", ["none", "light", "strong"])
def test_the_store_holds_exactly_the_decoded_and_resized_pixels(
    medx_data: Path, tmp_path: Path, intensity: str, augment: str
):
    files = _real_images(medx_data, tmp_path / "images")
    paths = list(files.values())
    shape = geometry(96, augment)
    store = _store(paths, tmp_path / "cache", intensity, 96, augment)

    images = store.column(range(len(paths)), rgb=True)
    for path, cached in zip(paths, images, strict=True):
        expected = fit(read_image(path, intensity), shape)
        assert cached.dtype == np.uint8 and cached.shape == expected.shape, path.name
        assert np.array_equal(cached, expected), path.name
    # whole images: the eval resize itself; crops: a smaller copy with the original's aspect
    expected_size = {"none": (96, 96), "light": (110, 133), "strong": (125, 152)}[augment]
    assert (shape.side, int(shape.side * 280 / 230)) == expected_size or augment == "none"
    assert images[0].shape[:2] == expected_size
    # gray is kept as one channel: only the true-colour files (without intensity) take three
    one_channel = [store.arrays(i)[0].ndim == 2 for i in range(len(paths))]
    colour = {"colour_jpeg", "colour_png", "rgba_png"} if intensity == "none" else set()
    assert one_channel == [name not in colour for name in files]
    # the pass is the verification pass: the digests are check_images' own
    assert [store.digest(i) for i in range(len(paths))] == check_images(paths, False).digests


def test_dicom_files_are_stored_as_read(dicom_variants: dict[str, Path], tmp_path: Path):
    paths = list(dicom_variants.values())
    store = _store(paths, tmp_path / "cache", size=64, augment="none")
    reference = fit(read_image(dicom_variants["png"]), geometry(64, "none"))
    for i, path in enumerate(paths):
        assert store.arrays(i)[0].ndim == 2, path.name  # DICOM X-rays are gray: one channel
        cached = store.column([i], rgb=True)[0]
        assert np.array_equal(cached, fit(read_image(path), geometry(64, "none"))), path.name
        assert np.array_equal(cached, reference), path.name


def _tree(medx_data: Path, root: Path, per_class: int = 8) -> Path:
    """Two class folders of real X-rays, two images per patient, 300x260 px BMPs (a BMP's size
    in bytes depends only on its shape: a file can change without changing size)."""
    for c, label in enumerate(("NORMAL", "PNEUMONIA")):
        for i in range(per_class):
            gray = cv2.resize(cxr_gray(medx_data, c * per_class + i), (300, 260))
            _write(root / label / f"person{100 * c + i // 2}_{label}_{i}.bmp", gray)
    return root


def _module(root: Path, cache_dir: Path, **kwargs) -> ImageFolderDataModule:
    kwargs = {"image_size": 64, "batch_size": 4, "num_workers": 0, "cache": "disk", **kwargs}
    return ImageFolderDataModule(
        root,
        val_from_train=0.25,
        test_from_train=0.25,
        patient_pattern=r"person(\d+)_",
        cache_dir=cache_dir,
        **kwargs,
    )


def _cache_files(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "decoded").glob(f"*{SUFFIX}"))


@pytest.mark.parametrize("cache", ["disk", "memory"])
def test_batches_from_the_store_equal_decoded_ones_when_training_takes_whole_images(
    medx_data: Path, tmp_path: Path, cache: str
):
    root = _tree(medx_data, tmp_path / "data")
    decoded = _module(root, tmp_path / "cache", cache="none", augment="none")
    cached = _module(root, tmp_path / "cache", cache=cache, augment="none")
    for dm in (decoded, cached):
        dm.setup()
    assert decoded.splits == cached.splits and decoded.digests == cached.digests
    for split in ("train", "val", "test"):
        plain = decoded._dataset(split, train=split == "train")
        stored = cached._dataset(split, train=split == "train")
        assert plain.images is None and stored.images is not None
        for i in range(len(plain)):
            assert torch.equal(plain[i][0], stored[i][0]) and plain[i][1] == stored[i][1]
    assert bool(_cache_files(tmp_path / "cache")) == (cache == "disk")  # memory: no file


def test_a_second_run_decodes_nothing_and_a_changed_file_is_read_again(
    medx_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger=LOGGER)
    root, cache_dir = _tree(medx_data, tmp_path / "data"), tmp_path / "cache"
    first = _module(root, cache_dir)
    first.setup()
    assert "Decoding 16 images once" in caplog.text
    [cache] = _cache_files(cache_dir)
    built = cache.stat()

    # Same files: nothing decoded, nothing written. To show that no file is even read, one is
    # swapped for other pixels of the same size with its old mtime: the store still has the old.
    victim = sorted(root.glob("NORMAL/*.bmp"))[0]
    stat = victim.stat()
    old_pixels = read_image(victim)
    _write(victim, 255 - cv2.imread(str(victim), cv2.IMREAD_GRAYSCALE))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert victim.stat().st_size == stat.st_size
    caplog.clear()
    second = _module(root, cache_dir)
    second.setup()
    assert "nothing to decode" in caplog.text and "Decoding" not in caplog.text
    assert (cache.stat().st_ino, cache.stat().st_mtime_ns) == (built.st_ino, built.st_mtime_ns)
    row = second.rows[victim]
    assert np.array_equal(second.store.column([row], rgb=True)[0], fit(old_pixels, _shape()))

    # A new mtime: that one file is decoded again (the others are copied), its new pixels kept.
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    caplog.clear()
    third = _module(root, cache_dir)
    third.setup()
    assert f"1 of 16 images are new or changed since the decoded cache {cache}" in caplog.text
    assert "Decoding 1 images once" in caplog.text
    cached = third.store.column([third.rows[victim]], rgb=True)[0]
    assert np.array_equal(cached, fit(read_image(victim), _shape()))
    assert not np.array_equal(cached, fit(old_pixels, _shape()))
    assert _cache_files(cache_dir) == [cache]  # replaced in place: one file per settings

    # A file that grows (same mtime) is noticed too, and so is one that is added.
    stat = victim.stat()
    _write(victim, cv2.resize(cv2.imread(str(victim)), (320, 260)))
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    shutil.copy(root / "NORMAL" / victim.name, root / "NORMAL" / "person50_NORMAL_new.bmp")
    caplog.clear()
    _module(root, cache_dir).setup()
    assert "2 of 17 images are new or changed" in caplog.text


def _shape():
    return geometry(64, "light")


def test_other_versions_and_settings_are_rebuilt_never_read(
    medx_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch
):
    caplog.set_level(logging.INFO, logger=LOGGER)
    root, cache_dir = _tree(medx_data, tmp_path / "data"), tmp_path / "cache"
    _module(root, cache_dir).setup()
    [cache] = _cache_files(cache_dir)

    monkeypatch.setattr(medx, "__version__", "999.0")
    caplog.clear()
    dm = _module(root, cache_dir)
    dm.setup()
    assert f"The decoded cache {cache} was written by medx" in caplog.text
    assert "rebuilding it for medx 999.0" in caplog.text
    assert "Decoding 16 images once" in caplog.text
    monkeypatch.undo()

    # Other settings are another file; one copied over this one's name is not read as it.
    caplog.clear()
    bigger = _module(root, cache_dir, image_size=96)
    bigger.setup()
    assert "Decoding 16 images once" in caplog.text
    [other] = [p for p in _cache_files(cache_dir) if p != cache]
    shutil.copy(other, cache)
    caplog.clear()
    dm = _module(root, cache_dir)
    dm.setup()
    assert f"The decoded cache {cache} holds images decoded with other settings" in caplog.text
    images = dm._dataset("val", train=False).images
    assert images[0].shape[:2] == (_shape().side, int(_shape().side * 300 / 260))

    # A file cut short (an interrupted copy) is rebuilt too, with a warning.
    cache.write_bytes(cache.read_bytes()[:-100])
    caplog.clear()
    _module(root, cache_dir).setup()
    assert f"{cache} is not a readable medx decoded cache" in caplog.text
    assert "Decoding 16 images once" in caplog.text


def test_quality_samples_are_degraded_and_resized_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger=LOGGER)
    kwargs = {"n_patients": 20, "num_workers": 0, "image_size": 64, "cache_dir": tmp_path}
    decoded, cached = QualityDataModule(**kwargs), QualityDataModule(cache="disk", **kwargs)
    for dm in (decoded, cached):
        dm.setup()
    assert cached.store.arrays(0) == ()  # the sources are only checked: their samples are kept
    for split in ("train", "val", "test"):
        plain = decoded._dataset(split, train=split == "train")
        stored = cached._dataset(split, train=split == "train")
        assert plain.images is None and stored.images is not None
        for i in range(len(plain)):  # every degradation, made at 128 px, then resized to 64
            assert torch.equal(plain[i][0], stored[i][0]) and plain[i][1] == stored[i][1]

    caplog.clear()
    again = QualityDataModule(cache="disk", **kwargs)
    again.setup()
    again.train_dataloader()
    assert caplog.text.count("nothing to decode") == 2 and "Decoding" not in caplog.text


def test_segmentation_pairs_come_from_the_store_as_loaded(
    medx_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    caplog.set_level(logging.INFO, logger=LOGGER)
    lungs, root = medx_data / "lung_seg", tmp_path / "lungs"
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True)
    for image in sorted((lungs / "images").iterdir())[:12]:  # RGB and gray, 255 to 3,670 px
        (root / "images" / image.name).symlink_to(image)
        (root / "masks" / f"{image.stem}.png").symlink_to(lungs / "masks" / f"{image.stem}.png")
    (root / "metadata.csv").symlink_to(lungs / "metadata.csv")

    def module(cache: str) -> SegmentationDataModule:
        dm = SegmentationDataModule(
            root,
            image_size=64,
            num_workers=0,
            val_from_train=0.25,
            test_from_train=0.25,
            cache=cache,
            cache_dir=tmp_path / "cache",
        )
        dm.setup()
        return dm

    decoded, cached = module("none"), module("disk")
    assert cached.digests == decoded.digests
    for split in ("train", "val", "test"):
        for plain, stored in zip(decoded.arrays[split], cached.arrays[split], strict=True):
            assert len(plain) == len(stored) > 0
            assert all(np.array_equal(a, b) for a, b in zip(plain, stored, strict=True))
    store = cached.arrays["train"][0].store
    assert any(store.arrays(i)[0].ndim == 2 for i in range(len(store)))  # gray: one channel
    caplog.clear()
    module("disk")
    assert "12 image/mask pairs, nothing to decode" in caplog.text


def _build_in_child(paths: list[Path], directory: Path, barrier, results) -> None:
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    barrier.wait()
    store = _store(paths, directory, size=256, augment="light")
    arrays = [store.arrays(i)[0].tobytes() for i in range(len(paths))]
    results.put((records, arrays))


def test_two_runs_building_one_cache_at_once_end_with_one_valid_file(
    medx_data: Path, tmp_path: Path
):
    gray = cxr_gray(medx_data, 0)
    paths = [
        _write(tmp_path / "images" / f"{i}.jpeg", cv2.resize(np.roll(gray, 7 * i, 1), (1024, 1024)))
        for i in range(24)
    ]
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(2), context.Queue()
    runs = [
        context.Process(target=_build_in_child, args=(paths, tmp_path / "cache", barrier, results))
        for _ in range(2)
    ]
    for run in runs:
        run.start()
    outcomes = [results.get(timeout=300) for _ in runs]
    for run in runs:
        run.join(timeout=60)
        assert run.exitcode == 0

    decoded = [any("Decoding 24 images once" in m for m in records) for records, _ in outcomes]
    assert sorted(decoded) == [False, True]  # one built it, the other read what it built
    assert outcomes[0][1] == outcomes[1][1]
    left = sorted(p.name for p in (tmp_path / "cache" / "decoded").iterdir())
    assert [n for n in left if not n.endswith(".lock")] == [
        _cache_files(tmp_path / "cache")[0].name
    ]
    store = _store(paths, tmp_path / "cache", size=256, augment="light")
    assert [store.arrays(i)[0].tobytes() for i in range(len(paths))] == outcomes[0][1]
    expected = fit(read_image(paths[5]), geometry(256, "light"))
    assert np.array_equal(store.column([5], rgb=True)[0], expected)


class _ReadEverything(Dataset):
    """Index k and k + n are entry k: batch 0 (worker 0) and batch 1 (worker 1, if there is
    one) each read the whole store, then measure their memory once all have read it."""

    def __init__(self, column, barrier) -> None:
        self.column, self.barrier = column, barrier

    def __len__(self) -> int:
        return 2 * len(self.column)

    def __getitem__(self, i: int) -> tuple:
        k = i % len(self.column)
        before = psutil.Process().memory_full_info() if k == 0 else None
        total = int(self.column[k].sum(dtype=np.uint64))
        if k < len(self.column) - 1:
            return os.getpid(), total, before, None
        self.barrier.wait(timeout=120)
        return os.getpid(), total, before, psutil.Process().memory_full_info()


@pytest.mark.parametrize("workers", [1, 2])
def test_dataloader_workers_share_one_copy_of_the_store(tmp_path: Path, workers: int):
    n, side = 48, 1024  # 48 MiB of pixels
    files = [tmp_path / "src" / f"{i}.raw" for i in range(n)]
    for f in files:
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(b"x")

    def make(item: Item) -> Decoded:
        rng = np.random.default_rng(int(item.files[0].stem))
        return Decoded((rng.integers(0, 256, (side, side), dtype=np.uint8),))

    store = open_store(
        [Item((f,)) for f in files], make, mode="disk", directory=tmp_path, name="t", settings={}
    )
    size = n * side * side
    context = multiprocessing.get_context("fork")
    loader = DataLoader(
        _ReadEverything(store.column(range(n)), context.Barrier(workers)),
        batch_size=n,
        num_workers=workers,
        multiprocessing_context=context,
        collate_fn=list,
    )
    first, last = {}, {}  # each worker's memory before it read, and once all had read
    for batch in loader:
        for pid, _, before, after in batch:
            if before is not None and pid not in first:
                first[pid] = before
            if after is not None:
                last[pid] = after
    assert len(last) == workers
    grown = {
        pid: {k: getattr(last[pid], k) - getattr(first[pid], k) for k in ("rss", "uss", "pss")}
        for pid in last
    }
    for pid in grown:  # every worker holds every page of the store ...
        assert grown[pid]["rss"] > 0.9 * size, grown
    if workers == 2:  # ... yet none of them as its own
        assert all(g["uss"] < 0.1 * size for g in grown.values()), grown
    # in all, the store is resident once: two workers cost what one does
    assert 0.85 * size < sum(g["pss"] for g in grown.values()) < 1.15 * size, grown


def test_a_folder_that_cannot_be_made_falls_back_to_decoding(
    medx_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    root = _tree(medx_data, tmp_path / "data")
    blocker = tmp_path / "cache_is_a_file"
    blocker.write_text("not a folder")
    dm = _module(root, blocker / "cache", augment="none")
    dm.setup()
    path = blocker / "cache" / "decoded"
    assert f"data.cache=disk cannot write the decoded cache {path}/" in caplog.text
    assert "decoding as with data.cache=none" in caplog.text
    decoded = _module(root, tmp_path / "x", cache="none", augment="none")
    decoded.setup()
    assert dm.splits == decoded.splits and dm.digests == decoded.digests
    dataset = dm._dataset("val", train=False)
    assert dataset.images is None  # every epoch decodes, as with data.cache=none
    assert torch.equal(dataset[0][0], decoded._dataset("val", train=False)[0][0])


def test_a_disk_that_fills_up_while_writing_falls_back_to_decoding(medx_data: Path, tmp_path: Path):
    """The store is written by a process whose files may not exceed 256 KiB (RLIMIT_FSIZE):
    the write fails halfway (EFBIG, as ENOSPC would on a full disk)."""
    root = _tree(medx_data, tmp_path / "data", per_class=10)  # 20 images, about 1 MB stored
    script = textwrap.dedent(
        f"""
        import json, logging, resource, signal
        from medx.data.folders import ImageFolderDataModule
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, resource.RLIM_INFINITY))
        records = []
        handler = logging.Handler()
        handler.emit = lambda record: records.append(record.getMessage())
        logging.getLogger("medx").addHandler(handler)
        dm = ImageFolderDataModule({str(root)!r}, image_size=256, num_workers=0,
                                   val_from_train=0.25, test_from_train=0.25, cache="disk",
                                   cache_dir={str(tmp_path / "cache")!r})
        dm.setup()
        x, y = next(iter(dm.train_dataloader()))
        print(json.dumps({{"log": records, "images": dm._dataset("val", False).images is None,
                           "batch": list(x.shape)}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    warning = [m for m in found["log"] if "cannot write the decoded cache" in m]
    assert warning and str(tmp_path / "cache" / "decoded") in warning[0], found["log"]
    assert "File too large" in warning[0]
    assert found["images"] is True and found["batch"][1:] == [3, 256, 256]
    assert [p.name for p in (tmp_path / "cache" / "decoded").iterdir()] == [
        p.name for p in (tmp_path / "cache" / "decoded").glob("*.lock")
    ]  # no half-written file left behind


@pytest.mark.slow  # a real multi-epoch run: CI's make test-slow
@pytest.mark.parametrize(
    "data",
    [
        ["data.augment=none", "data.image_size=64"],  # the store holds the eval resize itself
        ["data.augment=light", "data.image_size=128"],  # the 128 px phantom is kept as it is
    ],
)
def test_a_real_run_with_the_disk_cache_gives_the_same_metrics(
    make_cfg, tmp_path: Path, data: list[str]
):
    metrics = {}
    for cache in ("none", "disk"):
        cfg = make_cfg(
            f"data.cache={cache}",
            *data,
            "trainer.deterministic=true",
            "eval.bootstrap=50",
            # the store read in DataLoader workers; the same count for both runs, as workers
            # draw their seeds from the trainer's random state
            "data.num_workers=2",
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / f"run_{cache}")
        metrics[cache] = train(cfg)
    assert metrics["disk"] == metrics["none"]
    assert {"val/auroc", "test/auroc", "train/loss"} <= set(metrics["disk"])
    assert list((Path(cfg.data.cache_dir) / "decoded").glob(f"phantom-*{SUFFIX}"))
