"""Bytes <-> domain models: orjson plus validation against the contract in ``schemas/``.

Validation is hand-written from the schemas (``schemas/position.json`` and friends stay the source of truth;
``tests/unit/test_codecs.py`` checks that these checks and a JSON Schema validator agree on generated
inputs). Measured per fix with ``benchmarks/codecs.py`` (median of 3, this project's 2-core machine):
these checks, building the models too, 2.7 µs (50-fix messages) / 4.4 µs (one fix per message); orjson + a
fastjsonschema-compiled validator, validating only, 6.6 / 7.4 µs; orjson + jsonschema ~95 µs.
The hand-written path also yields the precise reason codes the dead-letter topic carries.

Nothing in here raises for any input bytes: every problem becomes a :class:`DecodeError` with a stable
``reason`` code (a bounded set, safe as a metric label) and a ``detail`` naming the field.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import orjson

from fleetstream.domain.models import Position, RfidRead, Telemetry

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"

POSITION_FIELDS = frozenset(
    {"device_id", "ts", "lat", "lon", "speed_kmh", "heading_deg", "accuracy_m", "altitude_m", "attributes"}
)
RFID_FIELDS = frozenset({"tag_id", "reader_id", "ts", "rssi_dbm", "antenna"})
TELEMETRY_FIELDS = frozenset({"device_id", "ts", "metrics"})
EARLIEST_TS_MS = 0  # epoch: anything earlier is a unit mistake (seconds or microseconds given as ms is caught by skew)


class DecodeError(Exception):
    """Why a record (or one item of an array record) was rejected; carried into the dead-letter record."""

    def __init__(self, reason: str, detail: str, item: Any = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.item = item  # the offending array item, when the message was an array

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DecodeError) and (self.reason, self.detail) == (other.reason, other.detail)

    def __hash__(self) -> int:
        return hash((self.reason, self.detail))


@dataclass(frozen=True, slots=True)
class CodecLimits:
    max_message_bytes: int = 1_048_576
    max_batch_items: int = 1000
    max_future_skew_ms: int = 300_000
    max_id_len: int = 128
    max_raw_chars: int = 4096


DEFAULT_LIMITS = CodecLimits()


# --- timestamps -----------------------------------------------------------------------------------------------

_utc_second_cache: dict[str, int] = {}


def parse_ts(value: Any) -> int:
    """RFC 3339 with a zone (``Z`` or ``±hh:mm``) or integer epoch milliseconds -> epoch milliseconds."""
    if type(value) is str and len(value) == 24 and value[19] == "." and value[23] == "Z":
        # the form our own outputs and most producers write: 2026-11-25T10:00:00.123Z; seconds cached
        seconds_ms = _utc_second_cache.get(value[:19])
        millis = value[20:23]
        if seconds_ms is not None and millis.isdigit():
            return seconds_ms + int(millis)
        full = _parse_ts(value)
        if len(_utc_second_cache) > 8192:
            _utc_second_cache.clear()
        _utc_second_cache[value[:19]] = full - full % 1000
        return full
    return _parse_ts(value)


def _parse_ts(value: Any) -> int:
    if isinstance(value, bool):
        raise DecodeError("bad_timestamp", "ts: expected RFC 3339 string or epoch milliseconds, got a boolean")
    if isinstance(value, int):
        if value < EARLIEST_TS_MS:
            raise DecodeError("bad_timestamp", f"ts: {value} is before 1970")
        return value
    if isinstance(value, str):
        if len(value) < 20 or len(value) > 40 or value[10] not in "Tt ":
            raise DecodeError("bad_timestamp", f"ts: {value[:40]!r} is not an RFC 3339 date-time")
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise DecodeError("bad_timestamp", f"ts: {value[:40]!r} is not an RFC 3339 date-time") from None
        if parsed.tzinfo is None:
            raise DecodeError("bad_timestamp", f"ts: {value!r} has no time zone (add Z or an offset)")
        seconds = parsed.timestamp()
        if seconds < 0:
            raise DecodeError("bad_timestamp", f"ts: {value!r} is before 1970")
        return round(seconds * 1000)
    raise DecodeError("bad_timestamp", f"ts: expected RFC 3339 string or epoch milliseconds, got {_kind(value)}")


_ts_prefix_cache: dict[int, str] = {}


def format_ts(ts_ms: int) -> str:
    """Epoch ms -> ``2026-11-25T10:00:00.123Z``. The per-second prefix is cached: fixes arrive roughly in order."""
    seconds, millis = divmod(ts_ms, 1000)
    prefix = _ts_prefix_cache.get(seconds)
    if prefix is None:
        if len(_ts_prefix_cache) > 8192:
            _ts_prefix_cache.clear()
        prefix = _ts_prefix_cache[seconds] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{prefix}.{millis:03d}Z"


# --- field checks ---------------------------------------------------------------------------------------------

def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _number(doc: dict, name: str, *, low: float | None = None, high: float | None = None,
            required: bool = False) -> float | None:
    value = doc.get(name)
    if value is None:
        if required:
            raise DecodeError("missing_field", f"{name}: required")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DecodeError("bad_type", f"{name}: expected a number, got {_kind(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise DecodeError("not_finite", f"{name}: {value} is not finite")
    if (low is not None and value < low) or (high is not None and value > high):
        reason = f"{name}_out_of_range" if name in ("lat", "lon") else "out_of_range"
        raise DecodeError(reason, f"{name}: {value} is outside [{low}, {high}]")
    return value


def _identifier(doc: dict, name: str, limits: CodecLimits) -> str:
    value = doc.get(name)
    if value is None:
        raise DecodeError("missing_field", f"{name}: required")
    if not isinstance(value, str):
        raise DecodeError(f"bad_{name}", f"{name}: expected a string, got {_kind(value)}")
    if not value or len(value) > limits.max_id_len:
        raise DecodeError(f"bad_{name}", f"{name}: must be 1 to {limits.max_id_len} characters, got {len(value)}")
    return value


def _timestamp(doc: dict, now_ms: int, limits: CodecLimits) -> int:
    if "ts" not in doc or doc["ts"] is None:
        raise DecodeError("missing_field", "ts: required")
    ts_ms = parse_ts(doc["ts"])
    if ts_ms > now_ms + limits.max_future_skew_ms:
        ahead_s = (ts_ms - now_ms) / 1000
        raise DecodeError("future_timestamp", f"ts: {ahead_s:.0f}s in the future (limit {limits.max_future_skew_ms // 1000}s)")
    return ts_ms


def _unknown_fields(doc: dict, allowed: frozenset[str]) -> None:
    if len(doc) > len(allowed) or not allowed.issuperset(doc):
        extra = sorted(set(doc) - allowed)
        if extra:
            raise DecodeError("unknown_field", f"{extra[0]}: not in the schema (put extra data in 'attributes')")


def _check_key(key: str | None, subject: str, name: str) -> None:
    if key is None:
        raise DecodeError("key_missing", f"record key must be the {name} ({subject!r})")
    if key != subject:
        raise DecodeError("key_mismatch", f"record key {key[:64]!r} differs from {name} {subject[:64]!r}")


# --- messages -------------------------------------------------------------------------------------------------

def _split(key: bytes | None, value: bytes | None, limits: CodecLimits) -> tuple[str | None, list[Any]] | DecodeError:
    """Parse a message into its items: one object, or an array of them (buffered uploads)."""
    if value is None:
        return DecodeError("null_value", "record has no value")
    if len(value) > limits.max_message_bytes:
        return DecodeError("too_large", f"message is {len(value)} bytes (limit {limits.max_message_bytes})")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return DecodeError("malformed_json", str(exc)[:200])
    if isinstance(doc, dict):
        items = [doc]
    elif isinstance(doc, list):
        if not doc:
            return DecodeError("empty_batch", "message is an empty array")
        if len(doc) > limits.max_batch_items:
            return DecodeError("batch_too_large", f"array of {len(doc)} items (limit {limits.max_batch_items})")
        items = doc
    else:
        return DecodeError("not_an_object", f"message is a JSON {_kind(doc)}, expected an object or an array")
    try:
        text_key = key.decode("utf-8") if key is not None else None
    except UnicodeDecodeError:
        return DecodeError("key_mismatch", "record key is not UTF-8")
    return text_key, items


def _decode_all(key, value, limits, decode_one) -> list[Any]:
    split = _split(key, value, limits)
    if isinstance(split, DecodeError):
        return [split]
    text_key, items = split
    many = len(items) > 1 or (value is not None and value.lstrip()[:1] == b"[")
    out: list[Any] = []
    for item in items:
        try:
            if not isinstance(item, dict):
                raise DecodeError("not_an_object", f"array item is a JSON {_kind(item)}, expected an object")
            out.append(decode_one(item, text_key))
        except DecodeError as exc:
            if many:
                exc.item = item
            out.append(exc)
    return out


def decode_positions(key: bytes | None, value: bytes | None, *, now_ms: int,
                     limits: CodecLimits = DEFAULT_LIMITS) -> list[Position | DecodeError]:
    """One entry per fix: a message with one object gives one entry, an array one per item, in order."""

    def one(doc: dict, text_key: str | None) -> Position:
        # Fast paths first (a float in range is the common case); anything else goes through the full
        # check, which names the problem. NaN and infinities fail the range tests and land there too.
        if not POSITION_FIELDS.issuperset(doc):
            _unknown_fields(doc, POSITION_FIELDS)
        device_id = doc.get("device_id")
        if type(device_id) is not str or not 0 < len(device_id) <= limits.max_id_len:
            device_id = _identifier(doc, "device_id", limits)
        if text_key != device_id:
            _check_key(text_key, device_id, "device_id")
        ts_ms = _timestamp(doc, now_ms, limits)
        lat = doc.get("lat")
        if type(lat) is not float or not -90.0 <= lat <= 90.0:
            lat = _number(doc, "lat", low=-90.0, high=90.0, required=True)
        lon = doc.get("lon")
        if type(lon) is not float or not -180.0 <= lon <= 180.0:
            lon = _number(doc, "lon", low=-180.0, high=180.0, required=True)
        speed = doc.get("speed_kmh")
        if speed is not None and (type(speed) is not float or not 0.0 <= speed <= 2000.0):
            speed = _number(doc, "speed_kmh", low=0.0, high=2000.0)
        heading = doc.get("heading_deg")
        if heading is not None and (type(heading) is not float or not 0.0 <= heading <= 360.0):
            heading = _number(doc, "heading_deg", low=0.0, high=360.0)
        accuracy = doc.get("accuracy_m")
        if accuracy is not None and (type(accuracy) is not float or not 0.0 <= accuracy < math.inf):
            accuracy = _number(doc, "accuracy_m", low=0.0)
        altitude = doc.get("altitude_m")
        if altitude is not None and (type(altitude) is not float or not -1000.0 <= altitude <= 100_000.0):
            altitude = _number(doc, "altitude_m", low=-1000.0, high=100_000.0)
        attributes = doc.get("attributes")
        if attributes is not None and not isinstance(attributes, dict):
            raise DecodeError("bad_type", f"attributes: expected an object, got {_kind(attributes)}")
        return Position(device_id, ts_ms, lat, lon, speed, heading, accuracy, altitude, attributes or None)

    return _decode_all(key, value, limits, one)


def decode_rfid(key: bytes | None, value: bytes | None, *, now_ms: int,
                limits: CodecLimits = DEFAULT_LIMITS) -> list[RfidRead | DecodeError]:
    """RFID reads keyed by tag_id; one object or an array of them."""

    def one(doc: dict, text_key: str | None) -> RfidRead:
        _unknown_fields(doc, RFID_FIELDS)
        tag_id = _identifier(doc, "tag_id", limits)
        _check_key(text_key, tag_id, "tag_id")
        reader_id = _identifier(doc, "reader_id", limits)
        antenna = doc.get("antenna")
        if antenna is not None and (isinstance(antenna, bool) or not isinstance(antenna, int) or antenna < 0):
            raise DecodeError("bad_type", f"antenna: expected a non-negative integer, got {antenna!r}")
        return RfidRead(tag_id, reader_id, _timestamp(doc, now_ms, limits),
                        _number(doc, "rssi_dbm", low=-200.0, high=50.0), antenna)

    return _decode_all(key, value, limits, one)


def decode_telemetry(key: bytes | None, value: bytes | None, *, now_ms: int,
                     limits: CodecLimits = DEFAULT_LIMITS) -> list[Telemetry | DecodeError]:
    """Telemetry readings keyed by device_id: ``{device_id, ts, metrics: {name: number}}``."""

    def one(doc: dict, text_key: str | None) -> Telemetry:
        _unknown_fields(doc, TELEMETRY_FIELDS)
        device_id = _identifier(doc, "device_id", limits)
        _check_key(text_key, device_id, "device_id")
        ts_ms = _timestamp(doc, now_ms, limits)
        metrics = doc.get("metrics")
        if not isinstance(metrics, dict) or not metrics:
            raise DecodeError("bad_type" if metrics is not None else "missing_field",
                              "metrics: expected a non-empty object of name -> number")
        values: dict[str, float] = {}
        for name in metrics:
            if not isinstance(name, str) or not name or len(name) > 64:
                raise DecodeError("bad_type", f"metrics: name {name!r} must be 1 to 64 characters")
            values[name] = _number(metrics, name, required=True)  # type: ignore[assignment]
        return Telemetry(device_id, ts_ms, values)

    return _decode_all(key, value, limits, one)


# --- outputs --------------------------------------------------------------------------------------------------

def dumps(obj: Any) -> bytes:
    """``orjson.dumps`` for values that stay alive (held for a batch send): copied to an exact-size object.

    orjson builds its output in a ~1 KiB buffer and shrinks it in place; thousands of such shrunken blocks
    alive at once fragment glibc malloc until each call costs 6-14 µs instead of ~1 µs (measured with 100k
    outputs held). The copy, small enough for Python's own allocator, costs ~0.2 µs and avoids that.
    """
    return bytes(memoryview(orjson.dumps(obj, default=_tuple_as_list)))


def _tuple_as_list(value: Any) -> list[Any]:
    """orjson writes plain tuples but not NamedTuples (domain models): write those as arrays too."""
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def position_to_dict(p: Position) -> dict[str, Any]:
    """A position in contract form (RFC 3339 ``ts``), omitting absent optional fields."""
    out: dict[str, Any] = {"device_id": p.device_id, "ts": format_ts(p.ts_ms), "lat": p.lat, "lon": p.lon}
    for name in ("speed_kmh", "heading_deg", "accuracy_m", "altitude_m", "attributes"):
        value = getattr(p, name)
        if value is not None:
            out[name] = value
    return out


def deadletter_record(*, source_topic: str, partition: int, offset: int, index: int | None, key: bytes | None,
                      raw: bytes | None, error: DecodeError, now_ms: int, limits: CodecLimits = DEFAULT_LIMITS) -> bytes:
    """The ``fleet.deadletter`` value (schemas/deadletter.json). For a bad item of an array, ``raw`` is that item."""
    if error.item is not None:
        text = orjson.dumps(error.item).decode()
    elif raw is None:
        text = None
    else:
        text = raw[: limits.max_raw_chars * 4].decode("utf-8", "replace")
    if text is not None and len(text) > limits.max_raw_chars:
        text = text[: limits.max_raw_chars]
    return dumps({
        "source_topic": source_topic,
        "partition": partition,
        "offset": offset,
        "index": index,
        "key": key.decode("utf-8", "replace") if key is not None else None,
        "error": {"reason": error.reason, "detail": error.detail},
        "raw": text,
        "ts": format_ts(now_ms),
    })


@cache
def load_schema(name: str) -> dict[str, Any]:
    """A schema from ``schemas/`` by file stem, e.g. ``load_schema("position")``."""
    return orjson.loads((SCHEMA_DIR / f"{name}.json").read_bytes())


@cache
def _output_validator(name: str):
    import fastjsonschema

    return fastjsonschema.compile(load_schema(name))


def validate_output(schema_name: str, obj: dict[str, Any]) -> None:
    """Check an output message against its schema (tests hold the worker's outputs to the contract)."""
    import fastjsonschema

    try:
        _output_validator(schema_name)(obj)
    except fastjsonschema.JsonSchemaException as exc:
        raise DecodeError("schema", f"{schema_name}: {exc.message}") from None
