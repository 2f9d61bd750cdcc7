"""The core pipeline on a real broker: every input accounted for, enrichment right, state survives SIGKILL."""

from __future__ import annotations

import asyncio
import random
import shutil
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import h3
import orjson
import pytest

from fleetstream.codecs import validate_output
from fleetstream.config import Settings
from fleetstream.domain.geo import haversine_m
from fleetstream.embedded import free_port
from tests.integration.helpers import (
    WorkerProcess,
    committed_offsets,
    fault_env,
    produce,
    read_topic,
    wait_for_count,
    wait_for_every_event,
    worker_settings,
)

pytestmark = pytest.mark.integration

START_MS = 1_780_000_000_000  # 2026-05-28, safely in the past


def _fix(device: str, ts_ms: int, lat: float, lon: float) -> dict:
    return {"device_id": device, "ts": ts_ms, "lat": round(lat, 7), "lon": round(lon, 7)}


MALFORMED_KINDS = (
    lambda d, f: (d, b"{not json"),
    lambda d, f: (d, orjson.dumps({**f, "lat": 123.0})),
    lambda d, f: (d, orjson.dumps({**f, "lon": -190.0})),
    lambda d, f: (d, orjson.dumps({k: v for k, v in f.items() if k != "ts"})),
    lambda d, f: (d, orjson.dumps({**f, "ts": "yesterday"})),
    lambda d, f: (d, orjson.dumps({**f, "device_id": ""})),
    lambda d, f: (d, orjson.dumps({**f, "device_id": "someone-else"})),
    lambda d, f: (d, orjson.dumps({**f, "lat": "NaN"})),
    lambda d, f: (d, b"[]"),
    lambda d, f: (d, b"42"),
    lambda d, f: (d, orjson.dumps({**f, "ts": START_MS + 10 * 86_400_000 * 1000})),
)


def make_stream(n_records: int, devices: int, malformed_share: float, seed: int):
    """Keyed records (device_id -> JSON), a mix of single fixes, arrays of fixes, duplicates and malformed ones.

    Returns the records and, per device, the valid fixes in the order they were produced.
    """
    rng = random.Random(seed)
    pos = {f"dev-{i:04d}": (53.40 + rng.uniform(-0.05, 0.05), -2.98 + rng.uniform(-0.05, 0.05)) for i in range(devices)}
    clock = {d: START_MS for d in pos}
    valid: dict[str, list[dict]] = defaultdict(list)
    records: list[tuple[bytes, bytes]] = []
    malformed = round(n_records * malformed_share)
    fixes_total = malformed
    while fixes_total < n_records:
        device = rng.choice(list(pos))
        key = device.encode()
        n = 1 if rng.random() < 0.7 else rng.randint(2, 5)
        n = min(n, n_records - fixes_total)
        batch = []
        for _ in range(n):
            lat, lon = pos[device]
            lat += rng.gauss(0, 0.0003)
            lon += rng.gauss(0, 0.0005)
            pos[device] = (lat, lon)
            if rng.random() < 0.03 and valid[device]:
                fix = dict(valid[device][-1])  # a duplicate: same ts as the previous fix
            else:
                clock[device] += rng.randint(1000, 10_000)
                fix = _fix(device, clock[device], lat, lon)
            batch.append(fix)
            valid[device].append(fix)
        records.append((key, orjson.dumps(batch if len(batch) > 1 or rng.random() < 0.2 else batch[0])))
        fixes_total += n
    for i in range(malformed):  # malformed records of every kind, at random places in the stream
        device = rng.choice(list(pos))
        lat, lon = pos[device]
        kind = MALFORMED_KINDS[i % len(MALFORMED_KINDS)]
        records.insert(rng.randrange(len(records) + 1), kind(device.encode(), _fix(device, START_MS, lat, lon)))
    return records, valid, malformed


DEFAULT_MAX_SPEED_KMH = Settings().max_speed_kmh


def reference_odometer(fixes: list[dict], max_speed_kmh: float = DEFAULT_MAX_SPEED_KMH) -> tuple[float, int]:
    """Sum of haversine distances between consecutive accepted fixes, and their count. Accepted: strictly newer
    than the last accepted fix, and reachable from it at ``max_speed_kmh`` (the default outlier-jump filter)."""
    total, last, accepted = 0.0, None, 0
    for fix in fixes:
        if last is not None and fix["ts"] <= last["ts"]:
            continue
        if last is not None:
            step = haversine_m(last["lat"], last["lon"], fix["lat"], fix["lon"])
            if max_speed_kmh and step > max_speed_kmh / 3600.0 * (fix["ts"] - last["ts"]):
                continue  # an implied-speed jump: filtered, the odometer does not move
            total += step
        last = fix
        accepted += 1
    return total, accepted


def check_outputs(enriched, dead, valid, malformed_count):
    events = [r.json() for r in enriched]
    ids = Counter(e["event_id"] for e in events)
    unique: dict[str, dict] = {}
    for e in events:  # consumers keep the first copy of an event id (a replay may re-send it)
        unique.setdefault(e["event_id"], e)
    assert len(unique) == sum(len(v) for v in valid.values())
    assert len({(r.json()["partition"], r.json()["offset"], r.json().get("index")) for r in dead}) == malformed_count
    for e in unique.values():
        validate_output("enriched_position", e)  # the published contract
        assert e["h3"] == h3.latlng_to_cell(e["lat"], e["lon"], 9)
    for r in dead:
        validate_output("deadletter", r.json())
    last_by_device: dict[str, dict] = {}
    for e in unique.values():
        if "filtered" in e:
            continue
        prev = last_by_device.get(e["device_id"])
        if prev is None or e["ts"] > prev["ts"]:
            last_by_device[e["device_id"]] = e
    for device, fixes in valid.items():
        expected, _ = reference_odometer(fixes)
        assert last_by_device[device]["odometer_m"] == pytest.approx(expected, rel=1e-9, abs=1e-6), device
    return ids


def test_every_record_accounted_for_and_enriched(broker, prefix, tmp_path: Path):
    settings = worker_settings(broker.url, prefix, tmp_path, partitions=4)
    records, valid, malformed = make_stream(10_000, devices=50, malformed_share=0.05, seed=7)
    n_valid = sum(len(v) for v in valid.values())
    assert malformed >= 400
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        asyncio.run(produce(broker.bootstrap, settings.positions_topic, records))
        enriched = asyncio.run(wait_for_count(broker.bootstrap, settings.enriched_topic, n_valid))
        dead = asyncio.run(read_topic(broker.bootstrap, settings.deadletter_topic, expect=malformed, idle_s=3))
        status = worker.status()
    finally:
        worker.stop()
    assert len(enriched) == n_valid, worker.log_tail()
    assert len(dead) == malformed
    assert len(enriched) + len(dead) == n_valid + malformed
    ids = check_outputs(enriched, dead, valid, malformed)
    assert max(ids.values()) == 1  # no restart, no duplicates
    reasons = Counter(r.json()["error"]["reason"] for r in dead)
    assert len(reasons) >= 8, reasons  # the malformed kinds are told apart
    assert status["fixes_in"] == n_valid + malformed
    assert status["deadlettered"] == malformed
    # the enriched record follows its input partition (co-partitioned, keyed by device)
    for r in enriched:
        e = r.json()
        assert r.key == e["device_id"].encode()
        assert r.partition == e["source"]["partition"]


def assert_commits_reach_the_ends(settings: Settings, bootstrap: str, n_records: int, workers: list[WorkerProcess],
                                  context: str, timeout_s: float = 45) -> None:
    """Once every input record is processed, the group's committed offset of every input partition reaches the
    partition's end (counted by reading the topic, never by end offsets). Faust commits on an interval: poll.

    Without faust_fixes, a worker that restored its tables from the changelogs was seen committing a few offsets
    past where the previous owner had, then creeping one offset per commit (a later restart replays almost
    everything), and committing records it had dropped unprocessed."""
    inputs = asyncio.run(read_topic(bootstrap, settings.positions_topic, expect=n_records, idle_s=3))
    assert len(inputs) == n_records
    ends = {p: 1 + max(r.offset for r in inputs if r.partition == p) for p in range(4)}
    deadline = time.monotonic() + timeout_s
    while True:
        committed_now = asyncio.run(committed_offsets(bootstrap, settings.app_id, settings.positions_topic, 4))
        if committed_now == ends or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert committed_now == ends, (
        f"committed offsets {committed_now} do not reach the input ends {ends} {timeout_s:.0f} s after every event "
        f"was processed; {context}; "
        + "; ".join(f"log tail of {w.log_path.name}: {w.log_tail(1500)}" for w in workers)
    )


@pytest.mark.parametrize("case", ["kept", "lost", "lost_uncommitted"])
def test_sigkill_and_restart_loses_nothing(broker, prefix, tmp_path: Path, case: str):
    """SIGKILL part-way through, then a new worker: on the same machine (its RocksDB state kept), or on another
    one (``lost``: the data dir is gone, so every table is restored from its changelog while input records wait),
    there also with the first worker killed before its group's first commit (``lost_uncommitted``).
    The new worker's seek to the committed offsets is slowed down, as on a loaded machine: records fetched before
    it completes must neither be lost nor hold the group's offsets back."""
    settings = worker_settings(broker.url, prefix, tmp_path, partitions=4, batch_max=200)
    records, valid, malformed = make_stream(20_000, devices=40, malformed_share=0.02, seed=11)
    n_valid = sum(len(v) for v in valid.values())
    worker = WorkerProcess(settings, tmp_path / "worker1.log",
                           env=fault_env(no_commits=case == "lost_uncommitted")).start()
    try:
        asyncio.run(produce(broker.bootstrap, settings.positions_topic, records))
        # kill it once it is part-way through
        deadline = time.monotonic() + 60
        while worker.status()["fixes_in"] < (n_valid + malformed) // 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.status()["fixes_in"] < n_valid + malformed, "worker finished before the kill"
    finally:
        worker.kill()
    # where the killed worker left its group (for the failure reports)
    committed_at_kill = asyncio.run(committed_offsets(broker.bootstrap, settings.app_id, settings.positions_topic, 4))
    context = f"committed at the kill: {committed_at_kill}"
    if case == "lost_uncommitted":
        assert set(committed_at_kill.values()) == {None}, context
    if case.startswith("lost"):
        shutil.rmtree(settings.data_dir)
    restarted = WorkerProcess(settings, tmp_path / "worker2.log", env=fault_env(slow_seek_s=2.0)).start()
    try:
        enriched, dead = wait_for_every_event(settings, broker.bootstrap, n_valid, malformed=malformed,
                                              n_inputs=len(records), workers=[restarted], context=context)
        assert_commits_reach_the_ends(settings, broker.bootstrap, len(records), [restarted], context)
    finally:
        restarted.stop()
    check_outputs(enriched, dead, valid, malformed)


def test_workers_taking_over_from_each_other_lose_nothing(broker, prefix, tmp_path: Path):
    """Records keep coming while a second worker joins (the first one's partitions are revoked mid-batch and split
    between them), then the first one stops and the second takes everything over; both restore tables from
    changelogs and seek slowly. Every event is processed and the committed offsets reach every partition's end."""
    settings_a = worker_settings(broker.url, prefix, tmp_path, partitions=4, batch_max=200)
    settings_b = settings_a.with_overrides(web_port=(port := free_port()), advertised_url=f"http://127.0.0.1:{port}",
                                           data_dir=str(tmp_path / "b-data"))
    records, valid, malformed = make_stream(20_000, devices=40, malformed_share=0.02, seed=13)
    n_valid = sum(len(v) for v in valid.values())

    def produce_paced() -> None:  # a minute of traffic, in order
        for i in range(0, len(records), 250):
            asyncio.run(produce(broker.bootstrap, settings_a.positions_topic, records[i:i + 250]))
            time.sleep(0.75)

    traffic = threading.Thread(target=produce_paced, daemon=True)
    a = WorkerProcess(settings_a, tmp_path / "a.log", env=fault_env(slow_seek_s=2.0)).start()
    b = None
    try:
        traffic.start()
        deadline = time.monotonic() + 60
        while a.status()["fixes_in"] < 1000 and time.monotonic() < deadline:
            time.sleep(0.1)
        b = WorkerProcess(settings_b, tmp_path / "b.log", env=fault_env(slow_seek_s=2.0)).start()
        deadline = time.monotonic() + 120  # until b owns partitions and has processed some of them
        while b.status()["fixes_in"] == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert b.status()["fixes_in"] > 0, b.log_tail()
        assert traffic.is_alive(), "all records were produced before the second worker took partitions over"
        a.stop()  # b takes over a's partitions
        traffic.join(timeout=120)
        context = "a second worker joined, then the first one stopped"
        enriched, dead = wait_for_every_event(settings_a, broker.bootstrap, n_valid, malformed=malformed,
                                              n_inputs=len(records), workers=[a, b], context=context)
        assert_commits_reach_the_ends(settings_a, broker.bootstrap, len(records), [a, b], context)
    finally:
        a.stop()
        if b is not None:
            b.stop()
    check_outputs(enriched, dead, valid, malformed)
