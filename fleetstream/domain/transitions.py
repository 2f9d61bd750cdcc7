"""Geofence transitions per device: enter / exit / dwell / cross, without flapping.

``step(memberships, last, fix, inside, index, defaults)`` is pure: given what the device was confirmed inside
(and any unconfirmed run), its previous accepted fix and the geofences the index says contain the new fix, it
returns the new memberships and the events. Anti-flapping, per geofence with worker-wide defaults:

- ``enter_after_s`` / ``exit_after_s``: the new side must hold this long before the transition is confirmed; the
  event carries the time and place of the first fix of the confirmed run.
- ``exit_buffer_m``: a device inside stays inside until it is this far beyond the boundary.
- ``min_accuracy_m``: fixes reporting a worse accuracy change nothing for that geofence.

With all of them 0 the events are exactly the differences between consecutive fixes' geofence sets. A geofence
that disappears from the index gives an ``exit`` with ``reason: geofence_deleted`` on the device's next fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import lru_cache
from typing import Any, NamedTuple, Protocol

from fleetstream.domain.geofences import FenceSettings, Geofence
from fleetstream.domain.models import Position


class GeofenceEventType(StrEnum):
    ENTER = "enter"
    EXIT = "exit"
    DWELL = "dwell"
    CROSS = "cross"


@dataclass(frozen=True, slots=True, eq=False)  # identity hash: cheap as a cache key, built once per worker
class TransitionDefaults:
    """Worker-wide defaults, overridden per geofence by its properties."""

    dwell_s: float = 0.0
    enter_after_s: float = 0.0
    exit_after_s: float = 0.0
    exit_buffer_m: float = 0.0
    min_accuracy_m: float = 0.0
    # all of the above 0: hysteresis and dwell off, events are the differences between consecutive fixes
    zero: bool = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "zero", not (self.dwell_s or self.enter_after_s or self.exit_after_s
                                              or self.exit_buffer_m or self.min_accuracy_m))

    def resolve(self, own: FenceSettings) -> TransitionDefaults:
        return TransitionDefaults(
            *(self_value if value is None else value for self_value, value in (
                (self.dwell_s, own.dwell_s), (self.enter_after_s, own.enter_after_s),
                (self.exit_after_s, own.exit_after_s), (self.exit_buffer_m, own.exit_buffer_m),
                (self.min_accuracy_m, own.min_accuracy_m),
            ))
        )


class Membership(NamedTuple):
    """One device's standing with one geofence. Kept only while inside or while a run is pending."""

    inside: bool  # confirmed state
    since_ms: int  # when the confirmed inside began (its first fix)
    dwell_done: bool
    pending_ms: int | None = None  # first fix of an unconfirmed run on the other side
    pending_lat: float = 0.0
    pending_lon: float = 0.0

    def to_list(self) -> list[Any]:
        return [int(self.inside), self.since_ms, int(self.dwell_done), self.pending_ms, self.pending_lat,
                self.pending_lon]

    @classmethod
    def from_list(cls, raw: list[Any]) -> Membership:
        return cls(bool(raw[0]), int(raw[1]), bool(raw[2]), raw[3], float(raw[4]), float(raw[5]))


class GeofenceEvent(NamedTuple):
    type: GeofenceEventType
    device_id: str
    geofence_id: str
    ts_ms: int
    lat: float
    lon: float
    dwell_s: float | None = None
    reason: str | None = None

    @property
    def event_id(self) -> str:
        """Stable across replays: the same transition always gets the same id."""
        return f"{self.device_id}:{self.geofence_id}:{self.type._value_}:{self.ts_ms}"  # _value_: 5x cheaper


class FenceIndex(Protocol):
    def get(self, fence_id: str) -> Geofence | None: ...
    def distance_outside_m(self, fence_id: str, lat: float, lon: float) -> float: ...
    def fences_crossed(self, lat1: float, lon1: float, lat2: float, lon2: float) -> tuple[str, ...]: ...


Memberships = Mapping[str, Membership]
_ENTER, _EXIT, _DWELL, _CROSS = (GeofenceEventType.ENTER, GeofenceEventType.EXIT, GeofenceEventType.DWELL,
                                 GeofenceEventType.CROSS)


def step(
    memberships: Memberships,
    last: Position | None,
    fix: Position,
    inside: tuple[str, ...],
    index: FenceIndex,
    defaults: TransitionDefaults = TransitionDefaults(),
) -> tuple[dict[str, Membership], list[GeofenceEvent]]:
    """Advance one device by one accepted fix (the caller drops fixes not newer than ``last``)."""
    if not memberships and not inside and (last is None or not _any_cross(index)):
        return {}, []
    if defaults.zero and _plain(index):
        plain = _step_plain(memberships, fix, inside, index)
        if plain is not None:
            return plain
    if len(memberships) == len(inside) and _steady(memberships, inside, index, defaults):
        return dict(memberships), []
    return _step(memberships, last, fix, inside, index, defaults)


def step_settled(
    memberships: Memberships,
    last: Position | None,
    fix: Position,
    inside: tuple[str, ...],
    index: FenceIndex,
    defaults: TransitionDefaults = TransitionDefaults(),
) -> tuple[dict[str, Membership], list[GeofenceEvent], tuple[str, ...] | None]:
    """``step``, and ``steady_inside`` of the memberships it returns, in one call: the plain step's memberships
    are settled by construction (and in sorted order), so the worker's settled-devices memo costs no second
    pass over them."""
    if defaults.zero and _plain(index):
        plain = _step_plain(memberships, fix, inside, index)
        if plain is not None:
            return plain[0], plain[1], tuple(plain[0]) or None
    new, events = step(memberships, last, fix, inside, index, defaults)
    return new, events, steady_inside(new, index, defaults) if new else None


def _steady(memberships: Memberships, inside: tuple[str, ...], index: FenceIndex,
            defaults: TransitionDefaults) -> bool:
    """Whether the fix changes nothing: it is inside exactly the geofences the device is confirmed inside, no run
    is pending, no dwell event is still to come, and no geofence asks for ``cross`` events. The common case of
    a device staying where it is: what ``_step`` would return is then the memberships unchanged and no events,
    which tests check against ``_step`` itself."""
    if _any_cross(index):
        return False
    for fence_id in inside:
        member = memberships.get(fence_id)
        if member is None or not _settled(fence_id, member, index, defaults):
            return False
    return True


def steady_inside(memberships: Memberships, index: FenceIndex,
                  defaults: TransitionDefaults = TransitionDefaults()) -> tuple[str, ...] | None:
    """The index answer (sorted ids) for which ``step`` would leave these memberships as they are and emit
    nothing, or None when every answer may change something (a pending run, a dwell to come, cross events).
    Callers may remember it per device and skip ``step`` while the answer and the index stay the same."""
    if not memberships or _any_cross(index):
        return None
    if defaults.zero and _plain(index):
        for fence_id, member in memberships.items():
            if not member.inside or member.pending_ms is not None or index.get(fence_id) is None:
                return None
        return tuple(sorted(memberships))
    for fence_id, member in memberships.items():
        if not _settled(fence_id, member, index, defaults):
            return None
    return tuple(sorted(memberships))


def _settled(fence_id: str, member: Membership, index: FenceIndex, defaults: TransitionDefaults) -> bool:
    """Confirmed inside, no run pending, and no dwell event still to come."""
    if not member.inside or member.pending_ms is not None:
        return False
    if member.dwell_done:
        return True
    fence = index.get(fence_id)
    return fence is not None and _rules(defaults, fence).dwell_s <= 0


# Memberships and events are built with tuple.__new__ (all fields given): NamedTuple's keyword-handling constructor
# and ``_replace`` cost about a microsecond each, and ``_step`` builds several per call.
_new = tuple.__new__
_OUTSIDE = Membership(False, 0, False)


def _step(
    memberships: Memberships,
    last: Position | None,
    fix: Position,
    inside: tuple[str, ...],
    index: FenceIndex,
    defaults: TransitionDefaults,
) -> tuple[dict[str, Membership], list[GeofenceEvent]]:
    """``step`` in full: every geofence the device is in, was in or has a pending run with."""
    events: list[GeofenceEvent] = []
    result: dict[str, Membership] = {}
    now = fix.ts_ms
    device_id, lat, lon = fix.device_id, fix.lat, fix.lon
    for fence_id in sorted(memberships.keys() | inside) if memberships else sorted(set(inside)):
        member = memberships.get(fence_id)
        fence = index.get(fence_id)
        if fence is None:  # deleted while the device was inside (or pending)
            if member is not None and member.inside:
                events.append(_new(GeofenceEvent, (_EXIT, device_id, fence_id, now, lat, lon,
                                                   (now - member.since_ms) / 1000.0, "geofence_deleted")))
            continue
        rules = _rules(defaults, fence)
        if member is None:
            member = _OUTSIDE
        if rules.min_accuracy_m and fix.accuracy_m is not None and fix.accuracy_m > rules.min_accuracy_m:
            if member.inside or member.pending_ms is not None:
                result[fence_id] = member
            continue
        observed = fence_id in inside
        was_inside = member.inside
        if was_inside and not observed and rules.exit_buffer_m > 0:
            observed = index.distance_outside_m(fence_id, lat, lon) < rules.exit_buffer_m
        if observed == was_inside:
            if member.pending_ms is not None:
                member = _new(Membership, (was_inside, member.since_ms, member.dwell_done, None, member.pending_lat,
                                           member.pending_lon))
        else:
            if member.pending_ms is None:
                member = _new(Membership, (was_inside, member.since_ms, member.dwell_done, now, lat, lon))
            wait_ms = (rules.enter_after_s if observed else rules.exit_after_s) * 1000.0
            if now - member.pending_ms >= wait_ms:  # type: ignore[operator]
                at_ms, at_lat, at_lon = member.pending_ms, member.pending_lat, member.pending_lon
                if observed:
                    events.append(_new(GeofenceEvent, (_ENTER, device_id, fence_id, at_ms, at_lat, at_lon, None,
                                                       None)))
                    member = _new(Membership, (True, at_ms, False, None, 0.0, 0.0))
                else:
                    events.append(_new(GeofenceEvent, (_EXIT, device_id, fence_id, at_ms, at_lat, at_lon,
                                                       (at_ms - member.since_ms) / 1000.0, None)))  # type: ignore[operator]
                    member = _OUTSIDE
        if member.inside:
            dwell_s = rules.dwell_s
            if dwell_s > 0 and not member.dwell_done and now - member.since_ms >= dwell_s * 1000:
                events.append(_new(GeofenceEvent, (_DWELL, device_id, fence_id, now, lat, lon, dwell_s, None)))
                member = _new(Membership, (True, member.since_ms, True, member.pending_ms, member.pending_lat,
                                           member.pending_lon))
            result[fence_id] = member
        elif member.pending_ms is not None:
            result[fence_id] = member
    if last is not None:
        for fence_id in index.fences_crossed(last.lat, last.lon, lat, lon):
            was = memberships.get(fence_id)
            if fence_id not in inside and not (was is not None and was.inside) and fence_id not in result:
                events.append(_new(GeofenceEvent, (_CROSS, device_id, fence_id, now, lat, lon, None, None)))
    return result, events


def _step_plain(
    memberships: Memberships, fix: Position, inside: tuple[str, ...], index: FenceIndex
) -> tuple[dict[str, Membership], list[GeofenceEvent]] | None:
    """``_step`` when no setting applies (worker defaults all 0, no geofence with settings of its own, no
    ``cross``): every change is confirmed at once, so the events are the differences between the device's
    memberships and the fix's geofences, without resolving each geofence's settings. ``inside`` is this index's
    answer (its geofences exist); only a geofence left is looked up, to tell a deletion. None when a membership is
    still pending or outside (left by settings since changed): ``_step`` resolves those. Tests check it against
    ``_step``."""
    for member in memberships.values():
        if not member.inside or member.pending_ms is not None:
            return None
    events: list[GeofenceEvent] = []
    result: dict[str, Membership] = {}
    now = fix.ts_ms
    device_id, lat, lon = fix.device_id, fix.lat, fix.lon
    for fence_id in sorted(memberships.keys() | inside) if memberships else sorted(set(inside)):
        member = memberships.get(fence_id)
        if fence_id in inside:
            if member is None:
                events.append(_new(GeofenceEvent, (_ENTER, device_id, fence_id, now, lat, lon, None, None)))
                member = _new(Membership, (True, now, False, None, 0.0, 0.0))
            result[fence_id] = member
        else:  # left, or deleted while the device was inside
            events.append(_new(GeofenceEvent, (
                _EXIT, device_id, fence_id, now, lat, lon, (now - member.since_ms) / 1000.0,  # type: ignore[union-attr]
                None if index.get(fence_id) is not None else "geofence_deleted")))
    return result, events


@lru_cache(maxsize=262_144)
def _rules(defaults: TransitionDefaults, fence: Geofence) -> TransitionDefaults:
    """Per-geofence settings over the defaults; cached (geofences hash by identity, defaults are frozen)."""
    return defaults.resolve(fence.settings)


def _any_cross(index: FenceIndex) -> bool:
    return bool(getattr(index, "has_cross", True))


def _plain(index: FenceIndex) -> bool:
    """No geofence has settings of its own or asks for ``cross`` (``GeofenceIndex.plain``; False if unknown)."""
    return bool(getattr(index, "plain", False))


def memberships_to_json(memberships: Mapping[str, Membership | list[Any]]) -> dict[str, list[Any]]:
    return {fence_id: m.to_list() if isinstance(m, Membership) else m for fence_id, m in memberships.items()}


def memberships_from_json(raw: Mapping[str, Membership | list[Any]] | None) -> Memberships:
    """Memberships from a stored state (lists), or a state's still in memory (already Memberships: returned as
    they are, not copied; nobody modifies them)."""
    if not raw:
        return {}
    if type(next(iter(raw.values()))) is Membership:  # a state's memberships are all objects or all lists
        return raw  # type: ignore[return-value]
    return {fence_id: v if type(v) is Membership else Membership.from_list(v) for fence_id, v in raw.items()}
