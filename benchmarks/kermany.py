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
import hashlib
import json
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
    at once never contend for one), the decoded-image cache shared; its MLflow metrics and its
    best checkpoint (`ckpt`). A run already finished in `home` with the same composed config
    (overrides and the recipe's files as they are now) is read back instead of trained again
    (`--home`: a comparison stopped half-way resumes; an edited recipe trains again)."""
    shared_cache = home / ".cache" / "medx"
    home = home / name
    home.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{home}/mlflow.db"
    env = {**os.environ, "MEDX_HOME": str(home), "MLFLOW_TRACKING_URI": uri, **(env_extra or {})}
    overrides = [
        f"experiment={recipe}", f"data.root={data_root}",
        f"logger.experiment_name={EXPERIMENT}", f"logger.run_name={name}",
        "trainer.enable_progress_bar=false", "callbacks.rich_progress_bar=null",
        f"paths.cache_dir={shared_cache}", *extra,
    ]  # fmt: skip
    config = recipe_config(overrides)
    record = home / "result.json"
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved["overrides"] == overrides and saved.get("config") == config:
            return saved["metrics"]
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "medx.train", *overrides],
        check=True, env=env, cwd=home, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    minutes = (time.perf_counter() - start) / 60
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT).experiment_id
    found = client.search_runs([experiment], filter_string=f"tags.mlflow.runName = '{name}'")[0]
    history = client.get_metric_history(found.info.run_id, "val/auroc")  # the selection metric
    best = {"val/auroc_best": max(m.value for m in history)} if history else {}
    (ckpt,) = sorted(home.glob("outputs/*/*/checkpoints/epoch*.ckpt"))[-1:]
    metrics = {**found.data.metrics, **best, "minutes": minutes, "ckpt": str(ckpt)}
    record.write_text(
        json.dumps({"overrides": overrides, "config": config, "metrics": metrics}, indent=1)
    )
    return metrics


def recipe_config(overrides: list[str]) -> str:
    """The run's config as `medx.train` composes it (interpolations unresolved: no clock)."""
    from omegaconf import OmegaConf

    from medx.config import compose

    cfg = OmegaConf.to_container(compose(overrides))
    cfg.pop("hydra", None)  # Hydra's own section: the run's folder and clock, not the recipe
    return OmegaConf.to_yaml(cfg)


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
# --stress with --folds: the fold models re-read on their val fold (benchmarks/fold_eval.py)
POSTHOC_KEYS = (
    "auroc", "threshold", "sens", "spec", "stress/auroc_worst", "stress/sens_worst",
    "stress/spec_worst", "stress/spec_mean",
)  # fmt: skip


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "variant"


def spread(found: list[dict], key: str) -> str:
    values = np.array([f.get(key, np.nan) for f in found], dtype=float)
    return f"{np.nanmean(values):.3f} ± {np.nanstd(values):.3f}"


def table(title: str, rows: list[tuple[str, list[dict]]], keys: list[str], names=None) -> None:
    """A markdown table of mean ± sd over folds, one row per (label, per-fold dicts)."""
    print(f"\n{title}")
    print(f"| variant | {' | '.join(names or keys)} |")
    print(f"|---|{'---|' * len(keys)}")
    for label, found in rows:
        print(f"| {label} | {' | '.join(spread(found, k) for k in keys)} |")


def posthoc(
    home: Path, label: str, ckpts: list[list[str]], tta: bool, args: argparse.Namespace
) -> list[dict]:
    """`fold_eval.evaluate` of each fold's model(s), cached in `home/posthoc` (reruns reprint)."""
    import fold_eval  # benchmarks/fold_eval.py: torch and medx, imported when needed

    found = []
    for fold, members in enumerate(ckpts):
        plan = {"ckpts": members, "tta": tta, "images": args.stress_images,
                "severities": args.severities, "stress": args.stress}  # fmt: skip
        key = hashlib.sha1(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
        cache = home / "posthoc" / f"{key}.json"
        if not cache.is_file():
            start = time.perf_counter()
            summary, rows = fold_eval.evaluate(
                fold_eval.model([Path(c) for c in members], tta),
                fold_eval.val_fold(Path(members[0])),
                args.stress_images,
                args.severities,
                fold_eval.FAMILIES if args.stress else (),
            )
            summary["eval_minutes"] = (time.perf_counter() - start) / 60
            cache.parent.mkdir(exist_ok=True)
            cache.write_text(json.dumps({**plan, "summary": summary, "rows": rows}, indent=1))
        summary = json.loads(cache.read_text())["summary"]
        print(
            f"    {label} fold {fold}: "
            + ", ".join(
                f"{k} {summary.get(k, np.nan):.4f}" for k in (*POSTHOC_KEYS, "eval_minutes")
            ),
            flush=True,
        )
        found.append(summary)
    return found


def compare(args: argparse.Namespace, extra: list[str], root: Path, home: Path) -> None:
    """Variants on the same patient-grouped folds, all (variant, fold) runs `jobs` at a time
    (one torch thread each: two 1-thread runs use 2 CPUs better than one 2-thread run);
    with --stress / --tta / --ensemble, the fold models re-read on their val fold."""
    variants = [("recipe", "")] + [v.partition("=")[::2] for v in args.variant]
    names = [n for n, _ in variants]
    k = args.folds
    print(
        f"{args.recipe} {' '.join(extra)}: {k} patient-grouped folds, mean ± sd over folds "
        "(validation only: nothing here looks at a test split)",
        flush=True,
    )

    def one(name: str, overrides: str, fold: int) -> dict:
        in_process = [] if args.jobs == 1 else ["data.num_workers=0"]  # no loader workers
        return run(
            args.recipe,
            root,
            home,
            f"{slug(name)}-fold{fold}",
            [f"data.folds={k}", f"data.fold={fold}", *in_process, *extra, *overrides.split()],
            {"OMP_NUM_THREADS": "1"} if args.jobs > 1 else {},
        )

    trained: dict[str, list[dict]] = {}
    evaluated: list[tuple[str, list[dict]]] = []
    single = args.stress or args.tta or args.ensemble
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = {(n, f): pool.submit(one, n, o, f) for n, o in variants for f in range(k)}
        for name in names:
            found = trained[name] = [futures[(name, f)].result() for f in range(k)]
            for f in found:
                print(
                    f"    {name} fold: "
                    + ", ".join(f"{x} {f.get(x, np.nan):.4f}" for x in (*FOLD_KEYS, "minutes")),
                    flush=True,
                )
            if single:
                evaluated.append(
                    (name, posthoc(home, name, [[f["ckpt"]] for f in found], False, args))
                )
    for name in args.tta:
        ckpts = [[f["ckpt"]] for f in trained[name]]
        evaluated.append((f"{name} + TTA", posthoc(home, f"{name} + TTA", ckpts, True, args)))
    for spec in args.ensemble:
        label, _, members = spec.partition("=")
        ckpts = [[trained[m][f]["ckpt"] for m in members.split("+")] for f in range(k)]
        evaluated.append((label, posthoc(home, label, ckpts, False, args)))

    labels = {n: f"{n} {o}".strip() for n, o in variants}
    table(
        "Training (MLflow: val AUROC of the best epoch; the threshold chosen on val for "
        "sensitivity 0.95 and val specificity at it; val NLL after temperature scaling)",
        [(labels[n], trained[n]) for n in names],
        [*FOLD_KEYS, "minutes"],
    )
    if not evaluated:
        return
    table(
        f"Best checkpoint re-read on its val fold (clean: whole fold; stress: "
        f"{args.stress_images or 'all'} images of it, severities {args.severities}; "
        "worst over shifts and severities, at the clean val-chosen threshold)",
        evaluated,
        list(POSTHOC_KEYS),
    )
    if args.stress:
        from fold_eval import FAMILIES

        for what in ("auroc", "spec", "sens"):
            table(
                f"Stress, worst {what} per shift family (at the val-chosen threshold)",
                evaluated,
                [f"{s}/{what}" for s in FAMILIES],
                list(FAMILIES),
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="kermany_cpu")
    parser.add_argument("--folds", type=int, default=1, help="> 1: k-fold spread on val")
    parser.add_argument(
        "--variant", action="append", default=[], metavar="NAME=OVERRIDES",
        help="with --folds: compare variants of the recipe on the same folds, e.g. "
        "--variant 'no CLAHE=data.intensity=none' (overrides separated by spaces); repeatable",
    )  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at once")
    parser.add_argument(
        "--stress", action="store_true",
        help="the acquisition-shift stress test (eval.stress): on the test split for one run; "
        "with --folds, on each fold model's val fold (benchmarks/fold_eval.py)",
    )  # fmt: skip
    parser.add_argument(
        "--tta", action="append", default=[], metavar="VARIANT",
        help="with --folds: also evaluate this variant's fold models with TTA; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--ensemble", action="append", default=[], metavar="NAME=A+B",
        help="with --folds: the mean probability of variants A and B's models of each fold "
        "(e.g. the recipe and the recipe with another seed), on that fold's val; repeatable",
    )  # fmt: skip
    parser.add_argument(
        "--stress-images", type=int, default=0,
        help="with --folds --stress: a stratified subsample of each val fold (0: all)",
    )  # fmt: skip
    parser.add_argument(
        "--severities", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3],
        help="with --folds --stress: the severities to apply, e.g. 2,3 (default 1,2,3)",
    )  # fmt: skip
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="keep the runs here (default: a temporary folder); runs found there are reused",
    )
    args, extra = parser.parse_known_args()
    if args.stress and args.folds <= 1:  # one run: medx's own stress test of the test split
        extra += ["eval.stress=true"]
    medx_data = Path(os.environ.get("MEDX_DATA", "../shared/data")).resolve()
    train_dir = medx_data / "chest_xray" / "train"
    if not train_dir.is_dir():
        sys.exit(f"MEDX_DATA={medx_data} has no chest_xray/train: set MEDX_DATA")
    with tempfile.TemporaryDirectory() as tmp:
        home = (args.home or Path(tmp)).resolve()
        root = home / "chest_xray"
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "train").exists():  # val/ and test/ absent: carved by patient
            (root / "train").symlink_to(train_dir)
        if args.folds <= 1:
            show(run(args.recipe, root, home, args.recipe, extra), args.recipe)
        else:
            compare(args, extra, root, home)
    print("published (BENCHMARKS.md):")
    for line in reference_lines():
        print(f"  - {line}")


if __name__ == "__main__":
    main()
