"""Test-time augmentation: a classifier's mean class probability over a few safe views.

Only views a chest radiograph can meet in practice: a little closer or farther (zoom), a little
off-centre (shift), exposed a little differently (gamma). Never a horizontal flip: the heart
lies on the patient's left, and a mirrored film is another (abnormal, or mislabelled) image,
not the same one. The views are fixed, so a prediction is reproducible.

As in `medx.evaluation.ensemble`, probabilities are averaged, not logits, and `tta_logits`
returns the log of the mean probability, so its softmax is that mean: everything that reads
logits (test metrics, the clinical evaluation, temperature scaling) evaluates TTA as it would
one model. Inputs are [0, 1] images, the contract of every medx module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from medx.errors import ConfigError
from medx.models.classifier import TEST_METRICS, ClassifierSteps, classification_metrics


@dataclass(frozen=True)
class View:
    """One deterministic view of a batch of [0, 1] images.

    Args:
        name: how the view is reported.
        zoom: > 1 magnifies about the centre (the borders leave the frame), < 1 shrinks (the
            border pixels are repeated into the gap). Positive: a negative zoom would flip.
        shift: (right, down) translation as fractions of the width and height.
        gamma: exposure, pixel ** gamma (< 1 brighter, > 1 darker); 0 and 1 stay put.
    """

    name: str
    zoom: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)
    gamma: float = 1.0

    def __post_init__(self) -> None:
        if not 0.5 <= self.zoom <= 2.0:
            raise ConfigError(f"TTA view {self.name!r}: zoom={self.zoom} must be in [0.5, 2]")
        if len(self.shift) != 2 or max(abs(s) for s in self.shift) > 0.25:
            raise ConfigError(
                f"TTA view {self.name!r}: shift={self.shift} must be two fractions in "
                "[-0.25, 0.25] (right, down)"
            )
        if not 0.25 <= self.gamma <= 4.0:
            raise ConfigError(f"TTA view {self.name!r}: gamma={self.gamma} must be in [0.25, 4]")

    @property
    def geometric(self) -> bool:
        return self.zoom != 1.0 or any(self.shift)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The view of an (N, C, H, W) batch; the identity returns `x` itself."""
        if self.geometric:
            s, (dx, dy) = 1 / self.zoom, self.shift
            # affine_grid maps output to input coordinates in [-1, 1]: in = (out - 2*shift) / zoom
            theta = torch.tensor(
                [[s, 0.0, -2 * dx * s], [0.0, s, -2 * dy * s]], dtype=x.dtype, device=x.device
            ).expand(len(x), 2, 3)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.gamma != 1.0:
            x = x.clamp(0, 1).pow(self.gamma)
        return x


IDENTITY = View("identity")
# 7 forward passes per image. Shifts of 4 % and zooms of 10 % stay within what positioning
# varies by, and within the training augmentations (data.augment=light: crops to 85 %, 7°).
DEFAULT_VIEWS: tuple[View, ...] = (
    IDENTITY,
    View("zoom_in", zoom=1.1),
    View("zoom_out", zoom=0.9),
    View("shift_right_down", shift=(0.04, 0.04)),
    View("shift_left_up", shift=(-0.04, -0.04)),
    View("brighter", gamma=0.8),
    View("darker", gamma=1.25),
)


def tta_probs(
    module: nn.Module,
    x: torch.Tensor,
    views: Sequence[View] = DEFAULT_VIEWS,
    identity: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, num_classes) mean over `views` of the softmax of `module` (class logits) on each.

    The views run one after another (memory of one batch, not len(views) batches).

    Args:
        module: a classifier ([0, 1] images in, class logits out).
        x: the batch.
        views: the views averaged.
        identity: the logits of `x` itself when already computed (the inference core's
            pass that also gave the shift monitor its features): the IDENTITY view reuses
            them instead of running the model again.
    """
    if not views:
        raise ConfigError("test-time augmentation needs at least one view (e.g. IDENTITY)")
    total = None
    for view in views:
        logits = identity if view == IDENTITY and identity is not None else module(view(x))
        probs = torch.softmax(logits.float(), dim=1)
        total = probs if total is None else total + probs
    return total / len(views)


def tta_logits(
    module: nn.Module,
    x: torch.Tensor,
    views: Sequence[View] = DEFAULT_VIEWS,
    identity: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log of `tta_probs`: logits-like, their softmax is the mean probability."""
    return tta_probs(module, x, views, identity).clamp_min(1e-12).log()


class TestTimeAugmentation(ClassifierSteps, L.LightningModule):
    """Test-only wrapper whose `forward` is `tta_logits` of a trained classifier ([0, 1]
    images in), for `Trainer.test` and the clinical evaluation (`eval.tta=true`)."""

    __test__ = False  # not a pytest test class, whatever its name
    task = "classification"

    def __init__(
        self, model: nn.Module, num_classes: int, views: Sequence[View] = DEFAULT_VIEWS
    ) -> None:
        super().__init__()
        self.model = model
        self.views = tuple(views)
        self.criterion = nn.NLLLoss()  # on the log mean probability: the TTA prediction's NLL
        self.test_metrics = classification_metrics(num_classes, TEST_METRICS, "test/")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return tta_logits(self.model, x, self.views)
