"""Overlay pictures: an image with the true mask's outline and the predicted mask's outline.

Outlines instead of filled masks keep the anatomy underneath visible; green is the truth, red
the prediction, so where they part is where the model is wrong. Tiles are written as one PNG
grid per call, captioned with each image's Dice, for MLflow and the run's output folder.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from medx.errors import DataError

TRUTH, PREDICTION = (0, 200, 0), (230, 30, 30)  # RGB


def overlay(image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 image with the outlines of `truth` (green) and `pred` (red) drawn on it."""
    out = np.ascontiguousarray(image.copy())
    thickness = max(1, round(min(out.shape[:2]) / 128))
    for mask, colour in ((truth, TRUTH), (pred, PREDICTION)):
        if mask is None:
            continue
        contours, _ = cv2.findContours(
            (mask > 0).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
        )
        cv2.drawContours(out, contours, -1, colour, thickness)
    return out


def save_grid(tiles: Sequence[np.ndarray], captions: Sequence[str], path: Path) -> Path:
    """Write tiles (same size, RGB uint8) as one captioned grid PNG; returns `path`."""
    if not tiles:
        raise ValueError("save_grid needs at least one tile")
    h, w = tiles[0].shape[:2]
    scale = max(1, 192 // max(h, w))  # small inputs are enlarged so outlines stay readable
    cols = min(4, len(tiles))
    rows = math.ceil(len(tiles) / cols)
    bar = 18
    grid = np.full((rows * (h * scale + bar), cols * w * scale, 3), 255, np.uint8)
    for i, (tile, caption) in enumerate(zip(tiles, captions, strict=True)):
        r, c = divmod(i, cols)
        y, x = r * (h * scale + bar), c * w * scale
        big = cv2.resize(tile, (w * scale, h * scale), interpolation=cv2.INTER_NEAREST)
        grid[y + bar : y + bar + h * scale, x : x + w * scale] = big
        cv2.putText(
            grid, caption[:40], (x + 2, y + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        raise DataError(f"Could not write {path}; check that the folder is writable.")
    return path
