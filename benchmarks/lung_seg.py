"""Lung segmentation on real chest X-rays ($MEDX_DATA/lung_seg): test Dice/IoU and wall time.

Trains `experiment=lung_unet` from scratch (no internet, so no ImageNet encoder) on the 73
images, with val and test carved out by patient (metadata.csv), then tests the checkpoint
with the best val Dice. Target (issue 4): test Dice >= 0.95 (mean of per-image Dice).
Usage: MEDX_DATA=/path/to/data python benchmarks/lung_seg.py [extra overrides...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

from mlflow import MlflowClient

TARGET_DICE = 0.95
RECIPE = ["experiment=lung_unet"]  # conf/experiment/lung_unet.yaml
QUIET = ["callbacks.rich_progress_bar=null", "trainer.enable_progress_bar=false"]


def main(overrides: list[str]) -> None:
    if not os.environ.get("MEDX_DATA"):
        sys.exit("Set MEDX_DATA to the folder that holds lung_seg/.")
    with tempfile.TemporaryDirectory() as home:
        uri = f"sqlite:///{home}/mlflow.db"
        env = {**os.environ, "MEDX_HOME": home, "MLFLOW_TRACKING_URI": uri}
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "medx.train", *RECIPE, *QUIET, *overrides],
            check=True,
            env=env,
            cwd=home,
            stdout=subprocess.DEVNULL,
        )
        seconds = time.perf_counter() - start
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("medx").experiment_id])
        history = [m.value for m in client.get_metric_history(run.info.run_id, "val/dice")]
        metrics, params = run.data.metrics, run.data.params
    dice = metrics["test/dice"]
    print(f"lung_seg: {' '.join(RECIPE + overrides)}")
    images, patients = (params[f"dataset.counts.test.{k}"] for k in ("images", "patients"))
    print(f"  {os.cpu_count()} CPUs")
    print(f"  {len(history)} epochs, test: {images} images, {patients} patients")
    print(f"  wall time        {seconds:7.1f} s")
    best = max(range(len(history)), key=history.__getitem__)
    print(f"  best val Dice    {history[best]:7.4f}   (epoch {best}, selects the checkpoint)")
    print(f"  val Dice by epoch {' '.join(f'{v:.3f}' for v in history)}")
    ratio = dice / TARGET_DICE
    print(f"  test Dice        {dice:7.4f}   target >= {TARGET_DICE:.2f}   ratio {ratio:.3f}")
    print("  (Dice and IoU per image, then averaged over the test images; pooled: one Dice")
    print("   over all test pixels)")
    keys = ("test/dice_pooled", "test/iou", "test/accuracy", "test/dice_median", "test/dice_worst5")
    for key in keys:
        print(f"  {key:<16} {metrics[key]:7.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
