"""Motion with hysteresis, stops and the trips between them. Pure: (previous state, accepted fix) -> what changes.

The rules (thresholds from :class:`~fleetstream.domain.tracking.TrackingConfig`):

- A device becomes **stopped** only after being slow (speed <= ``stop_speed_kmh``) for ``stop_after_s`` while
  staying within ``start_distance_m`` of where it slowed down. The first slow fix opens a stop *candidate*; the
  stop, once confirmed, starts there (time, place, odometer, geofences), and the trip before it ends there.
  A faster fix (even one between the two thresholds: slowness must be continuous) or leaving the radius drops
  the candidate. A derived speed (no speed reported) is GPS noise at short intervals, so with derived speeds the
  radius alone keeps a candidate alive.
- A stopped device is **moving** again when its reported speed exceeds ``start_speed_kmh`` (above the stop speed:
  the hysteresis band) or it is more than ``start_distance_m`` from the stop's place. A derived speed alone never
  ends a stop (jitter of a parked receiver would). The stop ends, and the next trip starts, at the last fix
  before it moved (the last one known stopped).
- A **gap**: when a fix comes ``stop_after_s`` or more after the previous accepted one and the average speed over
  the gap is <= ``stop_speed_kmh``, the device was stopped through the gap (trackers sleep when parked, and
  distance downsampling drops a parked device's fixes). The stop runs from the candidate (or the previous fix)
  to this fix; if this fix moves on, the stop ends here.
- The first fixes of a device are ``unknown`` until it is seen moving (speed > ``start_speed_kmh``: the trip
  starts at the previous fix, or here for a first fix) or a stop is confirmed.

Stops and trips tile a device's timeline once its motion is known: each closed trip ends where and when the next
stop starts, each stop ends where the next trip starts, and every leg between accepted fixes belongs to exactly
one of them, so trips' plus stops' ``distance_m`` (a stop's is receiver drift, or creeping) add up to the
odometer. Ids are deterministic (device, kind, start time): a replay gives the same ids.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from fleetstream.domain.models import DeviceState, Motion, Position, StopState, TripState

if TYPE_CHECKING:
    from fleetstream.domain.tracking import TrackingConfig

_MOVING, _STOPPED, _UNKNOWN = Motion.MOVING, Motion.STOPPED, Motion.UNKNOWN
_NONE: tuple[()] = ()
_HALF_RAD = math.pi / 360.0


def within(lat: float, lon: float, place: StopState, radius_deg2: float) -> bool:
    """Whether (lat, lon) is within the radius of ``place``; ``radius_deg2`` is (radius in degrees of arc) squared,
    precomputed (``TrackingConfig.start_radius_deg2``). Equirectangular: a few multiplications instead of the
    haversine's trigonometry, and well under 0.1 % off at the radii this decides (up to kilometres)."""
    dlat = lat - place.lat
    dlon = lon - place.lon
    if dlon > 180.0:
        dlon -= 360.0
    elif dlon < -180.0:
        dlon += 360.0
    x = dlon * math.cos((lat + place.lat) * _HALF_RAD)
    return dlat * dlat + x * x <= radius_deg2


def trip_id(device_id: str, start_ms: int) -> str:
    """Stable id of the trip of ``device_id`` that started at ``start_ms``."""
    return f"{device_id}:trip:{start_ms}"


def stop_id(device_id: str, start_ms: int) -> str:
    """Stable id of the stop of ``device_id`` that started at ``start_ms``."""
    return f"{device_id}:stop:{start_ms}"


class TripEvent(NamedTuple):
    """A closed trip, for ``fleet.trips`` (schemas/trip.json)."""

    trip_id: str
    device_id: str
    start_ms: int
    end_ms: int
    start_lat: float
    start_lon: float
    end_lat: float
    end_lon: float
    start_geofences: tuple[str, ...]
    end_geofences: tuple[str, ...]
    distance_m: float
    max_speed_kmh: float
    start_odometer_m: float

    @property
    def duration_s(self) -> float:
        return (self.end_ms - self.start_ms) / 1000.0

    @property
    def avg_speed_kmh(self) -> float:
        """Distance over duration (0 for a zero-length trip), not the mean of the fixes' speeds: fixes are not
        evenly spaced in time."""
        duration_ms = self.end_ms - self.start_ms
        return self.distance_m / duration_ms * 3600.0 if duration_ms > 0 else 0.0

    def to_message(self, format_ts: Callable[[int], str]) -> dict[str, Any]:
        """The ``fleet.trips`` message; ``format_ts`` is ``fleetstream.codecs.format_ts``."""
        return {
            "type": "trip", "trip_id": self.trip_id, "device_id": self.device_id,
            "start_ts": format_ts(self.start_ms), "end_ts": format_ts(self.end_ms), "duration_s": self.duration_s,
            "start_lat": self.start_lat, "start_lon": self.start_lon, "end_lat": self.end_lat, "end_lon": self.end_lon,
            "start_geofences": list(self.start_geofences), "end_geofences": list(self.end_geofences),
            "distance_m": self.distance_m, "max_speed_kmh": self.max_speed_kmh, "avg_speed_kmh": self.avg_speed_kmh,
            "start_odometer_m": self.start_odometer_m, "end_odometer_m": self.start_odometer_m + self.distance_m,
        }


class StopEvent(NamedTuple):
    """A closed stop, for ``fleet.trips`` (schemas/trip.json)."""

    stop_id: str
    device_id: str
    start_ms: int
    end_ms: int
    lat: float
    lon: float
    geofences: tuple[str, ...]
    distance_m: float  # odometer increase during the stop: receiver drift, or creeping below the thresholds
    odometer_m: float  # the odometer when the stop started

    @property
    def duration_s(self) -> float:
        return (self.end_ms - self.start_ms) / 1000.0

    def to_message(self, format_ts: Callable[[int], str]) -> dict[str, Any]:
        """The ``fleet.trips`` message; ``format_ts`` is ``fleetstream.codecs.format_ts``."""
        return {
            "type": "stop", "stop_id": self.stop_id, "device_id": self.device_id,
            "start_ts": format_ts(self.start_ms), "end_ts": format_ts(self.end_ms), "duration_s": self.duration_s,
            "lat": self.lat, "lon": self.lon, "geofences": list(self.geofences), "distance_m": self.distance_m,
            "odometer_m": self.odometer_m,
        }


TrackEvent = TripEvent | StopEvent


def close_trip(device_id: str, trip: TripState, end: StopState) -> TripEvent:
    """The trip ``trip`` ended where the stop ``end`` started."""
    return TripEvent(
        trip_id(device_id, trip.start_ms), device_id, trip.start_ms, end.start_ms, trip.lat, trip.lon, end.lat,
        end.lon, trip.geofences, end.geofences, end.odometer_m - trip.odometer_m, trip.max_speed_kmh, trip.odometer_m,
    )


def close_stop(device_id: str, stop: StopState, end_ms: int, end_odometer_m: float) -> StopEvent:
    return StopEvent(
        stop_id(device_id, stop.start_ms), device_id, stop.start_ms, end_ms, stop.lat, stop.lon, stop.geofences,
        end_odometer_m - stop.odometer_m, stop.odometer_m,
    )


def advance(
    prev: DeviceState | None, fix: Position, speed: float | None, reported: bool, leg_m: float, odometer_m: float,
    geofences: tuple[str, ...], config: TrackingConfig,
) -> tuple[Motion, TripState | None, StopState | None, tuple[TrackEvent, ...]]:
    """One accepted fix's effect on motion: (motion, open trip, stop or candidate, events closed by this fix).

    ``speed`` is the fix's speed (reported, else derived; None only for a first fix without one), ``reported``
    whether it was reported, ``leg_m`` the distance from ``prev`` and ``odometer_m`` the odometer including it.
    """
    if prev is None:
        motion, trip, stop = _UNKNOWN, None, None
    else:
        motion, trip, stop = prev.motion, prev.trip, prev.stop
        # the common case first: moving, no candidate, fast enough, no gap -- at most the top speed changes
        if (
            motion is _MOVING and stop is None and trip is not None and speed is not None
            and speed > config.stop_speed_kmh and fix.ts_ms - prev.ts_ms < config.stop_after_ms
        ):
            if speed > trip.max_speed_kmh:
                trip = trip._replace(max_speed_kmh=speed)
            return motion, trip, None, _NONE
        if motion is _MOVING and trip is None:  # a state written before trips existed
            trip = TripState(prev.ts_ms, prev.lat, prev.lon, prev.odometer_m, prev.geofences, prev.speed_kmh or 0.0)
        elif motion is _STOPPED and stop is None:
            stop = StopState(prev.ts_ms, prev.lat, prev.lon, prev.odometer_m, prev.geofences)
    if speed is None:  # a first fix without a reported speed: nothing known yet
        return motion, trip, stop, _NONE

    device_id = fix.device_id
    ts = fix.ts_ms
    closed: tuple[TrackEvent, ...] = _NONE
    stop_speed = config.stop_speed_kmh
    radius2 = config.start_radius_deg2

    if prev is not None:
        dt = ts - prev.ts_ms
        if dt >= config.stop_after_ms and leg_m * 3600.0 <= stop_speed * dt:  # stopped through the gap
            if motion is not _STOPPED:
                if stop is None:
                    stop = StopState(prev.ts_ms, prev.lat, prev.lon, prev.odometer_m, prev.geofences)
                if trip is not None:
                    closed = (close_trip(device_id, trip, stop),)
                motion, trip = _STOPPED, None
            assert stop is not None
            if (reported and speed > config.start_speed_kmh) or not within(fix.lat, fix.lon, stop, radius2):
                closed = (*closed, close_stop(device_id, stop, ts, odometer_m))
                return _MOVING, TripState(ts, fix.lat, fix.lon, odometer_m, geofences, speed), None, closed
            return _STOPPED, None, stop, closed

    if motion is _STOPPED:
        assert stop is not None and prev is not None
        if not (reported and speed > config.start_speed_kmh) and within(fix.lat, fix.lon, stop, radius2):
            return _STOPPED, None, stop, _NONE
        closed = (close_stop(device_id, stop, prev.ts_ms, prev.odometer_m),)
        motion, stop = _MOVING, None
        trip = TripState(prev.ts_ms, prev.lat, prev.lon, prev.odometer_m, prev.geofences, speed)
        # then as any moving fix: a creeping one (slow but out of the radius) opens a candidate at once

    if stop is not None:  # a candidate
        if (not reported or speed <= stop_speed) and within(fix.lat, fix.lon, stop, radius2):
            if ts - stop.start_ms >= config.stop_after_ms:
                if trip is not None:
                    closed = (*closed, close_trip(device_id, trip, stop))
                return _STOPPED, None, stop, closed
            return motion, trip, stop, closed
        stop = None
    if speed <= stop_speed:
        stop = StopState(ts, fix.lat, fix.lon, odometer_m, geofences)
        if config.stop_after_ms <= 0:
            if trip is not None:
                closed = (*closed, close_trip(device_id, trip, stop))
            return _STOPPED, None, stop, closed
        return motion, trip, stop, closed
    if motion is _UNKNOWN and speed > config.start_speed_kmh:
        motion = _MOVING
        if prev is None:
            trip = TripState(ts, fix.lat, fix.lon, odometer_m, geofences, speed)
        else:
            trip = TripState(prev.ts_ms, prev.lat, prev.lon, prev.odometer_m, prev.geofences, speed)
    elif trip is not None and speed > trip.max_speed_kmh:
        trip = trip._replace(max_speed_kmh=speed)
    return motion, trip, None, closed
