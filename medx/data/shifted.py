"""Image files read as a model reads them, optionally under a simulated acquisition shift.

The stress test (`medx.evaluation.stress`), the shift reference of the clinical evaluation and
the monitor's benchmark read images through this one dataset, so a clean copy and its shifted
copies differ by the shift alone, and the clean copy is what `medx.predict` would give the
model (the file decoded, the per-image intensity method, the evaluation resize).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from medx.data.acquisition import apply, check_shifts
from medx.data.intensity import standardise
from medx.data.io import read_image
from medx.data.transforms import ImageTransform


class ShiftedImages(Dataset):
    """(image tensor, label) of image files as the model reads them, optionally under one
    acquisition shift: decoded, shifted (seeded per image), then the per-image intensity
    standardisation and the evaluation resize, as `medx.predict` reads a file.

    `shift=None` reads the files unshifted, by the same steps (`read_image` with the model's
    intensity method), so a clean copy and its shifted copies differ by the shift alone.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int] | None,
        image_size: int,
        intensity: str = "none",
        shift: str | None = None,
        severity: int = 1,
        seed: int = 0,
    ) -> None:
        if shift is not None:
            check_shifts([shift], "shift")
        self.paths, self.intensity, self.shift = list(paths), intensity, shift
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.severity, self.seed = severity, seed
        self.transform = ImageTransform(image_size, "none")

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.pixels(i)), self.labels[i]

    def pixels(self, i: int) -> np.ndarray:
        """The i-th image, shifted and standardised: uint8 HxWx3."""
        if self.shift is None:
            return read_image(self.paths[i], self.intensity)
        rng = np.random.default_rng([self.seed, i])
        shifted = apply(read_image(self.paths[i])[..., 0], self.shift, self.severity, rng)
        gray = standardise(shifted, self.intensity)
        return cv2.cvtColor(shifted if gray is None else gray, cv2.COLOR_GRAY2RGB)
