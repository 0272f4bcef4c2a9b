"""k-fold cross-validation as a sweep: folds as child runs, mean ± sd on the parent, compared."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from medx_cli import run_train, store, sweep_runs

from medx.data.folders import PhantomDataModule


def test_folds_partition_the_pool_and_keep_the_test_split(phantom_cache: Path):
    def splits(fold: int) -> dict:
        dm = PhantomDataModule(phantom_cache, n_patients=40, folds=3, fold=fold, num_workers=0)
        dm.setup()
        return {s: set(dm.splits[s].patients) for s in ("train", "val", "test")}

    folds = [splits(k) for k in range(3)]
    assert all(f["test"] == folds[0]["test"] for f in folds)  # carved before the folds
    vals = [f["val"] for f in folds]
    assert not (vals[0] & vals[1] or vals[0] & vals[2] or vals[1] & vals[2])
    pool = vals[0] | vals[1] | vals[2]
    assert all(f["train"] | f["val"] == pool and not f["train"] & f["val"] for f in folds)
    assert not pool & folds[0]["test"]


@pytest.mark.slow
def test_three_fold_sweep_nests_folds_under_a_parent_with_mean_and_sd(
    tmp_path: Path, phantom_cache: Path
):
    out = run_train(
        tmp_path,
        phantom_cache,
        "data.fold=0,1,2",
        "data.folds=3",
        "logger.experiment_name=cv",
        multirun=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]

    parent, folds = sweep_runs(tmp_path, "cv")
    assert sorted(r.data.params["data.fold"] for r in folds) == ["0", "1", "2"]
    assert {r.data.tags["mlflow.parentRunId"] for r in folds} == {parent.info.run_id}
    assert parent.info.status == "FINISHED"
    aurocs = [r.data.metrics["test/auroc"] for r in folds]
    assert parent.data.metrics["test/auroc_mean"] == pytest.approx(sum(aurocs) / 3)
    assert "test/auroc_std" in parent.data.metrics and "val/auroc_mean" in parent.data.metrics

    compared = subprocess.run(
        [
            sys.executable,
            "-m",
            "medx.compare",
            "--experiment=cv",
            f"--parent={parent.info.run_id}",
            f"--out={tmp_path / 'compare'}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "MLFLOW_TRACKING_URI": store(tmp_path)},
        timeout=120,
    )
    assert compared.returncode == 0, compared.stderr[-3000:]
    lines = compared.stdout.strip().splitlines()
    assert "val/auroc_best" in lines[0] and "test/auroc" in lines[0] and "data.fold" in lines[0]
    assert sorted(line.split()[1] for line in lines[1:]) == ["fold=0", "fold=1", "fold=2"]
    table = pd.read_csv(tmp_path / "compare" / "compare.csv")
    assert set(table["run_id"]) == {r.info.run_id for r in folds}
    assert table["val/auroc_best"].is_monotonic_decreasing  # the selection metric, not test
    assert (tmp_path / "compare" / "compare.png").stat().st_size > 0
