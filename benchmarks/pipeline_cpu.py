"""CPU cost per fix of the worker's hot path without a broker, median (and best) of several runs.

    python benchmarks/pipeline_cpu.py [--fixes 100000] [--per-message 50] [--runs 5] [--geofences 200] [--rules 50]

1. The whole batch pipeline (``PositionPipeline.process``) with the filter chain, motion/trips and the rules off,
   then on, in the same run (same geofences in both), and the ratio of their rates: the issue asks >= 0.75.
2. Per stage, each a tight loop over the previous stage's outputs (process CPU time, no per-call timers):

   decode    bytes -> Position (decode + validate)
   tracking  the per-fix step with filters and motion off (H3, distance, derived speed/heading, odometer)
   filters   what turning the filter chain on adds to the step  } fused into one pass for speed, so measured as
   motion    what turning motion/trips on adds to the step      } the difference between step configurations
   geofence  index lookup (vectorized, per batch) + enter/exit/dwell transitions per accepted fix
   rules     the alert engine per accepted fix (50 rules from benchmarks/alerts.py; "n/a" if it cannot load)
   encode    the enriched record per fix, plus the trips and stops that closed

   Stages are the ``STAGES`` list below: add one as ``Stage(name, fn)``, ``fn(ctx)`` reading what earlier stages
   left in ``ctx`` and leaving its own outputs there; it is timed as a whole.
3. The baselines' decode + H3 + encode work (benchmarks/throughput.py) as before.

The fleet is benchmarks/throughput.py's random walk, with device ids truck-/van-/reefer- (so that the rules' groups
select them as in benchmarks/alerts.py) and parked a fifth of the time (``--parked``), so that stops and trips close.
"""

from __future__ import annotations

import argparse
import contextlib
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

from benchmarks.throughput import make_messages, work
from fleetstream.codecs import decode_positions, dumps, format_ts
from fleetstream.config import Settings
from fleetstream.domain.filters import FilterConfig
from fleetstream.domain.geoindex import GeofenceIndex
from fleetstream.domain.tracking import TrackingConfig, step_position
from fleetstream.domain.transitions import TransitionDefaults, memberships_from_json
from fleetstream.domain.transitions import step as transition_step
from fleetstream.streaming.pipeline import InRecord, PositionPipeline, enriched_dict

KINDS = (b"truck", b"van", b"reefer")


class DictState(dict):
    def get(self, partition: int, key: bytes) -> bytes | None:  # type: ignore[override]
        return dict.get(self, key)


def fleet(messages: list[tuple[bytes, bytes]], parked_share: float) -> list[tuple[bytes, bytes]]:
    """veh-00042 -> reefer-00042 (kind by number), key and payload alike; and every message (a device's 50 fixes,
    250 s) whose number falls in the ``parked_share`` of a cycle is a parked device: speed 0 at one place, so that
    stops are confirmed and trips close as in a real fleet."""
    out = []
    cycle = 10
    for n, (key, value) in enumerate(messages):
        new = KINDS[int(key[4:]) % 3] + key[3:]
        fixes = orjson.loads(value)
        many = isinstance(fixes, list)
        for fix in fixes if many else [fixes]:
            fix["device_id"] = new.decode()
        if (n // 7) % cycle < parked_share * cycle:
            first = (fixes if many else [fixes])[0]
            for fix in fixes if many else [fixes]:
                fix.update(lat=first["lat"], lon=first["lon"], speed_kmh=0.0)
        out.append((new, orjson.dumps(fixes)))
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


def load_rules(count: int) -> tuple[Any, Any] | None:
    """(AlertEngine with ``count`` rules, the engine class) from benchmarks/alerts.py, or None if unavailable."""
    if not count:
        return None
    try:
        from benchmarks.alerts import SPEED_LIMITS, fifty_rules
        from fleetstream.domain.alerts import AlertEngine
    except Exception as exc:  # the alert engine is developed alongside; report the stage as n/a
        print(f"rules stage unavailable: {type(exc).__name__}: {exc}")
        return None
    ruleset = fifty_rules()
    if count != len(ruleset):
        print(f"note: benchmarks/alerts.py has {len(ruleset)} rules; using them all")
    return AlertEngine(ruleset, SPEED_LIMITS), AlertEngine


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
    for record in ctx["records"]:
        for index, item in enumerate(decode_positions(record.key, record.value, now_ms=now_ms)):
            accepted.append((record, index, item))  # the generated data has no dead letters
    ctx["accepted"] = accepted


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
    engine = ctx["engine"]
    if engine is None:
        raise LookupError("no rules")
    on_position = engine.on_position
    alert_states: dict[str, Any] = {}
    alerts = 0
    for (_, _, fix), (_, state, enrichment), events in zip(ctx["accepted"], ctx["steps"], ctx["events"],
                                                            strict=True):
        if enrichment.filtered is not None:
            continue
        values = {  # as PositionPipeline._alerts_on_position builds them
            "lat": fix.lat, "lon": fix.lon, "speed_kmh": enrichment.speed_kmh, "heading_deg": enrichment.heading_deg,
            "odometer_m": enrichment.odometer_m, "motion": enrichment.motion.value, "accuracy_m": fix.accuracy_m,
            "altitude_m": fix.altitude_m,
        }
        device = fix.device_id
        alert_states[device], out = on_position(alert_states.get(device), device, fix.ts_ms, values,
                                                state.geofences, events)
        alerts += len(out)
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


# --- main --------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixes", type=int, default=100_000)
    parser.add_argument("--per-message", type=int, default=50)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2000, help="messages per pipeline batch")
    parser.add_argument("--geofences", type=int, default=200, help="geofences around the fleet (0: none)")
    parser.add_argument("--rules", type=int, default=50, help="alert rules in the 'on' runs (0: none)")
    parser.add_argument("--parked", type=float, default=0.2, help="share of messages where the device is parked")
    args = parser.parse_args()
    messages = fleet(make_messages(args.fixes, args.devices, args.per_message), args.parked)
    records = [InRecord("fleet.positions", hash(k) % 8, i, k, v) for i, (k, v) in enumerate(messages)]
    now_ms = int(time.time() * 1000)
    settings = Settings.load(env={})
    configs = tracking_configs(settings)
    index = make_index(args.geofences)
    rules = load_rules(args.rules)
    engine = rules[0] if rules else None

    def pipeline(config: TrackingConfig, with_rules: bool) -> Callable[[], None]:
        def run() -> None:
            state = DictState()
            pipe = PositionPipeline(settings, state, changelog_topic="changelog", geofences=lambda: index,
                                    alert_engine=(lambda: engine) if with_rules else (lambda: None),
                                    clock_ms=lambda: now_ms)
            pipe.tracking = config  # hook until Settings carry the filter and motion fields
            for i in range(0, len(records), args.batch):
                out = pipe.process(records[i : i + args.batch])
                for _, key, value in out.state_writes:
                    state[key] = value
        return run

    def decode() -> None:
        for k, v in messages:
            decode_positions(k, v, now_ms=now_ms)

    def baseline() -> None:
        for k, v in messages:
            work(k, v, now_ms)

    rules_label = f"{len(engine.ruleset)} rules" if engine is not None else "no rules"
    whole = {
        "pipeline off": pipeline(configs["off"], with_rules=False),
        f"pipeline on ({rules_label})": pipeline(configs["on"], with_rules=True),
        "decode+validate": decode,
        "baseline work": baseline,
    }
    print(f"{args.fixes} fixes, {args.per_message} per message, {args.devices} devices, {args.geofences} geofences, "
          f"{args.runs} runs; process CPU µs per fix, median (best)")
    costs: dict[str, list[float]] = {name: [] for name in whole}
    for _ in range(args.runs):  # interleaved, so that load from elsewhere hits every variant alike
        for name, fn in whole.items():
            started = time.process_time()
            fn()
            costs[name].append((time.process_time() - started) / args.fixes * 1e6)
    for name, values in costs.items():
        print(f"  {name:28s} {statistics.median(values):6.2f} ({min(values):5.2f})")
    off, on = (statistics.median(v) for v in list(costs.values())[:2])
    print(f"  rate with filters+motion+rules on / off: {off / on:.2f}x (medians)")

    ctx: dict[str, Any] = {"records": records, "now_ms": now_ms, "configs": configs, "index": index,
                           "engine": engine}
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
