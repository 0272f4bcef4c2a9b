"""Lung segmentation on real chest X-rays ($MEDX_DATA/lung_seg): test Dice/IoU and wall time.

Trains from scratch (no internet, so no ImageNet encoder) on the 73 images, with val and test
carved out by patient (metadata.csv), then tests the best checkpoint. Target (issue 4): test
Dice >= 0.95.
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
RECIPE = [
    "model=unet",
    "data=lung_seg",
    "model.encoder=resnet18",
    "model.zscore=true",
    "data.image_size=128",
    "data.batch_size=8",
    "data.augment=light",
    "trainer.max_epochs=30",
    "callbacks.early_stopping.patience=10",
    "callbacks.rich_progress_bar=null",
    "trainer.enable_progress_bar=false",
]


def main(overrides: list[str]) -> None:
    if not os.environ.get("MEDX_DATA"):
        sys.exit("Set MEDX_DATA to the folder that holds lung_seg/.")
    with tempfile.TemporaryDirectory() as home:
        uri = f"sqlite:///{home}/mlflow.db"
        env = {**os.environ, "MEDX_HOME": home, "MLFLOW_TRACKING_URI": uri}
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "medx.train", *RECIPE, *overrides],
            check=True,
            env=env,
            cwd=home,
            stdout=subprocess.DEVNULL,
        )
        seconds = time.perf_counter() - start
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("medx").experiment_id])
        epochs = len(client.get_metric_history(run.info.run_id, "val/dice"))
        metrics, params = run.data.metrics, run.data.params
    dice = metrics["test/dice"]
    print(f"lung_seg: {' '.join(RECIPE[:-2] + overrides)}")
    print(
        f"  {os.cpu_count()} CPUs, {epochs} epochs, test {params['dataset.counts.test.images']} "
        f"images / {params['dataset.counts.test.patients']} patients"
    )
    print(f"  wall time        {seconds:7.1f} s")
    ratio = dice / TARGET_DICE
    print(f"  test Dice        {dice:7.4f}   target >= {TARGET_DICE:.2f}   ratio {ratio:.3f}")
    for key in ("test/iou", "test/accuracy", "test/dice_median", "test/dice_worst5"):
        print(f"  {key:<16} {metrics[key]:7.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
