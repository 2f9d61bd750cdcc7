"""Codecs: every byte string gives models or reasons, never an exception; the hand-written checks accept exactly
what the schema files (checked by the reference validator, jsonschema) accept, plus the rules a schema cannot say."""

from __future__ import annotations

import pickle
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from referencing import Registry, Resource

from fleetstream import codecs
from fleetstream.codecs import (
    CodecLimits,
    DecodeError,
    deadletter_record,
    decode_positions,
    decode_reader,
    decode_rfid,
    decode_telemetry,
    dumps,
    format_ts,
    parse_ts,
    position_to_dict,
    validate_output,
)
from fleetstream.domain.models import Position, RfidRead, Telemetry

SCHEMAS = Path(__file__).resolve().parents[2] / "fleetstream" / "schemas"
NOW_MS = 1_795_600_800_000  # 2026-11-25T10:00:00Z
SKEW_MS = CodecLimits().max_future_skew_ms
SLOW = settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)

SCHEMA_DOCS = {path.stem: orjson.loads(path.read_bytes()) for path in sorted(SCHEMAS.glob("*.json"))}
REGISTRY = Registry().with_resources((doc["$id"], Resource.from_contents(doc)) for doc in SCHEMA_DOCS.values())
REFERENCE = {name: jsonschema.Draft202012Validator(doc, registry=REGISTRY) for name, doc in SCHEMA_DOCS.items()}


def one(value: object, key: bytes | None = b"veh-1", **limits: int) -> Position | DecodeError:
    [result] = decode_positions(key, orjson.dumps(value), now_ms=NOW_MS, limits=CodecLimits(**limits))
    return result


GOOD = {"device_id": "veh-1", "ts": "2026-11-25T09:59:00.000Z", "lat": 53.4, "lon": -2.98}


# --- positions: each reason -----------------------------------------------------------------------------------

def test_a_valid_position_decodes():
    fix = one({**GOOD, "speed_kmh": 40, "heading_deg": 90.5, "accuracy_m": 5, "altitude_m": None,
               "attributes": {"ignition": True}})
    assert fix == Position("veh-1", NOW_MS - 60_000, 53.4, -2.98, 40.0, 90.5, 5.0, None, {"ignition": True})
    assert type(fix.speed_kmh) is float  # ints in JSON become floats in the domain


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (b"{not json", "malformed_json"),
        (b"NaN", "malformed_json"),
        (b'{"device_id": "veh-1", "ts": 1, "lat": Infinity, "lon": 0}', "malformed_json"),
        (b'{"device_id": "veh-1", "ts": 1, "lat": 1e400, "lon": 0}', "not_finite"),
        (b"\xef\xbb\xbf{}", "malformed_json"),
        (b"[" * 2000, "malformed_json"),
        (b"\xff\xfe", "malformed_json"),
        (b"", "malformed_json"),
        (b"42", "not_an_object"),
        (b'"veh-1"', "not_an_object"),
        (b"null", "not_an_object"),
        (b"[]", "empty_batch"),
        (None, "null_value"),
    ],
)
def test_messages_that_cannot_be_split_give_one_error(value, reason):
    assert reason in codecs.REASONS
    [error] = decode_positions(b"veh-1", value, now_ms=NOW_MS)
    assert isinstance(error, DecodeError) and error.reason == reason, error


@pytest.mark.parametrize(
    ("change", "key", "reason", "named"),
    [
        ({"lat": 90.5}, b"veh-1", "lat_out_of_range", "lat"),
        ({"lat": -90.0001}, b"veh-1", "lat_out_of_range", "lat"),
        ({"lon": -180.01}, b"veh-1", "lon_out_of_range", "lon"),
        ({"lon": 181}, b"veh-1", "lon_out_of_range", "lon"),
        ({"lat": "53.4"}, b"veh-1", "bad_type", "lat"),
        ({"lat": True}, b"veh-1", "bad_type", "lat"),
        ({"lon": [1]}, b"veh-1", "bad_type", "lon"),
        ({"lon": None}, b"veh-1", "missing_field", "lon"),
        ({"ts": None}, b"veh-1", "missing_field", "ts"),
        ({"ts": "yesterday"}, b"veh-1", "bad_timestamp", "ts"),
        ({"ts": "2026-11-25T09:59:00.000"}, b"veh-1", "bad_timestamp", "time zone"),
        ({"ts": True}, b"veh-1", "bad_timestamp", "ts"),
        ({"ts": -5}, b"veh-1", "bad_timestamp", "1970"),
        ({"ts": 1.5}, b"veh-1", "bad_timestamp", "ts"),
        ({"ts": "2026-02-30T10:00:00Z"}, b"veh-1", "bad_timestamp", "calendar"),
        ({"ts": NOW_MS + SKEW_MS + 1}, b"veh-1", "future_timestamp", "future"),
        ({"ts": "2026-11-25T10:05:00.001Z"}, b"veh-1", "future_timestamp", "ts"),
        ({"device_id": ""}, b"", "bad_device_id", "device_id"),
        ({"device_id": "x" * 129}, b"x" * 129, "bad_device_id", "128"),
        ({"device_id": 7}, b"7", "bad_device_id", "device_id"),
        ({"device_id": None}, b"veh-1", "missing_field", "device_id"),
        ({}, b"veh-2", "key_mismatch", "veh-2"),
        ({}, b"\xffveh-1", "key_mismatch", "device_id"),
        ({}, None, "key_missing", "device_id"),
        ({"speed_kmh": -1}, b"veh-1", "out_of_range", "speed_kmh"),
        ({"speed_kmh": 2000.5}, b"veh-1", "out_of_range", "speed_kmh"),
        ({"heading_deg": 361}, b"veh-1", "out_of_range", "heading_deg"),
        ({"altitude_m": -1001}, b"veh-1", "out_of_range", "altitude_m"),
        ({"accuracy_m": -0.1}, b"veh-1", "out_of_range", "accuracy_m"),
        ({"accuracy_m": "good"}, b"veh-1", "bad_type", "accuracy_m"),
        ({"attributes": [1]}, b"veh-1", "bad_type", "attributes"),
        ({"colour": "red"}, b"veh-1", "unknown_field", "colour"),
    ],
)
def test_each_problem_has_its_reason_and_names_the_(change, key, reason, named):
    result = one({**GOOD, **change}, key=key)
    assert isinstance(result, DecodeError), result
    assert (result.reason, named in result.detail) == (reason, True), result


@pytest.mark.parametrize("name", ["device_id", "ts", "lat", "lon"])
def test_missing_required_fields(name):
    result = one({k: v for k, v in GOOD.items() if k != name})
    assert isinstance(result, DecodeError)
    assert result.reason == "missing_field" and name in result.detail


def test_limits_are_configurable():
    [error] = decode_positions(b"veh-1", orjson.dumps(GOOD) + b" " * 100, now_ms=NOW_MS,
                               limits=CodecLimits(max_message_bytes=64))
    assert error.reason == "too_large"
    [error] = decode_positions(b"veh-1", orjson.dumps([GOOD] * 3), now_ms=NOW_MS,
                               limits=CodecLimits(max_batch_items=2))
    assert error.reason == "batch_too_large"
    assert len(decode_positions(b"veh-1", orjson.dumps([GOOD] * 1000), now_ms=NOW_MS)) == 1000
    assert one({**GOOD, "device_id": "abcdef"}, key=b"abcdef", max_id_len=5).reason == "bad_device_id"
    assert isinstance(one({**GOOD, "ts": NOW_MS + 10_000}, max_future_skew_ms=20_000), Position)


def test_an_array_gives_one_result_per_item_in_order():
    items = [GOOD, {**GOOD, "lat": 99}, 5, {**GOOD, "device_id": "other"}, {**GOOD, "ts": GOOD["ts"][:-2] + "1Z"},
             None, {**GOOD, "speed_kmh": "fast"}]
    results = decode_positions(b"veh-1", orjson.dumps(items), now_ms=NOW_MS)
    assert [r.reason if isinstance(r, DecodeError) else "ok" for r in results] == [
        "ok", "lat_out_of_range", "not_an_object", "key_mismatch", "ok", "not_an_object", "bad_type"]
    assert results[4].ts_ms == NOW_MS - 60_000 + 1
    assert results[1].item == items[1]  # the dead letter carries the offending item, not the whole array


# --- timestamps -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-25T10:00:00Z", NOW_MS),
        ("2026-11-25T10:00:00.5Z", NOW_MS + 500),
        ("2026-11-25T10:00:00.05Z", NOW_MS + 50),
        ("2026-11-25T10:00:00.123Z", NOW_MS + 123),
        ("2026-11-25T10:00:00.123999Z", NOW_MS + 123),  # truncated, not rounded
        ("2026-11-25T10:00:00.123456789Z", NOW_MS + 123),
        ("2026-11-25T11:00:00.123+01:00", NOW_MS + 123),
        ("2026-11-25T04:30:00-05:30", NOW_MS),
        ("2026-11-25T10:00:00-00:00", NOW_MS),
        ("2026-11-26T09:59:00+23:59", NOW_MS),
        ("2026-11-25t10:00:00z", NOW_MS),
        ("2026-11-25 10:00:00.000Z", NOW_MS),
        ("2026-11-25T09:59:60Z", NOW_MS),  # a leap second, as RFC 3339 allows
        ("2024-02-29T00:00:00Z", 1_709_164_800_000),
        ("1970-01-01T00:00:00Z", 0),
        ("1970-01-01T01:00:00+01:00", 0),
        (0, 0),
        (NOW_MS, NOW_MS),
        (float(NOW_MS), NOW_MS),  # JSON Schema counts 1.0 as an integer
    ],
)
def test_parse_ts(text, expected):
    assert parse_ts(text) == expected
    assert parse_ts(text) == expected  # again: now from the caches


@pytest.mark.parametrize(
    "text",
    ["2026-11-25T10:00:00", "2026-11-25T10:00:00.123", "2026-11-25", "yesterday", "", "2026-11-25T10:00:00+0100",
     "2026-11-25T10:00:00+01", "2026-11-25T10:00:00,123Z", "2026-W48-3T10:00:00Z", "2026-11-25T10:00:00.Z",
     "2026-11-25T24:00:00Z", "2026-11-25T10:60:00Z", "2026-11-25T10:00:61Z", "2026-13-01T00:00:00Z",
     "2025-02-29T00:00:00Z", "2026-11-25T10:00:00+24:00", "2026-11-25T10:00:00+01:60", "1969-12-31T23:59:59Z",
     "1970-01-01T00:30:00+01:00", "2026-11-25T10:00:00Z\n", " 2026-11-25T10:00:00Z", "2026-11-25T10:00:00ZZ",
     "２０２６-11-25T10:00:00Z", "2026-11-25T10:00:00.١٢٣Z", "2026-11-25x10:00:00Z", True, False, None, -1, 1.5,
     [], {}, float("inf"), float("nan")],
)
def test_parse_ts_rejects(text):
    for _ in range(2):  # the second time with the caches warm
        with pytest.raises(DecodeError) as raised:
            parse_ts(text)
        assert raised.value.reason == "bad_timestamp"
    parse_ts("2026-11-25T10:00:00.000Z"), parse_ts("2026-11-25T10:00:00+01:00")  # warm caches for the next case


def test_cached_parts_never_mix_zones():
    """The seconds cache holds a date-time read as UTC; the zone must still apply to later strings."""
    assert parse_ts("2026-11-25T10:00:00.250Z") == NOW_MS + 250
    assert parse_ts("2026-11-25T10:00:00.250+01:00") == NOW_MS + 250 - 3_600_000
    assert parse_ts("2026-11-25T10:00:00.250-02:00") == NOW_MS + 250 + 7_200_000
    assert parse_ts("2026-11-25T10:00:00.250Z") == NOW_MS + 250


def _reference_ts_ms(text: str) -> int | None:
    """Independent of the codec: datetime on a normalised copy of a string the schema pattern accepted."""
    match = re.fullmatch(r"(.{10}).(.{8})(?:\.([0-9]+))?(.*)", text)
    assert match
    day, clock, fraction, zone = match.groups()
    leap = clock.endswith(":60")
    zone = "+00:00" if zone in ("Z", "z") else zone
    if int(zone[1:3]) > 23 or int(zone[4:6]) > 59:  # RFC 3339 offsets; datetime would take +00:60
        return None
    try:
        parsed = datetime.fromisoformat(f"{day}T{clock[:6]}{'59' if leap else clock[6:]}{zone}")
    except ValueError:
        return None
    parsed += timedelta(seconds=1 if leap else 0, milliseconds=int((fraction or "0")[:3].ljust(3, "0")))
    ms = round((parsed - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds() * 1000)
    return ms if ms >= 0 else None


def ts_texts() -> st.SearchStrategy[str]:
    """Mostly well-formed RFC 3339 strings, some with impossible dates, times or zones."""
    two = st.integers(0, 99).map(lambda i: f"{i:02d}")
    return st.builds(
        lambda y, mo, d, sep, h, mi, s, frac, zone: f"{y:04d}-{mo}-{d}{sep}{h}:{mi}:{s}{frac}{zone}",
        st.integers(1960, 2200) | st.integers(0, 9999),
        st.integers(1, 12).map(lambda i: f"{i:02d}") | two,
        st.integers(1, 28).map(lambda i: f"{i:02d}") | two,
        st.sampled_from("Tt Tx"),
        st.integers(0, 23).map(lambda i: f"{i:02d}") | two,
        st.integers(0, 59).map(lambda i: f"{i:02d}") | two,
        st.integers(0, 60).map(lambda i: f"{i:02d}") | two,
        st.just("") | st.text("0123456789", min_size=0, max_size=10).map(lambda f: "." + f),
        st.sampled_from(["Z", "z", "", "+0100", "+01"]) | st.builds(
            lambda sign, h, m: f"{sign}{h}:{m}", st.sampled_from("+-"), st.integers(0, 25).map(lambda i: f"{i:02d}"),
            st.integers(0, 61).map(lambda i: f"{i:02d}")),
    )


@settings(max_examples=600)
@given(ts_texts())
def test_parse_ts_agrees_with_the_schema_pattern_and_datetime(text):
    schema_ok = REFERENCE["position"].is_valid({**GOOD, "ts": text})
    expected = _reference_ts_ms(text) if schema_ok else None
    for _ in range(2):  # cold, then from the caches
        try:
            got = parse_ts(text)
        except DecodeError as exc:
            assert exc.reason == "bad_timestamp"
            got = None
        assert got == expected, text


@given(st.integers(min_value=0, max_value=253_402_300_799_999))
def test_format_ts_is_exact_and_round_trips(ts_ms):
    text = format_ts(ts_ms)
    reference = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ts_ms)
    assert text == reference.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts_ms % 1000:03d}Z"
    assert re.fullmatch(SCHEMA_DOCS["alert"]["properties"]["ts"]["pattern"], text)
    assert parse_ts(text) == ts_ms


def test_format_ts_examples():
    assert format_ts(NOW_MS + 7) == "2026-11-25T10:00:00.007Z"
    assert format_ts(NOW_MS + 999) == "2026-11-25T10:00:00.999Z"
    assert format_ts(0) == "1970-01-01T00:00:00.000Z"


# --- round trips and "never raises" ---------------------------------------------------------------------------

finite = {"allow_nan": False, "allow_infinity": False}
positions = st.builds(
    Position,
    device_id=st.text(st.characters(codec="utf-8"), min_size=1, max_size=128),
    ts_ms=st.integers(0, NOW_MS + SKEW_MS),
    lat=st.floats(-90, 90),
    lon=st.floats(-180, 180),
    speed_kmh=st.none() | st.floats(0, 2000),
    heading_deg=st.none() | st.floats(0, 360),
    accuracy_m=st.none() | st.floats(0, 1e300),
    altitude_m=st.none() | st.floats(-1000, 100_000),
    attributes=st.none() | st.dictionaries(st.text(max_size=5), st.integers(-1000, 1000) | st.text(max_size=5),
                                           min_size=1, max_size=3),
)


@given(positions, st.booleans())
def test_valid_positions_round_trip_exactly(fix, as_array):
    doc = position_to_dict(fix)
    REFERENCE["position"].validate(doc)
    value = orjson.dumps([doc, doc] if as_array else doc)
    results = decode_positions(fix.device_id.encode(), value, now_ms=NOW_MS)
    assert results == ([fix, fix] if as_array else [fix])


MODELS = (Position, RfidRead, Telemetry, DecodeError)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.none() | st.binary(max_size=20))
def test_any_bytes_give_results_never_an_exception(value, key):
    for decode in (decode_positions, decode_rfid, decode_telemetry):
        results = decode(key, value, now_ms=NOW_MS)
        assert results and all(isinstance(r, MODELS) for r in results)
        assert all(r.reason in codecs.REASONS for r in results if isinstance(r, DecodeError))
    assert isinstance(decode_reader(key, value), dict | DecodeError)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(**finite) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=12,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_any_json_gives_one_result_per_item(doc):
    expected = len(doc) if isinstance(doc, list) and doc else 1
    for decode in (decode_positions, decode_rfid, decode_telemetry):
        results = decode(b"veh-1", orjson.dumps(doc), now_ms=NOW_MS)
        assert len(results) == expected and all(isinstance(r, MODELS) for r in results)
    assert isinstance(decode_reader(b"r1", orjson.dumps(doc)), dict | DecodeError)


# --- agreement with the reference validator -------------------------------------------------------------------

def numbers(*edges: float) -> st.SearchStrategy[Any]:
    near = [e + d for e in edges for d in (-1e-9, 0, 1e-9)] + [int(e) for e in edges if e == int(e)]
    return st.sampled_from(near) | st.floats(**finite) | st.floats(-300, 300) | st.integers(-(2**63), 2**64 - 1)


def anything_else() -> st.SearchStrategy[Any]:
    return (st.none() | st.booleans() | st.text(max_size=4) | st.lists(st.integers(-9, 9), max_size=2)
            | st.just({"a": 1}))


ids = (st.sampled_from(["veh-1", "tag-1", "r1", "", "x" * 128, "x" * 129]) | st.text(max_size=3)
       | st.integers(0, 9) | st.none())
times = (ts_texts() | st.sampled_from(["2026-11-25T09:00:00Z", "2026-11-25T10:04:59.999Z", "2026-11-25T10:05:00.001Z"])
         | st.integers(-5, NOW_MS + 2 * SKEW_MS) | st.sampled_from([float(NOW_MS), NOW_MS + 0.5, True, None]))
good_times = st.sampled_from(["2026-11-25T09:00:00Z", "2026-11-25T10:00:00.123+01:00"]) | st.integers(0, NOW_MS)
OMIT = object()


def documents(fields: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]]) -> st.SearchStrategy[dict]:
    """A valid document (by construction, before the key and time rules) with up to two changes: a field set to
    anything or left out, or an unknown field added. So valid and invalid documents both come up often, and an
    invalid one usually has a single problem, the interesting case for the reasons."""
    valid = st.fixed_dictionaries({name: good for name, (good, _) in fields.items()})
    change = st.sampled_from([*fields, "extra"]).flatmap(
        lambda name: st.tuples(st.just(name), fields[name][1] | st.just(OMIT) if name in fields else st.just(1)))

    def apply(doc: dict[str, Any], changes: list[tuple[str, Any]]) -> dict[str, Any]:
        doc = doc | dict(changes)
        return {name: value for name, value in doc.items() if value is not OMIT}

    return st.builds(apply, valid, st.lists(change, max_size=2))


def optional(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return good | st.none() | st.just(OMIT)


def num(low: float, high: float) -> st.SearchStrategy[Any]:
    return st.floats(low, high) | st.integers(int(max(low, -1e18)), int(min(high, 1e18)))


position_docs = documents({
    "device_id": (st.just("veh-1"), ids), "ts": (good_times, times),
    "lat": (num(-90, 90), numbers(-90, 90) | anything_else()),
    "lon": (num(-180, 180), numbers(-180, 180) | anything_else()),
    "speed_kmh": (optional(num(0, 2000)), numbers(0, 2000) | anything_else()),
    "heading_deg": (optional(num(0, 360)), numbers(0, 360) | anything_else()),
    "accuracy_m": (optional(num(0, 1e300)), numbers(0) | anything_else()),
    "altitude_m": (optional(num(-1000, 100_000)), numbers(-1000, 100_000) | anything_else()),
    "attributes": (optional(st.dictionaries(st.text(max_size=3), json_values, max_size=2)), anything_else()),
})
rfid_docs = documents({
    "tag_id": (st.just("tag-1"), ids), "reader_id": (st.text(min_size=1, max_size=5), ids),
    "ts": (good_times, times),
    "rssi_dbm": (optional(num(-200, 50)), numbers(-200, 50) | anything_else()),
    "antenna": (optional(st.integers(0, 8) | st.just(2.0)), numbers(0, 3) | anything_else()),
})
metric_names = st.text(min_size=1, max_size=8) | st.just("m" * 64)
telemetry_docs = documents({
    "device_id": (st.just("veh-1"), ids), "ts": (good_times, times),
    "metrics": (st.dictionaries(metric_names, num(-1e9, 1e9), min_size=1, max_size=3),
                anything_else() | st.dictionaries(metric_names | st.just("m" * 65) | st.just(""),
                                                  numbers(0) | anything_else(), max_size=3)),
})
reader_docs = documents({
    "reader_id": (st.just("r1"), ids),
    "lat": (num(-90, 90), numbers(-90, 90) | anything_else()),
    "lon": (num(-180, 180), numbers(-180, 180) | anything_else()),
    "zone_id": (optional(st.text(max_size=3)), st.integers(0, 9) | st.booleans()),
    "vehicle_id": (optional(st.text(max_size=3)), st.integers(0, 9)),
    "name": (optional(st.text(max_size=3)), st.booleans()),
})


def expected_valid(schema: str, doc: dict[str, Any], key_field: str, key: str) -> bool:
    """The reference: the JSON Schema, plus the rules a schema cannot state."""
    doc = orjson.loads(orjson.dumps(doc))
    if not REFERENCE[schema].is_valid(doc) or doc.get(key_field) != key:
        return False
    if "ts" not in doc:  # readers have no time
        return True
    ts = doc["ts"]
    if isinstance(ts, str):  # calendar-valid, not before 1970; Python's `$` also matches before a final newline
        ts = None if ts.endswith("\n") else _reference_ts_ms(ts)
    return ts is not None and ts <= NOW_MS + SKEW_MS


def check_agreement(decode: Any, schema: str, key_field: str, key: str, doc: dict[str, Any]) -> Any:
    [result] = decode(key.encode(), orjson.dumps(doc), now_ms=NOW_MS)
    assert isinstance(result, DecodeError) != expected_valid(schema, doc, key_field, key), (doc, result)
    assert not isinstance(result, DecodeError) or result.reason in codecs.REASONS, result
    return result


@SLOW
@given(position_docs)
def test_position_checks_agree_with_the_schema(doc):
    result = check_agreement(decode_positions, "position", "device_id", "veh-1", doc)
    if isinstance(result, Position):
        assert (result.lat, result.lon, result.speed_kmh) == (doc["lat"], doc["lon"], doc.get("speed_kmh"))


@SLOW
@given(rfid_docs)
def test_rfid_checks_agree_with_the_schema(doc):
    check_agreement(decode_rfid, "rfid_read", "tag_id", "tag-1", doc)


@SLOW
@given(telemetry_docs)
def test_telemetry_checks_agree_with_the_schema(doc):
    check_agreement(decode_telemetry, "telemetry", "device_id", "veh-1", doc)


@SLOW
@given(reader_docs)
def test_reader_checks_agree_with_the_schema(doc):
    result = decode_reader(b"r1", orjson.dumps(doc))
    assert isinstance(result, DecodeError) != expected_valid("reader", doc, "reader_id", "r1"), (doc, result)
    assert not isinstance(result, DecodeError) or result.reason in codecs.REASONS, result


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(position_docs | json_values, min_size=1, max_size=5))
def test_arrays_of_near_valid_fixes_give_one_result_each_in_order(docs):
    results = decode_positions(b"veh-1", orjson.dumps(docs), now_ms=NOW_MS)
    assert len(results) == len(docs)
    for doc, result in zip(docs, results, strict=True):
        valid = isinstance(doc, dict) and expected_valid("position", doc, "device_id", "veh-1")
        assert isinstance(result, Position) == valid, (doc, result)


def test_the_checks_refuse_a_schema_keyword_they_do_not_implement(monkeypatch):
    schema = orjson.loads(orjson.dumps(SCHEMA_DOCS["position"]))
    schema["properties"]["device_id"]["pattern"] = "^veh-"
    monkeypatch.setattr(codecs, "load_schema", lambda name: schema)
    with pytest.raises(RuntimeError, match="pattern"):
        codecs._compile("position", "device_id")


def test_the_bounds_come_from_the_schema_files():
    props = SCHEMA_DOCS["position"]["properties"]
    bounds = (codecs._SPEED_LO, codecs._SPEED_HI, codecs._LAT_LO, codecs._LAT_HI)
    assert bounds == (props["speed_kmh"]["minimum"], props["speed_kmh"]["maximum"], -90, 90)
    assert codecs.POSITION.allowed == set(props)


# --- rfid, telemetry, readers ---------------------------------------------------------------------------------

def test_rfid():
    read = {"tag_id": "tag-1", "reader_id": "r1", "ts": NOW_MS, "rssi_dbm": -60, "antenna": 2.0}
    assert decode_rfid(b"tag-1", orjson.dumps(read), now_ms=NOW_MS) == [RfidRead("tag-1", "r1", NOW_MS, -60.0, 2)]
    for change, reason, named in [({"reader_id": None}, "missing_field", "reader_id"),
                                  ({"reader_id": ""}, "bad_reader_id", "reader_id"),
                                  ({"tag_id": "tag-2"}, "key_mismatch", "tag-2"),
                                  ({"antenna": -1}, "out_of_range", "antenna"),
                                  ({"antenna": 1.5}, "bad_type", "antenna"),
                                  ({"rssi_dbm": 60}, "out_of_range", "rssi_dbm"),
                                  ({"power": 1}, "unknown_field", "power")]:
        [bad] = decode_rfid(b"tag-1", orjson.dumps({**read, **change}), now_ms=NOW_MS)
        assert (bad.reason, named in bad.detail) == (reason, True), bad


def test_telemetry():
    doc = {"device_id": "d", "ts": "2026-11-25T10:00:00Z", "metrics": {"fuel_pct": 40, "temperature_c": -3.5}}
    [t] = decode_telemetry(b"d", orjson.dumps([doc]), now_ms=NOW_MS)
    assert t == Telemetry("d", NOW_MS, {"fuel_pct": 40.0, "temperature_c": -3.5})
    for metrics, reason, named in [({"fuel_pct": "x"}, "bad_type", "metrics.fuel_pct"),
                                   ({"fuel_pct": True}, "bad_type", "metrics.fuel_pct"),
                                   ({}, "bad_type", "metrics"),
                                   ({"m" * 65: 1}, "bad_type", "mmmm"),
                                   ([1], "bad_type", "metrics"),
                                   (None, "missing_field", "metrics")]:
        [bad] = decode_telemetry(b"d", orjson.dumps({**doc, "metrics": metrics}), now_ms=NOW_MS)
        assert (bad.reason, named in bad.detail) == (reason, True), bad


def test_readers():
    doc = {"reader_id": "r1", "lat": 53, "lon": -2.9, "zone_id": "dock-3"}
    assert decode_reader(b"r1", orjson.dumps(doc)) == {
        "reader_id": "r1", "lat": 53.0, "lon": -2.9, "zone_id": "dock-3", "vehicle_id": None, "name": None,
        "role": None}
    assert decode_reader(b"r1", orjson.dumps({**doc, "role": "gate"}))["role"] == "gate"
    assert decode_reader(b"r1", None).reason == "null_value"  # a tombstone: the caller deletes before decoding
    assert decode_reader(b"r2", orjson.dumps(doc)).reason == "key_mismatch"
    assert decode_reader(b"r1", orjson.dumps([doc])).reason == "not_an_object"
    assert decode_reader(b"r1", orjson.dumps({**doc, "lat": 91})).reason == "lat_out_of_range"
    missing = decode_reader(b"r1", orjson.dumps({"reader_id": "r1", "lon": 1}))
    assert (missing.reason, missing.detail) == ("missing_field", "lat: required")


# --- outputs --------------------------------------------------------------------------------------------------

def test_deadletter_record_matches_its_schema():
    items = [GOOD, {**GOOD, "lat": 123}]
    results = decode_positions(b"veh-1", orjson.dumps(items), now_ms=NOW_MS)
    record = orjson.loads(deadletter_record(source_topic="fleet.positions", partition=2, offset=9, index=1,
                                            key=b"veh-1", raw=orjson.dumps(items), error=results[1], now_ms=NOW_MS))
    REFERENCE["deadletter"].validate(record)
    validate_output("deadletter", record)
    assert record["error"] == {"reason": "lat_out_of_range", "detail": results[1].detail}
    assert orjson.loads(record["raw"]) == items[1]  # the bad item, not the whole array
    assert (record["index"], record["key"], record["ts"]) == (1, "veh-1", "2026-11-25T10:00:00.000Z")

    long = orjson.loads(deadletter_record(
        source_topic="t", partition=0, offset=0, index=0, key=b"\xff" * 10_000, raw=b"\xfex" * 10_000,
        error=DecodeError("too_large", "big"), now_ms=NOW_MS, limits=CodecLimits(max_raw_chars=100)))
    assert long["raw"] == "\ufffdx" * 50 and long["key"] == "\ufffd" * 100
    REFERENCE["deadletter"].validate(long)
    empty = orjson.loads(deadletter_record(source_topic="t", partition=0, offset=0, index=None, key=None, raw=None,
                                           error=DecodeError("null_value", "record has no value"), now_ms=NOW_MS))
    assert (empty["raw"], empty["key"], empty["index"]) == (None, None, None)
    blank = deadletter_record(source_topic="t", partition=0, offset=0, index=0, key=b"", raw=b"", now_ms=NOW_MS,
                              error=DecodeError("malformed_json", "empty"))
    assert (orjson.loads(blank)["key"], orjson.loads(blank)["raw"]) == ("", "")
    REFERENCE["deadletter"].validate(empty)


def test_validate_output_uses_the_schema_files_without_the_network():
    for name, doc in SCHEMA_DOCS.items():
        for example in doc["examples"]:
            validate_output(name, example)  # fastjsonschema agrees with jsonschema on the examples
    with pytest.raises(DecodeError) as raised:
        validate_output("geofence_event", {**SCHEMA_DOCS["geofence_event"]["examples"][0], "type": "teleport"})
    assert raised.value.reason == "schema" and "type" in raised.value.detail
    with pytest.raises(DecodeError):
        validate_output("position_batch", [])  # $ref to position.json resolved from disk


def test_every_reason_is_documented_in_the_deadletter_schema():
    documented = SCHEMA_DOCS["deadletter"]["properties"]["error"]["properties"]["reason"]["description"]
    assert [reason for reason in codecs.REASONS if reason not in documented] == []


def test_decode_error_pickles_and_prints():
    error = DecodeError("lat_out_of_range", "lat: 91.0 is outside [-90, 90]")
    assert pickle.loads(pickle.dumps(error)) == error
    assert str(error) == "lat_out_of_range: lat: 91.0 is outside [-90, 90]"


def test_the_worker_does_not_pay_for_the_schema_validators_or_faust():
    import subprocess
    import sys

    code = ("import sys, fleetstream.codecs; "
            "print(sorted(m for m in ('faust', 'aiokafka', 'fastjsonschema', 'jsonschema') if m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_dumps_writes_named_tuples_as_arrays():
    assert dumps({"p": Position("d", 1, 2.0, 3.0)}) == b'{"p":["d",1,2.0,3.0,null,null,null,null,null]}'


# --- the schema files -----------------------------------------------------------------------------------------

def _properties(schema: Any, where: str = "") -> list[tuple[str, dict[str, Any]]]:
    """Every property a schema declares, with a dotted path (not the ones conditions such as allOf restate)."""
    found = []
    if isinstance(schema, dict):
        for name, prop in (schema.get("properties") or {}).items():
            found.append((f"{where}{name}", prop))
            found += _properties(prop, f"{where}{name}.")
        for keyword in ("items", "additionalProperties", "$defs"):
            found += _properties(schema.get(keyword), where)
    elif isinstance(schema, list):
        for sub in schema:
            found += _properties(sub, where)
    return found


@pytest.mark.parametrize("name", sorted(SCHEMA_DOCS))
def test_every_schema_is_valid_documented_and_its_examples_pass(name):
    doc = SCHEMA_DOCS[name]
    jsonschema.Draft202012Validator.check_schema(doc)
    assert doc["$id"] == f"{codecs.SCHEMA_BASE_URI}{name}.json"
    assert doc["title"] and doc["description"]
    assert doc["examples"], "each schema documents examples"
    for example in doc["examples"]:
        REFERENCE[name].validate(example)
    for path, prop in _properties(doc):
        assert prop.get("description") or prop.get("$ref"), f"{name}: {path} needs a description"
