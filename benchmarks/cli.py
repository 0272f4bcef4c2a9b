"""Issue 20: how fast each command answers from a cold process.

Prints the wall time of `python -m medx.<command> --help` and of its console script
`medx-<command> --help` for every command (goal: under 1.5 s), beside `python -c "import
torch"` measured in the same run, and of one image through `python -m medx.predict CKPT
one.jpg` (and `medx-predict`). The console scripts are those of this checkout's wheel,
installed with `pip install --prefix` into a temporary folder; the checkpoint is a tiny one
trained here (timm's test_resnet on the phantom). Each figure is the best of `--repeats`
runs: others' load on a shared machine only ever adds time. For a command over budget, the
modules its `--help` imports at the top level are listed, heaviest first (`python -X
importtime`, cumulative seconds).

Usage: python benchmarks/cli.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import cv2
from timing import best_of  # benchmarks/timing.py

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 1.5
COMMANDS = sorted(
    [p.stem for p in (ROOT / "medx").glob("*.py") if "\ndef main(" in p.read_text()]
    + [p.parent.name for p in (ROOT / "medx").glob("*/__main__.py")]
)
TINY = [
    "model.backbone=test_resnet",
    "data.n_patients=40",
    "data.image_size=48",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "logger=none",
    "test=false",
    "callbacks.rich_progress_bar=null",
    "trainer.enable_progress_bar=false",
]


def install_wheel(folder: Path) -> tuple[Path, Path]:
    """This checkout's wheel installed under `folder`: its bin/ and site-packages. Built from
    a copy of the sources, so that no stale build/ ships and the checkout stays clean."""
    src = folder / "src"
    shutil.copytree(ROOT / "medx", src / "medx", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "conf", src / "conf")
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip"]
    offline = ["-q", "--no-deps", "--no-build-isolation"]
    dist, prefix = folder / "dist", folder / "prefix"
    subprocess.run([*pip, "wheel", *offline, "-w", str(dist), str(src)], check=True)
    (wheel,) = dist.glob("medx-*.whl")
    # --ignore-installed: the venv's own (editable) medx is left alone
    install = [*pip, "install", *offline, "--ignore-installed", "--prefix", str(prefix)]
    subprocess.run([*install, str(wheel)], check=True)
    site = sysconfig.get_path("purelib", vars={"base": str(prefix), "platbase": str(prefix)})
    return prefix / "bin", Path(site)


def tiny_checkpoint(folder: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """A tiny classifier trained here, and one JPEG: a real chest X-ray from $MEDX_DATA if
    there is one, else a phantom image."""
    paths = [f"paths.root_dir={folder}"]
    train = [sys.executable, "-m", "medx.train", *TINY, *paths]
    subprocess.run(train, env=env, check=True, capture_output=True, cwd=folder)
    (ckpt,) = folder.glob("outputs/*/*/checkpoints/epoch*.ckpt")
    real = Path(os.environ.get("MEDX_DATA", "/nonexistent")) / "chest_xray" / "test" / "NORMAL"
    source = next(real.glob("*.jpeg"), None) or next(folder.glob(".cache/**/*.png"))
    image = folder / "one.jpg"
    cv2.imwrite(str(image), cv2.imread(str(source)))
    return ckpt, image


def seconds(command: list[str], env: dict[str, str], repeats: int) -> float:
    def once() -> None:
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)

    return best_of(once, repeats)


def heaviest_imports(command: str, env: dict[str, str], n: int = 4) -> str:
    """The top-level imports of `python -m medx.<command> --help`, by cumulative time."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", f"medx.{command}", "--help"],
        env=env,
        capture_output=True,
        text=True,
    )
    top = []
    for line in out.stderr.splitlines():
        fields = line.removeprefix("import time:").split("|")
        if len(fields) == 3 and fields[1].strip().isdigit() and not fields[2].startswith("  "):
            top.append((int(fields[1]), fields[2].strip()))
    return ", ".join(f"{name} {us / 1e6:.2f}" for us, name in sorted(top, reverse=True)[:n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bin_dir, site = install_wheel(folder)
        installed = {**env, "PYTHONPATH": str(site)}
        ckpt, image = tiny_checkpoint(folder, env)

        torch_s = seconds([sys.executable, "-c", "import torch"], env, args.repeats)
        print(f"cold process, best of {args.repeats} (s)   python -m   console script")
        label = 'python -c "import torch"'
        print(f"{label:<30} {torch_s:9.2f}")
        over = []
        for command in COMMANDS:
            module = seconds([sys.executable, "-m", f"medx.{command}", "--help"], env, args.repeats)
            script = seconds([str(bin_dir / f"medx-{command}"), "--help"], installed, args.repeats)
            verdict = "ok" if max(module, script) < BUDGET else f"OVER {BUDGET} s"
            print(
                f"{f'medx.{command} --help':<30} {module:9.2f} {script:14.2f}"
                f"   {module / torch_s:4.2f}x torch  {verdict}"
            )
            if verdict != "ok":
                over.append(command)
        one = [str(ckpt), str(image), "--workers", "0", "--no-progress"]
        module = seconds([sys.executable, "-m", "medx.predict", *one], env, args.repeats)
        script = seconds([str(bin_dir / "medx-predict"), *one], installed, args.repeats)
        print(
            f"{'medx.predict CKPT one.jpg':<30} {module:9.2f} {script:14.2f}"
            f"   {module / torch_s:4.2f}x torch"
        )
        for command in over:
            print(f"medx.{command} --help imports (s): {heaviest_imports(command, env)}")


if __name__ == "__main__":
    main()
