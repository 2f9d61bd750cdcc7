"""The pipeline's shortcut for devices settled inside geofences (``PositionPipeline._transitions``), alone and with
the worker's applied states handed back as objects, against the same pipeline calling ``transitions.step`` for
every fix and decoding every state: identical output records and state writes, batch by batch, while devices
park, wander in and out, dwell, and the index changes under them."""

from __future__ import annotations

import random

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetstream.codecs import format_ts, parse_ts, validate_output
from fleetstream.config import Settings
from fleetstream.domain.geoindex import GeofenceIndex
from fleetstream.domain.transitions import GeofenceEvent, GeofenceEventType
from fleetstream.streaming import pipeline as pipeline_module
from fleetstream.streaming.pipeline import InRecord, PositionPipeline
from tests.unit.test_transitions import LAT, LON, not_plain, square

START_MS = 1_780_000_000_000

FENCES = [
    square("depot", 400, LAT, LON),
    square("yard", 150, LAT + 0.001, LON + 0.001),  # inside the depot: devices there are in two geofences
    square("site", 300, LAT - 0.006, LON + 0.006, dwell_s=120),
    square("gate", 80, LAT + 0.005, LON - 0.004),
]
FIRST = GeofenceIndex.build(FENCES)
# the yard deleted, the site moved, the depot given a dwell time: devices settled before must see each change on
# their next fix (an exit, an exit or an enter, a dwell event) though the index answer may stay the same
SECOND = FIRST.with_changes(upserts=[square("site", 300, LAT - 0.005, LON + 0.007, dwell_s=120),
                                     square("depot", 400, LAT, LON, dwell_s=60)], deletes=["yard"])


class DictState(dict):
    def get(self, partition: int, key: bytes) -> bytes | None:  # type: ignore[override]
        return dict.get(self, key)


def fleet_batches(seed: int, devices: int, batches: int, per_message: int) -> list[list[InRecord]]:
    """Devices that park for a while (many fixes at one place), then hop somewhere near: in, out and across the
    geofences, with GPS noise small enough to stay put."""
    rng = random.Random(seed)
    places = [(LAT, LON), (LAT + 0.001, LON + 0.001), (LAT - 0.006, LON + 0.006), (LAT + 0.005, LON - 0.004),
              (LAT + 0.01, LON + 0.01)]
    where = {f"dev-{d}": rng.choice(places) for d in range(devices)}
    ts = {device: START_MS for device in where}
    offset = 0
    out = []
    for _ in range(batches):
        batch = []
        for device in rng.sample(sorted(where), k=max(1, devices // 2)):
            if rng.random() < 0.3:
                base = rng.choice(places)
                where[device] = (base[0] + rng.uniform(-0.003, 0.003), base[1] + rng.uniform(-0.003, 0.003))
            fixes = []
            for _ in range(per_message):
                ts[device] += rng.choice([5_000, 30_000, 90_000])
                lat, lon = where[device]
                fixes.append({"device_id": device, "ts": format_ts(ts[device]), "lat": lat + rng.gauss(0, 0.00002),
                              "lon": lon + rng.gauss(0, 0.00002), "speed_kmh": 0.0})
            batch.append(InRecord("fleet.positions", hash(device) % 4, offset, device.encode(), orjson.dumps(fixes)))
            offset += 1
        out.append(batch)
    return out


# the same places with no settings of their own (GeofenceIndex.plain): the default configuration's plain step
PLAIN_FIRST = GeofenceIndex.build([
    square("depot", 400, LAT, LON), square("yard", 150, LAT + 0.001, LON + 0.001),
    square("site", 300, LAT - 0.006, LON + 0.006), square("gate", 80, LAT + 0.005, LON - 0.004)])
PLAIN_SECOND = PLAIN_FIRST.with_changes(upserts=[square("site", 300, LAT - 0.005, LON + 0.007)], deletes=["yard"])


def run(batches: list[list[InRecord]], swap_at: int, shortcut: bool, applied: bool = False,
        indexes_used: tuple[GeofenceIndex, GeofenceIndex] = (FIRST, SECOND)) -> list[tuple]:
    """``applied``: like the worker, hand the pipeline the states it applied (objects) before the store's bytes."""
    state = DictState()
    first, second = indexes_used
    indexes = {"now": first}
    directory: dict = {}
    pipe = PositionPipeline(Settings.load(env={}), state, changelog_topic="changelog",
                            geofences=lambda: indexes["now"], alert_engine=lambda: None,
                            clock_ms=lambda: START_MS + 10**10, applied_states=lambda: directory)
    if not shortcut:
        pipe._settled = NeverSettled()
    seen = []
    pending: dict = {}
    for n, batch in enumerate(batches):
        if n == swap_at:
            indexes["now"] = second
        # as in the worker: the last batch's states stay in memory (objects, not bytes) until their changelog
        # records are acknowledged; earlier ones are read back from the store
        out = pipe.process(batch, pending)
        seen.append((n, sorted(out.records), sorted(out.state_writes), dict(out.transitions)))
        for _, key, value in out.state_writes:
            state[key] = value
        if applied:  # the worker's directory: accepted states, once their changelog is acknowledged
            directory.update({d: entry for d, entry in out.new_states.items() if entry[1].accepted})
        pending = dict(out.new_states)
    return seen


class NeverSettled(dict):
    """A settled-devices map that forgets at once: every fix goes through ``step``."""

    def __setitem__(self, key: str, value: object) -> None:
        pass


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(2, 7), st.integers(1, 12))
def test_the_settled_shortcut_changes_no_output(seed, devices, batches, per_message):
    data = fleet_batches(seed, devices, batches, per_message)
    swap_at = random.Random(seed).randrange(batches + 1)
    reference = run(data, swap_at, shortcut=False)
    assert run(data, swap_at, shortcut=True) == reference
    assert run(data, swap_at, shortcut=True, applied=True) == reference


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(2, 7), st.integers(1, 12))
def test_the_plain_step_changes_no_output(seed, devices, batches, per_message):
    """Geofences without settings of their own under the default (all 0) settings: the pipeline takes the plain
    step; against the general step on the same index (and without the settled shortcut), identical records and
    state writes. Its geofence event records match their schema."""
    data = fleet_batches(seed, devices, batches, per_message)
    swap_at = random.Random(seed).randrange(batches + 1)
    assert PLAIN_FIRST.plain and PLAIN_SECOND.plain
    reference = run(data, swap_at, shortcut=False, indexes_used=(not_plain(PLAIN_FIRST), not_plain(PLAIN_SECOND)))
    plain = run(data, swap_at, shortcut=True, indexes_used=(PLAIN_FIRST, PLAIN_SECOND))
    assert plain == reference
    assert run(data, swap_at, shortcut=True, applied=True, indexes_used=(PLAIN_FIRST, PLAIN_SECOND)) == reference
    events = [orjson.loads(value) for _, records, _, _ in plain for topic, _, value, _ in records
              if topic == Settings.load(env={}).geofence_events_topic]
    for event in events:
        validate_output("geofence_event", event)
        as_built = GeofenceEvent(GeofenceEventType(event["type"]), event["device_id"], event["geofence_id"],
                                 parse_ts(event["ts"]), event["lat"], event["lon"])
        assert event["event_id"] == as_built.event_id


def test_a_parked_device_takes_the_shortcut(monkeypatch):
    """Parked inside the depot and the yard: after the enters, its fixes skip ``step`` until it leaves."""
    calls = []
    real_step = pipeline_module.step_settled
    monkeypatch.setattr(pipeline_module, "step_settled", lambda *a: calls.append(a[2].ts_ms) or real_step(*a))
    fixes = [{"device_id": "d", "ts": format_ts(START_MS + 5_000 * i), "lat": LAT + 0.001, "lon": LON + 0.001}
             for i in range(10)]
    away = {"device_id": "d", "ts": format_ts(START_MS + 5_000 * 10 + 300_000), "lat": LAT + 0.02, "lon": LON}
    state = DictState()
    pipe = PositionPipeline(Settings.load(env={}), state, changelog_topic="changelog", geofences=lambda: FIRST,
                            alert_engine=lambda: None, clock_ms=lambda: START_MS + 10**10)
    out = pipe.process([InRecord("fleet.positions", 0, 0, b"d", orjson.dumps([*fixes, away]))])
    assert out.transitions == {"enter": 2, "exit": 2}
    assert len(calls) == 2  # the first fix (enters) and the one away (exits)


def test_a_device_handed_back_from_another_worker_is_stepped_again():
    """Partitions move between workers: what this worker remembered as settled is stale once another worker has
    stepped the device. Parked in the depot here, into the yard (inside the depot) there, back to the same spot
    here: the index answers what it answered before, and the device exits the yard."""
    state = DictState()

    def worker() -> PositionPipeline:
        return PositionPipeline(Settings.load(env={}), state, changelog_topic="changelog", geofences=lambda: FIRST,
                                alert_engine=lambda: None, clock_ms=lambda: START_MS + 10**10)

    def batch(pipe: PositionPipeline, offset: int, lat: float, lon: float, first_ms: int) -> dict:
        fixes = [{"device_id": "d", "ts": format_ts(first_ms + 5_000 * i), "lat": lat, "lon": lon} for i in range(3)]
        out = pipe.process([InRecord("fleet.positions", 0, offset, b"d", orjson.dumps(fixes))])
        for _, key, value in out.state_writes:
            state[key] = value
        return dict(out.transitions)

    here, there = worker(), worker()
    assert batch(here, 0, LAT, LON - 0.002, START_MS) == {"enter": 1}
    assert batch(there, 1, LAT + 0.001, LON + 0.001, START_MS + 600_000) == {"enter": 1}
    assert batch(here, 2, LAT, LON - 0.002, START_MS + 1_200_000) == {"exit": 1}


def test_a_replaced_index_is_not_kept_alive_by_settled_devices():
    """Devices settled under an index that is then replaced, and that never report again, must not pin it (an
    index of 100,000 geofences is ~800 MB)."""
    import gc
    import weakref

    state = DictState()
    indexes = {"now": GeofenceIndex.build(FENCES)}
    pipe = PositionPipeline(Settings.load(env={}), state, changelog_topic="changelog",
                            geofences=lambda: indexes["now"], alert_engine=lambda: None,
                            clock_ms=lambda: START_MS + 10**10)
    parked = [{"device_id": "quiet", "ts": format_ts(START_MS + 5_000 * i), "lat": LAT, "lon": LON} for i in range(3)]
    pipe.process([InRecord("fleet.positions", 0, 0, b"quiet", orjson.dumps(parked))])
    old = weakref.ref(indexes["now"])
    indexes["now"] = indexes["now"].with_changes(deletes=["gate"])
    other = [{"device_id": "busy", "ts": format_ts(START_MS + 5_000 * i), "lat": LAT, "lon": LON} for i in range(2)]
    pipe.process([InRecord("fleet.positions", 1, 1, b"busy", orjson.dumps(other))])
    gc.collect()
    assert old() is None


def test_fixes_the_timer_releases_are_stepped_under_the_index_of_the_tick():
    """With a reorder window, fixes wait in the device state and a timer tick may step them. Settled in the depot
    by the last batch, the index then gives the depot a dwell time (same answer) before the tick releases the
    device's next fixes: they get the dwell event, as they do without the settled-devices memo."""
    depot = GeofenceIndex.build([square("depot", 400, LAT, LON)])
    with_dwell = depot.with_changes(upserts=[square("depot", 400, LAT, LON, dwell_s=60)])

    def outputs(shortcut: bool) -> list[tuple]:
        clock = {"now": START_MS}
        indexes = {"now": depot}
        state = DictState()
        pipe = PositionPipeline(Settings.load(env={}, reorder_window_s=10), state, changelog_topic="changelog",
                                geofences=lambda: indexes["now"], alert_engine=lambda: None,
                                clock_ms=lambda: clock["now"])
        if not shortcut:
            pipe._settled = NeverSettled()
        pending: dict = {}
        seen = []

        def applied(out) -> None:
            for _, key, value in out.state_writes:
                state[key] = value
            pending.update(out.new_states)
            seen.append((sorted(out.records), dict(out.transitions)))

        for n in range(2):  # two batches 15 s apart: the second releases the first one's fixes
            clock["now"] = START_MS + 15_000 * n
            fixes = [{"device_id": "d", "ts": format_ts(START_MS + 30_000 * (3 * n + i)), "lat": LAT, "lon": LON}
                     for i in range(3)]
            applied(pipe.process([InRecord("fleet.positions", 0, n, b"d", orjson.dumps(fixes))], pending))
        indexes["now"] = with_dwell
        clock["now"] = START_MS + 60_000
        applied(pipe.tick([], pending_signals={}, now_ms=clock["now"], held_due=[(0, "d")], pending=pending))
        return seen

    reference = outputs(shortcut=False)
    assert reference[-1][1] == {"dwell": 1}
    assert outputs(shortcut=True) == reference
