"""End-to-end segmentation: `model=unet data=...` through train(), MLflow and prediction."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from mlflow import MlflowClient

from medx.data.io import read_image
from medx.errors import ConfigError, DataError
from medx.models.postprocess import fill_holes
from medx.predict import main as predict_main
from medx.predict import predict_folder
from medx.train import train


def test_lung_experiment_on_real_chest_xrays_is_tracked_in_mlflow(
    make_cfg, tracked_runs, mlflow_client: MlflowClient, medx_data: Path, tmp_path: Path
):
    """`experiment=lung_unet` (the benchmark's recipe), shrunk to a tiny encoder and 2 epochs."""
    cfg = make_cfg(
        "experiment=lung_unet",
        f"data.root={medx_data / 'lung_seg'}",
        "data.batch_size=8",
        "model.overlay_images=4",
    )
    assert cfg.model.postprocess == "lungs" and cfg.callbacks.early_stopping is None

    metrics = train(cfg)

    (run,) = tracked_runs()
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "unet-tu-test_resnet-lung_seg-full"
    assert run.data.params["model.postprocess"] == "lungs"
    keys = ("val/dice", "val/iou", "test/dice", "test/iou", "test/accuracy", "test/dice_median")
    keys += ("test/dice_pooled",)
    for key in keys:
        assert 0.0 <= run.data.metrics[key] <= 1.0, key
        assert run.data.metrics[key] == pytest.approx(metrics[key])
    assert metrics["test/dice"] > 0.5  # lungs cover a third of a chest X-ray: not nothing
    assert run.data.metrics["test/dice_worst5"] <= run.data.metrics["test/dice_median"]
    assert len(mlflow_client.get_metric_history(run.info.run_id, "val/dice")) == 2
    assert int(run.data.params["dataset.counts.test.images"]) > 0
    overlays = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "overlays")}
    expected = {"val_epoch000.png", "val_epoch001.png", "test.png", "test_worst.png"}
    assert {f"overlays/{name}" for name in expected} == overlays
    grid = read_image(Path(cfg.paths.output_dir) / "overlays" / "test_worst.png")
    assert (grid[..., 1] > 150).any() and (grid[..., 0] > 200).any()  # green truth, red pred
    with (Path(cfg.paths.output_dir) / "test_dice.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == int(run.data.params["dataset.counts.test.images"])
    dice = [float(r["dice"]) for r in rows]
    assert dice == sorted(dice)
    # the logged figures are those of the per-image scores (4 decimals in the CSV)
    assert metrics["test/dice"] == pytest.approx(np.mean(dice), abs=1e-4)
    assert metrics["test/iou"] == pytest.approx(np.mean([float(r["iou"]) for r in rows]), abs=1e-4)
    assert metrics["test/dice_median"] == pytest.approx(dice[(len(dice) - 1) // 2], abs=1e-4)
    assert run.data.metrics["test/dice_worst5"] == pytest.approx(np.mean(dice[:5]), abs=1e-4)
    for row in rows:  # IoU = D / (2 - D) image by image
        d = float(row["dice"])
        assert float(row["iou"]) == pytest.approx(d / (2 - d), abs=2e-4), row["image"]


@pytest.mark.slow  # a real multi-epoch run: CI's make test-slow
def test_phantom_checkpoint_predicts_masks_at_the_original_size(
    make_cfg, medx_data: Path, tmp_path: Path, capsys
):
    cfg = make_cfg("model=fpn", "data=phantom_seg", "logger=none", "trainer.max_epochs=1")
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    originals = sorted((medx_data / "lung_seg" / "images").iterdir())[:3]
    for path in originals:  # JPEG/PNG, far larger than the 64 px the model saw
        shutil.copy(path, inputs / path.name)

    masks = predict_folder(ckpt, inputs, tmp_path / "masks")

    assert [m.stem for m in masks] == [p.stem for p in originals]
    for mask_path, image_path in zip(masks, originals, strict=True):
        mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
        assert mask.shape == read_image(image_path).shape[:2]
        assert set(mask.flatten().tolist()) <= {0, 255}
    predict_main([str(ckpt), str(inputs), str(tmp_path / "cli")])
    assert "3 masks written" in capsys.readouterr().out

    # a bad file names medx.predict's own flag, not the training key
    (inputs / "cut.png").write_bytes(originals[0].read_bytes()[:100])
    with pytest.raises(SystemExit, match=r"cut\.png.*--skip-bad-images") as stop:
        predict_main([str(ckpt), str(inputs), str(tmp_path / "bad")])
    assert "data.skip_bad_images" not in str(stop.value.code)
    predict_main([str(ckpt), str(inputs), str(tmp_path / "skip"), "--skip-bad-images"])
    assert "3 masks written" in capsys.readouterr().out
    (inputs / "cut.png").unlink()
    assert len(list((tmp_path / "cli").glob("*.png"))) == 3

    # the lung prior on request: a low threshold makes specks, --postprocess lungs removes them
    low = ["--threshold", "0.01"]
    predict_main([str(ckpt), str(inputs), str(tmp_path / "raw"), *low])
    predict_main([str(ckpt), str(inputs), str(tmp_path / "lungs"), *low, "--postprocess", "lungs"])
    raw, lungs = _masks(tmp_path / "raw"), _masks(tmp_path / "lungs")
    assert max(map(_regions, raw)) > 2
    assert max(map(_regions, lungs)) <= 2 and all(np.array_equal(m, fill_holes(m)) for m in lungs)


def _masks(folder: Path) -> list[np.ndarray]:
    return [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) > 0 for p in sorted(folder.iterdir())]


def _regions(mask: np.ndarray) -> int:
    return cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)[0] - 1


def test_a_classification_checkpoint_is_refused(make_cfg, tmp_path: Path):
    cfg = make_cfg("logger=none", "trainer.max_epochs=1", "test=false")
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"

    with pytest.raises(DataError, match="not a medx segmentation checkpoint"):
        predict_folder(ckpt, tmp_path, tmp_path / "out")


def test_unet_on_classification_data_is_a_config_error(make_cfg):
    with pytest.raises(ConfigError, match=r"segmentation model but data=.* is classification"):
        train(make_cfg("model=unet", "data=pneumonia"))
