"""A real `-m` sweep from the command line: one MLflow run per job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient


@pytest.mark.slow
def test_two_by_two_sweep_gives_four_runs(tmp_path: Path, phantom_cache: Path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "medx.train",
            "-m",
            "strategy=freeze,full",
            "optimizer=adamw,sgd",
            "model.backbone=test_resnet",
            "data.n_patients=40",
            "data.image_size=48",
            "data.num_workers=0",
            "trainer.max_epochs=1",
            "callbacks.rich_progress_bar=null",
            "trainer.enable_progress_bar=false",
            "logger.experiment_name=sweep",
            f"paths.root_dir={tmp_path}",
            f"paths.cache_dir={phantom_cache}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]

    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    assert len(runs) == 4
    assert {r.info.status for r in runs} == {"FINISHED"}
    combos = {(r.data.params["strategy.name"], r.data.params["optimizer._target_"]) for r in runs}
    assert len(combos) == 4
    assert all("test/auroc" in r.data.metrics for r in runs)
    assert len(list((tmp_path / "multirun").glob("*/*/[0-3]"))) == 4
