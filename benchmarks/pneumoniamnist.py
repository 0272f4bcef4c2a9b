"""Issue 3: PneumoniaMNIST with 3 seeds against the MedMNIST v2 table.

Trains `experiment=<recipe>` (default `pneumoniamnist_cpu`) on
`$MEDX_DATA/pneumoniamnist/pneumoniamnist.npz` (official splits; selection on val AUC only),
once per seed, and prints test AUC and ACC (mean ± sd), the wall time per run and the
published rows of `../shared/BENCHMARKS.md` beside them.
Targets: AUC >= .970, ACC >= .900 (mean of 3 seeds), <= 15 min a run on a 2-core CPU.

Usage: MEDX_DATA=/path python benchmarks/pneumoniamnist.py [--recipe NAME] [--seeds 0 1 2]
       [--jobs 3] [extra overrides...]
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

TARGET_AUC, TARGET_ACC, TARGET_MINUTES = 0.970, 0.900, 15.0
REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "BENCHMARKS.md"


def reference_rows(path: Path = REFERENCE) -> list[tuple[str, str, str]]:
    """The (method, AUC, ACC) rows of the PneumoniaMNIST table in BENCHMARKS.md."""
    if not path.is_file():
        return []
    section = path.read_text().split("## PneumoniaMNIST", 1)[-1].split("\n## ", 1)[0]
    return re.findall(r"^\| ([^|]+?) \| (\.\d+) \| (\.\d+) \|$", section, flags=re.M)


def run(recipe: str, seed: int, npz_dir: Path, home: Path, extra: list[str], threads: str) -> dict:
    home = home / f"seed{seed}"  # a store per run: parallel runs do not share a sqlite file
    home.mkdir()
    uri = f"sqlite:///{home}/mlflow.db"
    env = {**os.environ, "MEDX_HOME": str(home), "MLFLOW_TRACKING_URI": uri}
    if threads:
        env["OMP_NUM_THREADS"] = threads
    command = [
        sys.executable, "-m", "medx.train", f"experiment={recipe}", f"seed={seed}",
        f"data.root={npz_dir}", "logger.experiment_name=pneumoniamnist_bench",
        f"logger.run_name={recipe}-seed{seed}",
        "trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null", *extra,
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=home, stdout=subprocess.DEVNULL)
    minutes = (time.perf_counter() - start) / 60
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("pneumoniamnist_bench").experiment_id
    (found,) = client.search_runs(
        [experiment], filter_string=f"tags.mlflow.runName = '{recipe}-seed{seed}'"
    )
    metrics = found.data.metrics
    best_val = max(m.value for m in client.get_metric_history(found.info.run_id, "val/auroc"))
    print(
        f"  seed {seed}: test AUC {metrics['test/auroc']:.4f}  ACC {metrics['test/acc']:.4f}  "
        f"(best val AUC {best_val:.4f}, sens {metrics['test/sensitivity']:.3f}, "
        f"spec {metrics['test/specificity']:.3f}, ECE {metrics.get('test/ece', float('nan')):.3f})"
        f"  {minutes:.1f} min",
        flush=True,
    )
    return {"auc": metrics["test/auroc"], "acc": metrics["test/acc"], "minutes": minutes}


def spread(values: np.ndarray) -> str:
    sd = values.std(ddof=1) if len(values) > 1 else 0.0
    return f"{values.mean():.3f} ± {sd:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="pneumoniamnist_cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once; >1 gives each one thread (on 2 cores, 3 single-thread runs "
        "finish sooner than 3 two-thread runs one after the other)",
    )
    args, extra = parser.parse_known_args()
    npz_dir = Path(os.environ.get("MEDX_DATA", "")) / "pneumoniamnist"
    if not (npz_dir / "pneumoniamnist.npz").is_file():
        sys.exit(f"Set MEDX_DATA so that {npz_dir}/pneumoniamnist.npz exists")
    print(
        f"PneumoniaMNIST, experiment={args.recipe} {' '.join(extra)}, {os.cpu_count()} CPUs, "
        f"{args.jobs} run(s) at once"
    )
    with tempfile.TemporaryDirectory() as home:
        threads = "1" if args.jobs > 1 else ""
        with ThreadPoolExecutor(args.jobs) as pool:
            futures = [
                pool.submit(run, args.recipe, s, npz_dir, Path(home), extra, threads)
                for s in args.seeds
            ]
            results = [f.result() for f in futures]
    auc, acc, minutes = (np.array([r[k] for r in results]) for k in ("auc", "acc", "minutes"))
    print("\n| method | AUC | ACC | min/run (2-core CPU) |\n|---|---|---|---|")
    print(
        f"| medx {args.recipe} ({len(results)} seeds) | {spread(auc)} | {spread(acc)} "
        f"| {minutes.mean():.1f} (max {minutes.max():.1f}) |"
    )
    for method, ref_auc, ref_acc in reference_rows():
        print(f"| {method} | {ref_auc} | {ref_acc} | |")
    print(
        f"\ntargets: AUC >= {TARGET_AUC} (ratio {auc.mean() / TARGET_AUC:.3f}), "
        f"ACC >= {TARGET_ACC} (ratio {acc.mean() / TARGET_ACC:.3f}), "
        f"<= {TARGET_MINUTES:.0f} min/run (ratio {minutes.max() / TARGET_MINUTES:.2f})"
    )


if __name__ == "__main__":
    main()
