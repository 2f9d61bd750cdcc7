"""CPU cost per fix of the worker's hot path without a broker, median (and best) of several runs.

    python benchmarks/pipeline_cpu.py [--fixes 100000] [--per-message 50] [--runs 5] [--geofences 200] [--rules 50]

1. The whole batch pipeline (``PositionPipeline.process``) as the worker runs it (device-signals store fed back,
   aggregation, a timer tick every ``--tick-every`` batches) with the filter chain, motion/trips and the rules
   off (throughput.py's ``BARE``), then on, in the same run (same geofences in both), and the ratio of their
   rates: the issue asks >= 0.75.
2. Per stage, each a tight loop over the previous stage's outputs (process CPU time, no per-call timers):

   decode    bytes -> Position (decode + validate)
   tracking  the per-fix step with filters and motion off (H3, distance, derived speed/heading, odometer)
   filters   what turning the filter chain on adds to the step  } fused into one pass for speed, so measured as
   motion    what turning motion/trips on adds to the step      } the difference between step configurations
   geofence  index lookup (vectorized, per batch) + enter/exit/dwell transitions per accepted fix
   rules     the alert path per accepted fix as the pipeline runs it: the values handed over, one
             ``AlertEngine.on_positions`` per device and batch, the state kept to the next batch (the rule set is
             throughput.py's ``make_rules``, the one the end-to-end benchmark runs; "n/a" if it cannot load)
   encode    the enriched record per fix, plus the trips and stops that closed

   Stages are the ``STAGES`` list below: add one as ``Stage(name, fn)``, ``fn(ctx)`` reading what earlier stages
   left in ``ctx`` and leaving its own outputs there; it is timed as a whole.
3. The baselines' decode + H3 + encode work (benchmarks/throughput.py) as before.

The fleet is benchmarks/throughput.py's random walk (the same messages the end-to-end benchmark loads); with
``--parked 0.2`` a fifth of the messages are parked devices, so that stops and trips close.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import heapq
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import orjson

from benchmarks.throughput import BARE, make_messages, make_rules, work
from fleetstream.codecs import decode_positions, dumps, format_ts
from fleetstream.config import Settings
from fleetstream.domain.eventclock import EventClock, pop_due
from fleetstream.domain.filters import FilterConfig
from fleetstream.domain.geoindex import GeofenceIndex
from fleetstream.domain.tracking import TrackingConfig, step_position
from fleetstream.domain.transitions import TransitionDefaults, memberships_from_json
from fleetstream.domain.transitions import step as transition_step
from fleetstream.streaming.aggregates import Aggregation
from fleetstream.streaming.pipeline import BatchOutput, InRecord, PositionPipeline, enriched_dict
from fleetstream.streaming.runner import GC_THRESHOLDS


class DictState(dict):
    def get(self, partition: int, key: bytes) -> bytes | None:  # type: ignore[override]
        return dict.get(self, key)


def fleet(messages: list[tuple[bytes, bytes]], parked_share: float) -> list[tuple[bytes, bytes]]:
    """Every message (a device's 50 fixes, 250 s) whose number falls in the ``parked_share`` of a cycle becomes a
    parked device: speed 0 at one place, so that stops are confirmed and trips close as in a real fleet."""
    if not parked_share:
        return messages
    out = []
    cycle = 10
    for n, (key, value) in enumerate(messages):
        fixes = orjson.loads(value)
        many = isinstance(fixes, list)
        if (n // 7) % cycle < parked_share * cycle:
            first = (fixes if many else [fixes])[0]
            for fix in fixes if many else [fixes]:
                fix.update(lat=first["lat"], lon=first["lon"], speed_kmh=0.0)
        out.append((key, orjson.dumps(fixes)))
    return out


def tracking_configs(settings: Settings) -> dict[str, TrackingConfig]:
    """off: the step as before filters and trips; filters: + the filter chain; on: + motion/trips. Hook: the
    lead maps Settings to TrackingConfig; until then the defaults of TrackingConfig / FilterConfig apply."""
    base = {"h3_resolution": settings.h3_resolution,
            "extra_resolutions": tuple(r for r in settings.h3_extra_resolutions if r != settings.h3_resolution),
            "stop_speed_kmh": settings.stop_speed_kmh}
    return {
        "off": TrackingConfig(**base, trips=False, filters=FilterConfig.off()),
        "filters": TrackingConfig(**base, trips=False),
        "on": TrackingConfig(**base),
    }


def load_rules(count: int, index: GeofenceIndex | None) -> tuple[Any, Any] | None:
    """(AlertEngine with throughput.py's ``make_rules(count)``, the engine class), or None if unavailable. The same
    rules the end-to-end benchmark publishes, with the geofence speed limits the worker derives."""
    if not count:
        return None
    try:
        from fleetstream.domain.alerts import AlertEngine
        from fleetstream.domain.rules import parse_rules
        from fleetstream.streaming.app import _speed_limits
    except Exception as exc:  # the alert engine is developed alongside; report the stage as n/a
        print(f"rules stage unavailable: {type(exc).__name__}: {exc}")
        return None
    return AlertEngine(parse_rules(make_rules(count)), _speed_limits(index)), AlertEngine


def make_index(count: int) -> GeofenceIndex | None:
    if not count:
        return None
    from benchmarks.geofence_index import make_fences

    return GeofenceIndex.build(make_fences(count, center=(53.40, -2.98)))


# --- stages ----------------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    fn: Callable[[dict[str, Any]], None]
    costs: list[float] = field(default_factory=list)


def stage_decode(ctx: dict[str, Any]) -> None:
    now_ms = ctx["now_ms"]
    accepted = []
    batch_ends = set()
    batch = ctx.get("batch", 1)
    for n, record in enumerate(ctx["records"]):
        for index, item in enumerate(decode_positions(record.key, record.value, now_ms=now_ms)):
            accepted.append((record, index, item))  # the generated data has no dead letters
        if (n + 1) % batch == 0:
            batch_ends.add(len(accepted))
    batch_ends.add(len(accepted))
    ctx["accepted"] = accepted
    ctx["batch_ends"] = batch_ends  # fix counts at which a pipeline batch ends (the rules stage runs per batch)


def _lookup(ctx: dict[str, Any]) -> list[tuple[str, ...]]:
    accepted, index = ctx["accepted"], ctx["index"]
    if index is None:
        return [()] * len(accepted)
    lats = np.fromiter((fix.lat for _, _, fix in accepted), dtype=np.float64, count=len(accepted))
    lons = np.fromiter((fix.lon for _, _, fix in accepted), dtype=np.float64, count=len(accepted))
    return index.lookup(lats, lons)


def _steps(ctx: dict[str, Any], config: TrackingConfig, keep: bool) -> None:
    now_ms = ctx["now_ms"]
    inside = ctx.get("inside") or [()] * len(ctx["accepted"])
    states: dict[str, Any] = {}
    out = []
    for (_, _, fix), fences in zip(ctx["accepted"], inside, strict=True):
        previous = states.get(fix.device_id)
        new_state, enrichment = step_position(previous, fix, config, now_ms, fences)
        if enrichment.filtered is None:
            states[fix.device_id] = new_state
        if keep:
            out.append((previous, new_state, enrichment))
    if keep:
        ctx["steps"] = out


def stage_tracking(ctx: dict[str, Any]) -> None:
    _steps(ctx, ctx["configs"]["off"], keep=False)


def stage_filters(ctx: dict[str, Any]) -> None:
    _steps(ctx, ctx["configs"]["filters"], keep=False)


def stage_motion(ctx: dict[str, Any]) -> None:
    _steps(ctx, ctx["configs"]["on"], keep=False)


def keep_steps(ctx: dict[str, Any]) -> None:
    """Untimed: the per-fix (previous state, new state, enrichment) that later stages read. Kept out of the timed
    loop: holding 100k of them makes the collector rescan them all, which the worker never pays."""
    _steps(ctx, ctx["configs"]["on"], keep=True)


def stage_geofence(ctx: dict[str, Any]) -> None:
    if ctx["index"] is None:
        raise LookupError("no geofences")
    inside = _lookup(ctx)
    ctx["inside"] = inside
    index = ctx["index"]
    events_per_fix: list[Any] = [()] * len(inside)
    if index is not None and "steps" in ctx:  # transitions need the motion stage's previous states
        defaults = TransitionDefaults()
        memberships: dict[str, Any] = {}
        for n, ((_, _, fix), fences, (previous, _, enrichment)) in enumerate(
            zip(ctx["accepted"], inside, ctx["steps"], strict=True)
        ):
            if enrichment.filtered is not None:
                continue
            before = memberships.get(fix.device_id) or memberships_from_json(None)
            memberships[fix.device_id], events = transition_step(before, previous, fix, fences, index, defaults)
            events_per_fix[n] = events
    ctx["events"] = events_per_fix


def stage_rules(ctx: dict[str, Any]) -> None:
    """As the pipeline runs the engine: per fix the values handed over, per device and batch one ``on_positions``
    over its fixes in order, the state kept for the device's next batch."""
    engine = ctx["engine"]
    if engine is None:
        raise LookupError("no rules")
    on_positions = engine.on_positions
    alert_states: dict[str, Any] = {}
    alerts = 0
    batch_ends = ctx["batch_ends"]
    runs: dict[str, list[Any]] = {}
    items = zip(ctx["accepted"], ctx["steps"], ctx["events"], strict=True)
    for n, ((_, _, fix), (_, state, enrichment), events) in enumerate(items):
        if enrichment.filtered is None:
            values = {  # as PositionPipeline._alerts_on_position builds them
                "lat": fix.lat, "lon": fix.lon, "speed_kmh": enrichment.speed_kmh,
                "heading_deg": enrichment.heading_deg, "odometer_m": enrichment.odometer_m,
                "motion": enrichment.motion, "accuracy_m": fix.accuracy_m, "altitude_m": fix.altitude_m,
            }
            memberships = state.fences
            confirmed = tuple(sorted(f for f, m in memberships.items() if m.inside)) if memberships else ()
            runs.setdefault(fix.device_id, []).append((fix.ts_ms, values, confirmed, events))
        if n + 1 in batch_ends:
            for device, run in runs.items():
                alert_states[device], out = on_positions(alert_states.get(device), device, run)
                alerts += len(out)
            runs.clear()
    ctx["alerts"] = alerts


def stage_encode(ctx: dict[str, Any]) -> None:
    inside = ctx["inside"]
    closed = 0
    for (record, item_index, fix), fences, (_, _, enrichment) in zip(ctx["accepted"], inside, ctx["steps"],
                                                                      strict=True):
        dumps(enriched_dict(record, item_index, fix, enrichment, fences))
        for event in enrichment.closed:
            dumps(event.to_message(format_ts))
            closed += 1
    ctx["closed"] = closed


# The order they run in (each needs what the earlier ones left in ctx); the report lists them in the order.
STAGES = [
    Stage("decode", stage_decode),
    Stage("geofence", stage_geofence),  # needs the motion outputs: the warm-up pass fills them first
    Stage("tracking", stage_tracking),
    Stage("filters", stage_filters),
    Stage("motion", stage_motion),
    Stage("rules", stage_rules),
    Stage("encode", stage_encode),
]
REPORT_ORDER = ("decode", "filters", "geofence", "motion", "rules", "encode")


def run_stages(ctx: dict[str, Any], runs: int, n_fixes: int) -> dict[str, list[float]]:
    stage_decode(ctx)
    ctx["inside"] = _lookup(ctx)
    ctx["events"] = [()] * len(ctx["accepted"])
    keep_steps(ctx)
    for stage in STAGES:  # warm-up: fills ctx with every stage's outputs
        with contextlib.suppress(LookupError):
            stage.fn(ctx)
    costs: dict[str, list[float]] = {stage.name: [] for stage in STAGES}
    for _ in range(runs):
        for stage in STAGES:
            started = time.process_time()
            try:
                stage.fn(ctx)
            except LookupError:
                continue
            costs[stage.name].append((time.process_time() - started) / n_fixes * 1e6)
    return costs


def worker_like(settings: Settings, records: list[InRecord], index: GeofenceIndex | None, engine: Any,
                now_ms: int, batch: int, tick_every: int, partitions: int) -> None:
    """The batches as the worker runs them: device state and device signals read back from their stores (the
    signals also from the pipeline's mirror of what it applied), the cell partials fed back in as input, and the
    alert timer ticking on each partition's event clock (as the worker's: fed the batches' newest event times)."""
    state, signals = DictState(), DictState()
    aggregation = Aggregation(settings, items=lambda name: iter(()), sources=partitions) \
        if settings.aggregation_enabled else None
    pipe = PositionPipeline(settings, state, changelog_topic="changelog", geofences=lambda: index,
                            alert_engine=(lambda: engine), clock_ms=lambda: now_ms, signals=signals,
                            signals_changelog_topic="signals-changelog", aggregation=aggregation)
    deadlines: list[tuple[int, str, int]] = []
    partials: list[InRecord] = []
    clock = EventClock(round(settings.alert_lateness_s * 1000), round(settings.alert_idle_s * 1000))

    def applied(out: BatchOutput) -> None:  # what the worker does once a batch's outputs are acknowledged
        for _, key, value in out.state_writes:
            state[key] = value
        for _, key, value in out.signal_writes:
            signals[key] = value
        pipe.signals_applied(out.new_signals)
        for acknowledge in out.on_acked:
            acknowledge()
        for device_id, (partition, signal) in out.new_signals.items():
            if signal.alerts is not None and signal.alerts.due_ms is not None:
                heapq.heappush(deadlines, (signal.alerts.due_ms, device_id, partition))

    for n, i in enumerate(range(0, len(records), batch)):
        out = pipe.process(records[i : i + batch] + partials)
        partials = [InRecord(r.topic, r.partition, 0, r.key, r.value) for r in out.records
                    if r.topic == settings.cell_partials_topic]
        wall_ms = int(time.time() * 1000)
        for partition, ts in out.newest_ts.items():
            clock.observe(partition, min(ts, wall_ms), wall_ms)
        applied(out)
        if tick_every and n % tick_every == tick_every - 1:
            marks = {p: clock.watermark(p, wall_ms) for p in range(partitions)}
            due = pop_due(deadlines, marks.get, marks)
            applied(pipe.tick(due, now_ms=wall_ms, watermark=marks.get))


# --- main --------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixes", type=int, default=100_000)
    parser.add_argument("--per-message", type=int, default=50)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=500,
                        help="messages per pipeline batch (throughput.py's worker, reading a preloaded topic, took "
                        "its 4,000 messages in 7-9 batches)")
    parser.add_argument("--tick-every", type=int, default=1,
                        help="a timer tick after every this many batches (such a batch takes the worker about the "
                        "1 s of its timer)")
    parser.add_argument("--geofences", type=int, default=200,
                        help="geofences around the fleet for the per-stage table (0: none)")
    parser.add_argument("--pipeline-geofences", type=int, default=0,
                        help="geofences in the whole-pipeline runs (0, as throughput.py runs the worker by default)")
    parser.add_argument("--rules", type=int, default=50, help="alert rules in the 'on' runs (0: none)")
    parser.add_argument("--parked", type=float, default=0.0,
                        help="share of messages where the device is parked (0: throughput.py's messages as they are)")
    args = parser.parse_args()
    messages = fleet(make_messages(args.fixes, args.devices, args.per_message), args.parked)
    settings = Settings.load(env={})
    partitions = 8
    records = [InRecord(settings.positions_topic, hash(k) % partitions, i, k, v) for i, (k, v) in enumerate(messages)]
    now_ms = int(time.time() * 1000)
    configs = tracking_configs(settings)
    index = make_index(args.geofences)
    pipeline_index = index if args.pipeline_geofences == args.geofences else make_index(args.pipeline_geofences)
    rules = load_rules(args.rules, index)
    engine = rules[0] if rules else None
    pipeline_rules = load_rules(args.rules, pipeline_index)
    pipeline_engine = pipeline_rules[0] if pipeline_rules else None
    gc.set_threshold(*GC_THRESHOLDS)  # as the worker runs

    def pipeline(config: Settings, with_rules: bool) -> Callable[[], None]:
        def run() -> None:
            worker_like(config, records, pipeline_index, pipeline_engine if with_rules else None, now_ms,
                        args.batch, args.tick_every, partitions)
        return run

    def decode() -> None:
        for k, v in messages:
            decode_positions(k, v, now_ms=now_ms)

    def baseline() -> None:
        for k, v in messages:
            work(k, v, now_ms)

    rules_label = f"{len(engine.ruleset)} rules" if engine is not None else "no rules"
    whole = {
        "pipeline off": pipeline(Settings.load(env={}, **BARE), with_rules=False),
        f"pipeline on ({rules_label})": pipeline(settings, with_rules=True),
        "decode+validate": decode,
        "baseline work": baseline,
    }
    print(f"{args.fixes} fixes, {args.per_message} per message, {args.devices} devices, batches of {args.batch} "
          f"messages, {args.pipeline_geofences} geofences, {args.runs} runs; process CPU µs per fix, median (best)")
    costs: dict[str, list[float]] = {name: [] for name in whole}
    for _ in range(args.runs):  # interleaved, so that load from elsewhere hits every variant alike
        for name, fn in whole.items():
            started = time.process_time()
            fn()
            costs[name].append((time.process_time() - started) / args.fixes * 1e6)
    for name, values in costs.items():
        print(f"  {name:28s} {statistics.median(values):6.2f} ({min(values):5.2f})")
    off_runs, on_runs = list(costs.values())[:2]
    paired_ratio = statistics.median(x / y for x, y in zip(off_runs, on_runs, strict=True))
    print(f"  rate with filters+motion+rules on / off: {statistics.median(off_runs) / statistics.median(on_runs):.2f}x"
          f" (medians; median of the runs' own ratios: {paired_ratio:.2f}x)")

    print(f"per stage: {args.geofences} geofences")
    ctx: dict[str, Any] = {"records": records, "now_ms": now_ms, "configs": configs, "index": index,
                           "engine": engine, "batch": args.batch}
    stages = run_stages(ctx, args.runs, args.fixes)
    med = {name: statistics.median(v) if v else None for name, v in stages.items()}
    best = {name: min(v) if v else None for name, v in stages.items()}
    def paired(a: str, b: str) -> tuple[float, float]:
        """(median of the per-run differences b - a: runs are back to back, so load drifts cancel; best - best)"""
        return (statistics.median(y - x for x, y in zip(stages[a], stages[b], strict=True)), best[b] - best[a])

    derived = {"filters": paired("tracking", "filters"), "motion": paired("filters", "motion")}
    print("per stage, µs per fix, median (best):")
    print(f"  {'tracking (step, all off)':28s} {med['tracking']:6.2f} ({best['tracking']:5.2f})")
    for name in REPORT_ORDER:
        if name in derived:
            m, b = derived[name]
            print(f"  {name + ' (added to the step)':28s} {m:6.2f} ({b:5.2f})")
        elif med.get(name) is None:
            print(f"  {name:28s}    n/a")
        else:
            print(f"  {name:28s} {med[name]:6.2f} ({best[name]:5.2f})")
    filtered = sum(1 for _, _, e in ctx["steps"] if e.filtered is not None)
    print(f"  ({filtered} fixes filtered, {ctx.get('closed', 0)} trips/stops closed, {ctx.get('alerts', 0)} alerts)")


if __name__ == "__main__":
    main()
