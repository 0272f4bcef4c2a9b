"""What every data family shares: split DataLoaders with the same batching rules everywhere,
and where a data module finds its files (data.root, or the generated phantom)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from medx.data.phantom import PhantomSource
from medx.errors import ConfigError, DataError

EVAL_BATCH_SCALE = 2  # val/test/predict batches are this many times data.batch_size


class SplitLoaders(L.LightningDataModule):
    """train/val/test/predict loaders from one `_dataset(split, train)` per data family."""

    name: str
    batch_size: int
    num_workers: int
    root: Path | None = None
    download_hint: str = ""
    layout_hint: ClassVar[str] = "Point data.root at the data folder."

    def resolve_root(self) -> Path:
        """The directory to read: data.root (the phantom mixin generates its own first)."""
        if self.root is None or not self.root.is_dir():
            raise DataError(
                f"data.root={self.root} does not exist (data={self.name}). "
                + (self.download_hint or self.layout_hint)
            )
        return self.root

    def _dataset(self, split: str, train: bool) -> Dataset:
        raise NotImplementedError

    def _loader(self, split: str, train: bool) -> DataLoader:
        dataset = self._dataset(split, train)
        if not len(dataset):
            raise ConfigError(f"The {split} split of data={self.name} is empty.")
        # Under DDP each process sees 1/world of the split: decide on that share, or a small
        # split would train on zero batches per process.
        world = self.trainer.world_size if self.trainer is not None else 1
        return DataLoader(
            dataset,
            # no gradients or kept activations when evaluating (inference mode): twice the batch
            # fits in less memory than a training batch, and runs fewer, fuller GPU steps
            batch_size=self.batch_size if train else EVAL_BATCH_SCALE * self.batch_size,
            shuffle=train,
            drop_last=train and len(dataset) // world > self.batch_size,  # batch of 1 breaks BN
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),  # Lightning then copies non-blocking
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


class PhantomRoot(PhantomSource):
    """Put first in a folder data module's bases to read the phantom instead of data.root.

    Takes the phantom's own parameters; everything else goes on to the data module, with
    `phantom_defaults` (the name, the classes, the patient pattern of phantom file names)
    filled in where the config leaves them out.

    Args:
        cache_dir: where the generated set is kept (one folder per parameter set, made once);
            also holds the decoded store of `data.cache`.
        n_patients: patients in the set.
        images_per_patient: images of each patient (same anatomy, another acquisition).
        size: side of the generated PNGs, in pixels.
        prevalence: share of patients in the positive class (`OPACITY`).
        generator_seed: seed of the generator: the same seed gives the same images.
        **kwargs: the data module's own arguments.
    """

    phantom_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        cache_dir: str | Path,
        n_patients: int = 400,
        images_per_patient: int = 2,
        size: int = 128,
        prevalence: float = 0.5,
        generator_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        # cache_dir also holds the decoded store (data.cache, medx.data.cache)
        super().__init__(root=None, cache_dir=cache_dir, **{**self.phantom_defaults, **kwargs})
        self.use_phantom(
            cache_dir,
            n_patients=n_patients,
            images_per_patient=images_per_patient,
            size=size,
            prevalence=prevalence,
            seed=generator_seed,
        )
