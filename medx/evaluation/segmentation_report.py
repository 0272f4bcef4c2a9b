"""`SegmentationReport`: the pictures and the per-image table of a segmentation run.

A Lightning Callback, as `ClinicalEvaluation` is for classifiers: the `SegmentationModule`
computes the scores and keeps the cases worth showing (`module.results`, see
`medx.models.segmentation.EpochResults`); this callback draws and writes them, under the
trainer's `default_root_dir` and as MLflow artifacts:

- `overlays/val_epochNNN.png` after every validation epoch, `overlays/test.png` after testing:
  the first `model.overlay_images` images of the split, truth in green, prediction in red;
- `overlays/test_worst.png`: the five test images with the lowest Dice;
- `test_dice.csv`: Dice, IoU and accuracy of every test image, worst first.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback

from medx.evaluation.overlays import overlay, save_grid
from medx.models.segmentation import PER_IMAGE, WORST, Case, EpochResults
from medx.tracking import runs

log = logging.getLogger(__name__)

OVERLAY_DIR = "overlays"  # the folder in the run dir and in the MLflow run
CSV_NAME = "test_dice.csv"


class SegmentationReport(Callback):
    """Overlay grids per validation epoch and after test, the worst-5 panel and
    `test_dice.csv`; does nothing for modules without segmentation `results`."""

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the module's on_validation_epoch_end (Lightning calls callbacks' epoch-end
        # hooks before the module's), so this epoch's results are complete here
        results = _results(trainer, pl_module, "val")
        if results is None or trainer.sanity_checking or trainer.fast_dev_run:
            return
        if results.shown:
            name = f"val_epoch{results.epoch:03d}"
            grid = _grid(trainer, "val", results.shown, name)
            runs.log_artifacts(trainer.loggers, [grid], artifact_path=OVERLAY_DIR)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results = _results(trainer, pl_module, "test")
        if results is None:
            return
        table = write_table(Path(trainer.default_root_dir) / CSV_NAME, results, _names(trainer))
        if trainer.fast_dev_run:
            return
        runs.log_artifacts(trainer.loggers, [table])
        grids = []
        if results.shown:
            grids.append(_grid(trainer, "test", results.shown, "test"))
        if results.worst:
            grids.append(_grid(trainer, "test", results.worst, "test_worst"))
        runs.log_artifacts(trainer.loggers, grids, artifact_path=OVERLAY_DIR)


def write_table(path: Path, results: EpochResults, names: Sequence[str] | None) -> Path:
    """Per-image scores, worst Dice first; logs the median and the worst images."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dice = results.scores["dice"]
    order = dice.argsort().tolist()
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", *PER_IMAGE])
        for k in order:
            scores = [f"{float(results.scores[m][k]):.4f}" for m in PER_IMAGE]
            writer.writerow([_name(names, int(results.index[k])), *scores])
    worst = ", ".join(
        f"{_name(names, int(results.index[k]))} {float(dice[k]):.3f}" for k in order[:WORST]
    )
    log.info("test Dice: median %.4f; worst: %s", float(dice.median()), worst)
    return path


def tile(case: Case) -> np.ndarray:
    """The case's [0, 1] image as RGB uint8 with the truth and prediction outlines."""
    image = (case.image.clamp(0, 1) * 255).byte()
    if image.shape[0] == 1:  # grayscale models: draw the outlines in colour all the same
        image = image.expand(3, -1, -1)
    rgb = image.permute(1, 2, 0).numpy()
    return overlay(rgb, case.truth[0].numpy(), case.prediction[0].numpy())


def _results(trainer: L.Trainer, module: L.LightningModule, stage: str) -> EpochResults | None:
    if not trainer.is_global_zero:  # one report per job, as for the MLflow run
        return None
    if getattr(module, "task", None) != "segmentation":
        return None
    return getattr(module, "results", {}).get(stage)


def _grid(trainer: L.Trainer, stage: str, cases: Sequence[Case], name: str) -> Path:
    names = _names(trainer, stage)
    captions = [f"{_name(names, c.index)[:24]} D={c.dice:.3f}" for c in cases]
    path = Path(trainer.default_root_dir) / OVERLAY_DIR / f"{name}.png"
    return save_grid([tile(c) for c in cases], captions, path)


def _names(trainer: L.Trainer, stage: str = "test") -> Sequence[str] | None:
    """File names of the split's images, when the datamodule has `splits` (else `#i`)."""
    splits = getattr(trainer.datamodule, "splits", None) or {}
    images = getattr(splits.get(stage), "images", None)
    return [p.name for p in images] if images is not None else None


def _name(names: Sequence[str] | None, i: int) -> str:
    return names[i] if names is not None and i < len(names) else f"#{i}"
