"""`-m hparams_search=classifier_optuna`: an Optuna search whose trials are MLflow child runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from medx_cli import run_train, store, sweep_runs
from mlflow import MlflowClient
from omegaconf import OmegaConf


@pytest.mark.slow
def test_two_trials_are_child_runs_and_the_parent_records_the_best(
    tmp_path: Path, phantom_cache: Path
):
    out = run_train(
        tmp_path,
        phantom_cache,
        "hparams_search=classifier_optuna",
        "hydra.sweeper.n_trials=2",
        "logger.experiment_name=search",
        multirun=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]

    parent, trials = sweep_runs(tmp_path, "search")
    assert len(trials) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    assert {r.info.status for r in [*trials, parent]} == {"FINISHED"}

    lrs = [float(r.data.params["optimizer.lr"]) for r in trials]
    assert lrs[0] != lrs[1]
    assert all(1e-5 <= lr <= 1e-2 for lr in lrs)
    assert {r.data.params["data.augment"] for r in trials} <= {"none", "light", "strong"}
    assert {r.data.params["strategy.name"] for r in trials} == {"finetune"}

    # Optuna's best trial, as the sweeper wrote it: the best child run in MLflow, on the parent.
    (sweep_dir,) = (tmp_path / "multirun").glob("*/*")
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert results.best_value == pytest.approx(max(r.data.metrics["val/auroc"] for r in trials))
    assert parent.data.metrics["val/auroc_best"] == pytest.approx(results.best_value)
    best_lr = float(parent.data.params["best.optimizer.lr"])
    (best,) = [r for r in trials if float(r.data.params["optimizer.lr"]) == pytest.approx(best_lr)]
    assert best.data.metrics["val/auroc"] == pytest.approx(results.best_value)
    assert parent.data.params["best.data.augment"] == best.data.params["data.augment"]
    artifacts = {a.path for a in MlflowClient(store(tmp_path)).list_artifacts(parent.info.run_id)}
    assert {"optimization_results.yaml", "leaderboard.csv"} <= artifacts


def test_a_direction_against_the_monitored_metric_stops_before_any_trial(
    tmp_path: Path, phantom_cache: Path
):
    out = run_train(
        tmp_path,
        phantom_cache,
        "hparams_search=classifier_optuna",
        "hydra.sweeper.direction=minimize",
        multirun=True,
    )
    assert out.returncode != 0
    assert "medx: hydra.sweeper.direction=minimize but monitor_mode=max (val/auroc)" in out.stderr
    assert "Launching" not in out.stdout + out.stderr
