"""Fixtures shared by every test layer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """Real traces live beside the repository in ``../shared/data`` (never copied into it)."""
    override = os.environ.get("FLEETSTREAM_SHARED_DATA")
    return Path(override) if override else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real traces not found at {path} (set FLEETSTREAM_SHARED_DATA)")
    return path
