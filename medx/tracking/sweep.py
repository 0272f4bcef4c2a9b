"""One parent MLflow run per `-m` sweep: its jobs as children, a leaderboard, fold statistics,
an Optuna search's best trial.

Hydra calls `ParentRun` (configured under `hydra.callbacks`) in the launching process. The
parent's id reaches each job as `$MEDX_PARENT_RUN_ID`, set by `on_job_start` in the job's own
process: the launching process for the basic launcher, a submitit or Slurm process (which need
not inherit our environment) for the others, which carry the callback there pickled. Then
`medx.tracking.runs.start_run` tags the job's run with `mlflow.parentRunId`, so the MLflow UI nests
the jobs under the sweep.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.utils import get_class
from mlflow import MlflowClient
from mlflow.entities import Run
from omegaconf import DictConfig, OmegaConf

from medx.errors import ConfigError
from medx.tracking import runs, store, views

log = logging.getLogger(__name__)

PARENT_ENV = "MEDX_PARENT_RUN_ID"
NOTE_TAG = "mlflow.note.content"  # a run's description in the MLflow UI (Markdown)
PARENT_TAG = "mlflow.parentRunId"
SWEEP_TAG = "medx.sweep"  # "parent" on the sweep's own run; compare.py leaves those out
OPTUNA_RESULTS = "optimization_results.yaml"  # the Optuna sweeper's best trial, in the sweep dir


def swept_keys(overrides: list[str]) -> list[str]:
    """The keys a sweep varies (`a=x,y`, `range(...)`, `glob(...)`), in command-line order."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]


def children(client: MlflowClient, parent: Run) -> list[Run]:
    """The runs of a sweep's jobs, found by their parent tag."""
    return client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    )


def selection(runs: list[Run]) -> tuple[str, str]:
    """(monitor, mode) most of the runs selected their checkpoints by: the tags of medx's
    RunReport, else the logged config (runs from before), else val/auroc, max."""
    found = Counter()
    for run in runs:
        tags, params = run.data.tags, run.data.params
        monitor = tags.get(views.SELECTION_TAG) or params.get("monitor")
        mode = tags.get(views.SELECTION_MODE_TAG) or params.get("monitor_mode")
        if monitor and monitor != "None":
            found[monitor, mode if mode in ("max", "min") else "max"] += 1
    return found.most_common(1)[0][0] if found else ("val/auroc", "max")


def ranking_metric(runs: list[Run], monitor: str) -> str:
    """The selected checkpoint's `monitor` (`val/auroc_best`) when the runs logged it; the
    last logged `monitor` only for runs from before medx logged that."""
    best = views.selected_metric(monitor)
    return best if any(best in r.data.metrics for r in runs) else monitor


def varying_params(runs: list[Run]) -> list[str]:
    """The params whose values differ between the runs (what a sweep swept), in logged order;
    data-set counts left out (they follow data.fold)."""
    keys = dict.fromkeys(k for r in runs for k in r.data.params if not k.startswith("dataset."))
    return [k for k in keys if len({r.data.params.get(k) for r in runs}) > 1]


def leaderboard(
    runs: list[Run], metric: str, mode: str = "max", params: list[str] | None = None
) -> pd.DataFrame:
    """Runs ranked by `metric` (best first; runs without it last), one row each: name, id,
    status, `params` (the swept ones), overrides, then every metric."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {
            "run_name": run.info.run_name,
            "run_id": run.info.run_id,
            "status": run.info.status,
        }
        row.update({p: run.data.params.get(p) for p in params or []})
        row["overrides"] = run.data.tags.get("medx.overrides", "")
        row.update(run.data.metrics)
        rows.append(row)
    table = pd.DataFrame(rows)
    if metric in table:
        table = table.sort_values(metric, ascending=mode == "min", na_position="last")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


def job_name(overrides: list[str], swept: list[str]) -> str | None:
    """A sweep job's run name: its swept values, `model=resnet18 lr=0.003` (a key by its last
    part unless two swept keys share it)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    values = {o.get_key_element().lstrip("+~"): o.get_value_element_as_str() for o in parsed}
    shown = [k for k in swept if k in values]
    lasts = [k.rsplit(".", 1)[-1] for k in shown]
    parts = [
        f"{last if lasts.count(last) == 1 else key}={values[key]}"
        for key, last in zip(shown, lasts, strict=True)
    ]
    return " ".join(parts) or None


def description(table: pd.DataFrame, metric: str, monitor: str, params: list[str]) -> str:
    """The parent run's description (Markdown): the best job and the leaderboard."""
    epoch_key = views.selected_epoch_metric(monitor)
    test = "test/" + monitor.split("/", 1)[1] if monitor.startswith("val/") else None
    columns = [c for c in (metric, epoch_key, *params, test) if c and c in table]
    best = table.iloc[0]
    lines = []
    if metric in table and pd.notna(best[metric]):
        at = f" at epoch {int(best[epoch_key])}" if pd.notna(best.get(epoch_key)) else ""
        lines += [
            f"**Best: {best['run_name']}**: {monitor} {best[metric]:.4f}{at} "
            f"(run `{best['run_id']}`).",
            "",
        ]
    lines += [
        f"Ranked by `{metric}`: the {monitor} of each job's selected checkpoint (the one it "
        "tested and kept), not of its last epoch; never by a test metric. All metrics: "
        "leaderboard.csv.",
        "",
        "| rank | run | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for _, row in table.head(MAX_DESCRIBED).iterrows():
        cells = [_cell(row.get(c)) for c in columns]
        lines.append(f"| {row['rank']} | {row['run_name']} | " + " | ".join(cells) + " |")
    if len(table) > MAX_DESCRIBED:
        lines.append(f"\n{len(table) - MAX_DESCRIBED} more in leaderboard.csv.")
    return "\n".join(lines)


MAX_DESCRIBED = 40  # rows of the description's table (MLflow keeps tag values < 8000 chars)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if not value.is_integer() else str(int(value))
    return str(value).replace("|", "\\|")


def fold_statistics(runs: list[Run]) -> dict[str, float]:
    """`<metric>_mean` and `<metric>_std` (sample sd) of every val/ and test/ metric of all runs."""
    names = set.intersection(*(set(r.data.metrics) for r in runs)) if runs else set()
    stats: dict[str, float] = {}
    for name in sorted(n for n in names if n.startswith(("val/", "test/"))):
        values = np.array([r.data.metrics[name] for r in runs], dtype=float)
        stats[f"{name}_mean"] = float(values.mean())
        stats[f"{name}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return stats


def check_direction(config: DictConfig) -> None:
    """An optimising sweeper must push the monitored metric the way checkpoints select it."""
    direction = (config.hydra.get("sweeper") or {}).get("direction")
    if direction not in ("maximize", "minimize"):
        return  # the basic sweeper, or a multi-objective list: nothing to compare
    mode = config.get("monitor_mode") or get_class(config.model._target_).monitor_mode
    wanted = "maximize" if mode == "max" else "minimize"
    if direction != wanted:
        metric = config.get("monitor") or get_class(config.model._target_).monitor
        raise ConfigError(
            f"hydra.sweeper.direction={direction} but monitor_mode={mode} ({metric}): set "
            f"hydra.sweeper.direction={wanted}, or monitor_mode to match the direction."
        )


def log_optuna_results(client: MlflowClient, run_id: str, path: Path, metric: str) -> None:
    """The Optuna sweeper's best trial on the parent: `best.<key>` params, `<metric>_best`."""
    results = OmegaConf.load(path)
    client.log_artifact(run_id, str(path))
    if "best_value" not in results:
        return  # several objectives: a Pareto front (`solutions`), in the artifact only
    for key, value in results.best_params.items():
        client.log_param(run_id, f"best.{key}", value)
    client.log_metric(run_id, f"{metric}_best", float(results.best_value))


class ParentRun(Callback):
    """Hydra callback: a parent MLflow run around each multirun (no-op for single runs)."""

    def __init__(self) -> None:
        self.client: MlflowClient | None = None
        self.run_id: str | None = None
        self.swept: list[str] = []
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_direction(config)
        except ConfigError as err:
            sys.exit(f"medx: {err}")  # Hydra turns exceptions raised in callbacks into warnings
        logger = config.get("logger") or {}
        if not str(logger.get("_target_", "")).endswith("MLFlowLogger"):
            return  # logger=csv/none: nothing to nest
        self.client = MlflowClient(tracking_uri=str(logger.tracking_uri))
        # created as a run would create it: artifacts beside the store, the training view
        experiment_id = store.ensure_experiment(self.client, logger.experiment_name)
        runs.tag_training_experiment(self.client, experiment_id)
        overrides = list(config.hydra.overrides.task)
        self.sweep_dir = sweep_dir = Path(str(config.hydra.sweep.dir))
        run = self.client.create_run(
            experiment_id,
            run_name=f"sweep-{sweep_dir.parent.name}-{sweep_dir.name}",
            tags={
                SWEEP_TAG: "parent",
                "medx.sweep_dir": str(sweep_dir),
                "mlflow.source.name": "medx.train -m",
            },
        )
        self.run_id = run.info.run_id
        searched = (config.hydra.get("sweeper") or {}).get("params") or {}  # Optuna's space
        self.swept = list(dict.fromkeys([*swept_keys(overrides), *searched]))
        params = {}  # a key given twice: the last one wins, as in Hydra
        for override in overrides:
            key, _, value = override.partition("=")
            params[f"sweep.{key.lstrip('+~')}"] = value
        for key, value in params.items():
            self.client.log_param(self.run_id, key, value)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "overrides.yaml"
            path.write_text(OmegaConf.to_yaml(OmegaConf.create(overrides)))
            self.client.log_artifact(self.run_id, str(path))
        atexit.register(self._end, "FAILED")  # a job that raises skips on_multirun_end
        log.info("MLflow parent run %s for the sweep over %s", self.run_id, self.swept)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_id is not None:  # submitit jobs unpickle the callback with its run id
            os.environ[PARENT_ENV] = self.run_id
            name = job_name(list(config.hydra.overrides.task), self.swept)
            if name:
                os.environ[runs.RUN_NAME_ENV] = name
            else:
                os.environ.pop(runs.RUN_NAME_ENV, None)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.client is None or self.run_id is None:
            return
        parent = self.client.get_run(self.run_id)
        jobs = children(self.client, parent)
        if jobs:
            monitor, mode = selection(jobs)
            metric = ranking_metric(jobs, monitor)
            params = varying_params(jobs)
            table = leaderboard(jobs, metric, mode, params)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "leaderboard.csv"
                table.to_csv(path, index=False)
                self.client.log_artifact(self.run_id, str(path))
            results = self.sweep_dir / OPTUNA_RESULTS if self.sweep_dir else None
            optuna = results is not None and results.is_file()
            self._summarise(parent, table, monitor, metric, [] if optuna else params)
            self.client.set_tag(self.run_id, NOTE_TAG, description(table, metric, monitor, params))
            if "data.fold" in self.swept:
                for name, value in fold_statistics(jobs).items():
                    self.client.log_metric(self.run_id, name, value)
            if optuna:
                log_optuna_results(self.client, self.run_id, results, monitor)
            self._save_view(parent, monitor, mode, params)
        self._end("FINISHED")

    def _summarise(
        self, parent: Run, table: pd.DataFrame, monitor: str, metric: str, params: list[str]
    ) -> None:
        """The best job on the parent: tags naming it, its score, its swept params."""
        best = table.iloc[0]
        if metric not in table or pd.isna(best[metric]):
            return  # no job got as far as validating
        self.client.set_tag(self.run_id, "medx.best_run_id", best["run_id"])
        self.client.set_tag(self.run_id, "medx.best_run_name", best["run_name"])
        self.client.log_metric(self.run_id, views.selected_metric(monitor), float(best[metric]))
        epoch_key = views.selected_epoch_metric(monitor)
        if epoch_key in table and pd.notna(best[epoch_key]):
            self.client.log_metric(self.run_id, epoch_key, float(best[epoch_key]))
        for key in params:
            if pd.notna(best.get(key)):
                self.client.log_param(self.run_id, f"best.{key}", best[key])

    def _save_view(self, parent: Run, monitor: str, mode: str, params: list[str]) -> None:
        """The sweep's saved view in the experiment, and the one link that opens it."""
        name, state = views.sweep_view(self.run_id, parent.info.run_name, monitor, mode, params)
        views.save_view(self.client, parent.info.experiment_id, self.run_id, name, state)
        base = views.ui_base(self.client.tracking_uri)
        url = views.runs_url(base, parent.info.experiment_id, view=self.run_id)
        served = "" if base != views.DEFAULT_UI else " (serve it with `make ui`)"
        log.info("Compare this sweep's runs in the MLflow UI%s:\n  %s", served, url)

    def _end(self, status: str) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status)
            log.info("MLflow parent run %s %s", self.run_id, status)
        self.run_id = None
        os.environ.pop(PARENT_ENV, None)
        os.environ.pop(runs.RUN_NAME_ENV, None)
