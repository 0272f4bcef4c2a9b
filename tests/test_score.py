"""`python -m medx.score` with a CNN checkpoint from a real (tiny) data=quality run."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from medx.data.io import read_image
from medx.errors import DataError
from medx.inference import QualityGate
from medx.models.load import load
from medx.quality.features import FEATURES
from medx.train import train


@pytest.mark.slow  # a real multi-epoch run: CI's make test-slow
def test_cnn_checkpoint_scores_a_real_folder_as_in_testing(make_cfg, medx_data, tmp_path: Path):
    cfg = make_cfg("data=quality", "data.n_patients=30", "trainer.max_epochs=1", "test=false")
    train(cfg)  # a tiny CNN (timm's test_resnet at 64 px), one epoch
    checkpoint = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    folder = tmp_path / "screen"
    (folder / "NORMAL").mkdir(parents=True)
    for path in sorted((medx_data / "chest_xray" / "train" / "NORMAL").iterdir())[:4]:
        shutil.copy(path, folder / "NORMAL" / path.name)
    cv2.imwrite(str(folder / "tiny.png"), np.zeros((2, 2), np.uint8))
    # a clean test image of the run: its p_bad must be what the model gave it in testing
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    model = load(checkpoint)
    clean = datamodule.splits["test"].degradations.index("")
    source = datamodule.splits["test"].paths[clean]
    shutil.copy(source, folder / f"test_image{source.suffix}")
    with torch.no_grad():
        image, _ = datamodule.test_dataloader().dataset[clean]
        expected = float(torch.softmax(model(image[None]), 1)[0, 1])

    done = subprocess.run(  # the model first, as every medx command takes it
        [sys.executable, "-m", "medx.score", str(checkpoint), str(folder), "--no-progress",
         "--out", str(tmp_path / "scores.csv")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    rows = {Path(r["path"]).name: r for r in csv.DictReader((tmp_path / "scores.csv").open())}
    assert len(rows) == 6
    assert "too small" in rows["tiny.png"]["error"]
    scored = [r for name, r in rows.items() if name != "tiny.png"]
    assert all(0 <= float(r["p_bad"]) <= 1 and r["verdict"] in ("good", "bad") for r in scored)
    assert all(np.isfinite([float(r[name]) for name in FEATURES]).all() for r in scored)
    assert float(rows[f"test_image{source.suffix}"]["p_bad"]) == pytest.approx(expected, abs=1e-4)

    # The checkpoint alone is enough: copied elsewhere, it scores the same; a checkpoint of a
    # run on other data is refused, naming data=quality.
    moved = tmp_path / "elsewhere" / "model.ckpt"
    moved.parent.mkdir()
    shutil.copy(checkpoint, moved)
    assert QualityGate.from_checkpoint(moved).p_bad(read_image(source)) == pytest.approx(
        expected, abs=1e-4
    )
    other = make_cfg("trainer.max_epochs=1", "test=false", "logger=none")
    with open_dict(other):
        other.paths.output_dir = str(tmp_path / "other")
    train(other)
    with pytest.raises(DataError, match="needs a model trained with data=quality"):
        QualityGate.from_checkpoint(tmp_path / "other" / "checkpoints" / "last.ckpt")
