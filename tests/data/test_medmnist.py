"""data=pneumoniamnist: the official MedMNIST splits from an .npz, downloaded when absent."""

from __future__ import annotations

import functools
import http.server
import re
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from medx.data.medmnist import MedMNISTDataModule, md5sum
from medx.errors import DataError
from medx.train import train


@pytest.fixture
def npz(medx_data: Path) -> Path:
    path = medx_data / "pneumoniamnist" / "pneumoniamnist.npz"
    assert path.is_file(), f"{path} is missing from MEDX_DATA"
    return path


@pytest.fixture
def server(npz: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving the folder that holds the .npz."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(npz.parent))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/{npz.name}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_official_splits_are_read_as_they_are(npz: Path) -> None:
    dm = MedMNISTDataModule(root=npz.parent, classes=["normal", "pneumonia"])
    dm.setup()
    assert {s: len(dm.splits[s].labels) for s in ("train", "val", "test")} == {
        "train": 4708,
        "val": 524,
        "test": 624,
    }
    with np.load(npz) as raw:
        assert dm.class_counts["test"] == np.bincount(raw["test_labels"].ravel()).tolist()
    image, label = dm.test_dataloader().dataset[0]
    assert image.shape == (3, 28, 28) and label in (0, 1)
    assert dm.model_kwargs()["num_classes"] == 2


def test_download_checks_the_md5(tmp_path: Path, npz: Path, server: str) -> None:
    dm = MedMNISTDataModule(root=tmp_path / "data", url=server, md5=md5sum(npz))
    dm.prepare_data()
    assert md5sum(tmp_path / "data" / "pneumoniamnist.npz") == md5sum(npz)
    dm.setup()
    assert len(dm.splits["val"].labels) == 524


def test_a_download_with_the_wrong_md5_is_refused_and_removed(tmp_path: Path, server: str) -> None:
    dm = MedMNISTDataModule(root=tmp_path, url=server, md5="0" * 32)
    with pytest.raises(DataError, match=r"Checksum mismatch.*data\.md5"):
        dm.prepare_data()
    assert list(tmp_path.iterdir()) == []


def test_offline_download_says_where_to_put_the_file(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dm = MedMNISTDataModule(root=tmp_path, url=f"http://127.0.0.1:{port}/x.npz")
    with pytest.raises(
        DataError, match=re.escape(f"copy the file to {tmp_path / 'pneumoniamnist.npz'}")
    ):
        dm.setup()
    with pytest.raises(DataError, match=r"data\.download=false"):
        MedMNISTDataModule(root=tmp_path, download=False).setup()


def test_a_file_without_the_splits_names_the_missing_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "pneumoniamnist.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match="train_labels"):
        MedMNISTDataModule(root=tmp_path).setup()


def test_a_short_run_on_pneumoniamnist(make_cfg, npz: Path, tmp_path: Path, tracked_runs) -> None:
    data = tmp_path / "npz"
    data.mkdir()
    shutil.copy(npz, data)
    cfg = make_cfg(
        "data=pneumoniamnist",
        f"data.root={data}",
        "data.image_size=28",
        "+trainer.limit_train_batches=4",
        "trainer.max_epochs=1",
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["test/auroc"] <= 1.0
    (run,) = tracked_runs()
    assert run.data.params["dataset.counts.test.normal"] == "234"
    assert run.data.params["data.flag"] == "pneumoniamnist"
    # the real file repeats 8 training images in val (found by pixel digest, logged as params)
    assert run.data.params["dataset.duplicates.val"] == "8"


def test_images_repeated_across_official_splits_are_counted_or_dropped(
    npz: Path, tmp_path: Path
) -> None:
    with np.load(npz) as raw:
        arrays = {k: raw[k].copy() for k in raw.files}
    arrays["test_images"][0] = arrays["train_images"][5]  # one more leak, into test
    np.savez(tmp_path / "pneumoniamnist.npz", **arrays)

    warned = MedMNISTDataModule(root=tmp_path)
    warned.setup()
    found = warned.summary()["dataset.duplicates"]
    assert (found["groups"], found["val"], found["test"], found["dropped"]) == (9, 8, 1, 0)

    dropped = MedMNISTDataModule(root=tmp_path, duplicates="drop")
    dropped.setup()
    assert len(dropped.splits["val"].labels) == 524 - 8
    assert len(dropped.splits["test"].labels) == 624 - 1
    assert len(dropped.splits["train"].labels) == 4708
    assert not (dropped.splits["test"].images[0] == arrays["train_images"][5]).all()
