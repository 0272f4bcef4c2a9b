"""What keeps medx.train's own cost small (benchmarks/overhead.py measures it): one checkpoint
write an epoch, without torch's CRC-32, every file still loading; a progress bar that redraws
twice a second, not 100 times; evaluation batches twice the training batch."""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch
from hydra.utils import instantiate

from medx.config import compose
from medx.models.load import load
from medx.train import train


def test_one_write_an_epoch_without_checksum_and_every_file_loads(make_cfg, tmp_path: Path):
    cfg = make_cfg("callbacks.model_checkpoint.save_top_k=-1", "test=false")  # 2 epochs, all kept

    train(cfg)

    folder = tmp_path / "run" / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())  # no partial files left behind
    assert names == ["epoch000.ckpt", "epoch001.ckpt", "last.ckpt"]
    # last.ckpt is the epoch's top-k file under a second name, not a second write...
    assert (folder / "last.ckpt").samefile(folder / "epoch001.ckpt")
    # ...and moving it on to epoch 1 left epoch 0's file as it was
    assert not (folder / "epoch000.ckpt").samefile(folder / "last.ckpt")
    for name, epoch in (("epoch000.ckpt", 0), ("epoch001.ckpt", 1), ("last.ckpt", 1)):
        with zipfile.ZipFile(folder / name) as archive:
            assert archive.testzip() is not None  # no CRC-32 written: most of a save's time
        state = torch.load(folder / name, map_location="cpu", weights_only=True)
        assert state["epoch"] == epoch and state["state_dict"] and state["optimizer_states"]
        assert load(folder / name).card["task"] == "classification"
    assert torch.serialization.get_crc32_options()  # left on for every other torch.save


def test_progress_bar_redraws_at_most_twice_a_second():
    cfg = compose([])

    bar = instantiate(cfg.callbacks.rich_progress_bar)

    # a thread redraws the bar and competes with the training loop for the GIL: at
    # Lightning's default 100 a second, or even 10, it was busy in 2-3% of a CPU epoch
    assert 0 < bar.refresh_rate <= 2


def test_evaluation_batches_are_twice_the_training_batch(phantom_cache: Path):
    cfg = compose([f"paths.cache_dir={phantom_cache}", "data.n_patients=60", "data.num_workers=0"])
    datamodule = instantiate(cfg.data, _convert_="object")
    datamodule.setup("fit")

    assert datamodule.train_dataloader().batch_size == cfg.data.batch_size
    for loader in (datamodule.val_dataloader(), datamodule.test_dataloader()):
        assert loader.batch_size == 2 * cfg.data.batch_size
