"""The quality baseline through medx.train: MLflow metrics and reports, then the score CLI."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from hydra.utils import instantiate
from mlflow import MlflowClient

from medx.models.quality import QualityBaseline
from medx.train import train

QUALITY = ("data=quality", "model=quality_logreg", "model.backbone=logreg", "data.n_patients=40")


def _best_checkpoint(cfg) -> Path:
    return next((Path(cfg.paths.output_dir) / "checkpoints").glob("epoch*.ckpt"))


def test_baseline_run_logs_classifier_metrics_and_reports(
    make_cfg, tracked_runs, mlflow_client: MlflowClient
):
    cfg = make_cfg(*QUALITY, "trainer.max_epochs=3")

    metrics = train(cfg)

    (run,) = tracked_runs()
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "logreg-quality-full"
    for key in ("val/auroc", "test/acc", "test/auroc", "test/f1", "test/sensitivity"):
        assert key in run.data.metrics and np.isfinite(metrics[key])
    assert run.data.params["dataset.inputs"] == "features"
    reports = {a.path for a in mlflow_client.list_artifacts(run.info.run_id)}
    assert {"coefficients.png", "feature_distributions.png"} <= reports
    evaluation = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/classification_report.txt", "evaluation/confusion_matrix.png"} <= evaluation
    report = Path(
        mlflow_client.download_artifacts(run.info.run_id, "evaluation/classification_report.txt")
    )
    assert "macro avg" in report.read_text() and "good" in report.read_text()

    # the standardisation is the training split's, not val's or test's
    model = QualityBaseline.load_from_checkpoint(_best_checkpoint(cfg))
    datamodule = instantiate(cfg.data)
    datamodule.inputs = "features"
    train_x = model.scale(torch.from_numpy(datamodule.features("train")[0]))
    assert torch.allclose(model.feature_mean, train_x.mean(0), atol=1e-4)
    test_x = model.scale(torch.from_numpy(datamodule.features("test")[0]))
    assert not torch.allclose(model.feature_mean, test_x.mean(0), atol=1e-4)

    # which degradations the model misses: per image, then counted per degradation
    assert "evaluation/test_by_degradation.csv" in evaluation
    folder = Path(cfg.paths.output_dir) / "evaluation"
    rows = list(csv.DictReader((folder / "test_predictions.csv").open()))
    made = datamodule.describe_samples("test")["degradation"]
    assert [r["degradation"] for r in rows] == made and "none" in made
    assert all((r["label"] == "good") == (r["degradation"] == "none") for r in rows)
    by = {r["degradation"]: r for r in csv.DictReader((folder / "test_by_degradation.csv").open())}
    assert sum(int(r["images"]) for r in by.values()) == len(rows)
    for name, row in by.items():
        mine = [r for r in rows if r["degradation"] == name]
        assert int(row["images"]) == len(mine)
        assert int(row["errors"]) == sum(r["prediction"] != r["label"] for r in mine)
        assert int(row["errors_at_op"]) == sum(r["prediction_at_op"] != r["label"] for r in mine)


def test_score_command_writes_a_csv_for_a_real_folder(make_cfg, medx_data: Path, tmp_path: Path):
    cfg = make_cfg(*QUALITY, "logger=none", "test=false")
    train(cfg)
    folder = tmp_path / "screen"
    (folder / "NORMAL").mkdir(parents=True)
    for path in sorted((medx_data / "chest_xray" / "train" / "NORMAL").iterdir())[:4]:
        shutil.copy(path, folder / "NORMAL" / path.name)
    rng = np.random.default_rng(0)
    cv2.imwrite(str(folder / "deep.png"), (rng.random((40, 40)) * 4095).astype(np.uint16))
    cv2.imwrite(str(folder / "flat.png"), np.full((40, 40), 7, np.uint8))
    cv2.imwrite(str(folder / "rgba.png"), rng.integers(0, 255, (40, 40, 4), dtype=np.uint8))
    cv2.imwrite(str(folder / "tiny.png"), np.zeros((2, 2), np.uint8))
    out = tmp_path / "scores.csv"

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "medx.score",
            str(folder),
            "--checkpoint",
            str(_best_checkpoint(cfg)),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader(out.open())}
    assert len(rows) == 8
    assert "too small" in rows["tiny.png"]["error"] and "tiny.png" in rows["tiny.png"]["error"]
    scored = [r for name, r in rows.items() if name != "tiny.png"]
    assert all(0 <= float(r["p_bad"]) <= 1 and r["verdict"] in ("good", "bad") for r in scored)
    assert all(np.isfinite(float(r["laplacian_var"])) for r in scored)
    assert float(rows["flat.png"]["entropy"]) == 0
