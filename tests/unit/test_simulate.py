"""The simulator (deterministic, plausible, imperfections counted), trace readers on the real traces in
../shared/data, replay records, the partitioner, and the publisher's flushing against a fake producer.

Contract checks here are deliberately simple and independent of ``fleetstream.codecs``.
"""

from __future__ import annotations

import asyncio
import csv
import gzip
import math
import random
import re
import statistics
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner, murmur2
from hypothesis import given
from hypothesis import strategies as st

import fleetstream.simulate as simulate_module
from fleetstream.domain.geo import EARTH_RADIUS_M, bearing_deg, haversine_m
from fleetstream.simulate import (
    PublishStats,
    RecordKind,
    SimRecord,
    SimulationConfig,
    generate_records,
    partition_for_key,
    publish,
    trace_records,
)
from fleetstream.traces import TraceFormatError, parse_time_ms, read_trace

# --- a simple, independent reading of the fleet.positions contract -------------------------------------------

RFC3339 = re.compile(r"\d{4}-\d\d-\d\d[Tt ]\d\d:\d\d:\d\d(\.\d+)?([Zz]|[+-]\d\d:\d\d)")
FIELDS = {"device_id", "ts", "lat", "lon", "speed_kmh", "heading_deg", "accuracy_m", "altitude_m", "attributes"}
REQUIRED = {"device_id", "ts", "lat", "lon"}
RANGES = {"lat": (-90, 90), "lon": (-180, 180), "speed_kmh": (0, 2000), "heading_deg": (0, 360),
          "accuracy_m": (0, math.inf), "altitude_m": (-1000, 100_000)}


def fix_problem(item: Any, key: bytes) -> str | None:
    """Why one fix breaks the contract, or None."""
    if not isinstance(item, dict):
        return "not an object"
    if set(item) - FIELDS:
        return "unknown field"
    if not set(item) >= REQUIRED:
        return "missing field"
    if not isinstance(item["device_id"], str) or not item["device_id"]:
        return "bad device_id"
    if item["device_id"].encode() != key:
        return "key mismatch"
    ts = item["ts"]
    if type(ts) is int:
        if ts < 0:
            return "ts before 1970"
    elif not isinstance(ts, str) or not RFC3339.fullmatch(ts):
        return "ts not RFC 3339"
    else:
        try:
            datetime.fromisoformat(ts.upper().replace("Z", "+00:00"))
        except ValueError:
            return "ts not a date"
    for name, (low, high) in RANGES.items():
        value = item.get(name)
        if value is None and name not in REQUIRED:
            continue
        if type(value) not in (int, float) or not math.isfinite(value):
            return f"{name} not a number"
        if not low <= value <= high:
            return f"{name} out of range"
    return None


def message_problems(key: bytes, value: bytes) -> list[str | None]:
    """One entry per fix the message carries (a message that is no object or array counts as one)."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return ["not JSON"]
    if isinstance(doc, list):
        return [fix_problem(item, key) for item in doc] if doc else ["empty array"]
    return [fix_problem(doc, key)] if isinstance(doc, dict) else ["not an object"]


def fixes_of(records: list[SimRecord]) -> list[tuple[bytes, dict, RecordKind]]:
    """(key, fix, kind) of every fix that is JSON, in message order."""
    out = []
    for record in records:
        if record.fix_kinds == (RecordKind.MALFORMED,) and message_problems(record.key, record.value)[0] in (
                "not JSON", "not an object", "empty array"):
            continue
        doc = orjson.loads(record.value)
        for item, kind in zip(doc if isinstance(doc, list) else [doc], record.fix_kinds, strict=True):
            out.append((record.key, item, kind))
    return out


def good_tracks(records: list[SimRecord]) -> dict[bytes, list[dict]]:
    """Each device's good fixes (out-of-order ones put back in place), in time order."""
    tracks: dict[bytes, list[dict]] = defaultdict(list)
    for key, fix, kind in fixes_of(records):
        if kind in (RecordKind.GOOD, RecordKind.OUT_OF_ORDER):
            tracks[key].append(fix)
    for track in tracks.values():
        track.sort(key=lambda f: parse_time_ms(f["ts"]))
    return tracks


def speed_kmh_between(a: dict, b: dict) -> float:
    dt_s = (parse_time_ms(b["ts"]) - parse_time_ms(a["ts"])) / 1000.0
    return haversine_m(a["lat"], a["lon"], b["lat"], b["lon"]) / dt_s * 3.6


# --- the simulator --------------------------------------------------------------------------------------------

SMALL = SimulationConfig(vehicles=10, rate_per_s=20, duration_s=60, seed=7, malformed_share=0.05,
                         duplicate_share=0.03, out_of_order_share=0.03, outlier_share=0.03)


def test_a_seed_gives_the_same_bytes_and_another_seed_other_bytes():
    first = list(generate_records(SMALL))
    assert first == list(generate_records(SMALL))
    other = list(generate_records(SimulationConfig(**{**_fields(SMALL), "seed": 8})))
    assert [r.value for r in other] != [r.value for r in first]


def _fields(config: SimulationConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in config.__dataclass_fields__}


def test_records_come_in_event_time_order_and_every_observation_is_accounted_for():
    records = list(generate_records(SMALL))
    assert all(a.ts_ms <= b.ts_ms for a, b in pairwise(records))
    assert records[0].ts_ms == SMALL.start_ms and records[-1].ts_ms < SMALL.start_ms + SMALL.duration_s * 1000
    kinds = Counter(kind for record in records for kind in record.fix_kinds)
    observations = sum(kinds.values()) - kinds[RecordKind.DUPLICATE]  # duplicates are extra copies
    assert observations == round(SMALL.rate_per_s * SMALL.duration_s)
    rank = [RecordKind.GOOD, RecordKind.OUTLIER, RecordKind.DUPLICATE, RecordKind.OUT_OF_ORDER, RecordKind.MALFORMED]
    assert all(r.kind == max(r.fix_kinds, key=rank.index) for r in records)
    assert {key.decode() for key, _, _ in fixes_of(records)} >= {f"veh-{n:04d}" for n in range(1, 11)}


def test_out_of_order_fixes_are_older_than_the_fix_before_them_and_duplicates_repeat_it():
    last: dict[bytes, dict] = {}
    seen = Counter()
    for key, fix, kind in fixes_of(list(generate_records(SMALL))):
        if kind is RecordKind.MALFORMED:
            continue
        seen[kind] += 1
        if kind is RecordKind.OUT_OF_ORDER:
            assert parse_time_ms(fix["ts"]) < parse_time_ms(last[key]["ts"])
        elif kind is RecordKind.DUPLICATE:
            assert fix == last[key]
        elif key in last:
            assert parse_time_ms(fix["ts"]) > parse_time_ms(last[key]["ts"])
        last[key] = fix
    assert seen[RecordKind.OUT_OF_ORDER] > 0 and seen[RecordKind.DUPLICATE] > 0


def test_shares_of_imperfections_are_close_to_the_configured_ones():
    config = SimulationConfig(vehicles=40, rate_per_s=40, duration_s=500, seed=11, malformed_share=0.02,
                              duplicate_share=0.02, out_of_order_share=0.02, outlier_share=0.02)
    kinds = Counter(kind for record in generate_records(config) for kind in record.fix_kinds)
    observations = round(config.rate_per_s * config.duration_s)
    expected = {RecordKind.MALFORMED: config.malformed_share, RecordKind.DUPLICATE: config.duplicate_share,
                RecordKind.OUT_OF_ORDER: config.out_of_order_share, RecordKind.OUTLIER: config.outlier_share}
    for kind, share in expected.items():
        sigma = math.sqrt(observations * share * (1 - share))
        assert abs(kinds[kind] - observations * share) < 5 * sigma, (kind, kinds[kind])


@pytest.mark.parametrize("batch_size", [1, 6])
def test_every_malformed_fix_is_malformed_and_every_other_keeps_the_contract(batch_size):
    config = SimulationConfig(vehicles=20, rate_per_s=40, duration_s=150, seed=3, malformed_share=0.1,
                              batch_size=batch_size)
    reasons = Counter()
    for record in generate_records(config):
        problems = message_problems(record.key, record.value)
        assert len(problems) == record.fixes, record
        for problem, kind in zip(problems, record.fix_kinds, strict=True):
            assert (problem is not None) == (kind is RecordKind.MALFORMED), (record, problem)
            reasons[problem] += 1
    del reasons[None]
    assert len(reasons) >= 10, reasons  # varied: bad JSON, missing field, out of range, wrong key ...


def test_batches_are_arrays_of_one_device_with_bad_fixes_among_good_ones():
    config = SimulationConfig(vehicles=5, rate_per_s=25, duration_s=120, batch_size=8, seed=2, malformed_share=0.05)
    records = list(generate_records(config))
    arrays = [r for r in records if set(r.fix_kinds) != {RecordKind.MALFORMED}]  # not a broken message on its own
    assert len(arrays) > 0.9 * len(records) and all(r.value.startswith(b"[") for r in arrays)
    assert sum(r.fixes == 8 for r in arrays) > 0.8 * len(arrays)
    for record in arrays:
        items = orjson.loads(record.value)
        assert 1 <= len(items) <= 8 and len(items) == record.fixes
        ids = {item["device_id"] for item, kind in zip(items, record.fix_kinds, strict=True)
               if kind is not RecordKind.MALFORMED}
        assert ids <= {record.key.decode()}
    assert any(RecordKind.MALFORMED in r.fix_kinds and RecordKind.GOOD in r.fix_kinds for r in arrays)


def test_vehicles_drive_at_plausible_speeds_accelerations_and_headings():
    config = SimulationConfig(vehicles=20, rate_per_s=20, duration_s=1200, seed=5, outlier_share=0.0)
    records = list(generate_records(config))
    derived, speed_steps, heading_errors = [], [], []
    for track in good_tracks(records).values():
        for a, b in pairwise(track):
            derived.append(speed_kmh_between(a, b))
            speed_steps.append(abs(b["speed_kmh"] - a["speed_kmh"]))  # 1 s apart
            if a["speed_kmh"] > 20 and b["speed_kmh"] > 20:
                course = bearing_deg(a["lat"], a["lon"], b["lat"], b["lon"])
                heading_errors.append(abs((course - b["heading_deg"] + 180) % 360 - 180))
    assert max(derived) < 150
    assert statistics.quantiles(derived, n=100)[-1] < 75  # 99th percentile: urban, GPS noise included
    reported = [f["speed_kmh"] for _, f, k in fixes_of(records) if k is RecordKind.GOOD]
    assert max(reported) <= 63
    assert 0.1 < sum(s == 0 for s in reported) / len(reported) < 0.6  # lights and deliveries
    assert 20 < statistics.mean(s for s in reported if s > 0) < 45
    assert statistics.quantiles(speed_steps, n=1000)[-1] < 16  # km/h per second: acceleration limits
    assert statistics.median(heading_errors) < 10


def test_vehicles_stop_at_lights_for_seconds_and_deliveries_for_minutes():
    config = SimulationConfig(vehicles=20, rate_per_s=2, duration_s=7200, seed=4, outlier_share=0.0)
    stops_s = []
    for track in good_tracks(list(generate_records(config))).values():
        started = None
        for fix in track:
            ts_ms = parse_time_ms(fix["ts"])
            if fix["speed_kmh"] == 0 and started is None:
                started = ts_ms
            elif fix["speed_kmh"] > 0 and started is not None:
                stops_s.append((ts_ms - started) / 1000)
                started = None
    assert any(s <= 60 for s in stops_s) and any(60 < s <= 620 for s in stops_s)
    assert max(stops_s) <= 600 + 60 + 20  # a delivery, maybe a light right after it, two report intervals


def test_vehicles_drive_on_streets_inside_the_area():
    config = SimulationConfig(vehicles=15, rate_per_s=5, duration_s=1200, seed=6, noise_m=0.0, outlier_share=0.0)
    m_per_deg = EARTH_RADIUS_M * math.pi / 180
    half_m = config.area_km * 500
    on_diagonal = 0
    for _, fix, kind in fixes_of(list(generate_records(config))):
        if kind is RecordKind.MALFORMED:
            continue
        y = (fix["lat"] - config.center_lat) * m_per_deg
        x = (fix["lon"] - config.center_lon) * m_per_deg * math.cos(math.radians(config.center_lat))
        assert abs(x) <= half_m + 1 and abs(y) <= half_m + 1

        def on_line(metres: float) -> bool:
            return abs(metres / config.block_m - round(metres / config.block_m)) * config.block_m < 0.3

        assert on_line(x) or on_line(y) or on_line(x - y) or on_line(x + y), fix
        on_diagonal += not (on_line(x) or on_line(y))
    assert on_diagonal > 0  # the arterials that cut across the grid are used


def test_outliers_are_tens_to_hundreds_of_metres_off_the_track():
    config = SimulationConfig(vehicles=10, rate_per_s=10, duration_s=600, seed=8, outlier_share=0.02,
                              duplicate_share=0, out_of_order_share=0, malformed_share=0)
    by_device: dict[bytes, list[tuple[dict, RecordKind]]] = defaultdict(list)
    for key, fix, kind in fixes_of(list(generate_records(config))):
        by_device[key].append((fix, kind))
    offsets = []
    for track in by_device.values():
        for (before, k0), (fix, kind), (after, k2) in zip(track, track[1:], track[2:], strict=False):
            if kind is RecordKind.OUTLIER and k0 is k2 is RecordKind.GOOD:
                mid_lat, mid_lon = (before["lat"] + after["lat"]) / 2, (before["lon"] + after["lon"]) / 2
                offsets.append(haversine_m(mid_lat, mid_lon, fix["lat"], fix["lon"]))
    assert len(offsets) > 20
    assert min(offsets) > 30 and max(offsets) < 230


def test_nonsense_configs_are_refused():
    for bad in ({"vehicles": 0}, {"rate_per_s": 0}, {"batch_size": 0}, {"batch_size": 1001},
                {"malformed_share": -0.1}, {"malformed_share": 0.6, "duplicate_share": 0.6}, {"area_km": 0.1}):
        with pytest.raises(ValueError):
            SimulationConfig(**bad)


@given(st.integers(min_value=0, max_value=253_402_300_799_999))
def test_timestamps_are_rfc3339_utc_with_milliseconds(ts_ms):
    text = simulate_module._format_ts(ts_ms)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", text)
    assert round(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000) == ts_ms


# --- trace readers on the real traces --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def geolife_sample(shared_data) -> tuple[Path, list]:
    path = shared_data / "geolife" / "geolife_sample.txt.gz"
    return path, list(read_trace(path))


def test_geolife_sample_has_every_row_of_two_users_in_time_order(geolife_sample):
    path, fixes = geolife_sample
    with gzip.open(path, "rt") as handle:
        assert handle.readline().strip() == "lat,lng,datetime,uid"
        rows = sum(1 for _ in handle)
    assert len(fixes) == rows == 217_653
    per_user = Counter(f.device_id for f in fixes)
    assert len(per_user) == 2
    last: dict[str, int] = {}
    for fix in fixes:
        assert fix.ts_ms >= last.get(fix.device_id, 0)
        last[fix.device_id] = fix.ts_ms
    first = fixes[0]
    assert (first.device_id, first.lat, first.lon) == ("001", 39.984094, 116.319236)
    assert first.ts_ms == int(datetime(2008, 10, 23, 5, 53, 5, tzinfo=UTC).timestamp() * 1000)


def test_geolife_plt_files_parse_with_ids_times_and_altitudes(shared_data):
    folder = shared_data / "geolife" / "plt"
    fixes = list(read_trace(folder))
    files = sorted(folder.rglob("*.plt"))
    rows = [(f.parent.name, line) for f in files for line in f.read_text().splitlines()[6:] if line.strip()]
    assert len(fixes) == len(rows) and {f.device_id for f in fixes} == {"000", "001"}
    for fix, (device_id, line) in zip(fixes, rows, strict=True):
        lat, lon, _, altitude_ft, days, _, _ = line.split(",")
        assert fix.device_id == device_id and (fix.lat, fix.lon) == (float(lat), float(lon))
        assert abs(fix.ts_ms - (float(days) - 25569) * 86_400_000) < 1000  # days since 1899-12-30 agree
        assert fix.altitude_m == pytest.approx(float(altitude_ft) * 0.3048, abs=0.001)
    one = next(read_trace(folder / "000" / "20081023025304.plt"))
    assert one.device_id == "000" and one.ts_ms == parse_time_ms("2008-10-23T02:53:04Z")


def test_plt_missing_altitude_and_geolifes_own_folder_layout(tmp_path):
    plt = tmp_path / "Data" / "042" / "Trajectory" / "20090101000000.plt"
    plt.parent.mkdir(parents=True)
    header = ("Geolife trajectory\r\nWGS 84\r\nAltitude is in Feet\r\nReserved 3\r\n"
              "0,2,255,My Track,0,0,2,8421376\r\n0\r\n")
    plt.write_text(header + "39.9,116.3,0,-777,39814.0,2009-01-01,00:00:00\r\n"
                   "39.91,116.31,0,100,39814.0000115741,2009-01-01,00:00:01\r\n")
    fixes = list(read_trace(tmp_path / "Data"))
    assert [(f.device_id, f.altitude_m) for f in fixes] == [("042", None), ("042", pytest.approx(30.48))]
    assert fixes[1].ts_ms - fixes[0].ts_ms == 1000


def test_liverpool_bus_has_every_row(shared_data):
    path = shared_data / "liverpool_bus" / "route14_outbound.csv"
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    fixes = list(read_trace(path))
    assert len(fixes) == len(rows) == 1_533
    # the data README speaks of "one bus", but route 14's file holds the trips of several vehicles
    assert {f.device_id for f in fixes} == {row["vehicle_id"] for row in rows} and len(rows) > 0
    for fix, row in zip(fixes, rows, strict=True):
        assert (fix.lat, fix.lon) == (float(row["latitude"]), float(row["longitude"]))
        assert fix.heading_deg == (float(row["bearing"]) if row["bearing"] else None)
        assert fix.ts_ms == parse_time_ms(row["timestamp"].replace(" ", "T") + "Z")


def test_csv_variants_gzip_bom_epochs_and_column_names(tmp_path):
    plain = tmp_path / "phone-7.csv"
    plain.write_text("\ufefftime,Latitude,LNG,speed_mps\n1780000000,53.4,-2.9,10\n1780000001500,53.41,-2.91,\n"
                     "2026-05-28T20:26:42+01:00,53.42,-2.92,\n")
    fixes = list(read_trace(plain))
    assert [f.device_id for f in fixes] == ["phone-7"] * 3  # no device column: the file name
    assert [f.ts_ms for f in fixes] == [1_780_000_000_000, 1_780_000_001_500, 1_780_000_002_000 - 3_600_000]
    assert fixes[0].speed_kmh == pytest.approx(36.0) and fixes[1].speed_kmh is None
    packed = tmp_path / "fleet.csv.gz"
    with gzip.open(packed, "wt") as handle:
        handle.write("vehicle,timestamp,longitude,latitude,heading,altitude_m\n"
                     "v1,2026-05-28 20:26:40,-2.9,53.4,90,12\n")
    (fix,) = read_trace(packed)
    assert (fix.device_id, fix.lat, fix.lon, fix.heading_deg, fix.altitude_m) == ("v1", 53.4, -2.9, 90.0, 12.0)


def test_gpx_track_points(tmp_path):
    gpx = tmp_path / "ride.gpx"
    gpx.write_text('<?xml version="1.0"?><gpx version="1.1" xmlns="http://www.topografix.com/GPX/1/1"><trk><trkseg>'
                   '<trkpt lat="53.4" lon="-2.98"><ele>12.5</ele><time>2026-05-28T20:26:40Z</time></trkpt>'
                   '<trkpt lat="53.401" lon="-2.981"><time>2026-05-28T20:26:45.5Z</time></trkpt>'
                   "</trkseg></trk></gpx>")
    fixes = list(read_trace(gpx))
    assert [(f.device_id, f.ts_ms, f.altitude_m) for f in fixes] == [
        ("ride", 1_780_000_000_000, 12.5), ("ride", 1_780_000_005_500, None)]


def test_unrecognised_traces_are_refused_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match=r"bad\.csv:1: header"):
        list(read_trace(bad))
    bad.write_text("device_id,ts,lat,lon\nd1,2026-01-01T00:00:00Z,53,1\nd1,2026-01-01T00:00:01Z,north,1\n")
    with pytest.raises(TraceFormatError, match=r"bad\.csv:3: .*north"):
        list(read_trace(bad))
    bad.write_text("")
    with pytest.raises(TraceFormatError, match=r"bad\.csv:1: empty"):
        list(read_trace(bad))
    plt = tmp_path / "7" / "x.plt"
    plt.parent.mkdir()
    plt.write_text("Geolife trajectory\nWGS 84\nAltitude is in Feet\nReserved 3\n0,2,255,My Track,0,0,2,8421376\n0\n"
                   "39.9,116.3,0,100,39814.0,2009-01-01\n")
    with pytest.raises(TraceFormatError, match=r"x\.plt:7: expected 7"):
        list(read_trace(plt))
    plt.write_text("something else\n")
    with pytest.raises(TraceFormatError, match=r"x\.plt:1: not a GeoLife"):
        list(read_trace(plt))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TraceFormatError, match=r"no .* trace files"):
        list(read_trace(empty))


# --- replay records --------------------------------------------------------------------------------------------

def test_replay_records_keep_each_devices_file_order_and_the_contract(shared_data):
    path = shared_data / "liverpool_bus" / "route14_outbound.csv"
    records = trace_records(path, batch_size=5, device_prefix="bus-")
    assert all(a.ts_ms <= b.ts_ms for a, b in pairwise(records))
    replayed: dict[str, list[int]] = defaultdict(list)
    for record in records:
        assert set(message_problems(record.key, record.value)) == {None}
        for item in orjson.loads(record.value):
            replayed[item["device_id"]].append(parse_time_ms(item["ts"]))
    in_file: dict[str, list[int]] = defaultdict(list)
    for fix in read_trace(path):
        in_file["bus-" + fix.device_id].append(fix.ts_ms)
    assert replayed == in_file


def test_replay_sends_a_devices_buffer_once_it_is_old(tmp_path):
    trace = tmp_path / "two.csv"
    trace.write_text("device_id,ts,lat,lon\n" + "".join(
        f"{device},{1_780_000_000 + t},53.4,-2.98\n" for t in range(0, 600, 10) for device in ("a", "b")
        if device == "a" or t < 30))
    records = trace_records(trace, batch_size=100, max_batch_age_ms=60_000)
    quiet = [r for r in records if r.key == b"b"]
    assert [r.fixes for r in quiet] == [3] and quiet[0].ts_ms <= 1_780_000_070_000  # not held until the end
    assert all(r.fixes <= 7 for r in records) and sum(r.fixes for r in records) == 63


# --- partitioning ------------------------------------------------------------------------------------------------

def test_partitions_agree_with_aiokafkas_default_partitioner():
    rng = random.Random(1)
    keys = [f"veh-{n:04d}".encode() for n in range(2000)]
    keys += [bytes(rng.randrange(256) for _ in range(rng.randrange(0, 40))) for _ in range(2000)]
    partitioner = DefaultPartitioner()
    for count in (1, 2, 3, 4, 6, 12, 64, 100):
        partitions = list(range(count))
        assert all(partition_for_key(key, count) == partitioner(key, partitions, partitions) for key in keys)


def test_murmur2_is_kafkas():
    # the Java client's own test vectors (org.apache.kafka.common.utils.UtilsTest#testMurmur2)
    vectors = {b"21": -973932308, b"foobar": -790332482, b"a-little-bit-long-string": -985981536,
               b"a-little-bit-longer-string": -1486304829,
               b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971, b"abc": 479470107}
    for key, java_int in vectors.items():
        assert murmur2(key) & 0xFFFFFFFF == java_int & 0xFFFFFFFF


# --- publishing against a fake producer (the broker itself is the integration tests' business) ------------------

class FakeBatch:
    def __init__(self, capacity: int) -> None:
        self.records: list[tuple[bytes | None, bytes | None]] = []
        self.capacity = capacity

    def append(self, *, key, value, timestamp):
        if len(self.records) >= self.capacity:
            return None
        self.records.append((key, value))
        return object()


class FakeProducer:
    """Records which batches went to which partition; every send is acknowledged at once (or fails)."""

    def __init__(self, partitions: int = 4, capacity: int = 50, fail: bool = False, **options: Any) -> None:
        self.partition_count, self.capacity, self.fail, self.options = partitions, capacity, fail, options
        self.sent: dict[int, list[list[tuple[bytes | None, bytes | None]]]] = defaultdict(list)
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.partition_count))

    def create_batch(self) -> FakeBatch:
        return FakeBatch(self.capacity)

    async def send_batch(self, batch: FakeBatch, topic: str, *, partition: int) -> asyncio.Future:
        self.sent[partition].append(batch.records)
        future = asyncio.get_running_loop().create_future()
        if self.fail:
            future.set_exception(RuntimeError("broker said no"))
        else:
            future.set_result(None)
        return future


@pytest.fixture
def fake_producer(monkeypatch) -> list[FakeProducer]:
    made: list[FakeProducer] = []

    def factory(**options: Any) -> FakeProducer:
        made.append(FakeProducer(**options))
        return made[-1]

    monkeypatch.setattr(simulate_module, "AIOKafkaProducer", factory)
    return made


@pytest.mark.parametrize("tail_single_record", [True, False])
async def test_publish_sends_per_partition_in_order_ending_with_a_one_record_batch(fake_producer, tail_single_record):
    records = list(generate_records(SimulationConfig(vehicles=30, rate_per_s=300, duration_s=10, seed=1)))
    stats = await publish("localhost:9", "fleet.positions", records, tail_single_record=tail_single_record,
                          linger_s=0.001, max_chunk_records=700)
    producer = fake_producer[0]
    assert producer.started and producer.stopped and producer.options["bootstrap_servers"] == ["localhost:9"]
    by_key: dict[bytes | None, list[bytes | None]] = defaultdict(list)
    for partition, batches in producer.sent.items():
        for batch in batches:
            for key, value in batch:
                assert partition == partition_for_key(key, 4)
                by_key[key].append(value)
        assert (len(batches[-1]) == 1) if tail_single_record else len(batches[-1]) > 1
    expected: dict[bytes | None, list[bytes | None]] = defaultdict(list)
    for record in records:
        expected[record.key].append(record.value)
    assert by_key == expected  # everything, once, in order per key
    assert (stats.records, stats.fixes, stats.bytes) == (len(records), sum(r.fixes for r in records),
                                                         sum(len(r.value) for r in records))
    assert sum(stats.kinds.values()) == stats.fixes and sum(stats.partitions.values()) == stats.records


async def test_publish_paces_to_the_rate_and_reports_progress(fake_producer):
    progress: list[int] = []
    started = time.monotonic()
    stats = await publish("localhost:9", "t", ((b"k%d" % i, b"{}") for i in range(300)), rate_per_s=1000,
                          status_cb=lambda s: progress.append(s.records))
    elapsed_s = time.monotonic() - started
    assert 0.25 < elapsed_s < 2.0
    assert stats.records == stats.fixes == 300 and progress[-1] == 300 and len(progress) > 3
    assert isinstance(stats, PublishStats) and "300 records" in str(stats)


async def test_publish_raises_what_the_source_or_the_broker_raised(fake_producer, monkeypatch):
    def broken():
        yield (b"k", b"{}")
        raise ValueError("trace line 2 is bad")

    with pytest.raises(ValueError, match="line 2"):
        await publish("localhost:9", "t", broken())
    monkeypatch.setattr(simulate_module, "AIOKafkaProducer", lambda **options: FakeProducer(fail=True))
    with pytest.raises(RuntimeError, match="broker said no"):
        await publish("localhost:9", "t", [(b"k", b"{}")] * 10)


async def test_replay_paces_in_event_time(fake_producer, tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("device_id,ts,lat,lon\n" + "".join(f"d,{1_780_000_000 + s},53.4,-2.98\n" for s in range(0, 31)))
    started = time.monotonic()
    stats = await simulate_module.replay("localhost:9", trace, speed=100.0)  # 30 s of trace in 0.3 s
    assert 0.25 < time.monotonic() - started < 2.0 and stats.fixes == 31
    started = time.monotonic()
    await simulate_module.replay("localhost:9", trace, speed=0)
    assert time.monotonic() - started < 0.2
