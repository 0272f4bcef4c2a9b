"""Issue 15: the Kermany pneumonia recipe, measured on a test split it never chose anything on.

Trains `experiment=<recipe>` (default `kermany_cpu`) on `$MEDX_DATA/chest_xray/train` with val
and test carved by patient (the shared copy holds the official train split only; the official
624-image test set is kept for independent evaluation), and prints test AUROC with its 95% CI,
sensitivity and specificity at the operating point chosen on val with CIs, ECE before and after
temperature scaling, the wall time, and the published rows of `../shared/BENCHMARKS.md`.
`--folds K` runs the recipe on K patient-grouped folds instead (the test split fixed) and
prints the spread of the val-chosen threshold and of the rates at it, and `--variant` compares
variants of the recipe on the same folds: what makes a recipe and its threshold stable is
judged on validation folds, never on a test split. `--stress` adds the robustness stress test
(issue 23: simulated acquisition shifts at graded severities, `eval.stress`): on the test
split for one run, on each val fold with `--folds`, where it is a second criterion.

Usage: MEDX_DATA=/path python benchmarks/kermany.py [--recipe kermany_cpu] [--folds 5]
       [--variant 'NAME=override ...']... [--jobs 2] [--stress] [extra overrides...]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
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


def run(
    recipe: str,
    data_root: Path,
    home: Path,
    name: str,
    extra: list[str],
    env_extra: dict[str, str] | None = None,
) -> dict:
    """One `medx.train` run in its own folder under `home` (its own sqlite store, so that runs
    at once never contend for one), the decoded-image cache shared; its MLflow metrics."""
    shared_cache = home / ".cache" / "medx"
    home = home / name
    home.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{home}/mlflow.db"
    env = {**os.environ, "MEDX_HOME": str(home), "MLFLOW_TRACKING_URI": uri, **(env_extra or {})}
    command = [
        sys.executable, "-m", "medx.train", f"experiment={recipe}", f"data.root={data_root}",
        f"logger.experiment_name={EXPERIMENT}", f"logger.run_name={name}",
        "trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null",
        f"paths.cache_dir={shared_cache}", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=home, stdout=subprocess.DEVNULL)
    minutes = (time.perf_counter() - start) / 60
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (found,) = client.search_runs([experiment], filter_string=f"tags.mlflow.runName = '{name}'")
    history = client.get_metric_history(found.info.run_id, "val/auroc")  # the selection metric
    best = {"val/auroc_best": max(m.value for m in history)} if history else {}
    return {**found.data.metrics, **best, "minutes": minutes}


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
    if "test/shift_p_value" in m:
        print(
            f"  shift monitor on the test split: p = {m['test/shift_p_value']:.3f} "
            f"(in distribution: should not be < 0.01), {m['test/ood_rate']:.1%} images flagged"
        )
    if "test/stress_auroc_s1" in m:
        cells = ", ".join(f"severity {k} {m[f'test/stress_auroc_s{k}']:.3f}" for k in (1, 2, 3))
        print(
            f"  stress test, mean AUROC over acquisition shifts: {cells}; worst "
            f"{m['test/stress_auroc_worst']:.3f} (evaluation/stress_test.csv in the run)"
        )


FOLD_KEYS = (
    "val/auroc_best",
    "test/threshold_at_op",
    "val/specificity_at_op",
    "val/nll_calibrated",
)
STRESS_KEYS = ("val/stress_auroc_s2", "val/stress_auroc_worst")  # --stress: on the val fold


def folds(
    recipe: str, root: Path, home: Path, name: str, k: int, extra: list[str], jobs: int = 1
) -> list[dict]:
    """The recipe on each of `k` patient-grouped folds (the carved test split fixed), `jobs` at a
    time (one torch thread each: two 1-thread runs use 2 CPUs better than one 2-thread run)."""

    def one(fold: int) -> dict:
        in_process = [] if jobs == 1 else ["data.num_workers=0"]  # no loader workers
        return run(
            recipe,
            root,
            home,
            f"{name}-fold{fold}",
            [f"data.folds={k}", f"data.fold={fold}", *in_process, *extra],
            {"OMP_NUM_THREADS": "1"} if jobs > 1 else {},
        )

    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, range(k)))


def spread(found: list[dict], key: str) -> str:
    values = np.array([f.get(key, np.nan) for f in found])
    return f"{np.nanmean(values):.3f} ± {np.nanstd(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="kermany_cpu")
    parser.add_argument("--folds", type=int, default=1, help="> 1: k-fold spread on val")
    parser.add_argument(
        "--variant", action="append", default=[], metavar="NAME=OVERRIDES",
        help="with --folds: compare variants of the recipe on the same folds, e.g. "
        "--variant 'no CLAHE=data.intensity=none' (overrides separated by spaces); repeatable",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="folds trained at once")
    parser.add_argument(
        "--stress", action="store_true", help="the acquisition-shift stress test (eval.stress)"
    )
    args, extra = parser.parse_known_args()
    keys = FOLD_KEYS + (STRESS_KEYS if args.stress and args.folds > 1 else ())
    if args.stress:  # folds: stress-test the val fold, so that nothing looks at a test split
        extra += ["eval.stress=true"] + (["eval.stress_split=val"] if args.folds > 1 else [])
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
            variants = [("recipe", "")] + [v.partition("=")[::2] for v in args.variant]
            print(
                f"{args.recipe} {' '.join(extra)}: {args.folds} patient-grouped folds, "
                "mean ± sd over folds (validation only: nothing here looks at a test split)"
            )
            print(f"| variant | {' | '.join(keys)} | minutes a fold |")
            print(f"|---|{'---|' * len(keys)}---|")
            for i, (name, overrides) in enumerate(variants):
                found = folds(
                    args.recipe,
                    root,
                    Path(tmp),
                    f"v{i}",
                    args.folds,
                    [*extra, *overrides.split()],
                    args.jobs,
                )
                cells = " | ".join(spread(found, key) for key in keys)
                print(f"| {name} {overrides} | {cells} | {spread(found, 'minutes')} |", flush=True)
                for f in found:
                    print(
                        "    fold: "
                        + ", ".join(f"{k} {f.get(k, np.nan):.4f}" for k in (*keys, "minutes"))
                    )
    print("published (BENCHMARKS.md):")
    for line in reference_lines():
        print(f"  - {line}")


if __name__ == "__main__":
    main()
