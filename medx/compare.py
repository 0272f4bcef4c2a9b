"""`python -m medx.compare`: rank MLflow runs; table, CSV and bar chart.

    python -m medx.compare                      # by the selected checkpoints' val/auroc_best
    python -m medx.compare --parent <sweep run id> --out compare/
    python -m medx.compare --filter "params.model.backbone = 'resnet18'"
    python -m medx.compare --metric test/auroc  # a test metric only when asked for

Runs rank by the monitored validation metric of the checkpoint each selected (the model it
tested and kept), never by a test metric unless `--metric` names one. Sweep parents (tag
medx.sweep=parent) are left out: they hold summaries, not models.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def bar_chart(table, metric: str, path: Path) -> Path:
    """Bars of `metric` per run (name and short id), with the 95% CI when logged."""
    from medx.evaluation.plots import ranking_figure, save_figure

    shown = table.dropna(subset=[metric]) if metric in table else table.iloc[:0]
    labels = [f"{r} ({i[:6]})" for r, i in zip(shown["run_name"], shown["run_id"], strict=True)]
    low, high = f"{metric}_ci_low", f"{metric}_ci_high"
    cis = (shown[low], shown[high]) if low in shown and high in shown else (None, None)
    return save_figure(ranking_figure(labels, shown.get(metric, []), metric, *cis), path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m medx.compare", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--experiment", default="medx", help="MLflow experiment (logger.experiment_name)"
    )
    parser.add_argument("--parent", help="only the jobs of this sweep (the parent run id)")
    parser.add_argument(
        "--metric",
        help="rank by this metric (default: the selected checkpoint's monitored validation "
        "metric, e.g. val/auroc_best)",
    )
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--ascending", action="store_true", default=None, help="lower is better")
    order.add_argument("--descending", dest="ascending", action="store_false", help="higher is")
    parser.add_argument(
        "--filter",
        default="",
        help="MLflow search filter, e.g. \"params.model.backbone = 'resnet18'\"",
    )
    parser.add_argument("--out", type=Path, help="write compare.csv and compare.png here")
    parser.add_argument(
        "--tracking-uri", help="the store (default: the one medx.train logs to, see docs/mlflow.md)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from mlflow import MlflowClient

    from medx.errors import MedxError
    from medx.tracking import store
    from medx.tracking.compare import ranked_runs

    uri = args.tracking_uri or store.default_uri()
    try:
        if args.out is not None and args.out.exists() and not args.out.is_dir():
            raise MedxError(f"--out {args.out} is a file; give a folder for compare.csv/.png.")
        store.check(uri, write=False)  # never create a database where none was
        with store.reading(uri):
            table, metric, ascending = ranked_runs(
                MlflowClient(tracking_uri=uri),
                args.experiment,
                args.metric,
                args.parent,
                args.filter,
                args.ascending,
            )
    except MedxError as err:
        raise SystemExit(f"medx: {err}") from err
    log.info("Ranked by %s (%s first)", metric, "lowest" if ascending else "highest")
    shown = table.drop(columns=["run_id"])
    print(shown.to_string(index=False, float_format=lambda v: f"{v:.4f}"))  # the CLI's output
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.out / "compare.csv", index=False)
        bar_chart(table, metric, args.out / "compare.png")
        log.info("Wrote %s and %s", args.out / "compare.csv", args.out / "compare.png")


if __name__ == "__main__":
    main()
