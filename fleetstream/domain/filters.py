"""The position filter chain: which fixes may change a device's state. Pure functions, no I/O.

A check returns ``None`` (accept) or a :class:`~fleetstream.domain.models.FilterReason` (a ``str``, one of a
bounded set of codes used as metric labels). A filtered fix is still published, flagged with the reason; it
never moves the odometer, the motion state or a trip (:func:`fleetstream.domain.tracking.step_position`).

The checks, in the order they run (the first that fails names the reason):

- on the fix alone and the worker's clock (:func:`intrinsic_reason`): ``invalid``, ``future``, ``too_old``,
  ``low_accuracy``. They also run *before* the reorder buffer, so that a fix from a broken clock never becomes
  a device's reorder watermark (which would make its next real fixes ``late``);
- against the device's last *accepted* fix (:func:`relative_reason`): ``duplicate``, ``out_of_order``,
  ``implied_speed``, ``downsampled_time``, ``downsampled_distance``. Rejected fixes never become the reference,
  so one outlier cannot drag the next good fixes into rejection (the reference moves only on acceptance).

``late`` comes from :class:`ReorderBuffer`: a fix older than one the buffer already released.

Every threshold is "0 = off". The defaults (:class:`FilterConfig`) are for production road fleets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fleetstream.domain.geo import haversine_m
from fleetstream.domain.models import HOLDING_TS, DeviceState, FilterReason, Position

# Enum member lookups cost ~0.5 µs each on Python 3.11; these run per fix.
INVALID = FilterReason.INVALID
DUPLICATE = FilterReason.DUPLICATE
OUT_OF_ORDER = FilterReason.OUT_OF_ORDER
LATE = FilterReason.LATE
FUTURE = FilterReason.FUTURE
TOO_OLD = FilterReason.TOO_OLD
LOW_ACCURACY = FilterReason.LOW_ACCURACY
IMPLIED_SPEED = FilterReason.IMPLIED_SPEED
DOWNSAMPLED_TIME = FilterReason.DOWNSAMPLED_TIME
DOWNSAMPLED_DISTANCE = FilterReason.DOWNSAMPLED_DISTANCE

_INF = math.inf


@dataclass(frozen=True, slots=True)
class FilterConfig:
    """Each filter's switch and threshold; a threshold of 0 turns its filter off.

    ``duplicate`` and ``out_of_order`` cannot be turned off: state only moves forward in event time (trips,
    odometer and derived speed assume it).
    """

    reject_null_island: bool = True
    """``invalid`` for exactly (0, 0): an unset receiver's default, never a real fix on a road. Non-finite or
    out-of-range coordinates are always ``invalid`` (the codec already dead-letters them)."""
    max_future_s: float = 60.0
    """``future`` beyond this ahead of the worker's clock. Tighter than the codec's ``max_future_skew_s`` (300 s,
    dead-lettered): one accepted fix minutes ahead would make the device's real fixes ``out_of_order`` until
    the clock catches up."""
    max_age_s: float = 0.0
    """``too_old`` beyond this behind the worker's clock. Off by default: trackers upload hours of buffered fixes
    after a dead zone, and a worker catching up on a backlog sees every fix as old."""
    max_accuracy_m: float = 100.0
    """``low_accuracy`` when the reported accuracy (1-sigma radius) is worse. 100 m passes GPS fixes and rejects
    cell-tower / Wi-Fi fallback positions (hundreds of metres and worse). Fixes without accuracy pass."""
    max_speed_kmh: float = 300.0
    """``implied_speed`` when reaching the fix from the last accepted one needs more than this (an outlier jump).
    The fix's reported accuracy is allowed as slack: ``distance - accuracy > max_speed * dt``. 300 km/h is above
    any road vehicle; raise it for aircraft and high-speed rail."""
    min_interval_s: float = 0.0
    """``downsampled_time`` when less than this after the last accepted fix (time-based downsampling)."""
    min_distance_m: float = 0.0
    """``downsampled_distance`` when closer than this to the last accepted fix (distance-based downsampling).
    A parked device then has no accepted fixes; its stop is still found, from the gap (see trips)."""
    reorder_window_s: float = 0.0
    """Event-time window within which a device's fixes are re-sorted before state changes
    (:class:`ReorderBuffer`); older arrivals are ``late``. 0: nothing is held."""

    # derived once, read per fix
    max_future_ms: int = field(init=False, repr=False, compare=False)
    max_age_ms: int = field(init=False, repr=False, compare=False)
    accuracy_limit_m: float = field(init=False, repr=False, compare=False)  # inf when off
    max_m_per_ms: float = field(init=False, repr=False, compare=False)  # inf when off
    min_interval_ms: int = field(init=False, repr=False, compare=False)
    reorder_window_ms: int = field(init=False, repr=False, compare=False)
    relative: bool = field(init=False, repr=False, compare=False)  # any of implied speed / downsampling is on

    def __post_init__(self) -> None:
        for name in ("max_future_s", "max_age_s", "max_accuracy_m", "max_speed_kmh", "min_interval_s",
                     "min_distance_m", "reorder_window_s"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"{name}: {value!r} must be a finite number >= 0 (0 turns the filter off)")
        setattr_ = object.__setattr__
        setattr_(self, "max_future_ms", round(self.max_future_s * 1000))
        setattr_(self, "max_age_ms", round(self.max_age_s * 1000))
        setattr_(self, "accuracy_limit_m", self.max_accuracy_m or _INF)
        setattr_(self, "max_m_per_ms", self.max_speed_kmh / 3600.0 if self.max_speed_kmh else _INF)
        setattr_(self, "min_interval_ms", round(self.min_interval_s * 1000))
        setattr_(self, "reorder_window_ms", round(self.reorder_window_s * 1000))
        setattr_(self, "relative", bool(self.max_speed_kmh or self.min_interval_s or self.min_distance_m))

    @classmethod
    def off(cls) -> FilterConfig:
        """Every optional filter off: only invalid coordinates, duplicates and out-of-order fixes are filtered."""
        return cls(reject_null_island=False, max_future_s=0, max_age_s=0, max_accuracy_m=0, max_speed_kmh=0,
                   min_interval_s=0, min_distance_m=0, reorder_window_s=0)


def valid_coordinates(lat: float, lon: float) -> bool:
    """Finite and in range (comparisons with NaN are false, so NaN fails too)."""
    return -90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0


def intrinsic_reason(fix: Position, config: FilterConfig, now_ms: int | None = None) -> str | None:
    """The checks on the fix alone: ``invalid``, then (with ``now_ms``) ``future`` / ``too_old``, then
    ``low_accuracy``. Run these before pushing a fix into a :class:`ReorderBuffer`."""
    lat = fix.lat
    lon = fix.lon
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0) or (
        lat == 0.0 and lon == 0.0 and config.reject_null_island
    ):
        return INVALID
    if now_ms is not None:
        if config.max_future_ms and fix.ts_ms > now_ms + config.max_future_ms:
            return FUTURE
        if config.max_age_ms and fix.ts_ms < now_ms - config.max_age_ms:
            return TOO_OLD
    accuracy = fix.accuracy_m
    if accuracy is not None and accuracy > config.accuracy_limit_m:
        return LOW_ACCURACY
    return None


def relative_reason(state: DeviceState, fix: Position, config: FilterConfig, distance_m: float) -> str | None:
    """The checks against the last accepted fix (``state``); ``distance_m`` is the great-circle distance from it
    (the caller has it anyway: the tracker needs it for the odometer)."""
    dt = fix.ts_ms - state.ts_ms
    if dt <= 0:
        return DUPLICATE if dt == 0 else OUT_OF_ORDER
    if config.relative:
        accuracy = fix.accuracy_m
        if distance_m - (accuracy if accuracy is not None else 0.0) > config.max_m_per_ms * dt:
            return IMPLIED_SPEED
        if dt < config.min_interval_ms:
            return DOWNSAMPLED_TIME
        if distance_m < config.min_distance_m:
            return DOWNSAMPLED_DISTANCE
    return None


def check_fix(
    state: DeviceState | None, fix: Position, config: FilterConfig, now_ms: int | None = None
) -> str | None:
    """The whole chain for one fix against the device's last accepted state (None, or a state without an accepted
    fix: its first fix).

    Clock checks (``future``, ``too_old``) run only when ``now_ms`` is given. ``step_position`` runs the same
    chain itself; this is for callers that want the verdict alone.
    """
    reason = intrinsic_reason(fix, config, now_ms)
    if reason is not None or state is None or state.ts_ms == HOLDING_TS:
        return reason
    return relative_reason(state, fix, config, haversine_m(state.lat, state.lon, fix.lat, fix.lon))


# --- reordering ---------------------------------------------------------------------------------------------------


class Held(NamedTuple):
    """A fix waiting in a :class:`ReorderBuffer`, with when it arrived and the caller's tag for it."""

    fix: Position
    arrival_ms: int  # the worker's clock at push: the hold time counts from here
    source: Any = None  # caller's JSON-able tag (e.g. the input record's partition, offset, index); lists stay lists


class ReorderBuffer(NamedTuple):
    """One device's fixes held for re-sorting by event time. Immutable: every operation returns a new buffer, so a
    state still in flight (not yet acknowledged) is never changed under the caller.

    A fix is released once the newest ts pushed minus the window has passed it, or once it has been held for the
    window in wall time (:meth:`flush`, from a timer, so that a device that went silent is not stuck). A fix older
    than one already released is ``late``: it can no longer be put in order. Releases are always in ts order
    (ties in arrival order), and every pushed fix comes out exactly once, released or late.
    """

    max_ts: int | None = None  # newest ts pushed
    released_ts: int | None = None  # newest ts released
    held: tuple[Held, ...] = ()  # sorted by ts, ties in arrival order

    def push(
        self, fix: Position, now_ms: int, window_ms: int, source: Any = None
    ) -> tuple[ReorderBuffer, tuple[Held, ...], tuple[Held, ...]]:
        """Add one fix; returns (new buffer, released in ts order, late)."""
        item = Held(fix, now_ms, source)
        ts = fix.ts_ms
        released_ts = self.released_ts
        if released_ts is not None and ts < released_ts:
            return self, (), (item,)
        max_ts = self.max_ts
        if max_ts is None or ts > max_ts:
            max_ts = ts
        held = self.held
        at = len(held)
        while at and held[at - 1].fix.ts_ms > ts:
            at -= 1
        held = (*held[:at], item, *held[at:])
        watermark = max_ts - window_ms
        count = 0
        for h in held:
            if h.fix.ts_ms > watermark:
                break
            count += 1
        if not count:
            return ReorderBuffer(max_ts, released_ts, held), (), ()
        released = held[:count]
        return ReorderBuffer(max_ts, released[-1].fix.ts_ms, held[count:]), released, ()

    def flush(self, now_ms: int, window_ms: int) -> tuple[ReorderBuffer, tuple[Held, ...]]:
        """Release what has been held for ``window_ms`` by ``now_ms``, with every older fix (to stay in order)."""
        cut: int | None = None
        for h in self.held:
            if h.arrival_ms + window_ms <= now_ms and (cut is None or h.fix.ts_ms > cut):
                cut = h.fix.ts_ms
        if cut is None:
            return self, ()
        count = 0
        for h in self.held:
            if h.fix.ts_ms > cut:
                break
            count += 1
        released = self.held[:count]
        return ReorderBuffer(self.max_ts, released[-1].fix.ts_ms, self.held[count:]), released

    def due_ms(self, window_ms: int) -> int | None:
        """When :meth:`flush` will next release something (None: nothing held): for the caller's timer."""
        if not self.held:
            return None
        return min(h.arrival_ms for h in self.held) + window_ms

    def to_list(self) -> list[Any]:
        """Plain JSON-able lists for the changelogged device state."""
        return [self.max_ts, self.released_ts, [[h.arrival_ms, h.source, list(h.fix)] for h in self.held]]

    @classmethod
    def from_list(cls, data: Sequence[Any]) -> ReorderBuffer:  # type: ignore[misc]
        max_ts, released_ts, held = data
        return cls(max_ts, released_ts, tuple(Held(Position(*fix), arrival, source) for arrival, source, fix in held))


def batch_order(fixes: Sequence[Position]) -> list[int] | None:
    """Within one batch: a permutation putting each device's fixes in ts order (stable: ties keep arrival order),
    each device keeping the batch positions it had, so other devices' fixes do not move. ``None`` (the usual
    case, one dict lookup per fix) when every device's fixes already are in order.

    Use: ``order = batch_order(fixes); if order is not None: items = [items[i] for i in order]``.
    """
    newest: dict[str, int] = {}
    disordered: set[str] = set()
    get = newest.get
    for fix in fixes:
        device = fix.device_id
        ts = fix.ts_ms
        last = get(device)
        if last is not None and ts < last:
            disordered.add(device)
        else:
            newest[device] = ts
    if not disordered:
        return None
    slots: dict[str, list[int]] = {}
    for i, fix in enumerate(fixes):
        if fix.device_id in disordered:
            slots.setdefault(fix.device_id, []).append(i)
    order = list(range(len(fixes)))
    for positions in slots.values():
        for slot, i in zip(positions, sorted(positions, key=lambda i: fixes[i].ts_ms), strict=True):
            order[slot] = i
    return order
