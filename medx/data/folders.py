"""Class-per-subfolder image classification data: Kermany layout, any folder tree, phantom.

Two layouts are understood:
- split layout: `root/{train,val,test}/<class>/*` (Kermany); a missing `val/` or `test/` is
  carved out of `train/`, grouped by patient and stratified by class;
- pool layout: `root/<class>/*`; val and test are both carved out of the pool.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medx.data.io import list_images, read_image, verify_images
from medx.data.loaders import SplitLoaders
from medx.data.phantom import CLASSES as PHANTOM_CLASSES
from medx.data.phantom import PhantomSource
from medx.data.splits import kfold_by_patient, patient_ids, split_by_patient
from medx.data.transforms import ImageTransform
from medx.errors import DataError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class Samples:
    """One split: image paths, integer labels and the patient of each image."""

    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)

    def subset(self, index: np.ndarray) -> Samples:
        return Samples(
            [self.paths[i] for i in index],
            [self.labels[i] for i in index],
            [self.patients[i] for i in index],
        )

    def counts(self, num_classes: int) -> list[int]:
        return np.bincount(np.asarray(self.labels, dtype=int), minlength=num_classes).tolist()


class ImageDataset(Dataset):
    def __init__(self, samples: Samples, transform: ImageTransform) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(read_image(self.samples.paths[i])), self.samples.labels[i]


class LabelledSplits:
    """What every classification data module tells medx.train about its labels: the class
    count and per-split counts (for class weights and the MLflow params)."""

    classes: list[str] | None
    splits: dict

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
        """Logged to MLflow: class names and per-split class counts."""
        counts = self.class_counts
        return {
            "dataset.classes": ",".join(self.classes),
            "dataset.counts": {
                s: dict(zip(self.classes, c, strict=True)) for s, c in counts.items()
            },
        }


class ImageFolderDataModule(LabelledSplits, SplitLoaders):
    """Images in class folders; splits grouped by patient (`patient_pattern` on file names)."""

    task = "classification"

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
    ) -> None:
        super().__init__()
        self.root = Path(root) if root else None
        self.name, self.classes = name, list(classes) if classes else None
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.fractions = {"val": val_from_train, "test": test_from_train}
        self.swap_val_test, self.patient_pattern = swap_val_test, patient_pattern
        self.augment, self.skip_bad_images, self.seed = augment, skip_bad_images, seed
        self.download_hint = download_hint
        self.folds, self.fold = folds, fold
        self.mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # set from the backbone by medx.train
        self.std: tuple[float, ...] = (0.5, 0.5, 0.5)
        self.splits: dict[str, Samples] = {}

    def resolve_root(self) -> Path:
        """The directory to read; subclasses may generate or download it first."""
        if self.root is None or not self.root.is_dir():
            raise DataError(
                f"data.root={self.root} does not exist (data={self.name}). "
                + (
                    self.download_hint
                    or "Point data.root at a folder with one subfolder per class."
                )
            )
        return self.root

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        root = self.resolve_root()
        layout = {s: root / s for s in SPLITS if (root / s).is_dir()}
        pool_dir = layout.get("train", root)
        self.classes = self.classes or sorted(
            d.name for d in pool_dir.iterdir() if d.is_dir() and not d.name.startswith(".")
        )
        if len(self.classes) < 2:
            raise DataError(
                f"{pool_dir} has {len(self.classes)} class folder(s) {self.classes}; a classifier "
                "needs at least two subfolders of images, one per class (or set data.classes)."
            )
        splits = {s: self._scan(d) for s, d in layout.items()}
        if "train" not in splits:
            splits["train"] = self._scan(root)
        if self.folds > 1:
            self._cross_validation_pool(splits)
        missing = {s: f for s, f in self.fractions.items() if not splits.get(s, Samples()).paths}
        if missing:
            pool = splits["train"]
            parts = split_by_patient(pool.labels, pool.patients, missing, self.seed)
            splits.update({s: pool.subset(idx) for s, idx in parts.items()})
        if self.swap_val_test:
            splits["val"], splits["test"] = splits["test"], splits["val"]
        self.splits = splits
        self._log_counts()

    def _cross_validation_pool(self, splits: dict[str, Samples]) -> None:
        """k-fold: val is fold `fold` of the pool left once test is set aside (given or carved).

        A given val/ folder joins the pool: with cross-validation every pool patient is
        validated on exactly once, so a fixed val split would only shrink the folds.
        """
        pool = splits["train"]
        if not splits.get("test", Samples()).paths:
            test_share = {"test": self.fractions["test"]}
            parts = split_by_patient(pool.labels, pool.patients, test_share, self.seed)
            splits["test"] = pool.subset(parts["test"])
            pool = pool.subset(parts["train"])
        given_val = splits.pop("val", Samples())
        pool = Samples(
            pool.paths + given_val.paths,
            pool.labels + given_val.labels,
            pool.patients + given_val.patients,
        )
        train, val = kfold_by_patient(pool.labels, pool.patients, self.folds, self.fold, self.seed)
        splits["train"], splits["val"] = pool.subset(train), pool.subset(val)
        log.info("%s: fold %d of %d as the val split", self.name, self.fold, self.folds)

    def _scan(self, split_dir: Path) -> Samples:
        samples = Samples()
        for label, name in enumerate(self.classes):
            folder = split_dir / name
            if not folder.is_dir():
                raise DataError(
                    f"Class folder {folder} is missing: data.classes={self.classes} expects one "
                    f"subfolder per class in {split_dir}."
                )
            paths = verify_images(list_images(folder), skip_bad=self.skip_bad_images)
            if not paths:
                raise DataError(
                    f"Class folder {folder} has no images (.png/.jpg/.jpeg/...): add images or "
                    "remove the folder."
                )
            samples.paths += paths
            samples.labels += [label] * len(paths)
            samples.patients += patient_ids(paths, self.patient_pattern)
        return samples

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
        transform = ImageTransform(
            self.image_size, self.mean, self.std, self.augment if train else "none"
        )
        return ImageDataset(self.splits[split], transform)


class PhantomDataModule(PhantomSource, ImageFolderDataModule):
    """The embedded default: synthetic chest X-rays generated once into `cache_dir`."""

    def __init__(
        self,
        cache_dir: str | Path,
        n_patients: int = 400,
        images_per_patient: int = 2,
        size: int = 128,
        prevalence: float = 0.5,
        generator_seed: int = 0,
        **kwargs,
    ) -> None:
        kwargs.setdefault("name", "phantom")
        kwargs.setdefault("classes", list(PHANTOM_CLASSES))
        kwargs.setdefault("patient_pattern", r"patient(\d+)_")
        super().__init__(root=None, **kwargs)
        self.use_phantom(
            cache_dir,
            n_patients=n_patients,
            images_per_patient=images_per_patient,
            size=size,
            prevalence=prevalence,
            seed=generator_seed,
        )
