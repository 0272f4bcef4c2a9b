"""Split DataLoaders shared by every data family: the same batching rules everywhere."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from medx.errors import ConfigError


class SplitLoaders(L.LightningDataModule):
    """train/val/test/predict loaders from one `_dataset(split, train)` per data family."""

    name: str
    batch_size: int
    num_workers: int

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
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train and len(dataset) // world > self.batch_size,  # batch of 1 breaks BN
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
