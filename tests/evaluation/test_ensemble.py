"""`medx.eval ckpt_path=[a.ckpt,b.ckpt]`: the ensemble's probability is the mean of its members'."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from mlflow.entities import Run
from omegaconf import OmegaConf, open_dict
from sklearn.metrics import roc_auc_score

from medx.config import compose
from medx.errors import ConfigError
from medx.eval import checkpoint_paths, evaluate, load_config
from medx.eval import run as eval_run
from medx.train import train


def train_run(make_cfg, out_dir: Path, seed: int) -> Path:
    """A tiny run on the shared split (data.seed fixed) with its own training seed.

    lr 1e-2: one epoch moves the two members apart far enough that the mean of their
    probabilities differs from, say, the softmax of their mean logits beyond CSV rounding.
    """
    cfg = make_cfg(
        f"seed={seed}", "data.seed=0", "optimizer.lr=1e-2", "trainer.max_epochs=1", "test=false"
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    train(cfg)
    (best,) = (out_dir / "checkpoints").glob("epoch*.ckpt")
    return best


def predictions(run: Run) -> list[dict[str, str]]:
    path = Path(run.data.tags["medx.output_dir"]) / "evaluation" / "test_predictions.csv"
    with path.open() as f:
        return list(csv.DictReader(f))


def test_an_ensemble_of_two_checkpoints_evaluates_their_mean_probability(
    make_cfg, tracked_runs, tmp_path: Path
):
    a = train_run(make_cfg, tmp_path / "a", seed=1)
    b = train_run(make_cfg, tmp_path / "b", seed=2)
    trained = {r.data.tags["medx.output_dir"]: r.info.run_id for r in tracked_runs()}

    for ckpt in (a, b):
        eval_run(compose([f"ckpt_path={ckpt}", "eval.bootstrap=50"], "eval"))
    metrics = eval_run(compose([f"ckpt_path=[{a},{b}]", "eval.bootstrap=50"], "eval"))

    evals = {
        r.data.tags["medx.checkpoint"]: r
        for r in tracked_runs()
        if r.data.tags.get("mlflow.source.name") == "medx.eval"
    }
    ensemble = evals[f"{a},{b}"]
    assert ensemble.info.status == "FINISHED"
    assert ensemble.info.run_name.startswith("eval-ensemble2-")
    sources = [trained[str(tmp_path / "a")], trained[str(tmp_path / "b")]]
    assert ensemble.data.tags["medx.source_run_id"] == ",".join(sources)
    assert ensemble.data.metrics["test/auroc"] == pytest.approx(metrics["test/auroc"])

    rows_a, rows_b = predictions(evals[str(a)]), predictions(evals[str(b)])
    rows = predictions(ensemble)
    assert [r["path"] for r in rows] == [r["path"] for r in rows_a] == [r["path"] for r in rows_b]
    p_a = [float(r["probability"]) for r in rows_a]
    p_b = [float(r["probability"]) for r in rows_b]
    assert max(abs(x - y) for x, y in zip(p_a, p_b, strict=True)) > 1e-3  # two different models
    for row, x, y in zip(rows, p_a, p_b, strict=True):
        assert float(row["probability"]) == pytest.approx((x + y) / 2, abs=2e-6)
    # the ensemble's AUROC is that of its mean probability (OPACITY is the positive class)
    labels = [r["label"] == "OPACITY" for r in rows]
    expected = roc_auc_score(labels, [float(r["probability"]) for r in rows])
    assert metrics["test/auroc"] == pytest.approx(expected, abs=1e-3)

    # a member trained on another split (its run's data.seed) is refused, naming both files
    other = tmp_path / "c"
    shutil.copytree(tmp_path / "b", other)
    config = OmegaConf.load(other / "config.yaml")
    config.data.seed = 7
    OmegaConf.save(config, other / "config.yaml")
    c = other / "checkpoints" / b.name
    with pytest.raises(ConfigError, match=rf"{a}.* and {c}.*seed: 0 vs 7"):
        evaluate([a, c], load_config(a, []))


@pytest.mark.parametrize("value", ["[a.ckpt,", "[]"])
def test_a_malformed_checkpoint_list_is_a_config_error(value: str):
    with pytest.raises(ConfigError, match=r"ckpt_path="):
        checkpoint_paths(value)


def test_checkpoint_paths_reads_one_path_or_a_list():
    assert checkpoint_paths("runs/a.ckpt") == [Path("runs/a.ckpt")]
    assert checkpoint_paths("[runs/a.ckpt,'my runs/b.ckpt']") == [
        Path("runs/a.ckpt"),
        Path("my runs/b.ckpt"),
    ]
