"""One real short run with the clinical evaluation, then `medx.eval` on its checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from medx.errors import ConfigError
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


def test_a_run_reports_metrics_with_cis_figures_and_predictions(
    make_cfg, tracked_runs, mlflow_client: MlflowClient, tmp_path: Path
):
    metrics = train(make_cfg("eval.bootstrap=200"))

    (run,) = tracked_runs()
    m = run.data.metrics
    assert m["test/auroc_ci_low"] <= m["test/auroc"] <= m["test/auroc_ci_high"]
    for key in ("sensitivity", "specificity"):
        assert m[f"test/{key}_ci_low"] <= m[f"test/{key}_ci_high"]
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


@pytest.mark.parametrize("target", [0, 1.5, -0.1])
def test_a_target_sensitivity_outside_0_1_is_a_config_error(target: float):
    with pytest.raises(ConfigError, match=r"eval\.target_sensitivity"):
        ClinicalEvaluation(target_sensitivity=target)
