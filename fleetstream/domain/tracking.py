"""Per-device position tracking: the pure step that turns (last state, new fix) into (new state, enrichment).

The worker calls :func:`step_position` once per fix, in arrival order per device, then writes the final state
once per device per batch. A fix that is not newer than the last accepted one never changes the state (it is
published flagged ``filtered`` so that every input is still accounted for).
"""

from __future__ import annotations

from dataclasses import dataclass

import h3

from fleetstream.domain.geo import bearing_deg, haversine_m
from fleetstream.domain.models import DeviceState, FilterReason, Motion, Position

# Below this displacement a derived heading is GPS noise; keep the previous heading instead.
MIN_HEADING_DISTANCE_M = 2.0


@dataclass(frozen=True, slots=True)
class TrackingConfig:
    h3_resolution: int = 9
    extra_resolutions: tuple[int, ...] = ()
    stop_speed_kmh: float = 3.0


@dataclass(frozen=True, slots=True)
class Enrichment:
    """What a fix gains on its way to ``fleet.positions.enriched``."""

    h3: str
    h3_cells: dict[str, str] | None
    distance_m: float
    odometer_m: float
    speed_kmh: float | None
    speed_source: str  # reported | derived | none
    heading_deg: float | None
    heading_source: str
    motion: Motion
    filtered: FilterReason | None = None


def h3_cells(lat: float, lon: float, config: TrackingConfig) -> tuple[str, dict[str, str] | None]:
    primary = h3.latlng_to_cell(lat, lon, config.h3_resolution)
    if not config.extra_resolutions:
        return primary, None
    return primary, {str(res): h3.latlng_to_cell(lat, lon, res) for res in config.extra_resolutions}


def step_position(
    state: DeviceState | None, fix: Position, config: TrackingConfig
) -> tuple[DeviceState, Enrichment]:
    """Advance one device by one fix. Pure: same inputs, same outputs."""
    cell, cells = h3_cells(fix.lat, fix.lon, config)
    if state is not None and fix.ts_ms <= state.ts_ms:
        reason = FilterReason.DUPLICATE if fix.ts_ms == state.ts_ms else FilterReason.OUT_OF_ORDER
        speed, speed_source = _reported_or(fix.speed_kmh, None)
        heading, heading_source = _reported_or(fix.heading_deg, None)
        return state, Enrichment(
            h3=cell, h3_cells=cells, distance_m=0.0, odometer_m=state.odometer_m,
            speed_kmh=speed, speed_source=speed_source, heading_deg=heading, heading_source=heading_source,
            motion=state.motion, filtered=reason,
        )

    if state is None:
        distance_m = 0.0
        derived_speed = None
        derived_heading = None
        odometer_m = 0.0
        fixes = 0
    else:
        distance_m = haversine_m(state.lat, state.lon, fix.lat, fix.lon)
        dt_s = (fix.ts_ms - state.ts_ms) / 1000.0
        derived_speed = distance_m / dt_s * 3.6
        derived_heading = (
            bearing_deg(state.lat, state.lon, fix.lat, fix.lon)
            if distance_m >= MIN_HEADING_DISTANCE_M
            else state.heading_deg
        )
        odometer_m = state.odometer_m + distance_m
        fixes = state.fixes

    speed, speed_source = _reported_or(fix.speed_kmh, derived_speed)
    heading, heading_source = _reported_or(fix.heading_deg, derived_heading)
    if speed is None:
        motion = Motion.UNKNOWN
    else:
        motion = Motion.STOPPED if speed <= config.stop_speed_kmh else Motion.MOVING
    new_state = DeviceState(
        device_id=fix.device_id, ts_ms=fix.ts_ms, lat=fix.lat, lon=fix.lon, odometer_m=odometer_m,
        speed_kmh=speed, heading_deg=heading, motion=motion, fixes=fixes + 1, h3=cell,
        geofences=state.geofences if state is not None else (),
    )
    return new_state, Enrichment(
        h3=cell, h3_cells=cells, distance_m=distance_m, odometer_m=odometer_m, speed_kmh=speed,
        speed_source=speed_source, heading_deg=heading, heading_source=heading_source, motion=motion,
    )


def _reported_or(reported: float | None, derived: float | None) -> tuple[float | None, str]:
    if reported is not None:
        return reported, "reported"
    if derived is not None:
        return derived, "derived"
    return None, "none"
