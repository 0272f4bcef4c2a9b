"""End-to-end: `medx.train.train` on composed configs, checked through MLflow."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow import MlflowClient

from medx.data.folders import PhantomDataModule
from medx.errors import ConfigError, DataError
from medx.train import train


def test_fast_dev_run_on_phantom(make_cfg, tracked_runs):
    metrics = train(make_cfg("debug=fdr"))

    assert {"train/loss", "val/auroc", "test/auroc", "test/sensitivity"} <= set(metrics)
    (run,) = tracked_runs()
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "test_resnet-phantom-full"


@pytest.mark.slow
def test_debug_overfit_drives_the_training_loss_down(make_cfg):
    """`debug=overfit` is the sanity check for a new model or data set: it must memorise."""
    metrics = train(
        make_cfg(
            "debug=overfit",
            "logger=none",
            "test=false",
            "optimizer.lr=0.01",
            "trainer.max_epochs=30",
        )
    )

    assert metrics["train/loss"] < 0.2  # from ln 2 = 0.69


def _kermany_subset(source: Path, target: Path, per_class: int) -> Path:
    """A small Kermany-layout copy (train only) of the first images of each class."""
    for label in ("NORMAL", "PNEUMONIA"):
        (target / "train" / label).mkdir(parents=True)
        for path in sorted((source / "train" / label).iterdir())[:per_class]:
            shutil.copy(path, target / "train" / label / path.name)
    return target


def test_real_chest_xrays_are_tracked_in_mlflow(
    make_cfg, tracked_runs, mlflow_client: MlflowClient, medx_data: Path, tmp_path: Path
):
    root = _kermany_subset(medx_data / "chest_xray", tmp_path / "chest_xray", per_class=150)
    cfg = make_cfg("data=pneumonia", f"data.root={root}", "logger.experiment_name=kermany")

    metrics = train(cfg)

    (run,) = tracked_runs("kermany")
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "test_resnet-pneumonia-full"
    params = run.data.params
    assert params["data.image_size"] == "64"
    assert params["model.backbone"] == "test_resnet"
    assert params["dataset.counts.train.NORMAL"].isdigit()
    assert not [k for k, v in params.items() if v.startswith("{")], "nested dict dumped"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    if commit.returncode == 0:
        assert run.data.tags["mlflow.source.git.commit"] == commit.stdout.strip()
    history = mlflow_client.get_metric_history(run.info.run_id, "val/auroc")
    assert len(history) == 2  # one value per epoch
    for key in (
        "train/loss",
        "val/loss",
        "val/acc",
        "test/acc",
        "test/auroc",
        "test/f1",
        "test/sensitivity",
        "test/specificity",
    ):
        assert key in run.data.metrics, key
    assert run.data.metrics["test/auroc"] == pytest.approx(metrics["test/auroc"])
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "overrides.yaml"} <= artifacts
    checkpoints = {p.name for p in (Path(cfg.paths.output_dir) / "checkpoints").iterdir()}
    assert "last.ckpt" in checkpoints and any(n.startswith("epoch") for n in checkpoints)


def test_a_crashed_run_is_failed_in_mlflow(make_cfg, tracked_runs, tmp_path: Path):
    cfg = make_cfg("data=pneumonia", f"data.root={tmp_path / 'nowhere'}")

    with pytest.raises(DataError, match=r"data\.root=.*does not exist.*Kermany"):
        train(cfg)

    (run,) = tracked_runs()
    assert run.info.status == "FAILED"


class SegmentationLikeData(PhantomDataModule):
    """Stands for any data family whose model is not a classifier."""

    task = "segmentation"


def test_model_and_data_of_different_tasks_is_a_config_error(make_cfg):
    cfg = make_cfg()
    cfg.data._target_ = f"{__name__}.SegmentationLikeData"

    with pytest.raises(ConfigError, match=r"classification model but data=.* is segmentation"):
        train(cfg)


def test_same_seed_with_a_deterministic_trainer_gives_identical_metrics(make_cfg):
    overrides = ("seed=7", "trainer.deterministic=true", "logger=none")

    first = train(make_cfg(*overrides))
    second = train(make_cfg(*overrides))

    assert first == second
    assert first != train(make_cfg("seed=8", *overrides[1:]))
