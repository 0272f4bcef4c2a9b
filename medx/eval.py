"""`python -m medx.eval ckpt_path=PATH [config=PATH] [group=choice] [key=value ...]`: evaluate
a checkpoint (Hydra, conf/eval.yaml).

The model comes from the checkpoint alone (`medx.models.load`). The data split, preprocessing
and evaluation settings come from the training run's config: `config=PATH` when given, else the
run's `config.yaml` next to `checkpoints/`, else the copy every checkpoint carries in its model
card (so a checkpoint copied alone to another folder evaluates too), and the test metrics come
out the same. The command's overrides are applied to that config: `key=value` changes a key
(`data.root=...`); `data=choice` swaps a whole group for its config file. Hydra composes
conf/eval.yaml (the train config plus `ckpt_path` and `config`) only to check the overrides and
to show `--help`. The result is a new MLflow run (`eval-<run name>`, tagged with the source run)
holding the clinical evaluation of `medx.evaluation`, written to `<run>/eval/<date>_<time>/`.

`ckpt_path=[a.ckpt,b.ckpt]` (Hydra's list syntax) or a glob (`'ckpt_path=runs/*/best.ckpt'`)
evaluates the ensemble of the checkpoints, their mean probability, on the first one's run
config; the runs must share the data config. `ckpt_path=models:/NAME/VERSION` (or `@ALIAS`)
evaluates a registered model.

Only Hydra and OmegaConf are imported at the top: `--help` answers without torch or MLflow.
"""

from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from medx.cli import hydra_help, user_errors
from medx.config import compose, config_dir
from medx.errors import ConfigError

if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch.loggers import MLFlowLogger
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

# The keys of conf/eval.yaml that are medx.eval's own, not the evaluated run's.
OWN_KEYS = ("ckpt_path", "config")
# How a run was fed, not what it saw: ensemble members may differ here. `fold` changes val only
# (the test split is set aside before the folds), so k-fold models can be ensembled.
MAY_DIFFER = {"batch_size", "num_workers", "augment", "cache", "cache_dir", "fold"}


def run(cfg: DictConfig) -> dict[str, float]:
    """`python -m medx.eval` as a function: the composed conf/eval.yaml in (from Hydra, or
    `medx.config.compose([...], "eval")`), the test metrics out.

    Every checkpoint is resolved (`models:/` URIs downloaded) and read, so a bad file is
    refused, before any MLflow run opens.
    """
    from medx.tracking import registry

    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.get("ckpt_path"):
        raise ConfigError(
            "ckpt_path is missing: python -m medx.eval ckpt_path=PATH (a .ckpt, a list "
            "[a.ckpt,b.ckpt] or a glob for an ensemble, or models:/NAME/VERSION)."
        )
    overrides = run_overrides(cfg)
    ckpts = [registry.resolve_model_uri(c) for c in checkpoint_paths(cfg.ckpt_path)]
    for ckpt in ckpts:
        _read(ckpt)
    config = Path(cfg.config) if cfg.get("config") else None
    return evaluate(ckpts, load_config(ckpts[0], overrides, config), overrides)


def run_overrides(cfg: DictConfig) -> list[str]:
    """The command line's overrides that apply to the evaluated run (all but ckpt_path and
    config), from the composed config's Hydra section, else from Hydra's running job."""
    hydra_cfg = cfg.get("hydra") or (HydraConfig.get() if HydraConfig.initialized() else None)
    given = list(hydra_cfg.overrides.task) if hydra_cfg else []
    parser = OverridesParser.create()
    return [o for o in given if parser.parse_override(o).key_or_group not in OWN_KEYS]


def checkpoint_paths(value: str | Sequence[str]) -> list[Path]:
    """`ckpt_path`'s checkpoints: one path, a list (`[a.ckpt,b.ckpt]`, as Hydra gives it or as
    a string), globs expanded in sorted order."""
    if isinstance(value, str) and value.startswith("["):
        try:
            value = OverridesParser.create().parse_override(f"ckpt_path={value}").value()
        except HydraException as err:  # the parser raises its base class too
            raise ConfigError(
                f"ckpt_path={value} is no list of paths: write ckpt_path=[a.ckpt,b.ckpt] and "
                "quote a path with spaces or commas ('ckpt_path=[\"my run/a.ckpt\",b.ckpt]')."
            ) from err
    paths = []
    for given in [value] if isinstance(value, str) else [str(v) for v in value]:
        if not any(c in given for c in "*?"):
            paths.append(Path(given))
            continue
        found = sorted(glob.glob(given, recursive=True))
        if not found:
            raise ConfigError(f"ckpt_path={given} matches no file; check the pattern.")
        paths += [Path(p) for p in found]
    if not paths:
        raise ConfigError("ckpt_path=[] names no checkpoint.")
    return paths


def load_config(
    ckpt_path: Path, overrides: Sequence[str], config: Path | None = None
) -> DictConfig:
    """The training run's config with Hydra `overrides` applied (group swaps composed from
    conf/ with the run's paths, then taken resolved)."""
    cfg = _run_config(ckpt_path, config)
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    groups = {o.key_or_group for o in parsed if _is_group(o.key_or_group)}
    if groups:
        keep = [f"paths.{k}={cfg.paths[k]}" for k in ("root_dir", "data_dir", "cache_dir")]
        composed = compose([f"seed={cfg.seed}", *keep, *overrides])
        for group in groups:
            cfg[group] = OmegaConf.to_container(composed[group], resolve=True)
    for override in parsed:
        key = override.key_or_group
        if key in groups:
            continue
        if override.is_sweep_override():
            raise ConfigError(f"{override.input_line} sweeps; evaluate one value at a time.")
        if override.is_delete():
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if isinstance(node, DictConfig):
                node.pop(leaf, None)
        else:
            OmegaConf.update(cfg, key, override.value(), merge=True, force_add=True)
    return cfg


def _is_group(key: str) -> bool:
    return "." not in key and (Path(config_dir()) / key).is_dir()


def _run_config(ckpt_path: Path, config: Path | None) -> DictConfig:
    """`config`, else the run's config.yaml beside checkpoints/, else the checkpoint's copy."""
    if config is not None:
        if not config.is_file():
            raise ConfigError(f"config={config} does not exist; give the run's config.yaml.")
        return OmegaConf.load(config)
    beside = run_dir(ckpt_path) / "config.yaml"
    if ckpt_path.resolve().parent.name == "checkpoints" and beside.is_file():
        return OmegaConf.load(beside)
    card = _card(ckpt_path)
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
    from medx.models.load import read_checkpoint

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
    from medx.models.base import declared_inputs

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
    import lightning as L

    from medx import schema
    from medx.models.base import declared_inputs
    from medx.tracking import runs, store
    from medx.train import one_device

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
    from medx.evaluation.callback import ClinicalEvaluation
    from medx.evaluation.quality_report import QualityReport
    from medx.evaluation.segmentation_report import SegmentationReport

    settings = dict((cfg.get("callbacks") or {}).get("clinical_evaluation") or {})
    settings.pop("_target_", None)
    clinical = ClinicalEvaluation(**{**settings, **(cfg.get("eval") or {})})
    return [clinical, SegmentationReport(), QualityReport()]


def load_model(members: list[tuple[Path, DictConfig]], num_classes: int) -> L.LightningModule:
    """The checkpoint's module, or the `Ensemble` of several; each checked against its config."""
    from medx.evaluation.ensemble import Ensemble
    from medx.models.load import load

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
    from medx import schema

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
    run_id = (_card(ckpt).get("run") or {}).get("id")
    if run_id:
        return run_id
    found = client.search_runs(
        [experiment_id], f"tags.`medx.output_dir` = '{run_dir(ckpt)}'", max_results=1
    )
    return found[0].info.run_id if found else None


def _read(ckpt: Path) -> dict[str, Any]:
    from medx.models.load import read_checkpoint

    return read_checkpoint(ckpt)


def _card(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's model card: what eval reads of it is `config` and `run.id`, and a card
    written by an older medx may lack either (said, or looked up by the run folder)."""
    from medx.models.load import card_of

    return card_of(_read(ckpt))


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="eval")
def main(cfg: DictConfig) -> None:
    """Hydra entry point (`python -m medx.eval`, `medx-eval`); user errors are one line."""
    with user_errors("medx.eval"):
        run(cfg)


if __name__ == "__main__":
    if not hydra_help("eval"):  # the same page as Hydra's, without its slow group listing
        main()
