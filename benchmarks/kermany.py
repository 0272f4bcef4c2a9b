"""Issue 15: the Kermany pneumonia recipe, measured on a test split it never chose anything on.

Trains `experiment=<recipe>` (default `kermany_cpu`) on `$MEDX_DATA/chest_xray/train` with val
and test carved by patient (the shared copy holds the official train split only; the official
624-image test set is kept for independent evaluation), and prints test AUROC with its 95% CI,
sensitivity and specificity at the operating point chosen on val with CIs, ECE before and after
temperature scaling, the wall time, and the published rows of `../shared/BENCHMARKS.md`.
`--folds K` runs the recipe on K patient-grouped folds instead (the test split fixed) and
prints the spread of the val-chosen threshold and of the rates at it: what makes a recipe and
its threshold stable is judged on validation folds, never on a test split.

Usage: MEDX_DATA=/path python benchmarks/kermany.py [--recipe kermany_cpu] [--folds 5]
       [extra overrides...]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from mlflow import MlflowClient

TARGET_AUROC, TARGET_SENS, TARGET_SPEC, TARGET_MINUTES = 0.975, 0.95, 0.85, 30.0
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "BENCHMARKS.md"
EXPERIMENT = "kermany_bench"


def reference_lines(path: Path = REFERENCE) -> list[str]:
    """The published Kermany figures of BENCHMARKS.md, as its bullet lines."""
    if not path.is_file():
        return []
    section = path.read_text().split("## Kermany", 1)[-1].split("\n## ", 1)[0]
    return [" ".join(b.split()) for b in re.split(r"\n- ", section)[1:]]


def run(recipe: str, data_root: Path, home: Path, name: str, extra: list[str]) -> dict:
    uri = f"sqlite:///{home}/mlflow.db"
    env = {**os.environ, "MEDX_HOME": str(home), "MLFLOW_TRACKING_URI": uri}
    command = [
        sys.executable, "-m", "medx.train", f"experiment={recipe}", f"data.root={data_root}",
        f"logger.experiment_name={EXPERIMENT}", f"logger.run_name={name}",
        "trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=home, stdout=subprocess.DEVNULL)
    minutes = (time.perf_counter() - start) / 60
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (found,) = client.search_runs([experiment], filter_string=f"tags.mlflow.runName = '{name}'")
    return {**found.data.metrics, "minutes": minutes}


def show(m: dict, label: str) -> None:
    def ci(key: str) -> str:
        low, high = m.get(f"{key}_ci_low", np.nan), m.get(f"{key}_ci_high", np.nan)
        return f"{m.get(key, np.nan):.3f} ({low:.3f}-{high:.3f})"

    print(f"{label}: {m['minutes']:.1f} min")
    print(f"  test AUROC {ci('test/auroc')}  (target >= {TARGET_AUROC})")
    print(
        f"  at the val-chosen threshold {m.get('test/threshold_at_op', np.nan):.3f}: "
        f"sensitivity {ci('test/sensitivity_at_op')}, specificity "
        f"{ci('test/specificity_at_op')}  (target >= {TARGET_SENS} at >= {TARGET_SPEC})"
    )
    print(
        f"  ECE {m.get('test/ece', np.nan):.3f} -> {m.get('test/ece_calibrated', np.nan):.3f} "
        f"after temperature scaling (T = {m.get('test/temperature', np.nan):.2f})"
    )
    print(f"  best val AUROC {m.get('val/auroc_best', m.get('val/auroc', np.nan)):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="kermany_cpu")
    parser.add_argument("--folds", type=int, default=1, help="> 1: k-fold spread on val")
    args, extra = parser.parse_known_args()
    medx_data = Path(os.environ.get("MEDX_DATA", "../shared/data")).resolve()
    train_dir = medx_data / "chest_xray" / "train"
    if not train_dir.is_dir():
        sys.exit(f"MEDX_DATA={medx_data} has no chest_xray/train: set MEDX_DATA")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "chest_xray"
        root.mkdir()
        (root / "train").symlink_to(train_dir)  # val/ and test/ absent: carved by patient
        if args.folds <= 1:
            show(run(args.recipe, root, Path(tmp), args.recipe, extra), args.recipe)
        else:
            found = [
                run(args.recipe, root, Path(tmp), f"{args.recipe}-fold{k}",
                    [f"data.folds={args.folds}", f"data.fold={k}", *extra])
                for k in range(args.folds)
            ]  # fmt: skip
            for key in ("val/auroc", "test/threshold_at_op", "val/specificity_at_op",
                        "val/sensitivity_at_op", "minutes"):  # fmt: skip
                values = np.array([f.get(key, np.nan) for f in found])
                print(
                    f"{key:<24} mean {np.nanmean(values):.4f}  sd {np.nanstd(values):.4f}  "
                    f"folds {', '.join(f'{v:.3f}' for v in values)}"
                )
    print("published (BENCHMARKS.md):")
    for line in reference_lines():
        print(f"  - {line}")


if __name__ == "__main__":
    main()
