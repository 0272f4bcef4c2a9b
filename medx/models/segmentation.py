"""Binary segmentation LightningModule: smp network, strategy, per-image Dice/IoU, overlays."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from segmentation_models_pytorch import losses
from torch import nn

from medx import tracking
from medx.errors import ConfigError
from medx.models.overlap import overlap_scores, pooled_dice
from medx.models.postprocess import apply_to_batch, make_postprocess
from medx.models.segmentation_nets import create_segmenter
from medx.models.strategy import Strategy
from medx.models.base import Optimizer, Scheduler, TransferModule
from medx.evaluation.overlays import overlay, save_grid

log = logging.getLogger(__name__)

WORST = 5  # worst test images reported by name and drawn
PER_IMAGE = ("dice", "iou", "accuracy")  # averaged over images: val/dice, test/dice, ...
COUNTS = ("tp", "fp", "fn")  # pixel counts per image, for test/dice_pooled


class DiceBCE(nn.Module):
    """Dice for overlap, BCE for well-behaved per-pixel gradients early on."""

    def __init__(self) -> None:
        super().__init__()
        self.dice = losses.DiceLoss(mode="binary", from_logits=True)
        self.bce = losses.SoftBCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, target) + self.bce(logits, target)


def make_loss(name: str) -> nn.Module:
    """smp's losses by medx name (logits in, {0,1} float masks as targets)."""
    build = {
        "dice": lambda: losses.DiceLoss(mode="binary", from_logits=True),
        "bce": losses.SoftBCEWithLogitsLoss,
        "dice_bce": DiceBCE,
        "focal": lambda: losses.FocalLoss(mode="binary"),
    }
    if name not in build:
        raise ConfigError(f"Unknown model.loss={name!r}; choices: {', '.join(build)}.")
    return build[name]()


class SegmentationModule(TransferModule):
    """Lung (or any binary) masks; the strategies freeze encoder blocks as for classifiers."""

    task = "segmentation"
    monitor, monitor_mode = "val/dice", "max"  # checkpoint selection when cfg.monitor is null

    def __init__(
        self,
        arch: str = "unet",
        encoder: str = "resnet34",
        pretrained: bool = False,
        weights: str | None = None,
        loss: str = "dice_bce",
        zscore: bool = False,
        xavier_init: bool = False,
        arch_kwargs: dict | None = None,
        image_size: int = 256,
        threshold: float = 0.5,
        postprocess: str = "none",
        overlay_images: int = 8,
        strategy: Strategy | dict | None = None,
        optimizer: Optimizer | None = None,
        scheduler: Scheduler | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "strategy"], logger=False)
        spec = create_segmenter(arch, encoder, pretrained, weights, xavier_init, arch_kwargs)
        self.net, self.mean, self.std = spec.model, spec.mean, spec.std
        self.use_strategy(
            strategy, optimizer, scheduler, spec.blocks, spec.head, pretrained or bool(weights)
        )
        self.loss_fn = make_loss(loss)
        self.zscore, self.threshold, self.overlay_images = zscore, threshold, overlay_images
        self.postprocess = make_postprocess(postprocess)
        self._epoch: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N x 1 x H x W). `zscore`: each image standardised on its own, which evens
        out exposure differences between X-ray sources that one global mean/std cannot."""
        if self.zscore:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) / x.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
        return self.net(x)

    def predict_masks(self, x: torch.Tensor) -> torch.Tensor:
        """Foreground probabilities (N x 1 x H x W) for normalised inputs."""
        return torch.sigmoid(self(x))

    def binarize(self, prob: torch.Tensor) -> torch.Tensor:
        """{0,1} masks from probabilities: thresholded, then `postprocess`ed (one place, so
        val/dice, test/dice and the overlays all score the masks users get)."""
        return apply_to_batch(self.postprocess, (prob >= self.threshold).float())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, _ = batch
        loss = self.loss_fn(self(x), y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(y))
        return loss

    # --- validation and test: per-image scores, a fixed set of overlays, worst cases ---

    def on_validation_epoch_start(self) -> None:
        self._start("val")

    def on_test_epoch_start(self) -> None:
        self._start("test")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_validation_epoch_end(self) -> None:
        self._end("val")

    def on_test_epoch_end(self) -> None:
        self._end("test")

    def _start(self, stage: str) -> None:
        self._epoch = {"stage": stage, "index": [], "shown": [], "worst": []}
        self._epoch.update({k: [] for k in PER_IMAGE + COUNTS})

    def _eval_step(self, stage: str, batch: Any) -> None:
        x, y, index = batch
        logits = self(x)
        self.log(f"{stage}/loss", self.loss_fn(logits, y), on_epoch=True, batch_size=len(y))
        pred = self.binarize(torch.sigmoid(logits)).to(y.dtype)
        scores = overlap_scores(pred, y)
        for key, values in scores.items():
            self._epoch[key].append(values.cpu())
        self._epoch["index"].append(index.cpu())
        for j, i in enumerate(index.tolist()):
            dice = float(scores["dice"][j])
            if i < self.overlay_images:
                self._epoch["shown"].append((i, dice, self._tile(x[j], y[j], pred[j])))
            if stage == "test":
                self._keep_worst(i, dice, x[j], y[j], pred[j])

    def _keep_worst(
        self, i: int, dice: float, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor
    ) -> None:
        worst = self._epoch["worst"]
        if len(worst) < WORST or dice < worst[-1][1]:
            worst.append((i, dice, self._tile(x, y, pred)))
            worst.sort(key=lambda item: item[1])
            del worst[WORST:]

    def _end(self, stage: str) -> None:
        if not self._epoch.get("index"):
            return
        scores = {k: torch.cat(self._epoch[k]) for k in PER_IMAGE + COUNTS}
        self.log_dict({f"{stage}/{k}": scores[k].mean() for k in PER_IMAGE}, prog_bar=True)
        if stage == "test":
            dice = scores["dice"]
            self.log(f"{stage}/dice_pooled", pooled_dice(*(scores[k] for k in COUNTS)))
            self.log(f"{stage}/dice_median", dice.median())
            self.log(f"{stage}/dice_worst{WORST}", dice.sort().values[:WORST].mean())
            self._report_test(torch.cat(self._epoch["index"]), scores)
        if not self.trainer.sanity_checking and not self.trainer.fast_dev_run:
            self._draw(stage)

    def _report_test(self, index: torch.Tensor, scores: dict[str, torch.Tensor]) -> None:
        """Per-image scores, worst first, as a CSV next to the checkpoints and in MLflow."""
        path = self._out_dir() / "test_dice.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        order = scores["dice"].argsort().tolist()
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image", *PER_IMAGE])
            for k in order:
                writer.writerow(
                    [self._name("test", int(index[k]))]
                    + [f"{float(scores[m][k]):.4f}" for m in PER_IMAGE]
                )
        worst = ", ".join(
            f"{self._name('test', int(index[k]))} {float(scores['dice'][k]):.3f}"
            for k in order[:WORST]
        )
        log.info("test Dice: median %.4f; worst: %s", float(scores["dice"].median()), worst)
        if not self.trainer.fast_dev_run:
            tracking.log_artifacts(self.loggers, [path])

    def _draw(self, stage: str) -> None:
        """Save overlay grids (fixed images; on test also the worst) and log them to MLflow."""
        grids = []
        shown = sorted(self._epoch["shown"], key=lambda item: item[0])
        name = f"val_epoch{self.current_epoch:03d}" if stage == "val" else "test"
        if shown:
            grids.append(self._grid(stage, shown, name))
        if stage == "test" and self._epoch["worst"]:
            grids.append(self._grid(stage, self._epoch["worst"], "test_worst"))
        tracking.log_artifacts(self.loggers, grids, artifact_path="overlays")

    def _grid(self, stage: str, items: list, name: str) -> Path:
        tiles = [tile for _, _, tile in items]
        captions = [f"{self._name(stage, i)[:24]} D={dice:.3f}" for i, dice, _ in items]
        return save_grid(tiles, captions, self._out_dir() / "overlays" / f"{name}.png")

    def _tile(self, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor) -> np.ndarray:
        mean = torch.tensor(self.mean, device=x.device)[:, None, None]
        std = torch.tensor(self.std, device=x.device)[:, None, None]
        image = ((x * std + mean).clamp(0, 1) * 255).byte().permute(1, 2, 0).cpu().numpy()
        return overlay(image, y[0].cpu().numpy(), pred[0].cpu().numpy())

    def _name(self, stage: str, i: int) -> str:
        splits = getattr(self.trainer.datamodule, "splits", None) or {}
        images = getattr(splits.get(stage), "images", None)
        return images[i].name if images is not None and i < len(images) else f"#{i}"

    def _out_dir(self) -> Path:
        return Path(self.trainer.default_root_dir)
