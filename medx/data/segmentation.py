"""Binary segmentation data: `images/` + `masks/` (same file stem), real or phantom.

Two layouts are understood:
- pool layout: `root/images/*` + `root/masks/*`; val and test are carved out by patient;
- split layout: `root/{train,val,test}/{images,masks}/*`; a missing val/ or test/ is carved
  out of train/ by patient.

Patients come from `root/metadata.csv` (columns `image`, `patient_id`) when it exists, else
from `patient_pattern` on file names, else each image is its own patient. Every pair is
decoded and checked once in `setup` (mask present, one channel, binary, same size as its
image) and kept at `image_size` in the decoded store (medx.data.cache): chest X-rays of
3,000+ px would otherwise be decoded again every epoch. `data.cache=disk` keeps the store in a
memory-mapped file that the next run reads instead of decoding; `memory` and `none` keep it in
RAM for this run only.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from medx.data.cache import Column, Decoded, Item, check_mode, one_channel, open_store
from medx.data.duplicates import check_policy, find_duplicates
from medx.data.intensity import check_method
from medx.data.io import BadImageError, list_images, pixel_digest, read_image, read_mask
from medx.data.loaders import PhantomRoot, SplitLoaders
from medx.data.phantom import CLASSES as PHANTOM_CLASSES
from medx.data.splits import SPLITS, Subsettable, patient_ids, split_by_patient
from medx.data.transforms import SegmentationTransform
from medx.errors import ConfigError, DataError

log = logging.getLogger(__name__)

STRIDE = 32  # smp encoders downsample five times: sides must be multiples of 32


@dataclass
class Pairs(Subsettable):
    """One split: image files, their mask files and the patient of each image."""

    images: list[Path] = field(default_factory=list)
    masks: list[Path] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)


def find_masks(
    images: list[Path], mask_dir: Path, skip_missing: bool, skipped: Counter[str] | None = None
) -> Pairs:
    """Pair each image with the mask of the same stem in `mask_dir`."""
    by_stem: dict[str, list[Path]] = {}
    for path in list_images(mask_dir, skipped):
        by_stem.setdefault(path.stem, []).append(path)
    pairs = Pairs()
    for image in images:
        found = by_stem.get(image.stem, [])
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DataError(
                f"Image {image} has {len(found)} masks in {mask_dir} ({names}); keep exactly "
                "one mask per image stem."
            )
        if not found:
            message = (
                f"Image {image} has no mask: expected {mask_dir / image.stem}.png (same file "
                "stem as the image). Add the mask, remove the image, or set "
                "data.skip_bad_images=true to skip images without a usable mask."
            )
            if not skip_missing:
                raise DataError(message)
            log.warning("Skipping: %s", message)
            continue
        pairs.images.append(image)
        pairs.masks.append(found[0])
    return pairs


def load_pair(
    image_path: Path, mask_path: Path, size: int, intensity: str = "none"
) -> tuple[np.ndarray, np.ndarray, bytes]:
    """Decode, check and resize one pair: (size x size x 3 uint8, size x size {0,1} uint8,
    the digest of the full-size image's pixels).

    The mask is resized as a coverage fraction (area interpolation) and thresholded at one
    half, so that a 3,000 px mask shrunk to 256 px keeps its outline rather than a nearest-
    neighbour sample of it.
    """
    image = read_image(image_path, intensity)
    mask = read_mask(mask_path)
    if mask.shape != image.shape[:2]:
        raise BadImageError(
            f"Mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} px but its image {image_path} "
            f"is {image.shape[1]}x{image.shape[0]} px; a mask must have its image's size. "
            "Fix the mask, or set data.skip_bad_images=true to skip the pair.",
            mask_path,
        )
    digest = pixel_digest(image)
    image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    cover = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return image, (cover >= 0.5).astype(np.uint8), digest


class SegmentationDataset(Dataset):
    """Pre-resized arrays (the decoded store's); items are (image, mask, index into the split)."""

    def __init__(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        transform: SegmentationTransform,
    ) -> None:
        self.images, self.masks, self.transform = images, masks, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        image, mask = self.transform(self.images[i], self.masks[i])
        return image, mask, i


class SegmentationDataModule(SplitLoaders):
    """Image/mask pairs; splits grouped by patient (metadata.csv or `patient_pattern`).

    `data=lung_seg` builds it; every argument is the `data.<name>` key. Batches are (image in
    [0, 1], mask in {0, 1}) at `image_size`.

    Args:
        root: `root/images` + `root/masks` (pool layout) or
            `root/{train,val,test}/{images,masks}` (split layout); masks share their image's
            file stem. None only for subclasses that find their own root (the phantom).
        name: the data set's name in run names, logs and the model card.
        image_size: side of the square input, a multiple of 32 (images and masks are resized
            to it).
        batch_size: training batch; val, test and predict batches are twice as large.
        num_workers: DataLoader worker processes.
        val_from_train: share of patients carved out for val when there is no `val/`.
        test_from_train: the same for `test/`.
        metadata: a CSV in `root` with columns `image` and `patient_id`; None or absent:
            patients from `patient_pattern`.
        patient_pattern: regex on file names giving the patient when there is no metadata;
            None: each image is its own patient.
        augment: training augmentation (`none`, `light`, `strong`); geometric steps move the
            mask with the image.
        skip_bad_images: True: skip pairs whose image or mask is missing or bad, with a
            warning, instead of stopping.
        seed: seeds the carving of splits.
        download_hint: what the error says to do when `root` does not exist.
        duplicates: images with identical pixels in two splits: `warn`, `error` or `drop`.
        intensity: per-image standardisation: `none`, `zscore`, `equalize` or `clahe`.
        cache: `disk` keeps the resized pairs in a memory-mapped file under
            `cache_dir/decoded` that the next run reads instead of decoding; `memory` and
            `none` keep them in RAM for this run only.
        cache_dir: where `cache=disk` keeps its files.
    """

    task = "segmentation"
    layout_hint = "Point data.root at a folder with images/ and masks/."

    def __init__(
        self,
        root: str | Path | None,
        name: str = "segmentation",
        image_size: int = 256,
        batch_size: int = 8,
        num_workers: int = 2,
        val_from_train: float = 0.15,
        test_from_train: float = 0.15,
        metadata: str | None = "metadata.csv",
        patient_pattern: str | None = None,
        augment: str = "light",
        skip_bad_images: bool = False,
        seed: int = 0,
        download_hint: str = "",
        duplicates: str = "warn",
        intensity: str = "none",
        cache: str = "none",
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        if image_size % STRIDE:
            nearest = max(STRIDE, image_size // STRIDE * STRIDE)
            raise ConfigError(
                f"data.image_size={image_size} must be a multiple of {STRIDE} for segmentation "
                f"(the encoder halves it five times), e.g. {nearest}."
            )
        self.root = Path(root) if root else None
        self.name, self.image_size = name, image_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.fractions = {"val": val_from_train, "test": test_from_train}
        self.metadata, self.patient_pattern = metadata, patient_pattern
        self.augment, self.skip_bad_images, self.seed = augment, skip_bad_images, seed
        self.download_hint = download_hint
        self.duplicates = check_policy(duplicates)
        self.intensity = check_method(intensity)
        self.cache, self.cache_dir = check_mode(cache), Path(cache_dir) if cache_dir else None
        self.splits: dict[str, Pairs] = {}
        self.arrays: dict[str, tuple[Column, Column]] = {}  # (images, masks) of each split
        self.digests: dict[Path, bytes] = {}  # pixel digest of every image that loaded
        self.skipped: Counter[str] = Counter()  # files passed over, by reason
        self.findings: dict[str, dict] = {}

    def model_kwargs(self) -> dict:
        """The model records the input size, so a checkpoint can predict on its own."""
        return {"image_size": self.image_size}

    def summary(self) -> dict:
        """Logged to MLflow: images, patients and lung-pixel fraction per split, and what the
        checks found (duplicates, skipped files)."""
        self.setup()
        return {
            "dataset.counts": {
                s: {
                    "images": len(self.splits[s].images),
                    "patients": len(set(self.splits[s].patients)),
                    "mask_fraction": round(_mask_fraction(self.arrays[s][1]), 4),
                }
                for s in SPLITS
            },
            **self.findings,
        }

    def pool_dirs(self, root: Path) -> tuple[list[Path], Path]:
        """(image folders, mask folder) of one split or of the pool."""
        return [root / "images"], root / "masks"

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        root = self.resolve_root()
        layout = {s: root / s for s in SPLITS if (root / s).is_dir()}
        splits = {s: self._scan(d) for s, d in layout.items()}
        if "train" not in splits:
            splits["train"] = self._scan(root)
        missing = {s: f for s, f in self.fractions.items() if not splits.get(s, Pairs()).images}
        if missing:
            pool = splits["train"]
            labels = [0] * len(pool.images)  # nothing to stratify: one class of image
            parts = split_by_patient(labels, pool.patients, missing, self.seed)
            splits.update({s: pool.subset(idx) for s, idx in parts.items()})
        self._load(splits, root)
        self.splits = splits
        self._drop_duplicates(root)
        if self.skipped:
            self.findings["dataset.skipped"] = dict(sorted(self.skipped.items()))
        for s in SPLITS:
            log.info(
                "%s %-5s %4d images, %4d patients",
                self.name,
                s,
                len(splits[s].images),
                len(set(splits[s].patients)),
            )

    def _scan(self, split_root: Path) -> Pairs:
        image_dirs, mask_dir = self.pool_dirs(split_root)
        for folder in (*image_dirs, mask_dir):
            if not folder.is_dir():
                raise DataError(
                    f"{folder} is missing: data={self.name} expects images/ and masks/ "
                    f"(same file stems) in {split_root}."
                )
        images = [p for d in image_dirs for p in list_images(d, self.skipped)]
        if not images:
            raise DataError(
                f"{', '.join(map(str, image_dirs))} holds no images (.png/.jpg/.jpeg/...): add "
                "images or point data.root elsewhere."
            )
        pairs = find_masks(images, mask_dir, self.skip_bad_images, self.skipped)
        pairs.patients = self._patients(split_root, pairs.images)
        return pairs

    def _patients(self, split_root: Path, images: list[Path]) -> list[str]:
        table = _read_metadata(split_root, self.metadata) or _read_metadata(
            self.root or split_root, self.metadata
        )
        if table is None:
            return patient_ids(images, self.patient_pattern)
        unknown = [p.name for p in images if p.name not in table]
        if unknown:
            log.warning(
                "%d of %d images are not in %s, so each is its own patient (e.g. %s)",
                len(unknown),
                len(images),
                self.metadata,
                ", ".join(unknown[:3]),
            )
        return [table.get(p.name, f"file:{p.stem}") for p in images]

    def _load(self, splits: dict[str, Pairs], root: Path) -> None:
        """Decode and check every pair once into the decoded store (threads, decoder warnings
        watched as in medx.data.io.check_images), or read it from the store an earlier run
        left; drop bad pairs if asked."""
        items = [Item(pair) for s in SPLITS for pair in zip(*_files(splits[s]), strict=True)]
        store = open_store(
            items,
            partial(_pair_entry, size=self.image_size, intensity=self.intensity),
            mode="memory" if self.cache == "none" else self.cache,  # always kept in memory
            directory=self.cache_dir,
            name=self.name,
            settings={
                "kind": "pairs",
                "root": str(root),
                "size": self.image_size,
                "intensity": self.intensity,
            },
            fallback="memory",
            what="image/mask pairs",
        )
        start = 0
        for s in SPLITS:
            pairs = splits[s]
            rows = range(start, start + len(pairs.images))
            start = rows.stop
            keep = []
            for k, row in enumerate(rows):
                error = store.error(row)
                if error is None:
                    keep.append(k)
                    self.digests[pairs.images[k]] = store.digest(row)
                elif not self.skip_bad_images:
                    raise error
                else:
                    log.warning("Skipping bad pair: %s", error)
                    self.skipped["bad_image"] += 1
            kept = pairs.subset(np.asarray(keep, dtype=int))
            pairs.images, pairs.masks, pairs.patients = kept.images, kept.masks, kept.patients
            good = [rows[k] for k in keep]
            self.arrays[s] = (store.column(good, 0, rgb=True), store.column(good, 1))

    def _drop_duplicates(self, root: Path) -> None:
        """Find images repeated across the splits; drop later copies if asked."""

        def name(path: Path) -> str:
            return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)

        images = {s: self.splits[s].images for s in SPLITS}
        found = find_duplicates(
            {s: [self.digests[p] for p in images[s]] for s in SPLITS},
            {s: [name(p) for p in images[s]] for s in SPLITS},
            self.duplicates,
            self.name,
        )
        self.findings["dataset.duplicates"] = found.summary()
        for s in SPLITS if found.dropped else ():
            keep = found.keep(s, len(images[s]))
            self.splits[s] = self.splits[s].subset(keep)
            self.arrays[s] = tuple(part.subset(keep) for part in self.arrays[s])

    def _dataset(self, split: str, train: bool) -> Dataset:
        self.setup()
        transform = SegmentationTransform(self.image_size, self.augment if train else "none")
        return SegmentationDataset(*self.arrays[split], transform)


class PhantomSegDataModule(PhantomRoot, SegmentationDataModule):
    """The embedded default: the phantom's lung masks, generated once into `cache_dir`.

    `data=phantom_seg` builds it: the phantom's own arguments (`PhantomRoot`), every other
    one passed on to `SegmentationDataModule`.
    """

    phantom_defaults: ClassVar[dict[str, Any]] = {
        "name": "phantom_seg",
        "patient_pattern": r"patient(\d+)_",
        "metadata": None,
    }

    def pool_dirs(self, root: Path) -> tuple[list[Path], Path]:
        return [root / c for c in PHANTOM_CLASSES], root / "masks"


def _files(pairs: Pairs) -> tuple[list[Path], list[Path]]:
    return pairs.images, pairs.masks


def _pair_entry(item: Item, size: int, intensity: str) -> Decoded | BadImageError:
    """One pair for the store: the image (gray as one channel) and its mask, at `size`."""
    try:
        image, mask, digest = load_pair(*item.files, size, intensity)
    except BadImageError as err:
        return err
    return Decoded((one_channel(image), mask), digest)


def _read_metadata(root: Path, name: str | None) -> dict[str, str] | None:
    """{image file name: patient id} from root/<name>, or None when there is no such file."""
    if not name or not (root / name).is_file():
        return None
    path = root / name
    with path.open(newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is no part of "image"
        rows = list(csv.DictReader(f))
    if not rows or not {"image", "patient_id"} <= set(rows[0]):
        raise DataError(
            f"{path} must have the columns 'image' (file name) and 'patient_id'; "
            "fix it, or set data.metadata=null to take patients from file names."
        )
    return {r["image"]: f"patient:{r['patient_id']}" for r in rows if r["patient_id"]}


def _mask_fraction(masks: Sequence[np.ndarray]) -> float:
    return float(np.mean([m.mean() for m in masks])) if masks else 0.0
