"""The default run (`make train`, no overrides) from a cold start: wall time and val AUROC.

Targets (issue 2): finishes in <= 180 s on a 2-core CPU with val AUROC >= 0.90.
Usage: python benchmarks/default_run.py [extra overrides...]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow import MlflowClient

TARGET_SECONDS, TARGET_AUROC = 180.0, 0.90


def main(overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as home:  # cold: the phantom is generated too
        uri = f"sqlite:///{home}/mlflow.db"
        env = {**os.environ, "MEDX_HOME": home, "MLFLOW_TRACKING_URI": uri}
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "medx.train",
                "trainer.enable_progress_bar=false",
                "callbacks.rich_progress_bar=null",
                *overrides,
            ],
            check=True,
            env=env,
            cwd=home,
            stdout=subprocess.DEVNULL,
        )
        seconds = time.perf_counter() - start
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("medx").experiment_id])
        history = client.get_metric_history(run.info.run_id, "val/auroc")
        best_val = max(m.value for m in history)
        metrics = run.data.metrics
        epochs = len(history)
    print(f"default run ({Path(sys.executable).name}, {os.cpu_count()} CPUs), {epochs} epochs")
    print(
        f"  wall time      {seconds:7.1f} s   target <= {TARGET_SECONDS:.0f} s   "
        f"ratio {seconds / TARGET_SECONDS:.2f}"
    )
    print(
        f"  best val AUROC {best_val:7.4f}     target >= {TARGET_AUROC:.2f}      "
        f"ratio {best_val / TARGET_AUROC:.3f}"
    )
    for key in ("test/auroc", "test/acc", "test/sensitivity", "test/specificity"):
        print(f"  {key:<16} {metrics[key]:.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
