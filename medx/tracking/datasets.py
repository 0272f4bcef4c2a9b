"""The data set a run trained on, as an MLflow dataset input: the runs table's Dataset column.

Name (`data.name`), a digest of the file list and contents of every split (the same files
with the same pixels give the same digest wherever they lie; one image changed, added or moved
to another split gives another), the source (the data's folder or file) and the split sizes
(the input's context, e.g. `train=240 val=60 test=60`). Runs on different data, or on
differently split data, are told apart at a glance, and MLflow's dataset filter finds them.

The content digests are those the data modules computed while verifying every image (pixel
digests); only files they did not decode (masks) are read again here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from mlflow import MlflowClient
from mlflow.data.dataset_source import DatasetSource
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

SPLITS = ("train", "val", "test")
DIGEST_LENGTH = 16  # hex characters: MLflow keeps up to 36


class LocalSource(DatasetSource):
    """A folder or file on the machine that trained (`source_type` local, as MLflow names it)."""

    def __init__(self, path: str) -> None:
        self.path = path

    @staticmethod
    def _get_source_type() -> str:
        return "local"

    def load(self, **kwargs: Any) -> str:
        return self.path

    @staticmethod
    def _can_resolve(raw_source: Any) -> bool:
        return False

    @classmethod
    def _resolve(cls, raw_source: Any) -> LocalSource:
        return cls(str(raw_source))

    def to_dict(self) -> dict[str, str]:
        return {"uri": self.path}

    @classmethod
    def from_dict(cls, source_dict: dict[str, str]) -> LocalSource:
        return cls(source_dict["uri"])


class SplitDataset(MetaDataset):
    """A MetaDataset with a profile: the split sizes and classes."""

    def __init__(self, source: DatasetSource, name: str, digest: str, profile: dict) -> None:
        self._profile = profile
        super().__init__(source=source, name=name, digest=digest)

    @property
    def profile(self) -> dict:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def split_sizes(summary: Mapping[str, Any]) -> dict[str, int]:
    """Images per split from a data module's `summary()` (`dataset.counts`: per class, or
    `images` for segmentation)."""
    sizes = {}
    for split, counts in (summary.get("dataset.counts") or {}).items():
        if isinstance(counts, Mapping):
            images = counts.get("images")
            sizes[split] = int(images if images is not None else sum(counts.values()))
    return sizes


def source_of(datamodule: Any) -> str:
    """Where the data lies: the data file (MedMNIST) or root folder, resolved."""
    for attribute in ("path", "root"):
        where = getattr(datamodule, attribute, None)
        if isinstance(where, str | Path) and str(where):
            return str(Path(where).resolve())
    return ""


def digest(datamodule: Any) -> str:
    """A digest of every split's file list and contents (see the module docstring)."""
    found = hashlib.sha256()
    splits = getattr(datamodule, "splits", None) or {}
    if not splits:  # a data module that keeps no splits: what it reports about itself
        summary = json.dumps(datamodule.summary(), sort_keys=True, default=str)
        found.update(summary.encode())
    root = source_of(datamodule)
    digests = getattr(datamodule, "digests", None) or {}
    for split in SPLITS:
        if split in splits:
            found.update(f"\0split {split}\0".encode())
            for record in _records(splits[split], root, digests):
                found.update(record)
    return found.hexdigest()[:DIGEST_LENGTH]


def _records(part: Any, root: str, digests: Mapping[Path, bytes]) -> Iterator[Any]:
    """What identifies one split: per image its name, content digest and label (and mask)."""
    images = getattr(part, "images", None)
    if isinstance(images, np.ndarray):  # held in memory (MedMNIST)
        yield np.ascontiguousarray(images)  # hashed as the buffer it is, not copied
        yield np.ascontiguousarray(part.labels, dtype=np.int64)
        return
    paths = list(getattr(part, "paths", None) or images or [])
    labels = list(getattr(part, "labels", None) or [None] * len(paths))
    masks = list(getattr(part, "masks", None) or [None] * len(paths))
    records = part.records() if hasattr(part, "records") else [None] * len(paths)
    for path, label, mask, record in zip(paths, labels, masks, records, strict=True):
        path = Path(path)
        name = str(path.relative_to(root)) if root and path.is_relative_to(root) else path.name
        content = digests.get(path) or _file_digest(path)
        yield f"{name}\0{label}\0{record}\0".encode() + content
        if mask is not None:
            yield _file_digest(Path(mask))


def _file_digest(path: Path) -> bytes:
    found = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            found.update(chunk)
    return found.digest()


def context(sizes: Mapping[str, int]) -> str:
    """The input's context as the runs table shows it: `train=240 val=60 test=60`."""
    return " ".join(f"{split}={n}" for split, n in sizes.items())


def as_dataset(datamodule: Any) -> tuple[SplitDataset, dict[str, int]]:
    """The data module as an MLflow dataset, and its split sizes."""
    summary = datamodule.summary()
    sizes = split_sizes(summary)
    classes = getattr(datamodule, "classes", None)
    profile = {"splits": sizes, **({"classes": list(classes)} if classes else {})}
    dataset = SplitDataset(
        LocalSource(source_of(datamodule)),
        name=str(getattr(datamodule, "name", None) or type(datamodule).__name__),
        digest=digest(datamodule),
        profile=profile,
    )
    return dataset, sizes


def log_dataset(client: MlflowClient, run_id: str, datamodule: Any) -> SplitDataset:
    """Log the data module as the run's dataset input, its split sizes as the context."""
    dataset, sizes = as_dataset(datamodule)
    tags = [InputTag(MLFLOW_DATASET_CONTEXT, context(sizes))] if sizes else []
    client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags)])
    return dataset
