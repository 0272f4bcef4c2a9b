"""What Grad-CAM and test-time augmentation cost, as multiples of a plain prediction.

Times the model alone on tensors already in memory (no decoding): a plain forward, Grad-CAM
(forward + backward to the target layer, CAMs resized to the input) and TTA over the default
views, each the median of a few runs after a warm-up. `cost` is the helper a predict benchmark
calls with its own model and batch.
Usage: python benchmarks/explain_cost.py [backbone] [image_size] [batch] [threads]
(defaults: resnet18 224 8 1).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch

from medx.evaluation.explain import grad_cam
from medx.evaluation.tta import DEFAULT_VIEWS, tta_probs
from medx.models.classifier import ClassificationModule


def _median_seconds(step: Callable[[], object], repeats: int) -> float:
    step()  # warm-up: first-call allocations, lazy imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cost(module: torch.nn.Module, x: torch.Tensor, repeats: int = 5) -> dict[str, float]:
    """Seconds per image of a plain forward, Grad-CAM and TTA on batch `x`, and the ratios."""
    module.eval()

    def plain() -> None:
        with torch.inference_mode():
            module(x)

    def explain() -> None:
        grad_cam(module, x)

    def augmented() -> None:
        with torch.inference_mode():
            tta_probs(module, x, DEFAULT_VIEWS)

    per_image = {
        name: _median_seconds(step, repeats) / len(x)
        for name, step in (("forward", plain), ("gradcam", explain), ("tta", augmented))
    }
    return {
        **{f"{k}_s_per_image": v for k, v in per_image.items()},
        "gradcam_x_forward": per_image["gradcam"] / per_image["forward"],
        "tta_x_forward": per_image["tta"] / per_image["forward"],
        "tta_views": float(len(DEFAULT_VIEWS)),
    }


def main(backbone: str = "resnet18", size: int = 224, batch: int = 8, threads: int = 1) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    module = ClassificationModule(backbone=backbone, num_classes=2)
    x = torch.rand(batch, 3, size, size)
    result = cost(module, x)
    print(f"{backbone} at {size} px, batch {batch}, {threads} thread(s):")
    for key, value in result.items():
        print(f"  {key:22s} {value:.4g}")


if __name__ == "__main__":
    args = sys.argv[1:]
    main(*(args[:1]), *(int(a) for a in args[1:4]))
