"""Alert rule definitions: parsed from YAML/JSON (a ``--rules`` file) or one JSON value per rule (the compacted
rules topic, keyed by rule id), validated up front, and resolved per device.

A bad rule is refused with :class:`RuleError` naming the rule and the problem, so nothing half-valid reaches
the engine. Rules are plain immutable data; :mod:`fleetstream.domain.alerts` compiles them into state machines.
The file format is described in ``docs/RULES.md``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import operator
import re
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml


class RuleError(ValueError):
    """A rule (or rules file) that cannot be used; the message names the rule and the problem."""


class RuleKind(StrEnum):
    THRESHOLD = "threshold"
    RATE_OF_CHANGE = "rate_of_change"
    OVERSPEED = "overspeed"
    IDLE = "idle"
    KEEP_INSIDE = "keep_inside"
    KEEP_OUT = "keep_out"
    TIME_WINDOW = "time_window"
    OFFLINE = "offline"
    MAINTENANCE = "maintenance"
    PREDICTIVE = "predictive"


class Severity(StrEnum):
    CRITICAL = "critical"
    MAJOR = "major"
    MINOR = "minor"
    WARNING = "warning"
    INFO = "info"


# Fields a position fix carries (fleet.positions.enriched); any other metric name is read from telemetry.
POSITION_FIELDS = frozenset(
    {"lat", "lon", "speed_kmh", "heading_deg", "accuracy_m", "altitude_m", "odometer_m", "distance_m"}
)
OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
}
MAX_ID_LEN = 128
DEFAULT_SEVERITY = Severity.WARNING
NEVER_MS = 2**62  # "no deadline" for schedules that never change
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_THRESHOLD_WHEN = re.compile(
    rf"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|!=|>|<)\s*({_NUMBER})\s*(?:\s+for\s+(\S+))?\s*$"
)
_RATE_WHEN = re.compile(
    rf"^\s*([A-Za-z_][\w.]*)\s+(drops|rises)\s*(>=|>)\s*({_NUMBER})\s+within\s+(\S+)(?:\s+while\s+(\w+))?\s*$"
)
_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


def parse_duration_ms(value: Any, what: str = "duration") -> int:
    """``"10m"``, ``"30s"``, ``"2h"``, ``"1h30m"``, ``"500ms"``, ``"1d"`` or a number of seconds -> milliseconds."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a duration like 30s, 10m, 2h or a number of seconds, got {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{what}: must be a non-negative number of seconds, got {value!r}")
        return round(value * 1000)
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        parts = _DURATION_PART.findall(text)
        if text and "".join(number + unit for number, unit in parts) == text:
            return round(sum(float(number) * _UNIT_MS[unit] for number, unit in parts))
        try:
            return parse_duration_ms(float(text), what)
        except ValueError:
            pass
    raise ValueError(f"{what}: bad duration {value!r} (use e.g. 30s, 10m, 2h, 1d, 1h30m or a number of seconds)")


class Schedule:
    """When something applies: daily local-time windows (``"22:00-06:00"`` runs past midnight), optionally only on
    some weekdays (the day a window starts), in an IANA timezone (DST handled by zoneinfo).

    ``active_at`` and ``next_change_ms`` can run per fix: the boundaries of an 11-day span are computed once and
    bisected, so the zoneinfo arithmetic (tens of µs) happens only when a time falls outside the span.
    """

    __slots__ = ("_always", "_span", "_zone", "days", "timezone", "windows")

    def __init__(self, timezone: str, windows: Sequence[tuple[int, int]], days: Iterable[int] | None = None):
        self.timezone = timezone
        self._zone = ZoneInfo(timezone)
        self.windows = tuple(windows)
        self.days = frozenset(days) if days is not None else None
        minutes = set()
        for start, end in self.windows:
            minutes.update(range(start, end) if end > start else (*range(start, 1440), *range(end)))
        self._always = self.days in (None, frozenset(range(7))) and len(minutes) == 1440
        # (span start, span end, boundaries): inside the span, active iff an odd number of boundaries are <= ts
        self._span: tuple[int, int, list[int]] = (0, 0, [])

    def active_at(self, ts_ms: int) -> bool:
        if self._always:
            return True
        start, end, bounds = self._span
        if not start <= ts_ms < end:
            start, end, bounds = self._span = self._compute(ts_ms)
        return bisect_right(bounds, ts_ms) % 2 == 1

    def next_change_ms(self, ts_ms: int) -> int:
        """The first time after ``ts_ms`` at which ``active_at`` changes (strictly later)."""
        start, end, bounds = self._span
        if not start <= ts_ms < end:
            start, end, bounds = self._span = self._compute(ts_ms)
        if self._always:
            return NEVER_MS
        for _ in range(3):  # windows recur at least weekly, so the next span has a change
            i = bisect_right(bounds, ts_ms)
            if i < len(bounds) and bounds[i] < end:  # a boundary at or past the span's end may be an artefact
                return bounds[i]
            ts_ms = end - 1
            start, end, bounds = self._span = self._compute(ts_ms)
        return end

    def describe(self) -> str:
        """E.g. ``22:00-06:00 mon,tue Europe/London`` (for alert details)."""
        days = "" if self.days is None else " " + ",".join(_DAYS[d] for d in sorted(self.days))
        return f"{','.join(self._spans())}{days} {self.timezone}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"timezone": self.timezone, "windows": self._spans()}
        if self.days is not None:
            out["days"] = [_DAYS[d] for d in sorted(self.days)]
        return out

    def __repr__(self) -> str:
        return f"Schedule({self.describe()!r})"

    def _spans(self) -> list[str]:
        return [f"{s // 60:02d}:{s % 60:02d}-{e // 60:02d}:{e % 60:02d}" for s, e in self.windows]

    def _compute(self, ts_ms: int) -> tuple[int, int, list[int]]:
        """Boundaries (start, end, start, end ...) of the merged windows of the local days around ``ts_ms``; the
        span returned is where they are complete (a window starting the day before the first is included)."""
        first = datetime.fromtimestamp(ts_ms / 1000, self._zone).date() - timedelta(days=2)
        intervals = sorted(
            (self._utc_ms(day, start), self._utc_ms(day if end > start else day + timedelta(days=1), end))
            for day in (first + timedelta(days=i) for i in range(12))
            if self.days is None or day.weekday() in self.days
            for start, end in self.windows
        )
        span_start, span_end = self._utc_ms(first + timedelta(days=1), 0), self._utc_ms(first + timedelta(days=12), 0)
        bounds: list[int] = []
        for lo, hi in intervals:
            if hi <= lo:  # the whole window falls in a skipped hour (spring forward): it does not happen that day
                continue
            if bounds and lo <= bounds[-1]:
                bounds[-1] = max(bounds[-1], hi)
            else:
                bounds += [lo, hi]
        return span_start, span_end, bounds

    def _utc_ms(self, day: date, minute: int) -> int:
        if minute >= 1440:
            day, minute = day + timedelta(days=1), minute - 1440
        local = datetime.combine(day, time(minute // 60, minute % 60), tzinfo=self._zone)
        utc_ms = round(local.timestamp() * 1000)
        wall = datetime.fromtimestamp(utc_ms / 1000, self._zone).replace(tzinfo=None)
        if wall == local.replace(tzinfo=None):
            return utc_ms
        # A local time the clocks skip (spring forward): wall time first reaches it when the clocks change. Find
        # that instant between the two readings of the skipped time (a minute at a time, by bisection).
        lo = round(local.replace(fold=1).timestamp() * 1000)
        hi = utc_ms
        lo, hi = min(lo, hi), max(lo, hi)
        target = local.replace(tzinfo=None)
        while hi - lo > 60_000:
            mid = (lo + hi) // 2 // 60_000 * 60_000
            if mid <= lo:
                break
            if datetime.fromtimestamp(mid / 1000, self._zone).replace(tzinfo=None) >= target:
                hi = mid
            else:
                lo = mid
        return hi


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)  # identity hash: cheap as a key of compiled plans
class Rule:
    """What every rule has. ``devices`` are ids or glob patterns; ``groups`` name entries of the file's
    ``groups`` map; neither means every device."""

    id: str
    kind: RuleKind
    severity: Severity = DEFAULT_SEVERITY
    devices: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    description: str = ""
    definition: Mapping[str, Any] = field(default_factory=dict, repr=False)  # as written, for republishing

    def to_dict(self) -> dict[str, Any]:
        """The rule as a JSON object (what goes on the rules topic); ``parse_rule`` reads it back."""
        return dict(self.definition)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class ThresholdRule(Rule):
    """``metric op value`` held for ``for_ms``; cleared once the clear condition holds for ``clear_for_ms``.
    Hysteresis: with ``clear_below`` (for > / >=) or ``clear_above`` (for < / <=) the alert clears only past
    that level, otherwise as soon as the condition is false."""

    metric: str
    op: str
    value: float
    for_ms: int = 0
    clear_below: float | None = None
    clear_above: float | None = None
    clear_for_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class RateRule(Rule):
    """``metric drops|rises > by within window [while motion]``: the change from the window's extreme to the
    latest sample. Clears when the window no longer shows such a change."""

    metric: str
    direction: str  # drops | rises
    by: float
    within_ms: int
    inclusive: bool = False  # >= rather than >
    while_motion: str | None = None  # stopped | moving


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class OverspeedRule(Rule):
    """Speed above the limit in force (the smallest ``speed_limit_kmh`` among the geofences containing the fix
    when ``geofence_limits``, else ``limit_kmh``) plus ``tolerance_kmh``, for at least ``for_ms``."""

    limit_kmh: float | None = None
    geofence_limits: bool = True
    tolerance_kmh: float = 0.0
    for_ms: int = 0
    clear_for_ms: int = 0


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class IdleRule(Rule):
    """Engine on while stationary (speed <= ``max_speed_kmh``) for longer than ``for_ms``. Engine on: the
    ignition metric is non-zero, or the engine metric (rpm) is above ``engine_min``."""

    for_ms: int
    max_speed_kmh: float = 2.0
    ignition_metric: str = "ignition"
    engine_metric: str = "rpm"
    engine_min: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class GeofenceRule(Rule):
    """keep_inside / keep_out / time_window on named geofences. ``schedule`` limits when the rule is in force;
    for time_window, ``schedule`` is the *allowed* presence and being inside outside it is the violation."""

    geofences: tuple[str, ...]  # sorted, distinct
    schedule: Schedule | None = None


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class OfflineRule(Rule):
    """No message (position or telemetry) from the device for ``after_ms``."""

    after_ms: int


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class MaintenanceRule(Rule):
    """A counter (odometer_m, engine_hours) passing its next service point; a non-zero ``reset_metric`` in the
    device's telemetry marks the service done and clears the alert."""

    metric: str
    every: float
    reset_metric: str = "service_reset"


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class PredictiveRule(Rule):
    """Least-squares line through ``metric`` over the last ``window_ms``; raised when it is forecast to cross
    ``threshold`` (going ``op``) within ``horizon_ms``, cleared when no longer forecast within ``clear_horizon_ms``."""

    metric: str
    op: str  # < (falling through) or > (rising through)
    threshold: float
    window_ms: int
    horizon_ms: int
    clear_horizon_ms: int
    min_samples: int = 10
    buckets: int = 24


_COMMON = ("id", "kind", "severity", "devices", "groups", "description")
_FIELDS: dict[RuleKind, tuple[str, ...]] = {
    RuleKind.THRESHOLD: ("when", "metric", "op", "value", "for", "clear_below", "clear_above", "clear_for"),
    RuleKind.RATE_OF_CHANGE: ("when", "metric", "direction", "op", "by", "within", "while"),
    RuleKind.OVERSPEED: ("limit_kmh", "geofence_limits", "tolerance_kmh", "for", "clear_for"),
    RuleKind.IDLE: ("for", "max_speed_kmh", "ignition_metric", "engine_metric", "engine_min"),
    RuleKind.KEEP_INSIDE: ("geofences", "schedule"),
    RuleKind.KEEP_OUT: ("geofences", "schedule"),
    RuleKind.TIME_WINDOW: ("geofences", "allowed"),
    RuleKind.OFFLINE: ("after",),
    RuleKind.MAINTENANCE: ("metric", "every", "every_km", "every_hours", "reset_metric"),
    RuleKind.PREDICTIVE: ("metric", "op", "threshold", "window", "horizon", "clear_horizon", "min_samples",
                          "buckets"),
}


class _Reader:
    """Typed access to one raw rule, every failure a RuleError naming the rule."""

    def __init__(self, rule_id: str, raw: Mapping[str, Any]):
        self.rule_id = rule_id
        self.raw = raw

    def fail(self, problem: str) -> RuleError:
        return RuleError(f"rule {self.rule_id!r}: {problem}")

    def has(self, name: str) -> bool:
        return self.raw.get(name) is not None

    def text(self, name: str, default: str | None = None, *, required: bool = False) -> str:
        value = self.raw.get(name)
        if value is None:
            if required:
                raise self.fail(f"missing field {name!r}")
            return default  # type: ignore[return-value]
        if not isinstance(value, str) or not value.strip():
            raise self.fail(f"{name} must be a non-empty string, got {value!r}")
        return value.strip()

    def number(self, name: str, default: float | None = None, *, required: bool = False,
               positive: bool = False, non_negative: bool = False) -> float:
        value = self.raw.get(name)
        if value is None:
            if required:
                raise self.fail(f"missing field {name!r}")
            return default  # type: ignore[return-value]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail(f"{name} must be a number, got {value!r}")
        if positive and value <= 0:
            raise self.fail(f"{name} must be positive, got {value!r}")
        if non_negative and value < 0:
            raise self.fail(f"{name} must not be negative, got {value!r}")
        return float(value)

    def duration(self, name: str, default: int | None = None, *, required: bool = False,
                 positive: bool = False) -> int:
        value = self.raw.get(name)
        if value is None:
            if required:
                raise self.fail(f"missing field {name!r}")
            return default  # type: ignore[return-value]
        return self.duration_of(name, value, positive=positive)

    def duration_of(self, name: str, value: Any, *, positive: bool = False) -> int:
        try:
            ms = parse_duration_ms(value, name)
        except ValueError as exc:
            raise self.fail(str(exc)) from None
        if positive and ms <= 0:
            raise self.fail(f"{name} must be longer than zero, got {value!r}")
        return ms

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.fail(f"{name} must be true or false, got {value!r}")
        return value

    def op(self, value: Any, allowed: Iterable[str] = OPERATORS) -> str:
        allowed = tuple(allowed)
        if value is None:
            raise self.fail("missing field 'op'")
        if value not in allowed:
            raise self.fail(f"unknown operator {value!r} (one of {', '.join(allowed)}; quote it in YAML)")
        return str(value)

    def metric(self, value: Any, name: str = "metric") -> str:
        if value is None:
            raise self.fail(f"missing field {name!r}")
        if not isinstance(value, str) or not value or len(value) > 64:
            raise self.fail(f"{name} must be a metric name of 1 to 64 characters, got {value!r}")
        return value

    def strings(self, name: str) -> tuple[str, ...]:
        value = self.raw.get(name)
        if value is None:
            return ()
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(f"{name} must be a list of non-empty strings (quote ids that look like numbers), "
                            f"got {value!r}")
        return tuple(value)


def parse_rule(raw: Any, rule_id: str | None = None) -> Rule:
    """One rule definition (a mapping) -> Rule, or RuleError naming the rule and the problem.

    ``rule_id`` is the rules-topic key: it names the rule when the value has no ``id`` and must match it if it has.
    """
    if not isinstance(raw, Mapping):
        raise RuleError(f"rule {rule_id or '?'!r}: expected an object, got {type(raw).__name__}")
    raw_id = raw.get("id", rule_id)
    if not isinstance(raw_id, str) or not raw_id.strip():
        raise RuleError(f"rule {rule_id or '?'!r}: needs a non-empty string 'id', got {raw_id!r}")
    if len(raw_id) > MAX_ID_LEN:
        raise RuleError(f"rule {raw_id[:40]!r}...: id longer than {MAX_ID_LEN} characters")
    if rule_id is not None and raw_id != rule_id:
        raise RuleError(f"rule {rule_id!r}: its id field says {raw_id!r}")
    r = _Reader(raw_id, raw)
    kind_text = raw.get("kind")
    if kind_text is None:
        raise r.fail("missing field 'kind'")
    try:
        kind = RuleKind(kind_text)
    except ValueError:
        raise r.fail(f"unknown kind {kind_text!r} (one of {', '.join(k.value for k in RuleKind)})") from None
    unknown = sorted(set(raw) - set(_COMMON) - set(_FIELDS[kind]), key=str)
    if unknown:
        raise r.fail(f"unknown field(s) {', '.join(map(repr, unknown))} for kind {kind.value}")
    severity_text = raw.get("severity", DEFAULT_SEVERITY.value)
    try:
        severity = Severity(severity_text)
    except ValueError:
        raise r.fail(f"bad severity {severity_text!r} (one of {', '.join(s.value for s in Severity)})") from None
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise r.fail("description must be a string")
    common: dict[str, Any] = {
        "id": raw_id, "kind": kind, "severity": severity, "devices": r.strings("devices"),
        "groups": r.strings("groups"), "description": description, "definition": dict(raw, id=raw_id),
    }
    return _PARSERS[kind](r, common)


def _threshold(r: _Reader, common: dict[str, Any]) -> Rule:
    raw = r.raw
    if r.has("when"):
        clash = [name for name in ("metric", "op", "value", "for") if r.has(name)]
        if clash:
            raise r.fail(f"give either 'when' or {', '.join(clash)}, not both")
        when = raw["when"]
        match = _THRESHOLD_WHEN.match(when) if isinstance(when, str) else None
        if match is None:
            raise r.fail(f"cannot read when: {when!r} (expected e.g. 'temperature_c > 8 for 10m')")
        metric, op, value_text, for_text = match.groups()
        value = float(value_text)
        for_ms = r.duration_of("for", for_text) if for_text else 0
    else:
        metric = r.metric(raw.get("metric"))
        op = r.op(raw.get("op"))
        value = r.number("value", required=True)
        for_ms = r.duration("for", 0)
    clear_below = r.number("clear_below")
    clear_above = r.number("clear_above")
    if clear_below is not None:
        if op not in (">", ">="):
            raise r.fail(f"clear_below goes with > or >=, not {op}")
        if clear_below > value:
            raise r.fail(f"clear_below {clear_below:g} must not be above the threshold {value:g}")
    if clear_above is not None:
        if op not in ("<", "<="):
            raise r.fail(f"clear_above goes with < or <=, not {op}")
        if clear_above < value:
            raise r.fail(f"clear_above {clear_above:g} must not be below the threshold {value:g}")
    return ThresholdRule(**common, metric=metric, op=op, value=value, for_ms=for_ms, clear_below=clear_below,
                         clear_above=clear_above, clear_for_ms=r.duration("clear_for", 0))


def _rate(r: _Reader, common: dict[str, Any]) -> Rule:
    raw = r.raw
    if r.has("when"):
        clash = [name for name in ("metric", "direction", "op", "by", "within", "while") if r.has(name)]
        if clash:
            raise r.fail(f"give either 'when' or {', '.join(clash)}, not both")
        when = raw["when"]
        match = _RATE_WHEN.match(when) if isinstance(when, str) else None
        if match is None:
            raise r.fail(f"cannot read when: {when!r} (expected e.g. 'fuel_pct drops > 15 within 5m while stopped')")
        metric, direction, op, by_text, within_text, while_motion = match.groups()
        by = float(by_text)
        within_ms = r.duration_of("within", within_text, positive=True)
    else:
        metric = r.metric(raw.get("metric"))
        direction = raw.get("direction")
        if direction is None:
            raise r.fail("missing field 'direction'")
        op = r.op(raw.get("op", ">"), (">", ">="))
        by = r.number("by", required=True)
        within_ms = r.duration("within", required=True, positive=True)
        while_motion = raw.get("while")
    if direction not in ("drops", "rises"):
        raise r.fail(f"direction must be drops or rises, got {direction!r}")
    if by <= 0:
        raise r.fail(f"by must be positive, got {by:g}")
    if while_motion is not None and while_motion not in ("stopped", "moving"):
        raise r.fail(f"while must be stopped or moving, got {while_motion!r}")
    return RateRule(**common, metric=metric, direction=direction, by=by, within_ms=within_ms, inclusive=op == ">=",
                    while_motion=while_motion)


def _overspeed(r: _Reader, common: dict[str, Any]) -> Rule:
    limit = r.number("limit_kmh", positive=True)
    geofence_limits = r.boolean("geofence_limits", True)
    if limit is None and not geofence_limits:
        raise r.fail("needs limit_kmh, or geofence_limits: true (geofences' speed_limit_kmh)")
    return OverspeedRule(**common, limit_kmh=limit, geofence_limits=geofence_limits,
                         tolerance_kmh=r.number("tolerance_kmh", 0.0, non_negative=True),
                         for_ms=r.duration("for", 0), clear_for_ms=r.duration("clear_for", 0))


def _idle(r: _Reader, common: dict[str, Any]) -> Rule:
    return IdleRule(**common, for_ms=r.duration("for", required=True, positive=True),
                    max_speed_kmh=r.number("max_speed_kmh", 2.0, non_negative=True),
                    ignition_metric=r.metric(r.raw.get("ignition_metric", "ignition"), "ignition_metric"),
                    engine_metric=r.metric(r.raw.get("engine_metric", "rpm"), "engine_metric"),
                    engine_min=r.number("engine_min", 0.0))


def _geofence(r: _Reader, common: dict[str, Any]) -> Rule:
    fences = r.strings("geofences")
    if not fences:
        raise r.fail("missing field 'geofences' (the geofence ids the rule is about)")
    if common["kind"] is RuleKind.TIME_WINDOW:
        if not r.has("allowed"):
            raise r.fail("missing field 'allowed' (when presence inside is allowed)")
        schedule = parse_schedule(r.raw["allowed"], r.rule_id, "allowed")
    else:
        schedule = parse_schedule(r.raw["schedule"], r.rule_id, "schedule") if r.has("schedule") else None
    return GeofenceRule(**common, geofences=tuple(sorted(set(fences))), schedule=schedule)


def _offline(r: _Reader, common: dict[str, Any]) -> Rule:
    return OfflineRule(**common, after_ms=r.duration("after", required=True, positive=True))


def _maintenance(r: _Reader, common: dict[str, Any]) -> Rule:
    given = [name for name in ("every", "every_km", "every_hours") if r.has(name)]
    if len(given) != 1:
        raise r.fail("give exactly one of every (with metric), every_km or every_hours")
    if given[0] == "every_km":
        if r.has("metric"):
            raise r.fail("every_km reads odometer_m; drop metric or use every")
        metric, every = "odometer_m", r.number("every_km", positive=True) * 1000.0
    elif given[0] == "every_hours":
        metric = r.metric(r.raw.get("metric", "engine_hours"))
        every = r.number("every_hours", positive=True)
    else:
        metric, every = r.metric(r.raw.get("metric")), r.number("every", positive=True)
    reset = r.metric(r.raw.get("reset_metric", "service_reset"), "reset_metric")
    if reset == metric:
        raise r.fail("reset_metric must differ from metric")
    return MaintenanceRule(**common, metric=metric, every=every, reset_metric=reset)


def _predictive(r: _Reader, common: dict[str, Any]) -> Rule:
    horizon_ms = r.duration("horizon", required=True, positive=True)
    clear_horizon_ms = r.duration("clear_horizon", horizon_ms, positive=True)
    if clear_horizon_ms < horizon_ms:
        raise r.fail("clear_horizon must not be shorter than horizon")
    min_samples = r.number("min_samples", 10)
    buckets = r.number("buckets", 24)
    if min_samples != int(min_samples) or min_samples < 3:
        raise r.fail(f"min_samples must be a whole number >= 3, got {min_samples:g}")
    if buckets != int(buckets) or not 2 <= buckets <= 1000:
        raise r.fail(f"buckets must be a whole number from 2 to 1000, got {buckets:g}")
    window_ms = r.duration("window", required=True, positive=True)
    if window_ms < buckets:
        raise r.fail("window is too short for its buckets")
    return PredictiveRule(**common, metric=r.metric(r.raw.get("metric")), op=r.op(r.raw.get("op"), ("<", ">")),
                          threshold=r.number("threshold", required=True), window_ms=window_ms,
                          horizon_ms=horizon_ms, clear_horizon_ms=clear_horizon_ms, min_samples=int(min_samples),
                          buckets=int(buckets))


_PARSERS: dict[RuleKind, Callable[[_Reader, dict[str, Any]], Rule]] = {
    RuleKind.THRESHOLD: _threshold, RuleKind.RATE_OF_CHANGE: _rate, RuleKind.OVERSPEED: _overspeed,
    RuleKind.IDLE: _idle, RuleKind.KEEP_INSIDE: _geofence, RuleKind.KEEP_OUT: _geofence,
    RuleKind.TIME_WINDOW: _geofence, RuleKind.OFFLINE: _offline, RuleKind.MAINTENANCE: _maintenance,
    RuleKind.PREDICTIVE: _predictive,
}


def parse_schedule(raw: Any, rule_id: str, name: str = "schedule") -> Schedule:
    """``{timezone, windows: ["06:00-22:00"], days: [mon, ...]}`` -> Schedule, or RuleError."""

    def fail(problem: str) -> RuleError:
        return RuleError(f"rule {rule_id!r}: {name}: {problem}")

    if not isinstance(raw, Mapping):
        raise fail("expected an object with timezone, windows and optionally days")
    unknown = sorted(set(raw) - {"timezone", "windows", "days"}, key=str)
    if unknown:
        raise fail(f"unknown field(s) {', '.join(map(repr, unknown))}")
    timezone = raw.get("timezone", "UTC")
    if not isinstance(timezone, str):
        raise fail(f"timezone must be an IANA name such as Europe/London, got {timezone!r}")
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise fail(f"unknown timezone {timezone!r}") from None
    windows_raw = raw.get("windows")
    if isinstance(windows_raw, str):
        windows_raw = [windows_raw]
    if not isinstance(windows_raw, list) or not windows_raw:
        raise fail("windows must be a non-empty list like ['06:00-22:00'] (quote times in YAML)")
    windows = []
    for window in windows_raw:
        match = _WINDOW.match(window) if isinstance(window, str) else None
        if match is None:
            raise fail(f"bad window {window!r} (expected 'HH:MM-HH:MM', e.g. '22:00-06:00')")
        h1, m1, h2, m2 = map(int, match.groups())
        if h1 > 23 or m1 > 59 or m2 > 59 or h2 > 24 or (h2 == 24 and m2):
            raise fail(f"bad time in window {window!r}")
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if start == end:
            raise fail(f"window {window!r} is empty (use '00:00-24:00' for all day)")
        windows.append((start, end))
    days = None
    if raw.get("days") is not None:
        days_raw = raw["days"]
        if not isinstance(days_raw, list) or not days_raw:
            raise fail("days must be a non-empty list of mon, tue, wed, thu, fri, sat, sun")
        days = []
        for day in days_raw:
            if not isinstance(day, str) or day.lower()[:3] not in _DAYS:
                raise fail(f"bad day {day!r} (mon, tue, wed, thu, fri, sat, sun)")
            days.append(_DAYS.index(day.lower()[:3]))
    return Schedule(timezone, windows, days)


class _Target:
    """Which devices a rule applies to: exact ids and compiled globs, from its devices and groups."""

    __slots__ = ("everyone", "ids", "pattern")

    def __init__(self, patterns: Iterable[str], everyone: bool):
        patterns = list(patterns)
        self.everyone = everyone
        self.ids = frozenset(p for p in patterns if not _is_glob(p))
        globs = [fnmatch.translate(p) for p in patterns if _is_glob(p)]
        self.pattern = re.compile("|".join(globs)).match if globs else None

    def matches(self, device_id: str) -> bool:
        return self.everyone or device_id in self.ids or (self.pattern is not None and self.pattern(device_id)
                                                          is not None)


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


class RuleSet:
    """An immutable, validated set of rules plus device groups; answers "which rules apply to this device"
    from a per-device cache (a new RuleSet is built and swapped in when rules change)."""

    MAX_CACHED_DEVICES = 1_000_000

    def __init__(self, rules: Iterable[Rule] = (), groups: Mapping[str, Sequence[str]] | None = None):
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.groups: dict[str, tuple[str, ...]] = _check_groups(groups or {})
        by_id: dict[str, Rule] = {}
        for rule in self.rules:
            if rule.id in by_id:
                raise RuleError(f"rule {rule.id!r}: id appears twice")
            missing = [g for g in rule.groups if g not in self.groups]
            if missing:
                raise RuleError(f"rule {rule.id!r}: unknown group(s) {', '.join(map(repr, missing))}")
            by_id[rule.id] = rule
        self._by_id = by_id
        self._targets = tuple(
            (rule, _Target(self._patterns(rule), not rule.devices and not rule.groups)) for rule in self.rules
        )
        self._for_device: dict[str, tuple[Rule, ...]] = {}
        self._interned: dict[tuple[Rule, ...], tuple[Rule, ...]] = {}
        # changes whenever any rule or group does; reprs are deterministic (tuples, no sets), so a restart with
        # the same rules gives the same key
        canonical = repr((self.rules, sorted(self.groups.items())))
        self.key = hashlib.sha1(canonical.encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def get(self, rule_id: str) -> Rule | None:
        return self._by_id.get(rule_id)

    def group_matcher(self, group: str) -> Callable[[str], bool]:
        """Whether a device id belongs to a group (its ids and id patterns); KeyError for an unknown group."""
        return _Target(self.groups[group], everyone=False).matches

    def rules_for(self, device_id: str) -> tuple[Rule, ...]:
        """The rules that apply to a device, in file order. Equal answers are the same tuple object."""
        found = self._for_device.get(device_id)
        if found is None:
            matched = tuple(rule for rule, target in self._targets if target.matches(device_id))
            found = self._interned.setdefault(matched, matched)
            if len(self._for_device) >= self.MAX_CACHED_DEVICES:
                self._for_device.clear()
            self._for_device[device_id] = found
        return found

    def with_rule(self, rule: Rule) -> RuleSet:
        """A new set with this rule added or replacing the rule of the same id (a rules-topic record)."""
        replaced = [rule if r.id == rule.id else r for r in self.rules]
        if rule.id not in self._by_id:
            replaced.append(rule)
        return RuleSet(replaced, self.groups)

    def without_rule(self, rule_id: str) -> RuleSet:
        """A new set without this rule (a rules-topic tombstone)."""
        return RuleSet([r for r in self.rules if r.id != rule_id], self.groups)

    def to_records(self) -> list[tuple[str, dict[str, Any]]]:
        """(rule id, JSON value) per rule for the compacted rules topic. Groups are written into each rule's
        ``devices`` so that every record stands alone; ``parse_rule`` reads them back."""
        records = []
        for rule in self.rules:
            value = rule.to_dict()
            if rule.groups:
                value.pop("groups", None)
                value["devices"] = list(dict.fromkeys(self._patterns(rule)))
            records.append((rule.id, value))
        return records

    def _patterns(self, rule: Rule) -> list[str]:
        return [*rule.devices, *(p for g in rule.groups for p in self.groups[g])]


def _check_groups(groups: Any) -> dict[str, tuple[str, ...]]:
    if not isinstance(groups, Mapping):
        raise RuleError("groups must be a map of group name -> list of device ids or patterns")
    out = {}
    for name, members in groups.items():
        if not isinstance(name, str) or not name:
            raise RuleError(f"group {name!r}: name must be a non-empty string")
        if isinstance(members, str):
            members = [members]
        if not isinstance(members, list | tuple) or not all(isinstance(m, str) and m for m in members):
            raise RuleError(f"group {name!r}: expected a list of device ids or glob patterns (quote ids that look "
                            f"like numbers), got {members!r}")
        out[name] = tuple(members)
    return out


def parse_rules(document: Any, where: str = "") -> RuleSet:
    """A parsed rules document -> RuleSet. Accepts ``{groups?, rules: [..]}``, ``{groups?, rules: {id: {..}}}``
    or a bare list of rules."""
    prefix = f"{where}: " if where else ""
    if document is None:
        return RuleSet()
    if isinstance(document, list):
        document = {"rules": document}
    if not isinstance(document, Mapping):
        raise RuleError(f"{prefix}expected a map with 'rules' (and optionally 'groups'), got {type(document).__name__}")
    unknown = sorted(set(document) - {"rules", "groups"}, key=str)
    if unknown:
        raise RuleError(f"{prefix}unknown top-level key(s) {', '.join(map(repr, unknown))} (expected rules, groups)")
    raw_rules = document.get("rules") or []
    try:
        if isinstance(raw_rules, Mapping):
            rules = [parse_rule(body, rule_id=str(rule_id)) for rule_id, body in raw_rules.items()]
        elif isinstance(raw_rules, list):
            rules = [parse_rule(body) for body in raw_rules]
        else:
            raise RuleError("rules must be a list of rules or a map of rule id -> rule")
        return RuleSet(rules, document.get("groups"))
    except RuleError as exc:
        raise RuleError(f"{prefix}{exc}") from None


def load_rules(source: str | Path | Mapping[str, Any]) -> RuleSet:
    """Rules from a file path, a parsed document, or YAML/JSON text.

    A ``str`` is taken as text when it spans lines or starts with ``{`` or ``[``, otherwise as a path.
    ``.json`` files are read as JSON, anything else as YAML (which also reads JSON).
    """
    if isinstance(source, Mapping):
        return parse_rules(source)
    if isinstance(source, str) and ("\n" in source or source.lstrip()[:1] in ("{", "[")):
        return parse_rules(_load_text(source, json_only=False, where="rules text"), "rules text")
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RuleError(f"{path}: rules file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleError(f"{path}: cannot read rules file: {exc}") from None
    return parse_rules(_load_text(text, json_only=path.suffix.lower() == ".json", where=str(path)), str(path))


class _Yaml12Loader(yaml.SafeLoader):
    """YAML scalars as people read them (YAML 1.2 core schema): only true/false are booleans, so a rule called
    ``off`` or ``no`` keeps its name, and ``10:00`` or ``007`` stay strings instead of the YAML 1.1 numbers
    600 and 7 (PyYAML follows YAML 1.1)."""


_BOOL, _INT, _FLOAT = "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_BOOL, _INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(_INT, re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|0x[0-9a-fA-F_]+)$"),
                                    list("-+0123456789"))
_Yaml12Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)?\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _load_text(text: str, *, json_only: bool, where: str) -> Any:
    try:
        return json.loads(text) if json_only else yaml.load(text, Loader=_Yaml12Loader)  # a SafeLoader
    except json.JSONDecodeError as exc:
        raise RuleError(f"{where}: not valid JSON: {exc}") from None
    except yaml.YAMLError as exc:
        raise RuleError(f"{where}: not valid YAML: {exc}") from None
