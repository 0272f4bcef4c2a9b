"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def medx_data() -> Path:
    """The real-data folder named by $MEDX_DATA (see its README.md).

    Unset: the test is skipped, so the suite runs anywhere. Set but missing: the test fails,
    because CI that means to test on real data must not pass by silently skipping it.
    """
    value = os.environ.get("MEDX_DATA")
    if not value:
        pytest.skip("MEDX_DATA is not set; set it to the shared data folder to run this test")
    root = Path(value)
    if not root.is_dir():
        pytest.fail(f"MEDX_DATA={value} is set but is not a folder; point it at the data folder")
    return root
