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
from medx.tracking import runs, store

log = logging.getLogger(__name__)

PARENT_ENV = "MEDX_PARENT_RUN_ID"
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


def leaderboard(runs: list[Run], metric: str, mode: str = "max") -> pd.DataFrame:
    """Runs ranked by `metric` (best first; runs without it last), one row each."""
    rows = []
    for run in runs:
        row: dict[str, Any] = {
            "run_name": run.info.run_name,
            "run_id": run.info.run_id,
            "status": run.info.status,
            "overrides": run.data.tags.get("medx.overrides", ""),
        }
        row.update(run.data.metrics)
        rows.append(row)
    table = pd.DataFrame(rows)
    if metric in table:
        table = table.sort_values(metric, ascending=mode == "min", na_position="last")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table.reset_index(drop=True)


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
            tags={SWEEP_TAG: "parent", "medx.sweep_dir": str(sweep_dir)},
        )
        self.run_id = run.info.run_id
        self.swept = swept_keys(overrides)
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

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.client is None or self.run_id is None:
            return
        parent = self.client.get_run(self.run_id)
        runs = children(self.client, parent)
        if runs:
            params = runs[0].data.params
            metric = params.get("monitor") or "val/auroc"
            table = leaderboard(runs, metric, params.get("monitor_mode") or "max")
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "leaderboard.csv"
                table.to_csv(path, index=False)
                self.client.log_artifact(self.run_id, str(path))
            if "data.fold" in self.swept:
                for name, value in fold_statistics(runs).items():
                    self.client.log_metric(self.run_id, name, value)
            results = self.sweep_dir / OPTUNA_RESULTS if self.sweep_dir else None
            if results is not None and results.is_file():
                log_optuna_results(self.client, self.run_id, results, metric)
        self._end("FINISHED")

    def _end(self, status: str) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status)
            log.info("MLflow parent run %s %s", self.run_id, status)
        self.run_id = None
        os.environ.pop(PARENT_ENV, None)
