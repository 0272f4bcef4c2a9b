"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from mlflow import MlflowClient
from mlflow.entities import Run
from omegaconf import DictConfig, open_dict

from medx.config import compose


@pytest.fixture(scope="session")
def medx_data() -> Path:
    """The real-data folder named by $MEDX_DATA (see its README.md).

    Unset: the test is skipped, so the suite runs anywhere. Set but missing: the test fails,
    because CI that means to test on real data must not pass by silently skipping it.
    """
    value = os.environ.get("MEDX_DATA")
    if not value:
        pytest.skip("MEDX_DATA is not set; set it to the shared data folder to run this test")
    root = Path(value).resolve()  # symlinks made by tests must not be relative to the cwd
    if not root.is_dir():
        pytest.fail(f"MEDX_DATA={value} is set but is not a folder; point it at the data folder")
    return root


@pytest.fixture(scope="session")
def phantom_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One phantom cache for the whole session: generated once, reused by every test."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def make_cfg(tmp_path: Path, phantom_cache: Path, monkeypatch: pytest.MonkeyPatch):
    """Compose the real train config with test-sized overrides, as `medx.train` would run it.

    Everything a run writes (outputs, the sqlite MLflow store) goes under tmp_path; the phantom
    is small (60 patients, 64 px) and the network tiny (timm's test_resnet, as a classifier
    or as a segmentation encoder).
    """
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")

    def make(*overrides: str) -> DictConfig:
        phantom = ["data.n_patients=60"] if "n_patients" in compose(list(overrides)).data else []
        cfg = compose(
            [
                f"paths.root_dir={tmp_path}",
                f"paths.cache_dir={phantom_cache}",
                *_tiny_network(overrides),
                *phantom,
                "data.image_size=64",
                "data.num_workers=0",
                "callbacks.rich_progress_bar=null",
                "trainer.enable_progress_bar=false",
                "trainer.max_epochs=2",
                *overrides,
            ]
        )
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
        HydraConfig().set_config(cfg)
        return cfg

    return make


def _tiny_network(overrides: tuple[str, ...]) -> list[str]:
    """The override that makes the chosen model family's network tiny."""
    task = get_class(compose(list(overrides)).model._target_).task
    if task == "segmentation":
        return ["model.encoder=tu-test_resnet"]
    return ["model.backbone=test_resnet"]


@pytest.fixture
def mlflow_client(tmp_path: Path) -> MlflowClient:
    """A client on the sqlite store that `make_cfg` runs log to."""
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")


@pytest.fixture
def tracked_runs(mlflow_client: MlflowClient):
    """All MLflow runs of an experiment in the test store, newest first."""

    def runs(experiment: str = "medx") -> list[Run]:
        found = mlflow_client.get_experiment_by_name(experiment)
        return mlflow_client.search_runs([found.experiment_id]) if found else []

    return runs


@pytest.fixture
def dicom_variants(medx_data: Path, tmp_path: Path) -> dict[str, Path]:
    """One real chest X-ray as `reference.png` and as every DICOM variant medx must read as
    exactly those pixels (MONOCHROME1/2, rescale, window, 12-bit, RLE, JPEG 2000, no
    extension), all in tmp_path/"dicom": {"png": path, <variant>: path}; see tests/dicom_files.py.
    """
    from dicom_files import cxr_gray, write_dicom_variants

    return write_dicom_variants(cxr_gray(medx_data), tmp_path / "dicom")
