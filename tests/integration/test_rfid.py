"""RFID assets on the real broker: the domain's scripted warehouse day (tests/unit/test_assets.py) played through a
real worker. Pallets are received at a dock, moved to shelves, loaded onto a truck that drives out through the
gate (its positions go through the position pipeline and reach the RFID agent through the enriched topic), one is
stolen through a side door, one forgotten. The worker is restarted mid-day. The asset events and alerts on the
real topics must be exactly the domain's, and the inventory per zone from the API right at the end."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from fleetstream.codecs import format_ts, parse_ts, validate_output
from fleetstream.domain.models import RfidRead
from fleetstream.embedded import free_port
from tests.integration.helpers import WorkerProcess, produce, read_topic, settings_env, worker_settings
from tests.unit.test_assets import EXPECTED_DAY_ALERTS, EXPECTED_DAY_EVENTS, PALLETS, warehouse_script
from tests.unit.test_assets import T0 as SCRIPT_T0

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "rfid-secret"
# cut the day where the truck reports (its fix must reach the RFID agent before the reads after it); restart at 400 s
PHASES = (300, 400, 500, 523, 600)
VEHICLE_AT = (300, 500, 523, 600)
RESTART_AT = 400
DEPOT = {"type": "Feature", "id": "depot", "properties": {"name": "Depot yard"}, "geometry": {
    "type": "Polygon", "coordinates": [[[-2.9853, 53.4008], [-2.9845, 53.4008], [-2.9845, 53.4013],
                                        [-2.9853, 53.4013], [-2.9853, 53.4008]]]}}


def cli(settings, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **settings_env(settings)}
    return subprocess.run([sys.executable, "-m", "fleetstream", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def get(worker: WorkerProcess, path: str, token: str | None = TOKEN) -> tuple[int, dict]:
    request = urllib.request.Request(worker.base_url + path)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read())


def rfid_status(worker: WorkerProcess) -> dict:
    return get(worker, "/rfid/status", token=None)[1]


def wait_until(condition, what: str, worker: WorkerProcess, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; status {rfid_status(worker)}; {worker.log_tail()}")


def test_a_warehouse_day_on_the_broker(broker, prefix, log_dir):
    shift = (int(time.time()) - 3600) * 1000 - SCRIPT_T0  # the day took place an hour ago

    def at(seconds: float) -> int:
        return SCRIPT_T0 + shift + round(seconds * 1000)

    assets_file = log_dir / "pallets.json"
    assets_file.write_text(json.dumps(PALLETS))
    fences_file = log_dir / "depot.geojson"
    fences_file.write_text(json.dumps({"type": "FeatureCollection", "features": [DEPOT]}))
    settings = worker_settings(
        broker.url, prefix, log_dir, partitions=4,
        rfid_topic=f"{prefix}.rfid", readers_topic=f"{prefix}.readers", assets_topic=f"{prefix}.assets",
        asset_registry_topic=f"{prefix}.asset.registry", readers_file=str(ROOT / "examples" / "readers.json"),
        assets_file=str(assets_file), geofences_file=str(fences_file), rfid_dedup_window_s=1.0,
        rfid_switch_margin_db=6.0, rfid_switch_after_s=5.0, rfid_separation_after_s=60.0, timer_interval_s=0.3,
        api_token=TOKEN, trips_enabled=False,
    )
    script = warehouse_script()
    bootstrap = broker.bootstrap

    def send_reads(start: float, end: float) -> int:
        records = []
        for ts, _, item in script:
            if isinstance(item, RfidRead) and at(start) <= ts + shift < at(end):
                doc = {"tag_id": item.tag_id, "reader_id": item.reader_id, "ts": format_ts(item.ts_ms + shift),
                       "rssi_dbm": item.rssi_dbm, "antenna": 1}
                records.append((item.tag_id.encode(), orjson.dumps(doc)))
        return asyncio.run(produce(bootstrap, settings.rfid_topic, records))

    def send_vehicle(seconds: float, worker: WorkerProcess) -> None:
        [(ts, _, (vehicle, fix))] = [s for s in script
                                     if not isinstance(s[2], RfidRead) and s[0] == at(seconds) - shift]
        before = rfid_status(worker)["vehicle_updates"]
        position = {"device_id": vehicle, "ts": format_ts(ts + shift), "lat": fix.lat, "lon": fix.lon,
                    "speed_kmh": 0.0 if fix.motion == "stopped" else 30.0}
        asyncio.run(produce(bootstrap, settings.positions_topic, [(vehicle.encode(), orjson.dumps(position))]))
        wait_until(lambda: rfid_status(worker)["vehicle_updates"] > before, f"the truck's fix at {seconds} s", worker)

    def processed(worker: WorkerProcess, expected: int) -> None:
        wait_until(lambda: rfid_status(worker)["reads_in"] >= expected, f"{expected} reads processed", worker)

    worker = WorkerProcess(settings, log_dir / "worker-1.log").start()
    workers = [worker]
    try:
        wait_until(lambda: rfid_status(worker)["started"] and rfid_status(worker)["readers"] == 10, "readers",
                   worker)
        # a malformed read and a read from a reader nobody defined: dead letters with their reasons, nothing else
        bad = [(b"P9", b"{broken"), (b"X1", orjson.dumps({"tag_id": "X1", "reader_id": "ghost", "ts": at(1)}))]
        sent = asyncio.run(produce(bootstrap, settings.rfid_topic, bad))
        start = 0.0
        for end in (*PHASES, 901):
            sent += send_reads(start, end)
            processed(worker, sent)
            if end == RESTART_AT:  # stop mid-day: the next worker must carry on from the changelog and offsets
                worker.stop()
                worker = WorkerProcess(settings, log_dir / "worker-2.log").start()
                workers.append(worker)
                wait_until(lambda w=worker: rfid_status(w)["started"], "the restarted worker", worker)
                sent = 0
            if end in VEHICLE_AT:
                send_vehicle(end, worker)
            start = end

        # the last deadline (P5 missing at 799.54 s) fires once the event clock passes it
        alerts = asyncio.run(read_topic(bootstrap, settings.alerts_topic, expect=len(EXPECTED_DAY_ALERTS),
                                        idle_s=3))
        events = asyncio.run(read_topic(bootstrap, settings.assets_topic, expect=len(EXPECTED_DAY_EVENTS),
                                        idle_s=3))

        def relative(ts: str) -> float:
            return (parse_ts(ts) - shift - SCRIPT_T0) / 1000

        got_events = []
        for record in events:
            value = record.json()
            validate_output("asset_event", value)
            assert record.key == value["tag_id"].encode()
            got_events.append((value["type"], value["tag_id"], value["zone_id"] or value["vehicle_id"],
                               relative(value["ts"])))
        assert sorted(got_events, key=lambda e: (e[1], e[3])) == EXPECTED_DAY_EVENTS
        got_alerts = []
        for record in alerts:
            value = record.json()
            validate_output("alert", value)
            got_alerts.append((value["rule"], value["state"], value["subject_id"], relative(value["ts"])))
        assert sorted(got_alerts, key=lambda a: (a[3], a[0])) == EXPECTED_DAY_ALERTS

        dead = [r.json() for r in asyncio.run(read_topic(bootstrap, settings.deadletter_topic, expect=2, idle_s=2))]
        assert sorted((d["key"], d["error"]["reason"]) for d in dead if d["source_topic"] == settings.rfid_topic) == [
            ("P9", "malformed_json"), ("X1", "unknown_reader")]

        # the inventory per zone at the end of the day, from the API
        inventory = {zone: get(worker, f"/zones/{zone}/inventory")[1]
                     for zone in ("dock-1", "dock-2", "shelf-a", "shelf-b", "depot")}
        assert {zone: (body["count"], body["assets"]) for zone, body in inventory.items()} == {
            "dock-1": (1, ["P5"]), "dock-2": (0, []), "shelf-a": (0, []), "shelf-b": (1, ["P4"]), "depot": (0, [])}
        status, p1 = get(worker, "/assets/P1")
        assert status == 200 and p1["vehicle_id"] == "veh-0012" and p1["zones"] == [] and not p1["inside"]
        assert (p1["lat"], p1["lon"]) == (53.3900, -2.9900)  # travelling with the truck
        status, p5 = get(worker, "/assets/P5")
        assert status == 200 and p5["zones"] == ["dock-1"] and [a["rule"] for a in p5["active_alerts"]] == [
            "asset_missing"]
        # GET /alerts lists the assets' active alerts beside the vehicles' (none here), with its filters
        raised = {(rule, tag) for rule, state, tag, _ in EXPECTED_DAY_ALERTS if state == "raised"}
        raised -= {(rule, tag) for rule, state, tag, _ in EXPECTED_DAY_ALERTS if state == "cleared"}
        status, active = get(worker, "/alerts")
        assert status == 200 and {(a["rule"], a["subject_id"]) for a in active["alerts"]} == raised
        assert all(a["alert_id"] == f"{a['rule']}:{a['subject_id']}:{parse_ts(a['ts'])}" for a in active["alerts"])
        missing = get(worker, "/alerts?rule=asset_missing")[1]["alerts"]
        assert [(a["subject_id"], a["severity"], relative(a["ts"])) for a in missing] == [("P5", "major", 799.54)]
        assert get(worker, f"/alerts?after={missing[0]['alert_id']}&rule=asset_missing")[1]["alerts"] == []
        assert get(worker, "/alerts?severity=critical&rule=asset_missing")[1]["alerts"] == []
        assert get(worker, "/assets/nobody")[0] == 404
        assert get(worker, "/zones/nowhere/inventory")[0] == 404
        assert get(worker, "/zones/dock-1/inventory?limit=0")[0] == 400
        assert get(worker, "/zones/dock-1/inventory", token=None)[0] == 401
        assert get(worker, "/assets/P1", token="wrong")[0] == 401
    finally:
        for w in workers:
            w.stop()


def test_two_workers_answer_for_every_asset_and_zone(broker, prefix, log_dir):
    """Tags spread over the partitions of two workers: a tag from either worker (routed to its owner), a zone's
    inventory from either worker (gathered), each worker's own share disjoint and together complete."""
    settings_a = worker_settings(
        broker.url, prefix, log_dir, partitions=4, rfid_topic=f"{prefix}.rfid", readers_topic=f"{prefix}.readers",
        assets_topic=f"{prefix}.assets", asset_registry_topic=f"{prefix}.asset.registry",
        readers_file=str(ROOT / "examples" / "readers.json"), api_token=TOKEN,
    )
    port = free_port()
    settings_b = settings_a.with_overrides(web_port=port, advertised_url=f"http://127.0.0.1:{port}",
                                           data_dir=str(log_dir / "b-data"))
    zones = {"dock-door-1": "dock-1", "dock-door-2": "dock-2", "shelf-a": "shelf-a", "shelf-b": "shelf-b"}
    placed = {f"tag-{i:03d}": list(zones)[i % len(zones)] for i in range(40)}
    now_ms = int(time.time() * 1000) - 60_000
    records = [(tag.encode(), orjson.dumps({"tag_id": tag, "reader_id": reader, "ts": now_ms + k, "rssi_dbm": -50}))
               for k in range(3) for tag, reader in placed.items()]
    workers = [WorkerProcess(settings_a, log_dir / "a.log").start(),
               WorkerProcess(settings_b, log_dir / "b.log").start()]
    try:
        def both_own_partitions() -> bool:
            try:
                parts = [get(w, "/zones/dock-1/inventory?scope=local")[0] for w in workers]
                return all(status == 200 for status in parts) and all(
                    rfid_status(w)["started"] for w in workers) and _assigned(workers) == 2
            except OSError:
                return False

        wait_until(both_own_partitions, "both workers owning partitions", workers[0])
        asyncio.run(produce(broker.bootstrap, settings_a.rfid_topic, records))
        wait_until(lambda: sum(rfid_status(w)["reads_in"] for w in workers) >= len(records), "the reads", workers[0])
        local = [get(w, "/zones/shelf-a/inventory?scope=local")[1] for w in workers]
        expected = sorted(tag for tag, reader in placed.items() if zones[reader] == "shelf-a")
        assert all(local) and not set(local[0]) & set(local[1]) and sorted(local[0] + local[1]) == expected
        for worker in workers:
            for reader, zone in zones.items():
                status, body = get(worker, f"/zones/{zone}/inventory?limit=4")
                tags = sorted(tag for tag, at in placed.items() if at == reader)
                assert status == 200 and body["count"] == len(tags) and body["assets"] == tags[:4]
                status, page = get(worker, f"/zones/{zone}/inventory?limit=100&after={body['next_after']}")
                assert page["assets"] == tags[4:] and page["next_after"] is None
            for tag, reader in placed.items():
                status, body = get(worker, f"/assets/{tag}")
                assert status == 200 and body["zones"] == [zones[reader]] and body["reader_id"] == reader
        tracked = [_metric(w, "fleetstream_assets_tracked") for w in workers]
        assert all(tracked) and sum(tracked) == len(placed)
    finally:
        for w in workers:
            w.stop()


def _assigned(workers: list[WorkerProcess]) -> int:
    """How many workers hold RFID partitions (from their metrics)."""
    owning = 0
    for worker in workers:
        with urllib.request.urlopen(worker.base_url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        owning += any(line.startswith("fleetstream_assigned_partitions") and not line.rstrip().endswith(" 0.0")
                      for line in text.splitlines())
    return owning


def _metric(worker: WorkerProcess, name: str) -> float:
    with urllib.request.urlopen(worker.base_url + "/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_readers_and_assets_commands_and_a_running_worker_following_them(broker, prefix, log_dir):
    """``fleetstream readers|assets load/list/delete`` against the broker; the worker follows the readers topic
    while it runs (a deleted reader's reads are dead-lettered as unknown_reader)."""
    settings = worker_settings(
        broker.url, prefix, log_dir, partitions=2, rfid_topic=f"{prefix}.rfid", readers_topic=f"{prefix}.readers",
        assets_topic=f"{prefix}.assets", asset_registry_topic=f"{prefix}.asset.registry",
    )
    loaded = cli(settings, "readers", "load", str(ROOT / "examples" / "readers.json"))
    assert loaded.returncode == 0 and "published 10 readers" in loaded.stdout, loaded.stderr
    bad = log_dir / "bad.json"
    bad.write_text(json.dumps([{"reader_id": "r", "lat": 95, "lon": 0}]))
    refused = cli(settings, "readers", "load", str(bad))
    assert refused.returncode == 2 and "lat 95" in refused.stderr
    listed = cli(settings, "readers", "list")
    assert len(listed.stdout.splitlines()) == 10 and "truck-12-bay\tvehicle\tvehicle veh-0012" in listed.stdout
    assets_file = log_dir / "assets.json"
    assets_file.write_text(json.dumps({"P1": {"keep_inside": True, "authorised_vehicles": ["veh-0012"]}}))
    assert cli(settings, "assets", "load", str(assets_file)).returncode == 0
    assert orjson.loads(cli(settings, "assets", "list", "--json").stdout) == {
        "P1": {"keep_inside": True, "authorised_vehicles": ["veh-0012"]}}

    worker = WorkerProcess(settings, log_dir / "worker.log").start()
    try:
        wait_until(lambda: rfid_status(worker)["readers"] == 10, "readers loaded", worker)
        now_ms = int(time.time() * 1000) - 60_000
        read = {"tag_id": "P1", "reader_id": "dock-door-1", "ts": now_ms}
        asyncio.run(produce(broker.bootstrap, settings.rfid_topic, [(b"P1", orjson.dumps(read))]))
        [event] = [r.json() for r in asyncio.run(read_topic(broker.bootstrap, settings.assets_topic, expect=1))]
        assert (event["type"], event["zone_id"]) == ("arrived", "dock-1")
        assert cli(settings, "readers", "delete", "dock-door-1").returncode == 0
        wait_until(lambda: rfid_status(worker)["readers"] == 9, "the reader deleted", worker)
        later = {**read, "ts": now_ms + 10_000}
        asyncio.run(produce(broker.bootstrap, settings.rfid_topic, [(b"P1", orjson.dumps(later))]))
        dead = asyncio.run(read_topic(broker.bootstrap, settings.deadletter_topic, expect=1))
        assert [(d.json()["source_topic"], d.json()["error"]["reason"]) for d in dead] == [
            (settings.rfid_topic, "unknown_reader")]
        assert "9 readers" in cli(settings, "readers", "list").stderr
    finally:
        worker.stop()
