"""Modules compute, callbacks report: nothing under medx/models/ draws, writes reports or
talks to MLflow (that is `medx/evaluation/`'s callbacks' job)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import medx.models

MODELS = Path(medx.models.__file__).parent
REPORTING = ("mlflow", "matplotlib", "medx.tracking", "medx.evaluation.overlays")


def _imported_names(path: Path) -> set[str]:
    """Every module an import statement in `path` names (also imports inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _is_reporting(name: str) -> bool:
    return any(name == r or name.startswith(f"{r}.") for r in REPORTING)


def test_no_model_module_imports_reporting_code():
    files = sorted(MODELS.glob("*.py"))
    assert len(files) > 5  # the scan really looked at the package
    found = {f.name: sorted(filter(_is_reporting, _imported_names(f))) for f in files}
    assert {name: hits for name, hits in found.items() if hits} == {}


def test_importing_every_model_module_loads_no_tracking_code():
    """Also what the models import in turn. (matplotlib is left out here: torchmetrics, which
    Lightning imports, loads it itself; the scan above keeps it out of medx.models.)"""
    script = (
        "import importlib, json, pkgutil, sys, medx.models as m\n"
        "names = [i.name for i in pkgutil.iter_modules(m.__path__)]\n"
        "for name in names: importlib.import_module(f'medx.models.{name}')\n"
        "print(json.dumps({'modules': names, 'loaded': sorted(sys.modules)}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"segmentation", "quality", "classifier"} <= set(result["modules"])
    leaked = [n for n in result["loaded"] if _is_reporting(n) and not n.startswith("matplotlib")]
    assert leaked == []
