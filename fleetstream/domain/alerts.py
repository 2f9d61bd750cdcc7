"""The alert engine: rules (:mod:`fleetstream.domain.rules`) compiled into per-rule state machines, advanced per
device by pure calls ``(state | None, input) -> (state, alerts)``.

Time model. Every alert time is an event time derived from the inputs, never the worker's clock, so a replay
gives the same alerts and the same ``alert_id`` (rule id + subject + raise time). A condition holds from a sample
until the next sample of the same input (sample and hold). Anything that comes due by time alone (a duration
met, an offline device, a schedule boundary, a window ageing out) fires at its *deadline*: from :meth:`tick`
when the worker's timer reaches it, or from the device's next input if that comes first (each input first fires
every deadline up to its own time). Either way the alert carries the deadline as its time, so output does not
depend on when timers happen to run.

Speed. Rules are indexed by the input they read (a fix never visits a telemetry-only rule; geofence rules run
only when the device's geofences change), per-device rule lists are cached, comparisons are precompiled
operator functions, and a rule whose condition is false and that has nothing pending keeps no state (with no
offline rule and nothing active, a device's state stays ``None``). Each device's state also carries, per position
field, the interval of values for which none of its rules would do anything (each rule's ``quiet`` interval for
its current state, intersected): a typical fix costs one comparison per field and calls no rule at all.

State. :class:`DeviceAlertState` is immutable (a new one is returned when anything changed, the same object
otherwise) and serialises to plain dicts and lists (``to_json`` / ``from_json``), so the worker can keep it in
the device's changelogged table value: a restart neither loses nor repeats a pending or active alert.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import StrEnum
from typing import Any, NamedTuple, Protocol

from fleetstream.domain.rules import (
    OPERATORS,
    POSITION_FIELDS,
    GeofenceRule,
    IdleRule,
    MaintenanceRule,
    OfflineRule,
    OverspeedRule,
    PredictiveRule,
    RateRule,
    Rule,
    RuleKind,
    RuleSet,
    Severity,
    ThresholdRule,
)

STATE_VERSION = 1
MAX_RATE_SAMPLES = 256  # per device and rate rule; beyond it the oldest sample is dropped


class AlertState(StrEnum):
    RAISED = "raised"
    CLEARED = "cleared"


_RAISED, _CLEARED = AlertState.RAISED, AlertState.CLEARED


def make_alert_id(rule_id: str, subject_id: str, raised_ms: int) -> str:
    """Stable across replays; a clear carries the id of the raise it ends."""
    return f"{rule_id}:{subject_id}:{raised_ms}"


class Alert(NamedTuple):
    """One ``fleet.alerts`` message (schemas/alert.json), with the time as epoch ms (the codec formats it)."""

    alert_id: str
    rule: str
    severity: Severity
    state: AlertState
    subject_id: str
    ts_ms: int
    details: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"alert_id": self.alert_id, "rule": self.rule, "severity": self.severity.value,
                "state": self.state.value, "subject_id": self.subject_id, "ts_ms": self.ts_ms,
                "details": self.details}


class FenceEventLike(Protocol):
    """What the engine reads from a geofence event (``transitions.GeofenceEvent`` qualifies)."""

    @property
    def type(self) -> str: ...
    @property
    def geofence_id(self) -> str: ...
    @property
    def ts_ms(self) -> int: ...


class FenceEvent(NamedTuple):
    """A minimal geofence event for callers without ``GeofenceEvent`` (tests, replays)."""

    type: str  # enter | exit (dwell and cross are ignored)
    geofence_id: str
    ts_ms: int
    reason: str | None = None  # "geofence_deleted" on the exit transitions emits for a deleted geofence


# --- per-rule states: NamedTuples in memory, [tag, *fields] in JSON ------------------------------------------

class CondState(NamedTuple):
    """threshold / overspeed: a condition run, its alert, and a pending clear."""

    on_since: int  # start of the current run of the condition
    raised_ms: int | None
    off_since: int | None  # while raised: start of the current run of the clear condition
    peak: float  # most extreme sample of the run (only it is kept, so samples inside the run change nothing)
    limit: float | None  # threshold in force at the latest sample (overspeed: None where no limit applies)
    where: str | None = None  # overspeed: the geofence whose speed limit applied


class IdleState(NamedTuple):
    stationary: bool
    ignition: bool
    engine: bool
    on_since: int | None  # idle since
    raised_ms: int | None


class RateState(NamedTuple):
    samples: tuple[tuple[int, float], ...]  # monotonic window: front = extreme, last = latest sample
    raised_ms: int | None


class GeoState(NamedTuple):
    members: tuple[str, ...]  # the rule's geofences the device is inside (from events), sorted
    known: bool  # has been inside one of them (keep_inside alerts only after that)
    raised_ms: int | None
    t_ms: int  # last evaluation (alert times never go back)
    trigger: str | None  # geofence that raised the active alert


class MaintState(NamedTuple):
    due_at: float | None  # counter value of the next service; None = set from the next reading (after a reset)
    raised_ms: int | None


class PredState(NamedTuple):
    buckets: tuple[tuple[int, int, float, float, float, float], ...]  # (index, n, Σu, Σv, Σu², Σuv)
    raised_ms: int | None
    last_ts: int


_STATE_TYPES: dict[str, type] = {"cond": CondState, "idle": IdleState, "rate": RateState, "geo": GeoState,
                                 "maint": MaintState, "pred": PredState}
_TAGS = {cls: tag for tag, cls in _STATE_TYPES.items()}


# states whose fields are all scalars: encoded without walking them (one per rule and device on every write)
_FLAT = frozenset({CondState, IdleState, MaintState})


def _encode_rule_state(rs: NamedTuple) -> list[Any]:
    cls = type(rs)
    if cls in _FLAT:
        return [_TAGS[cls], *rs]
    return [_TAGS[cls], *(_plain(v) for v in rs)]


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


def _decode_rule_state(raw: Sequence[Any]) -> NamedTuple:
    tag, fields = raw[0], list(raw[1:])
    cls = _STATE_TYPES[tag]
    if cls is RateState:
        fields[0] = tuple((int(t), float(v)) for t, v in fields[0])
    elif cls is GeoState:
        fields[0] = tuple(fields[0])
    elif cls is PredState:
        fields[0] = tuple((int(b[0]), int(b[1]), *map(float, b[2:])) for b in fields[0])
    return cls(*fields)


class DeviceAlertState(NamedTuple):
    """Everything the engine remembers about one device. Immutable; ``None`` when there is nothing to remember."""

    ruleset_key: str  # RuleSet.key it was built against (a different key triggers a reconcile)
    last_seen_ms: int | None  # newest input time, kept while an offline rule applies
    due_ms: int | None  # earliest deadline (rules and offline): when the worker should call tick
    rules_due_ms: int | None  # earliest deadline among the rule states
    rules: Mapping[str, NamedTuple] | None  # rule id -> that rule's state
    offline: Mapping[str, int] | None  # offline rule id -> raise time of its active alert
    motion: str | None  # latest motion, kept while a rule needs it for telemetry
    # derived, not serialised: per position field, the values for which no rule would do anything (see _watch)
    watch: Any = None

    def to_json(self) -> dict[str, Any]:
        """Plain dicts, lists, strings and numbers (orjson/json ready); ``from_json`` reads it back."""
        out: dict[str, Any] = {"v": STATE_VERSION, "key": self.ruleset_key}
        if self.last_seen_ms is not None:
            out["last_seen_ms"] = self.last_seen_ms
        if self.due_ms is not None:
            out["due_ms"] = self.due_ms
        if self.rules_due_ms is not None:
            out["rules_due_ms"] = self.rules_due_ms
        if self.rules:
            out["rules"] = {rule_id: _encode_rule_state(rs) for rule_id, rs in self.rules.items()}
        if self.offline:
            out["offline"] = dict(self.offline)
        if self.motion is not None:
            out["motion"] = str(self.motion)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceAlertState:  # type: ignore[misc]
        if data.get("v") != STATE_VERSION:
            raise ValueError(f"alert state version {data.get('v')!r} is not {STATE_VERSION}")
        rules = {rule_id: _decode_rule_state(raw) for rule_id, raw in (data.get("rules") or {}).items()}
        return cls(str(data["key"]), data.get("last_seen_ms"), data.get("due_ms"), data.get("rules_due_ms"),
                   rules or None, dict(data["offline"]) if data.get("offline") else None, data.get("motion"), None)

    @classmethod
    def coerce(cls, value: DeviceAlertState | Mapping[str, Any] | None) -> DeviceAlertState | None:
        """A state still in memory (returned as is), a stored one (decoded) or None."""
        if value is None or type(value) is cls:
            return value  # type: ignore[return-value]
        return cls.from_json(value)  # type: ignore[arg-type]


_new_state = tuple.__new__  # NamedTuple construction without the keyword-handling wrapper (runs per fix)


def _state(key: str, last_seen: int | None, due: int | None, rules_due: int | None,
           rules: Mapping[str, NamedTuple] | None, offline: Mapping[str, int] | None,
           motion: str | None, watch: Any) -> DeviceAlertState:
    return _new_state(DeviceAlertState, (key, last_seen, due, rules_due, rules, offline, motion, watch))


# --- machines: one per rule, shared by every device the rule applies to --------------------------------------

Out = list[Alert]


class _Machine:
    """A compiled rule. Methods take the rule's state for one device (None = nothing remembered) and return the
    new state (the same object when nothing changed), appending any alerts to ``out``."""

    __slots__ = ("field", "kind", "metrics", "reads_positions", "reads_telemetry", "rid", "rule", "severity")

    def __init__(self, rule: Rule):
        self.reads_positions = False  # which inputs' plans list it (set by each kind)
        self.reads_telemetry = False
        self.field: str | None = None  # the position field it reads
        self.metrics: tuple[str, ...] = ()  # the telemetry metrics it reads
        self.rule = rule
        self.rid = rule.id
        self.severity = rule.severity
        self.kind = rule.kind.value

    def deadline(self, rs: Any) -> int | None:
        return None

    def advance(self, rs: Any, t: int, subject: str, out: Out) -> Any:
        """Fire what is due at ``t`` (this rule's deadline). Only called when ``deadline(rs) <= now``."""
        return rs

    def on_position(self, rs: Any, ts: int, values: Mapping[str, Any], geofences: tuple[str, ...], subject: str,
                    out: Out) -> Any:
        return rs

    def on_telemetry(self, rs: Any, ts: int, metrics: Mapping[str, float], motion: str | None, subject: str,
                     out: Out) -> Any:
        return rs

    def quiet(self, rs: Any, fence_speed: SpeedLimit | None) -> tuple[float, float]:
        """The closed interval of ``field`` values for which ``on_position`` would change nothing and raise
        nothing, given this state and the geofence speed limit in force. The engine skips the call for such
        fixes (so this must never claim more than ``on_position`` does)."""
        return _NEVER

    def adopt(self, rs: Any) -> Any:
        """A state kept across a rule change (same id and kind): adjust it to the new definition."""
        return rs

    def _raise(self, subject: str, t: int, details: dict[str, Any], out: Out) -> None:
        details["kind"] = self.kind
        out.append(Alert(make_alert_id(self.rid, subject, t), self.rid, self.severity, _RAISED, subject, t,
                         details))

    def _clear(self, subject: str, raised_ms: int, t: int, details: dict[str, Any], out: Out) -> None:
        details["kind"] = self.kind
        out.append(Alert(make_alert_id(self.rid, subject, raised_ms), self.rid, self.severity, _CLEARED, subject,
                         max(t, raised_ms), details))


SpeedLimit = tuple[float, str]  # (limit_kmh, geofence id) from the geofences containing a fix


def fence_speed_limit(fence_limit: Callable[[str], float | None], geofences: Iterable[str]) -> SpeedLimit | None:
    """The lowest ``speed_limit_kmh`` among the geofences (first one on ties), or None if none has one."""
    best: SpeedLimit | None = None
    for fence_id in geofences:
        limit = fence_limit(fence_id)
        if limit is not None and (best is None or limit < best[0]):
            best = (limit, fence_id)
    return best


_INF = math.inf
_NEVER = (_INF, -_INF)  # empty interval: always call
_ALWAYS = (-_INF, _INF)


def _reads(m: _Machine, name: str) -> None:
    """Index a machine under the input that carries ``name``."""
    if name in POSITION_FIELDS:
        m.reads_positions = True
        m.field = name
    else:
        m.reads_telemetry = True
        m.metrics = (*m.metrics, name)


def _below(x: float) -> float:
    return math.nextafter(x, -_INF)


def _above(x: float) -> float:
    return math.nextafter(x, _INF)


def _peak_fn(op: str) -> Callable[[float, float], float]:
    if op in (">", ">="):
        return max
    if op in ("<", "<="):
        return min
    return lambda old, new: old


class _Condition(_Machine):
    """The raise-after-duration / clear-after-duration machine shared by threshold and overspeed."""

    __slots__ = ("clear_for_ms", "for_ms", "peak")

    def deadline(self, rs: CondState) -> int | None:
        if rs.raised_ms is None:
            return rs.on_since + self.for_ms
        if rs.off_since is not None:
            return rs.off_since + self.clear_for_ms
        return None

    def advance(self, rs: CondState, t: int, subject: str, out: Out) -> CondState | None:
        if rs.raised_ms is None:
            self._raise(subject, t, self._raise_details(rs), out)
            return rs._replace(raised_ms=t)
        self._clear(subject, rs.raised_ms, t, self._clear_details(rs, None, t), out)
        return None

    def _step(self, rs: CondState | None, t: int, v: float, on: bool, clearing: bool, limit: float,
              where: str | None, subject: str, out: Out) -> CondState | None:
        if rs is None:
            if not on:
                return None
            if self.for_ms == 0:
                rs = _new_state(CondState, (t, t, None, v, limit, where))
                self._raise(subject, t, self._raise_details(rs), out)
                return rs
            return _new_state(CondState, (t, None, None, v, limit, where))
        t = max(t, rs.on_since, rs.raised_ms or 0, rs.off_since or 0)  # late samples never move alerts back
        if rs.raised_ms is None:
            if not on:
                return None
            peak = self.peak(rs.peak, v)
            if peak == rs.peak and limit == rs.limit and where == rs.where:
                return rs
            return _new_state(CondState, (rs.on_since, None, None, peak, limit, where))
        if clearing:
            if self.clear_for_ms == 0:
                self._clear(subject, rs.raised_ms, t, self._clear_details(rs, v, t), out)
                return None
            if rs.off_since is not None:
                return rs
            return _new_state(CondState, (rs.on_since, rs.raised_ms, t, rs.peak, limit, where))
        peak = self.peak(rs.peak, v)
        if rs.off_since is None and peak == rs.peak and limit == rs.limit and where == rs.where:
            return rs
        return _new_state(CondState, (rs.on_since, rs.raised_ms, None, peak, limit, where))

    def _raise_details(self, rs: CondState) -> dict[str, Any]:
        raise NotImplementedError

    def _clear_details(self, rs: CondState, v: float | None, t: int) -> dict[str, Any]:
        raise NotImplementedError


class _Threshold(_Condition):
    __slots__ = ("clearing", "iv_clearing", "iv_false", "iv_not_clearing", "iv_true", "limit", "metric", "op",
                 "op_text")

    def __init__(self, rule: ThresholdRule):
        super().__init__(rule)
        self.metric = rule.metric
        self.op_text = rule.op
        self.op = op = OPERATORS[rule.op]
        self.limit = limit = rule.value
        self.for_ms = rule.for_ms
        self.clear_for_ms = rule.clear_for_ms
        self.peak = _peak_fn(rule.op)
        if rule.clear_below is not None:
            self.clearing: Callable[[float], bool] = (rule.clear_below).__gt__  # v < clear_below
        elif rule.clear_above is not None:
            self.clearing = (rule.clear_above).__lt__  # v > clear_above
        else:
            self.clearing = lambda v: not op(v, limit)
        _reads(self, rule.metric)
        # value intervals (closed) where the condition is false / true, and the clear condition holds / does not
        iv_false, iv_true = {
            ">": ((-_INF, limit), (_above(limit), _INF)), ">=": ((-_INF, _below(limit)), (limit, _INF)),
            "<": ((limit, _INF), (-_INF, _below(limit))), "<=": ((_above(limit), _INF), (-_INF, limit)),
        }.get(rule.op, (_NEVER, _NEVER))
        self.iv_false, self.iv_true = iv_false, iv_true
        if rule.clear_below is not None:
            self.iv_clearing, self.iv_not_clearing = (-_INF, _below(rule.clear_below)), (rule.clear_below, _INF)
        elif rule.clear_above is not None:
            self.iv_clearing, self.iv_not_clearing = (_above(rule.clear_above), _INF), (-_INF, rule.clear_above)
        else:
            self.iv_clearing, self.iv_not_clearing = iv_false, iv_true

    def quiet(self, rs: CondState | None, fence_speed: SpeedLimit | None) -> tuple[float, float]:
        if rs is None:
            return self.iv_false
        if rs.raised_ms is not None and rs.off_since is not None:
            return self.iv_clearing  # a pending clear stays pending
        lo, hi = self.iv_true if rs.raised_ms is None else self.iv_not_clearing
        if self.peak is max:
            return lo, min(hi, rs.peak)
        if self.peak is min:
            return max(lo, rs.peak), hi
        return _NEVER

    def on_position(self, rs: CondState | None, ts: int, values: Mapping[str, Any], geofences: tuple[str, ...],
                    subject: str, out: Out) -> CondState | None:
        v = values.get(self.metric)
        if v is None:
            return rs
        on = self.op(v, self.limit)
        if rs is None and not on:
            return None
        return self._step(rs, ts, v, on, self.clearing(v), self.limit, None, subject, out)

    def on_telemetry(self, rs: CondState | None, ts: int, metrics: Mapping[str, float], motion: str | None,
                     subject: str, out: Out) -> CondState | None:
        v = metrics.get(self.metric)
        if v is None:
            return rs
        on = self.op(v, self.limit)
        if rs is None and not on:
            return None
        return self._step(rs, ts, v, on, self.clearing(v), self.limit, None, subject, out)

    def _raise_details(self, rs: CondState) -> dict[str, Any]:
        return {"metric": self.metric, "value": rs.peak, "op": self.op_text, "threshold": rs.limit,
                "for_s": self.for_ms / 1000, "since_ts_ms": rs.on_since}

    def _clear_details(self, rs: CondState, v: float | None, t: int) -> dict[str, Any]:
        return {"metric": self.metric, "value": v, "peak": rs.peak, "duration_s": (t - rs.raised_ms) / 1000}


class _Overspeed(_Condition):
    __slots__ = ("fence_limit", "global_limit", "tolerance")

    def __init__(self, rule: OverspeedRule, fence_limit: Callable[[str], float | None] | None):
        super().__init__(rule)
        self.reads_positions = True
        self.global_limit = rule.limit_kmh
        self.tolerance = rule.tolerance_kmh
        self.fence_limit = fence_limit if rule.geofence_limits else None
        self.for_ms = rule.for_ms
        self.clear_for_ms = rule.clear_for_ms
        self.peak = max
        self.field = "speed_kmh"

    def quiet(self, rs: CondState | None, fence_speed: SpeedLimit | None) -> tuple[float, float]:
        if fence_speed is not None and self.fence_limit is not None:
            limit, where = fence_speed
        else:
            limit, where = self.global_limit, None
        if limit is None:
            return _ALWAYS if rs is None else _NEVER
        over = limit + self.tolerance
        if rs is None:
            return -_INF, over
        if rs.where != where or rs.limit != limit:
            return _NEVER
        if rs.raised_ms is not None and rs.off_since is not None:
            return -_INF, over
        return _above(over), rs.peak

    def on_position(self, rs: CondState | None, ts: int, values: Mapping[str, Any], geofences: tuple[str, ...],
                    subject: str, out: Out) -> CondState | None:
        speed = values.get("speed_kmh")
        if speed is None:
            return rs
        fence_speed = fence_speed_limit(self.fence_limit, geofences) if geofences and self.fence_limit else None
        limit, where = fence_speed if fence_speed is not None else (self.global_limit, None)
        on = limit is not None and speed > limit + self.tolerance
        if rs is None and not on:
            return None
        return self._step(rs, ts, speed, on, not on, limit, where, subject, out)

    def _raise_details(self, rs: CondState) -> dict[str, Any]:
        details = {"speed_kmh": rs.peak, "limit_kmh": rs.limit, "tolerance_kmh": self.tolerance,
                   "for_s": self.for_ms / 1000, "since_ts_ms": rs.on_since}
        if rs.where is not None:
            details["geofence_id"] = rs.where
        return details

    def _clear_details(self, rs: CondState, v: float | None, t: int) -> dict[str, Any]:
        return {"speed_kmh": v, "max_speed_kmh": rs.peak, "duration_s": (t - rs.raised_ms) / 1000}


class _Idle(_Machine):
    __slots__ = ("engine_metric", "engine_min", "for_ms", "ignition_metric", "max_speed")

    def __init__(self, rule: IdleRule):
        super().__init__(rule)
        self.reads_positions = self.reads_telemetry = True  # speed from fixes, ignition/rpm from telemetry
        self.field = "speed_kmh"
        self.metrics = (rule.ignition_metric, rule.engine_metric)
        self.for_ms = rule.for_ms
        self.max_speed = rule.max_speed_kmh
        self.ignition_metric = rule.ignition_metric
        self.engine_metric = rule.engine_metric
        self.engine_min = rule.engine_min

    def quiet(self, rs: IdleState | None, fence_speed: SpeedLimit | None) -> tuple[float, float]:
        if rs is not None and rs.stationary:
            return -_INF, self.max_speed
        return _above(self.max_speed), _INF

    def deadline(self, rs: IdleState) -> int | None:
        return rs.on_since + self.for_ms if rs.on_since is not None and rs.raised_ms is None else None

    def advance(self, rs: IdleState, t: int, subject: str, out: Out) -> IdleState:
        self._raise(subject, t, {"for_s": self.for_ms / 1000, "since_ts_ms": rs.on_since,
                                 "ignition": rs.ignition, "engine_running": rs.engine}, out)
        return rs._replace(raised_ms=t)

    def on_position(self, rs: IdleState | None, ts: int, values: Mapping[str, Any], geofences: tuple[str, ...],
                    subject: str, out: Out) -> IdleState | None:
        speed = values.get("speed_kmh")
        if speed is None:
            return rs
        stationary = speed <= self.max_speed
        if rs is None:
            return self._update(None, ts, True, False, False, subject, out) if stationary else None
        if stationary == rs.stationary:
            return rs
        return self._update(rs, ts, stationary, rs.ignition, rs.engine, subject, out)

    def on_telemetry(self, rs: IdleState | None, ts: int, metrics: Mapping[str, float], motion: str | None,
                     subject: str, out: Out) -> IdleState | None:
        ignition_value = metrics.get(self.ignition_metric)
        engine_value = metrics.get(self.engine_metric)
        if ignition_value is None and engine_value is None:
            return rs
        ignition = bool(ignition_value) if ignition_value is not None else (rs is not None and rs.ignition)
        engine = engine_value > self.engine_min if engine_value is not None else (rs is not None and rs.engine)
        if rs is None:
            return self._update(None, ts, False, ignition, engine, subject, out) if ignition or engine else None
        if ignition == rs.ignition and engine == rs.engine:
            return rs
        return self._update(rs, ts, rs.stationary, ignition, engine, subject, out)

    def _update(self, rs: IdleState | None, t: int, stationary: bool, ignition: bool, engine: bool, subject: str,
                out: Out) -> IdleState | None:
        on_since = raised = None
        if rs is not None:
            on_since, raised = rs.on_since, rs.raised_ms
            t = max(t, on_since or 0, raised or 0)
        if stationary and (ignition or engine):
            if on_since is None:
                on_since = t
        else:
            if raised is not None:
                self._clear(subject, raised, t, {"idle_s": (t - on_since) / 1000,  # type: ignore[operator]
                                                 "reason": "moving" if not stationary else "engine_off"}, out)
            on_since = raised = None
        if not (stationary or ignition or engine):
            return None
        return IdleState(stationary, ignition, engine, on_since, raised)


class _Rate(_Machine):
    __slots__ = ("by", "drops", "inclusive", "metric", "while_motion", "within_ms")

    def __init__(self, rule: RateRule):
        super().__init__(rule)
        self.metric = rule.metric
        self.drops = rule.direction == "drops"
        self.by = rule.by
        self.inclusive = rule.inclusive
        self.within_ms = rule.within_ms
        self.while_motion = rule.while_motion
        _reads(self, rule.metric)

    def deadline(self, rs: RateState) -> int | None:
        if rs.raised_ms is None or len(rs.samples) < 2:
            return None
        return rs.samples[0][0] + self.within_ms + 1  # the front sample leaves the window

    def advance(self, rs: RateState, t: int, subject: str, out: Out) -> RateState:
        low = t - self.within_ms
        samples = (*(s for s in rs.samples[:-1] if s[0] >= low), rs.samples[-1])
        if self._hit(samples):
            return RateState(samples, rs.raised_ms)
        self._clear(subject, rs.raised_ms, t, {"metric": self.metric, "value": samples[-1][1],  # type: ignore[arg-type]
                                               "reason": "window_passed"}, out)
        return RateState(samples, None)

    def on_position(self, rs: RateState | None, ts: int, values: Mapping[str, Any], geofences: tuple[str, ...],
                    subject: str, out: Out) -> RateState | None:
        v = values.get(self.metric)
        if v is None:
            return rs
        return self._sample(rs, ts, v, values.get("motion"), subject, out)

    def on_telemetry(self, rs: RateState | None, ts: int, metrics: Mapping[str, float], motion: str | None,
                     subject: str, out: Out) -> RateState | None:
        v = metrics.get(self.metric)
        if v is None:
            return rs
        return self._sample(rs, ts, v, motion, subject, out)

    def _hit(self, samples: Sequence[tuple[int, float]]) -> bool:
        change = samples[0][1] - samples[-1][1] if self.drops else samples[-1][1] - samples[0][1]
        return change > self.by or (self.inclusive and change == self.by)

    def _sample(self, rs: RateState | None, t: int, v: float, motion: str | None, subject: str,
                out: Out) -> RateState | None:
        if self.while_motion is not None and motion != self.while_motion:
            if rs is not None and rs.raised_ms is not None:
                self._clear(subject, rs.raised_ms, t, {"metric": self.metric, "value": v,
                                                       "reason": f"not {self.while_motion}"}, out)
            return None
        samples = rs.samples if rs is not None else ()
        if samples and t <= samples[-1][0]:
            return rs  # not newer than the latest sample: ignored
        low = t - self.within_ms
        kept = [s for s in samples if s[0] >= low]
        if self.drops:
            while kept and kept[-1][1] <= v:
                kept.pop()
        else:
            while kept and kept[-1][1] >= v:
                kept.pop()
        kept.append((t, v))
        if len(kept) > MAX_RATE_SAMPLES:
            del kept[0]
        raised = rs.raised_ms if rs is not None else None
        hit = self._hit(kept)
        if hit and raised is None:
            from_ts, from_v = kept[0]
            self._raise(subject, t, {"metric": self.metric, "direction": "drops" if self.drops else "rises",
                                     "from_value": from_v, "from_ts_ms": from_ts, "value": v,
                                     "change": abs(v - from_v), "by": self.by, "within_s": self.within_ms / 1000,
                                     "while": self.while_motion}, out)
            raised = t
        elif not hit and raised is not None:
            self._clear(subject, raised, t, {"metric": self.metric, "value": v, "reason": "window_passed"}, out)
            raised = None
        return RateState(tuple(kept), raised)


class _Geofence(_Machine):
    __slots__ = ("fence_set", "fences", "inside_violates", "schedule", "schedule_allows")

    def __init__(self, rule: GeofenceRule):
        super().__init__(rule)
        self.fences = rule.geofences
        self.fence_set = frozenset(rule.geofences)
        self.schedule = rule.schedule
        self.inside_violates = rule.kind is not RuleKind.KEEP_INSIDE
        self.schedule_allows = rule.kind is RuleKind.TIME_WINDOW  # the schedule lists allowed times

    def _in_force(self, t: int) -> bool:
        if self.schedule is None:
            return True
        return self.schedule.active_at(t) != self.schedule_allows

    def _could_violate(self, members: Iterable[str], known: bool) -> bool:
        return bool(members) if self.inside_violates else known and not members

    def deadline(self, rs: GeoState) -> int | None:
        if self.schedule is None or not (rs.raised_ms is not None or self._could_violate(rs.members, rs.known)):
            return None
        return self.schedule.next_change_ms(rs.t_ms)

    def advance(self, rs: GeoState, t: int, subject: str, out: Out) -> GeoState | None:
        raised, trigger = self._judge(rs.members, rs.known, rs.raised_ms, rs.trigger, t, None, "schedule", subject,
                                      out)
        return self._make(rs.members, rs.known, raised, t, trigger)

    def adopt(self, rs: GeoState) -> GeoState | None:
        members = tuple(f for f in rs.members if f in self.fence_set)
        return rs if members == rs.members else self._make(members, rs.known, rs.raised_ms, rs.t_ms, rs.trigger)

    def on_fences(self, rs: GeoState | None, events: Sequence[FenceEventLike], geofences: tuple[str, ...], ts: int,
                  subject: str, out: Out) -> GeoState | None:
        """Membership from this fix's enter/exit events, then any geofence the device is (confirmed) inside
        without an event the engine saw (it was there before the engine knew: deployment, lost state)."""
        if rs is None:
            members: set[str] = set()
            known, raised, trigger, t = False, None, None, None
        else:
            members, known, raised, trigger, t = set(rs.members), rs.known, rs.raised_ms, rs.trigger, rs.t_ms
        changed = False
        for event in events:
            fence_id, kind = event.geofence_id, event.type
            if kind == "enter":
                if fence_id in members:
                    continue
                members.add(fence_id)
                known, reason = True, "entered"
            elif kind == "exit":
                members.discard(fence_id)
                if getattr(event, "reason", None) == "geofence_deleted":
                    known, reason = known and bool(members), "geofence_deleted"
                else:
                    known, reason = True, "exited"
            else:
                continue
            t = event.ts_ms if t is None or event.ts_ms > t else t  # alert times never go back
            raised, trigger = self._judge(members, known, raised, trigger, t, fence_id, reason, subject, out)
            changed = True
        unseen = [f for f in geofences if f in self.fence_set and f not in members]
        if unseen:
            members.update(unseen)
            known = True
            t = ts if t is None or ts > t else t
            raised, trigger = self._judge(members, known, raised, trigger, t, unseen[0], "inside", subject, out)
            changed = True
        if not changed:
            return rs
        return self._make(tuple(sorted(members)), known, raised, t, trigger)  # type: ignore[arg-type]

    def _make(self, members: tuple[str, ...], known: bool, raised: int | None, t: int, trigger: str | None
              ) -> GeoState | None:
        if raised is None and not members and (self.inside_violates or not known):
            return None  # (only keep_inside needs to remember that the device has been inside)
        return GeoState(members, known, raised, t, trigger)

    def _judge(self, members: Iterable[str], known: bool, raised: int | None, trigger: str | None, t: int,
               fence_id: str | None, reason: str, subject: str, out: Out) -> tuple[int | None, str | None]:
        """Raise or clear at ``t`` as the membership and the schedule say; the alert's (raise time, geofence)."""
        violating = self._could_violate(members, known) and self._in_force(t)
        if violating and raised is None:
            details: dict[str, Any] = {"geofence_id": fence_id, "geofences": list(self.fences), "reason": reason,
                                       "inside": sorted(members)}
            if self.schedule is not None:
                details["allowed" if self.schedule_allows else "schedule"] = self.schedule.describe()
            self._raise(subject, t, details, out)
            return t, fence_id
        if not violating and raised is not None:
            self._clear(subject, raised, t, {"geofence_id": fence_id if fence_id is not None else trigger,
                                             "reason": reason, "inside": sorted(members)}, out)
            return None, None
        return raised, trigger


class _Offline(_Machine):
    __slots__ = ("after_ms",)

    def __init__(self, rule: OfflineRule):
        super().__init__(rule)
        self.after_ms = rule.after_ms


class _Maintenance(_Machine):
    __slots__ = ("every", "metric", "reset_metric")

    def __init__(self, rule: MaintenanceRule):
        super().__init__(rule)
        _reads(self, rule.metric)
        self.reads_telemetry = True  # the reset arrives as telemetry
        self.metrics = (*self.metrics, rule.reset_metric)
        self.metric = rule.metric
        self.every = rule.every
        self.reset_metric = rule.reset_metric

    def quiet(self, rs: MaintState | None, fence_speed: SpeedLimit | None) -> tuple[float, float]:
        if rs is None or rs.due_at is None:
            return _NEVER
        return _ALWAYS if rs.raised_ms is not None else (-_INF, _below(rs.due_at))

    def on_position(self, rs: MaintState | None, ts: int, values: Mapping[str, Any], geofences: tuple[str, ...],
                    subject: str, out: Out) -> MaintState | None:
        v = values.get(self.metric)
        if v is None:
            return rs
        if rs is not None and rs.due_at is not None and (rs.raised_ms is not None or v < rs.due_at):
            return rs  # the per-fix path: nothing crossed
        return self._reading(rs, ts, v, subject, out)

    def on_telemetry(self, rs: MaintState | None, ts: int, metrics: Mapping[str, float], motion: str | None,
                     subject: str, out: Out) -> MaintState | None:
        v = metrics.get(self.metric)
        if metrics.get(self.reset_metric):
            if rs is not None and rs.raised_ms is not None:
                self._clear(subject, rs.raised_ms, ts, {"metric": self.metric, "value": v, "reason": "reset"}, out)
            return MaintState(None if v is None else v + self.every, None)
        if v is None:
            return rs
        return self._reading(rs, ts, v, subject, out)

    def _reading(self, rs: MaintState | None, t: int, v: float, subject: str, out: Out) -> MaintState | None:
        if rs is None:  # first reading: service history unknown, so the next multiple of the interval is due
            return MaintState((math.floor(v / self.every) + 1) * self.every, None)
        if rs.due_at is None:  # first reading after a reset: counted from the service
            return MaintState(v + self.every, None)
        if rs.raised_ms is None and v >= rs.due_at:
            self._raise(subject, t, {"metric": self.metric, "value": v, "due_at": rs.due_at,
                                     "every": self.every}, out)
            return MaintState(rs.due_at, t)
        return rs


def least_squares(buckets: Sequence[tuple[int, int, float, float, float, float]], bucket_ms: int
                  ) -> tuple[int, float, float, int] | None:
    """(n, intercept, slope per second, origin_ms) of the line through the bucketed samples, or None when the
    samples do not determine a line (fewer than 2, or all at one time). Times are seconds from ``origin_ms``."""
    origin = buckets[0][0]
    n = 0
    st = sv = stt = stv = 0.0
    for index, count, su, s_v, suu, suv in buckets:
        d = (index - origin) * bucket_ms / 1000.0
        n += count
        st += count * d + su
        sv += s_v
        stt += count * d * d + 2 * d * su + suu
        stv += d * s_v + suv
    if n < 2:
        return None
    sxx = stt - st * st / n
    if sxx <= 1e-9 * max(stt, 1.0):
        return None
    slope = (stv - st * sv / n) / sxx
    return n, (sv - slope * st) / n, slope, origin * bucket_ms


class _Predictive(_Machine):
    __slots__ = ("bucket_ms", "clear_horizon_ms", "falling", "horizon_ms", "metric", "min_samples", "nbuckets",
                 "threshold")

    def __init__(self, rule: PredictiveRule):
        super().__init__(rule)
        self.metric = rule.metric
        self.falling = rule.op == "<"
        self.threshold = rule.threshold
        self.horizon_ms = rule.horizon_ms
        self.clear_horizon_ms = rule.clear_horizon_ms
        self.min_samples = rule.min_samples
        self.nbuckets = rule.buckets
        self.bucket_ms = max(1, rule.window_ms // rule.buckets)
        _reads(self, rule.metric)

    def on_position(self, rs: PredState | None, ts: int, values: Mapping[str, Any], geofences: tuple[str, ...],
                    subject: str, out: Out) -> PredState | None:
        v = values.get(self.metric)
        return rs if v is None else self._sample(rs, ts, v, subject, out)

    def on_telemetry(self, rs: PredState | None, ts: int, metrics: Mapping[str, float], motion: str | None,
                     subject: str, out: Out) -> PredState | None:
        v = metrics.get(self.metric)
        return rs if v is None else self._sample(rs, ts, v, subject, out)

    def forecast(self, buckets: Sequence[tuple[int, int, float, float, float, float]], now_ms: int
                 ) -> tuple[int | None, dict[str, Any]] | None:
        """(crossing time or None, details) from the fitted line, or None without enough samples. A fitted
        value already past the threshold counts as crossing now."""
        fit = least_squares(buckets, self.bucket_ms)
        if fit is None or fit[0] < self.min_samples:
            return None
        n, intercept, slope, origin_ms = fit
        fitted_now = intercept + slope * (now_ms - origin_ms) / 1000.0
        crossing: int | None = None
        if (fitted_now < self.threshold) if self.falling else (fitted_now > self.threshold):
            crossing = now_ms
        elif (slope < 0) if self.falling else (slope > 0):
            crossing = max(now_ms, origin_ms + math.ceil((self.threshold - intercept) / slope * 1000.0))
        details = {"metric": self.metric, "threshold": self.threshold, "op": "<" if self.falling else ">",
                   "slope_per_h": slope * 3600.0, "fitted_value": fitted_now, "samples": n,
                   "horizon_s": self.horizon_ms / 1000}
        if crossing is not None:
            details["forecast_ts_ms"] = crossing
            details["forecast_in_s"] = (crossing - now_ms) / 1000
        return crossing, details

    def _sample(self, rs: PredState | None, t: int, v: float, subject: str, out: Out) -> PredState | None:
        index = t // self.bucket_ms
        buckets = rs.buckets if rs is not None else ()
        newest = max(index, buckets[-1][0]) if buckets else index
        oldest = newest - self.nbuckets + 1
        if index < oldest:
            return rs  # older than the window
        u = (t - index * self.bucket_ms) / 1000.0
        kept: list[tuple[int, int, float, float, float, float]] = []
        placed = False
        for bucket in buckets:
            if bucket[0] < oldest:
                continue
            if bucket[0] == index:
                bucket = (index, bucket[1] + 1, bucket[2] + u, bucket[3] + v, bucket[4] + u * u, bucket[5] + u * v)
                placed = True
            elif not placed and bucket[0] > index:
                kept.append((index, 1, u, v, u * u, u * v))
                placed = True
            kept.append(bucket)
        if not placed:
            kept.append((index, 1, u, v, u * u, u * v))
        now = t if rs is None else max(t, rs.last_ts)
        raised = rs.raised_ms if rs is not None else None
        # the fit is evaluated when a sample opens a new bucket: at most once per window/buckets, which bounds
        # its cost (the line hardly moves within one bucket)
        result = self.forecast(kept, now) if not buckets or index > buckets[-1][0] else None
        if result is not None:
            crossing, details = result
            if raised is None and crossing is not None and crossing - now <= self.horizon_ms:
                self._raise(subject, now, details, out)
                raised = now
            elif raised is not None and (crossing is None or crossing - now > self.clear_horizon_ms):
                details["reason"] = "no_longer_forecast"
                self._clear(subject, raised, now, details, out)
                raised = None
        return PredState(tuple(kept), raised, now)


def _compile(rule: Rule, fence_limit: Callable[[str], float | None] | None) -> _Machine:
    if isinstance(rule, ThresholdRule):
        return _Threshold(rule)
    if isinstance(rule, OverspeedRule):
        return _Overspeed(rule, fence_limit)
    if isinstance(rule, IdleRule):
        return _Idle(rule)
    if isinstance(rule, RateRule):
        return _Rate(rule)
    if isinstance(rule, GeofenceRule):
        return _Geofence(rule)
    if isinstance(rule, OfflineRule):
        return _Offline(rule)
    if isinstance(rule, MaintenanceRule):
        return _Maintenance(rule)
    if isinstance(rule, PredictiveRule):
        return _Predictive(rule)
    raise TypeError(f"no machine for rule {rule.id!r} of type {type(rule).__name__}")


class _Plan:
    """The compiled rules of one device, indexed by the input they read (shared by devices with the same rules)."""

    __slots__ = ("base_watches", "by_metric", "by_names", "empty", "fence_limit", "fences", "field_of", "fields", "geo",
                 "machines", "min_offline_ms", "needs_motion", "offline", "position_in_field")

    def __init__(self, machines: Sequence[_Machine], fence_limit: Callable[[str], float | None] | None):
        self.machines = {m.rid: m for m in machines}
        fields: dict[str, list[_Machine]] = {}
        for m in machines:
            if m.reads_positions and m.field is not None:
                fields.setdefault(m.field, []).append(m)
        self.fields = tuple((name, tuple(ms)) for name, ms in fields.items())
        self.field_of = {m: index for index, (_, ms) in enumerate(self.fields) for m in ms}
        self.position_in_field = {m: j for _, ms in self.fields for j, m in enumerate(ms)}
        # set when some rule here uses geofence speed limits: fixes inside geofences then look the limit up
        uses_fence_limits = any(isinstance(m, _Overspeed) and m.fence_limit is not None for m in machines)
        self.fence_limit = fence_limit if uses_fence_limits else None
        by_metric: dict[str, list[tuple[int, _Machine]]] = {}
        for order, m in enumerate(machines):
            for metric in dict.fromkeys(m.metrics):
                by_metric.setdefault(metric, []).append((order, m))
        self.by_metric = {metric: tuple(ms) for metric, ms in by_metric.items()}
        self.by_names: dict[tuple[str, ...], tuple[_Machine, ...]] = {}  # message metric names -> rules to run
        self.geo = tuple(m for m in machines if isinstance(m, _Geofence))
        fences: dict[str, list[_Geofence]] = {}
        for m in self.geo:
            for fence_id in m.fences:
                fences.setdefault(fence_id, []).append(m)
        self.fences = {fence_id: tuple(ms) for fence_id, ms in fences.items()}
        self.offline = tuple(sorted((m for m in machines if isinstance(m, _Offline)), key=lambda m: m.after_ms))
        self.min_offline_ms = self.offline[0].after_ms if self.offline else None
        self.needs_motion = any(isinstance(m, _Rate) and m.while_motion and m.reads_telemetry for m in machines)
        self.empty = not machines
        self.base_watches: dict[SpeedLimit | None, Watch] = {}  # for devices with no state, per speed limit

    def machines_reading(self, names: tuple[str, ...]) -> tuple[_Machine, ...]:
        """The rules a telemetry message with these metrics runs, once each, in file order (cached: a device
        type sends the same set of metric names again and again)."""
        hits = {hit for name in names for hit in self.by_metric.get(name, ())}
        found = tuple(m for _, m in sorted(hits, key=lambda hit: hit[0]))
        if len(self.by_names) > 1000:
            self.by_names.clear()
        self.by_names[names] = found
        return found

    def base_watch(self, fence_speed: SpeedLimit | None) -> Watch:
        watch = self.base_watches.get(fence_speed)
        if watch is None:
            if len(self.base_watches) > 1000:
                self.base_watches.clear()
            watch = self.base_watches[fence_speed] = _watch(self, None, fence_speed)
        return watch


# Per position field: (field, lo, hi, rules reading it, their own lows, their own highs, index). Values in
# [lo, hi] change nothing for any of the rules; outside it, only the rules whose own interval misses the value run.
WatchEntry = tuple[str, float, float, tuple[_Machine, ...], tuple[float, ...], tuple[float, ...], int]
# (geofences of the fix it was made at, or None; the geofence speed limit it holds for; entries; its plan)
Watch = tuple[tuple[str, ...] | None, SpeedLimit | None, tuple[WatchEntry, ...], _Plan]


def _watch(plan: _Plan, rules: Mapping[str, Any] | None, fence_speed: SpeedLimit | None,
           geofences: tuple[str, ...] | None = None) -> Watch:
    """Per position field, the values for which none of the device's rules reading it would do anything (the
    intersection of their ``quiet`` intervals for their current states). With ``geofences``: the geofence
    rules have seen that set (a next fix with the same set and no events skips them)."""
    entries = []
    for index, (name, machines) in enumerate(plan.fields):
        intervals = [m.quiet(rules.get(m.rid) if rules else None, fence_speed) for m in machines]
        lows = tuple(a for a, _ in intervals)
        highs = tuple(b for _, b in intervals)
        entries.append((name, max(lows), min(highs), machines, lows, highs, index))
    return geofences, fence_speed, tuple(entries), plan


def _rewatch(watch: Watch, changed: Mapping[int, Sequence[_Machine]], rules: Mapping[str, Any] | None,
             geofences: tuple[str, ...] | None) -> Watch:
    """The watch after some rules' states changed: only their intervals are asked again."""
    entries = list(watch[2])
    fence_speed, plan = watch[1], watch[3]
    position = plan.position_in_field
    for index, machines in changed.items():
        name, _, _, members, lows, highs, _ = entries[index]
        new_lows, new_highs = list(lows), list(highs)
        for m in machines:
            j = position[m]
            new_lows[j], new_highs[j] = m.quiet(rules.get(m.rid) if rules else None, fence_speed)
        entries[index] = (name, max(new_lows), min(new_highs), members, tuple(new_lows), tuple(new_highs), index)
    return geofences, fence_speed, tuple(entries), plan


_KEEP: Any = object()  # "motion unchanged" (telemetry carries none)
_UNKNOWN: Any = object()


def _min(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    if b is None:
        return a
    return a if a < b else b


class AlertEngine:
    """Evaluates a RuleSet per device. Build one per RuleSet (rebuild and swap when rules change); states
    built against another RuleSet are reconciled on their device's next call: alerts of rules that are gone or
    no longer apply are cleared (``details.reason: rule_removed``)."""

    MAX_CACHED_DEVICES = 1_000_000

    def __init__(self, ruleset: RuleSet,
                 geofence_speed_limit: Callable[[str], float | None] | Mapping[str, float] | None = None):
        self.ruleset = ruleset
        self.key = ruleset.key
        fence_limit = geofence_speed_limit.get if isinstance(geofence_speed_limit, Mapping) else geofence_speed_limit
        self._fence_limit = fence_limit
        self._machines = {rule.id: _compile(rule, fence_limit) for rule in ruleset}
        self._plans: dict[str, _Plan] = {}
        self._plans_by_rules: dict[tuple[Rule, ...], _Plan] = {}

    # --- inputs ---------------------------------------------------------------------------------------------

    def on_position(self, state: DeviceAlertState | None, device_id: str, ts_ms: int, values: Mapping[str, Any],
                    geofences: tuple[str, ...] = (), geofence_events: Sequence[FenceEventLike] = ()
                    ) -> tuple[DeviceAlertState | None, list[Alert]]:
        """One accepted fix. ``values``: lat, lon, speed_kmh, heading_deg, odometer_m, motion, accuracy_m ... (the
        enriched record works as is). ``geofences``: the geofences the device is confirmed inside after this
        fix; ``geofence_events``: this fix's enter/exit events (``transitions.GeofenceEvent``)."""
        plan = self._plans.get(device_id) or self._plan(device_id)
        alerts: list[Alert] = []
        if state is None:
            if plan.empty:
                return None, alerts
            rules = watch = rules_due = None
        else:
            if state.ruleset_key != self.key:
                state = self._reconcile(state, device_id, plan, ts_ms, alerts)
            if state.due_ms is not None and state.due_ms <= ts_ms:
                state = self._fire(state, device_id, plan, ts_ms, alerts)
            rules = state.rules
            watch = state.watch
            rules_due = state.rules_due_ms
        if watch is not None and watch[3] is plan and geofences == watch[0]:  # same geofences: nothing to look up
            fence_speed = watch[1]
            fences_known = True
        else:
            fence_speed = fence_speed_limit(plan.fence_limit, geofences) if geofences and plan.fence_limit else None
            fences_known = False
            if watch is None or watch[3] is not plan or watch[1] != fence_speed:  # decoded, new engine, new limit
                watch = _watch(plan, rules, fence_speed) if rules else plan.base_watch(fence_speed)
            watch = (geofences, fence_speed, watch[2], plan)
        new_rules = rules
        due_full = False  # the earliest deadline may have gone: scan them all
        owned = dict(rules) if rules else {}
        moved = self._shift(owned, watch[2], fence_speed, rules_due, ts_ms, values, geofences, device_id, alerts)
        if moved is not None:
            new_rules = owned
            watch = (geofences, fence_speed, moved[0], plan)
            rules_due = moved[1]
        if plan.fences and (geofence_events or (geofences and not fences_known)):
            new_rules, fences_changed = self._geofences(plan, rules, new_rules, ts_ms, geofences, geofence_events,
                                                        device_id, alerts)
            due_full = due_full or fences_changed
        if new_rules is rules and state is not None and state.offline is None:
            # the common case, inlined: nothing changed but the time last seen (and motion)
            last_seen = state.last_seen_ms
            if plan.offline:
                if last_seen is None or ts_ms > last_seen:
                    last_seen = ts_ms
                offline_due = last_seen + plan.min_offline_ms
            else:
                last_seen = offline_due = None
            motion = values.get("motion") if plan.needs_motion else None
            if rules is None and last_seen is None and motion is None:
                return None, alerts  # (a deadline just emptied it)
            if last_seen == state.last_seen_ms and motion == state.motion and watch is state.watch:
                return state, alerts
            due = offline_due if rules_due is None or (offline_due is not None and offline_due < rules_due) \
                else rules_due
            return _new_state(DeviceAlertState, (self.key, last_seen, due, rules_due, rules, None, motion, watch)), \
                alerts
        return self._finish(state, plan, rules, new_rules, ts_ms, values.get("motion"), device_id, alerts,
                            watch, _UNKNOWN if due_full else rules_due), alerts

    def on_positions(self, state: DeviceAlertState | None, device_id: str,
                     fixes: Sequence[tuple[int, Mapping[str, Any], tuple[str, ...], Sequence[FenceEventLike]]]
                     ) -> tuple[DeviceAlertState | None, list[Alert]]:
        """A run of one device's accepted fixes ``(ts_ms, values, geofences, geofence_events)``, in order: the
        same states and alerts as calling :meth:`on_position` for each, cheaper. One state is built at the end
        of the run (or before an input that needs :meth:`on_position`) instead of one per fix:

        - most fixes change nothing but the time last seen (every value inside its watch interval, same
          geofences, no events, no deadline due): they only move two locals;
        - a fix whose value leaves its interval with nothing else going on (the common change: a speed crossing
          a threshold, a new peak) runs the rules whose own interval misses the value against run-local copies
          of the rule states, the watch and the earliest deadline (:meth:`_shift`).

        A device with an offline alert raised *after* the fix's time (the timer runs on the wall clock, so a
        backlog being caught up looks offline) takes these paths too: such a fix does not clear the alert, and
        ``offline`` passes through unchanged."""
        alerts: list[Alert] = []
        plan = self._plans.get(device_id) or self._plan(device_id)
        key = self.key
        fence_rules = bool(plan.fences)
        offline_rules = bool(plan.offline)
        needs_motion = plan.needs_motion
        fast = False  # the locals below describe ``state`` plus this run's changes to it
        dirty = False  # last_seen/motion moved on from ``state``'s
        shifted = False  # and the rule states, watch bounds or earliest deadline too
        owned = False  # ``rules`` is this run's own copy (``state`` does not hold it)
        rules: dict[str, Any] | Mapping[str, Any] | None = None
        last_seen = motion = fences_seen = fence_speed = None
        bounds: tuple[WatchEntry, ...] = ()
        held_until = rules_due = offline_after = None
        for ts_ms, values, geofences, events in fixes:
            if not fast and state is not None and state.ruleset_key == key:
                watch = state.watch
                if watch is not None and watch[3] is plan:
                    fast = True
                    fences_seen, fence_speed, bounds = watch[0], watch[1], watch[2]
                    rules, owned = state.rules, False
                    offline = state.offline
                    # a fix at or after an offline alert's raise clears it: the full path
                    held_until = min(offline.values()) if offline else None
                    rules_due = state.rules_due_ms
                    # the offline deadline is last_seen + this (None: no offline rule left to raise)
                    offline_after = None if not offline_rules else plan.min_offline_ms if offline is None \
                        else next((m.after_ms for m in plan.offline if m.rid not in offline), None)
                    last_seen, motion = state.last_seen_ms, state.motion
            if fast and geofences == fences_seen and not (events and fence_rules) \
                    and (held_until is None or ts_ms < held_until) \
                    and (rules_due is None or rules_due > ts_ms) \
                    and (offline_after is None or last_seen is None or last_seen + offline_after > ts_ms):
                get = values.get
                for name, lo, hi, _, _, _, _ in bounds:
                    v = get(name)
                    if v is not None and not lo <= v <= hi:
                        if not owned:
                            rules, owned = dict(rules) if rules else {}, True
                        moved = self._shift(rules, bounds, fence_speed, rules_due, ts_ms, values, geofences,  # type: ignore[arg-type]
                                            device_id, alerts)
                        if moved is not None:
                            bounds, rules_due = moved
                            shifted = True
                        break
                # only the time last seen and the motion move on (besides what _shift did)
                if not offline_rules:
                    last_seen = None
                elif last_seen is None or ts_ms > last_seen:
                    last_seen = ts_ms
                motion = get("motion") if needs_motion else None
                dirty = True
                continue
            if shifted:
                state = self._shifted(state, plan, rules, bounds, fences_seen, fence_speed, rules_due,  # type: ignore[arg-type]
                                      last_seen, motion)
            elif dirty:
                state = self._moved_on(state, plan, last_seen, motion)  # type: ignore[arg-type]
            dirty = shifted = fast = False
            state, new = self.on_position(state, device_id, ts_ms, values, geofences, events)
            alerts.extend(new)
        if shifted:
            state = self._shifted(state, plan, rules, bounds, fences_seen, fence_speed, rules_due,  # type: ignore[arg-type]
                                  last_seen, motion)
        elif dirty:
            state = self._moved_on(state, plan, last_seen, motion)  # type: ignore[arg-type]
        return state, alerts

    def _shift(self, rules: dict[str, Any], bounds: tuple[WatchEntry, ...], fence_speed: SpeedLimit | None,
               rules_due: int | None, ts_ms: int, values: Mapping[str, Any], geofences: tuple[str, ...],
               subject: str, alerts: Out) -> tuple[tuple[WatchEntry, ...], int | None] | None:
        """The rule pass of a fix (:meth:`on_position`'s, and :meth:`on_positions`' for a fix with nothing else
        going on): the rules whose own interval misses a value run; ``rules`` (the caller's own copy) is updated
        in place. Returns the new watch bounds and earliest deadline, or None when no rule state changed."""
        get = values.get
        entries: list[WatchEntry] | None = None
        due_full = False  # the earliest deadline may have gone: scan them all
        for name, lo, hi, members, lows, highs, index in bounds:
            v = get(name)
            if v is None or lo <= v <= hi:
                continue
            new_lows = new_highs = None
            for j, (m, m_lo, m_hi) in enumerate(zip(members, lows, highs, strict=True)):
                if m_lo <= v <= m_hi:
                    continue
                old = rules.get(m.rid)
                new = m.on_position(old, ts_ms, values, geofences, subject, alerts)
                if new is old:
                    continue
                if new is None:
                    del rules[m.rid]
                else:
                    rules[m.rid] = new
                if new_lows is None:
                    new_lows, new_highs = list(lows), list(highs)
                new_lows[j], new_highs[j] = m.quiet(new, fence_speed)  # type: ignore[index]
                old_due = m.deadline(old) if old is not None else None
                new_due = m.deadline(new) if new is not None else None
                if old_due != new_due:
                    if old_due is not None and old_due == rules_due:
                        due_full = True
                    elif new_due is not None and (rules_due is None or new_due < rules_due):
                        rules_due = new_due
            if new_lows is not None:
                if entries is None:
                    entries = list(bounds)
                entries[index] = (name, max(new_lows), min(new_highs), members, tuple(new_lows),  # type: ignore[arg-type]
                                  tuple(new_highs), index)  # type: ignore[arg-type]
        if entries is None:
            return None
        return tuple(entries), self._rules_due(rules) if due_full else rules_due

    def _shifted(self, state: DeviceAlertState, plan: _Plan, rules: Mapping[str, Any] | None,
                 bounds: tuple[WatchEntry, ...], fences_seen: tuple[str, ...] | None,
                 fence_speed: SpeedLimit | None, rules_due: int | None, last_seen: int | None, motion: Any
                 ) -> DeviceAlertState | None:
        """The state after a run's :meth:`_shift` changes (what :meth:`on_position`'s ``_finish`` builds)."""
        rules = rules or None
        offline = state.offline
        if rules is None and offline is None and last_seen is None and motion is None:
            return None
        due = _min(rules_due, self._offline_due(plan, last_seen, offline))
        return _state(self.key, last_seen, due, rules_due, rules, offline, motion,
                      (fences_seen, fence_speed, bounds, plan))

    def _moved_on(self, state: DeviceAlertState, plan: _Plan, last_seen: int | None, motion: Any
                  ) -> DeviceAlertState | None:
        """``state`` with a new time last seen and motion (what :meth:`on_position` returns for a quiet fix; its
        offline alerts, if any, were raised after the fixes and stay)."""
        offline = state.offline
        if state.rules is None and offline is None and last_seen is None and motion is None:
            return None
        if last_seen == state.last_seen_ms and motion == state.motion:
            return state
        rules_due = state.rules_due_ms
        offline_due = self._offline_due(plan, last_seen, offline)
        return _new_state(DeviceAlertState, (self.key, last_seen, _min(rules_due, offline_due), rules_due,
                                             state.rules, offline, motion, state.watch))

    def on_telemetry(self, state: DeviceAlertState | None, device_id: str, ts_ms: int, metrics: Mapping[str, float]
                     ) -> tuple[DeviceAlertState | None, list[Alert]]:
        """One telemetry message (``{name: number}``); its metrics count as samples at ``ts_ms``."""
        plan = self._plans.get(device_id) or self._plan(device_id)
        alerts: list[Alert] = []
        if state is None:
            if plan.empty:
                return None, alerts
            rules = None
            motion = None
        else:
            if state.ruleset_key != self.key:
                state = self._reconcile(state, device_id, plan, ts_ms, alerts)
            if state.due_ms is not None and state.due_ms <= ts_ms:
                state = self._fire(state, device_id, plan, ts_ms, alerts)
            rules = state.rules
            motion = state.motion
        names = tuple(metrics)
        hits = plan.by_names.get(names)
        if hits is None:
            hits = plan.machines_reading(names)
        new_rules = rules
        watch_changed: dict[int, list[_Machine]] | None = None  # rules that also read positions and changed
        due_stale = False  # a changed state had or has a deadline
        if hits:
            for m in hits:
                old = new_rules.get(m.rid) if new_rules else None
                new = m.on_telemetry(old, ts_ms, metrics, motion, device_id, alerts)
                if new is not old:
                    if new_rules is rules:
                        new_rules = dict(rules) if rules else {}
                    if new is None:
                        del new_rules[m.rid]  # type: ignore[attr-defined]
                    else:
                        new_rules[m.rid] = new  # type: ignore[index]
                    if m.field is not None:
                        watch_changed = watch_changed or {}
                        watch_changed.setdefault(plan.field_of[m], []).append(m)
                    due_stale = due_stale or (old is not None and m.deadline(old) is not None) or (
                        new is not None and m.deadline(new) is not None)
        watch = None
        known_due = _UNKNOWN
        if new_rules is not rules and state is not None:
            if state.watch is not None and state.watch[3] is plan:
                watch = state.watch if watch_changed is None else _rewatch(state.watch, watch_changed, new_rules,
                                                                           state.watch[0])
            if not due_stale:
                known_due = state.rules_due_ms
        return self._finish(state, plan, rules, new_rules, ts_ms, _KEEP, device_id, alerts, watch, known_due), alerts

    def tick(self, state: DeviceAlertState | None, device_id: str, now_ms: int
             ) -> tuple[DeviceAlertState | None, list[Alert]]:
        """Fire what has come due by ``now_ms`` while the device is silent: offline, durations met on held
        values, schedule boundaries, rate windows ageing out. Alerts carry their deadlines as times."""
        alerts: list[Alert] = []
        if state is None:
            return None, alerts
        plan = self._plans.get(device_id) or self._plan(device_id)
        if state.ruleset_key != self.key:
            state = self._reconcile(state, device_id, plan, now_ms, alerts)
        if state.due_ms is not None and state.due_ms <= now_ms:
            state = self._fire(state, device_id, plan, now_ms, alerts)
        if state.rules is None and state.offline is None and state.last_seen_ms is None and state.motion is None:
            return None, alerts
        return state, alerts

    @staticmethod
    def next_deadline(state: DeviceAlertState | None) -> int | None:
        """When ``tick`` next has something to do for this device (None: nothing until its next input)."""
        return None if state is None else state.due_ms

    due_offline = tick  # the offline timer is the general timer

    # --- internals -----------------------------------------------------------------------------------------------

    def _plan(self, device_id: str) -> _Plan:
        rules = self.ruleset.rules_for(device_id)
        plan = self._plans_by_rules.get(rules)
        if plan is None:
            plan = self._plans_by_rules[rules] = _Plan([self._machines[rule.id] for rule in rules], self._fence_limit)
        if len(self._plans) >= self.MAX_CACHED_DEVICES:
            self._plans.clear()
        self._plans[device_id] = plan
        return plan

    def _geofences(self, plan: _Plan, rules: Mapping[str, Any] | None, new_rules: Mapping[str, Any] | None,
                   ts: int, geofences: tuple[str, ...], events: Sequence[FenceEventLike], subject: str,
                   alerts: Out) -> tuple[Mapping[str, Any] | None, bool]:
        """Geofence rules touched by this fix's events or geofences: (rules, whether any state changed)."""
        fences = plan.fences
        touched: dict[_Geofence, list[FenceEventLike]] | None = None
        for event in events:
            machines = fences.get(event.geofence_id)
            if machines:
                if touched is None:
                    touched = {}
                for m in machines:
                    touched.setdefault(m, []).append(event)
        for fence_id in geofences:
            machines = fences.get(fence_id)
            if machines:
                for m in machines:
                    if touched is None or m not in touched:
                        rs = new_rules.get(m.rid) if new_rules else None
                        if rs is None or fence_id not in rs.members:
                            if touched is None:
                                touched = {}
                            touched[m] = []
        if touched is None:
            return new_rules, False
        changed = False
        for m in plan.geo:
            events_for_m = touched.get(m)
            if events_for_m is None:
                continue
            old = new_rules.get(m.rid) if new_rules else None
            new = m.on_fences(old, events_for_m, geofences, ts, subject, alerts)
            if new is not old:
                changed = True
                if new_rules is rules:
                    new_rules = dict(rules) if rules else {}
                if new is None:
                    del new_rules[m.rid]  # type: ignore[attr-defined]
                else:
                    new_rules[m.rid] = new  # type: ignore[index]
        return new_rules, changed

    def _finish(self, state: DeviceAlertState | None, plan: _Plan, rules: Mapping[str, Any] | None,
                new_rules: Mapping[str, Any] | None, ts: int, motion: Any, subject: str, alerts: Out,
                watch: Watch | None = None, known_due: Any = _UNKNOWN) -> DeviceAlertState | None:
        """Offline bookkeeping for an input at ``ts`` and the new state (the old object if nothing changed).
        ``watch`` and ``known_due`` (the rules' earliest deadline): already known for ``new_rules``, else derived."""
        if state is None:
            offline = last_seen = None
            old_motion = None
        else:
            offline, last_seen, old_motion = state.offline, state.last_seen_ms, state.motion
            if offline:
                offline = self._clear_offline(offline, ts, last_seen, subject, alerts)
        if plan.offline:
            if last_seen is None or ts > last_seen:
                last_seen = ts
        else:
            last_seen = None
        if not plan.needs_motion:
            motion = None
        elif motion is _KEEP:
            motion = old_motion
        if new_rules is rules and state is not None:
            if watch is None:
                watch = state.watch
            if last_seen == state.last_seen_ms and offline is state.offline and motion == old_motion \
                    and watch is state.watch and (rules or offline or last_seen is not None or motion is not None):
                return state
            rules_due = state.rules_due_ms
        else:
            new_rules = new_rules or None
            rules_due = self._rules_due(new_rules) if known_due is _UNKNOWN else known_due
            if watch is None:
                fence_speed = state.watch[1] if state is not None and state.watch is not None else None
                watch = _watch(plan, new_rules, fence_speed)
        if new_rules is None and offline is None and last_seen is None and motion is None:
            return None
        due = _min(rules_due, self._offline_due(plan, last_seen, offline))
        return _state(self.key, last_seen, due, rules_due, new_rules, offline, motion, watch)

    def _clear_offline(self, offline: Mapping[str, int], ts: int, last_seen: int | None, subject: str,
                       alerts: Out) -> Mapping[str, int] | None:
        """The device reported: clear its offline alerts (those raised no later than this input's time)."""
        kept = None
        for rule_id, raised_ms in offline.items():
            m = self._machines[rule_id]
            if ts >= raised_ms:
                m._clear(subject, raised_ms, ts, {"offline_s": (ts - (last_seen or raised_ms)) / 1000,
                                                  "after_s": m.after_ms / 1000}, alerts)  # type: ignore[attr-defined]
            else:  # an input from before the alert was raised: the device is not back yet
                kept = kept or {}
                kept[rule_id] = raised_ms
        return kept

    @staticmethod
    def _offline_due(plan: _Plan, last_seen: int | None, offline: Mapping[str, int] | None) -> int | None:
        if last_seen is None or not plan.offline:
            return None
        if not offline:
            return last_seen + plan.min_offline_ms  # type: ignore[operator]
        for m in plan.offline:
            if m.rid not in offline:
                return last_seen + m.after_ms
        return None

    def _rules_due(self, rules: Mapping[str, Any] | None) -> int | None:
        due = None
        if rules:
            machines = self._machines
            for rule_id, rs in rules.items():
                d = machines[rule_id].deadline(rs)
                if d is not None and (due is None or d < due):
                    due = d
        return due

    def _fire(self, state: DeviceAlertState, subject: str, plan: _Plan, now: int, alerts: Out) -> DeviceAlertState:
        """Every deadline up to ``now``, each at its own time; alerts in time order."""
        fired: list[Alert] = []
        rules = new_rules = state.rules
        if state.rules_due_ms is not None and state.rules_due_ms <= now and rules:
            machines = self._machines
            for rule_id, rs in rules.items():
                m = machines[rule_id]
                new = rs
                d = m.deadline(new)
                while d is not None and d <= now:
                    new = m.advance(new, d, subject, fired)
                    d = None if new is None else m.deadline(new)
                if new is not rs:
                    if new_rules is rules:
                        new_rules = dict(rules)
                    if new is None:
                        del new_rules[rule_id]  # type: ignore[attr-defined]
                    else:
                        new_rules[rule_id] = new  # type: ignore[index]
        offline = state.offline
        last_seen = state.last_seen_ms
        if plan.offline and last_seen is not None:
            for m in plan.offline:
                if offline and m.rid in offline:
                    continue
                at = last_seen + m.after_ms
                if at <= now:
                    m._raise(subject, at, {"last_seen_ts_ms": last_seen, "after_s": m.after_ms / 1000}, fired)
                    offline = dict(offline or {})
                    offline[m.rid] = at
        if len(fired) > 1:
            fired.sort(key=lambda a: a.ts_ms)
        alerts.extend(fired)
        if new_rules is rules and offline is state.offline:
            return state
        if new_rules is rules:
            rules_due, watch = state.rules_due_ms, state.watch
        else:
            new_rules = new_rules or None
            rules_due = self._rules_due(new_rules)
            watch = _watch(plan, new_rules, state.watch[1] if state.watch is not None else None)
        due = _min(rules_due, self._offline_due(plan, last_seen, offline))
        return _state(self.key, last_seen, due, rules_due, new_rules, offline, state.motion, watch)

    def _reconcile(self, state: DeviceAlertState, subject: str, plan: _Plan, t: int, alerts: Out
                   ) -> DeviceAlertState:
        """A state from another RuleSet: keep what still applies, clear and drop the rest."""
        rules: dict[str, Any] = {}
        for rule_id, rs in (state.rules or {}).items():
            m = plan.machines.get(rule_id)
            if m is not None and type(rs) is _expected_state(m):
                adopted = m.adopt(rs)
                if adopted is not None:
                    rules[rule_id] = adopted
                continue
            raised = getattr(rs, "raised_ms", None)
            if raised is not None:
                self._removed(rule_id, subject, raised, t, alerts)
        offline: dict[str, int] = {}
        for rule_id, raised in (state.offline or {}).items():
            if isinstance(plan.machines.get(rule_id), _Offline):
                offline[rule_id] = raised
            else:
                self._removed(rule_id, subject, raised, t, alerts)
        last_seen = state.last_seen_ms if plan.offline else None
        motion = state.motion if plan.needs_motion else None
        rules_due = self._rules_due(rules or None)
        due = _min(rules_due, self._offline_due(plan, last_seen, offline or None))
        return _state(self.key, last_seen, due, rules_due, rules or None, offline or None, motion,
                      _watch(plan, rules or None, None))

    def _removed(self, rule_id: str, subject: str, raised_ms: int, t: int, alerts: Out) -> None:
        rule = self.ruleset.get(rule_id)
        severity = rule.severity if rule is not None else Severity.INFO
        alerts.append(Alert(make_alert_id(rule_id, subject, raised_ms), rule_id, severity, _CLEARED, subject,
                            max(t, raised_ms), {"reason": "rule_removed"}))


def _expected_state(m: _Machine) -> type:
    """The state type a machine keeps (to tell whether a stored state still fits a rule of the same id)."""
    if isinstance(m, _Condition):
        return CondState
    return {_Idle: IdleState, _Rate: RateState, _Geofence: GeoState, _Maintenance: MaintState,
            _Predictive: PredState}.get(type(m), type(None))
