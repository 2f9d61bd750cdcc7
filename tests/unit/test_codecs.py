"""Codecs: every byte string gives models or reasons, never an exception; the fast checks agree with the schemas."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from referencing import Registry, Resource

from fleetstream.codecs import (
    CodecLimits,
    DecodeError,
    deadletter_record,
    decode_positions,
    decode_rfid,
    decode_telemetry,
    format_ts,
    parse_ts,
    position_to_dict,
    validate_output,
)
from fleetstream.domain.models import Position, RfidRead, Telemetry

SCHEMAS = Path(__file__).resolve().parents[2] / "fleetstream" / "schemas"
NOW_MS = 1_795_600_800_000  # 2026-11-25T10:00:00Z


def _registry() -> Registry:
    resources = []
    for path in SCHEMAS.glob("*.json"):
        doc = orjson.loads(path.read_bytes())
        resources.append((path.name, Resource.from_contents(doc)))
        resources.append((doc["$id"], Resource.from_contents(doc)))
    return Registry().with_resources(resources)


REGISTRY = _registry()


def reference_validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(orjson.loads((SCHEMAS / f"{name}.json").read_bytes()), registry=REGISTRY)


def one(value: object, key: bytes | None = b"veh-1", **limits: int) -> Position | DecodeError:
    [result] = decode_positions(key, orjson.dumps(value), now_ms=NOW_MS, limits=CodecLimits(**limits))
    return result


GOOD = {"device_id": "veh-1", "ts": "2026-11-25T09:59:00.000Z", "lat": 53.4, "lon": -2.98}


def test_a_valid_position_decodes():
    fix = one({**GOOD, "speed_kmh": 40, "heading_deg": 90.5, "accuracy_m": 5, "attributes": {"ignition": True}})
    assert fix == Position("veh-1", NOW_MS - 60_000, 53.4, -2.98, 40.0, 90.5, 5.0, None, {"ignition": True})


@pytest.mark.parametrize(
    ("value", "key", "reason"),
    [
        (b"{not json", b"veh-1", "malformed_json"),
        (b"NaN", b"veh-1", "malformed_json"),
        (b'{"device_id": "veh-1", "ts": 1, "lat": 1e400, "lon": 0}', b"veh-1", "malformed_json"),
        (b"42", b"veh-1", "not_an_object"),
        (b"[]", b"veh-1", "empty_batch"),
        (b"null", b"veh-1", "not_an_object"),
        (None, b"veh-1", "null_value"),
    ],
)
def test_messages_that_cannot_be_split(value, key, reason):
    [error] = decode_positions(key, value, now_ms=NOW_MS)
    assert isinstance(error, DecodeError) and error.reason == reason


@pytest.mark.parametrize(
    ("change", "key", "reason", "field"),
    [
        ({"lat": 90.5}, b"veh-1", "lat_out_of_range", "lat"),
        ({"lon": -180.01}, b"veh-1", "lon_out_of_range", "lon"),
        ({"lat": "53.4"}, b"veh-1", "bad_type", "lat"),
        ({"lat": True}, b"veh-1", "bad_type", "lat"),
        ({"lon": None}, b"veh-1", "missing_field", "lon"),
        ({"ts": None}, b"veh-1", "missing_field", "ts"),
        ({"ts": "yesterday"}, b"veh-1", "bad_timestamp", "ts"),
        ({"ts": "2026-11-25T09:59:00.000"}, b"veh-1", "bad_timestamp", "zone"),
        ({"ts": True}, b"veh-1", "bad_timestamp", "ts"),
        ({"ts": -5}, b"veh-1", "bad_timestamp", "1970"),
        ({"ts": NOW_MS + 301_000}, b"veh-1", "future_timestamp", "future"),
        ({"device_id": ""}, b"", "bad_device_id", "device_id"),
        ({"device_id": "x" * 129}, b"x" * 129, "bad_device_id", "128"),
        ({"device_id": 7}, b"7", "bad_device_id", "device_id"),
        ({}, b"veh-2", "key_mismatch", "veh-2"),
        ({}, None, "key_missing", "device_id"),
        ({"speed_kmh": -1}, b"veh-1", "out_of_range", "speed_kmh"),
        ({"heading_deg": 361}, b"veh-1", "out_of_range", "heading_deg"),
        ({"accuracy_m": "good"}, b"veh-1", "bad_type", "accuracy_m"),
        ({"attributes": [1]}, b"veh-1", "bad_type", "attributes"),
        ({"colour": "red"}, b"veh-1", "unknown_field", "colour"),
    ],
)
def test_each_problem_has_its_reason_and_names_the_field(change, key, reason, field):
    result = one({**GOOD, **change}, key=key)
    assert isinstance(result, DecodeError), result
    assert result.reason == reason
    assert field in result.detail


def test_missing_required_fields():
    for name in ("device_id", "ts", "lat", "lon"):
        doc = {k: v for k, v in GOOD.items() if k != name}
        result = one(doc)
        assert isinstance(result, DecodeError) and result.reason in ("missing_field", "key_mismatch")
        assert name in result.detail or result.reason == "key_mismatch"


def test_size_and_batch_limits():
    [error] = decode_positions(b"veh-1", orjson.dumps(GOOD) + b" " * 100, now_ms=NOW_MS,
                               limits=CodecLimits(max_message_bytes=64))
    assert error.reason == "too_large"
    [error] = decode_positions(b"veh-1", orjson.dumps([GOOD] * 3), now_ms=NOW_MS, limits=CodecLimits(max_batch_items=2))
    assert error.reason == "batch_too_large"


def test_an_array_gives_one_result_per_item_in_order():
    items = [GOOD, {**GOOD, "lat": 99}, 5, {**GOOD, "device_id": "other"}, {**GOOD, "ts": GOOD["ts"][:-1] + "1Z"}]
    results = decode_positions(b"veh-1", orjson.dumps(items), now_ms=NOW_MS)
    assert [r.reason if isinstance(r, DecodeError) else "ok" for r in results] == [
        "ok", "lat_out_of_range", "not_an_object", "key_mismatch", "ok"]
    assert results[1].item == items[1]  # the dead letter carries the offending item, not the whole array


def test_timestamps():
    assert parse_ts(0) == 0
    assert parse_ts("2026-11-25T10:00:00Z") == NOW_MS
    assert parse_ts("2026-11-25T10:00:00.5Z") == NOW_MS + 500
    assert parse_ts("2026-11-25T11:00:00.123+01:00") == NOW_MS + 123
    assert parse_ts("2026-11-25T10:00:00.123456789Z") == NOW_MS + 123
    assert parse_ts("2026-11-25 10:00:00.000Z") == NOW_MS
    assert parse_ts("2026-11-25T10:00:00.250Z") == NOW_MS + 250  # fast path
    assert parse_ts("2026-11-25T10:00:00.251Z") == NOW_MS + 251  # fast path, cached second
    assert format_ts(NOW_MS + 7) == "2026-11-25T10:00:00.007Z"
    assert format_ts(0) == "1970-01-01T00:00:00.000Z"


@given(st.integers(min_value=0, max_value=4_102_444_800_000))
def test_format_and_parse_round_trip(ts_ms):
    assert parse_ts(format_ts(ts_ms)) == ts_ms


positions = st.builds(
    Position,
    device_id=st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=128),
    ts_ms=st.integers(0, NOW_MS),
    lat=st.floats(-90, 90),
    lon=st.floats(-180, 180),
    speed_kmh=st.none() | st.floats(0, 2000),
    heading_deg=st.none() | st.floats(0, 360),
    accuracy_m=st.none() | st.floats(0, 1e6),
    altitude_m=st.none() | st.floats(-1000, 100_000),
    attributes=st.none() | st.dictionaries(st.text(max_size=5), st.integers(-1000, 1000), min_size=1, max_size=3),
)


@given(positions)
def test_valid_positions_round_trip(fix):
    doc = position_to_dict(fix)
    assert reference_validator("position").is_valid(doc)
    [decoded] = decode_positions(fix.device_id.encode(), orjson.dumps(doc), now_ms=NOW_MS)
    assert decoded == fix


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.none() | st.binary(max_size=20))
def test_any_bytes_give_results_never_an_exception(value, key):
    for decode in (decode_positions, decode_rfid, decode_telemetry):
        results = decode(key, value, now_ms=NOW_MS)
        assert results and all(isinstance(r, (Position, RfidRead, Telemetry, DecodeError)) for r in results)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=12,
)
field_values = st.one_of(
    json_values, st.floats(-200, 200), st.integers(-200, 200), st.sampled_from(["2026-11-25T09:00:00Z", "veh-1", ""])
)
position_like = st.fixed_dictionaries(
    {},
    optional={
        "device_id": st.sampled_from(["veh-1", "", 7, None]) | st.text(max_size=3),
        "ts": st.sampled_from(["2026-11-25T09:00:00Z", "2026-11-25T09:00:00.123+02:00", 1_700_000_000_000, -1, "x", True]),
        "lat": field_values, "lon": field_values, "speed_kmh": field_values, "heading_deg": field_values,
        "accuracy_m": field_values, "altitude_m": field_values, "attributes": st.none() | st.dictionaries(st.text(max_size=3), st.integers(-100, 100), max_size=2) | st.integers(-100, 100),
        "extra": st.integers(-5, 5),
    },
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(position_like)
def test_fast_checks_agree_with_the_schema(doc):
    """Reference: the JSON Schema in schemas/position.json (plus the key rule, which a schema cannot state)."""
    expected = reference_validator("position").is_valid(doc) and doc.get("device_id") == "veh-1"
    if isinstance(doc.get("ts"), str) and expected:
        expected = not doc["ts"].startswith("x")
    [result] = decode_positions(b"veh-1", orjson.dumps(doc), now_ms=NOW_MS)
    assert isinstance(result, Position) == expected, (doc, result)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(json_values)
def test_any_json_gives_results(doc):
    results = decode_positions(b"veh-1", orjson.dumps(doc), now_ms=NOW_MS)
    assert len(results) == (len(doc) if isinstance(doc, list) and 0 < len(doc) <= 1000 else 1)


def test_rfid_and_telemetry():
    [read] = decode_rfid(b"tag-1", orjson.dumps({"tag_id": "tag-1", "reader_id": "r1", "ts": NOW_MS, "rssi_dbm": -60}),
                         now_ms=NOW_MS)
    assert read == RfidRead("tag-1", "r1", NOW_MS, -60.0, None)
    [bad] = decode_rfid(b"tag-1", orjson.dumps({"tag_id": "tag-1", "ts": NOW_MS}), now_ms=NOW_MS)
    assert bad.reason == "missing_field" and "reader_id" in bad.detail
    [t] = decode_telemetry(b"d", orjson.dumps({"device_id": "d", "ts": NOW_MS, "metrics": {"fuel_pct": 40}}), now_ms=NOW_MS)
    assert t == Telemetry("d", NOW_MS, {"fuel_pct": 40.0})
    [bad] = decode_telemetry(b"d", orjson.dumps({"device_id": "d", "ts": NOW_MS, "metrics": {"fuel_pct": "x"}}),
                             now_ms=NOW_MS)
    assert bad.reason == "bad_type" and "fuel_pct" in bad.detail


def test_deadletter_record_matches_its_schema_and_keeps_the_raw_item():
    items = [GOOD, {**GOOD, "lat": 123}]
    results = decode_positions(b"veh-1", orjson.dumps(items), now_ms=NOW_MS)
    record = orjson.loads(deadletter_record(source_topic="fleet.positions", partition=2, offset=9, index=1,
                                            key=b"veh-1", raw=orjson.dumps(items), error=results[1], now_ms=NOW_MS))
    validate_output("deadletter", record)
    assert record["error"]["reason"] == "lat_out_of_range"
    assert orjson.loads(record["raw"]) == items[1]
    long = deadletter_record(source_topic="t", partition=0, offset=0, index=0, key=b"\xff", raw=b"x" * 10_000,
                             error=DecodeError("too_large", "big"), now_ms=NOW_MS, limits=CodecLimits(max_raw_chars=100))
    assert len(orjson.loads(long)["raw"]) == 100


@pytest.mark.parametrize("path", sorted(SCHEMAS.glob("*.json")), ids=lambda p: p.stem)
def test_every_schema_is_valid_and_its_examples_pass(path):
    doc = orjson.loads(path.read_bytes())
    jsonschema.Draft202012Validator.check_schema(doc)
    validator = reference_validator(path.stem)
    assert doc["examples"], "each schema documents examples"
    for example in doc["examples"]:
        validator.validate(example)
    for name, prop in doc.get("properties", {}).items():
        assert prop.get("description") or prop.get("$ref"), f"{path.stem}.{name} needs a description"

