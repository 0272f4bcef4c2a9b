"""`python -m medx.compare`: rank MLflow runs by a metric; table, CSV and bar chart.

    python -m medx.compare --experiment medx --metric test/auroc
    python -m medx.compare --parent <sweep run id> --out compare/
    python -m medx.compare --filter "params.model.backbone = 'resnet18'"

Sweep parents (tag medx.sweep=parent) are left out: they hold summaries, not models.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import pandas as pd
from mlflow import MlflowClient

from medx.errors import MedxError
from medx.sweep import PARENT_TAG, SWEEP_TAG

log = logging.getLogger(__name__)

PARAMS = ("model.backbone", "data.name", "strategy.name")
METRICS = ("test/auroc", "test/acc", "test/f1", "test/sensitivity", "test/specificity")


def default_tracking_uri() -> str:
    """The store medx.train logs to: $MLFLOW_TRACKING_URI, else mlflow.db in $MEDX_HOME or ."""
    home = Path(os.environ.get("MEDX_HOME", ".")).resolve()
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home}/mlflow.db"


def ranked_runs(
    client: MlflowClient,
    experiment: str,
    metric: str = "test/auroc",
    parent: str | None = None,
    filter_string: str = "",
    ascending: bool = False,
) -> pd.DataFrame:
    """One row per run (name, key params, key metrics with CIs), best `metric` first."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise MedxError(f"No MLflow experiment {experiment!r} in {client.tracking_uri}.")
    filters = [f for f in (filter_string, parent and f"tags.`{PARENT_TAG}` = '{parent}'") if f]
    runs = client.search_runs([found.experiment_id], filter_string=" and ".join(filters))
    rows = []
    for run in runs:
        if run.data.tags.get(SWEEP_TAG) == "parent":
            continue
        row = {"run_name": run.info.run_name, "run_id": run.info.run_id}
        row.update({p: run.data.params.get(p) for p in PARAMS})
        for name in dict.fromkeys((metric, *METRICS)):
            for key in (name, f"{name}_ci_low", f"{name}_ci_high"):
                if key in run.data.metrics:
                    row[key] = run.data.metrics[key]
        rows.append(row)
    columns = ["run_name", "run_id", *PARAMS, metric]
    table = pd.DataFrame(rows) if rows else pd.DataFrame(columns=columns)
    if metric in table:
        table = table.sort_values(metric, ascending=ascending, na_position="last")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


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
    parser.add_argument("--tracking-uri", default=default_tracking_uri())
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    client = MlflowClient(tracking_uri=args.tracking_uri)
    try:
        table = ranked_runs(
            client, args.experiment, args.metric, args.parent, args.filter, args.ascending
        )
    except MedxError as err:
        raise SystemExit(f"medx: {err}") from err
    shown = table.drop(columns=["run_id"]) if not table.empty else table
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))  # the CLI's output
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "compare.csv", index=False)
        bar_chart(table, args.metric, args.out / "compare.png")
        log.info("Wrote %s and %s", args.out / "compare.csv", args.out / "compare.png")


if __name__ == "__main__":
    main()
