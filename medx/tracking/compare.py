"""Ranking MLflow runs for `python -m medx.compare`.

By default runs rank by the monitored validation metric of the checkpoint each one selected
(`val/auroc_best`, logged by medx.tracking.reporting.RunReport): the model a run tested and
kept. Never by a test metric unless asked with `--metric`: choosing among models by their test
score makes that score an optimistic estimate.
"""

from __future__ import annotations

import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from medx.errors import MedxError
from medx.tracking.sweep import PARENT_TAG, SWEEP_TAG, ranking_metric, selection, varying_params

PARAMS = ("model.backbone", "data.name", "strategy.name")
METRICS = ("test/auroc", "test/acc", "test/f1", "test/sensitivity", "test/specificity")


def default_ranking(runs: list[Run]) -> tuple[str, bool]:
    """(metric, ascending): the selected checkpoint's monitored metric most runs were selected
    by, in its direction (`min` ranks ascending)."""
    monitor, mode = selection(runs)
    return ranking_metric(runs, monitor), mode == "min"


def ranked_runs(
    client: MlflowClient,
    experiment: str,
    metric: str | None = None,
    parent: str | None = None,
    filter_string: str = "",
    ascending: bool | None = None,
) -> tuple[pd.DataFrame, str, bool]:
    """(table, metric, ascending): one row per run (name, key params, the params its sweep
    varied, the ranking metric and its epoch, test metrics with CIs), best first.

    `metric` None: the selection metric (`default_ranking`). Nothing to compare is an error
    naming what matched nothing (the experiment, `--parent`, `--filter`, `--metric`), not an
    empty table and exit status 0.
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
    chosen, lower_first = default_ranking(runs)
    metric = metric or chosen
    ascending = lower_first if ascending is None else ascending
    if not any(metric in r.data.metrics for r in runs):
        logged = sorted({k for r in runs for k in r.data.metrics if "_ci_" not in k})
        raise MedxError(
            f"--metric {metric}: none of the {len(runs)} runs logged it; they logged "
            f"{', '.join(logged[:20]) or 'no metrics'}{' ...' if len(logged) > 20 else ''}."
        )
    swept = [p for p in varying_params(runs) if p not in PARAMS] if parent else []
    epoch = f"{metric}_epoch" if metric.endswith("_best") else None
    rows = []
    for run in runs:
        row = {"run_name": run.info.run_name, "run_id": run.info.run_id}
        row.update({p: run.data.params.get(p) for p in (*PARAMS, *swept)})
        for name in dict.fromkeys((metric, *([epoch] if epoch else []), *METRICS)):
            for key in (name, f"{name}_ci_low", f"{name}_ci_high"):
                if key in run.data.metrics:
                    row[key] = run.data.metrics[key]
        rows.append(row)
    table = pd.DataFrame(rows).sort_values(metric, ascending=ascending, na_position="last")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True), metric, ascending


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
