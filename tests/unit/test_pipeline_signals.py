"""The position pipeline's alert path: what it emits and stores must not depend on its shortcuts.

The pipeline keeps the signals it knows the store holds as objects (``signals_applied``) instead of decoding them
again; the worker feeds it after every acknowledged flush. These tests run the same batches, timer ticks included,
through a pipeline fed that way and one that always reads the store, and compare every record byte for byte.
"""

from __future__ import annotations

import random

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetstream.codecs import format_ts
from fleetstream.config import Settings
from fleetstream.domain.alerts import AlertEngine
from fleetstream.domain.rules import parse_rules
from fleetstream.streaming.pipeline import BatchOutput, InRecord, PositionPipeline

START_MS = 1_780_000_000_000
CLOCK_MS = START_MS + 100 * 86_400_000  # the worker's clock: past every fix (none is dead-lettered as future)
RULES = {
    "groups": {"fleet": ["veh-*"]},
    "rules": [
        {"id": "offline", "kind": "offline", "severity": "major", "after": "10m", "groups": ["fleet"]},
        {"id": "fast", "kind": "overspeed", "severity": "major", "limit_kmh": 70, "for": "30s", "groups": ["fleet"]},
        {"id": "t60", "kind": "threshold", "severity": "minor", "when": "speed_kmh > 60 for 1m", "groups": ["fleet"]},
        {"id": "t40", "kind": "threshold", "severity": "minor", "when": "speed_kmh > 40 for 20s",
         "groups": ["fleet"]},
        {"id": "service", "kind": "maintenance", "severity": "info", "every_km": 2, "groups": ["fleet"]},
    ],
}


class Store(dict):
    def get(self, partition: int, key: bytes) -> bytes | None:  # type: ignore[override]
        return dict.get(self, key)


def messages(seed: int, devices: int, count: int, per_message: int) -> list[InRecord]:
    """Devices driving with speeds that wander across the rules' limits, a few fixes per message."""
    rng = random.Random(seed)
    state = {f"veh-{i}": [53.4, -2.98, START_MS, rng.uniform(0, 90)] for i in range(devices)}
    out = []
    for offset in range(count):
        device = f"veh-{rng.randrange(devices)}"
        s = state[device]
        fixes = []
        for _ in range(per_message):
            s[0] += rng.gauss(0, 0.0005)
            s[1] += rng.gauss(0, 0.0005)
            s[2] += rng.choice([5_000, 5_000, 60_000, 900_000])  # now and then a gap past the offline rule
            s[3] = min(120.0, max(0.0, s[3] + rng.gauss(0, 12)))
            fixes.append({"device_id": device, "ts": format_ts(s[2]), "lat": round(s[0], 6),
                          "lon": round(s[1], 6), "speed_kmh": round(s[3], 1)})
        out.append(InRecord("fleet.positions", hash(device) % 3, offset, device.encode(), orjson.dumps(fixes)))
    return out


def run(records: list[InRecord], batch: int, tick_every: int, mirror: bool) -> tuple[list, dict]:
    """Batches (and timer ticks on a clock ahead of the fixes) as the worker runs them; every record out and the
    signals store at the end."""
    cfg = Settings.load(env={})
    engine = AlertEngine(parse_rules(RULES))
    state, signals = Store(), Store()
    pipeline = PositionPipeline(cfg, state, changelog_topic="state", signals=signals,
                                signals_changelog_topic="signals", alert_engine=lambda: engine,
                                clock_ms=lambda: CLOCK_MS)
    emitted: list = []
    due: dict[str, int] = {}

    def applied(out: BatchOutput) -> None:
        emitted.extend(out.records)
        for _, key, value in out.state_writes:
            state[key] = value
        for _, key, value in out.signal_writes:
            signals[key] = value
        if mirror:
            pipeline.signals_applied(out.new_signals)
        for device_id, (partition, _) in out.new_signals.items():
            due[device_id] = partition

    for n, i in enumerate(range(0, len(records), batch)):
        applied(pipeline.process(records[i : i + batch]))
        if tick_every and n % tick_every == tick_every - 1:
            now = START_MS + (n + 1) * 3_600_000  # the wall clock runs ahead of the fixes (a backlog)
            applied(pipeline.tick([(p, d) for d, p in sorted(due.items())], now_ms=now))
    return emitted, dict(signals)


def test_the_batches_raise_and_clear_alerts():
    emitted, _ = run(messages(3, 4, 60, 5), 4, 2, mirror=True)
    states = {orjson.loads(r.value)["state"] for r in emitted if r.topic == "fleet.alerts"}
    assert states == {"raised", "cleared"}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(1, 8), st.sampled_from([0, 1, 3]))
def test_the_applied_signals_mirror_gives_what_reading_the_store_gives(seed, devices, batch, tick_every):
    records = messages(seed, devices, 40, 5)
    with_mirror = run(records, batch, tick_every, mirror=True)
    from_store = run(records, batch, tick_every, mirror=False)
    assert with_mirror == from_store
    assert not any(r.topic == "fleet.deadletter" for r in with_mirror[0])


def alert_pipeline(cfg: Settings, signals: Store) -> PositionPipeline:
    """A pipeline with RULES, the signals store ``signals`` and the clock at CLOCK_MS."""
    engine = AlertEngine(parse_rules(RULES))
    return PositionPipeline(cfg, Store(), changelog_topic="state", signals=signals, signals_changelog_topic="signals",
                            alert_engine=lambda: engine, clock_ms=lambda: CLOCK_MS)


def test_the_mirror_is_read_instead_of_the_store_and_forgotten_on_a_rebalance():
    cfg = Settings.load(env={})
    signals = Store()
    pipeline = alert_pipeline(cfg, signals)
    out = pipeline.process(messages(1, 1, 1, 3))
    for _, key, value in out.signal_writes:
        signals[key] = value
    pipeline.signals_applied(out.new_signals)
    (device, (_, applied)), = out.new_signals.items()
    assert applied.alerts is not None and applied.alerts.watch is not None  # decoding would lose the watch
    signals[device.encode()] = b"not json"  # were the store read, this would fail
    again = pipeline.process(messages(2, 1, 1, 3))
    assert again.enriched == 3 and device in again.new_signals
    pipeline.forget_applied_signals()
    assert pipeline.applied_signals == {}


def fix_record(device: str, offset: int, partition: int, *fixes: tuple[int, float]) -> InRecord:
    body = [{"device_id": device, "ts": format_ts(ts), "lat": 53.4, "lon": -2.98, "speed_kmh": speed}
            for ts, speed in fixes]
    return InRecord("fleet.positions", partition, offset, device.encode(), orjson.dumps(body))


def test_a_batch_reports_the_newest_event_time_of_each_partition():
    cfg = Settings.load(env={})
    pipeline = PositionPipeline(cfg, Store(), changelog_topic="state", clock_ms=lambda: CLOCK_MS)
    out = pipeline.process([
        fix_record("veh-1", 0, 0, (START_MS + 4_000, 10.0), (START_MS + 9_000, 10.0), (START_MS + 6_000, 10.0)),
        fix_record("veh-2", 1, 0, (START_MS + 7_000, 10.0)),
        fix_record("veh-3", 2, 2, (START_MS + 1_000, 10.0)),
        InRecord(cfg.telemetry_topic, 1, 3, b"veh-4", orjson.dumps(
            {"device_id": "veh-4", "ts": format_ts(START_MS + 5_000), "metrics": {"fuel_pct": 50}})),
        InRecord("fleet.positions", 1, 4, b"veh-5", b"not json"),  # dead-lettered: no event time
    ])
    assert out.newest_ts == {0: START_MS + 9_000, 2: START_MS + 1_000, 1: START_MS + 5_000}
    merged = BatchOutput()
    merged.merge(out)
    merged.merge(BatchOutput(newest_ts={0: START_MS + 1, 3: START_MS + 2}))
    assert merged.newest_ts == {0: START_MS + 9_000, 2: START_MS + 1_000, 1: START_MS + 5_000, 3: START_MS + 2}


def test_timer_deadlines_fire_by_the_partitions_watermark_not_the_wall_clock():
    """A backlog: the wall clock is hours past the fixes. The overspeed pending since the first fix must not be
    raised by the timer while the partition's event time has not passed its deadline (the next fixes, still to
    be read, may end it), and is raised at its deadline once the watermark passes it."""
    cfg = Settings.load(env={})
    signals = Store()
    pipeline = alert_pipeline(cfg, signals)

    def applied(out: BatchOutput) -> BatchOutput:
        for _, key, value in out.signal_writes:
            signals[key] = value
        return out

    applied(pipeline.process([fix_record("veh-1", 0, 1, (START_MS, 50.0), (START_MS + 5_000, 80.0))]))
    due = [(1, "veh-1")]
    wall = START_MS + 3 * 3_600_000

    def raised(out: BatchOutput) -> list[tuple[str, str]]:
        return [(a["rule"], a["ts"]) for a in (orjson.loads(r.value) for r in out.records
                                               if r.topic == cfg.alerts_topic) if a["state"] == "raised"]

    assert raised(applied(pipeline.tick(due, now_ms=wall, watermark=lambda p: None))) == []
    assert raised(applied(pipeline.tick(due, now_ms=wall, watermark=lambda p: START_MS + 15_000))) == []
    fired = raised(applied(pipeline.tick(due, now_ms=wall, watermark=lambda p: START_MS + 40_000)))
    # t40 (> 40 for 20 s) since the first fix, fast (> 70 for 30 s) since the second; t60 (1 min) not yet
    assert fired == [("t40", format_ts(START_MS + 20_000)), ("fast", format_ts(START_MS + 35_000))]
