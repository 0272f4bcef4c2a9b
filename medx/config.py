"""Where medx's Hydra configs live, and composing them from Python (tests, notebooks)."""

from __future__ import annotations

import threading
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from medx.training.precision import register_resolver

register_resolver()  # ${medx.mixed_precision:} (conf/trainer/gpu.yaml) resolves in every config

# Hydra keeps one global config search per process: two threads composing at once collide
# ("GlobalHydra is already initialized"), so composing takes turns.
_COMPOSING = threading.Lock()


def config_dir() -> str:
    """`medx/conf` in an installed wheel, else the checkout's top-level `conf/` (editable)."""
    packaged = Path(__file__).resolve().parent / "conf"
    if packaged.is_dir():
        return str(packaged)
    return str(Path(__file__).resolve().parent.parent / "conf")


def compose(overrides: list[str] | None = None, config_name: str = "train") -> DictConfig:
    """The config `python -m medx.train <overrides>` would run, with Hydra's own section
    (safe from several threads)."""
    with _COMPOSING, initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return hydra_compose(config_name, overrides=overrides or [], return_hydra_config=True)
