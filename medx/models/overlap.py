"""Overlap metrics of binary masks, per image: Dice, IoU (Jaccard) and pixel accuracy.

Per image, then averaged over images (not pooled over all pixels): a small lung that is
missed counts as much as a large one, which is what a clinician looking at one image sees.
An image whose truth and prediction are both empty scores 1 (nothing to find, nothing found).
`pooled_dice` is the other convention (one Dice over every pixel of the split, which weights
images by lung area), reported alongside so that figures from either kind of paper compare.
"""

from __future__ import annotations

import torch


def overlap_scores(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """pred, target: N x ... tensors of {0, 1}; returns per-image `dice`, `iou`, `accuracy`
    and the pixel counts `tp`, `fp`, `fn` (for `pooled_dice`)."""
    p = pred.reshape(len(pred), -1).bool()
    t = target.reshape(len(target), -1).bool()
    tp = (p & t).sum(1).double()
    fp = (p & ~t).sum(1).double()
    fn = (~p & t).sum(1).double()
    union = tp + fp + fn
    empty = union == 0
    dice = torch.where(empty, 1.0, 2 * tp / (2 * tp + fp + fn).clamp(min=1))
    iou = torch.where(empty, 1.0, tp / union.clamp(min=1))
    accuracy = (p == t).double().mean(1)
    scores = {"dice": dice, "iou": iou, "accuracy": accuracy, "tp": tp, "fp": fp, "fn": fn}
    return {k: v.float() for k, v in scores.items()}


def pooled_dice(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
    """One Dice over all pixels of all images (per-image counts in); 1 when all are empty."""
    tp, fp, fn = tp.double().sum(), fp.double().sum(), fn.double().sum()
    if tp + fp + fn == 0:
        return torch.tensor(1.0)
    return (2 * tp / (2 * tp + fp + fn)).float()
