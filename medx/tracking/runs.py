"""MLflow tracking: one run per training job, flat params, config artifacts, honest status.

Lightning's MLFlowLogger does the metric logging; this module adds what a comparable,
reproducible run needs around it: dotted params (never nested dict dumps), the resolved config
and the Hydra overrides as artifacts, the git commit, and an honest end status: FAILED when
anything crashes, also outside `trainer.fit`, KILLED on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from mlflow import MlflowClient
from mlflow.entities import RunTag
from omegaconf import DictConfig, OmegaConf

from medx.tracking import store

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 500  # older MLflow servers reject longer values; the YAML artifact has all


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} → {"a.b": "1"}; `_partial_` markers dropped, long values truncated."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if key == "_partial_":
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            text = str(value)
            too_long = len(text) > MAX_PARAM_LENGTH
            flat[name] = text[: MAX_PARAM_LENGTH - 3] + "..." if too_long else text
    return flat


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the code that ran (medx's own checkout), if it is a git checkout."""
    where = path or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


class EpochMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with metrics stepped by epoch, not by optimizer step.

    medx's modules log once per epoch (train/loss, val/auroc, ...), and the MLflow UI charts a
    metric against its step: epochs are what a user reads them by. Lightning adds the current
    `epoch` to every dict it logs; that becomes the step. A dict without it (the clinical
    evaluation's test metrics) keeps the step it is given.
    """

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        metrics = dict(metrics)
        epoch = metrics.pop("epoch", None)
        super().log_metrics(metrics, step=int(epoch) if epoch is not None else step)


def mlflow_loggers(loggers: list[Logger]) -> list[MLFlowLogger]:
    """The MLflow loggers, on global rank 0 only: one MLflow run per job, not one per rank.

    Lightning's MLFlowLogger is rank-zero-only already (elsewhere its client is a dummy and its
    run id None); every medx write to a run (params, tags, artifacts, end status) goes
    through this list, so other DDP ranks, or the copies torchrun/SLURM start, leave it alone.
    """
    if rank_zero_only.rank != 0:
        return []
    return [lg for lg in loggers if isinstance(lg, MLFlowLogger)]


def start_run(
    logger: MLFlowLogger, cfg: DictConfig, output_dir: Path, overrides: list[str]
) -> None:
    """Create the MLflow run now (not lazily), so even a crash during data setup is recorded.

    A new experiment of a sqlite store keeps its artifacts beside the database
    (medx.tracking.store), not in `./mlruns` of the working directory, MLflow's default. A job
    of a sweep is named by the values it sweeps (`$MEDX_RUN_NAME`, set by
    medx.tracking.sweep.ParentRun), as its siblings share the configured name.
    """
    store.ensure_experiment(MlflowClient(logger._tracking_uri), logger._experiment_name)
    if logger._run_id is None and (name := os.environ.get(RUN_NAME_ENV)):
        logger._run_name = name  # before `logger.experiment` creates the run
    client, run_id = logger.experiment, logger.run_id
    tag_training_experiment(client, logger.experiment_id)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])  # Hydra's own section
    params, where = split_params(flatten(OmegaConf.to_container(job, resolve=True)))
    _log_new_params(logger, params)
    commit = git_commit()
    tags = {
        **where,
        "medx.output_dir": str(output_dir),
        "mlflow.source.name": "medx.train",
        "medx.overrides": " ".join(overrides),
    }
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if parent := os.environ.get("MEDX_PARENT_RUN_ID"):  # set by medx.tracking.sweep.ParentRun
        tags["mlflow.parentRunId"] = parent
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    output_dir.mkdir(parents=True, exist_ok=True)
    config_file = output_dir / "config.yaml"
    config_file.write_text(OmegaConf.to_yaml(job, resolve=True))
    overrides_file = output_dir / "overrides.yaml"
    overrides_file.write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    for path in (config_file, overrides_file):
        client.log_artifact(run_id, str(path))
    log.info("MLflow run %s in %s (%s)", run_id, logger._tracking_uri, logger.name)


RUN_NAME_ENV = "MEDX_RUN_NAME"
# Where a run ran rather than what it ran: tags, so that comparing runs ("show diff only",
# parallel coordinates) shows what differs in the experiments, not in their folders.
WHERE_KEYS = frozenset(
    {"logger.run_name", "logger.tracking_uri", "logger.experiment_name", "ckpt_path"}
)


def is_where(key: str) -> bool:
    """Run names, stores and file locations (paths.*, *_dir, *dirpath, data.root, the data
    file or source folder of `dataset.*`)."""
    last = key.rsplit(".", 1)[-1]
    return (
        key in WHERE_KEYS
        or key.startswith("paths.")
        or last.endswith(("_dir", "dirpath"))
        or last in ("root", "source_root")
        or key in ("dataset.file", "dataset.source")
    )


def split_params(flat: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(params, tags) of a flattened config: what a run is, and where it ran (`is_where`)."""
    params = {k: v for k, v in flat.items() if not is_where(k)}
    return params, {k: v for k, v in flat.items() if is_where(k)}


def log_artifacts(
    loggers: list[Logger], paths: list[Path], artifact_path: str | None = None
) -> None:
    """Upload files to each MLflow run (under `artifact_path`, a folder in the run)."""
    for logger in mlflow_loggers(loggers):
        for path in paths:
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)


def log_params(loggers: list[Logger], params: Mapping[str, Any]) -> None:
    """Log params (nested dicts flattened); file locations among them as tags."""
    params, where = split_params(flatten(params))
    for logger in mlflow_loggers(loggers):
        _log_new_params(logger, params)
        if where:
            logger.experiment.log_batch(
                logger.run_id, tags=[RunTag(k, v) for k, v in where.items()]
            )


EXPERIMENT_KIND = "mlflow.experimentKind"
TRAINING = "custom_model_development"  # MLflow 3's UI: "Machine learning", opens on its runs


def tag_training_experiment(client: MlflowClient, experiment_id: str) -> None:
    """Mark the experiment as model training, unless it has a kind: MLflow 3's UI otherwise
    treats it as a GenAI one and greets with the trace overview instead of the runs table."""
    if EXPERIMENT_KIND not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND, TRAINING)


def _log_new_params(logger: MLFlowLogger, params: dict[str, str]) -> None:
    """Log params; a resumed run keeps its first values (MLflow refuses to change a param)."""
    old = logger.experiment.get_run(logger.run_id).data.params
    changed = sorted(k for k, v in params.items() if k in old and old[k] != v)
    if changed:
        log.info("Resumed run keeps its original params %s (see config.yaml)", changed)
    logger.log_hyperparams({k: v for k, v in params.items() if k not in old})


@contextmanager
def run_status(loggers: list[Logger]) -> Iterator[None]:
    """End the MLflow run FINISHED; FAILED when the body raises; KILLED on Ctrl-C or SIGTERM.

    Lightning ends runs itself only inside `trainer.fit`/`test` (as FAILED, also on Ctrl-C),
    and not at all under fast_dev_run; a crash in data setup or after testing must not leave a
    run RUNNING, and a run stopped on purpose is not a failure.
    """
    with interrupts():
        try:
            yield
        except BaseException as err:
            _terminate(loggers, "KILLED" if stopped_by(err) else "FAILED")
            raise
        _terminate(loggers, "FINISHED")


class Interrupted(KeyboardInterrupt):
    """SIGTERM (what SLURM, `timeout` and `docker stop` send) or SIGINT, raised as Ctrl-C is:
    Lightning stops the fit the same way for both, and the run ends KILLED."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stopped_by(err: BaseException | None) -> int | None:
    """The signal that stopped the run, or None: `err` itself, what it was raised from
    (Lightning turns Ctrl-C into `sys.exit(1)`), or a signal received meanwhile (a DataLoader
    worker killed by the same SIGTERM may raise first)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, Interrupted):
            return err.signum
        if isinstance(err, KeyboardInterrupt):
            return signal.SIGINT
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return _received["signal"]


_received: dict[str, int | None] = {"signal": None}


def _raise_interrupted(signum: int, frame: object) -> None:
    _received["signal"] = signum
    raise Interrupted(signum)


@contextmanager
def interrupts() -> Iterator[None]:
    """While the body runs, SIGTERM and Ctrl-C raise `Interrupted` in the main thread.

    Only default handlers are replaced: one a launcher installed (submitit requeues on
    SIGTERM) or an ignored SIGINT (`nohup`, `cmd &`) is left as it is.
    """
    _received["signal"] = None
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    taken = {s: d for s, d in defaults.items() if signal.getsignal(s) is d}
    for signum in taken:
        signal.signal(signum, _raise_interrupted)
    try:
        yield
    finally:
        for signum, handler in taken.items():
            signal.signal(signum, handler)


def _terminate(loggers: list[Logger], status: str) -> None:
    for logger in mlflow_loggers(loggers):
        if logger.run_id:
            logger.experiment.set_terminated(logger.run_id, status)


def run_info(loggers: list[Logger]) -> dict[str, str]:
    """The MLflow run a model was trained in, for its model card (empty without MLflow)."""
    for logger in mlflow_loggers(loggers):
        info = {"id": logger.run_id, "experiment_id": logger.experiment_id}
        info.update(name=logger._run_name, tracking_uri=logger._tracking_uri)
        if commit := git_commit():
            info["git_commit"] = commit
        return {k: str(v) for k, v in info.items() if v}
    commit = git_commit()
    return {"git_commit": commit} if commit else {}
