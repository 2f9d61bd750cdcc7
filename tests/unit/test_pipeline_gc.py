"""The pipeline pauses the cyclic garbage collector while a batch runs and gives it back as it found it."""

from __future__ import annotations

import gc

import orjson
import pytest

from fleetstream.config import Settings
from fleetstream.streaming.pipeline import InRecord, PositionPipeline

NOW_MS = 1_780_000_000_000


class DictState(dict):
    def get(self, partition: int, key: bytes) -> bytes | None:  # type: ignore[override]
        return dict.get(self, key)


def pipeline(clock) -> PositionPipeline:  # type: ignore[no-untyped-def]
    return PositionPipeline(Settings.load(env={}), DictState(), changelog_topic="changelog", clock_ms=clock)


def batch() -> list[InRecord]:
    fix = {"device_id": "dev-1", "ts": "2026-05-28T20:26:40Z", "lat": 53.4, "lon": -2.98}
    return [InRecord("fleet.positions", 0, 0, b"dev-1", orjson.dumps(fix))]


@pytest.fixture
def collector_enabled():  # type: ignore[no-untyped-def]
    was = gc.isenabled()
    gc.enable()
    yield
    if not was:
        gc.disable()


def test_collector_is_paused_during_a_batch_and_enabled_after(collector_enabled: None) -> None:
    seen = []

    def clock() -> int:  # the pipeline reads its clock inside the batch
        seen.append(gc.isenabled())
        return NOW_MS

    out = pipeline(clock).process(batch())
    assert out.enriched == 1
    assert seen == [False]
    assert gc.isenabled()


def test_collector_comes_back_when_a_batch_fails(collector_enabled: None) -> None:
    def clock() -> int:
        raise RuntimeError("clock broke")

    with pytest.raises(RuntimeError, match="clock broke"):
        pipeline(clock).process(batch())
    assert gc.isenabled()


def test_a_collector_disabled_by_someone_else_stays_disabled(collector_enabled: None) -> None:
    gc.disable()
    try:
        pipeline(lambda: NOW_MS).process(batch())
        assert not gc.isenabled()
    finally:
        gc.enable()
