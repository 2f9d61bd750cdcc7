"""The position filter chain and the reorder helpers: hand-checked cases per filter, and properties against simple
references (the step's inlined chain agrees with filters.check_fix; the reorder buffer releases every fix once,
in ts order)."""

from __future__ import annotations

import itertools
import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetstream.domain.filters import (
    FilterConfig,
    ReorderBuffer,
    batch_order,
    check_fix,
    intrinsic_reason,
)
from fleetstream.domain.geo import destination
from fleetstream.domain.models import HOLDING_TS, DeviceState, FilterReason, Position
from fleetstream.domain.tracking import TrackingConfig, step_position

NOW = 1_795_600_800_000
LAT, LON = 53.4, -2.98
DEFAULT = FilterConfig()
OFF = FilterConfig.off()


def at(ts_ms: int, lat: float = LAT, lon: float = LON, **extra: float | None) -> Position:
    return Position("d", ts_ms, lat, lon, **extra)  # type: ignore[arg-type]


def last(ts_ms: int = NOW - 60_000, lat: float = LAT, lon: float = LON) -> DeviceState:
    return DeviceState("d", ts_ms, lat, lon)


def north(metres: float) -> tuple[float, float]:
    return destination(LAT, LON, 0.0, metres)


# --- each filter ----------------------------------------------------------------------------------------------

def test_the_reasons_are_the_documented_bounded_set():
    assert {r.value for r in FilterReason} == {
        "invalid", "duplicate", "out_of_order", "late", "future", "too_old", "low_accuracy", "implied_speed",
        "downsampled_time", "downsampled_distance",
    }
    assert isinstance(FilterReason.INVALID, str) and FilterReason.INVALID == "invalid"


@pytest.mark.parametrize(("lat", "lon"), [(0.0, 0.0), (math.nan, 1.0), (1.0, math.nan), (91.0, 0.0), (0.0, 181.0),
                                          (math.inf, 0.0)])
def test_invalid(lat, lon):
    assert check_fix(None, at(NOW, lat, lon), DEFAULT, NOW) == "invalid"
    assert check_fix(last(), at(NOW, lat, lon), DEFAULT, NOW) == "invalid"


def test_null_island_can_be_allowed_but_nan_cannot():
    allow = FilterConfig(reject_null_island=False)
    assert check_fix(None, at(NOW, 0.0, 0.0), allow) is None
    assert check_fix(None, at(NOW, 0.0, 0.5), DEFAULT) is None  # only exactly (0, 0)
    assert check_fix(None, at(NOW, math.nan, 0.0), OFF) == "invalid"


def test_duplicate_and_out_of_order_against_the_last_accepted_fix():
    state = last(ts_ms=NOW - 10_000)
    assert check_fix(state, at(NOW - 10_000, *north(50)), DEFAULT, NOW) == "duplicate"
    assert check_fix(state, at(NOW - 10_001), DEFAULT, NOW) == "out_of_order"
    assert check_fix(state, at(NOW - 9_999), OFF, NOW) is None
    assert check_fix(state, at(NOW - 10_000), OFF) == "duplicate"  # cannot be turned off


def test_future_and_too_old_need_the_clock_and_are_inclusive_at_the_limit():
    old = FilterConfig(max_future_s=60, max_age_s=3600)
    assert check_fix(None, at(NOW + 60_000), old, NOW) is None
    assert check_fix(None, at(NOW + 60_001), old, NOW) == "future"
    assert check_fix(None, at(NOW - 3_600_000), old, NOW) is None
    assert check_fix(None, at(NOW - 3_600_001), old, NOW) == "too_old"
    assert check_fix(None, at(NOW + 10**9), old) is None  # no clock given: no clock checks
    assert check_fix(None, at(NOW - 10**12), DEFAULT, NOW) is None  # max_age_s is off by default


def test_low_accuracy():
    assert check_fix(None, at(NOW, accuracy_m=100.0), DEFAULT) is None
    assert check_fix(None, at(NOW, accuracy_m=100.5), DEFAULT) == "low_accuracy"
    assert check_fix(None, at(NOW), DEFAULT) is None  # no accuracy reported: nothing to judge
    assert check_fix(None, at(NOW, accuracy_m=5000.0), OFF) is None


def test_implied_speed_from_the_last_accepted_fix():
    state = last(ts_ms=NOW - 10_000)
    # 300 km/h for 10 s is 833.3 m
    assert check_fix(state, at(NOW, *north(820)), DEFAULT) is None
    assert check_fix(state, at(NOW, *north(850)), DEFAULT) == "implied_speed"
    # the fix's own accuracy is slack: 850 m - 30 m fits in 833 m
    assert check_fix(state, at(NOW, *north(850), accuracy_m=30.0), DEFAULT) is None
    assert check_fix(state, at(NOW, *north(50_000)), FilterConfig(max_speed_kmh=0)) is None


def test_time_and_distance_downsampling():
    state = last(ts_ms=NOW - 10_000)
    by_time = FilterConfig(min_interval_s=30)
    assert check_fix(state, at(NOW, *north(100)), by_time) == "downsampled_time"
    assert check_fix(state, at(NOW + 20_000, *north(100)), by_time) is None
    by_distance = FilterConfig(min_distance_m=30)
    assert check_fix(state, at(NOW, *north(29)), by_distance) == "downsampled_distance"
    assert check_fix(state, at(NOW, *north(31)), by_distance) is None


def test_the_first_failing_check_names_the_reason():
    config = FilterConfig(min_interval_s=30, min_distance_m=30)
    state = last(ts_ms=NOW - 10_000)
    assert check_fix(state, at(NOW - 10_000, 0.0, 0.0, accuracy_m=500.0), config, NOW) == "invalid"
    assert check_fix(state, at(NOW - 10_000, accuracy_m=500.0), config, NOW) == "low_accuracy"
    assert check_fix(state, at(NOW - 10_000), config, NOW) == "duplicate"
    assert check_fix(state, at(NOW, *north(5000)), config, NOW) == "implied_speed"
    assert check_fix(state, at(NOW, *north(10)), config, NOW) == "downsampled_time"
    assert check_fix(state, at(NOW + 30_000, *north(10)), config, NOW) == "downsampled_distance"


def test_config_refuses_negative_or_non_finite_thresholds():
    with pytest.raises(ValueError, match="max_speed_kmh"):
        FilterConfig(max_speed_kmh=-1)
    with pytest.raises(ValueError, match="reorder_window_s"):
        FilterConfig(reorder_window_s=math.nan)


# --- the step applies the chain before any state change --------------------------------------------------------

def test_a_rejected_jump_does_not_move_the_odometer_or_the_reference():
    config = TrackingConfig()
    s1, _ = step_position(None, at(NOW - 20_000, speed_kmh=40.0), config, NOW)
    jump_lat, jump_lon = north(5000)
    s2, e = step_position(s1, at(NOW - 10_000, jump_lat, jump_lon, speed_kmh=40.0), config, NOW)
    assert e.filtered == "implied_speed" and s2 is s1
    assert (e.distance_m, e.odometer_m, e.motion) == (0.0, 0.0, s1.motion)
    lat, lon = north(100)
    s3, e = step_position(s2, at(NOW, lat, lon, speed_kmh=40.0), config, NOW)
    assert e.filtered is None and e.distance_m == pytest.approx(100.0, abs=1e-6)  # measured from s1, not the jump
    assert s3.odometer_m == pytest.approx(100.0, abs=1e-6)


def test_a_filtered_first_fix_leaves_no_state():
    state, e = step_position(None, at(NOW, 0.0, 0.0), TrackingConfig(), NOW)
    assert state is None and e.filtered == "invalid" and e.odometer_m == 0.0 and e.motion == "unknown"


positions = st.builds(
    Position,
    device_id=st.just("d"),
    ts_ms=st.integers(NOW - 4_000_000, NOW + 200_000),
    lat=st.one_of(st.floats(-90, 90), st.sampled_from([0.0, math.nan, LAT]), st.floats(LAT - 0.01, LAT + 0.01)),
    lon=st.one_of(st.floats(-180, 180), st.sampled_from([0.0, LON]), st.floats(LON - 0.01, LON + 0.01)),
    speed_kmh=st.none() | st.floats(0, 200),
    heading_deg=st.none(),
    accuracy_m=st.none() | st.floats(0, 300),
    altitude_m=st.none(),
    attributes=st.none(),
)
configs = st.builds(
    FilterConfig,
    reject_null_island=st.booleans(),
    max_future_s=st.sampled_from([0.0, 60.0]),
    max_age_s=st.sampled_from([0.0, 3600.0]),
    max_accuracy_m=st.sampled_from([0.0, 100.0]),
    max_speed_kmh=st.sampled_from([0.0, 300.0]),
    min_interval_s=st.sampled_from([0.0, 30.0]),
    min_distance_m=st.sampled_from([0.0, 50.0]),
)


@settings(max_examples=400)
@given(st.lists(positions, min_size=1, max_size=20), configs)
def test_the_step_applies_exactly_check_fix(fixes, filters):
    """The step inlines the chain for speed; the reference is filters.check_fix on the last accepted state."""
    config = TrackingConfig(filters=filters)
    state = None
    for fix in fixes:
        expected = check_fix(state, fix, filters, NOW)
        new_state, e = step_position(state, fix, config, NOW)
        assert e.filtered == expected
        assert (new_state is state) == (expected is not None)
        state = new_state


# --- reorder buffer ----------------------------------------------------------------------------------------------

def ts_of(held) -> list[int]:
    return [h.fix.ts_ms for h in held]


def test_reorder_buffer_re_sorts_within_the_window_and_reports_late_fixes():
    window = 10_000
    buf = ReorderBuffer()
    buf, released, late = buf.push(at(100_000), 1, window)
    assert (released, late) == ((), ())
    buf, released, late = buf.push(at(95_000), 2, window, source=["p", 7])
    assert (released, late) == ((), ())
    buf, released, late = buf.push(at(108_000), 3, window)
    assert ts_of(released) == [95_000] and released[0].source == ["p", 7]  # 108 s - 10 s passed 95 s
    buf, released, late = buf.push(at(93_000), 4, window)  # older than a released fix: cannot be ordered
    assert released == () and ts_of(late) == [93_000]
    buf, released, late = buf.push(at(97_000), 5, window)  # newer than the released one, behind the watermark
    assert ts_of(released) == [97_000] and late == ()
    buf, released, late = buf.push(at(125_000), 6, window)
    assert ts_of(released) == [100_000, 108_000]
    assert ts_of(buf.held) == [125_000] and buf.due_ms(window) == 6 + window


def test_reorder_buffer_flush_releases_expired_fixes_with_everything_older():
    window = 10_000
    buf = ReorderBuffer()
    buf, _, _ = buf.push(at(50_000), 1_000, window)
    buf, _, _ = buf.push(at(42_000), 5_000, window)
    buf, _, _ = buf.push(at(45_000), 20_000, window)
    assert buf.due_ms(window) == 11_000
    same, released = buf.flush(10_999, window)
    assert released == () and same is buf
    buf, released = buf.flush(11_000, window)  # 50 s expired; 42 s and 45 s are older, so they go first
    assert ts_of(released) == [42_000, 45_000, 50_000] and buf.held == () and buf.due_ms(window) is None
    buf, released, late = buf.push(at(49_000), 30_000, window)
    assert ts_of(late) == [49_000]


def test_reorder_buffer_with_zero_window_holds_nothing():
    buf, released, late = ReorderBuffer().push(at(5), 0, 0)
    assert ts_of(released) == [5] and buf.held == () and late == ()
    buf, released, _ = buf.push(at(5), 0, 0)  # ties are released (the filter calls them duplicates)
    assert ts_of(released) == [5]


def test_reorder_buffer_round_trips_through_json_in_the_device_state():
    buf = ReorderBuffer()
    for arrival, fix in enumerate([at(20_000, speed_kmh=3.5, accuracy_m=4.0), at(10_000), at(15_000)]):
        buf, _, _ = buf.push(fix._replace(attributes={"ignition": True}), arrival, 60_000, source=["t", 0, arrival])
    state = DeviceState("d", 1, LAT, LON, held=buf)
    back = DeviceState.from_dict(orjson.loads(orjson.dumps(state.to_dict())))
    assert back.held == buf and back == state


arrivals = st.lists(st.tuples(st.integers(0, 60), st.integers(0, 30)), min_size=1, max_size=40)


@settings(max_examples=300)
@given(arrivals, st.integers(0, 20), st.lists(st.booleans(), min_size=40, max_size=40), st.integers(0, 39))
def test_reorder_buffer_releases_every_fix_once_in_ts_order(items, window, flush_after, cut):
    """Reference: each pushed fix comes out exactly once (released or late); releases never go back in ts; a late
    fix is older than something already released; a state round-trip at ``cut`` changes nothing."""

    def run(round_trip_at: int | None) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        buf = ReorderBuffer()
        released_all: list[tuple[int, int]] = []
        late_all: list[tuple[int, int]] = []
        clock = 0
        for n, (ts, wait) in enumerate(items):
            clock += wait
            buf, released, late = buf.push(at(ts), clock, window, source=n)
            for h in late:
                assert released_all and h.fix.ts_ms < max(t for t, _ in released_all)
            released_all += [(h.fix.ts_ms, h.source) for h in released]
            late_all += [(h.fix.ts_ms, h.source) for h in late]
            if flush_after[n]:
                buf, released = buf.flush(clock, window)
                released_all += [(h.fix.ts_ms, h.source) for h in released]
            if n == round_trip_at:
                buf = ReorderBuffer.from_list(orjson.loads(orjson.dumps(buf.to_list())))
        buf, released = buf.flush(clock + window, window)  # everything has been held long enough by then
        released_all += [(h.fix.ts_ms, h.source) for h in released]
        assert buf.held == ()
        return released_all, late_all

    released, late = run(None)
    assert sorted(s for _, s in released + late) == list(range(len(items)))
    assert [t for t, _ in released] == sorted(t for t, _ in released)
    for (t1, s1), (t2, s2) in itertools.pairwise(released):  # ties keep arrival order
        assert t1 < t2 or s1 < s2
    if window >= 60 and not any(flush_after[: len(items)]):
        assert late == []  # the window spans every ts and nothing was released early
    assert run(cut) == (released, late)


# --- within-batch order ---------------------------------------------------------------------------------------------

def test_batch_order_sorts_each_device_in_its_own_slots():
    fixes = [Position("a", 3, 1, 1), Position("b", 9, 1, 1), Position("a", 1, 1, 1), Position("b", 10, 1, 1),
             Position("a", 2, 1, 1), Position("a", 2, 5, 5)]
    order = batch_order(fixes)
    assert order == [2, 1, 4, 3, 5, 0]  # b untouched; a's slots 0, 2, 4, 5 get ts 1, 2, 2 (stable), 3
    assert batch_order([Position("a", 1, 1, 1), Position("b", 0, 1, 1), Position("a", 1, 2, 2)]) is None


@given(st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 5)), max_size=30))
def test_batch_order_property(raw):
    fixes = [Position(d, ts, 1.0, float(i)) for i, (d, ts) in enumerate(raw)]
    order = batch_order(fixes)
    in_order = all(
        [f.ts_ms for f in fixes if f.device_id == d] == sorted(f.ts_ms for f in fixes if f.device_id == d)
        for d in "abc"
    )
    assert (order is None) == in_order
    result = fixes if order is None else [fixes[i] for i in order]
    assert sorted(order or range(len(fixes))) == list(range(len(fixes)))
    for d in "abc":
        mine = [f for f in result if f.device_id == d]
        assert mine == sorted((f for f in fixes if f.device_id == d), key=lambda f: f.ts_ms)  # stable sort
        assert [i for i, f in enumerate(result) if f.device_id == d] == [
            i for i, f in enumerate(fixes) if f.device_id == d
        ]


def test_intrinsic_checks_are_what_runs_before_the_buffer():
    assert intrinsic_reason(at(NOW + 120_000), DEFAULT, NOW) == "future"
    assert intrinsic_reason(at(NOW - 1), DEFAULT, NOW) is None


# --- the reorder buffer in front of the step, as the worker uses it ------------------------------------------------

def ingest(state: DeviceState | None, fix: Position, now_ms: int, config: TrackingConfig):
    """The recipe: intrinsic checks, then the device's buffer (in its state; a placeholder state for a device
    without an accepted fix), then the step for each released fix in order. Returns (state, [(ts, reason)])."""
    reason = intrinsic_reason(fix, config.filters, now_ms)
    if reason is not None:
        return state, [(fix.ts_ms, reason)]
    buffer = (state.held if state is not None else None) or ReorderBuffer()
    buffer, released, late = buffer.push(fix, now_ms, config.filters.reorder_window_ms)
    state = state._replace(held=buffer) if state is not None else DeviceState.holding(fix.device_id, buffer)
    out = [(h.fix.ts_ms, "late") for h in late]
    for h in released:
        state, e = step_position(state, h.fix, config, now_ms)
        out.append((h.fix.ts_ms, e.filtered))
    return state, out


def test_a_new_device_is_held_in_a_placeholder_state():
    config = TrackingConfig(filters=FilterConfig(reorder_window_s=30))
    state, out = ingest(None, at(NOW, speed_kmh=40.0), NOW, config)
    assert out == [] and not state.accepted and state.ts_ms == HOLDING_TS and len(state.held.held) == 1
    assert DeviceState.from_dict(orjson.loads(orjson.dumps(state.to_dict()))) == state
    state, out = ingest(state, at(NOW - 10_000, *north(-100), speed_kmh=40.0), NOW, config)  # older: re-sorted
    assert out == [] and [h.fix.ts_ms for h in state.held.held] == [NOW - 10_000, NOW]
    state, out = ingest(state, at(NOW + 40_000, *north(400), speed_kmh=40.0), NOW, config)
    assert out == [(NOW - 10_000, None), (NOW, None)]  # released in ts order, both accepted
    assert state.accepted and state.fixes == 2 and state.ts_ms == NOW
    assert state.odometer_m == pytest.approx(100.0) and [h.fix.ts_ms for h in state.held.held] == [NOW + 40_000]
    state, out = ingest(state, at(NOW - 5_000), NOW, config)
    assert out == [(NOW - 5_000, "late")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20_000), st.floats(0, 300), st.floats(0, 359), st.integers(0, 29_999)),
                min_size=1, max_size=30))
def test_arrivals_disordered_within_the_window_give_the_in_order_result(raw):
    """Each fix arrives less than ``window`` of event time after its place in order: nothing is late, and the
    verdicts and final state equal those of an in-order run."""
    config = TrackingConfig(filters=FilterConfig(reorder_window_s=30))
    fixes, ts, lat, lon = [], NOW - 10**8, LAT, LON
    for dt, metres, bearing, jitter in raw:
        ts += dt
        lat, lon = destination(lat, lon, bearing, metres)
        fixes.append((ts + jitter, Position("d", ts, lat, lon, speed_kmh=30.0)))
    in_order, expected = None, []
    for _, fix in fixes:
        in_order, e = step_position(in_order, fix, config, NOW)
        expected.append((fix.ts_ms, e.filtered))
    state, verdicts = None, []
    for _, fix in sorted(fixes, key=lambda item: item[0]):  # arrival order
        state, out = ingest(state, fix, NOW, config)
        verdicts += out
    buffer, released = state.held.flush(NOW + 30_000, config.filters.reorder_window_ms)  # the timer, later
    final = state._replace(held=buffer)
    for h in released:
        final, e = step_position(final, h.fix, config, NOW)
        verdicts.append((h.fix.ts_ms, e.filtered))
    assert verdicts == expected  # the same fixes accepted (none late), in ts order
    assert final._replace(held=None) == in_order
