"""Motion with hysteresis, stops and trips: hand-checked scenarios, the fleet.trips contract, and properties (stops
and trips tile the timeline and the odometer; a state round-trip mid-sequence changes nothing)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence

import jsonschema
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetstream.codecs import DecodeError, format_ts, load_schema, validate_output
from fleetstream.domain.filters import FilterConfig
from fleetstream.domain.geo import destination
from fleetstream.domain.models import DeviceState, Motion, Position, StopState, TripState
from fleetstream.domain.tracking import TrackingConfig, step_position
from fleetstream.domain.trips import StopEvent, TripEvent, advance, stop_id, trip_id, within

T0 = 1_795_600_800_000
LAT, LON = 53.4, -2.98
CONFIG = TrackingConfig(stop_speed_kmh=3.0, start_speed_kmh=8.0, stop_after_s=180.0, start_distance_m=100.0,
                        filters=FilterConfig.off())
TRIP_SCHEMA = jsonschema.Draft202012Validator(load_schema("trip"))


def north(metres: float) -> tuple[float, float]:
    return destination(LAT, LON, 0.0, metres) if metres else (LAT, LON)


def fix(t_s: float, metres: float = 0.0, speed: float | None = None, device: str = "veh-1") -> Position:
    """A fix ``metres`` north of the origin at ``t_s`` seconds."""
    lat, lon = north(metres)
    return Position(device, T0 + round(t_s * 1000), lat, lon, speed_kmh=speed)


def drive(
    fixes: Iterable[Position | tuple[Position, tuple[str, ...]]], state: DeviceState | None = None,
    config: TrackingConfig = CONFIG,
) -> tuple[DeviceState | None, list[TripEvent | StopEvent], list[Motion]]:
    events: list[TripEvent | StopEvent] = []
    motions = []
    for item in fixes:
        position, fences = (item, ()) if isinstance(item, Position) else item
        state, enrichment = step_position(state, position, config, geofences=fences)
        events += enrichment.closed
        motions.append(enrichment.motion)
    return state, events, motions


# --- hand-checked scenarios -------------------------------------------------------------------------------------

def test_a_stop_a_trip_and_the_next_stop():
    depot, customer = ("depot",), ("customer",)
    state, events, motions = drive([
        (fix(0, 0, 0.0), depot),      # slow: a stop candidate, motion still unknown
        (fix(60, 0, 0.0), depot),
        (fix(180, 0, 0.0), depot),    # slow for 180 s: stopped since t=0
        (fix(240, 5, 5.0), depot),    # 5 km/h is inside the hysteresis band: still stopped
    ])
    assert motions == ["unknown", "unknown", "stopped", "stopped"] and events == []
    assert state.stop == StopState(T0, *north(0), 0.0, depot) and state.trip is None

    state, events, motions = drive([
        (fix(250, 60, 30.0), ()),     # moving: the stop ends at the last stopped fix (t=240), the trip starts there
        (fix(260, 160, 36.0), ()),
        (fix(270, 260, 50.0), ()),
        (fix(280, 360, 36.0), ()),
        (fix(290, 400, 2.0), ()),     # slow: a candidate at t=290 ...
        (fix(300, 402, 5.0), ()),     # ... dropped: slowness must be continuous (5 > 3)
        (fix(310, 402, 0.0), customer),  # a new candidate at t=310
        (fix(400, 403, 1.0), customer),
        (fix(490, 403, 0.0), customer),  # slow for 180 s: stopped since t=310, the trip ends there
    ], state)
    assert motions == ["moving"] * 8 + ["stopped"]
    stop, trip = events
    assert stop == StopEvent(stop_id("veh-1", T0), "veh-1", T0, T0 + 240_000, *north(0), depot,
                             pytest.approx(5.0), 0.0)
    assert stop.duration_s == 240.0
    assert trip.trip_id == trip_id("veh-1", T0 + 240_000) == "veh-1:trip:1795601040000"
    assert (trip.start_ms, trip.end_ms, trip.duration_s) == (T0 + 240_000, T0 + 310_000, 70.0)
    assert (trip.start_lat, trip.start_lon) == north(5) and (trip.end_lat, trip.end_lon) == north(402)
    assert (trip.start_geofences, trip.end_geofences) == (depot, customer)
    assert trip.distance_m == pytest.approx(397.0) and trip.start_odometer_m == pytest.approx(5.0)
    assert trip.max_speed_kmh == 50.0 and trip.avg_speed_kmh == pytest.approx(397.0 / 70.0 * 3.6)
    assert state.stop == StopState(T0 + 310_000, *north(402), pytest.approx(402.0), customer)
    assert state.odometer_m == pytest.approx(403.0)


def test_a_first_fix_already_moving_starts_a_trip_there():
    state, events, motions = drive([fix(0, 0, 50.0), fix(10, 140, 50.0)])
    assert motions == ["moving", "moving"] and events == []
    assert state.trip == TripState(T0, *north(0), 0.0, (), 50.0)


def test_speed_between_the_thresholds_neither_stops_nor_starts():
    state, events, motions = drive([fix(0, 0, 5.0), fix(10, 10, 6.0), fix(20, 20, 7.9)])
    assert motions == ["unknown"] * 3 and state.trip is None and state.stop is None and events == []
    state, _, motions = drive([fix(30, 30, 8.1)], state)  # above start_speed: moving, from the last fix
    assert motions == ["moving"] and state.trip.start_ms == T0 + 20_000


def test_a_short_halt_is_not_a_stop():
    _, events, motions = drive([fix(0, 0, 40.0), fix(10, 100, 0.0), fix(130, 100, 0.0), fix(170, 101, 2.0),
                                fix(180, 150, 20.0), fix(300, 160, 0.0)])
    assert events == [] and set(motions) == {"moving"}  # 170 s slow < 180 s; the last slow fix is only a candidate


def test_leaving_the_stop_radius_ends_a_stop_whatever_the_speed():
    state, _, _ = drive([fix(0, 0, 0.0), fix(200, 0, 0.0)])
    assert state.motion == "stopped"
    state, events, motions = drive([fix(300, 60, 2.0), fix(400, 99, 2.0)], state)  # creeping, inside 100 m
    assert motions == ["stopped", "stopped"] and events == []
    state, events, motions = drive([fix(500, 130, 2.0)], state)  # 130 m from the stop: moving again
    assert motions == ["moving"] and [type(e) for e in events] == [StopEvent]
    assert events[0].end_ms == T0 + 400_000 and events[0].distance_m == pytest.approx(99.0)
    assert state.trip.start_ms == T0 + 400_000
    assert state.stop == StopState(T0 + 500_000, *north(130), pytest.approx(130.0), ())  # creeping: a new candidate


def test_derived_speeds_within_the_radius_do_not_keep_a_device_moving_or_end_its_stop():
    """Without reported speeds, a parked receiver's jitter gives derived speeds above start_speed_kmh."""
    driving = [fix(10 * i, 100 * i) for i in range(11)]  # 36 km/h derived, up to 1000 m at t=100
    jitter = [0, 25, -20, 30, -25, 20, 0, 25, -30, 15, 0, -25, 30, 0, 20, -20, 25, 0, -15, 30]
    parked = [fix(110 + 10 * j, 1000 + m) for j, m in enumerate(jitter)]
    legs = [abs(a - b) / 10 * 3.6 for a, b in itertools.pairwise(jitter)]
    assert max(legs) > 8.0  # derived speeds well above the start speed
    state, events, motions = drive(driving + parked)
    # the first parked fix (derived 0 km/h) opens the candidate at t=110; it holds within 100 m, confirmed at t=290
    assert motions == ["unknown"] + ["moving"] * 28 + ["stopped"] * 2
    [trip] = events
    assert (trip.start_ms, trip.end_ms, trip.distance_m) == (T0, T0 + 110_000, pytest.approx(1000.0))
    state, events, motions = drive([fix(310, 1090), fix(320, 1050), fix(330, 1180)], state)
    assert motions == ["stopped", "stopped", "moving"]
    assert [(type(e), e.start_ms, e.end_ms) for e in events] == [(StopEvent, T0 + 110_000, T0 + 320_000)]


def test_a_long_silence_at_walking_pace_is_a_stop():
    moving, _, _ = drive([fix(0, 0, 40.0), fix(10, 110, 40.0), fix(20, 220, 40.0)])
    # back after an hour, 50 m on, already moving: stopped from t=20 to now, and a new trip from now
    state, events, motions = drive([fix(3620, 270, 40.0)], moving)
    trip, stop = events
    assert (trip.start_ms, trip.end_ms, trip.distance_m) == (T0, T0 + 20_000, pytest.approx(220.0))
    assert (stop.start_ms, stop.end_ms, stop.distance_m) == (T0 + 20_000, T0 + 3_620_000, pytest.approx(50.0))
    assert motions == ["moving"] and state.trip.start_ms == T0 + 3_620_000
    # back after an hour, still parked: the trip closes, the stop goes on
    state, events, motions = drive([fix(3620, 225, 0.0)], moving)
    assert [type(e) for e in events] == [TripEvent] and motions == ["stopped"]
    assert state.stop.start_ms == T0 + 20_000
    # back after ten minutes, 10 km on: it was driving, not stopped
    state, events, motions = drive([fix(620, 10_220, 60.0)], moving)
    assert events == [] and motions == ["moving"]


def test_distance_downsampling_hides_a_parked_device_but_not_its_stop():
    config = TrackingConfig(filters=FilterConfig(min_distance_m=30.0))
    script = [fix(0, 0, 40.0), fix(10, 110, 40.0)]
    script += [fix(20 + 10 * i, 110 + (i % 3), 0.0) for i in range(120)]  # parked 20 min: all downsampled
    script += [fix(1220, 150, 30.0), fix(1230, 230, 30.0)]
    state = None
    reasons, events = [], []
    for position in script:
        state, enrichment = step_position(state, position, config)
        reasons.append(enrichment.filtered)
        events += enrichment.closed
    assert reasons.count("downsampled_distance") == 120
    trip, stop = events
    assert (trip.end_ms, stop.start_ms, stop.end_ms) == (T0 + 10_000, T0 + 10_000, T0 + 1_220_000)
    assert state.motion == "moving" and state.trip.start_ms == T0 + 1_220_000


def test_stop_after_zero_stops_at_the_first_slow_fix():
    config = TrackingConfig(stop_after_s=0, filters=FilterConfig.off())
    _, events, motions = drive([fix(0, 0, 40.0), fix(10, 110, 0.0)], config=config)
    assert motions == ["moving", "stopped"] and events[0].end_ms == T0 + 10_000


def test_trips_off_gives_instantaneous_motion_and_no_events():
    config = TrackingConfig(trips=False, filters=FilterConfig.off())
    state, events, motions = drive([fix(0, 0, 40.0), fix(10, 110, 0.0), fix(20, 110, 5.0), fix(300, 110, 0.0)],
                                   config=config)
    assert motions == ["moving", "stopped", "moving", "stopped"] and events == []
    assert state.trip is None and state.stop is None


def test_a_state_stored_before_trips_existed_continues():
    old = {"device_id": "veh-1", "ts_ms": T0, "lat": LAT, "lon": LON, "odometer_m": 1000.0, "speed_kmh": 40.0,
           "heading_deg": 0.0, "motion": "moving", "fixes": 7, "h3": None, "geofences": ["depot"], "fences": None}
    state = DeviceState.from_dict(old)
    assert (state.trip, state.stop, state.held) == (None, None, None)
    state, events, _ = drive([fix(10, 100, 0.0), fix(200, 100, 0.0)], state)
    [trip] = events
    assert (trip.start_ms, trip.start_odometer_m, trip.start_geofences) == (T0, 1000.0, ("depot",))
    assert trip.distance_m == pytest.approx(100.0) and trip.max_speed_kmh == 40.0

    stopped = DeviceState.from_dict({**old, "motion": "stopped"})
    state, events, _ = drive([fix(10, 0, 30.0)], stopped)
    assert [(type(e), e.start_ms, e.end_ms) for e in events] == [(StopEvent, T0, T0)]


def test_ids_are_deterministic_and_the_state_shows_the_current_trip():
    ids = [getattr(e, "trip_id", None) or e.stop_id for e in closed_events()]
    assert ids == ["veh-1:stop:1795600800000", "veh-1:trip:1795601000000", "veh-1:stop:1795601030000"]
    assert ids == [getattr(e, "trip_id", None) or e.stop_id for e in closed_events()]  # a replay: the same ids
    state, _, _ = drive([fix(0, 0, 40.0), fix(10, 110, 40.0)])
    assert state.to_dict()["trip"] == {"start_ms": T0, "lat": LAT, "lon": LON, "odometer_m": 0.0, "geofences": [],
                                       "max_speed_kmh": 40.0}
    assert "stop" not in state.to_dict()


# --- the fleet.trips contract ---------------------------------------------------------------------------------------

def closed_events() -> list[TripEvent | StopEvent]:
    _, events, _ = drive([
        (fix(0, 0, 0.0), ("depot",)), fix(200, 0, 0.0), fix(210, 120, 45.0), fix(220, 240, 45.0),
        (fix(230, 250, 0.0), ("a", "b")), fix(420, 250, 0.0), fix(430, 400, 30.0),
    ])
    return events


def test_messages_follow_the_trip_schema():
    events = closed_events()
    assert [type(e) for e in events] == [StopEvent, TripEvent, StopEvent]
    for event in events:
        message = event.to_message(format_ts)
        validate_output("trip", message)
        TRIP_SCHEMA.validate(message)
        assert orjson.loads(orjson.dumps(message)) == message
    trip = events[1].to_message(format_ts)
    assert trip["start_ts"] == "2026-11-25T10:03:20.000Z" and trip["end_geofences"] == ["a", "b"]
    assert trip["end_odometer_m"] == pytest.approx(trip["start_odometer_m"] + trip["distance_m"])


def test_the_schema_keeps_trips_and_stops_apart():
    stop, trip, _ = (e.to_message(format_ts) for e in closed_events())
    bad = [
        {**stop, "trip_id": "x"},
        {k: v for k, v in stop.items() if k != "lat"},
        {**trip, "lat": 1.0},
        {k: v for k, v in trip.items() if k != "max_speed_kmh"},
        {**trip, "type": "visit"},
        {**trip, "start_ts": "2026-11-25T10:03:20Z"},
    ]
    for message in bad:
        assert not TRIP_SCHEMA.is_valid(message), message
        with pytest.raises(DecodeError):
            validate_output("trip", message)


# --- properties ---------------------------------------------------------------------------------------------------

steps = st.lists(
    st.tuples(
        st.one_of(st.integers(1, 60), st.integers(60, 400), st.integers(400, 5000)),  # seconds since the last fix
        st.one_of(st.just(0.0), st.floats(0, 30), st.floats(30, 2000)),  # metres moved
        st.floats(0, 359),
        st.none() | st.sampled_from([0.0, 1.0, 3.0, 4.0, 8.0, 9.0, 30.0, 90.0]),  # reported speed
        st.sampled_from([(), ("g1",), ("g1", "g2")]),
    ),
    min_size=1, max_size=60,
)
motion_configs = st.builds(
    TrackingConfig,
    stop_after_s=st.sampled_from([0.0, 60.0, 180.0]),
    start_distance_m=st.sampled_from([30.0, 100.0]),
    filters=st.just(FilterConfig.off()),
)


def script(raw: Sequence[tuple[int, float, float, float | None, tuple[str, ...]]]) -> list[tuple[Position, tuple]]:
    lat, lon, ts = LAT, LON, T0
    out = []
    for dt_s, metres, bearing, speed, fences in raw:
        lat, lon = destination(lat, lon, bearing, metres)
        ts += dt_s * 1000
        out.append((Position("veh-1", ts, lat, lon, speed_kmh=speed), fences))
    return out


@settings(max_examples=300, deadline=None)
@given(steps, motion_configs)
def test_stops_and_trips_tile_the_timeline_and_the_odometer(raw, config):
    state, events, motions = drive(script(raw), config=config)
    assert state is not None
    # motion is unknown only until it is first known, and the state says what is open
    known = [m != "unknown" for m in motions]
    assert known == sorted(known)
    if state.motion == "stopped":
        assert state.stop is not None and state.trip is None
    elif state.motion == "moving":
        assert state.trip is not None
    else:
        assert state.trip is None and not events
    # closed events alternate and join end to start (time, place, odometer)
    for a, b in itertools.pairwise(events):
        assert type(a) is not type(b)
        if isinstance(a, TripEvent):
            assert (a.end_ms, a.end_lat, a.end_lon, a.end_geofences) == (b.start_ms, b.lat, b.lon, b.geofences)
            assert a.start_odometer_m + a.distance_m == pytest.approx(b.odometer_m, abs=1e-6)
        else:
            assert b.start_ms == a.end_ms
            assert a.odometer_m + a.distance_m == pytest.approx(b.start_odometer_m, abs=1e-6)
    for e in events:
        assert e.end_ms >= e.start_ms and e.distance_m >= -1e-9
        if isinstance(e, StopEvent):
            assert e.duration_s >= config.stop_after_s  # slow for stop_after_s, or a gap at least that long
    assert len({getattr(e, "trip_id", None) or e.stop_id for e in events}) == len(events)
    # what is open continues from the last closed event
    if events:
        last = events[-1]
        if isinstance(last, TripEvent):
            assert state.motion == "stopped" and state.stop.start_ms == last.end_ms
        else:
            assert state.trip is not None and state.trip.start_ms == last.end_ms
    # every leg is in exactly one trip or stop once motion is known: the distances add up to the odometer
    opened = state.trip or (state.stop if state.motion == "stopped" else None)
    if events or opened is not None:
        first = events[0] if events else None
        start = (first.start_odometer_m if isinstance(first, TripEvent) else first.odometer_m) if first else (
            opened.odometer_m)
        tail = state.odometer_m - opened.odometer_m if opened is not None else 0.0
        assert start + sum(e.distance_m for e in events) + tail == pytest.approx(state.odometer_m, abs=1e-6)


@settings(max_examples=200, deadline=None)
@given(steps, motion_configs, st.integers(0, 59))
def test_a_state_round_trip_mid_sequence_changes_nothing(raw, config, cut):
    fixes = script(raw)
    straight = drive(fixes, config=config)
    state, events, motions = drive(fixes[: cut + 1], config=config)
    state = DeviceState.from_dict(orjson.loads(orjson.dumps(state.to_dict())))
    state, more_events, more_motions = drive(fixes[cut + 1 :], state, config=config)
    assert (state, events + more_events, motions + more_motions) == straight


@settings(max_examples=300, deadline=None)
@given(steps, motion_configs)
def test_the_steps_inlined_common_cases_agree_with_advance(raw, config):
    """step_position inlines 'moving on' and 'staying stopped' for speed; the reference is trips.advance."""
    state = None
    for position, fences in script(raw):
        new_state, e = step_position(state, position, config, geofences=fences)
        expected = advance(state, position, e.speed_kmh, position.speed_kmh is not None, e.distance_m, e.odometer_m,
                           fences, config)
        assert (new_state.motion, new_state.trip, new_state.stop, e.closed) == expected
        state = new_state


def test_within_is_close_to_the_haversine_distance():
    place = StopState(0, LAT, LON, 0.0, ())
    radius2 = TrackingConfig(start_distance_m=100.0).start_radius_deg2
    for bearing in range(0, 360, 15):
        assert within(*destination(LAT, LON, bearing, 99.9), place, radius2)
        assert not within(*destination(LAT, LON, bearing, 100.1), place, radius2)
    across = StopState(0, 10.0, 179.9995, 0.0, ())  # the antimeridian: 110 m apart, not 360 degrees
    assert within(10.0, -179.9995, across, TrackingConfig(start_distance_m=120.0).start_radius_deg2)
    assert not within(10.0, -179.9995, across, radius2)
