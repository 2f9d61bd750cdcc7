"""The alert engine on a real broker: a scripted fleet with incidents (a reefer warming up, a vending machine
selling out, a truck leaving its depot at night, a tracker going silent, a battery trending down) gives exactly
the expected alerts on the alerts topic, including across a worker restart between raises and clears.

Scripted event times lie on a past night (the engine's times are event times, so the alerts are exact), except for
what the worker's clock decides: the tracker going offline, and the depot rule's schedule (its window is set around
the present, so that the timer does not walk the truck through days of schedule boundaries).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import orjson
import pytest
import shapely

from fleetstream.codecs import format_ts, parse_ts, validate_output
from tests.integration.helpers import WorkerProcess, produce, read_topic, worker_settings
from tests.integration.test_geofencing import cli

pytestmark = pytest.mark.integration

NIGHT = parse_ts("2026-11-20T23:00:00.000Z")  # a Friday night, UTC
MINUTE = 60_000
DEPOT = shapely.box(4.00, 52.00, 4.01, 52.01)
OFFLINE_AFTER_S = 30

RULES = f"""
groups:
  reefers: ["reefer-*"]
  vending: ["vend-*"]
  trucks: ["truck-*"]
  trackers: ["tracker-*"]
rules:
  - {{id: cold-chain, kind: threshold, severity: major, groups: [reefers],
      when: "temperature_c > 8 for 10m", clear_below: 7, clear_for: 2m}}
  - {{id: restock, kind: threshold, severity: info, groups: [vending], metric: stock_units, op: "<=", value: 3,
      clear_above: 10}}
  - id: depot-at-night
    kind: keep_inside
    severity: critical
    groups: [trucks]
    geofences: [depot]
    schedule: {{timezone: UTC, windows: ["{{window}}"]}}
  - {{id: offline, kind: offline, severity: major, groups: [trackers], after: {OFFLINE_AFTER_S}s}}
  - {{id: battery-trend, kind: predictive, severity: warning, groups: [trucks], metric: battery_v, op: "<",
      threshold: 11.8, window: 6h, horizon: 24h, min_samples: 12}}
"""


def telemetry(device: str, ts_ms: int, **metrics: float) -> tuple[bytes, bytes]:
    return device.encode(), orjson.dumps({"device_id": device, "ts": format_ts(ts_ms), "metrics": metrics})


def fix(device: str, ts_ms: int, lat: float, lon: float, speed: float = 30.0) -> tuple[bytes, bytes]:
    return device.encode(), orjson.dumps({"device_id": device, "ts": format_ts(ts_ms), "lat": lat, "lon": lon,
                                          "speed_kmh": speed})


def reefer_temperatures(minutes: range) -> list[tuple[bytes, bytes]]:
    """5 °C until minute 3, 9 °C from minute 3 to 19, 6 °C from minute 20."""
    return [telemetry("reefer-1", NIGHT + m * MINUTE, temperature_c=5.0 if m < 3 else 9.0 if m < 20 else 6.0)
            for m in minutes]


def alerts_of(settings) -> list[dict]:
    records = asyncio.run(read_topic(_bootstrap(settings), settings.alerts_topic, idle_s=2))
    return [r.json() for r in records]


def _bootstrap(settings) -> str:
    return settings.bootstrap_servers[0]


def wait_for_alerts(settings, predicate, timeout_s: float = 90) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while True:
        got = alerts_of(settings)
        if predicate(got) or time.monotonic() > deadline:
            return got
        time.sleep(1)


def api_get(worker: WorkerProcess, path: str) -> dict:
    with urllib.request.urlopen(worker.base_url + path, timeout=10) as response:
        return orjson.loads(response.read())


def keyset(alerts: list[dict]) -> set[tuple[str, str, str]]:
    return {(a["rule"], a["subject_id"], a["state"]) for a in alerts}


def test_scripted_incidents_give_exactly_the_expected_alerts(broker, prefix, tmp_path: Path):
    settings = worker_settings(broker.url, prefix, tmp_path, partitions=2, timer_interval_s=0.5,
                               alert_lateness_s=1, alert_idle_s=2)
    rules_path = tmp_path / "rules.yaml"
    now_ms = int(time.time() * 1000)
    truck_start = now_ms // MINUTE * MINUTE - 20 * MINUTE
    window = f"{format_ts(now_ms - 2 * 3600_000)[11:16]}-{format_ts(now_ms + 2 * 3600_000)[11:16]}"
    rules_path.write_text(RULES.replace("{window}", window))
    fences_path = tmp_path / "depot.geojson"
    fences_path.write_bytes(orjson.dumps({"type": "Feature", "id": "depot", "properties": {"name": "depot"},
                                          "geometry": shapely.geometry.mapping(DEPOT)}))
    assert cli(settings, "geofences", "load", str(fences_path)).returncode == 0
    loaded = cli(settings, "rules", "load", str(rules_path))
    assert loaded.returncode == 0, loaded.stderr
    listed = cli(settings, "rules", "list")
    assert sorted(line.split("\t")[0] for line in listed.stdout.splitlines()) == sorted(
        ["cold-chain", "restock", "depot-at-night", "offline", "battery-trend"])

    # a bad rules file is refused with the rule and the problem named, and nothing is published
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules:\n  - {id: broken, kind: threshold, severity: major, when: 'temperature_c >> 8'}\n")
    refused = cli(settings, "rules", "load", str(bad))
    assert refused.returncode == 2 and "broken" in refused.stderr

    phase1 = [
        *reefer_temperatures(range(0, 17)),
        *[telemetry("vend-1", NIGHT + i * MINUTE, stock_units=units) for i, units in enumerate([10, 8, 5, 3, 2])],
        # truck-1 parked in the depot, then drives out after 10 minutes and stays out
        *[fix("truck-1", truck_start + i * MINUTE, 52.005, 4.005, 0.0) for i in range(10)],
        *[fix("truck-1", truck_start + (10 + i) * MINUTE, 52.02 + i * 0.002, 4.02, 50.0) for i in range(5)],
        # truck-2's battery loses 0.02 V every 10 minutes for 3 hours
        *[telemetry("truck-2", NIGHT + i * 10 * MINUTE, battery_v=round(12.6 - 0.02 * i, 3)) for i in range(18)],
    ]
    worker = WorkerProcess(settings, tmp_path / "worker-1.log").start()
    try:
        now_ms = int(time.time() * 1000)
        tracker = [fix("tracker-1", now_ms - 3000 + i * 1000, 51.5, 0.0) for i in range(3)]
        asyncio.run(produce(broker.bootstrap, settings.telemetry_topic, [r for r in phase1 if b"metrics" in r[1]]))
        asyncio.run(produce(broker.bootstrap, settings.positions_topic,
                            [r for r in phase1 if b"metrics" not in r[1]] + tracker))
        first = wait_for_alerts(settings, lambda got: len(keyset(got)) >= 4, timeout_s=60)
        # the same worker's API, while it holds the devices' applied signals as objects (no store decode)
        expected_active = {("cold-chain", "reefer-1"), ("restock", "vend-1"), ("depot-at-night", "truck-1"),
                           ("battery-trend", "truck-2")}
        deadline = time.time() + 30
        while True:
            active_now = {(a["rule"], a["subject_id"]) for a in api_get(worker, "/alerts")["alerts"]}
            if active_now == expected_active or time.time() > deadline:
                break
            time.sleep(0.5)
        assert active_now == expected_active
    finally:
        worker.stop()
    last_tracker_ms = now_ms - 3000 + 2000
    assert keyset(first) == {
        ("cold-chain", "reefer-1", "raised"), ("restock", "vend-1", "raised"),
        ("depot-at-night", "truck-1", "raised"), ("battery-trend", "truck-2", "raised"),
    }, first
    by_rule = {a["rule"]: a for a in first}
    assert parse_ts(by_rule["cold-chain"]["ts"]) == NIGHT + 13 * MINUTE  # 9 °C since minute 3, for 10 minutes
    assert parse_ts(by_rule["restock"]["ts"]) == NIGHT + 3 * MINUTE  # the first reading <= 3
    assert parse_ts(by_rule["depot-at-night"]["ts"]) == truck_start + 10 * MINUTE  # the first fix outside
    forecast = by_rule["battery-trend"]["details"]
    assert forecast, "the predictive alert says when the threshold is forecast to be crossed"

    # the tracker went silent while the worker was stopped: the restarted worker raises offline from its timer
    worker = WorkerProcess(settings, tmp_path / "worker-2.log").start()
    try:
        silent = wait_for_alerts(settings, lambda got: ("offline", "tracker-1", "raised") in keyset(got),
                                 timeout_s=OFFLINE_AFTER_S + 60)
        offline = [a for a in silent if a["rule"] == "offline"]
        assert len(offline) == 1 and offline[0]["state"] == "raised", offline
        assert parse_ts(offline[0]["ts"]) == last_tracker_ms + OFFLINE_AFTER_S * 1000
        assert time.time() * 1000 >= last_tracker_ms + OFFLINE_AFTER_S * 1000  # from the timer, not a message

        phase2 = [*reefer_temperatures(range(17, 31)),
                  telemetry("vend-1", NIGHT + 10 * MINUTE, stock_units=20)]
        back_ms = int(time.time() * 1000)
        asyncio.run(produce(broker.bootstrap, settings.telemetry_topic, phase2))
        asyncio.run(produce(broker.bootstrap, settings.positions_topic, [fix("tracker-1", back_ms, 51.5, 0.0)]))
        final = wait_for_alerts(settings, lambda got: len(got) >= 8, timeout_s=60)
        time.sleep(3 * settings.timer_interval_s)  # and nothing more comes from the timer
        final = alerts_of(settings)

        # the API serves the same picture: active alerts, and a device's latest telemetry and alerts
        active = api_get(worker, "/alerts")["alerts"]
        assert {(a["rule"], a["subject_id"]) for a in active} == {
            ("depot-at-night", "truck-1"), ("battery-trend", "truck-2")}
        assert [a["rule"] for a in api_get(worker, "/alerts?severity=critical")["alerts"]] == ["depot-at-night"]
        reefer = api_get(worker, "/devices/reefer-1")
        assert reefer["telemetry"] == {"temperature_c": 6.0} and reefer["active_alerts"] == []
        truck = api_get(worker, "/devices/truck-1")
        assert truck["lat"] == pytest.approx(52.028) and [a["rule"] for a in truck["active_alerts"]] == [
            "depot-at-night"]
    finally:
        worker.stop()

    # truck-1 was parked in the depot for 10 minutes, then drove off: its stop closed and went to the trips topic
    trips = [r.json() for r in asyncio.run(read_topic(broker.bootstrap, settings.trips_topic, idle_s=2))]
    for record in trips:
        validate_output("trip", record)
    stops = [t for t in trips if t["device_id"] == "truck-1" and t["type"] == "stop"]
    assert len(stops) == 1, trips
    assert parse_ts(stops[0]["start_ts"]) == truck_start and stops[0]["geofences"] == ["depot"]
    assert stops[0]["duration_s"] == pytest.approx(9 * 60, abs=60)

    for alert in final:
        validate_output("alert", alert)
    pairs = [(a["alert_id"], a["state"]) for a in final]
    assert len(pairs) == len(set(pairs)), "no alert raised or cleared twice (restart included)"
    assert keyset(final) == {
        ("cold-chain", "reefer-1", "raised"), ("cold-chain", "reefer-1", "cleared"),
        ("restock", "vend-1", "raised"), ("restock", "vend-1", "cleared"),
        ("depot-at-night", "truck-1", "raised"),  # still out of the depot: stays raised
        ("battery-trend", "truck-2", "raised"),
        ("offline", "tracker-1", "raised"), ("offline", "tracker-1", "cleared"),
    }, final
    cleared = {a["rule"]: a for a in final if a["state"] == "cleared"}
    raised = {a["rule"]: a for a in final if a["state"] == "raised"}
    for rule, alert in cleared.items():
        assert alert["alert_id"] == raised[rule]["alert_id"]
    assert parse_ts(cleared["cold-chain"]["ts"]) == NIGHT + 22 * MINUTE  # below 7 °C since minute 20, for 2 min
    assert parse_ts(cleared["restock"]["ts"]) == NIGHT + 10 * MINUTE
    assert parse_ts(cleared["offline"]["ts"]) == back_ms


def test_a_backlog_is_judged_by_its_own_times_not_the_wall_clock(broker, prefix, tmp_path: Path):
    """Fixes an hour old (a backlog, a gateway's late upload): a truck over the limit for 5 s, then under it. The
    worker's timer must not raise the 10 s overspeed from the wall clock, which is long past the deadline while
    the fix that ends it is still to be read; once the truck speeds again and goes silent, the timer raises it at
    its deadline in event time, when the partition's clock (run on by the wall clock once input stops) passes."""
    settings = worker_settings(broker.url, prefix, tmp_path, partitions=1, timer_interval_s=0.1,
                               alert_lateness_s=1, alert_idle_s=2)
    rules_path = tmp_path / "rules.yaml"
    rules_path.write_text("rules:\n  - {id: fast, kind: overspeed, severity: major, limit_kmh: 100, for: 10s}\n")
    assert cli(settings, "rules", "load", str(rules_path)).returncode == 0
    start = int(time.time() * 1000) // 1000 * 1000 - 3_600_000
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        asyncio.run(produce(broker.bootstrap, settings.positions_topic, [fix("truck-9", start, 52.0, 4.0, 130.0)]))
        deadline = time.monotonic() + 60
        while worker.status()["enriched"] < 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker.status()["enriched"] == 1
        time.sleep(3)  # ~30 timer ticks, each with the wall clock an hour past the overspeed's deadline
        asyncio.run(produce(broker.bootstrap, settings.positions_topic,
                            [fix("truck-9", start + 5_000, 52.0, 4.001, 60.0)]))
        time.sleep(2)
        assert alerts_of(settings) == []
        asyncio.run(produce(broker.bootstrap, settings.positions_topic,
                            [fix("truck-9", start + 60_000, 52.0, 4.01, 130.0)]))
        got = wait_for_alerts(settings, lambda got: len(got) >= 1, timeout_s=60)
    finally:
        worker.stop()
    assert [(a["rule"], a["state"], parse_ts(a["ts"])) for a in got] == [("fast", "raised", start + 70_000)]


def test_worker_refuses_a_bad_rules_file(broker, prefix, tmp_path: Path):
    settings = worker_settings(broker.url, prefix, tmp_path)
    bad = tmp_path / "rules.yaml"
    bad.write_text("rules:\n  - {id: too-fast, kind: overspeed, severity: loud, limit_kmh: 90}\n")
    result = subprocess.run(
        [sys.executable, "-m", "fleetstream", "worker", "--rules-file", str(bad)],
        env={**os.environ, **settings.to_env()}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "too-fast" in result.stderr and "severity" in result.stderr
