"""`python -m medx.eval ckpt_path=PATH [group=choice] [key=value ...]`: evaluate a checkpoint.

The model comes from the checkpoint alone (`medx.models.load`). The data split, preprocessing
and evaluation settings come from the training run's config: `config=PATH` when given, else the
run's `config.yaml` next to `checkpoints/`, else the copy every checkpoint carries in its model
card (so a checkpoint copied alone to another folder evaluates too), and the test metrics come
out the same. `key=value` changes a key (`data.root=...`); `data=choice` swaps a whole group
for its config file. The result is a new MLflow run (`eval-<run name>`, tagged with the source
run) holding the clinical evaluation of `medx.evaluation`.

`ckpt_path=[a.ckpt,b.ckpt]` (Hydra's list syntax) evaluates the ensemble of the checkpoints,
their mean probability, on the first one's run config; the runs must share the data config.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import lightning as L
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import instantiate
from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf, open_dict

from medx import schema
from medx.cli import user_errors
from medx.config import compose, config_dir
from medx.errors import ConfigError
from medx.evaluation.callback import ClinicalEvaluation
from medx.evaluation.ensemble import Ensemble
from medx.evaluation.quality_report import QualityReport
from medx.evaluation.segmentation_report import SegmentationReport
from medx.models.base import declared_inputs
from medx.models.load import card_of, load, read_checkpoint
from medx.tracking import registry, runs, store
from medx.train import one_device

log = logging.getLogger(__name__)

USAGE = (
    "usage: python -m medx.eval ckpt_path=PATH|[PATH,PATH,...] [config=PATH] [group=choice] "
    "[key=value ...]"
)
# How a run was fed, not what it saw: ensemble members may differ here. `fold` changes val only
# (the test split is set aside before the folds), so k-fold models can be ensembled.
MAY_DIFFER = {"batch_size", "num_workers", "augment", "cache", "cache_dir", "fold"}


def checkpoint_paths(value: str) -> list[Path]:
    """`ckpt_path=a.ckpt`, or Hydra's list syntax `ckpt_path=[a.ckpt,b.ckpt]` for an ensemble."""
    if not value.startswith("["):
        return [Path(value)]
    try:
        paths = OverridesParser.create().parse_override(f"ckpt_path={value}").value()
    except HydraException as err:  # the parser raises its base class too
        raise ConfigError(
            f"ckpt_path={value} is no list of paths: write ckpt_path=[a.ckpt,b.ckpt] and quote "
            "a path with spaces or commas ('ckpt_path=[\"my run/a.ckpt\",b.ckpt]')."
        ) from err
    if not paths:
        raise ConfigError("ckpt_path=[] names no checkpoint.")
    return [Path(str(p)) for p in paths]


def load_config(ckpt_path: Path, overrides: list[str], config: Path | None = None) -> DictConfig:
    """The training run's config with `overrides` applied (group swaps composed from conf/)."""
    cfg = _run_config(ckpt_path, config)
    pairs = [o.split("=", 1) for o in overrides]
    groups = {k: v for k, v in pairs if "." not in k and (Path(config_dir()) / k).is_dir()}
    if groups:  # compose the new group with the run's paths, then take it resolved
        keep = [f"paths.{k}={cfg.paths[k]}" for k in ("root_dir", "data_dir", "cache_dir")]
        composed = compose([f"seed={cfg.seed}", *keep, *overrides])
        for group in groups:
            cfg[group] = OmegaConf.to_container(composed[group], resolve=True)
    dotted = [o for (k, _), o in zip(pairs, overrides, strict=True) if k not in groups]
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotted))


def _run_config(ckpt_path: Path, config: Path | None) -> DictConfig:
    """`config`, else the run's config.yaml beside checkpoints/, else the checkpoint's copy."""
    if config is not None:
        if not config.is_file():
            raise ConfigError(f"config={config} does not exist; give the run's config.yaml.")
        return OmegaConf.load(config)
    beside = run_dir(ckpt_path) / "config.yaml"
    if ckpt_path.resolve().parent.name == "checkpoints" and beside.is_file():
        return OmegaConf.load(beside)
    card = card_of(read_checkpoint(ckpt_path))
    if not card.get("config"):
        raise ConfigError(
            f"{ckpt_path} carries no training config (written by an older medx) and no "
            f"{beside} exists: pass config=<the run's output dir>/config.yaml."
        )
    cfg = OmegaConf.create(card["config"])
    if cfg.get("logger") and not os.environ.get("MLFLOW_TRACKING_URI"):
        # the training machine's store may not exist here: use this machine's default store
        with open_dict(cfg):
            cfg.logger.tracking_uri = compose().logger.tracking_uri
    return cfg


def run_dir(ckpt_path: Path) -> Path:
    """The training run's folder for `<run>/checkpoints/x.ckpt`; a lone file's own folder."""
    parent = ckpt_path.resolve().parent
    return parent.parent if parent.name == "checkpoints" else parent


def check_checkpoint(ckpt_path: Path, cfg: DictConfig, num_classes: int) -> None:
    """A checkpoint of another model or data config: say which, before any shape error."""
    saved = read_checkpoint(ckpt_path)["hyper_parameters"]
    wanted = {"backbone": cfg.model.get("backbone"), "num_classes": num_classes}
    found = {k: saved.get(k) for k in wanted}
    if found != wanted:
        raise ConfigError(
            f"{ckpt_path} holds a {found['backbone']} with {found['num_classes']} classes, but "
            f"the config asks for model.backbone={wanted['backbone']} on data={cfg.data.name} "
            f"with {num_classes} classes: evaluate a checkpoint of this config's run, or give "
            "that run's config (config=<its output dir>/config.yaml)."
        )


def check_same_data(first: Path, cfg: DictConfig, other: Path, other_cfg: DictConfig) -> None:
    """Ensemble members must come from runs on the same data: the first run's test split is
    the one evaluated, and another split could hold the other member's training images."""
    a, b = _data_identity(cfg), _data_identity(other_cfg)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    if differ:
        found = "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in differ)
        raise ConfigError(
            f"{first} and {other} come from runs on different data ({found}): an ensemble is "
            "evaluated on the first run's test split, so give checkpoints of runs with the same "
            "data config (model, seed and training settings may differ)."
        )
    if cfg.data.get("fold") != other_cfg.data.get("fold"):
        log.warning(
            "%s and %s are of different folds: the operating point and temperature are chosen "
            "on the first run's val fold, which the other member trained on (optimistic).",
            first,
            other,
        )


def _data_identity(cfg: DictConfig) -> dict:
    data = OmegaConf.to_container(cfg.data, resolve=True)
    found = {k: v for k, v in data.items() if k not in MAY_DIFFER}
    found["inputs"] = declared_inputs(cfg.model._target_)
    return found


def evaluate(
    ckpt_path: Path | Sequence[Path], cfg: DictConfig, overrides: Sequence[str] = ()
) -> dict[str, float]:
    """Test a checkpoint, or the ensemble of several (mean probability), on the data of `cfg`
    (the first checkpoint's run config) with the clinical evaluation; a new MLflow run.

    Further members are checked against their own run configs, with the same `overrides`.
    """
    schema.check(cfg)  # an override out of range (eval.bootstrap=-1) named before the run opens
    ckpts = [ckpt_path] if isinstance(ckpt_path, Path) else [Path(p) for p in ckpt_path]
    members = [(ckpts[0], cfg)] + [(c, load_config(c, list(overrides))) for c in ckpts[1:]]
    for other, other_cfg in members[1:]:
        check_same_data(ckpts[0], cfg, other, other_cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = _new_dir(run_dir(ckpts[0]) / "eval")
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.trainer.default_root_dir = str(output_dir)
        if cfg.get("logger"):
            kind = f"ensemble{len(ckpts)}-" if len(ckpts) > 1 else ""
            cfg.logger.run_name = f"eval-{kind}{cfg.logger.run_name}"
            cfg.logger.tracking_uri = os.environ.get("MLFLOW_TRACKING_URI", cfg.logger.tracking_uri)
            store.check(str(cfg.logger.tracking_uri))  # in seconds, not after MLflow's retries
    loggers = [instantiate(cfg.logger)] if cfg.get("logger") else []
    listed = ",".join(map(str, ckpts))
    with runs.run_status(loggers):
        for logger in runs.mlflow_loggers(loggers):
            given = f"ckpt_path=[{listed}]" if len(ckpts) > 1 else f"ckpt_path={listed}"
            runs.start_run(logger, cfg, output_dir, [given, *overrides])
            _tag_sources(logger, ckpts)
        datamodule = instantiate(cfg.data, _convert_="object")
        datamodule.inputs = declared_inputs(cfg.model._target_)
        datamodule.setup("test")
        model = load_model(members, datamodule.num_classes)
        trainer = one_device(cfg, report_callbacks(cfg), loggers)  # DDP configs: one process
        trainer.test(model, datamodule=datamodule)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    lines = [f"{k} {v:.4f}" for k, v in sorted(metrics.items())]
    log.info("Evaluated %s in %s\n  %s", listed, output_dir, "\n  ".join(lines))
    return metrics


def report_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Every report callback (each acts for its own task only); the clinical evaluation with
    eval.* winning over the run's saved settings, which were resolved from its eval.*."""
    settings = dict((cfg.get("callbacks") or {}).get("clinical_evaluation") or {})
    settings.pop("_target_", None)
    clinical = ClinicalEvaluation(**{**settings, **(cfg.get("eval") or {})})
    return [clinical, SegmentationReport(), QualityReport()]


def load_model(members: list[tuple[Path, DictConfig]], num_classes: int) -> L.LightningModule:
    """The checkpoint's module, or the `Ensemble` of several; each checked against its config."""
    models = []
    for ckpt, member_cfg in members:
        check_checkpoint(ckpt, member_cfg, num_classes)
        models.append(load(ckpt))
    if len(models) == 1:
        return models[0]
    if any(getattr(m, "task", None) != "classification" for m in models):
        raise ConfigError(
            "ckpt_path=[...]: ensembles average class probabilities, so every checkpoint must "
            "be a classifier; evaluate segmentation checkpoints one at a time."
        )
    return Ensemble(models, num_classes)


def _new_dir(parent: Path) -> Path:
    """`<parent>/<date>_<time>`, suffixed when an evaluation of the same second exists."""
    schema.check_output_dir(parent, "medx.eval's output folder", "move that file elsewhere.")
    stamp, n = datetime.now().strftime("%Y-%m-%d_%H-%M-%S"), 0
    while True:
        path = parent / (f"{stamp}-{n}" if n else stamp)
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            n += 1


def _tag_sources(logger: MLFlowLogger, ckpts: list[Path]) -> None:
    """The checkpoints and their training runs, comma-separated in member order."""
    client = logger.experiment
    client.set_tag(logger.run_id, "mlflow.source.name", "medx.eval")
    client.set_tag(logger.run_id, "medx.checkpoint", ",".join(map(str, ckpts)))
    sources = [_source_run(client, logger.experiment_id, ckpt) for ckpt in ckpts]
    if all(sources):
        client.set_tag(logger.run_id, "medx.source_run_id", ",".join(sources))


def _source_run(client: MlflowClient, experiment_id: str, ckpt: Path) -> str | None:
    """The training run of a checkpoint: from its card, else by its run folder."""
    run_id = card_of(read_checkpoint(ckpt)).get("run", {}).get("id")
    if run_id:
        return run_id
    runs = client.search_runs(
        [experiment_id], f"tags.`medx.output_dir` = '{run_dir(ckpt)}'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def main(argv: list[str] | None = None) -> dict[str, float]:
    """CLI: `key=value` arguments, `ckpt_path` required."""
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    args = sys.argv[1:] if argv is None else argv
    named = dict(
        a.split("=", 1) for a in args if "=" in a and a.split("=", 1)[0] in ("ckpt_path", "config")
    )
    if "ckpt_path" not in named or any("=" not in a for a in args):
        sys.exit(USAGE)
    overrides = [a for a in args if a.split("=", 1)[0] not in named]
    with user_errors():
        # models:/NAME/VERSION or models:/NAME@ALIAS: the downloaded checkpoint (and its folder)
        ckpts = [registry.resolve_model_uri(c) for c in checkpoint_paths(named["ckpt_path"])]
        for ckpt in ckpts:  # every file read (and refused, if bad) before any MLflow run
            read_checkpoint(ckpt)
        config = Path(named["config"]) if "config" in named else None
        return evaluate(ckpts, load_config(ckpts[0], overrides, config), overrides)


if __name__ == "__main__":
    main()
