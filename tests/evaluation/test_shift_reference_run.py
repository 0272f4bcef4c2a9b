"""A real short run keeps a shift reference on its card and stress-tests its test split; a
checkpoint without a reference is told how to get one, and `medx.eval` gives it one."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from medx.config import compose
from medx.eval import main as eval_main
from medx.inference.shift import ShiftMonitor, unavailable_reason
from medx.models.base import CARD_KEY
from medx.models.load import model_card
from medx.train import train


@pytest.mark.slow  # a real multi-epoch run: CI's make test-slow
def test_a_run_keeps_a_shift_reference_and_stress_tests_its_test_split(
    make_cfg, tracked_runs, mlflow_client: MlflowClient, tmp_path: Path
):
    train(
        make_cfg(
            "data.val_from_train=0.3",  # 36 val images: enough for a reference
            "eval.bootstrap=50",
            "eval.stress=true",
            "eval.stress_shifts=[gamma,noise]",
        )
    )
    (run,) = tracked_runs()
    metrics = run.data.metrics
    (best,) = (tmp_path / "run" / "checkpoints").glob("epoch*.ckpt")

    # the reference: plain values in a weights_only checkpoint, tens of kB, usable
    entry = torch.load(best, map_location="cpu", weights_only=True)[CARD_KEY]["shift_reference"]
    assert len(json.dumps(entry)) < 100_000
    assert entry["info"]["fitted_on"] == "val"
    monitor = ShiftMonitor.from_card(model_card(best))
    assert monitor.reference.points.shape[1] == entry["info"]["components"] + 1
    assert 0 < metrics["test/shift_p_value"] <= 1 and 0 <= metrics["test/ood_rate"] <= 1

    # the stress test: every shift at every severity, after the unshifted row
    table = tmp_path / "run" / "evaluation" / "stress_test.csv"
    rows = list(csv.DictReader(table.open()))
    assert [(r["shift"], int(r["severity"])) for r in rows] == [("none", 0)] + [
        (s, k) for s in ("gamma", "noise") for k in (1, 2, 3)
    ]
    assert all(r["sensitivity"] and r["specificity"] and r["monitor_p"] for r in rows)
    assert {"test/stress_auroc_s1", "test/stress_auroc_s3", "test/stress_auroc_worst"} <= set(
        metrics
    )
    artifacts = {
        Path(a.path).name for a in mlflow_client.list_artifacts(run.info.run_id, "evaluation")
    }
    assert {"stress_test.csv", "stress_test.png"} <= artifacts

    # a checkpoint from before the monitor: the reason names medx.eval; medx.eval adds one
    ckpt = torch.load(best, map_location="cpu", weights_only=True)
    operating_point = ckpt[CARD_KEY]["operating_point"]
    del ckpt[CARD_KEY]["shift_reference"]
    old = tmp_path / "run" / "checkpoints" / "old.ckpt"
    torch.save(ckpt, old)
    reason = unavailable_reason(model_card(old), str(old))
    assert "no shift reference" in reason and f"python -m medx.eval ckpt_path={old}" in reason

    eval_main(compose([f"ckpt_path={old}"], "eval"))
    card = model_card(old)
    assert card["shift_reference"]["info"]["images"] == entry["info"]["images"]
    assert card["operating_point"] == operating_point  # nothing it shipped with changed
    assert unavailable_reason(card) is None

    # with TTA the stress test still runs the plain model, so at the plain operating point
    eval_main(
        compose(
            [f"ckpt_path={best}", "eval.tta=true", "eval.stress=true", "eval.bootstrap=20",
             "eval.stress_shifts=[gamma]"],
            "eval",
        )
    )  # fmt: skip
    tables = (tmp_path / "run" / "eval").glob("*/evaluation/stress_test.csv")
    tta_table = max(tables, key=lambda path: path.stat().st_mtime)  # the latest evaluation
    thresholds = {r["threshold"] for r in csv.DictReader(tta_table.open())}
    assert thresholds == {f"{operating_point['threshold']:.6f}"}
