"""Issue 5's one-line comparison: a feature baseline and a CNN in one sweep, one MLflow run each."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient


@pytest.mark.slow
def test_quality_sweep_gives_comparable_baseline_and_cnn_runs(tmp_path: Path, phantom_cache: Path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "medx.train",
            "-m",
            "data=quality",
            "model=quality_logreg,resnet18",
            "data.n_patients=30",
            "data.image_size=48",
            "data.num_workers=0",
            "trainer.max_epochs=1",
            "callbacks.rich_progress_bar=null",
            "trainer.enable_progress_bar=false",
            "logger.experiment_name=quality",
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
    experiment = client.get_experiment_by_name("quality").experiment_id
    everything = client.search_runs([experiment])
    (parent,) = [r for r in everything if r.data.tags.get("medx.sweep") == "parent"]
    runs = [r for r in everything if r is not parent]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    assert {r.info.run_name for r in runs} == {"model=quality_logreg", "model=resnet18"}
    assert {r.info.status for r in runs} == {"FINISHED"}
    names = [{k for k in r.data.metrics if k.startswith(("val/", "test/"))} for r in runs]
    # the same metric names side by side (a ratio like NPV is left out where it is 0/0)
    core = {
        "val/auroc",
        "val/acc",
        "test/acc",
        "test/auroc",
        "test/f1",
        "test/sensitivity",
        "test/specificity",
        "test/auroc_ci_low",
        "test/auroc_ci_high",
    }
    assert core <= names[0] and core <= names[1]
    counts = [
        {k: v for k, v in r.data.params.items() if k.startswith("dataset.counts")} for r in runs
    ]
    assert counts[0] == counts[1]  # the same splits for both
    for run in runs:  # the same report files too (medx.evaluation), named by quality class
        files = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
        assert {"evaluation/confusion_matrix.png", "evaluation/classification_report.txt"} <= files
        report = client.download_artifacts(run.info.run_id, "evaluation/classification_report.txt")
        lines = Path(report).read_text().splitlines()  # scikit-learn's layout
        assert lines[0].split() == ["precision", "recall", "f1-score", "support"]
        assert {"good", "bad", "macro"} <= {line.split()[0] for line in lines if line.strip()}
