"""The documentation site builds offline with --strict, and the README's links reach its pages.

`make docs` runs `mkdocs build --strict`; these tests run the same build into a temporary folder
(a few seconds), so a broken link, anchor or API reference fails the suite, not only CI.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXTERNAL = re.compile(r"""(?:src|href)=["']https?://""")  # a resource or link off the machine


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    result = mkdocs_build(ROOT / "mkdocs.yml", site)
    assert result.returncode == 0, result.stderr[-3000:]
    return site


def page(site: Path, doc: str) -> Path:
    """The HTML file MkDocs writes for `docs/<doc>` (use_directory_urls)."""
    stem = doc.removesuffix(".md")
    return site / "index.html" if stem == "index" else site / stem / "index.html"


def test_the_site_builds_strict_with_its_api_reference(site: Path) -> None:
    models = page(site, "reference/models.md").read_text()
    assert 'id="medx.models.load.load"' in models  # rendered from the docstring, not skipped
    data = page(site, "reference/data.md").read_text()
    assert 'id="medx.data.folders.ImageFolderDataModule"' in data
    assert "patient_pattern" in data and "Parameters:" in data  # its Args: section, as a table
    for doc in ("getting-started.md", "data.md", "benchmarks.md", "robustness.md"):
        assert page(site, doc).is_file(), doc


def test_the_inference_api_page_renders_the_predictor_and_its_results(site: Path) -> None:
    inference = page(site, "reference/inference.md").read_text()
    for name in ("from_checkpoint", "predict", "stream", "shift_test", "observe", "drift"):
        assert f'id="medx.inference.Predictor.{name}"' in inference, name
    for name in ("Prediction", "Segmenter", "QualityGate", "OnnxModel", "DecisionRule", "read"):
        assert f'id="medx.inference.{name}"' in inference, name
    assert "ood_score" in inference and "threshold_scale" in inference  # results' fields
    models = page(site, "reference/models.md").read_text()
    assert 'id="medx.models.card.ModelCard"' in models and "previous_operating_points" in models
    robustness = page(site, "reference/robustness.md").read_text()
    assert 'id="medx.evaluation.drift.ShiftReference.fit"' in robustness
    callbacks = page(site, "reference/callbacks.md").read_text()
    assert 'id="medx.tracking.reporting.RunReport"' in callbacks
    assert "stress_split" in callbacks  # ClinicalEvaluation's Args, not only its signature


def test_every_console_script_is_documented() -> None:
    scripts = re.findall(r'^(medx-\w+) = "medx\.cli:', (ROOT / "pyproject.toml").read_text(), re.M)
    assert len(scripts) >= 9
    commands = (ROOT / "docs" / "getting-started.md").read_text()
    readme = (ROOT / "README.md").read_text()
    for script in scripts:
        assert f"| `{script}` |" in commands, f"{script} missing from the commands table"
        assert script in readme, f"{script} missing from the README"


def test_the_site_needs_nothing_from_the_network(site: Path) -> None:
    pages = list(site.rglob("*.html"))
    assert len(pages) > 15
    for html in pages:
        text = html.read_text()
        assert not EXTERNAL.search(text), f"{html} loads or links {EXTERNAL.search(text)[0]}"
        assert "fonts.googleapis" not in text, html


def test_a_broken_link_or_reference_fails_the_build(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    (tmp_path / "medx").symlink_to(ROOT / "medx")  # mkdocstrings reads medx beside mkdocs.yml
    with (tmp_path / "docs" / "index.md").open("a") as index:
        index.write("\n[the data](data.md#no-such-section) and [load][medx.models.load.no_such]\n")
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-section" in result.stderr
    assert "medx.models.load.no_such" in result.stderr


def test_the_readme_is_short_and_its_links_reach_the_docs(site: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 300
    assert not re.search(r"\(issue \d+\)|issue #?\d+", readme, re.IGNORECASE)
    assert readme.lstrip().startswith("# medx\n\n```bash\nmake train")
    assert "make docs-serve" in readme
    links = re.findall(r"\]\((docs/[^)#\s]+)(?:#([^)\s]+))?\)", readme)
    assert len(links) > 20
    for target, anchor in links:
        assert (ROOT / target).is_file(), target
        if anchor:
            html = page(site, target.removeprefix("docs/")).read_text()
            assert f'id="{anchor}"' in html, f"{target}#{anchor}"
