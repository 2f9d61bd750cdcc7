from __future__ import annotations

import math

import h3
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleetstream.domain.filters import FilterConfig, ReorderBuffer
from fleetstream.domain.geo import destination, haversine_m
from fleetstream.domain.models import DeviceState, FilterReason, Motion, Position, StopState, TripState
from fleetstream.domain.tracking import TrackingConfig, filtered_enrichment, step_position

CONFIG = TrackingConfig(h3_resolution=9, extra_resolutions=(7,), stop_speed_kmh=3.0)


def test_first_fix_has_no_distance_and_reported_speed_wins():
    state, e = step_position(None, Position("d", 1000, 53.4, -2.98, speed_kmh=30.0), CONFIG)
    assert e.distance_m == 0 and e.odometer_m == 0
    assert (e.speed_kmh, e.speed_source, e.motion) == (30.0, "reported", Motion.MOVING)
    assert e.h3 == h3.latlng_to_cell(53.4, -2.98, 9)
    assert e.h3_cells == {"7": h3.latlng_to_cell(53.4, -2.98, 7)}
    assert state.fixes == 1 and e.filtered is None and e.closed == ()


def test_derived_speed_and_heading():
    s1, _ = step_position(None, Position("d", 0, 53.4, -2.98), CONFIG)
    s2, e = step_position(s1, Position("d", 10_000, 53.4009, -2.98), CONFIG)  # ~100 m north in 10 s
    assert e.speed_source == "derived" and 35 < e.speed_kmh < 37
    assert e.heading_source == "derived" and (e.heading_deg < 1 or e.heading_deg > 359)
    assert e.odometer_m == s2.odometer_m == e.distance_m


def test_stale_fixes_do_not_change_state():
    s1, _ = step_position(None, Position("d", 5000, 53.4, -2.98), CONFIG)
    s2, e = step_position(s1, Position("d", 5000, 53.5, -2.98), CONFIG)
    assert s2 is s1 and e.filtered is FilterReason.DUPLICATE and e.distance_m == 0
    s3, e = step_position(s1, Position("d", 4000, 53.5, -2.98), CONFIG)
    assert s3 is s1 and e.filtered is FilterReason.OUT_OF_ORDER and e.odometer_m == s1.odometer_m
    assert e.filtered == "out_of_order"  # a str: what the enriched message and the metric label carry


def test_a_filtered_fix_keeps_the_fixs_own_values_and_the_devices_motion():
    s1, _ = step_position(None, Position("d", 0, 53.4, -2.98, speed_kmh=50.0), CONFIG)
    s2, e = step_position(s1, Position("d", 1000, 53.4, -2.98, speed_kmh=4.0, heading_deg=90.0, accuracy_m=900.0),
                          CONFIG)
    assert s2 is s1 and e.filtered == "low_accuracy"
    assert (e.speed_kmh, e.speed_source, e.heading_deg, e.heading_source) == (4.0, "reported", 90.0, "reported")
    assert (e.motion, e.odometer_m, e.distance_m, e.closed) == (Motion.MOVING, 0.0, 0.0, ())
    assert e.h3 == h3.latlng_to_cell(53.4, -2.98, 9) and e.h3_cells == {"7": h3.latlng_to_cell(53.4, -2.98, 7)}


def test_the_clock_filters_run_when_the_worker_passes_its_clock():
    now = 1_795_600_800_000
    fix = Position("d", now + 120_000, 53.4, -2.98)
    assert step_position(None, fix, CONFIG, now)[1].filtered == "future"
    assert step_position(None, fix, CONFIG)[1].filtered is None


def test_late_fixes_from_a_reorder_buffer_get_a_filtered_enrichment():
    s1, _ = step_position(None, Position("d", 5000, 53.4, -2.98, speed_kmh=20.0), CONFIG)
    e = filtered_enrichment(s1, Position("d", 1000, 53.41, -2.98), FilterReason.LATE, CONFIG)
    assert (e.filtered, e.odometer_m, e.distance_m, e.motion) == ("late", 0.0, 0.0, Motion.MOVING)
    assert e.h3 == h3.latlng_to_cell(53.41, -2.98, 9)


def test_geofences_and_the_reorder_buffer_ride_along_in_the_state():
    buffer = ReorderBuffer(7000, 5000, ())
    s1 = DeviceState("d", 5000, 53.4, -2.98, held=buffer, geofences=("old",))
    s2, _ = step_position(s1, Position("d", 6000, 53.4, -2.98), CONFIG, geofences=("depot",))
    assert s2.held is buffer and s2.geofences == ("depot",)


def test_trips_off_is_motion_from_speed_alone():
    config = TrackingConfig(trips=False)
    s1, e1 = step_position(None, Position("d", 0, 53.4, -2.98, speed_kmh=2.0), config)
    s2, e2 = step_position(s1, Position("d", 1000, 53.4, -2.98, speed_kmh=4.0), config)
    assert (e1.motion, e2.motion) == (Motion.STOPPED, Motion.MOVING) and s2.trip is None and s2.stop is None


def test_config_refuses_an_inverted_hysteresis_band():
    with pytest.raises(ValueError, match="start_speed_kmh"):
        TrackingConfig(stop_speed_kmh=10.0, start_speed_kmh=5.0)
    with pytest.raises(ValueError, match="start_distance_m"):
        TrackingConfig(start_distance_m=0)


# --- device state storage -----------------------------------------------------------------------------------------

def test_device_state_round_trips_with_trip_stop_and_held_fixes():
    buffer, _, _ = ReorderBuffer().push(Position("d", 9000, 53.4, -2.98, 12.0), 1, 10_000, source=[0, 5, 1])
    state = DeviceState("d", 8000, 53.4, -2.98, 120.5, 12.0, 90.0, Motion.MOVING, 3, "89195da49a3ffff", ("a",),
                        None, TripState(1000, 53.39, -2.98, 10.0, ("depot",), 50.0),
                        StopState(7000, 53.4, -2.98, 118.0, ("a",)), buffer)
    stored = orjson.loads(orjson.dumps(state.to_dict()))
    assert DeviceState.from_dict(stored) == state
    assert stored["trip"]["geofences"] == ["depot"] and stored["held"][2][0][1] == [0, 5, 1]


def test_a_state_stored_before_filters_and_trips_loads():
    old = {"device_id": "d", "ts_ms": 1, "lat": 53.4, "lon": -2.98, "odometer_m": 5.0, "speed_kmh": None,
           "heading_deg": None, "motion": "stopped", "fixes": 1, "h3": None, "geofences": [], "fences": None}
    state = DeviceState.from_dict(old)
    assert (state.trip, state.stop, state.held, state.motion) == (None, None, None, Motion.STOPPED)
    assert DeviceState.from_dict(state.to_dict()) == state and "trip" not in state.to_dict()


# --- properties -----------------------------------------------------------------------------------------------------

def implied_ok(last: tuple[int, float, float], ts: int, lat: float, lon: float, max_kmh: float) -> bool:
    return haversine_m(last[1], last[2], lat, lon) <= max_kmh / 3.6 * (ts - last[0]) / 1000


fixes = st.lists(
    st.tuples(
        st.integers(0, 10**7),
        st.one_of(
            st.tuples(st.just("step"), st.floats(0, 5000), st.floats(0, 359)),  # metres, bearing from the last fix
            st.tuples(st.just("at"), st.floats(-80, 80), st.floats(-179, 179)),  # anywhere: mostly a jump
            st.just(("null_island", 0.0, 0.0)),
        ),
    ),
    min_size=1, max_size=40,
)


@given(fixes)
def test_odometer_is_the_sum_of_accepted_legs_and_rejected_jumps_add_nothing(raw):
    """Reference, with the default filters: a fix is accepted when it is not (0, 0), strictly newer than the last
    accepted one and reachable from it at 300 km/h; the odometer is the sum of haversine legs between accepted
    fixes only."""
    state = None
    expected, last = 0.0, None
    lat, lon = 53.4, -2.98
    for ts, (kind, a, b) in raw:
        lat, lon = destination(lat, lon, b, a) if kind == "step" else (a, b)
        state, e = step_position(state, Position("d", ts, lat, lon), TrackingConfig(filters=FilterConfig()))
        accept = (lat, lon) != (0.0, 0.0) and (
            last is None or (ts > last[0] and implied_ok(last, ts, lat, lon, 300.0))
        )
        if accept:
            if last is not None:
                expected += haversine_m(last[1], last[2], lat, lon)
            last = (ts, lat, lon)
            assert e.filtered is None
        else:
            assert e.filtered is not None and e.distance_m == 0.0
        assert math.isclose(e.odometer_m, expected, rel_tol=1e-9, abs_tol=1e-6)
    if last is None:
        assert state is None
    else:
        assert abs(state.odometer_m - expected) <= 1e-6 * max(1.0, expected)
        assert state.ts_ms == last[0]


@given(st.floats(-89, 89), st.floats(-179, 179), st.floats(-89, 89), st.floats(-179, 179))
def test_distance_bearing_matches_separate_formulas(lat1, lon1, lat2, lon2):
    from fleetstream.domain.geo import bearing_deg, distance_bearing

    distance, bearing = distance_bearing(lat1, lon1, lat2, lon2)
    assert abs(distance - haversine_m(lat1, lon1, lat2, lon2)) <= 1e-6 * max(1.0, distance)
    if distance > 1.0:
        diff = abs(bearing - bearing_deg(lat1, lon1, lat2, lon2)) % 360.0
        assert min(diff, 360.0 - diff) < 1e-6


def test_without_geofences_given_the_step_keeps_the_previous_ones():
    s1 = DeviceState("d", 5000, 53.4, -2.98, geofences=("depot",), fixes=1)
    s2, _ = step_position(s1, Position("d", 6000, 53.4, -2.98), CONFIG)
    assert s2.geofences == ("depot",)
    first, _ = step_position(None, Position("d", 6000, 53.4, -2.98), CONFIG)
    assert first.geofences == ()


def test_with_fences_and_with_geofences_are_replace():
    state = DeviceState("d", 1, 2.0, 3.0, 4.0, 5.0, 6.0, Motion.MOVING, 7, "h", ("g",), None,
                        TripState(0, 1.0, 2.0, 3.0, (), 4.0), None, None)
    assert state.with_fences({"g": 1}) == state._replace(fences={"g": 1})
    assert type(state.with_fences(None)) is DeviceState
    assert state.with_geofences(("a", "b")) == state._replace(geofences=("a", "b"))
    assert type(state.with_geofences(())) is DeviceState
