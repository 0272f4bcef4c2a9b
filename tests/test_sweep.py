"""A real `-m` sweep from the command line: one parent MLflow run, one child run per job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient


@pytest.mark.slow
def test_two_by_two_sweep_gives_a_parent_and_four_child_runs(tmp_path: Path, phantom_cache: Path):
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
            "trainer.max_epochs=3",
            "trainer.max_epochs=1",  # given twice: the last wins, in Hydra and on the parent
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
    every = client.search_runs([client.get_experiment_by_name("sweep").experiment_id])
    (parent,) = [r for r in every if r.data.tags.get("medx.sweep") == "parent"]
    runs = [r for r in every if r is not parent]
    assert len(runs) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.strategy"] == "freeze,full"
    assert parent.data.params["sweep.trainer.max_epochs"] == "1"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "overrides.yaml"} <= artifacts
    assert not any(k.endswith("_mean") for k in parent.data.metrics)  # no data.fold swept
    assert {r.info.status for r in runs} == {"FINISHED"}
    combos = {(r.data.params["strategy.name"], r.data.params["optimizer._target_"]) for r in runs}
    assert len(combos) == 4
    assert all("test/auroc" in r.data.metrics for r in runs)
    assert len(list((tmp_path / "multirun").glob("*/*/[0-3]"))) == 4
