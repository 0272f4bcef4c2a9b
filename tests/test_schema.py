"""Config values out of range are named, with their allowed range, before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from medx_cli import run_train
from omegaconf import DictConfig, OmegaConf

from medx.config import compose, config_dir
from medx.errors import ConfigError
from medx.eval import _new_dir
from medx.schema import check
from medx.train import train


@pytest.fixture(scope="module")
def default() -> DictConfig:
    return compose()


def overridden(cfg: DictConfig, override: str) -> DictConfig:
    """`cfg` with `key=value` applied, the value typed as Hydra's command line types it."""
    parsed = OverridesParser.create().parse_override(override)
    cfg = cfg.copy()
    OmegaConf.update(cfg, parsed.key_or_group, parsed.value(), force_add=False)
    return cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.image_size=0", "data.image_size=0 must be an integer >= 1"),
        ("data.image_size=-1", "data.image_size=-1 must be an integer >= 1"),
        ("data.image_size=64.5", "data.image_size=64.5 must be an integer >= 1"),
        ("data.batch_size=0", "data.batch_size=0 must be an integer >= 1"),
        ("data.num_workers=-1", "data.num_workers=-1 must be an integer >= 0"),
        ("seed=abc", "seed='abc' must be an integer, or null"),
        ("seed=true", "seed=True must be an integer, or null"),
        ("optimizer.lr=-1", "optimizer.lr=-1 must be a number > 0"),
        ("optimizer.lr=0", "optimizer.lr=0 must be a number > 0"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 must be an integer >= 1"),
        ("eval.bootstrap=-5", "eval.bootstrap=-5 must be an integer >= 0"),
        ("eval.target_sensitivity=1.5", "eval.target_sensitivity=1.5 must be a number > 0"),
        ("data.val_from_train=1", "data.val_from_train=1 must be a number >= 0 and < 1"),
        ("data.fold=2", "data.fold=2 must be below data.folds=1"),
        (
            "callbacks.model_checkpoint.every_n_train_steps=0",
            "every_n_train_steps=0 must be an integer >= 1, or null",
        ),
    ],
)
def test_a_value_out_of_range_is_named_with_its_range(
    default: DictConfig, override: str, message: str
):
    with pytest.raises(ConfigError) as raised:
        check(overridden(default, override))
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("override", ["data.image_size=0", "trainer.max_epochs=0"])
def test_train_names_the_value_before_the_mlflow_run_opens(make_cfg, tracked_runs, override):
    with pytest.raises(ConfigError) as raised:
        train(make_cfg(override, "scheduler.warmup_epochs=0"))
    assert str(raised.value).startswith(override)
    assert "warmup" not in str(raised.value)  # max_epochs=0 used to blame the warmup
    assert tracked_runs() == []  # no MLflow run opened (and none left RUNNING or FAILED)


def test_every_bad_value_is_named_in_one_message(default: DictConfig):
    cfg = default
    for override in ("data.batch_size=0", "optimizer.lr=-1", "seed=abc"):
        cfg = overridden(cfg, override)
    with pytest.raises(ConfigError) as raised:
        check(cfg)
    text = str(raised.value)
    assert all(k in text for k in ("data.batch_size=0", "optimizer.lr=-1", "seed='abc'"))


@pytest.mark.parametrize("override", ["seed=0", "seed=null", "trainer.gradient_clip_val=null"])
def test_edge_values_that_are_valid_pass(default: DictConfig, override: str):
    check(overridden(default, override))


EXPERIMENTS = sorted(p.stem for p in (Path(config_dir()) / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_shipped_experiment_passes_the_schema(experiment: str):
    check(compose([f"experiment={experiment}"]))


@pytest.mark.slow
def test_the_cli_names_bad_values_and_an_output_folder_that_is_a_file_before_making_anything(
    tmp_path: Path, phantom_cache: Path
):
    a_file = tmp_path / "results"
    a_file.write_text("not a folder")
    out = run_train(tmp_path, phantom_cache, "data.image_size=0", f"hydra.run.dir={a_file}/run")
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("medx: data.image_size=0 must be an integer >= 1")
    assert f"(hydra.run.dir) {a_file}/run: {a_file} is a file, not a folder" in last
    assert "Traceback" not in out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no store, no outputs/


def test_medx_eval_names_an_eval_folder_that_is_a_file(tmp_path: Path):
    (tmp_path / "eval").write_text("")
    with pytest.raises(ConfigError, match=f"folder {tmp_path / 'eval'}: .* is a file"):
        _new_dir(tmp_path / "eval")
