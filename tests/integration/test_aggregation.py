"""Windowed aggregation on a real broker: cell statistics published once per window to the cells topic, equal to a
plain-Python reference over the same fixes (out-of-order ones within the grace counted, late ones left out), across
a worker restart; the query API serves the cells, the geofence windows and the fleet summary."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path

import h3
import orjson
import pytest

from fleetstream.codecs import format_ts, parse_ts
from tests.integration.helpers import (
    WorkerProcess,
    produce,
    read_topic,
    wait_for_count,
    wait_for_every_event,
    worker_settings,
)

pytestmark = pytest.mark.integration

WINDOW_MS = 60_000
GRACE_MS = 10_000
CENTRE = (51.50, -0.12)
DEVICES = [f"van-{i:02d}" for i in range(24)]
FENCE = {"type": "Feature", "id": "west-half", "properties": {"name": "west half"},
         "geometry": {"type": "Polygon", "coordinates": [[[-0.20, 51.45], [-0.12, 51.45], [-0.12, 51.55],
                                                          [-0.20, 51.55], [-0.20, 51.45]]]}}


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def make_fixes(t0: int) -> list[dict]:
    """Each device every 10 s for 5 minutes, wandering across the fence's east edge, reported speeds 5-120 km/h;
    arrival order shuffled across devices within 15 s (within the grace), each device's own fixes in order."""
    rng = random.Random(11)
    fixes = []
    for device in DEVICES:
        lat, lon = CENTRE[0] + rng.uniform(-0.02, 0.02), CENTRE[1] + rng.uniform(-0.03, 0.03)
        for k in range(30):
            lat += rng.uniform(-0.0008, 0.0008)
            lon += rng.uniform(-0.0012, 0.0012)
            fixes.append({"device_id": device, "ts": t0 + k * 10_000, "lat": round(lat, 6), "lon": round(lon, 6),
                          "speed_kmh": float(rng.randint(5, 120))})
    delay = {device: rng.uniform(0, 15_000) for device in DEVICES}  # per device: its own order kept
    fixes.sort(key=lambda f: f["ts"] + delay[f["device_id"]])
    order: dict[str, int] = {}
    for fix in fixes:  # keep each device's own order (an older fix of a device is filtered, not aggregated)
        assert fix["ts"] > order.get(fix["device_id"], -1)
        order[fix["device_id"]] = fix["ts"]
    return fixes


def reference(fixes: list[dict]) -> dict[tuple[str, int], dict]:
    """Per (cell, window start): events, devices, average and nearest-rank p95 of the speeds rounded to 1 km/h."""
    rows: dict[tuple[str, int], list[tuple[str, float]]] = defaultdict(list)
    for fix in fixes:
        fine = h3.latlng_to_cell(fix["lat"], fix["lon"], 9)
        start = fix["ts"] // WINDOW_MS * WINDOW_MS
        for res in (7, 8):
            rows[(h3.cell_to_parent(fine, res), start)].append((fix["device_id"], fix["speed_kmh"]))
    out = {}
    for key, values in rows.items():
        speeds = sorted(math.floor(s + 0.5) for _, s in values)
        rank = math.ceil(0.95 * len(speeds))
        out[key] = {"events": len(values), "devices": len({d for d, _ in values}),
                    "avg_speed_kmh": sum(s for _, s in values) / len(values),
                    "p95_speed_kmh": float(speeds[rank - 1]), "stopped_devices": 0}
    return out


def as_records(fixes: list[dict]) -> list[tuple[bytes, bytes]]:
    return [(f["device_id"].encode(), orjson.dumps({**f, "ts": format_ts(f["ts"])})) for f in fixes]


def test_cells_are_published_once_per_window_and_match_the_reference(broker, prefix, tmp_path: Path):
    fences = tmp_path / "fences.geojson"
    fences.write_bytes(orjson.dumps({"type": "FeatureCollection", "features": [FENCE]}))
    settings = worker_settings(broker.url, prefix, tmp_path, partitions=3, aggregation_idle_s=2.0,
                               timer_interval_s=0.5, geofences_file=str(fences), fleet_offline_after_s=10 ** 9)
    t0 = (int(time.time() * 1000) - 30 * 60_000) // WINDOW_MS * WINDOW_MS
    fixes = make_fixes(t0)
    half = len(fixes) // 2
    worker = WorkerProcess(settings, tmp_path / "worker-1.log").start()
    try:
        asyncio.run(produce(broker.bootstrap, settings.positions_topic, as_records(fixes[:half])))
        wait_for_every_event(settings, broker.bootstrap, half)
    finally:
        worker.stop()  # a restart mid-stream: open windows come back from the checkpoints
    worker = WorkerProcess(settings.with_overrides(data_dir=str(tmp_path / "data-2")), tmp_path / "w2.log").start()
    try:
        asyncio.run(produce(broker.bootstrap, settings.positions_topic, as_records(fixes[half:])))
        wait_for_every_event(settings, broker.bootstrap, len(fixes))
        # late: new devices reporting into the first window, long closed at every partition
        late = [{"device_id": f"late-{i}", "ts": t0 + 5_000 + i, "lat": CENTRE[0], "lon": CENTRE[1],
                 "speed_kmh": 50.0} for i in range(6)]
        asyncio.run(produce(broker.bootstrap, settings.positions_topic, as_records(late)))
        wait_for_every_event(settings, broker.bootstrap, len(fixes) + len(late))
        # one fix far ahead closes every window (the other partitions go idle and stop holding them back)
        closer = [{"device_id": "closer", "ts": t0 + 10 * WINDOW_MS, "lat": CENTRE[0], "lon": CENTRE[1],
                   "speed_kmh": 10.0}]
        asyncio.run(produce(broker.bootstrap, settings.positions_topic, as_records(closer)))
        expected = reference(fixes)
        published = asyncio.run(wait_for_count(broker.bootstrap, settings.cells_topic, len(expected), timeout_s=90))
        published = [r.json() for r in asyncio.run(read_topic(broker.bootstrap, settings.cells_topic, idle_s=3))]

        seen: dict[tuple[str, int], dict] = {}
        for record in published:
            key = (record["h3"], parse_ts(record["window_start"]))
            assert key not in seen, f"window published twice: {record}"
            assert record["final"] is True
            seen[key] = record
        assert set(seen) == set(expected)
        for key, want in expected.items():
            got = seen[key]
            assert got["resolution"] == h3.get_resolution(key[0])
            assert (got["events"], got["devices"], got["stopped_devices"]) == \
                (want["events"], want["devices"], want["stopped_devices"]), key
            assert got["avg_speed_kmh"] == pytest.approx(want["avg_speed_kmh"], abs=1e-6)
            assert got["p95_speed_kmh"] == want["p95_speed_kmh"]

        metrics = urllib.request.urlopen(worker.base_url + "/metrics", timeout=10).read().decode()
        late_line = [line for line in metrics.splitlines() if line.startswith("fleetstream_late_records_total")]
        assert late_line and float(late_line[0].split()[-1]) >= len(late)

        # the API: one cell routed to its owner, a window's cells (bbox, GeoJSON), the fleet, the geofence
        (cell, start), want = next(iter(sorted(expected.items())))
        status, body = get(f"{worker.base_url}/cells/{cell}?window={start}")
        assert status == 200 and (body["events"], body["devices"]) == (want["events"], want["devices"])
        status, body = get(f"{worker.base_url}/cells?resolution=8&window={format_ts(t0)}&limit=10000")
        in_window = {c for c, s in expected if s == t0 and h3.get_resolution(c) == 8}
        assert status == 200 and {c["h3"] for c in body["cells"]} == in_window
        lat, lon = h3.cell_to_latlng(cell if h3.get_resolution(cell) == 8 else h3.cell_to_children(cell, 8)[0])
        status, body = get(f"{worker.base_url}/cells?resolution=8&window={t0}&format=geojson"
                           f"&bbox={lat - 0.01},{lon - 0.01},{lat + 0.01},{lon + 0.01}")
        assert status == 200 and body["type"] == "FeatureCollection"
        assert 0 < len(body["features"]) < len(in_window) or len(in_window) == 1
        assert get(f"{worker.base_url}/cells/{h3.latlng_to_cell(0, 0, 8)}?window={t0}")[0] == 404
        assert get(f"{worker.base_url}/cells/{cell}?window=yesterday")[0] == 400
        assert get(f"{worker.base_url}/cells?resolution=5")[0] == 400

        status, fleet = get(f"{worker.base_url}/fleet")
        assert status == 200 and fleet["devices"] == len(DEVICES) + len(late) + 1
        first = next(w for w in fleet["distance"] if w["window_start"] == format_ts(t0))
        assert first["final"] is True and first["fixes"] == sum(1 for f in fixes if f["ts"] < t0 + WINDOW_MS)

        events = [r.json() for r in asyncio.run(read_topic(broker.bootstrap, settings.geofence_events_topic,
                                                           idle_s=2))]
        status, fence = get(f"{worker.base_url}/geofences/west-half")
        assert status == 200
        status, devices = get(f"{worker.base_url}/devices?geofence=west-half&limit=1000")
        assert fence["occupancy"] == len(devices["devices"]) > 0  # the occupancy table agrees with the states
        assert fence["devices_inside"] == [d["device_id"] for d in devices["devices"]]
        by_window = {w["window_start"]: w for w in fence["stats"]}
        for start in range(t0, t0 + 5 * WINDOW_MS, WINDOW_MS):
            inside = [e for e in events if start <= parse_ts(e["ts"]) < start + WINDOW_MS
                      and not e["device_id"].startswith("late-")]  # (late for the window: left out like their fixes)
            entries = sum(e["type"] in ("enter", "cross") for e in inside)
            exits = sum(e["type"] in ("exit", "cross") for e in inside)
            got = by_window.get(format_ts(start))
            if not inside:
                assert got is None
                continue
            assert (got["entries"], got["exits"], got["devices"]) == \
                (entries, exits, len({e["device_id"] for e in inside})), format_ts(start)
    finally:
        worker.stop()

