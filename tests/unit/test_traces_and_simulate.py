"""Trace readers on the real traces in ../shared/data, and the simulator's guarantees."""

from __future__ import annotations

import csv
import gzip
from collections import Counter, defaultdict

import orjson
import pytest

from fleetstream.codecs import DecodeError, decode_positions
from fleetstream.domain.geo import haversine_m
from fleetstream.simulate import RecordKind, SimulationConfig, generate_records, trace_records
from fleetstream.traces import TraceFormatError, parse_time_ms, read_trace


def test_geolife_sample(shared_data):
    path = shared_data / "geolife" / "geolife_sample.txt.gz"
    fixes = list(read_trace(path))
    with gzip.open(path, "rt") as handle:
        rows = sum(1 for _ in handle) - 1
    assert len(fixes) == rows == 217_653
    assert {f.device_id for f in fixes} == {"000", "001"} or len({f.device_id for f in fixes}) == 2
    assert fixes[0].lat == pytest.approx(39.984094) and fixes[0].lon == pytest.approx(116.319236)
    assert fixes[0].ts_ms == parse_time_ms("2008-10-23T05:53:05Z")


def test_geolife_plt_folder(shared_data):
    folder = shared_data / "geolife" / "plt"
    fixes = list(read_trace(folder))
    files = sorted(folder.rglob("*.plt"))
    expected = sum(max(0, sum(1 for _ in open(f)) - 6) for f in files)
    assert len(fixes) == expected
    assert {f.device_id for f in fixes} == {"000", "001"}
    first = next(read_trace(folder / "000" / "20081023025304.plt"))
    assert (first.lat, first.lon) == (39.984702, 116.318417)
    assert first.altitude_m == pytest.approx(492 * 0.3048)
    assert first.ts_ms == parse_time_ms("2008-10-23T02:53:04Z")


def test_liverpool_bus(shared_data):
    path = shared_data / "liverpool_bus" / "route14_outbound.csv"
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    fixes = list(read_trace(path))
    assert len(fixes) == len(rows)
    assert fixes[1].heading_deg == float(rows[1]["bearing"])
    assert fixes[0].heading_deg is None  # an empty bearing stays unknown


def test_replay_records_keep_per_device_order_and_validate(shared_data):
    records = trace_records(shared_data / "liverpool_bus" / "route14_outbound.csv", batch_size=5)
    last: dict[bytes, int] = {}
    total = 0
    for record in records:
        results = decode_positions(record.key, record.value, now_ms=2**62)
        assert not [r for r in results if isinstance(r, DecodeError)]
        for fix in results:
            assert fix.ts_ms >= last.get(record.key, 0)
            last[record.key] = fix.ts_ms
        total += len(results)
    assert total == sum(1 for _ in read_trace(shared_data / "liverpool_bus" / "route14_outbound.csv"))


def test_unreadable_traces_are_refused_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(TraceFormatError, match="bad.csv:1"):
        list(read_trace(bad))
    bad.write_text("device_id,ts,lat,lon\nd1,2026-01-01T00:00:00Z,north,1\n")
    with pytest.raises(TraceFormatError, match="bad.csv:2"):
        list(read_trace(bad))


def _fixes(records):
    for record in records:
        if record.kind is RecordKind.MALFORMED:
            continue
        doc = orjson.loads(record.value)
        yield from (doc if isinstance(doc, list) else [doc])


def test_simulation_is_deterministic_and_counts_add_up():
    config = SimulationConfig(vehicles=30, rate_per_s=300, duration_s=60, seed=3)
    first = list(generate_records(config))
    assert first == list(generate_records(config))
    assert sum(r.fixes for r in first) == pytest.approx(300 * 60, rel=0.02)
    kinds = Counter(r.kind for r in first)
    n = sum(kinds.values())
    assert kinds[RecordKind.MALFORMED] / n == pytest.approx(config.malformed_share, abs=0.006)
    assert kinds[RecordKind.DUPLICATE] > 0 and kinds[RecordKind.OUT_OF_ORDER] > 0


def test_malformed_records_are_really_rejected_and_good_ones_accepted():
    config = SimulationConfig(vehicles=20, rate_per_s=200, duration_s=60, malformed_share=0.05, seed=5)
    now = config.start_ms + 10**9
    for record in generate_records(config):
        results = decode_positions(record.key, record.value, now_ms=now)
        bad = [r for r in results if isinstance(r, DecodeError)]
        assert bool(bad) == (record.kind is RecordKind.MALFORMED), (record, bad)


def test_simulated_vehicles_drive_at_plausible_speeds():
    config = SimulationConfig(vehicles=10, rate_per_s=10, duration_s=600, outlier_share=0, noise_m=0,
                              duplicate_share=0, out_of_order_share=0, malformed_share=0, seed=9)
    tracks = defaultdict(list)
    for fix in _fixes(generate_records(config)):
        tracks[fix["device_id"]].append(fix)
    speeds = []
    for track in tracks.values():
        for a, b in zip(track, track[1:], strict=False):
            dt = (parse_time_ms(b["ts"]) - parse_time_ms(a["ts"])) / 1000
            speeds.append(haversine_m(a["lat"], a["lon"], b["lat"], b["lon"]) / dt * 3.6)
    assert max(speeds) < 70
    assert sum(1 for s in speeds if s < 1) > 0  # vehicles stop now and then
    assert sum(speeds) / len(speeds) > 10


def test_batches_hold_fixes_of_one_device():
    config = SimulationConfig(vehicles=5, rate_per_s=50, duration_s=30, batch_size=8, malformed_share=0, seed=2)
    for record in generate_records(config):
        doc = orjson.loads(record.value)
        assert isinstance(doc, list) and 1 <= len(doc) <= 8
        assert {fix["device_id"] for fix in doc} == {record.key.decode()}
