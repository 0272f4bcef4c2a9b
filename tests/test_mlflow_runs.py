"""What a training run shows in MLflow beyond Lightning's metrics: its data set as a dataset
input, the selected checkpoint's score and epoch, metrics by epoch, and paths as tags."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import pytest
from mlflow import MlflowClient

from medx.data.folders import ImageFolderDataModule
from medx.tracking import datasets, views
from medx.tracking.runs import is_where
from medx.train import train


def test_a_run_logs_its_data_set_selected_checkpoint_and_epoch_charts(
    make_cfg, tracked_runs, mlflow_client: MlflowClient
):
    train(make_cfg("trainer.max_epochs=3", "optimizer.lr=0.03", "callbacks.early_stopping=null"))

    (run,) = tracked_runs()
    history = mlflow_client.get_metric_history(run.info.run_id, "val/auroc")
    assert [m.step for m in history] == [0, 1, 2]  # by epoch, as the UI charts them
    lr = mlflow_client.get_metric_history(run.info.run_id, "lr-AdamW/head")
    assert [m.step for m in lr] == [0, 1, 2]
    best = max(history, key=lambda m: (m.value, -m.step))  # the first epoch with the best value
    metrics = run.data.metrics
    assert metrics["val/auroc_best"] == pytest.approx(best.value)
    assert metrics["val/auroc_best_epoch"] == best.step
    tags = run.data.tags
    assert (tags[views.SELECTION_TAG], tags[views.SELECTION_MODE_TAG]) == ("val/auroc", "max")

    (given,) = run.inputs.dataset_inputs
    counts = {
        s: sum(int(v) for k, v in run.data.params.items() if k.startswith(f"dataset.counts.{s}."))
        for s in ("train", "val", "test")
    }
    assert given.dataset.name == "phantom" and len(given.dataset.digest) == 16
    assert [(t.key, t.value) for t in given.tags] == [
        ("mlflow.data.context", "train={train} val={val} test={test}".format(**counts))
    ]
    assert Path(given.dataset.source.split('"')[3]).is_dir()  # {"uri": "<the phantom folder>"}

    params = run.data.params
    assert not [k for k in params if is_where(k)]
    assert "logger.run_name" not in params and "paths.output_dir" not in params
    assert tags["logger.run_name"] == run.info.run_name
    assert tags["callbacks.model_checkpoint.dirpath"].endswith("checkpoints")
    assert "optimizer.lr" in params and "model.backbone" in params  # what the run is

    experiment = mlflow_client.get_experiment(run.info.experiment_id)
    _, _, state = views.read_envelope(experiment.tags[views.VIEW_TAG_PREFIX + "medx"])
    assert state["orderByKey"] == "metrics.`val/auroc_best`"


def _folder_module(root: Path) -> ImageFolderDataModule:
    module = ImageFolderDataModule(
        root, name="phantom", image_size=48, num_workers=0, patient_pattern=r"patient(\d+)_"
    )
    module.setup()
    return module


def test_the_data_set_digest_follows_the_files_not_where_they_lie(
    make_cfg, tmp_path: Path, phantom_cache: Path
):
    from hydra.utils import instantiate

    phantom = instantiate(make_cfg().data, _convert_="object")
    phantom.setup()
    source = Path(phantom.root)
    first, second = tmp_path / "a" / "xray", tmp_path / "b" / "xray"
    for copy in (first, second):
        shutil.copytree(source, copy, ignore=shutil.ignore_patterns("masks"))

    same = datasets.digest(_folder_module(first)), datasets.digest(_folder_module(second))
    image = next((second / "OPACITY").glob("*.png"))
    pixels = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE)
    pixels[0, 0] ^= 1  # one pixel of one image
    cv2.imwrite(str(image), pixels)
    changed = datasets.digest(_folder_module(second))

    assert same[0] == same[1]
    assert changed != same[0]
