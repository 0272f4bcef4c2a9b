"""Hydra finds conf/ from an installed (non-editable) wheel, not only from this checkout."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_ships_the_configs_and_composes_them(tmp_path: Path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("medx-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "medx/conf/train.yaml").is_file()
    assert (site / "medx/conf/model/densenet121.yaml").is_file()

    code = (
        "from medx.config import compose, config_dir; "
        "print(config_dir()); print(compose(['model=vgg16']).model.backbone)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    where, backbone = out.stdout.split()
    assert Path(where) == site / "medx" / "conf"
    assert backbone == "vgg16"
