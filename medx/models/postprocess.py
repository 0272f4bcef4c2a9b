"""Mask post-processing by anatomical prior, chosen by name (`model.postprocess`).

A network trained on a few dozen images leaves specks outside the lungs and holes inside an
opacity; lung fields are two solid regions (71 of the 73 radiologist masks in
$MEDX_DATA/lung_seg are two regions, the smaller lung never under 0.69 of the larger; the
other two outline one lung only), so removing everything else can only undo errors. The
same function runs on validation, test and `medx.predict` masks, so checkpoint selection on
`val/dice` sees what test and prediction get.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import torch

from medx.errors import ConfigError

PostProcess = Callable[[np.ndarray], np.ndarray]

LUNGS = 2  # components kept
MIN_FRACTION = 0.1  # a second component under this fraction of the largest is a speck


def keep_lungs(mask: np.ndarray) -> np.ndarray:
    """HxW {0,1} (or 0/255) uint8 → the two largest 8-connected regions, holes filled.

    A second region under a tenth of the largest is dropped: when the lungs merge into one
    region the next largest is a speck, not a lung.
    """
    binary = (mask > 0).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    if count <= 1:
        return np.zeros_like(mask)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(areas)[::-1][:LUNGS]
    keep = [k + 1 for k in order if areas[k] >= MIN_FRACTION * areas[order[0]]]
    return fill_holes(np.isin(labels, keep)).astype(mask.dtype) * mask.max()


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Bool HxW: background regions that do not touch the border become foreground."""
    background = (~mask).astype(np.uint8)
    count, labels = cv2.connectedComponents(background, connectivity=4)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    enclosed = np.setdiff1d(np.arange(1, count), border)
    return mask | np.isin(labels, enclosed)


POSTPROCESS: dict[str, PostProcess | None] = {"none": None, "lungs": keep_lungs}


def make_postprocess(name: str) -> PostProcess | None:
    """The function for a `model.postprocess` name (None: masks are used as thresholded)."""
    if name not in POSTPROCESS:
        raise ConfigError(
            f"Unknown model.postprocess={name!r}; choices: {', '.join(POSTPROCESS)} "
            "(lungs: keep the two largest regions and fill their holes)."
        )
    return POSTPROCESS[name]


def apply_to_batch(fn: PostProcess | None, masks: torch.Tensor) -> torch.Tensor:
    """N x 1 x H x W {0,1} tensor through `fn` image by image (unchanged when fn is None)."""
    if fn is None:
        return masks
    done = [fn(m[0].to(torch.uint8).cpu().numpy()) for m in masks]
    return torch.from_numpy(np.stack(done)[:, None]).to(masks.device, masks.dtype)
