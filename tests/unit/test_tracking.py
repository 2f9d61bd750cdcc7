from __future__ import annotations

import h3
from hypothesis import given
from hypothesis import strategies as st

from fleetstream.domain.geo import haversine_m
from fleetstream.domain.models import FilterReason, Motion, Position
from fleetstream.domain.tracking import TrackingConfig, step_position

CONFIG = TrackingConfig(h3_resolution=9, extra_resolutions=(7,), stop_speed_kmh=3.0)


def test_first_fix_has_no_distance_and_reported_speed_wins():
    state, e = step_position(None, Position("d", 1000, 53.4, -2.98, speed_kmh=30.0), CONFIG)
    assert e.distance_m == 0 and e.odometer_m == 0
    assert (e.speed_kmh, e.speed_source, e.motion) == (30.0, "reported", Motion.MOVING)
    assert e.h3 == h3.latlng_to_cell(53.4, -2.98, 9)
    assert e.h3_cells == {"7": h3.latlng_to_cell(53.4, -2.98, 7)}
    assert state.fixes == 1


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


fixes = st.lists(
    st.tuples(st.integers(0, 10**7), st.floats(-80, 80), st.floats(-179, 179)), min_size=1, max_size=40
)


@given(fixes)
def test_odometer_is_sum_of_accepted_legs(raw):
    """Reference: accept a fix only if strictly newer than the last accepted; sum haversine legs."""
    state = None
    expected, last = 0.0, None
    for ts, lat, lon in raw:
        state, e = step_position(state, Position("d", ts, lat, lon), CONFIG)
        if last is None or ts > last[0]:
            if last is not None:
                expected += haversine_m(last[1], last[2], lat, lon)
            last = (ts, lat, lon)
            assert e.filtered is None
        else:
            assert e.filtered is not None
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
