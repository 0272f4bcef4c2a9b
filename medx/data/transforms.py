"""Train augmentations and eval transforms for uint8 RGB images (HxWx3 NumPy arrays).

Presets are deliberately mild: chest X-rays have a canonical orientation (heart on the
patient's left), so no flips; small crops, rotations and exposure changes mimic positioning
and acquisition differences. `acquisition` is `light`'s geometry plus, on half the images, one
simulated acquisition shift of `medx.data.acquisition` (tone curve, blur, noise, resolution,
field of view, JPEG) at severity 1 or 2: it trains for another scanner, and the stress test
(`eval.stress`) measures what it buys.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from medx.data.acquisition import RandomAcquisition
from medx.errors import ConfigError


def _light_geometry(size: int) -> list[v2.Transform]:
    return [
        v2.RandomResizedCrop(size, scale=(0.85, 1.0), ratio=(0.9, 1.1), antialias=True),
        v2.RandomAffine(degrees=7),
    ]


def _augmentations(preset: str, size: int) -> list[v2.Transform]:
    presets: dict[str, list[v2.Transform]] = {
        "none": [v2.Resize((size, size), antialias=True)],
        "light": [
            *_light_geometry(size),
            v2.ColorJitter(brightness=0.1, contrast=0.1),
        ],
        "acquisition": _light_geometry(size),  # and RandomAcquisition on the uint8 pixels
        "strong": [
            v2.RandomResizedCrop(size, scale=(0.7, 1.0), ratio=(0.85, 1.15), antialias=True),
            v2.RandomAffine(degrees=15, translate=(0.08, 0.08), scale=(0.9, 1.1)),
            v2.ColorJitter(brightness=0.25, contrast=0.25),
            v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.3),
        ],
    }
    if preset not in presets:
        raise ConfigError(f"Unknown data.augment={preset!r}; choices: {', '.join(presets)}.")
    return presets[preset]


class ImageTransform:
    """From an HxWx3 uint8 array to a CxHxW float tensor in [0, 1] (picklable for workers).

    No normalisation here: the model owns its input (its `forward` normalises), so a data
    module, `medx.predict` and a served model feed it the same [0, 1] pixels.
    """

    def __init__(self, size: int, augment: str = "none") -> None:
        self.steps = v2.Compose(
            [*_augmentations(augment, size), v2.ToDtype(torch.float32, scale=True)]
        )
        self.acquisition = RandomAcquisition() if augment == "acquisition" else None

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if self.acquisition is not None:  # on the uint8 pixels, as a scanner would change them
            image = self.acquisition(image)
        return self.steps(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))


class SegmentationTransform:
    """An image and its mask through the same geometric steps (picklable for workers).

    The mask travels as a `tv_tensors.Mask`, so torchvision applies every crop, rotation and
    resize to it with nearest-neighbour sampling and leaves it out of colour changes and
    scaling: image and mask cannot drift apart.
    """

    def __init__(self, size: int, augment: str = "none") -> None:
        # ToDtype scales images only; the mask stays integer
        self.steps = v2.Compose(
            [*_augmentations(augment, size), v2.ToDtype(torch.float32, scale=True)]
        )

    def __call__(self, image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """HxWx3 uint8 image, HxW {0,1} mask → 3xSxS float in [0, 1], 1xSxS float {0,1}."""
        img = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        msk = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(mask))[None])
        img, msk = self.steps(img, msk)
        return img.as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor).float()
