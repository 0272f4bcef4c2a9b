"""The allowed values of medx's own config keys, checked as soon as the config is composed.

A bad value (`data.image_size=0`, `seed=abc`, `trainer.max_epochs=0`) would otherwise surface
as a library traceback deep in torchvision or Lightning, after the MLflow run was opened, or
blame another key. `check(cfg)` reads the table below and raises one `ConfigError` naming
every bad key and its allowed range. Keys a config does not have (another data family, another
optimizer) are skipped; cross-key rules that need built objects stay where they are built
(e.g. `scheduler.warmup_epochs` below `trainer.max_epochs` in medx/models/schedulers.py).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from medx.data.intensity import METHODS as INTENSITY_METHODS
from medx.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    """An integer or a number within [low, high] (open at a bound marked `*_open`), or null."""

    integer: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False
    choices: tuple[str, ...] = ()  # a word from this list (then no number bounds)

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if self.choices:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, Real):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.choices:
            return f"one of {', '.join(self.choices)}" + (", or null" if self.nullable else "")
        kind = "an integer" if self.integer else "a number"
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>' if self.low_open else '>='} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<' if self.high_open else '<='} {self.high:g}")
        text = f"{kind} {' and '.join(bounds)}".rstrip()
        return f"{text}, or null" if self.nullable else text


def integer(low: int | None = None, high: int | None = None, nullable: bool = False) -> Rule:
    return Rule(integer=True, low=low, high=high, nullable=nullable)


def positive() -> Rule:
    return Rule(low=0, low_open=True)


def fraction(high_open: bool = True) -> Rule:
    """[0, 1) by default: a share that must leave something over."""
    return Rule(low=0, high=1, high_open=high_open)


def one_of(*choices: str) -> Rule:
    return Rule(choices=choices)


RULES: dict[str, Rule] = {
    "seed": integer(nullable=True),
    "data.image_size": integer(low=1),
    "data.batch_size": integer(low=1),
    "data.num_workers": integer(low=0),
    "data.val_from_train": fraction(),
    "data.test_from_train": fraction(),
    "data.folds": integer(low=1),
    "data.fold": integer(low=0),  # and below data.folds: see _cross_checks
    "data.n_patients": integer(low=1),
    "data.images_per_patient": integer(low=1),
    "data.prevalence": fraction(high_open=False),
    "data.augment": one_of("none", "light", "strong", "acquisition"),
    "data.duplicates": one_of("warn", "error", "drop"),
    "data.intensity": one_of(*INTENSITY_METHODS),
    "data.cache": one_of("disk", "memory", "none"),
    "optimizer.lr": positive(),
    "optimizer.weight_decay": Rule(low=0),
    "optimizer.momentum": fraction(),
    "scheduler.warmup_epochs": integer(low=0),
    "trainer.max_epochs": integer(low=1),
    "trainer.min_epochs": integer(low=0, nullable=True),
    "trainer.log_every_n_steps": integer(low=1),
    "trainer.gradient_clip_val": Rule(low=0, nullable=True),
    "trainer.accumulate_grad_batches": integer(low=1),
    "strategy.unfreeze_last": integer(low=0, nullable=True),
    "strategy.backbone_lr_scale": positive(),
    "strategy.head_epochs": integer(low=0),
    "loss.label_smoothing": fraction(),
    "loss.gamma": Rule(low=0),
    "mixup.prob": fraction(high_open=False),
    "mixup.mixup_alpha": Rule(low=0),
    "mixup.cutmix_alpha": Rule(low=0),
    "model.drop_rate": fraction(),
    "eval.bootstrap": integer(low=0),
    "eval.target_sensitivity": Rule(low=0, high=1, low_open=True),
    "callbacks.early_stopping.patience": integer(low=0),
    "callbacks.model_checkpoint.save_top_k": integer(low=-1),
    "callbacks.model_checkpoint.every_n_train_steps": integer(low=1, nullable=True),
}


def check(cfg: DictConfig) -> None:
    """Raise one ConfigError naming each key of RULES whose value is outside its range."""
    problems = []
    for key, rule in RULES.items():
        found, value = _select(cfg, key)
        if found and not rule.accepts(value):
            problems.append(f"{key}={_show(value)} must be {rule.describe()}")
    problems += _cross_checks(cfg)
    if problems:
        raise ConfigError("; ".join(problems) + ". Fix the override or the config file.")


def check_output_dir(path: Path, what: str, hint: str) -> None:
    """A folder medx will write into must not be, or lie under, a file (mkdir and Hydra would
    say only FileExistsError or NotADirectoryError)."""
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise ConfigError(f"{what} {path}: {part} is a file, not a folder; {hint}")
            return


class CheckBeforeRun(Callback):
    """Hydra callback: the values and the output folder of `python -m medx.train`, checked
    before Hydra creates that folder (and before a sweep opens its parent MLflow run).

    Hydra turns exceptions raised in callbacks into warnings, hence the exit; `train()`
    checks the values again, for Python callers and for every job of a sweep.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir", values=True)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir", values=False)  # sweep values reach each job

    @staticmethod
    def _check(config: DictConfig, key: str, values: bool) -> None:
        problems = []
        checks = [lambda: check(config)] if values else []
        folder = Path(str(OmegaConf.select(config, key)))
        hint = "give a folder (paths.root_dir or $MEDX_HOME holds outputs/ and multirun/)."
        checks.append(lambda: check_output_dir(folder, f"The output folder ({key})", hint))
        for run_check in checks:
            try:
                run_check()
            except ConfigError as err:
                problems.append(str(err))
        if problems:
            sys.exit(f"medx: {' '.join(problems)}")


def _cross_checks(cfg: DictConfig) -> list[str]:
    found, folds = _select(cfg, "data.folds")
    has_fold, fold = _select(cfg, "data.fold")
    valid = RULES["data.folds"].accepts(folds) and RULES["data.fold"].accepts(fold)
    if found and has_fold and valid and fold >= folds:
        return [f"data.fold={fold} must be below data.folds={folds} (folds count from 0)"]
    return []


def _select(cfg: DictConfig, key: str) -> tuple[bool, Any]:
    """(whether the config has `key`, its resolved value)."""
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        return False, None
    if OmegaConf.is_missing(parent, leaf):
        return False, None  # `???`: the owner of that key says what to give
    return True, parent[leaf]


def _show(value: Any) -> str:
    return "null" if value is None else str(value) if not isinstance(value, str) else repr(value)
