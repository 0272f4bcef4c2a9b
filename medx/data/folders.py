"""Class-per-subfolder image classification data: Kermany layout, any folder tree, phantom.

Two layouts are understood:
- split layout: `root/{train,val,test}/<class>/*` (Kermany); a missing `val/` or `test/` is
  carved out of `train/`, grouped by patient and stratified by class;
- pool layout: `root/<class>/*`; val and test are both carved out of the pool.

Hidden folders and `__MACOSX/` are never classes. Every image is decoded once in `setup`
(bad files fail or are skipped, see medx.data.io) and its pixel digest kept, so that images
repeated across the final splits are found (medx.data.duplicates, `data.duplicates`). With
`data.cache` that pass also fills the decoded store (medx.data.cache) that the epochs read
instead of the files, and a later run with unchanged files decodes nothing.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from medx.data.cache import (
    Column,
    Decoded,
    Item,
    Store,
    check_mode,
    geometry,
    image_entry,
    open_store,
)
from medx.data.duplicates import check_policy, find_duplicates
from medx.data.intensity import check_method
from medx.data.io import (
    BadImageError,
    CheckedImages,
    check_images,
    is_hidden,
    list_images,
    read_image,
)
from medx.data.loaders import PhantomRoot, SplitLoaders
from medx.data.phantom import CLASSES as PHANTOM_CLASSES
from medx.data.splits import (
    SPLITS,
    Subsettable,
    kfold_by_patient,
    patient_ids,
    split_by_patient,
)
from medx.data.transforms import ImageTransform
from medx.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Samples(Subsettable):
    """One split: image paths, integer labels and the patient of each image."""

    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)

    def counts(self, num_classes: int) -> list[int]:
        return np.bincount(np.asarray(self.labels, dtype=int), minlength=num_classes).tolist()


class ImageDataset(Dataset):
    """(image tensor, label); the image from the decoded store when given (`images`, one per
    sample), else decoded from its file."""

    def __init__(
        self,
        samples: Samples,
        transform: ImageTransform,
        intensity: str = "none",
        images: Column | None = None,
    ) -> None:
        self.samples, self.transform, self.intensity = samples, transform, intensity
        self.images = images

    def __len__(self) -> int:
        return len(self.samples.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if self.images is not None:
            image = self.images[i]
        else:
            image = read_image(self.samples.paths[i], self.intensity)
        return self.transform(image), self.samples.labels[i]


class LabelledSplits:
    """What every classification data module tells medx.train about its labels: the class
    count and per-split counts (for class weights and the MLflow params), and what its checks
    found (`findings`: duplicates, skipped files), logged with them."""

    classes: list[str] | None
    splits: dict
    findings: dict[str, dict]

    def setup(self, stage: str | None = None) -> None:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.classes)

    @property
    def class_counts(self) -> dict[str, list[int]]:
        self.setup()
        return {s: self.splits[s].counts(self.num_classes) for s in SPLITS}

    def model_kwargs(self) -> dict:
        """What the classification model needs to know about the data."""
        return {"num_classes": self.num_classes, "class_counts": self.class_counts["train"]}

    def summary(self) -> dict:
        """Logged to MLflow: class names, per-split class counts, what the checks found."""
        counts = self.class_counts
        return {
            "dataset.classes": ",".join(self.classes),
            "dataset.counts": {
                s: dict(zip(self.classes, c, strict=True)) for s, c in counts.items()
            },
            **self.findings,
        }


class ImageFolderDataModule(LabelledSplits, SplitLoaders):
    r"""Images in class folders; splits grouped by patient (`patient_pattern` on file names).

    `data=folder` and `data=pneumonia` build it; every argument is the `data.<name>` key.

    Args:
        root: `root/<class>/*` (pool layout) or `root/{train,val,test}/<class>/*` (split
            layout); None only for subclasses that find their own root (the phantom).
        name: the data set's name in run names, logs and the model card.
        classes: class folder names in label order (index 1 is the positive class of a binary
            task); None: the subfolders, sorted.
        image_size: side of the square model input, in pixels.
        batch_size: training batch; val, test and predict batches are twice as large.
        num_workers: DataLoader worker processes.
        val_from_train: share of the pool's patients carved out for val when `val/` is missing
            (patient-grouped, stratified by class).
        test_from_train: the same for `test/`.
        swap_val_test: swap the val and test splits once made (Kermany's 16-image `val/`).
        patient_pattern: regex searched in file names; its first group that matched (or the
            whole match) is the patient id (Kermany: `person(\d+)_|IM-(\d+)-`). None, or a
            name it does not match: the image is its own patient. A DICOM file's PatientID
            wins over it.
        augment: training augmentation, `none`, `light` or `strong`; val and test never.
        skip_bad_images: True: skip unreadable images with a warning instead of stopping.
        seed: seeds the carving of splits and folds.
        download_hint: what the error says to do when `root` does not exist.
        folds: k-fold cross-validation over the pool when > 1 (the test split set aside first).
        fold: which fold (0-based) is val.
        duplicates: images with identical pixels in two splits: `warn`, `error` or `drop`
            (the later copy).
        intensity: per-image standardisation before the 8-bit conversion: `none`, `zscore`,
            `equalize` or `clahe`.
        cache: decode each image once into a store the epochs read: `disk` (a memory-mapped
            file under `cache_dir/decoded`, reused by the next run), `memory` or `none`.
        cache_dir: where `cache=disk` keeps its files.
    """

    task = "classification"
    layout_hint = "Point data.root at a folder with one subfolder of images per class."

    def __init__(
        self,
        root: str | Path | None,
        name: str = "folder",
        classes: list[str] | None = None,
        image_size: int = 224,
        batch_size: int = 32,
        num_workers: int = 2,
        val_from_train: float = 0.1,
        test_from_train: float = 0.1,
        swap_val_test: bool = False,
        patient_pattern: str | None = None,
        augment: str = "light",
        skip_bad_images: bool = False,
        seed: int = 0,
        download_hint: str = "",
        folds: int = 1,
        fold: int = 0,
        duplicates: str = "warn",
        intensity: str = "none",
        cache: str = "none",
        cache_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root) if root else None
        self.intensity = check_method(intensity)
        self.cache, self.cache_dir = check_mode(cache), Path(cache_dir) if cache_dir else None
        self.store: Store | None = None  # the decoded store (medx.data.cache), from setup
        self.rows: dict[Path, int] = {}  # an image's entry in the store
        self.name, self.classes = name, list(classes) if classes else None
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.fractions = {"val": val_from_train, "test": test_from_train}
        self.swap_val_test, self.patient_pattern = swap_val_test, patient_pattern
        self.augment, self.skip_bad_images, self.seed = augment, skip_bad_images, seed
        self.download_hint = download_hint
        self.folds, self.fold = folds, fold
        self.duplicates = check_policy(duplicates)
        self.splits: dict[str, Samples] = {}
        self.digests: dict[Path, bytes] = {}  # pixel digest of every verified image
        self.skipped: Counter[str] = Counter()  # files passed over, by reason
        self.findings = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        root = self.resolve_root()
        layout = {s: root / s for s in SPLITS if (root / s).is_dir()}
        pool_dir = layout.get("train", root)
        # root/{val,test}/ beside root/<class>/ (no train/) are splits, not classes
        self.classes = self.classes or [c for c in class_folders(pool_dir) if c not in layout]
        if len(self.classes) < 2:
            raise DataError(
                f"{pool_dir} has {len(self.classes)} class folder(s) {self.classes}; a classifier "
                "needs at least two subfolders of images, one per class (or set data.classes)."
            )
        _check_split_classes(layout)
        listed = {s: self._list(d) for s, d in layout.items()}
        if "train" not in listed:
            listed["train"] = self._list(root)
        files = [p for folders in listed.values() for _, _, paths in folders for p in paths]
        checked = self._decode_pass(root, files)
        self.digests.update(zip(checked.paths, checked.digests, strict=True))
        if checked.bad:
            self.skipped["bad_image"] += len(checked.bad)
        good = set(checked.paths)
        splits = {s: self._samples(folders, good) for s, folders in listed.items()}
        if self.folds > 1:
            self._cross_validation_pool(splits)
        missing = {s: f for s, f in self.fractions.items() if not splits.get(s, Samples()).paths}
        if missing:
            pool = splits["train"]
            parts = split_by_patient(
                pool.labels, pool.patients, missing, self.seed, class_names=self.classes
            )
            splits.update({s: pool.subset(idx) for s, idx in parts.items()})
        if self.swap_val_test:
            splits["val"], splits["test"] = splits["test"], splits["val"]
        self.splits = self._without_duplicates(root, splits)
        if self.skipped:
            self.findings["dataset.skipped"] = dict(sorted(self.skipped.items()))
        self._log_counts()

    def _without_duplicates(self, root: Path, splits: dict[str, Samples]) -> dict[str, Samples]:
        """Find images repeated across the final splits; drop later copies if asked."""

        def name(path: Path) -> str:
            return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)

        found = find_duplicates(
            {s: [self.digests[p] for p in splits[s].paths] for s in SPLITS},
            {s: [name(p) for p in splits[s].paths] for s in SPLITS},
            self.duplicates,
            self.name,
        )
        self.findings["dataset.duplicates"] = found.summary()
        if not found.dropped:
            return splits
        return {s: splits[s].subset(found.keep(s, len(splits[s].paths))) for s in SPLITS}

    def _cross_validation_pool(self, splits: dict[str, Samples]) -> None:
        """k-fold: val is fold `fold` of the pool left once test is set aside (given or carved).

        A given val/ folder joins the pool: with cross-validation every pool patient is
        validated on exactly once, so a fixed val split would only shrink the folds.
        """
        pool = splits["train"]
        if not splits.get("test", Samples()).paths:
            test_share = {"test": self.fractions["test"]}
            parts = split_by_patient(
                pool.labels, pool.patients, test_share, self.seed, class_names=self.classes
            )
            splits["test"] = pool.subset(parts["test"])
            pool = pool.subset(parts["train"])
        given_val = splits.pop("val", Samples())
        pool = Samples(
            pool.paths + given_val.paths,
            pool.labels + given_val.labels,
            pool.patients + given_val.patients,
        )
        train, val = kfold_by_patient(
            pool.labels, pool.patients, self.folds, self.fold, self.seed, self.classes
        )
        splits["train"], splits["val"] = pool.subset(train), pool.subset(val)
        log.info("%s: fold %d of %d as the val split", self.name, self.fold, self.folds)

    def _list(self, split_dir: Path) -> list[tuple[Path, int, list[Path]]]:
        """(class folder, label, image files) of each class in one split folder."""
        found = []
        for label, name in enumerate(self.classes):
            folder = split_dir / name
            if not folder.is_dir():
                raise DataError(
                    f"Class folder {folder} is missing: data.classes={self.classes} expects one "
                    f"subfolder per class in {split_dir}."
                )
            paths = list_images(folder, self.skipped)
            if not paths:
                _no_images(folder)
            found.append((folder, label, paths))
        return found

    def _samples(self, folders: list[tuple[Path, int, list[Path]]], good: set[Path]) -> Samples:
        """One split's good images, their labels and patients."""
        samples = Samples()
        for folder, label, listed in folders:
            paths = [p for p in listed if p in good]
            if not paths:
                _no_images(folder)
            samples.paths += paths
            samples.labels += [label] * len(paths)
            samples.patients += patient_ids(paths, self.patient_pattern)
        return samples

    def _decode_pass(self, root: Path, paths: list[Path]) -> CheckedImages:
        """Every image decoded once (bad files, pixel digests); with data.cache the same pass
        fills the decoded store, or reads what an earlier run found from it."""
        if self.cache == "none":
            return check_images(paths, self.skip_bad_images)
        self.store = open_store(
            [Item((p,)) for p in paths],
            self._entry(),
            mode=self.cache,
            directory=self.cache_dir,
            name=self.name,
            settings=self._store_settings(root),
        )
        self.rows = {p: i for i, p in enumerate(paths)}
        return self.store.checked(self.skip_bad_images)

    def _entry(self) -> Callable[[Item], Decoded | BadImageError]:
        """How the store keeps one image: resized to what training crops from."""
        return partial(
            image_entry,
            intensity=self.intensity,
            shape=geometry(self.image_size, self.augment),
        )

    def _store_settings(self, root: Path) -> dict:
        """What the store's arrays depend on besides the files (its file is named by them)."""
        return {
            "kind": "images",
            "root": str(root),
            "intensity": self.intensity,
            "geometry": geometry(self.image_size, self.augment),
        }

    def _log_counts(self) -> None:
        for split in SPLITS:
            counts = self.splits[split].counts(len(self.classes))
            patients = len(set(self.splits[split].patients))
            log.info(
                "%s %-5s %5d images, %4d patients: %s",
                self.name,
                split,
                sum(counts),
                patients,
                ", ".join(f"{c}={n}" for c, n in zip(self.classes, counts, strict=True)),
            )

    def _dataset(self, split: str, train: bool) -> Dataset:
        transform = ImageTransform(self.image_size, self.augment if train else "none")
        samples = self.splits[split]
        return ImageDataset(samples, transform, self.intensity, self._images(samples))

    def _images(self, samples: Samples) -> Column | None:
        """The samples' images in the decoded store; None without one (decoded per epoch)."""
        if self.store is None or not self.store.has_arrays:
            return None
        return self.store.column([self.rows[p] for p in samples.paths], rgb=True)


def _no_images(folder: Path) -> None:
    raise DataError(
        f"Class folder {folder} has no images (.png/.jpg/.jpeg/...): add images or remove the "
        "folder."
    )


def class_folders(folder: Path) -> list[str]:
    """The class folder names in ``folder``, sorted; hidden folders and __MACOSX are none."""
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not is_hidden(d))


def _check_split_classes(layout: dict[str, Path]) -> None:
    """A val/ or test/ class folder that train/ lacks would be dropped without a word."""
    if "train" not in layout:
        return
    trained = set(class_folders(layout["train"]))
    for split in [s for s in ("val", "test") if s in layout]:
        extra = [c for c in class_folders(layout[split]) if c not in trained]
        if extra:
            raise DataError(
                f"Class folder {layout[split] / extra[0]} has no counterpart in "
                f"{layout['train']} (train/ has {', '.join(sorted(trained))}): a class the "
                f"model never trains on cannot be evaluated. Add {layout['train'] / extra[0]}, "
                f"or move or rename {layout[split] / extra[0]}."
            )


class PhantomDataModule(PhantomRoot, ImageFolderDataModule):
    """The embedded default: synthetic chest X-rays generated once into `cache_dir`.

    `data=phantom` builds it. It takes the phantom's own arguments (`PhantomRoot`) and passes
    every other one on to `ImageFolderDataModule`; classes `NORMAL` and `OPACITY`, patients
    from the file names (`patientNNNN_K.png`).
    """

    phantom_defaults: ClassVar[dict[str, Any]] = {
        "name": "phantom",
        "classes": PHANTOM_CLASSES,
        "patient_pattern": r"patient(\d+)_",
    }
