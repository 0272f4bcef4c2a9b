"""MedMNIST data sets (PneumoniaMNIST, ...): one `.npz` with the official train/val/test splits.

The splits are the published ones (`train_images`, `val_images`, `test_images` and their
`*_labels`), so results compare with the MedMNIST v2 benchmark table; nothing is carved. The
whole file fits in memory (PneumoniaMNIST at 28 px is 4 MB). When the file is absent it is
downloaded from Zenodo and its MD5 checked before it is used. Images repeated across the
official splits are found as for folder data (`data.duplicates`, medx.data.duplicates).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from medx.data.duplicates import check_policy, find_duplicates
from medx.data.folders import LabelledSplits
from medx.data.intensity import check_method, standardise
from medx.data.io import pixel_digest
from medx.data.loaders import SplitLoaders
from medx.data.splits import SPLITS
from medx.data.transforms import ImageTransform
from medx.errors import ConfigError, DataError

log = logging.getLogger(__name__)

ZENODO = "https://zenodo.org/records/10519652/files/{file}?download=1"
# MD5 of the official files (medmnist's INFO); other sizes are accepted unchecked with a warning.
KNOWN_MD5 = {
    "pneumoniamnist.npz": "28209eda62fecd6e6a2d98b1501bb15f",
    "pneumoniamnist_64.npz": "8f4eceb4ccffa70c672198ea285246c6",
}


@dataclass
class ArraySplit:
    """One split held in memory: HxW or HxWxC uint8 images and integer labels."""

    images: np.ndarray
    labels: np.ndarray
    source: str

    @property
    def paths(self) -> list[str]:
        """Names for per-image reports: `<file>:<split>[<index>]`."""
        return [f"{self.source}[{i}]" for i in range(len(self.labels))]

    def counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()

    def subset(self, index: np.ndarray) -> ArraySplit:
        return ArraySplit(self.images[index], self.labels[index], self.source)


class ArrayDataset(Dataset):
    def __init__(
        self, split: ArraySplit, transform: ImageTransform, intensity: str = "none"
    ) -> None:
        self.split, self.transform, self.intensity = split, transform, intensity

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.split.images[i]
        if self.intensity != "none":
            image = standardise(image, self.intensity)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        return self.transform(image), int(self.split.labels[i])


def md5sum(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, target: Path, md5: str | None, timeout: float = 60) -> Path:
    """Fetch `url` to `target` through a temporary file, so a broken download leaves nothing
    behind; with `md5`, a file whose checksum differs is refused (and deleted)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("Downloading %s to %s", url, target)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, 1 << 20)
        found = md5sum(tmp)
        if md5 and found != md5:
            raise DataError(
                f"Checksum mismatch for {url}: MD5 {found}, expected {md5} (data.md5). The "
                "download is corrupt or not the official file; retry, or set data.md5 to the "
                "file's checksum (null: no check) if you trust this source."
            )
        tmp.replace(target)
    except (urllib.error.URLError, OSError) as err:
        raise DataError(
            f"Could not download {url} ({type(err).__name__}: {err}). Without internet access, "
            f"copy the file to {target} (or point data.root at an existing .npz)."
        ) from err
    finally:
        tmp.unlink(missing_ok=True)
    return target


class MedMNISTDataModule(LabelledSplits, SplitLoaders):
    """A MedMNIST `.npz` with its official splits; grayscale images go to 3 channels.

    `data=pneumoniamnist` builds it; every argument is the `data.<name>` key.

    Args:
        root: the `.npz` file, or the folder that holds (or will hold) it.
        flag: the MedMNIST data set (`pneumoniamnist`, `bloodmnist`, ...).
        size: the MedMNIST(+) image size of the file: 28, or 64, 128, 224 (`<flag>_<size>.npz`).
        classes: class names in label order; None: the label numbers (`0`, `1`, ...).
        name: the data set's name in run names and the model card; None: `flag`.
        url: where to download the file from; None: the official Zenodo record.
        md5: the file's expected MD5; `auto`: the official checksum of a known file; None: no
            check. A downloaded file that differs is deleted.
        download: False: never download; a missing file is an error saying where to copy it.
        image_size: side of the model input (the 28 px images are resized to it).
        batch_size: training batch; val, test and predict batches are twice as large.
        num_workers: DataLoader worker processes (0 suits in-memory arrays).
        augment: training augmentation, `none`, `light` or `strong`.
        seed: accepted as every data module's; nothing is carved (the official splits).
        duplicates: images with identical pixels in two splits: `warn`, `error` or `drop`.
        intensity: per-image standardisation: `none`, `zscore`, `equalize` or `clahe`.
    """

    task = "classification"

    def __init__(
        self,
        root: str | Path,
        flag: str = "pneumoniamnist",
        size: int = 28,
        classes: list[str] | None = None,
        name: str | None = None,
        url: str | None = None,
        md5: str | None = "auto",
        download: bool = True,
        image_size: int = 28,
        batch_size: int = 128,
        num_workers: int = 0,
        augment: str = "none",
        seed: int = 0,
        duplicates: str = "warn",
        intensity: str = "none",
    ) -> None:
        super().__init__()
        self.flag, self.size = flag, size
        self.file_name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
        root = Path(root)
        self.path = root if root.suffix == ".npz" else root / self.file_name
        self.url = url or ZENODO.format(file=self.file_name)
        self.md5 = KNOWN_MD5.get(self.file_name) if md5 == "auto" else md5
        self.allow_download = download
        self.name, self.classes = name or flag, list(classes) if classes else None
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.augment, self.seed = augment, seed
        self.duplicates = check_policy(duplicates)
        self.intensity = check_method(intensity)
        self.splits: dict[str, ArraySplit] = {}
        self.findings: dict[str, dict] = {}

    def prepare_data(self) -> None:
        self.resolve_file()

    def resolve_file(self) -> Path:
        """The `.npz` to read: the one at data.root, else downloaded there."""
        if self.path.is_file():
            return self.path
        if not self.allow_download:
            raise DataError(
                f"{self.path} does not exist (data.root) and data.download=false: copy "
                f"{self.file_name} there, or allow the download from {self.url}."
            )
        if self.md5 is None:
            log.warning("No MD5 known for %s: the download is not verified.", self.file_name)
        return download(self.url, self.path, self.md5)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        path = self.resolve_file()
        try:
            with np.load(path) as npz:
                arrays = {k: npz[k] for k in npz.files}
        except (OSError, ValueError) as err:
            raise DataError(
                f"{path} is not a readable .npz file ({err}); delete it to "
                "download it again, or point data.root at a good copy."
            ) from err
        for split in SPLITS:
            missing = {f"{split}_images", f"{split}_labels"} - set(arrays)
            if missing:
                raise DataError(
                    f"{path} lacks {sorted(missing)}: a MedMNIST file holds train/val/test "
                    "_images and _labels."
                )
            images = arrays[f"{split}_images"]
            labels = arrays[f"{split}_labels"].reshape(len(images), -1)
            if labels.shape[1] != 1:
                raise DataError(
                    f"{path}: {split}_labels has {labels.shape[1]} columns; multi-label "
                    "MedMNIST sets (ChestMNIST) are not supported by this data module."
                )
            self.splits[split] = ArraySplit(
                images, labels[:, 0].astype(np.int64), f"{path.name}:{split}"
            )
        self._drop_duplicates()
        n = int(max(s.labels.max() for s in self.splits.values())) + 1
        self.classes = self.classes or [str(c) for c in range(n)]
        if len(self.classes) < n:
            raise ConfigError(
                f"data.classes={self.classes} names {len(self.classes)} classes but {path} "
                f"has labels up to {n - 1}."
            )
        for split, part in self.splits.items():
            log.info(
                "%s %-5s %5d images: %s",
                self.name,
                split,
                len(part.labels),
                dict(zip(self.classes, part.counts(len(self.classes)), strict=True)),
            )

    def summary(self) -> dict:
        return {**super().summary(), "dataset.file": str(self.path)}

    def _drop_duplicates(self) -> None:
        """Find images repeated across the official splits; drop later copies if asked."""
        found = find_duplicates(
            {s: [pixel_digest(image) for image in self.splits[s].images] for s in SPLITS},
            {s: self.splits[s].paths for s in SPLITS},
            self.duplicates,
            self.name,
        )
        self.findings["dataset.duplicates"] = found.summary()
        for s in SPLITS if found.dropped else ():
            self.splits[s] = self.splits[s].subset(found.keep(s, len(self.splits[s].labels)))

    def _dataset(self, split: str, train: bool) -> Dataset:
        transform = ImageTransform(self.image_size, self.augment if train else "none")
        return ArrayDataset(self.splits[split], transform, self.intensity)
