"""CPU cost of the alert engine per position fix (and per telemetry message) with 50 mixed rules against an
engine with no rules, in the same run: median (and best) of several runs.

    python benchmarks/alerts.py [--fixes 200000] [--devices 1000] [--runs 5]

The fleet is trucks, vans and reefers driving, stopping and idling, in and out of geofences (enter/exit events
on the fixes where membership changes), reporting telemetry every 6th fix. The 50 rules mix every kind,
targeted by groups as a real file would be (a truck sees about 30 of them).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

from fleetstream.domain.alerts import AlertEngine, DeviceAlertState, FenceEvent
from fleetstream.domain.rules import RuleSet, parse_rules

FENCES = ("depot-1", "depot-2", "city-zone", "airport", "customer-bay")
SPEED_LIMITS = {"city-zone": 30.0, "depot-1": 15.0, "depot-2": 15.0}


def fifty_rules() -> RuleSet:
    rules: list[dict[str, Any]] = []
    for i, (metric, op, value) in enumerate([
        ("temperature_c", ">", 8), ("temperature_c", "<", -25), ("fuel_pct", "<", 10), ("stock_units", "<=", 3),
        ("battery_v", "<", 11.5), ("tyre_psi", "<", 90), ("oil_temp_c", ">", 120), ("coolant_c", ">", 105),
        ("humidity_pct", ">", 85), ("door_open", "==", 1), ("load_kg", ">", 26000), ("cargo_temp_c", ">", 5),
        ("adblue_pct", "<", 5), ("brake_wear_pct", ">", 90), ("rpm", ">", 4000), ("pressure_bar", "<", 2),
        ("gross_kg", ">", 40000),
    ]):
        rules.append({"id": f"t-{i}", "kind": "threshold", "metric": metric, "op": op, "value": value,
                      "for": "5m", "groups": ["reefers" if "temp" in metric else "trucks"]})
    for i, (metric, op, value) in enumerate([("speed_kmh", ">", 130), ("accuracy_m", ">", 150),
                                             ("altitude_m", ">", 2500), ("heading_deg", "<", -1)]):
        rules.append({"id": f"p-{i}", "kind": "threshold", "metric": metric, "op": op, "value": value,
                      "for": "30s", "groups": ["moving"]})
    for i, when in enumerate(["fuel_pct drops > 15 within 5m while stopped", "temperature_c rises > 5 within 10m",
                              "battery_v drops > 1 within 10m", "tyre_psi drops > 20 within 5m"]):
        rules.append({"id": f"r-{i}", "kind": "rate_of_change", "when": when, "groups": ["trucks", "reefers"]})
    for i, (limit, group) in enumerate([(90, "trucks"), (110, "vans"), (80, "reefers"), (None, "moving"),
                                        (120, "moving")]):
        rule: dict[str, Any] = {"id": f"o-{i}", "kind": "overspeed", "for": "20s", "groups": [group]}
        if limit is not None:
            rule["limit_kmh"] = limit
        rules.append(rule)
    for i, group in enumerate(["trucks", "vans", "reefers"]):
        rules.append({"id": f"i-{i}", "kind": "idle", "for": "10m", "groups": [group]})
    rules += [
        {"id": "g-0", "kind": "keep_inside", "geofences": ["depot-1", "depot-2"], "groups": ["trucks"],
         "schedule": {"timezone": "Europe/London", "windows": ["22:00-06:00"]}},
        {"id": "g-1", "kind": "keep_out", "geofences": ["airport"]},
        {"id": "g-2", "kind": "keep_out", "geofences": ["city-zone"], "groups": ["trucks"],
         "schedule": {"timezone": "Europe/London", "windows": ["07:00-10:00"]}},
        {"id": "g-3", "kind": "time_window", "geofences": ["customer-bay"],
         "allowed": {"timezone": "Europe/London", "windows": ["06:00-22:00"]}},
        {"id": "g-4", "kind": "keep_inside", "geofences": ["depot-1"], "devices": ["reefer-1*"]},
    ]
    for i, after in enumerate(["10m", "1h", "1d"]):
        rules.append({"id": f"off-{i}", "kind": "offline", "after": after})
    rules += [
        {"id": "m-0", "kind": "maintenance", "every_km": 15000, "groups": ["trucks"]},
        {"id": "m-1", "kind": "maintenance", "every_km": 30000, "groups": ["vans"]},
        {"id": "m-2", "kind": "maintenance", "every_hours": 250, "groups": ["trucks"]},
        {"id": "m-3", "kind": "maintenance", "every_hours": 500, "groups": ["reefers"]},
    ]
    for i, (metric, op, threshold) in enumerate([("battery_v", "<", 11.8), ("tyre_psi", "<", 85),
                                                 ("vibration_g", ">", 2.0), ("oil_temp_c", ">", 130),
                                                 ("cargo_temp_c", ">", 6)]):
        rules.append({"id": f"f-{i}", "kind": "predictive", "metric": metric, "op": op, "threshold": threshold,
                      "window": "6h", "horizon": "24h", "groups": ["trucks" if i % 2 else "reefers"]})
    groups = {"trucks": ["truck-*"], "vans": ["van-*"], "reefers": ["reefer-*"],
              "moving": ["truck-*", "van-*", "reefer-*"]}
    ruleset = parse_rules({"groups": groups, "rules": rules})
    assert len(ruleset) == 50, len(ruleset)
    return ruleset


def make_inputs(fixes: int, devices: int, seed: int = 7) -> list[tuple[Any, ...]]:
    """(kind, device, ts, payload...) in arrival order: fixes round-robin, telemetry every 6th fix."""
    rng = random.Random(seed)
    kinds = ("truck", "van", "reefer")
    ids = [f"{kinds[i % 3]}-{i}" for i in range(devices)]
    odometer = dict.fromkeys(ids, 0.0)
    inside: dict[str, tuple[str, ...]] = dict.fromkeys(ids, ())
    out: list[tuple[Any, ...]] = []
    t0 = 1_795_600_800_000
    for n in range(fixes):
        device = ids[n % devices]
        ts = t0 + (n // devices) * 10_000
        phase = (n // devices + int(device.rsplit("-", 1)[1]) % 50) % 60
        fences = inside[device]
        events: tuple[FenceEvent, ...] = ()
        if rng.random() < 0.01:  # a membership change
            new = (rng.choice(FENCES),) if not fences else ()
            events = tuple(FenceEvent("exit", f, ts) for f in fences) + tuple(FenceEvent("enter", f, ts) for f in new)
            inside[device] = fences = new
        limit = min((SPEED_LIMITS.get(f, 80.0) for f in fences), default=80.0)
        # a tenth of the time parked, otherwise under the limit, with the odd burst over it
        speed = 0.0 if phase < 6 else rng.uniform(0.3, 0.95) * limit * (1.3 if rng.random() < 0.003 else 1.0)
        odometer[device] += speed / 3.6 * 10
        values = {"device_id": device, "ts": "2026-11-25T10:00:00.000Z", "lat": 53.4, "lon": -2.98,
                  "h3": "89195da49b7ffff", "geofences": fences, "speed_kmh": speed, "speed_source": "reported",
                  "heading_deg": 90.0, "heading_source": "reported", "distance_m": speed / 3.6 * 10,
                  "odometer_m": odometer[device], "motion": "stopped" if speed == 0 else "moving",
                  "accuracy_m": 8.0}
        out.append(("p", device, ts, values, fences, events))
        if n % 6 == 0:
            metrics = {"temperature_c": rng.uniform(2, 7), "fuel_pct": rng.uniform(20, 90),
                       "battery_v": rng.uniform(12.2, 12.8), "ignition": float(speed > 0 or phase < 6),
                       "engine_hours": n / 1000, "tyre_psi": rng.uniform(100, 110)}
            out.append(("t", device, ts + 1, metrics))
    return out


def run(engine: AlertEngine, inputs: list[tuple[Any, ...]]) -> tuple[float, float, int, dict[str, Any]]:
    """(µs per fix, µs per telemetry message, alerts, final states) for one pass."""
    states: dict[str, DeviceAlertState | None] = {}
    alerts = 0
    fix_s = tele_s = 0.0
    fixes = teles = 0
    on_position, on_telemetry = engine.on_position, engine.on_telemetry
    clock = time.perf_counter
    for item in inputs:
        device = item[1]
        if item[0] == "p":
            start = clock()
            state, out = on_position(states.get(device), device, item[2], item[3], item[4], item[5])
            states[device] = state
            fix_s += clock() - start
            fixes += 1
        else:
            start = clock()
            state, out = on_telemetry(states.get(device), device, item[2], item[3])
            states[device] = state
            tele_s += clock() - start
            teles += 1
        alerts += len(out)
    return fix_s / fixes * 1e6, tele_s / max(teles, 1) * 1e6, alerts, states


def run_fixes_only(engine: AlertEngine, fixes: list[tuple[Any, ...]]) -> float:
    """µs of CPU per fix for a tight loop over fixes alone (process CPU time: on a shared machine, time spent
    waiting for a core does not count; no per-call timer overhead)."""
    states: dict[str, DeviceAlertState | None] = {}
    on_position = engine.on_position
    start = time.process_time()
    for _, device, ts, values, fences, events in fixes:
        states[device] = on_position(states.get(device), device, ts, values, fences, events)[0]
    return (time.process_time() - start) / len(fixes) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fixes", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    inputs = make_inputs(args.fixes, args.devices)
    fixes = [item for item in inputs if item[0] == "p"]
    ruleset = fifty_rules()
    engines = {"0 rules": AlertEngine(RuleSet()), "50 rules": AlertEngine(ruleset, SPEED_LIMITS)}
    per_fix: dict[str, list[float]] = {name: [] for name in engines}
    mixed: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    for _ in range(args.runs):
        for name, engine in engines.items():
            per_fix[name].append(run_fixes_only(engine, fixes))
            fix_us, tele_us, alerts, states = run(engine, inputs)
            mixed[name].append((fix_us, tele_us))
    print(f"{len(fixes)} fixes and {len(inputs) - len(fixes)} telemetry messages from {args.devices} devices, "
          f"{args.runs} runs (the two engines alternate within each run); median (best)")
    for name in engines:
        fix_only = per_fix[name]
        fix_mixed, tele = [m[0] for m in mixed[name]], [m[1] for m in mixed[name]]
        print(f"  {name:>8}: {statistics.median(fix_only):6.2f} ({min(fix_only):.2f}) µs per fix (fixes only)   "
              f"{statistics.median(fix_mixed):6.2f} ({min(fix_mixed):.2f}) µs per fix, "
              f"{statistics.median(tele):6.2f} ({min(tele):.2f}) µs per telemetry message (mixed, timed per call)")
    engine_cost = statistics.median(per_fix["50 rules"]) - statistics.median(per_fix["0 rules"])
    best_cost = min(per_fix["50 rules"]) - min(per_fix["0 rules"])
    print(f"  engine cost of 50 rules: {engine_cost:.2f} ({best_cost:.2f}) µs per fix")
    fix_us, tele_us, alerts, states = run(engines["50 rules"], inputs)
    sizes = [len(orjson.dumps(s.to_json())) for s in states.values() if s is not None]
    print(f"  {alerts} alerts; {len(sizes)} devices with state, JSON {statistics.mean(sizes):.0f} bytes mean, "
          f"{max(sizes)} max")


if __name__ == "__main__":
    main()
