"""Cost of the clinical evaluation's statistics against a training epoch, at 624 and 25,000
test predictions (Kermany's test set; a ChestX-ray14-sized one).

Times what `medx.evaluation.callback.clinical_report` computes after testing: the point
metrics, the 1,000-resample bootstrap CIs (twice: at argmax and at the operating point), the
operating threshold, the temperature fit on validation logits and the calibration errors; then
the whole report with its figures and CSV. The epoch it is compared with trains resnet18 at
224 px on as many images as there are test predictions (batch 32, AdamW, measured here on a
few steps): real training sets are larger than their test sets, so the share printed is an
upper bound. Goal (issue 14): the statistics take < 10 % of that epoch.
Usage: python benchmarks/evaluation_cost.py [--sizes 624 25000] [--bootstrap 1000]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timing import best_of  # benchmarks/timing.py

from medx.evaluation import calibration, metrics
from medx.evaluation.callback import Predictions, clinical_report

GOAL = 0.10


def synthetic(n: int, seed: int) -> Predictions:
    """Binary logits of a decent, slightly over-confident model (AUROC about 0.9)."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.62).astype(np.int64)  # Kermany's test prevalence
    margin = rng.normal(2.5 * (2 * labels - 1), 2.0)
    logits = np.stack([-margin / 2, margin / 2], axis=1)
    return Predictions(logits, labels)


def peak_mb(function: Callable[[], object]) -> float:
    """Peak memory that Python and NumPy allocate during one call, in MB."""
    tracemalloc.start()
    function()
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return peak


def statistics(val: Predictions, test: Predictions, n_boot: int) -> dict[str, Callable]:
    """The clinical report's computations, each as one call."""
    probs = test.probs
    threshold = metrics.threshold_for_sensitivity(val.labels, val.probs[:, 1], 0.95)
    return {
        "point metrics": lambda: metrics.classification_metrics(test.labels, probs),
        "bootstrap CIs": lambda: metrics.bootstrap_ci(test.labels, probs, n_boot, 0),
        "bootstrap CIs at op": lambda: metrics.bootstrap_ci(
            test.labels, probs, n_boot, 0, threshold=threshold
        ),
        "temperature fit": lambda: calibration.fit_temperature(val.logits, val.labels),
        "calibration errors": lambda: calibration.reliability(test.labels, probs).ece,
    }


def epoch_seconds(images: int, size: int = 224, batch: int = 32, steps: int = 3) -> float:
    """Seconds to train resnet18 on `images` images here, from a few timed steps."""
    net = timm.create_model("resnet18", num_classes=2)
    optimizer = torch.optim.AdamW(net.parameters())
    x, y = torch.rand(batch, 3, size, size), torch.randint(0, 2, (batch,))

    def step() -> None:
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up
    return best_of(step, steps) / batch * images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[624, 25_000])
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"evaluation cost ({os.cpu_count()} CPUs, load average {load:.1f}; best of 3)")
    per_image = epoch_seconds(1)
    for n in args.sizes:
        val, test = synthetic(n, seed=1), synthetic(n, seed=2)
        epoch = per_image * n
        print(f"\n{n} test predictions (and {n} validation ones), {args.bootstrap} resamples")
        total = 0.0
        for name, function in statistics(val, test, args.bootstrap).items():
            seconds, peak = best_of(function), peak_mb(function)
            total += seconds
            print(f"  {name:<20} {seconds:8.3f} s   peak {peak:7.1f} MB")
        print(
            f"  {'statistics':<20} {total:8.3f} s   = {total / epoch:.2%} of an epoch "
            f"({epoch:.0f} s: resnet18, 224 px, {n} images)   goal < {GOAL:.0%}"
        )
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            clinical_report(val, test, Path(out), ["NORMAL", "PNEUMONIA"], n_boot=args.bootstrap)
            report = time.perf_counter() - start
        print(
            f"  {'whole report':<20} {report:8.3f} s   (with figures and the CSV)   "
            f"= {report / epoch:.2%} of an epoch"
        )
    if load > (os.cpu_count() or 1):
        print(
            "\nmeasured under load (load average above the CPU count): shares are of an "
            "epoch measured under the same load"
        )


if __name__ == "__main__":
    main()
