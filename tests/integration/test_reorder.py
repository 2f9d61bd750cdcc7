"""The reorder window on a real broker: fixes arriving out of order across batches are put back in time order
before they change state, a fix older than one already released is filtered as late, and a device that goes
silent gets its held fixes released by the timer."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from fleetstream.codecs import format_ts, parse_ts, validate_output
from fleetstream.domain.geo import haversine_m
from tests.integration.helpers import WorkerProcess, produce, wait_for_count, worker_settings

pytestmark = pytest.mark.integration


def test_out_of_order_fixes_are_resorted_across_batches(broker, prefix, tmp_path: Path):
    settings = worker_settings(broker.url, prefix, tmp_path, partitions=2, reorder_window_s=15.0,
                               timer_interval_s=0.5)
    base = int(time.time() * 1000) // 1000 * 1000 - 60_000
    points = {10: (52.000, 4.000), 20: (52.001, 4.000), 30: (52.002, 4.000), 5: (51.999, 4.000)}
    arrival = [10, 30, 20, 5]  # 20 arrives after 30 (within the window); 5 after 20 was released: late

    def fix(second: int) -> tuple[bytes, bytes]:
        lat, lon = points[second]
        return b"van-1", orjson.dumps({"device_id": "van-1", "ts": format_ts(base + second * 1000), "lat": lat,
                                       "lon": lon, "speed_kmh": 30.0})

    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        for n, second in enumerate(arrival, start=1):  # each one processed before the next is sent: own batches
            asyncio.run(produce(broker.bootstrap, settings.positions_topic, [fix(second)]))
            deadline = time.monotonic() + 60
            while worker.status()["fixes_in"] < n and time.monotonic() < deadline:
                time.sleep(0.1)
        enriched = asyncio.run(wait_for_count(broker.bootstrap, settings.enriched_topic, 4, timeout_s=60))
    finally:
        worker.stop()
    records = [r.json() for r in enriched]
    for record in records:
        validate_output("enriched_position", record)
    assert len(records) == 4 and len({r["event_id"] for r in records}) == 4
    late = [r for r in records if r.get("filtered")]
    assert [(parse_ts(r["ts"]) - base) // 1000 for r in late] == [5] and late[0]["filtered"] == "late", records
    accepted = [r for r in records if not r.get("filtered")]
    # published in time order (the timer released the last one), the odometer summed in time order
    assert [(parse_ts(r["ts"]) - base) // 1000 for r in accepted] == [10, 20, 30]
    expected = haversine_m(*points[10], *points[20]) + haversine_m(*points[20], *points[30])
    assert accepted[-1]["odometer_m"] == pytest.approx(expected, rel=1e-9)
    # each record keeps the coordinates of its own input message
    offsets = {r["event_id"]: r["source"]["offset"] for r in records}
    assert len(set(offsets.values())) == 4
