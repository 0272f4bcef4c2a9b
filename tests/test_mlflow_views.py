"""The links medx prints for the MLflow UI and the saved views they open, on a real sqlite store.

The saved-view format (experiment tag `mlflow.sharedViewState.<id>`, a JSON envelope around the
runs page's state) is MLflow 3.17's own, undocumented: tests/test_mlflow_ui.py shows in a
real browser that the UI honours it; these tests pin what medx writes and reads.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from medx import ui
from medx.tracking import store, views
from medx.tracking.sweep import (
    PARENT_TAG,
    SWEEP_TAG,
    description,
    job_name,
    leaderboard,
    ranking_metric,
    selection,
    varying_params,
)


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, dict[str, str]]:
    """A store as a 2-job sweep leaves it: job `lr=0.03` peaked at epoch 1 and fell, job
    `lr=0.001` rose to its last epoch; their test AUROCs rank them the other way."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('views') / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = store.ensure_experiment(client, "medx")
    parent = client.create_run(experiment, run_name="sweep-x", tags={SWEEP_TAG: "parent"})
    ids = {"parent": parent.info.run_id}
    for name, lr, history, test in (
        ("lr=0.03", "0.03", [0.6, 0.9, 0.5], 0.70),
        ("lr=0.001", "0.001", [0.6, 0.7, 0.75], 0.80),
    ):
        run = client.create_run(
            experiment,
            run_name=name,
            tags={
                PARENT_TAG: parent.info.run_id,
                views.SELECTION_TAG: "val/auroc",
                views.SELECTION_MODE_TAG: "max",
            },
        )
        run_id = ids[name] = run.info.run_id
        for key, value in (("optimizer.lr", lr), ("model.backbone", "resnet18"), ("monitor", "x")):
            client.log_param(run_id, key, value)
        for epoch, value in enumerate(history):
            client.log_metric(run_id, "val/auroc", value, step=epoch)
        best = max(history)
        client.log_metric(run_id, "val/auroc_best", best, step=history.index(best))
        client.log_metric(run_id, "val/auroc_best_epoch", history.index(best))
        client.log_metric(run_id, "test/auroc", test)
    name, state = views.sweep_view(
        parent.info.run_id, "sweep-x", "val/auroc", "max", ["optimizer.lr"]
    )
    views.save_view(client, experiment, parent.info.run_id, name, state)
    name, state = views.experiment_view({}, "val/auroc", "max", ["model.backbone"])
    views.save_view(client, experiment, views.EXPERIMENT_VIEW, name, state)
    return uri, experiment, ids


def test_a_saved_view_is_the_envelope_mlflow_reads(swept, tmp_path: Path):
    uri, experiment, ids = swept
    client = MlflowClient(uri)
    tag = client.get_experiment(experiment).tags[views.VIEW_TAG_PREFIX + ids["parent"]]

    envelope = json.loads(tag)
    assert set(envelope) == {"name", "createdAt", "updatedAt", "state"}
    assert isinstance(envelope["createdAt"], int) and isinstance(envelope["state"], str)
    state = json.loads(envelope["state"])
    assert state["searchFilter"] == f"tags.`mlflow.parentRunId` = '{ids['parent']}'"
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`val/auroc_best`", False)
    assert state["selectedColumns"][:3] == [
        "metrics.`val/auroc_best`",
        "metrics.`val/auroc_best_epoch`",
        "params.`optimizer.lr`",
    ]
    assert state["columnOrder"][:2] == ["attributes.`Run Name`", "metrics.`val/auroc_best`"]


def test_saving_a_view_again_keeps_its_creation_time(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = store.ensure_experiment(client, "medx")
    views.save_view(client, experiment, "v", "first", {"orderByKey": "metrics.`a`"})
    first = json.loads(client.get_experiment(experiment).tags[views.VIEW_TAG_PREFIX + "v"])

    views.save_view(client, experiment, "v", "second", {"orderByKey": "metrics.`b`"})

    second = json.loads(client.get_experiment(experiment).tags[views.VIEW_TAG_PREFIX + "v"])
    assert second["name"] == "second" and second["createdAt"] == first["createdAt"]
    assert json.loads(second["state"]) == {"orderByKey": "metrics.`b`"}


def test_the_experiment_view_keeps_the_columns_of_earlier_runs():
    _, first = views.experiment_view({}, "val/auroc", "max", ["model.backbone"])
    tags = {views.VIEW_TAG_PREFIX + views.EXPERIMENT_VIEW: views.envelope("x", first)}

    _, state = views.experiment_view(tags, "val/dice", "max", ["model.arch"])

    assert state["orderByKey"] == "metrics.`val/dice_best`"  # the latest run's selection
    assert state["selectedColumns"] == [
        "metrics.`val/dice_best`",
        "metrics.`val/dice_best_epoch`",
        "metrics.`test/dice`",
        "metrics.`val/auroc_best`",
        "metrics.`val/auroc_best_epoch`",
        "metrics.`test/auroc`",
        "params.`model.backbone`",
        "params.`model.arch`",
        views.DATASET_COLUMN,
    ]
    assert state["searchFilter"] == "tags.`mlflow.source.name` = 'medx.train'"  # no parents


def test_medx_ui_links_the_experiment_view_and_the_latest_sweep(swept):
    uri, experiment, ids = swept
    base = f"/#/experiments/{experiment}/runs?workflowType=machine_learning&compareRunsMode=TABLE"

    lines = ui.main(["--backend-store-uri", uri, "--port", "5123"]).splitlines()

    assert lines[0].endswith(f"http://127.0.0.1:5123{base}&viewStateShareKey=medx")
    assert lines[1].startswith("Latest sweep, sweep-x")
    assert lines[1].endswith(f"{base}&viewStateShareKey={ids['parent']}")


def test_medx_ui_imports_no_mlflow_and_creates_no_store(swept, tmp_path: Path):
    """What keeps `make ui` quick: the store is read with sqlite3, not through MLflow."""
    uri, _, _ = swept
    missing = tmp_path / "none.db"
    code = (
        "import sys; from medx import ui; "
        f"ui.main(['--backend-store-uri', {uri!r}]); "
        f"ui.main(['--backend-store-uri', 'sqlite:///{missing}']); "
        "print('mlflow imported' if 'mlflow' in sys.modules else 'no mlflow')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert out.returncode == 0, out.stderr
    assert "viewStateShareKey=medx" in out.stdout and "no runs yet" in out.stdout
    assert out.stdout.strip().endswith("no mlflow")
    assert not missing.exists()


def test_medx_ui_names_a_missing_experiment(swept):
    uri, _, _ = swept
    assert "no experiment 'other'" in ui.main(["--backend-store-uri", uri, "--experiment", "other"])


def test_a_sweep_ranks_its_jobs_by_the_selected_checkpoint_not_the_last_epoch(swept):
    uri, experiment, ids = swept
    client = MlflowClient(uri)
    jobs = client.search_runs([experiment], f"tags.`{PARENT_TAG}` = '{ids['parent']}'")
    monitor, mode = selection(jobs)
    metric = ranking_metric(jobs, monitor)
    params = varying_params(jobs)

    table = leaderboard(jobs, metric, mode, params)

    assert (monitor, mode, metric) == ("val/auroc", "max", "val/auroc_best")
    assert params == ["optimizer.lr"]  # what differs between the jobs
    assert list(table["run_name"]) == ["lr=0.03", "lr=0.001"]  # by 0.9 at epoch 1
    by_last_epoch = table.sort_values("val/auroc", ascending=False)["run_name"]
    assert list(by_last_epoch) == ["lr=0.001", "lr=0.03"]  # 0.75 against 0.5: the other way
    text = description(table, metric, monitor, params)
    assert text.startswith("**Best: lr=0.03**: val/auroc 0.9000 at epoch 1")
    assert "| 1 | lr=0.03 | 0.9000 | 1 | 0.03 | 0.7000 |" in text


def test_a_job_is_named_by_its_swept_values():
    overrides = ["model=resnet18", "optimizer.lr=3e-3", "trainer.max_epochs=3", "data.fold=2"]
    assert job_name(overrides, ["model", "optimizer.lr", "data.fold"]) == (
        "model=resnet18 lr=0.003 fold=2"
    )
    both = [*overrides, "scheduler.lr=0.1"]
    assert job_name(both, ["optimizer.lr", "scheduler.lr"]) == "optimizer.lr=0.003 scheduler.lr=0.1"
    assert job_name(overrides, []) is None
