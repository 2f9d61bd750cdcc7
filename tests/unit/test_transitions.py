"""Geofence transitions: the pure state machine against simple references, and the anti-flapping settings."""

from __future__ import annotations

import copy
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from fleetstream.domain.geo import destination
from fleetstream.domain.geofences import parse_geofence
from fleetstream.domain.geoindex import GeofenceIndex
from fleetstream.domain.models import Position
from fleetstream.domain.transitions import GeofenceEventType, TransitionDefaults, step

LAT, LON = 53.40, -2.98


def square(fence_id, half_m, lat=LAT, lon=LON, **props):
    north = destination(lat, lon, 0, half_m)[0] - lat
    east = destination(lat, lon, 90, half_m)[1] - lon
    ring = [[lon - east, lat - north], [lon + east, lat - north], [lon + east, lat + north], [lon - east, lat + north],
            [lon - east, lat - north]]
    return parse_geofence({"type": "Feature", "id": fence_id, "geometry": {"type": "Polygon", "coordinates": [ring]},
                           "properties": props})


def run(index, fixes, defaults=None):
    defaults = defaults or TransitionDefaults()
    memberships, last, events = {}, None, []
    for fix in fixes:
        inside = index.lookup_one(fix.lat, fix.lon)
        memberships, new = step(memberships, last, fix, inside, index, defaults)
        events.extend(new)
        last = fix
    return memberships, events


FENCES = [square("a", 300), square("b", 150, lat=LAT + 0.002), square("c", 500, lat=LAT - 0.003, lon=LON + 0.004)]
INDEX = GeofenceIndex.build(FENCES)

walks = st.lists(st.tuples(st.floats(-0.008, 0.008), st.floats(-0.012, 0.012)), min_size=1, max_size=60)


@settings(max_examples=100, deadline=None)
@given(walks)
def test_with_hysteresis_off_events_are_the_consecutive_differences(offsets):
    fixes = [Position("d", 1000 * (i + 1), LAT + a, LON + b) for i, (a, b) in enumerate(offsets)]
    _, events = run(INDEX, fixes)
    expected, previous = [], set()
    for fix in fixes:
        now = set(INDEX.lookup_one(fix.lat, fix.lon))
        changes = [(fid, "enter") for fid in now - previous] + [(fid, "exit") for fid in previous - now]
        expected.extend((fix.ts_ms, fid, kind) for fid, kind in sorted(changes))
        previous = now
    assert [(e.ts_ms, e.geofence_id, e.type.value) for e in events] == expected


@settings(max_examples=100, deadline=None)
@given(walks, st.floats(0, 30), st.floats(0, 30), st.floats(0, 100), st.integers(0, 10**6))
def test_enter_and_exit_strictly_alternate_per_geofence(offsets, enter_s, exit_s, buffer_m, seed):
    rng = random.Random(seed)
    fixes = [Position("d", 1000 * (i + 1) * rng.randint(1, 20), LAT + a, LON + b, accuracy_m=rng.uniform(1, 60))
             for i, (a, b) in enumerate(offsets)]
    defaults = TransitionDefaults(enter_after_s=enter_s, exit_after_s=exit_s, exit_buffer_m=buffer_m,
                                  min_accuracy_m=rng.choice([0, 30]))
    memberships, events = run(INDEX, fixes, defaults)
    for fence in FENCES:
        kinds = [e.type for e in events if e.geofence_id == fence.id and e.type in ("enter", "exit")]
        assert all(k == ("enter" if i % 2 == 0 else "exit") for i, k in enumerate(kinds))
        assert (fence.id in memberships and memberships[fence.id].inside) == (len(kinds) % 2 == 1)


def test_parked_on_the_boundary_with_gps_noise_does_not_flap():
    fence = square("depot", 200)
    index = GeofenceIndex.build([fence])
    edge_lat, edge_lon = destination(LAT, LON, 90, 200)  # on the east edge
    rng = random.Random(42)
    fixes = []
    t = 0
    for _ in range(720):  # one hour, a fix every 5 s, 10 m Gaussian noise
        t += 5000
        lat, lon = destination(edge_lat, edge_lon, rng.uniform(0, 360), abs(rng.gauss(0, 10)))
        fixes.append(Position("truck", t, lat, lon))
    defaults = TransitionDefaults(exit_buffer_m=25)
    start_inside = bool(index.lookup_one(fixes[0].lat, fixes[0].lon))
    _, parked = run(index, fixes, defaults)
    assert len(parked) <= 1 and all(e.type is GeofenceEventType.ENTER for e in parked)
    # then it drives away east, 10 m per fix
    lat, lon = fixes[-1].lat, fixes[-1].lon
    for _ in range(60):
        t += 5000
        lat, lon = destination(lat, lon, 90, 10)
        fixes.append(Position("truck", t, lat, lon))
    _, events = run(index, fixes, defaults)
    assert [e.type.value for e in events] == ["enter", "exit"]
    assert not start_inside or events[0].ts_ms == fixes[0].ts_ms
    assert events[1].dwell_s > 3000


def test_without_the_buffer_the_same_noise_flaps():
    """The control for the test above: the noise really does cross the boundary."""
    fence = square("depot", 200)
    index = GeofenceIndex.build([fence])
    edge_lat, edge_lon = destination(LAT, LON, 90, 200)
    rng = random.Random(42)
    fixes = [Position("truck", 5000 * (i + 1),
                      *destination(edge_lat, edge_lon, rng.uniform(0, 360), abs(rng.gauss(0, 10))))
             for i in range(720)]
    _, events = run(index, fixes)
    assert len(events) > 50


def test_enter_after_carries_the_first_fix_of_the_run():
    index = GeofenceIndex.build([square("a", 300)])
    out, inside = (LAT + 0.01, LON), (LAT, LON)
    fixes = [Position("d", 0, *out), Position("d", 10_000, *inside), Position("d", 20_000, *out),  # 10 s blip
             Position("d", 30_000, *inside), Position("d", 40_000, *inside), Position("d", 70_000, *inside)]
    _, events = run(index, fixes, TransitionDefaults(enter_after_s=30))
    assert [(e.type.value, e.ts_ms) for e in events] == [("enter", 30_000)]


def test_confirmed_runs_carry_their_first_fix_place_and_time_and_the_exit_the_time_inside():
    index = GeofenceIndex.build([square("a", 300)])
    in1, in2, in3 = (LAT + 0.0001, LON - 0.0002), (LAT, LON), (LAT - 0.0001, LON + 0.0003)
    out1, out2 = (LAT + 0.01, LON + 0.001), (LAT + 0.02, LON - 0.001)
    fixes = [Position("d", 0, *out1), Position("d", 10_000, *in1), Position("d", 25_000, *in2),
             Position("d", 45_000, *in3), Position("d", 100_000, *out1), Position("d", 115_000, *out2),
             Position("d", 130_000, *out2)]
    memberships, events = run(index, fixes, TransitionDefaults(enter_after_s=30, exit_after_s=20))
    assert [(e.type.value, e.ts_ms, e.lat, e.lon) for e in events] == [
        ("enter", 10_000, *in1),  # confirmed at 45 s, 35 s after the run's first fix
        ("exit", 100_000, *out1),  # confirmed at 130 s
    ]
    assert events[1].dwell_s == 90  # from the enter run's first fix to the exit run's
    assert memberships == {}


def test_dwell_once_and_exit_carries_dwell_time():
    index = GeofenceIndex.build([square("a", 300, dwell_s=60)])
    fixes = [Position("d", t * 1000, LAT, LON) for t in range(0, 200, 10)] + [Position("d", 300_000, LAT + 0.01, LON)]
    _, events = run(index, fixes)
    assert [(e.type.value, e.ts_ms) for e in events] == [("enter", 0), ("dwell", 60_000), ("exit", 300_000)]
    assert events[-1].dwell_s == 300


def test_inaccurate_fixes_change_nothing():
    index = GeofenceIndex.build([square("a", 300, min_accuracy_m=50)])
    fixes = [Position("d", 0, LAT, LON, accuracy_m=5), Position("d", 1000, LAT + 0.01, LON, accuracy_m=500),
             Position("d", 2000, LAT, LON, accuracy_m=5)]
    _, events = run(index, fixes)
    assert [e.type.value for e in events] == ["enter"]


def test_deleted_geofence_gives_an_exit_with_the_reason():
    index = GeofenceIndex.build([square("a", 300), square("b", 300)])
    memberships, events = step({}, None, Position("d", 0, LAT, LON), index.lookup_one(LAT, LON), index)
    assert sorted(e.geofence_id for e in events) == ["a", "b"]
    smaller = index.with_changes(deletes=["a"])
    memberships, events = step(memberships, None, Position("d", 1000, LAT, LON), smaller.lookup_one(LAT, LON), smaller)
    assert [(e.type.value, e.geofence_id, e.reason) for e in events] == [("exit", "a", "geofence_deleted")]
    assert set(memberships) == {"b"}


def test_cross_when_both_fixes_are_outside():
    index = GeofenceIndex.build([square("gate", 50, cross=True)])
    west, east = destination(LAT, LON, 270, 500), destination(LAT, LON, 90, 500)
    fixes = [Position("d", 0, *west), Position("d", 10_000, *east)]
    _, events = run(index, fixes)
    assert [(e.type.value, e.geofence_id) for e in events] == [("cross", "gate")]


@settings(max_examples=150, deadline=None)
@given(walks, st.floats(0, 30), st.floats(0, 30), st.floats(0, 100), st.sampled_from([0.0, 20.0]),
       st.integers(0, 10**6))
def test_the_steady_shortcut_gives_what_the_full_step_gives(offsets, enter_s, exit_s, buffer_m, dwell_s, seed):
    """``step`` skips the per-geofence work when a fix changes nothing; ``_step`` always does it. Walked side by
    side with hysteresis, dwell and inaccurate fixes, a geofence with dwell of its own and one deleted midway,
    every step's memberships and events agree. Each position is held for two fixes, so the shortcut's case (a
    device staying inside) comes up all along the walk."""
    from fleetstream.domain import transitions

    rng = random.Random(seed)
    fences = [*FENCES[:2], square("c", 500, lat=LAT - 0.003, lon=LON + 0.004, dwell_s=40)]
    full_index = GeofenceIndex.build(fences)
    without_b = full_index.with_changes(deletes=["b"])
    defaults = TransitionDefaults(enter_after_s=enter_s, exit_after_s=exit_s, exit_buffer_m=buffer_m,
                                  min_accuracy_m=rng.choice([0, 30]), dwell_s=dwell_s)
    memberships: dict = {}
    last = None
    ts = 0
    stays = [offset for offset in offsets for _ in range(2)] * 2  # the walk twice: devices come back
    for n, (a, b) in enumerate(stays):
        index = full_index if n < len(offsets) * 3 else without_b  # b deleted in the last quarter
        ts += 1000 * rng.randint(1, 20)
        fix = Position("d", ts, LAT + a, LON + b, accuracy_m=rng.uniform(1, 60))
        inside = index.lookup_one(fix.lat, fix.lon)
        expected = transitions._step(memberships, last, fix, inside, index, defaults)
        got = step(memberships, last, fix, inside, index, defaults)
        assert got == expected
        memberships, last = got[0], fix


def test_a_device_staying_inside_takes_the_shortcut():
    from fleetstream.domain import transitions

    fixes = [Position("d", 1000 * i, LAT, LON) for i in range(1, 5)]
    memberships, events = run(INDEX, fixes)
    assert [(e.type, e.geofence_id) for e in events] == [(GeofenceEventType.ENTER, "a"), (GeofenceEventType.ENTER, "c")]
    assert transitions._steady(memberships, ("a", "c"), INDEX, TransitionDefaults())
    assert not transitions._steady(memberships, ("a", "c"), INDEX, TransitionDefaults(dwell_s=60))  # dwell to come
    assert not transitions._steady(memberships, ("a", "b"), INDEX, TransitionDefaults())
    assert not transitions._steady({**memberships, "c": memberships["c"]._replace(pending_ms=1)}, ("a", "c"), INDEX,
                                   TransitionDefaults())


@settings(max_examples=150, deadline=None)
@given(walks, st.floats(1, 30), st.integers(0, 10**6))
def test_the_plain_step_gives_what_the_full_step_gives(offsets, wait_s, seed):
    """With every setting 0 and no geofence with settings of its own, ``step`` takes ``_step_plain`` (the set
    differences, no per-geofence rules). Walked beside ``_step``, with memberships left pending by earlier
    settings (the first quarter runs with enter/exit waits) and a geofence deleted in the last quarter, every
    step's memberships and events agree; the plain path answers every step whose memberships are all settled
    inside and declines the others; ``steady_inside`` names the settled geofences."""
    from fleetstream.domain import transitions

    rng = random.Random(seed)
    without_b = INDEX.with_changes(deletes=["b"])
    assert INDEX.plain and without_b.plain
    waiting = TransitionDefaults(enter_after_s=wait_s, exit_after_s=wait_s)
    memberships: dict = {}
    last = None
    ts = 0
    plain_steps = zero_steps = 0
    stays = [offset for offset in offsets for _ in range(2)] * 2
    stays.insert(len(offsets) * 3, (0.002, 0.0))  # inside b (and a) when b goes
    for n, (a, b) in enumerate(stays):
        index = INDEX if n <= len(offsets) * 3 else without_b
        defaults = waiting if n < len(offsets) else TransitionDefaults()
        ts += 1000 * rng.randint(1, 20)
        fix = Position("d", ts, LAT + a, LON + b)
        inside = index.lookup_one(fix.lat, fix.lon)
        expected = transitions._step(memberships, last, fix, inside, index, defaults)
        if defaults.zero:
            zero_steps += 1
            plain = transitions._step_plain(memberships, fix, inside, index)
            if all(m.inside and m.pending_ms is None for m in memberships.values()):
                assert plain == expected
                plain_steps += 1
            else:
                assert plain is None
        got = step(memberships, last, fix, inside, index, defaults)
        assert got == expected
        settled = transitions.step_settled(memberships, last, fix, inside, index, defaults)
        assert settled == (*expected, transitions.steady_inside(expected[0], index, defaults))
        memberships, last = got[0], fix
        if defaults.zero:
            settled = all(m.inside and m.pending_ms is None for m in memberships.values())
            assert transitions.steady_inside(memberships, index, defaults) == (
                tuple(sorted(memberships)) if memberships and settled else None)
    assert plain_steps >= zero_steps - 1  # only the first zero-settings step may meet runs left pending


def test_memberships_of_a_deleted_geofence_are_not_settled():
    """Plain or not, ``steady_inside`` never calls memberships settled while one names a geofence the index no
    longer has: the next step must exit it."""
    from fleetstream.domain import transitions

    memberships, _ = run(INDEX, [Position("d", 1000, LAT + 0.002, LON)])
    assert "b" in memberships
    without_b = INDEX.with_changes(deletes=["b"])
    assert transitions.steady_inside(memberships, INDEX) == tuple(sorted(memberships))
    assert transitions.steady_inside(memberships, without_b) is None
    assert transitions.steady_inside(memberships, not_plain(without_b)) is None


def not_plain(index: GeofenceIndex) -> GeofenceIndex:
    """The same index with its plain-step shortcut off: every step resolves each geofence's settings."""
    general = copy.copy(index)
    general.plain = False
    return general


def test_geofences_with_settings_of_their_own_are_not_plain():
    assert not GeofenceIndex.build([*FENCES, square("slow", 100, enter_after_s=10)]).plain
    assert not GeofenceIndex.build([*FENCES, square("gate", 100, cross=True)]).plain
    assert GeofenceIndex.build([*FENCES, square("zeros", 100, dwell_s=0, exit_buffer_m=0)]).plain
    assert TransitionDefaults().zero and not TransitionDefaults(min_accuracy_m=50).zero
