"""Bytes <-> domain models: orjson plus validation against the contract in ``schemas/``.

Validator, chosen by measurement: ``python benchmarks/codecs.py [--per-message 50]`` prints µs per fix, median of
7 runs on this project's (shared, noisy: ±20%) 2-core machine. "validate": a parsed dict to a verdict (ours also
builds the Position, ts parsed); "decode": message bytes to that, orjson included.

    candidate                                     validate   decode 1 fix/msg   decode 50 fixes/msg
    orjson.loads alone (the floor)                    -            1.1                 0.7
    hand-written, derived from the schema files      2.2           3.9                 2.7    <- chosen
    fastjsonschema compiled from the schema files    5.9           7.4                 6.5
    jsonschema Draft202012Validator                   87           88                  87
    msgspec Struct mirroring the schema               -            1.7                 0.8
    pydantic TypeAdapter mirroring the schema        1.6           3.0                 2.4
    (format_ts 0.23 µs; parse_ts from cached parts 0.39 µs for "...:00.123Z", 0.75 with an offset; full 4 µs)

fastjsonschema is 2.5x slower and gives no reason codes. msgspec would save ~1.5 µs a fix, but it is not a
dependency, needs the schema mirrored as a Struct, and gives no reason codes either, so these checks would stay
for rejected messages: two validators to keep in agreement. Worth it only if the per-fix budget tightens.

So inputs are checked by hand-written code, but not hand-copied numbers: the bounds, required fields, allowed
fields, nullability and id lengths are read from the schema files at import time (``_compile``; an unknown
keyword there fails the import rather than going unchecked). ``tests/unit/test_codecs.py`` checks on generated
inputs that these checks accept exactly what a reference JSON Schema validator accepts, plus the rules a schema
cannot state (key equals id, calendar-valid times not before 1970 nor too far ahead). Outputs are checked, in
tests, with fastjsonschema compiled from the same files (:func:`validate_output`).

Nothing in here raises for any input bytes: every problem becomes a :class:`DecodeError` with a stable ``reason``
code (a bounded set, safe as a metric label) and a ``detail`` naming the field.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from fleetstream.domain.models import Position, RfidRead, Telemetry

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
SCHEMA_BASE_URI = "https://fleetstream.dev/schemas/"


class DecodeError(Exception):
    """Why a record (or one item of an array record) was rejected; carried into the dead-letter record."""

    reason: str  # short stable machine code, e.g. "lat_out_of_range"
    detail: str  # human-readable, names the field

    def __init__(self, reason: str, detail: str, item: Any = None) -> None:
        super().__init__(reason, detail)
        self.reason = reason
        self.detail = detail
        self.item = item  # the offending array item, when the message was an array

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DecodeError) and (self.reason, self.detail) == (other.reason, other.detail)

    def __hash__(self) -> int:
        return hash((self.reason, self.detail))


REASONS = (  # every DecodeError.reason the decoders return (schemas/deadletter.json lists them too)
    "null_value", "too_large", "malformed_json", "not_finite", "not_an_object", "empty_batch", "batch_too_large",
    "unknown_field", "missing_field", "bad_type", "out_of_range", "lat_out_of_range", "lon_out_of_range",
    "bad_device_id", "bad_tag_id", "bad_reader_id", "key_missing", "key_mismatch", "bad_timestamp", "future_timestamp",
)


@dataclass(frozen=True, slots=True)
class CodecLimits:
    max_message_bytes: int = 1_048_576
    max_batch_items: int = 1000
    max_future_skew_ms: int = 300_000
    max_id_len: int = 128  # for *_id fields; the schemas say 128 too
    max_raw_chars: int = 4096  # dead-letter ``raw`` and ``key`` truncation


DEFAULT_LIMITS = CodecLimits()


@cache
def load_schema(name: str) -> dict[str, Any]:
    """A schema from ``schemas/`` by file stem, e.g. ``load_schema("position")``."""
    return orjson.loads((SCHEMA_DIR / f"{name}.json").read_bytes())


# --- timestamps -----------------------------------------------------------------------------------------------

_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d):(\d\d)(?:\.(\d+))?([Zz]|[+-]\d\d:\d\d)", re.ASCII)
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
# Caches filled only by the full parse, so they hold validated parts only: the date-time up to the seconds read as
# UTC ("2026-11-25T10:00:00" -> ms), zones ("+01:00" -> ms east of UTC) and fractions (".1", ".12", ".123" -> ms).
_second_ms: dict[str, int] = {}
_zone_ms: dict[str, int] = {"Z": 0, "z": 0}
_fraction_ms = {"": 0} | {f".{i:0{n}d}": i * 10 ** (3 - n) for n in (1, 2, 3) for i in range(10**n)}


def parse_ts(value: Any) -> int:
    """RFC 3339 with a zone (``Z`` or ``±hh:mm``, any fraction length) or epoch milliseconds -> epoch ms.

    Fast path (~0.4 µs instead of ~4): the seconds, zone and fraction parts looked up in caches of parts an
    earlier full parse validated; whatever does not decompose into cached parts takes the full parse.
    """
    if type(value) is str:
        second_ms = _second_ms.get(value[:19])
        if second_ms is not None:
            if len(value) == 24 and value[23] == "Z":  # 2026-11-25T10:00:00.123Z: what most producers write
                fraction_ms = _fraction_ms.get(value[19:23])
                if fraction_ms is not None:
                    return second_ms + fraction_ms
            rest = value[19:]
            zone = rest[-1:] if rest[-1:] in ("Z", "z") else rest[-6:]
            zone_ms = _zone_ms.get(zone)
            fraction = rest[: len(rest) - len(zone)]
            fraction_ms = _fraction_ms.get(fraction)
            if fraction_ms is None and fraction[1:].isdigit() and fraction[1:].isascii():
                fraction_ms = _fraction_ms.get(fraction[:4])  # beyond milliseconds: truncated
            if zone_ms is not None and fraction_ms is not None and second_ms >= zone_ms:
                return second_ms - zone_ms + fraction_ms
        return _parse_rfc3339(value)
    if type(value) is int or (type(value) is float and value.is_integer()):  # JSON Schema: 1.0 is an integer
        if value < 0:
            raise DecodeError("bad_timestamp", f"ts: {value} is before 1970")
        return int(value)
    raise DecodeError("bad_timestamp", f"ts: expected RFC 3339 text or integer epoch ms, got {_kind(value)}")


def _parse_rfc3339(value: str) -> int:
    match = _RFC3339.fullmatch(value)
    if match is None:
        zone = "has no time zone (add Z or an offset)" if _RFC3339.fullmatch(value + "Z") else "is not RFC 3339"
        raise DecodeError("bad_timestamp", f"ts: {value[:40]!r} {zone}")
    year, month, day, hour, minute, second = (int(part) for part in match.groups()[:6])
    fraction, zone = match[7] or "", match[8]
    try:
        days = date(year, month, day).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        raise DecodeError("bad_timestamp", f"ts: {value[:40]!r} is not a calendar date") from None
    offset_h, offset_m = (0, 0) if zone in "Zz" else (int(zone[1:3]), int(zone[4:6]))
    if hour > 23 or minute > 59 or second > 60 or offset_h > 23 or offset_m > 59:  # 60: a leap second
        raise DecodeError("bad_timestamp", f"ts: {value[:40]!r} is not a valid time of day or offset")
    second_ms = (days * 86400 + hour * 3600 + minute * 60 + second) * 1000
    zone_ms = (offset_h * 3600 + offset_m * 60) * (-1000 if zone[0] == "-" else 1000)
    if second_ms < zone_ms:
        raise DecodeError("bad_timestamp", f"ts: {value[:40]!r} is before 1970")
    if len(_second_ms) >= 16384:
        _second_ms.clear()
    _second_ms[value[:19]] = second_ms
    _zone_ms[zone] = zone_ms  # at most 2 x 24 x 60 distinct valid offsets
    return second_ms - zone_ms + (int(fraction[:3].ljust(3, "0")) if fraction else 0)  # truncated to the ms


_second_text: dict[int, str] = {}  # epoch second -> "2026-11-25T10:00:00"
_millis_text = [f".{ms:03d}Z" for ms in range(1000)]  # a table beats formatting "{:03d}" (0.2 vs 0.55 µs a call)


def format_ts(ts_ms: int) -> str:
    """Epoch ms -> ``2026-11-25T10:00:00.123Z``. The per-second prefix is cached: fixes arrive roughly in order."""
    seconds, millis = divmod(ts_ms, 1000)
    prefix = _second_text.get(seconds)
    if prefix is None:
        if len(_second_text) >= 8192:
            _second_text.clear()
        prefix = _second_text[seconds] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return prefix + _millis_text[millis]


# --- field rules read from the schema files ---------------------------------------------------------------------

class _Rule(NamedTuple):
    kind: str  # number | integer | string | object | ts | metrics
    required: bool
    nullable: bool
    low: float  # minimum
    high: float  # maximum
    min_len: int  # strings: minLength; metrics: minProperties
    max_len: int
    name_len: tuple[int, int] = (0, 0)  # metrics: propertyNames minLength, maxLength


class _Schema(NamedTuple):
    fields: dict[str, _Rule]
    allowed: frozenset[str]
    key_field: str


_UNLIMITED = 1 << 62
_UNDERSTOOD = {"type", "description", "minimum", "maximum", "minLength", "maxLength", "oneOf", "examples",
               "minProperties", "propertyNames", "additionalProperties"}


def _compile(name: str, key_field: str) -> _Schema:
    """The checks a flat input schema asks for; fails loudly on a keyword these checks do not implement."""
    schema = load_schema(name)
    if schema.get("additionalProperties") is not False:
        raise RuntimeError(f"schemas/{name}.json: codecs checks closed objects (additionalProperties: false)")
    required = set(schema["required"])
    fields = {}
    for field, spec in schema["properties"].items():
        if set(spec) - _UNDERSTOOD:
            raise RuntimeError(f"schemas/{name}.json {field}: codecs does not check {sorted(set(spec) - _UNDERSTOOD)}")
        types = [spec["type"]] if isinstance(spec.get("type"), str) else list(spec.get("type", ()))
        kind = "ts" if "oneOf" in spec else "metrics" if "additionalProperties" in spec else types[0]
        names = spec.get("propertyNames", {})
        fields[field] = _Rule(
            kind, field in required, "null" in types, spec.get("minimum", -math.inf), spec.get("maximum", math.inf),
            spec.get("minLength", spec.get("minProperties", 0)), spec.get("maxLength", _UNLIMITED),
            (names.get("minLength", 0), names.get("maxLength", _UNLIMITED)))
    return _Schema(fields, frozenset(schema["properties"]), key_field)


POSITION = _compile("position", "device_id")
RFID = _compile("rfid_read", "tag_id")
TELEMETRY = _compile("telemetry", "device_id")
READER = _compile("reader", "reader_id")
_ANY_NUMBER = _Rule("number", True, False, -math.inf, math.inf, 0, 0)
if not all(rule.nullable for rule in POSITION.fields.values() if not rule.required):
    raise RuntimeError("schemas/position.json: position_from_dict reads null as absent for optional fields")


_JSON_KINDS = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer", float: "number"}


def _kind(value: Any) -> str:
    return "null" if value is None else _JSON_KINDS.get(type(value), type(value).__name__)


def _check(doc: dict, name: str, rule: _Rule, now_ms: int, limits: CodecLimits, label: str = "") -> Any:
    """One field against its rule: the value in domain form, or DecodeError naming the field and the problem."""
    label = label or name
    value = doc.get(name)
    if value is None:
        if rule.required:
            raise DecodeError("missing_field", f"{label}: required" + (", got null" if name in doc else ""))
        if name in doc and not rule.nullable:
            raise DecodeError("bad_type", f"{label}: must not be null (leave it out instead)")
        return None
    kind = rule.kind
    if kind == "ts":
        ts_ms = parse_ts(value)
        if ts_ms > now_ms + limits.max_future_skew_ms:
            raise DecodeError("future_timestamp", f"{label}: {(ts_ms - now_ms) / 1000:.0f}s in the future "
                                                  f"(limit {limits.max_future_skew_ms / 1000:.0f}s)")
        return ts_ms
    if kind in ("number", "integer"):
        if type(value) not in (int, float) or (kind == "integer" and type(value) is float and not value.is_integer()):
            raise DecodeError("bad_type", f"{label}: expected {'an integer' if kind == 'integer' else 'a number'}, "
                                          f"got {_kind(value)}")
        if type(value) is float and not math.isfinite(value):  # only from callers passing dicts: orjson refuses
            raise DecodeError("not_finite", f"{label}: {value} is not finite")
        if not rule.low <= value <= rule.high:
            reason = f"{name}_out_of_range" if name in ("lat", "lon") else "out_of_range"
            raise DecodeError(reason, f"{label}: {value} is outside [{rule.low}, {rule.high}]")
        try:
            return int(value) if kind == "integer" else float(value)
        except OverflowError:
            raise DecodeError("not_finite", f"{label}: {value:.3g} overflows a double") from None
    if kind == "string":
        is_id = name.endswith("_id") and rule.max_len < _UNLIMITED
        high = limits.max_id_len if is_id else rule.max_len
        if type(value) is not str or not rule.min_len <= len(value) <= high:
            got = f"{len(value)} characters" if type(value) is str else _kind(value)
            raise DecodeError(f"bad_{name}" if is_id else "bad_type",
                              f"{label}: expected a string of {rule.min_len} to {high} characters, got {got}")
        return value
    if type(value) is not dict:
        raise DecodeError("bad_type", f"{label}: expected an object, got {_kind(value)}")
    if kind == "metrics":
        if len(value) < rule.min_len:
            raise DecodeError("bad_type", f"{label}: expected at least {rule.min_len} reading(s)")
        low, high = rule.name_len
        for metric in value:
            if not low <= len(metric) <= high:
                raise DecodeError("bad_type", f"{label}: name {metric[:64]!r} must be {low} to {high} characters")
        return {metric: _check(value, metric, _ANY_NUMBER, now_ms, limits, f"{label}.{metric}") for metric in value}
    return value


def _fields(doc: dict, schema: _Schema, key: str | None, now_ms: int, limits: CodecLimits) -> dict[str, Any]:
    """The generic (slower) path: every field of a flat schema in order, then the key rule."""
    if not schema.allowed.issuperset(doc):
        _unknown_fields(doc, schema.allowed)
    values = {name: _check(doc, name, rule, now_ms, limits) for name, rule in schema.fields.items()}
    _check_key(key, values[schema.key_field], schema.key_field)
    return values


def _unknown_fields(doc: dict, allowed: frozenset[str]) -> None:
    extra = sorted(set(doc) - allowed)
    hint = " (put extra data in 'attributes')" if "attributes" in allowed else ""
    raise DecodeError("unknown_field", f"{extra[0][:64]}: not in the schema{hint}")


def _check_key(key: str | None, subject: str, name: str) -> None:
    if key != subject:
        if key is None:
            raise DecodeError("key_missing", f"record key must be the {name} ({subject[:64]!r})")
        raise DecodeError("key_mismatch", f"record key {key[:64]!r} differs from {name} {subject[:64]!r}")


# --- messages -------------------------------------------------------------------------------------------------

_new_tuple = tuple.__new__  # builds the Position NamedTuple in half the time of calling it (0.16 vs 0.33 µs)
_POSITION_FIELDS = POSITION.allowed
_ID_MIN_LEN = POSITION.fields["device_id"].min_len
(_LAT_LO, _LAT_HI), (_LON_LO, _LON_HI), (_SPEED_LO, _SPEED_HI), (_HEADING_LO, _HEADING_HI), \
    (_ACCURACY_LO, _ACCURACY_HI), (_ALTITUDE_LO, _ALTITUDE_HI) = (
        (POSITION.fields[f].low, POSITION.fields[f].high)
        for f in ("lat", "lon", "speed_kmh", "heading_deg", "accuracy_m", "altitude_m"))


def position_from_dict(doc: dict, key: str | None, now_ms: int, limits: CodecLimits = DEFAULT_LIMITS) -> Position:
    """One fix from a parsed JSON object.

    The common well-formed case passes the inlined tests (bounds are module constants read from the schema:
    a global lookup is cheaper than an attribute); anything else is re-checked by :func:`_position_field`,
    which raises naming the problem or returns the value in domain form (an int speed as a float ...).
    """
    if not _POSITION_FIELDS.issuperset(doc):
        _unknown_fields(doc, _POSITION_FIELDS)
    get = doc.get
    device_id = get("device_id")
    if device_id != key or type(device_id) is not str or not _ID_MIN_LEN <= len(device_id) <= limits.max_id_len:
        device_id = _position_field(doc, "device_id", now_ms, limits)
        _check_key(key, device_id, "device_id")
    ts = get("ts")
    if type(ts) is str:
        ts_ms = parse_ts(ts)
    elif type(ts) is int and ts >= 0:
        ts_ms = ts
    else:
        ts_ms = _position_field(doc, "ts", now_ms, limits)
    if ts_ms > now_ms + limits.max_future_skew_ms:
        _position_field(doc, "ts", now_ms, limits)  # raises future_timestamp
    lat = get("lat")
    if type(lat) is not float or not _LAT_LO <= lat <= _LAT_HI:
        lat = _position_field(doc, "lat", now_ms, limits)
    lon = get("lon")
    if type(lon) is not float or not _LON_LO <= lon <= _LON_HI:
        lon = _position_field(doc, "lon", now_ms, limits)
    speed = get("speed_kmh")
    if speed is not None and (type(speed) is not float or not _SPEED_LO <= speed <= _SPEED_HI):
        speed = _position_field(doc, "speed_kmh", now_ms, limits)
    heading = get("heading_deg")
    if heading is not None and (type(heading) is not float or not _HEADING_LO <= heading <= _HEADING_HI):
        heading = _position_field(doc, "heading_deg", now_ms, limits)
    accuracy = get("accuracy_m")
    if accuracy is not None and (type(accuracy) is not float or not _ACCURACY_LO <= accuracy <= _ACCURACY_HI):
        accuracy = _position_field(doc, "accuracy_m", now_ms, limits)
    altitude = get("altitude_m")
    if altitude is not None and (type(altitude) is not float or not _ALTITUDE_LO <= altitude <= _ALTITUDE_HI):
        altitude = _position_field(doc, "altitude_m", now_ms, limits)
    attributes = get("attributes")
    if attributes is not None and type(attributes) is not dict:
        _position_field(doc, "attributes", now_ms, limits)
    return _new_tuple(Position, (device_id, ts_ms, lat, lon, speed, heading, accuracy, altitude, attributes or None))


def _position_field(doc: dict, name: str, now_ms: int, limits: CodecLimits) -> Any:
    return _check(doc, name, POSITION.fields[name], now_ms, limits)


def rfid_from_dict(doc: dict, key: str | None, now_ms: int, limits: CodecLimits = DEFAULT_LIMITS) -> RfidRead:
    """One RFID read from a parsed JSON object (low volume: the generic rule-driven checks)."""
    v = _fields(doc, RFID, key, now_ms, limits)
    return RfidRead(v["tag_id"], v["reader_id"], v["ts"], v["rssi_dbm"], v["antenna"])


def telemetry_from_dict(doc: dict, key: str | None, now_ms: int, limits: CodecLimits = DEFAULT_LIMITS) -> Telemetry:
    """One set of telemetry readings from a parsed JSON object."""
    v = _fields(doc, TELEMETRY, key, now_ms, limits)
    return Telemetry(v["device_id"], v["ts"], v["metrics"])


def _decode(key: bytes | None, value: bytes | None, now_ms: int, limits: CodecLimits,
            one: Callable[[dict, str | None, int, CodecLimits], Any]) -> list[Any]:
    """Parse a message and decode its item(s): one object, or a non-empty array of them (buffered uploads)."""
    if value is None or len(value) > limits.max_message_bytes:
        return [_unreadable(value, limits)]
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return [_json_error(exc)]
    # surrogateescape: a key that is not UTF-8 can never equal an id (parsed JSON has no lone surrogates)
    text_key = key.decode("utf-8", "surrogateescape") if key is not None else None
    if type(doc) is dict:
        try:
            return [one(doc, text_key, now_ms, limits)]
        except DecodeError as exc:
            return [exc]
    if type(doc) is not list or not 0 < len(doc) <= limits.max_batch_items:
        return [_not_splittable(doc, limits)]
    out: list[Any] = []
    for item in doc:
        try:
            if type(item) is not dict:
                raise DecodeError("not_an_object", f"array item is a JSON {_kind(item)}, expected an object")
            out.append(one(item, text_key, now_ms, limits))
        except DecodeError as exc:
            exc.item = item  # the dead letter carries the item, not the whole array
            out.append(exc)
    return out


def _unreadable(value: bytes | None, limits: CodecLimits) -> DecodeError:
    if value is None:
        return DecodeError("null_value", "record has no value")
    return DecodeError("too_large", f"message is {len(value)} bytes (limit {limits.max_message_bytes})")


def _json_error(exc: orjson.JSONDecodeError) -> DecodeError:
    # orjson refuses NaN/Infinity literals, and numbers that overflow a double with "number is infinity ..."
    return DecodeError("not_finite" if "infinity" in str(exc) else "malformed_json", str(exc)[:200])


def _not_splittable(doc: Any, limits: CodecLimits) -> DecodeError:
    if type(doc) is not list:
        return DecodeError("not_an_object", f"message is a JSON {_kind(doc)}, expected an object or an array")
    if not doc:
        return DecodeError("empty_batch", "message is an empty array")
    return DecodeError("batch_too_large", f"array of {len(doc)} items (limit {limits.max_batch_items})")


def decode_positions(key: bytes | None, value: bytes | None, *, now_ms: int,
                     limits: CodecLimits = DEFAULT_LIMITS) -> list[Position | DecodeError]:
    """One entry per fix: a message with one object gives one entry, an array one per item, in order."""
    return _decode(key, value, now_ms, limits, position_from_dict)


def decode_rfid(key: bytes | None, value: bytes | None, *, now_ms: int,
                limits: CodecLimits = DEFAULT_LIMITS) -> list[RfidRead | DecodeError]:
    """RFID reads keyed by tag_id; one object or an array of them."""
    return _decode(key, value, now_ms, limits, rfid_from_dict)


def decode_telemetry(key: bytes | None, value: bytes | None, *, now_ms: int,
                     limits: CodecLimits = DEFAULT_LIMITS) -> list[Telemetry | DecodeError]:
    """Telemetry readings keyed by device_id: ``{device_id, ts, metrics: {name: number}}``, or an array."""
    return _decode(key, value, now_ms, limits, telemetry_from_dict)


def decode_reader(key: bytes | None, value: bytes | None, *,
                  limits: CodecLimits = DEFAULT_LIMITS) -> dict[str, Any] | DecodeError:
    """A ``fleet.readers`` value -> ``{reader_id, lat, lon, zone_id, vehicle_id, name, role}`` (absent ones None).

    A null value is a tombstone (delete the reader): callers test ``value is None`` first; here it is ``null_value``.
    """
    if value is None or len(value) > limits.max_message_bytes:
        return _unreadable(value, limits)
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        return _json_error(exc)
    if type(doc) is not dict:
        return DecodeError("not_an_object", f"a reader message is one JSON object, got {_kind(doc)}")
    text_key = key.decode("utf-8", "surrogateescape") if key is not None else None
    try:
        return _fields(doc, READER, text_key, 0, limits)
    except DecodeError as exc:
        return exc


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
                      raw: bytes | None, error: DecodeError, now_ms: int,
                      limits: CodecLimits = DEFAULT_LIMITS) -> bytes:
    """The ``fleet.deadletter`` value (schemas/deadletter.json). For a bad item of an array, ``raw`` is that item."""
    text = None
    if error.item is not None:  # (a null item gets the whole message)
        try:
            text = orjson.dumps(error.item).decode()
        except orjson.JSONEncodeError:  # cannot happen for parsed JSON; keep the bytes then
            text = None
    if text is None and raw is not None:
        text = _text(raw, limits)
    return dumps({
        "source_topic": source_topic,
        "partition": partition,
        "offset": offset,
        "index": index,
        "key": None if key is None else _text(key, limits),
        "error": {"reason": error.reason, "detail": error.detail},
        "raw": text[: limits.max_raw_chars] if text is not None else None,
        "ts": format_ts(now_ms),
    })


def _text(data: bytes, limits: CodecLimits) -> str:
    """Bytes as UTF-8 (invalid bytes replaced), at most ``max_raw_chars`` characters."""
    return data[: limits.max_raw_chars * 4].decode("utf-8", "replace")[: limits.max_raw_chars]


@cache
def _validator(name: str) -> Any:
    import fastjsonschema  # only tests and tools validate outputs; the worker does not pay the import

    def local(uri: str) -> dict[str, Any]:  # resolve $ref to our own $ids from disk, never over the network
        if not uri.startswith(SCHEMA_BASE_URI):
            raise ValueError(f"unknown schema reference {uri}")
        return load_schema(uri.removeprefix(SCHEMA_BASE_URI).removesuffix(".json"))

    return fastjsonschema.compile(load_schema(name), handlers={"https": local})


def validate_output(schema_name: str, obj: Any) -> None:
    """Check a message against ``schemas/<schema_name>.json`` (tests hold the worker's outputs to the contract)."""
    import fastjsonschema

    try:
        _validator(schema_name)(obj)
    except fastjsonschema.JsonSchemaException as exc:
        raise DecodeError("schema", f"{schema_name}: {exc.message}") from None
