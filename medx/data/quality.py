"""Image-quality data (good = 0, bad = 1): clean source images and their degraded twins.

Any class-folder tree of clean images is a source (the phantom by default). The sources are
split by patient first (reusing ImageFolderDataModule: stratified by source class), and only
then does each source image give one good sample and about `bad_ratio` degraded twins, so a
clean image and its twins always sit in the same split. Degradations are drawn per source from
a seed derived from `seed` and the file name: the data set is the same on every run and machine.

Batches carry what the model family asks for (`inputs`, set by medx.train from the model
class): "image" → (image tensor in [0, 1], label) for CNNs; "features" → (handcrafted
feature vector, label) for the feature baseline, computed once per split and cached on disk.
With `data.cache` (medx.data.cache) each sample is degraded at the source's full size and
resized once, into the decoded store the epochs read: the same pixels, decoded once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from medx.data.cache import (
    Column,
    Decoded,
    Geometry,
    Item,
    Store,
    fit,
    geometry,
    open_store,
    verify_entry,
)
from medx.data.folders import PhantomDataModule, Samples
from medx.data.io import BadImageError, read_gray
from medx.data.splits import SPLITS
from medx.data.transforms import ImageTransform
from medx.errors import ConfigError, DataError
from medx.quality.degradations import DEGRADATIONS, check_degradations, degrade
from medx.quality.features import FEATURES, image_features

log = logging.getLogger(__name__)

QUALITY_CLASSES = ("good", "bad")  # index 1, "bad", is the positive class
INPUTS = ("image", "features")


@dataclass
class QualitySamples(Samples):
    """Samples plus how each was made: degradation name ("" = clean), severity and seed."""

    degradations: list[str] = field(default_factory=list)
    severities: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    def records(self) -> list[tuple[str, int, str, float, int]]:
        return [
            (str(p), y, d, round(s, 6), k)
            for p, y, d, s, k in zip(
                self.paths, self.labels, self.degradations, self.severities, self.seeds, strict=True
            )
        ]


def load_sample(path: Path, degradation: str, severity: float, seed: int) -> np.ndarray:
    """The gray uint8 image of one sample: the source, degraded unless `degradation` is ""."""
    img = read_gray(path)
    return degrade(img, degradation, severity, seed) if degradation else img


class QualityImageDataset(Dataset):
    """(image tensor, label) with the degradation applied on the fly (deterministic).

    `crop`: a random crop × crop window of the transformed image (training only). The defects
    cover the whole image, so a window at full resolution keeps the pixel-level evidence
    (noise, blur, JPEG blocks) that shrinking the image would erase, at a fraction of the cost.
    `repeats`: each sample served this many times per epoch (different windows): more optimizer
    steps per pass over the whole-image validation set, which costs as much as a crop epoch.
    """

    def __init__(
        self,
        samples: QualitySamples,
        transform: ImageTransform,
        crop: int | None = None,
        repeats: int = 1,
        images: Column | None = None,
    ) -> None:
        self.samples, self.transform, self.crop, self.repeats = samples, transform, crop, repeats
        self.images = images  # the degraded samples in the decoded store, or None

    def __len__(self) -> int:
        return len(self.samples.paths) * self.repeats

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s = self.samples
        i %= len(s.paths)
        if self.images is not None:
            gray = self.images[i]
        else:
            gray = load_sample(s.paths[i], s.degradations[i], s.severities[i], s.seeds[i])
        image = self.transform(cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB))
        if self.crop:
            top, left = (int(torch.randint(n - self.crop + 1, ())) for n in image.shape[1:])
            image = image[:, top : top + self.crop, left : left + self.crop]
        return image, s.labels[i]


class QualityDataModule(PhantomDataModule):
    """Good vs degraded images from the phantom (default) or `source_root`.

    `data=quality` builds it. Classes `good` (0) and `bad` (1); batches carry images for CNNs
    or feature vectors for the feature baseline (`inputs`, set by medx.train from the model
    class). The phantom's arguments and the folder data module's (`image_size`,
    `patient_pattern`, `cache`, ...) are accepted as for `PhantomDataModule`; `intensity` must
    stay `none`.

    Args:
        cache_dir: where the phantom is generated and the decoded store kept.
        feature_cache: where the features of each split are cached (computed once); None:
            computed every run.
        source_root: a class-folder tree of clean source images (e.g. the Kermany `train/`);
            None: the phantom.
        degradations: degradation name → [low, high] severity range in [0, 1]; None: all nine
            degradations over the whole range.
        bad_ratio: degraded twins per clean image (fractions allowed: 2.5 gives 2 or 3).
        max_sources: at most this many source images in all, each split cut in proportion;
            None: all.
        train_crop: CNN training on random windows of this size (32 to `image_size`); val and
            test see whole images. None: whole images.
        train_repeats: training windows per image and epoch.
        **kwargs: the phantom's and the folder data module's arguments.
    """

    phantom_defaults: ClassVar[dict[str, Any]] = {
        **PhantomDataModule.phantom_defaults,
        "name": "quality",
        "augment": "none",  # photometric jitter would itself change image quality
    }

    def __init__(
        self,
        cache_dir: str | Path,
        feature_cache: str | Path | None = None,
        source_root: str | Path | None = None,
        degradations: Mapping[str, Sequence[float]] | None = None,
        bad_ratio: float = 3.0,
        max_sources: int | None = None,
        train_crop: int | None = None,
        train_repeats: int = 1,
        **kwargs,
    ) -> None:
        if source_root:  # class names come from its folders, not the phantom's
            kwargs.setdefault("classes", None)
        super().__init__(cache_dir=cache_dir, **kwargs)
        self.source_root = Path(source_root) if source_root else None
        self.degradations = check_degradations(
            degradations or {name: (0.0, 1.0) for name in DEGRADATIONS}
        )
        if not bad_ratio > 0:
            raise ConfigError(f"data.bad_ratio={bad_ratio} must be > 0 (bad images per good one).")
        self.bad_ratio, self.max_sources = float(bad_ratio), max_sources
        if train_crop is not None and not 32 <= train_crop <= self.image_size:
            raise ConfigError(
                f"data.train_crop={train_crop} must lie in [32, data.image_size={self.image_size}]"
                " (or be null: train on whole images)."
            )
        if not (isinstance(train_repeats, int) and train_repeats >= 1):
            raise ConfigError(
                f"data.train_repeats={train_repeats} must be an integer >= 1 (training windows "
                "per image and epoch)."
            )
        if self.intensity != "none":
            raise ConfigError(
                f"data.intensity={self.intensity} with data=quality would standardise away the "
                "contrast and exposure defects the task is about: use data.intensity=none."
            )
        self.train_crop, self.train_repeats = train_crop, train_repeats
        self.feature_cache = Path(feature_cache) if feature_cache else None
        self.inputs = "image"  # medx.train sets the model family's choice before setup
        self.source_classes: list[str] = []
        self._features: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._sample_store: tuple[Store, dict[tuple, int]] | None = None

    def prepare_data(self) -> None:
        if self.source_root is None:
            super().prepare_data()

    def resolve_root(self) -> Path:
        if self.source_root is None:
            return super().resolve_root()
        if not self.source_root.is_dir():
            raise DataError(
                f"data.source_root={self.source_root} does not exist: point it at a folder of "
                "clean images in class subfolders, e.g. $MEDX_DATA/chest_xray/train, or set "
                "data.source_root=null for the phantom."
            )
        self.root = self.source_root
        return self.root

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.inputs not in INPUTS:
            raise ConfigError(f"QualityDataModule serves inputs {INPUTS}, not {self.inputs!r}.")
        super().setup(stage)  # source images, split by patient
        sources = self.splits
        total = sum(len(sources[s].paths) for s in SPLITS)
        self.source_classes = list(self.classes)
        self.classes = list(QUALITY_CLASSES)
        self.splits = {s: self._with_twins(self._limit(sources[s], s, total)) for s in SPLITS}
        self._log_counts()

    def _limit(self, samples: Samples, split: str, total: int) -> Samples:
        """At most `max_sources` source images in all, each split cut in proportion."""
        if self.max_sources is None or total <= self.max_sources:
            return samples
        keep = min(len(samples.paths), math.ceil(self.max_sources * len(samples.paths) / total))
        rng = np.random.default_rng([self.seed, SPLITS.index(split)])
        return samples.subset(np.sort(rng.permutation(len(samples.paths))[:keep]))

    def _with_twins(self, sources: Samples) -> QualitySamples:
        """Each source: itself (good), then floor/ceil(bad_ratio) degraded twins (bad)."""
        out = QualitySamples()
        names = list(self.degradations)
        whole, frac = divmod(self.bad_ratio, 1.0)
        for path, patient in zip(sources.paths, sources.patients, strict=True):
            key = zlib.crc32(f"{path.parent.name}/{path.name}".encode())
            rng = np.random.default_rng([self.seed, key])
            n_bad = int(whole) + int(rng.random() < frac)
            for k in range(n_bad + 1):
                name = "" if k == 0 else names[rng.integers(len(names))]
                low, high = self.degradations.get(name, (0.0, 0.0))
                out.paths.append(path)
                out.patients.append(patient)
                out.labels.append(0 if k == 0 else 1)
                out.degradations.append(name)
                out.severities.append(float(rng.uniform(low, high)))
                out.seeds.append(int(rng.integers(2**31)))
        return out

    def describe_samples(self, split: str) -> dict[str, list]:
        """How each sample of `split` was made, for the evaluation's per-image table and its
        errors by degradation (`test_by_degradation.csv`)."""
        self.setup()
        s = self.splits[split]
        return {
            "degradation": [d or "none" for d in s.degradations],
            "severity": [
                round(v, 4) if d else "" for d, v in zip(s.degradations, s.severities, strict=True)
            ],
        }

    def model_kwargs(self) -> dict:
        kwargs = super().model_kwargs()
        if self.inputs == "features":
            kwargs["feature_names"] = list(FEATURES)
        return kwargs

    def summary(self) -> dict:
        summary = super().summary()
        summary["dataset.source"] = str(self.root)
        summary["dataset.source_classes"] = ",".join(self.source_classes)
        summary["dataset.degradations"] = ",".join(self.degradations)
        summary["dataset.inputs"] = self.inputs
        return summary

    def features(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """(features N×F float32, labels N) of one split: computed once, cached on disk."""
        self.setup()
        if split not in self._features:
            self._features[split] = self._load_or_compute(self.splits[split])
        return self._features[split]

    def _load_or_compute(self, samples: QualitySamples) -> tuple[np.ndarray, np.ndarray]:
        key = hashlib.sha1(json.dumps([list(FEATURES), samples.records()]).encode()).hexdigest()
        cached = self.feature_cache / f"{key[:20]}.npz" if self.feature_cache else None
        if cached is not None and cached.is_file():
            with np.load(cached) as data:
                return data["x"], data["y"]
        start = time.perf_counter()
        x = compute_features(samples)
        y = np.asarray(samples.labels, dtype=np.int64)
        log.info("Features of %d images in %.1f s", len(y), time.perf_counter() - start)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, x=x, y=y)
            os.replace(tmp, cached)  # atomic: concurrent sweep jobs never read half a file
        return x, y

    def _loader(self, split: str, train: bool) -> DataLoader:
        self.setup()
        if self.inputs == "image":
            return super()._loader(split, train)
        x, y = self.features(split)
        if not len(y):
            raise ConfigError(f"The {split} split of data={self.name} is empty.")
        dataset = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=train)

    def _entry(self) -> Callable[[Item], Decoded | BadImageError]:
        return verify_entry  # sources are checked, never fed: the store keeps their samples

    def _store_settings(self, root: Path) -> dict:
        return {"kind": "quality sources", "root": str(root)}

    def _sample_images(self, samples: QualitySamples) -> Column | None:
        """The samples of one split in the decoded store (all splits' built at the first call:
        each degraded at the source's size, then resized as the training transform needs)."""
        if self.cache == "none":
            return None
        if self._sample_store is None:
            made = list(dict.fromkeys(m for s in SPLITS for m in _made(self.splits[s])))
            shape = geometry(self.image_size, self.augment)
            store = open_store(
                [Item((m[0],), m[1:]) for m in made],
                partial(_sample_entry, shape=shape),
                mode=self.cache,
                directory=self.cache_dir,
                name=self.name,
                settings={"kind": "quality samples", "root": str(self.root), "geometry": shape},
                what="quality samples",
            )
            self._sample_store = (store, {m: i for i, m in enumerate(made)})
        store, rows = self._sample_store
        if not store.has_arrays:
            return None
        return store.column([rows[m] for m in _made(samples)])

    def eval_transform(self) -> ImageTransform:
        """Gray-as-RGB uint8 image → the CNN's input tensor, as for val/test (and scoring)."""
        return ImageTransform(self.image_size, "none")

    def _dataset(self, split: str, train: bool) -> Dataset:
        samples = self.splits[split]
        images = self._sample_images(samples)
        if not train:
            return QualityImageDataset(samples, self.eval_transform(), images=images)
        transform = ImageTransform(self.image_size, self.augment)
        return QualityImageDataset(samples, transform, self.train_crop, self.train_repeats, images)


def _made(samples: QualitySamples) -> list[tuple[Path, str, float, int]]:
    """What makes each sample's pixels: its source, degradation, severity and seed."""
    s = samples
    return list(zip(s.paths, s.degradations, s.severities, s.seeds, strict=True))


def _sample_entry(item: Item, shape: Geometry) -> Decoded | BadImageError:
    """One quality sample for the store: degraded at the source's size, then resized."""
    degradation, severity, seed = item.params
    try:
        return Decoded((fit(load_sample(item.files[0], degradation, severity, seed), shape),))
    except BadImageError as err:
        return err


def compute_features(samples: QualitySamples) -> np.ndarray:
    """Feature rows of every sample (threads: OpenCV releases the GIL)."""

    def one(i: int) -> np.ndarray:
        s = samples
        img = load_sample(s.paths[i], s.degradations[i], s.severities[i], s.seeds[i])
        try:
            return image_features(img)
        except DataError as err:
            raise DataError(f"{s.paths[i]}: {err}") from err

    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medx-features") as pool:
        rows = list(pool.map(one, range(len(samples.paths))))
    return np.asarray(rows, dtype=np.float32).reshape(-1, len(FEATURES))
