"""`python -m medx.compare`: rank MLflow runs by a metric; table, CSV and bar chart.

    python -m medx.compare --experiment medx --metric test/auroc
    python -m medx.compare --parent <sweep run id> --out compare/
    python -m medx.compare --filter "params.model.backbone = 'resnet18'"

Sweep parents (tag medx.sweep=parent) are left out: they hold summaries, not models.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from medx.errors import MedxError
from medx.tracking import store
from medx.tracking.sweep import PARENT_TAG, SWEEP_TAG

log = logging.getLogger(__name__)

PARAMS = ("model.backbone", "data.name", "strategy.name")
METRICS = ("test/auroc", "test/acc", "test/f1", "test/sensitivity", "test/specificity")


def ranked_runs(
    client: MlflowClient,
    experiment: str,
    metric: str = "test/auroc",
    parent: str | None = None,
    filter_string: str = "",
    ascending: bool = False,
) -> pd.DataFrame:
    """One row per run (name, key params, key metrics with CIs), best `metric` first.

    Nothing to compare is an error naming what matched nothing (the experiment, `--parent`,
    `--filter`, `--metric`), not an empty table and exit status 0.
    """
    uri = client.tracking_uri
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise MedxError(
            f"No MLflow experiment {experiment!r} in {uri}; it has: {', '.join(names) or 'none'}."
        )
    if parent:
        _check_parent(client, parent)
    filters = [f for f in (filter_string, parent and f"tags.`{PARENT_TAG}` = '{parent}'") if f]
    runs = client.search_runs([found.experiment_id], filter_string=" and ".join(filters))
    runs = [r for r in runs if r.data.tags.get(SWEEP_TAG) != "parent"]
    if not runs:
        given = [f"--parent {parent}"] if parent else []
        given += [f"--filter {filter_string!r}"] if filter_string else []
        matching = f" matching {' and '.join(given)}" if given else ""
        raise MedxError(f"No runs in MLflow experiment {experiment!r} ({uri}){matching}.")
    if not any(metric in r.data.metrics for r in runs):
        logged = sorted({k for r in runs for k in r.data.metrics if "_ci_" not in k})
        raise MedxError(
            f"--metric {metric}: none of the {len(runs)} runs logged it; they logged "
            f"{', '.join(logged[:20]) or 'no metrics'}{' ...' if len(logged) > 20 else ''}."
        )
    rows = []
    for run in runs:
        row = {"run_name": run.info.run_name, "run_id": run.info.run_id}
        row.update({p: run.data.params.get(p) for p in PARAMS})
        for name in dict.fromkeys((metric, *METRICS)):
            for key in (name, f"{name}_ci_low", f"{name}_ci_high"):
                if key in run.data.metrics:
                    row[key] = run.data.metrics[key]
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(metric, ascending=ascending, na_position="last")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


def _check_parent(client: MlflowClient, parent: str) -> None:
    """`--parent` must name a run of this store, and a sweep parent at that."""
    try:
        run = client.get_run(parent)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise MedxError(
            f"--parent {parent}: no such run in {client.tracking_uri}; give the run id of a "
            "sweep's parent run (tag medx.sweep=parent, named sweep-<date>-<time>)."
        ) from err
    if run.data.tags.get(SWEEP_TAG) != "parent":
        raise MedxError(
            f"--parent {parent}: run {run.info.run_name!r} is not a sweep's parent run (tag "
            f"{SWEEP_TAG}=parent); give the id of the sweep-<date>-<time> run of your -m sweep."
        )


def bar_chart(table: pd.DataFrame, metric: str, path: Path) -> Path:
    """Horizontal bars of `metric` per run, with the 95% CI as error bars when logged."""
    shown = table.dropna(subset=[metric]) if metric in table else table.iloc[:0]
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(shown) + 1.5))
    values = shown.get(metric, [])
    low, high = f"{metric}_ci_low", f"{metric}_ci_high"
    err = None
    if low in shown and high in shown:
        err = [(values - shown[low]).fillna(0).clip(lower=0), (shown[high] - values).fillna(0)]
    labels = [f"{r} ({i[:6]})" for r, i in zip(shown["run_name"], shown["run_id"], strict=True)]
    ax.barh(labels, values, xerr=err, color="tab:blue", capsize=3)
    ax.invert_yaxis()  # best on top
    ax.set_xlabel(metric)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m medx.compare", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--experiment", default="medx", help="MLflow experiment (logger.experiment_name)"
    )
    parser.add_argument("--parent", help="only the jobs of this sweep (the parent run id)")
    parser.add_argument("--metric", default="test/auroc", help="rank by this metric")
    parser.add_argument("--ascending", action="store_true", help="lower is better (losses)")
    parser.add_argument(
        "--filter",
        default="",
        help="MLflow search filter, e.g. \"params.model.backbone = 'resnet18'\"",
    )
    parser.add_argument("--out", type=Path, help="write compare.csv and compare.png here")
    parser.add_argument(
        "--tracking-uri", help="the store (default: the one medx.train logs to, see README)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    uri = args.tracking_uri or store.default_uri()
    try:
        if args.out is not None and args.out.exists() and not args.out.is_dir():
            raise MedxError(f"--out {args.out} is a file; give a folder for compare.csv/.png.")
        store.check(uri, write=False)  # never create a database where none was
        with store.reading(uri):
            table = ranked_runs(
                MlflowClient(tracking_uri=uri),
                args.experiment,
                args.metric,
                args.parent,
                args.filter,
                args.ascending,
            )
    except MedxError as err:
        raise SystemExit(f"medx: {err}") from err
    shown = table.drop(columns=["run_id"])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))  # the CLI's output
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "compare.csv", index=False)
        bar_chart(table, args.metric, args.out / "compare.png")
        log.info("Wrote %s and %s", args.out / "compare.csv", args.out / "compare.png")


if __name__ == "__main__":
    main()
