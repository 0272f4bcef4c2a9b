"""A real `-m` sweep from the command line: one parent MLflow run, one child run per job."""

from __future__ import annotations

from pathlib import Path

import pytest
from medx_cli import run_train, store, sweep_runs
from mlflow import MlflowClient


@pytest.mark.slow
def test_two_by_two_sweep_gives_a_parent_and_four_child_runs(tmp_path: Path, phantom_cache: Path):
    out = run_train(
        tmp_path,
        phantom_cache,
        "strategy=freeze,full",
        "optimizer=adamw,sgd",
        "trainer.max_epochs=3",
        "trainer.max_epochs=1",  # given again: the last wins, in Hydra and on the parent
        "logger.experiment_name=sweep",
        multirun=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]

    parent, runs = sweep_runs(tmp_path, "sweep")
    assert len(runs) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent.info.run_id}
    assert parent.info.status == "FINISHED"
    assert parent.data.params["sweep.strategy"] == "freeze,full"
    assert parent.data.params["sweep.trainer.max_epochs"] == "1"
    artifacts = {a.path for a in MlflowClient(store(tmp_path)).list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "overrides.yaml"} <= artifacts
    assert not any(k.endswith("_mean") for k in parent.data.metrics)  # no data.fold swept
    assert {r.info.status for r in runs} == {"FINISHED"}
    combos = {(r.data.params["strategy.name"], r.data.params["optimizer._target_"]) for r in runs}
    assert len(combos) == 4
    assert all("test/auroc" in r.data.metrics for r in runs)
    assert len(list((tmp_path / "multirun").glob("*/*/[0-3]"))) == 4


@pytest.mark.slow
def test_a_sweep_resumed_with_ckpt_path_last_continues_each_jobs_own_run(
    tmp_path: Path, phantom_cache: Path
):
    """Jobs are named by their swept values, so `ckpt_path=last` must find them by that name."""
    sweep = ["optimizer.lr=0.01,0.03", "logger.experiment_name=resumed"]
    first = run_train(tmp_path, phantom_cache, *sweep, multirun=True)
    assert first.returncode == 0, first.stderr[-3000:]
    _, before = sweep_runs_all(tmp_path, "resumed")

    again = run_train(
        tmp_path, phantom_cache, *sweep, "trainer.max_epochs=2", "ckpt_path=last", multirun=True
    )
    assert again.returncode == 0, again.stderr[-3000:]
    _, after = sweep_runs_all(tmp_path, "resumed")
    assert {r.info.run_id for r in after} == {r.info.run_id for r in before}  # no new job runs
    assert all("medx.resumed_from" in r.data.tags for r in after)
    assert {r.info.run_name for r in after} == {"lr=0.01", "lr=0.03"}


def sweep_runs_all(tmp_path: Path, experiment: str):
    """Every parent run of the experiment (one per sweep) and the jobs' runs."""
    client = MlflowClient(store(tmp_path))
    every = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in every if r.data.tags.get("medx.sweep") == "parent"]
    return parents, [r for r in every if r.data.tags.get("medx.sweep") != "parent"]
