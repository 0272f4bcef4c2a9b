"""What keeps medx.train's own cost small (benchmarks/overhead.py measures it): checkpoints
written without torch's CRC-32 and still loading, a progress bar that does not redraw 100
times a second, evaluation batches twice the training batch."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from hydra.utils import instantiate

from medx.config import compose
from medx.models.load import load
from medx.train import train


def test_checkpoints_skip_the_checksum_and_still_load(make_cfg, tmp_path: Path):
    cfg = make_cfg("trainer.max_epochs=1", "test=false")

    train(cfg)

    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    assert {p.name for p in checkpoints} == {"epoch000.ckpt", "last.ckpt"}
    for path in checkpoints:
        with zipfile.ZipFile(path) as archive:
            assert archive.testzip() is not None  # no CRC written: the 3/4 of a save saved
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state["epoch"] == 0 and state["state_dict"]
        assert load(path).card["task"] == "classification"
    assert torch.serialization.get_crc32_options()  # restored for everything else


def test_progress_bar_redraws_at_most_ten_times_a_second():
    cfg = compose([])

    bar = instantiate(cfg.callbacks.rich_progress_bar)

    assert 0 < bar.refresh_rate <= 10


def test_evaluation_batches_are_twice_the_training_batch(phantom_cache: Path):
    cfg = compose([f"paths.cache_dir={phantom_cache}", "data.n_patients=60", "data.num_workers=0"])
    datamodule = instantiate(cfg.data, _convert_="object")
    datamodule.setup("fit")

    assert datamodule.train_dataloader().batch_size == cfg.data.batch_size
    for loader in (datamodule.val_dataloader(), datamodule.test_dataloader()):
        assert loader.batch_size == 2 * cfg.data.batch_size
