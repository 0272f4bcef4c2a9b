"""`medx.eval` (Hydra, conf/eval.yaml): the run's own config with the command's overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from medx.config import compose
from medx.errors import ConfigError
from medx.eval import checkpoint_paths, load_config
from medx.eval import main as eval_main
from medx.eval import run as eval_run
from medx.models.base import CARD_KEY
from medx.train import train


def saved_run_config(tmp_path: Path) -> Path:
    """A run's config.yaml as medx.train writes it (resolved, without Hydra's section)."""
    cfg = compose([f"paths.root_dir={tmp_path}", "data=phantom", "eval.tta=true"])
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in ("hydra", "paths")])
    job.paths = {"root_dir": str(tmp_path), "data_dir": "/data", "cache_dir": "/cache"}
    path = tmp_path / "config.yaml"
    OmegaConf.save(job, path)
    return path


def test_overrides_apply_to_the_run_config_as_hydra_reads_them(tmp_path: Path):
    config = saved_run_config(tmp_path)
    overrides = [
        "data=pneumonia",
        "eval.bootstrap=50",
        "+eval.note='site b'",
        "~eval.tta",
        "data.classes=[PNEUMONIA,NORMAL]",
    ]
    cfg = load_config(tmp_path / "any.ckpt", overrides, config)
    assert cfg.data.name == "pneumonia"  # the group swapped for its file, with the run's paths
    assert cfg.data.root == "/data/chest_xray"
    assert list(cfg.data.classes) == ["PNEUMONIA", "NORMAL"]  # a list value, as Hydra parses it
    assert cfg.eval.bootstrap == 50 and cfg.eval.note == "site b" and "tta" not in cfg.eval
    assert cfg.model.backbone == "resnet18"  # the rest is the run's


def test_checkpoint_globs_expand_to_an_ensemble_in_sorted_order(tmp_path: Path):
    for fold in ("fold1", "fold0"):
        (tmp_path / fold).mkdir()
        (tmp_path / fold / "best.ckpt").touch()
    assert checkpoint_paths(f"{tmp_path}/*/best.ckpt") == [
        tmp_path / "fold0" / "best.ckpt",
        tmp_path / "fold1" / "best.ckpt",
    ]
    with pytest.raises(ConfigError, match=r"ckpt_path=.*nothing\*.*matches no file"):
        checkpoint_paths(f"{tmp_path}/nothing*/best.ckpt")


def test_a_missing_ckpt_path_is_one_line():
    with pytest.raises(SystemExit, match=r"^medx\.eval: ckpt_path is missing: python -m medx"):
        eval_main(compose([], "eval"))


def test_a_checkpoint_from_before_the_model_card_needs_its_run_config_said_in_one_line(
    make_cfg, tracked_runs, tmp_path: Path
):
    metrics = train(make_cfg("trainer.max_epochs=1", "eval.bootstrap=20"))
    (best,) = (tmp_path / "run" / "checkpoints").glob("epoch*.ckpt")
    ckpt = torch.load(best, weights_only=True)
    del ckpt[CARD_KEY]  # as medx wrote checkpoints before they carried a model card
    old = tmp_path / "elsewhere" / "old.ckpt"
    old.parent.mkdir()
    torch.save(ckpt, old)

    with pytest.raises(SystemExit) as stop:
        eval_main(compose([f"ckpt_path={old}"], "eval"))
    message = str(stop.value.code)
    assert "\n" not in message and str(old) in message and "config=" in message
    assert len(tracked_runs()) == 1  # no eval run opened

    config = tmp_path / "run" / "config.yaml"
    again = eval_run(compose([f"ckpt_path={old}", f"config={config}", "eval.bootstrap=20"], "eval"))
    assert again["test/auroc"] == pytest.approx(metrics["test/auroc"], abs=1e-6)
    evaluated = next(r for r in tracked_runs() if r.data.tags.get("mlflow.source.name"))
    assert evaluated.data.tags["mlflow.source.name"] == "medx.eval"
    assert evaluated.data.tags["medx.checkpoint"] == str(old)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_help_is_hydra_s_own_page_and_shows_the_overrides(command: str, tmp_path: Path):
    """`--help` answered by medx.cli.hydra_help (fast) is the page Hydra itself prints."""

    def page(code: str) -> str:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    argv = ["--help", "model=vgg16", "eval.bootstrap=7"]
    fast = page(f"import sys; from medx.cli import hydra_help; hydra_help({command!r}, {argv})")
    hydra = page(f"import sys; sys.argv = ['x', *{argv}]; from medx.{command} import main; main()")
    assert fast == hydra
    assert "data: folder, lung_seg," in fast and "backbone: vgg16" in fast
    assert "bootstrap: 7" in fast
    if command == "eval":
        assert fast.startswith("medx.eval: test a checkpoint") and "ckpt_path: null" in fast
