"""Binary segmentation LightningModule: smp network, strategy, per-image Dice/IoU.

Validation and test keep, per epoch, what the report needs (`EpochResults`: per-image scores,
the first `overlay_images` cases and the worst test cases as small CPU tensors); the
`SegmentationReport` callback in `medx.evaluation.segmentation_report` draws and writes them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from segmentation_models_pytorch import losses
from torch import nn

from medx.errors import ConfigError
from medx.models.base import Optimizer, Scheduler, TransferModule
from medx.models.overlap import overlap_scores, pooled_dice
from medx.models.postprocess import apply_to_batch, make_postprocess
from medx.models.segmentation_nets import create_segmenter
from medx.models.strategy import Strategy

log = logging.getLogger(__name__)

WORST = 5  # worst test images reported by name and drawn
PER_IMAGE = ("dice", "iou", "accuracy")  # averaged over images: val/dice, test/dice, ...
COUNTS = ("tp", "fp", "fn")  # pixel counts per image, for test/dice_pooled


@dataclass
class Case:
    """One image kept for the report: its index in the split, its Dice, and CPU copies of the
    [0, 1] image (C x H x W), the true and the predicted {0, 1} mask (1 x H x W)."""

    index: int
    dice: float
    image: torch.Tensor
    truth: torch.Tensor
    prediction: torch.Tensor

    @classmethod
    def of(
        cls, index: int, dice: float, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor
    ) -> Case:
        """Copies, not views, so a kept case does not hold its whole batch in memory."""
        image, truth, prediction = (t.detach().cpu().clone() for t in (x, y, pred))
        return cls(index, dice, image, truth, prediction)


@dataclass
class EpochResults:
    """One validation or test epoch: per-image scores in split order of `index`."""

    stage: str
    epoch: int
    index: torch.Tensor  # (n,) positions in the split, for image names
    scores: dict[str, torch.Tensor]  # PER_IMAGE + COUNTS, each (n,)
    shown: list[Case] = field(default_factory=list)  # index < overlay_images, by index
    worst: list[Case] = field(default_factory=list)  # test: the WORST lowest Dice, worst first


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
    """Lung (or any binary) masks; the strategies freeze encoder blocks as for classifiers.

    The `model=` choices `unet`, `unetplusplus`, `fpn` and `deeplabv3plus` build it
    (segmentation-models-pytorch, one output channel); `forward` takes [0, 1] images and
    returns mask logits.

    Args:
        arch: the smp architecture (`unet`, `unetplusplus`, `fpn`, `deeplabv3plus`).
        encoder: any smp encoder (`resnet18`, `resnet34`, `efficientnet-b0`, ...) or
            `tu-<timm name>`.
        pretrained: ImageNet encoder weights through smp (needs the network).
        weights: the encoder from a timm/torchvision state dict or a medx checkpoint (e.g. a
            classifier with the same backbone).
        loss: `dice`, `bce`, `dice_bce` or `focal` (smp's losses).
        zscore: standardise each input image on its own (mean 0, std 1).
        xavier_init: Xavier-initialise decoder and head when not pretrained.
        arch_kwargs: more smp arguments, e.g. `{decoder_channels: [128, 64, 32, 16, 8]}`.
        image_size: the data's input size, saved with the hyper-parameters.
        threshold: probability at or above which a pixel is foreground.
        postprocess: `none` or `lungs` (keep the two largest regions, fill their holes),
            applied wherever masks are made (val, test, overlays, prediction).
        overlay_images: how many val/test images the report draws each epoch.
        compile: `torch.compile` the network when fitting.
        strategy: which encoder blocks train and at which LR (`strategy=` group).
        optimizer: a partial optimizer, completed with the parameter groups.
        scheduler: a partial LR scheduler, completed with the optimizer.
    """

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
        compile: bool = False,  # torch.compile the network when fitting (TransferModule)
        strategy: Strategy | dict | None = None,
        optimizer: Optimizer | None = None,
        scheduler: Scheduler | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "strategy"], logger=False)
        spec = create_segmenter(arch, encoder, pretrained, weights, xavier_init, arch_kwargs)
        self.net = spec.model
        self.use_normalisation(spec.mean, spec.std)
        self.use_strategy(
            strategy, optimizer, scheduler, spec.blocks, spec.head, pretrained or bool(weights)
        )
        self.loss_fn = make_loss(loss)
        self.zscore, self.threshold, self.overlay_images = zscore, threshold, overlay_images
        self.postprocess = make_postprocess(postprocess)
        self._epoch: dict[str, Any] = {}
        self.results: dict[str, EpochResults] = {}  # by stage, the last epoch's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N x 1 x H x W) of [0, 1] images. `zscore`: each image standardised on its
        own, which evens out exposure differences between X-ray sources that one global
        mean/std cannot."""
        x = self.normalise(x)
        if self.zscore:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) / x.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
        return self.net(x)

    def predict_masks(self, x: torch.Tensor) -> torch.Tensor:
        """Foreground probabilities (N x 1 x H x W) of [0, 1] images."""
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

    # --- validation and test: per-image scores, a fixed set of cases, the worst cases ---
    # The module computes and keeps; `medx.evaluation.segmentation_report` draws and writes.

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
        self._epoch = {"index": [], "shown": [], "worst": []}
        self._epoch.update({k: [] for k in PER_IMAGE + COUNTS})
        self.results.pop(stage, None)

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
                self._epoch["shown"].append(Case.of(i, dice, x[j], y[j], pred[j]))
            if stage == "test":
                self._keep_worst(i, dice, x[j], y[j], pred[j])

    def _keep_worst(
        self, i: int, dice: float, x: torch.Tensor, y: torch.Tensor, pred: torch.Tensor
    ) -> None:
        worst = self._epoch["worst"]
        if len(worst) < WORST or dice < worst[-1].dice:
            worst.append(Case.of(i, dice, x, y, pred))
            worst.sort(key=lambda case: case.dice)
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
        self.results[stage] = EpochResults(
            stage=stage,
            epoch=self.current_epoch,
            index=torch.cat(self._epoch["index"]),
            scores=scores,
            shown=sorted(self._epoch["shown"], key=lambda case: case.index),
            worst=list(self._epoch["worst"]),
        )
