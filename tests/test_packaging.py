"""The wheel: everything medx is made of, every dependency it imports, every command working
from any folder once installed (`pip install .`, not only this checkout)."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from medx_cli import TINY
from mlflow import MlflowClient
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from medx import cli
from medx.cli import user_errors

ROOT = Path(__file__).resolve().parent.parent
# A command is a module of medx/ with a main(), or a package run with `python -m`.
COMMANDS = sorted(
    [p.stem for p in (ROOT / "medx").glob("*.py") if "\ndef main(" in p.read_text()]
    + [p.parent.name for p in (ROOT / "medx").glob("*/__main__.py")]
)


# What the wheel is built from: copied, so that no build/ of an earlier build (whose stale
# modules would ship) is reused and nothing is written into the checkout.
SOURCES = ("medx", "conf", "pyproject.toml", "setup.py", "README.md")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel .` of this checkout's sources, built once for the module."""
    tmp = tmp_path_factory.mktemp("wheel")
    (tmp / "src").mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(ROOT / name, tmp / "src" / name, ignore=ignore)
        else:
            shutil.copy(ROOT / name, tmp / "src" / name)
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(
        [*build, "-w", str(tmp / "dist"), str(tmp / "src")],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (found,) = (tmp / "dist").glob("medx-*.whl")
    return found


def wheel_metadata(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        (path,) = [n for n in z.namelist() if n.endswith(f".dist-info/{name}")]
        return z.read(path).decode()


def test_the_wheel_holds_every_module_and_every_config(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "medx").rglob("*.py")}
    configs = {f"medx/{p.relative_to(ROOT).as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert "medx/serve/__main__.py" in modules and "medx/conf/eval.yaml" in configs
    assert modules - names == set()
    assert configs - names == set()


def third_party_imports() -> dict[str, set[str]]:
    """Every top-level module imported anywhere in medx/ (also inside functions), but the
    standard library and medx, with the files that import it."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / "medx").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "medx":
                    found.setdefault(top, set()).add(path.relative_to(ROOT).as_posix())
    return found


def test_every_third_party_import_is_a_declared_dependency(wheel: Path):
    metadata = Parser().parsestr(wheel_metadata(wheel, "METADATA"))
    requirements = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    # medx has no optional runtime extras: what its code imports, every install has
    declared = {canonicalize_name(r.name) for r in requirements if r.marker is None}
    distributions = importlib.metadata.packages_distributions()
    imports = third_party_imports()
    assert {"torch", "pydicom", "onnxruntime", "fastapi", "pytorch_grad_cam"} <= imports.keys()

    missing = {
        name: sorted(files)
        for name, files in imports.items()
        if not {canonicalize_name(d) for d in distributions.get(name, [])} & declared
    }
    assert missing == {}, "imported by medx/ but not in [project] dependencies"


def test_every_command_has_a_console_script(wheel: Path):
    assert {"train", "eval", "predict", "export", "serve", "score", "compare", "ui"} <= set(
        COMMANDS
    )
    scripts = {
        line.split("=")[0].strip(): line.split("=")[1].strip()
        for line in wheel_metadata(wheel, "entry_points.txt")
        .split("[console_scripts]")[1]
        .split("[")[0]
        .splitlines()
        if "=" in line
    }
    assert set(scripts) == {f"medx-{c}" for c in COMMANDS}
    for script, target in scripts.items():
        module, function = target.split(":")
        assert module == "medx.cli" and callable(getattr(cli, function)), script


def test_the_wheel_composes_its_own_configs(wheel: Path, tmp_path: Path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "from medx.config import compose, config_dir; "
        "print(config_dir()); print(compose(['model=vgg16']).model.backbone); "
        "print(compose(['ckpt_path=x.ckpt'], 'eval').task_name)"
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
    where, backbone, task = out.stdout.split()
    assert Path(where) == site / "medx" / "conf"
    assert (backbone, task) == ("vgg16", "eval")


def test_a_module_that_is_not_installed_is_one_line_unless_it_is_medx_s_own():
    """As after `pip install --no-deps`: the command says which module, in one line; a medx
    module that is missing is a bug and keeps its traceback."""
    with pytest.raises(SystemExit) as stop, user_errors("medx.eval"):
        importlib.import_module("boto3_not_installed.s3")
    assert stop.value.code == (
        "medx.eval: the Python module 'boto3_not_installed' is not installed here: install "
        "medx with its dependencies (pip install medx, or make install in a checkout), or the "
        "package that provides 'boto3_not_installed'."
    )
    with pytest.raises(ModuleNotFoundError), user_errors("medx.eval"):
        importlib.import_module("medx.no_such_module")


def installed(wheel: Path, tmp_path: Path) -> Path:
    """A fresh venv with the wheel installed: its own medx, the shared venv's other packages
    (a .pth line: nothing is downloaded). Returns its bin/."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    (site / "shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps"]
    # --ignore-installed: never touch the shared venv's own (editable) medx
    pip += ["--no-build-isolation", "--ignore-installed", str(wheel)]
    subprocess.run(pip, check=True, capture_output=True, timeout=300)
    return venv / "bin"


@pytest.mark.slow
def test_installed_commands_work_from_any_folder(wheel: Path, tmp_path: Path):
    """Each console script answers --help from a folder outside the checkout; a tiny
    medx-train there, then medx-eval and medx-predict on what it wrote."""
    bin_dir = installed(wheel, tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"

    def run(*command: str, timeout: int = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            command, cwd=work, env=env, capture_output=True, text=True, timeout=timeout
        )

    where = run("python", "-c", "import medx.config as c; print(c.__file__, c.config_dir())")
    assert where.stdout.split() == [
        str(next(bin_dir.parent.glob("lib/python*/site-packages/medx/config.py"))),
        str(next(bin_dir.parent.glob("lib/python*/site-packages/medx/conf"))),
    ]
    for command in COMMANDS:
        out = run(f"medx-{command}", "--help")
        assert out.returncode == 0, f"medx-{command} --help: {out.stderr[-2000:]}"
        assert "usage" in out.stdout.lower() or "== Config ==" in out.stdout, command

    trained = run("medx-train", *TINY)
    assert trained.returncode == 0, trained.stderr[-3000:]
    (best,) = work.glob("outputs/*/*/checkpoints/epoch*.ckpt")  # paths.root_dir: this folder
    client = MlflowClient(f"sqlite:///{work}/mlflow.db")
    (train_run,) = client.search_runs([client.get_experiment_by_name("medx").experiment_id])

    evaluated = run(
        "medx-eval", "ckpt_path=outputs/*/*/checkpoints/epoch*.ckpt", "eval.bootstrap=20"
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    runs = client.search_runs([train_run.info.experiment_id])
    (eval_run,) = [r for r in runs if r.info.run_id != train_run.info.run_id]
    assert eval_run.data.tags["medx.source_run_id"] == train_run.info.run_id
    auroc = eval_run.data.metrics["test/auroc"]
    assert auroc == pytest.approx(train_run.data.metrics["test/auroc"], abs=1e-6)
    # the store, its artifacts, the run and the phantom cache: medx-eval wrote into the run's
    # eval/ folder, and Hydra left no folder or log of its own
    assert sorted(p.name for p in work.iterdir()) == [
        ".cache",
        "mlartifacts",
        "mlflow.db",
        "outputs",
    ]
    (run_dir,) = work.glob("outputs/*/*")
    assert (run_dir / "eval").is_dir()

    image = next(work.glob(".cache/**/*.png"))
    predicted = run("medx-predict", str(best), str(image), "--workers", "0", "--no-progress")
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert str(image) in predicted.stdout
