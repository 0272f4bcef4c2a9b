"""One real short run with the clinical evaluation, then `medx.eval` on its checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from medx.config import compose
from medx.errors import ConfigError
from medx.eval import evaluate, load_config
from medx.eval import run as eval_run
from medx.evaluation.callback import ClinicalEvaluation
from medx.train import train

FIGURES = {
    "confusion_matrix.png",
    "confusion_matrix_normalised.png",
    "roc_curve.png",
    "pr_curve.png",
    "reliability_diagram.png",
    "training_curves.png",
}


def test_a_run_reports_and_its_checkpoint_reproduces_it(
    make_cfg, tracked_runs, mlflow_client: MlflowClient, tmp_path: Path
):
    """One real run (the expensive part), then everything that needs a trained run."""
    metrics = train(make_cfg("eval.bootstrap=200"))

    (run,) = tracked_runs()
    m = run.data.metrics
    assert m["test/auroc_ci_low"] <= m["test/auroc"] <= m["test/auroc_ci_high"]
    for key in ("sensitivity", "specificity"):
        assert m[f"test/{key}_ci_low"] <= m[f"test/{key}_ci_high"]
        at_op = f"test/{key}_at_op"
        assert m[f"{at_op}_ci_low"] <= m[at_op] <= m[f"{at_op}_ci_high"]
    for key in ("sensitivity_at_op", "specificity_at_op", "threshold_at_op", "ece", "mce"):
        assert f"test/{key}" in m and f"test/{key}" in metrics
    assert m["val/sensitivity_at_op"] >= 0.95  # chosen on val, reached on val
    assert m["val/nll_calibrated"] <= m["val/nll"] + 1e-9
    artifacts = {
        Path(a.path).name for a in mlflow_client.list_artifacts(run.info.run_id, "evaluation")
    }
    assert FIGURES | {"test_predictions.csv", "classification_report.txt"} <= artifacts
    csv = (tmp_path / "run" / "evaluation" / "test_predictions.csv").read_text().splitlines()
    assert csv[0].startswith("path,label,probability,prediction")
    params = run.data.params
    n_test = sum(int(params[f"dataset.counts.test.{c}"]) for c in ("NORMAL", "OPACITY"))
    assert len(csv) == 1 + n_test

    # medx.eval on the best checkpoint: the same test metrics, in a new run tagged with the source
    (best,) = (tmp_path / "run" / "checkpoints").glob("epoch*.ckpt")
    again = eval_run(compose([f"ckpt_path={best}"], "eval"))

    evaluated = next(r for r in tracked_runs() if r.info.run_id != run.info.run_id)
    assert evaluated.data.tags["medx.source_run_id"] == run.info.run_id
    for key in ("test/auroc", "test/auroc_ci_low", "test/sensitivity_at_op", "test/ece"):
        assert again[key] == pytest.approx(m[key], abs=1e-6), key
        assert evaluated.data.metrics[key] == pytest.approx(m[key], abs=1e-6), key
    assert "test_predictions.csv" in {
        Path(a.path).name for a in mlflow_client.list_artifacts(evaluated.info.run_id, "evaluation")
    }

    # a checkpoint of another model config: named, with the config's choice
    with pytest.raises(ConfigError, match=r"test_resnet.*model\.backbone=resnet18"):
        evaluate(best, load_config(best, ["model.backbone=resnet18"]))


@pytest.mark.parametrize("target", [0, 1.5, -0.1])
def test_a_target_sensitivity_outside_0_1_is_a_config_error(target: float):
    with pytest.raises(ConfigError, match=r"eval\.target_sensitivity"):
        ClinicalEvaluation(target_sensitivity=target)
