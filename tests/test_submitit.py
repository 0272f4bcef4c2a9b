"""`-m hydra/launcher=submitit_local`: every job in its own submitit process, nested in MLflow."""

from __future__ import annotations

from pathlib import Path

import pytest
from medx_cli import run_train, store, sweep_runs
from mlflow import MlflowClient


@pytest.mark.slow
def test_submitit_jobs_are_finished_child_runs_of_one_parent(tmp_path: Path, phantom_cache: Path):
    out = run_train(
        tmp_path,
        phantom_cache,
        "hydra/launcher=submitit_local",
        "hydra.launcher.timeout_min=10",
        "optimizer.lr=1e-3,3e-3",
        "logger.experiment_name=submitit",
        multirun=True,
    )
    job_logs = "".join(p.read_text() for p in tmp_path.glob("multirun/*/*/.submitit/*/*.err"))
    assert out.returncode == 0, out.stderr[-3000:] + job_logs[-3000:]

    parent, jobs = sweep_runs(tmp_path, "submitit")
    assert len(jobs) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in jobs} == {parent.info.run_id}
    assert {r.info.status for r in [*jobs, parent]} == {"FINISHED"}
    assert sorted(float(r.data.params["optimizer.lr"]) for r in jobs) == [1e-3, 3e-3]
    assert all("test/auroc" in r.data.metrics for r in jobs)
    # submitit ran them, each in a process of its own that left its result and logs
    assert len(list(tmp_path.glob("multirun/*/*/.submitit/*/*_result.pkl"))) == 2
    artifacts = {a.path for a in MlflowClient(store(tmp_path)).list_artifacts(parent.info.run_id)}
    assert "leaderboard.csv" in artifacts
