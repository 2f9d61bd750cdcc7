"""The alert engine: hand-checked cases for every rule kind, then properties over random input sequences
against simple references (durations by a per-second scan, strict raise/clear alternation, replay and restart
equivalence, timer independence, the precomputed fast path against calling every rule)."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetstream.domain import alerts as alerts_module
from fleetstream.domain.alerts import (
    Alert,
    AlertEngine,
    DeviceAlertState,
    FenceEvent,
    least_squares,
    make_alert_id,
)
from fleetstream.domain.rules import parse_rules
from fleetstream.domain.transitions import GeofenceEvent, GeofenceEventType

LONDON = ZoneInfo("Europe/London")
S, M, H = 1000, 60_000, 3_600_000
NOON = int(datetime(2026, 11, 25, 12, 0, tzinfo=LONDON).timestamp() * 1000)  # a Wednesday, GMT


def local_ms(hour: int, minute: int = 0, day: int = 25) -> int:
    return int(datetime(2026, 11, day, hour, minute, tzinfo=LONDON).timestamp() * 1000)


def make_engine(*rules, groups=None, limits=None) -> AlertEngine:
    return AlertEngine(parse_rules({"groups": groups or {}, "rules": list(rules)}), limits)


class Device:
    """Feeds one device's inputs through an engine, keeping its state and every alert."""

    def __init__(self, engine: AlertEngine, device_id: str = "truck-1", roundtrip: bool = False):
        self.engine, self.device_id, self.roundtrip = engine, device_id, roundtrip
        self.state: DeviceAlertState | None = None
        self.alerts: list[Alert] = []

    def _keep(self, result):
        self.state, new = result
        if self.roundtrip and self.state is not None:  # what a restart does: the stored JSON read back
            self.state = DeviceAlertState.from_json(orjson.loads(orjson.dumps(self.state.to_json())))
        self.alerts.extend(new)
        return new

    def fix(self, ts, fences=(), events=(), **values):
        values.setdefault("speed_kmh", 30.0)
        values.setdefault("motion", "moving" if values["speed_kmh"] > 2 else "stopped")
        values.setdefault("lat", 53.4)
        values.setdefault("lon", -2.98)
        return self._keep(self.engine.on_position(self.state, self.device_id, ts, values, tuple(fences), events))

    def tele(self, ts, **metrics):
        return self._keep(self.engine.on_telemetry(self.state, self.device_id, ts, metrics))

    def tick(self, now):
        return self._keep(self.engine.tick(self.state, self.device_id, now))

    def seen(self, rule=None):
        return [(a.rule, a.state.value, a.ts_ms) for a in self.alerts if rule is None or a.rule == rule]


def brief(alerts, rule=None):
    return [(a.rule, a.state.value, a.ts_ms) for a in alerts if rule is None or a.rule == rule]


# --- threshold ---------------------------------------------------------------------------------------------------

COLD = {"id": "cold", "kind": "threshold", "severity": "major", "when": "temperature_c > 8 for 10m",
        "clear_below": 7, "clear_for": "2m"}


def test_threshold_raises_after_its_duration_and_clears_below_hysteresis():
    d = Device(make_engine(COLD), "reefer-7")
    d.tele(NOON, temperature_c=9.0)
    d.tele(NOON + 5 * M, temperature_c=9.5)
    assert d.seen() == []
    d.tele(NOON + 11 * M, temperature_c=9.2)  # the 10 minutes ran out at NOON+10m, with 9.5 held
    assert d.seen() == [("cold", "raised", NOON + 10 * M)]
    raised = d.alerts[0]
    assert raised.alert_id == make_alert_id("cold", "reefer-7", NOON + 10 * M) == f"cold:reefer-7:{NOON + 10 * M}"
    assert raised.severity.value == "major" and raised.subject_id == "reefer-7"
    assert raised.details == {"kind": "threshold", "metric": "temperature_c", "value": 9.5, "op": ">",
                              "threshold": 8.0, "for_s": 600.0, "since_ts_ms": NOON}
    d.tele(NOON + 12 * M, temperature_c=7.5)  # below 8 but not below 7: still raised
    d.tele(NOON + 13 * M, temperature_c=6.0)  # clearing starts
    d.tele(NOON + 14 * M, temperature_c=7.2)  # back in the band: clearing restarts later
    d.tele(NOON + 15 * M, temperature_c=6.5)
    d.tele(NOON + 16 * M, temperature_c=6.0)
    assert len(d.alerts) == 1
    d.tele(NOON + 18 * M, temperature_c=6.0)
    assert d.seen()[1:] == [("cold", "cleared", NOON + 17 * M)]
    cleared = d.alerts[1]
    assert cleared.alert_id == raised.alert_id and cleared.details["peak"] == 9.5
    assert cleared.details["duration_s"] == 7 * 60
    assert d.state is None  # nothing left to remember (no offline rule)


def test_threshold_that_ends_before_its_duration_never_raises():
    d = Device(make_engine(COLD), "reefer-7")
    for minute, value in [(0, 9), (4, 12), (9, 7.9), (15, 9), (24, 8)]:
        d.tele(NOON + minute * M, temperature_c=value)
    d.tick(NOON + 2 * H)
    assert d.seen() == []


def test_threshold_fires_from_the_timer_while_the_device_is_silent():
    d = Device(make_engine(COLD), "reefer-7")
    d.tele(NOON, temperature_c=9.0)
    assert d.engine.next_deadline(d.state) == NOON + 10 * M
    assert d.tick(NOON + 9 * M) == []
    assert brief(d.tick(NOON + 30 * M)) == [("cold", "raised", NOON + 10 * M)]  # time = the deadline, not now
    assert d.tick(NOON + 40 * M) == []  # no duplicate while active
    assert d.engine.next_deadline(d.state) is None


def test_threshold_without_duration_or_hysteresis_and_no_duplicate_raises():
    d = Device(make_engine({"id": "low-fuel", "kind": "threshold", "when": "fuel_pct < 10"}))
    d.tele(NOON, fuel_pct=50)
    assert d.state is None  # the fast path: condition false, nothing pending, no state
    d.tele(NOON + M, fuel_pct=9)
    d.tele(NOON + 2 * M, fuel_pct=8)
    d.tele(NOON + 3 * M, fuel_pct=5)
    d.tele(NOON + 4 * M, fuel_pct=10)
    assert d.seen() == [("low-fuel", "raised", NOON + M), ("low-fuel", "cleared", NOON + 4 * M)]
    assert d.alerts[1].details["peak"] == 5


@pytest.mark.parametrize(("op", "values", "expected"), [
    ("<=", [4, 3, 2, 5], [("raised", 1), ("cleared", 3)]),
    (">=", [7, 8, 9, 7], [("raised", 1), ("cleared", 3)]),
    ("==", [2, 3, 3, 4], [("raised", 1), ("cleared", 3)]),
    ("!=", [3, 3, 4, 3], [("raised", 2), ("cleared", 3)]),
])
def test_threshold_operators(op, values, expected):
    d = Device(make_engine({"id": "t", "kind": "threshold", "metric": "stock_units", "op": op,
                            "value": 3 if op in ("<=", "==", "!=") else 8}), "vend-1")
    for i, value in enumerate(values):
        d.tele(NOON + i * M, stock_units=value)
    assert [(state, (ts - NOON) // M) for _, state, ts in d.seen()] == expected


def test_threshold_on_a_position_field_and_inputs_are_kept_apart():
    engine = make_engine({"id": "fast", "kind": "threshold", "when": "speed_kmh > 130 for 30s"},
                         {"id": "hot", "kind": "threshold", "when": "temperature_c > 8"})
    d = Device(engine)
    d.fix(NOON, speed_kmh=135, temperature_c=50)  # a fix never feeds a telemetry rule
    d.tele(NOON + S, speed_kmh=200)  # and telemetry never feeds a position rule
    d.fix(NOON + 40 * S, speed_kmh=140)
    assert d.seen() == [("fast", "raised", NOON + 30 * S)]
    d.tele(NOON + 50 * S, temperature_c=9)
    assert d.seen("hot") == [("hot", "raised", NOON + 50 * S)]


# --- rate of change -------------------------------------------------------------------------------------------------

THEFT = {"id": "theft", "kind": "rate_of_change", "severity": "critical",
         "when": "fuel_pct drops > 15 within 5m while stopped"}


def test_fuel_theft_while_stopped_raises_then_clears_when_the_window_passes():
    d = Device(make_engine(THEFT))
    d.fix(NOON, speed_kmh=0)  # stopped
    d.tele(NOON + M, fuel_pct=80)
    d.tele(NOON + 2 * M, fuel_pct=72)
    d.tele(NOON + 3 * M, fuel_pct=64.5)  # 15.5 points in 2 minutes
    assert d.seen() == [("theft", "raised", NOON + 3 * M)]
    assert {k: d.alerts[0].details[k] for k in ("from_value", "value", "change", "while")} == {
        "from_value": 80, "value": 64.5, "change": 15.5, "while": "stopped"}
    d.tele(NOON + 4 * M, fuel_pct=64.5)
    assert len(d.alerts) == 1  # no duplicate while the window still shows it
    assert d.engine.next_deadline(d.state) == NOON + 6 * M + 1  # when 80 leaves the 5-minute window
    assert brief(d.tick(NOON + 10 * M)) == [("theft", "cleared", NOON + 6 * M + 1)]


def test_fuel_use_while_moving_or_slowly_is_not_theft():
    d = Device(make_engine(THEFT))
    d.fix(NOON, speed_kmh=60)
    d.tele(NOON + M, fuel_pct=80)
    d.tele(NOON + 2 * M, fuel_pct=60)  # moving: not counted
    d.fix(NOON + 3 * M, speed_kmh=0)
    for i in range(12):  # 2 points a minute while stopped: 10 per 5 minutes
        d.tele(NOON + (4 + i) * M, fuel_pct=60 - 2 * i)
    assert d.seen() == []


def test_rate_rises_and_stopping_the_motion_condition_clears():
    d = Device(make_engine({"id": "warming", "kind": "rate_of_change", "when": "temperature_c rises > 5 within 10m"},
                           THEFT))
    d.tele(NOON, temperature_c=2)
    d.tele(NOON + 4 * M, temperature_c=8)
    assert d.seen() == [("warming", "raised", NOON + 4 * M)]
    d.tele(NOON + 5 * M, temperature_c=3)  # the window now ends at 3, 1 above its lowest
    assert d.seen()[-1] == ("warming", "cleared", NOON + 5 * M)
    d.fix(NOON + 6 * M, speed_kmh=0)
    d.tele(NOON + 7 * M, fuel_pct=90)
    d.tele(NOON + 8 * M, fuel_pct=70)
    d.fix(NOON + 9 * M, speed_kmh=40)
    d.tele(NOON + 10 * M, fuel_pct=70)
    assert d.seen("theft") == [("theft", "raised", NOON + 8 * M), ("theft", "cleared", NOON + 10 * M)]
    assert d.alerts[-1].details["reason"] == "not stopped"


# --- overspeed ------------------------------------------------------------------------------------------------------

def test_overspeed_needs_its_minimum_duration_and_tolerance():
    d = Device(make_engine({"id": "speed", "kind": "overspeed", "limit_kmh": 90, "tolerance_kmh": 5, "for": "30s"}))
    d.fix(NOON, speed_kmh=94)  # within tolerance
    d.fix(NOON + 10 * S, speed_kmh=100)
    d.fix(NOON + 20 * S, speed_kmh=80)  # 10 s over: not enough
    d.fix(NOON + 30 * S, speed_kmh=110)
    d.fix(NOON + 50 * S, speed_kmh=120)
    d.fix(NOON + 70 * S, speed_kmh=105)
    d.fix(NOON + 80 * S, speed_kmh=60)
    assert d.seen() == [("speed", "raised", NOON + 60 * S), ("speed", "cleared", NOON + 80 * S)]
    assert d.alerts[0].details["limit_kmh"] == 90 and d.alerts[0].details["speed_kmh"] == 120
    assert d.alerts[1].details["max_speed_kmh"] == 120


@pytest.mark.parametrize("limits", [{"school": 30.0, "motorway": 130.0}, {"school": 30.0, "motorway": 130.0}.get])
def test_overspeed_against_geofence_speed_limits(limits):
    engine = make_engine({"id": "speed", "kind": "overspeed", "limit_kmh": 90}, limits=limits)
    d = Device(engine)
    d.fix(NOON, speed_kmh=60)
    d.fix(NOON + S, fences=["school"], speed_kmh=45)  # the school zone's 30 applies
    assert d.seen() == [("speed", "raised", NOON + S)]
    assert d.alerts[0].details["geofence_id"] == "school" and d.alerts[0].details["limit_kmh"] == 30
    d.fix(NOON + 2 * S, fences=["school"], speed_kmh=25)
    d.fix(NOON + 3 * S, fences=["motorway"], speed_kmh=120)  # the motorway's 130 replaces the global 90
    d.fix(NOON + 4 * S, fences=["motorway", "school"], speed_kmh=40)  # the lowest limit wins
    d.fix(NOON + 5 * S, speed_kmh=100)
    assert d.seen()[1:] == [("speed", "cleared", NOON + 2 * S), ("speed", "raised", NOON + 4 * S)]
    assert d.alerts[-1].details["limit_kmh"] == 30
    d.fix(NOON + 6 * S, speed_kmh=80)
    assert d.seen()[-1] == ("speed", "cleared", NOON + 6 * S)


def test_overspeed_with_only_geofence_limits_is_silent_elsewhere():
    engine = make_engine({"id": "zones", "kind": "overspeed"}, limits={"depot": 15.0})
    d = Device(engine)
    d.fix(NOON, speed_kmh=150)
    d.fix(NOON + S, fences=["depot"], speed_kmh=20)
    d.fix(NOON + 2 * S, speed_kmh=150)
    assert d.seen() == [("zones", "raised", NOON + S), ("zones", "cleared", NOON + 2 * S)]


# --- idle -----------------------------------------------------------------------------------------------------------

IDLE = {"id": "idle", "kind": "idle", "for": "10m"}


def test_idle_with_ignition_on_while_stationary():
    d = Device(make_engine(IDLE))
    d.tele(NOON, ignition=1)
    d.fix(NOON + M, speed_kmh=50)
    d.fix(NOON + 2 * M, speed_kmh=0)
    d.fix(NOON + 8 * M, speed_kmh=1)
    assert brief(d.tick(NOON + 20 * M)) == [("idle", "raised", NOON + 12 * M)]
    assert d.alerts[0].details["since_ts_ms"] == NOON + 2 * M
    d.fix(NOON + 25 * M, speed_kmh=0)
    d.tele(NOON + 26 * M, ignition=0)
    assert d.seen()[-1] == ("idle", "cleared", NOON + 26 * M)
    assert d.alerts[-1].details == {"kind": "idle", "idle_s": 24 * 60, "reason": "engine_off"}


def test_idle_from_an_engine_metric_clears_on_moving():
    d = Device(make_engine(IDLE))
    d.fix(NOON, speed_kmh=0)
    d.tele(NOON + M, rpm=800)  # no ignition metric: the engine running is enough
    d.fix(NOON + 15 * M, speed_kmh=0)
    d.fix(NOON + 16 * M, speed_kmh=20)
    assert d.seen() == [("idle", "raised", NOON + 11 * M), ("idle", "cleared", NOON + 16 * M)]
    assert d.alerts[-1].details["reason"] == "moving"
    d.tele(NOON + 17 * M, rpm=0, ignition=0)
    d.fix(NOON + 18 * M, speed_kmh=0)
    assert d.tick(NOON + 2 * H) == []  # parked with the engine off is not idling


# --- geofence rules -------------------------------------------------------------------------------------------------

def enter(fence, ts):
    return [FenceEvent("enter", fence, ts)]


def leave(fence, ts):
    return [FenceEvent("exit", fence, ts)]


def test_keep_inside_raises_on_exit_and_clears_on_return():
    d = Device(make_engine({"id": "yard", "kind": "keep_inside", "geofences": ["yard-a", "yard-b"]}), "trailer-3")
    d.fix(NOON, speed_kmh=0)
    d.fix(NOON + M, speed_kmh=0)
    assert d.seen() == []  # never seen inside: not alerted (not yet deployed to its yard)
    d.fix(NOON + 2 * M, ["yard-a"], enter("yard-a", NOON + 2 * M))
    d.fix(NOON + 3 * M, ["yard-a", "yard-b"], enter("yard-b", NOON + 3 * M))
    d.fix(NOON + 4 * M, ["yard-b"], leave("yard-a", NOON + 4 * M))  # still inside yard-b
    assert d.seen() == []
    d.fix(NOON + 6 * M, [], leave("yard-b", NOON + 5 * M))  # the exit's own time (confirmed a fix later)
    assert d.seen() == [("yard", "raised", NOON + 5 * M)]
    assert d.alerts[0].details["geofence_id"] == "yard-b" and d.alerts[0].details["reason"] == "exited"
    d.fix(NOON + 7 * M, [])
    d.fix(NOON + 8 * M, ["yard-a"], enter("yard-a", NOON + 8 * M))
    assert d.seen()[-1] == ("yard", "cleared", NOON + 8 * M)


def test_keep_inside_accepts_transitions_geofence_events_and_ignores_deleted_geofences():
    d = Device(make_engine({"id": "yard", "kind": "keep_inside", "geofences": ["yard-a"]}), "trailer-3")
    enter_event = GeofenceEvent(GeofenceEventType.ENTER, "trailer-3", "yard-a", NOON, 53.4, -2.98)
    d.fix(NOON, ["yard-a"], [enter_event])
    deleted = GeofenceEvent(GeofenceEventType.EXIT, "trailer-3", "yard-a", NOON + M, 53.4, -2.98, 60.0,
                            "geofence_deleted")
    d.fix(NOON + M, [], [deleted])
    d.tick(NOON + H)
    assert d.seen() == [] and d.state is None


def test_device_already_inside_when_the_engine_starts_counts_as_inside():
    d = Device(make_engine({"id": "yard", "kind": "keep_inside", "geofences": ["yard-a"]},
                           {"id": "apron", "kind": "keep_out", "severity": "critical", "geofences": ["apron"]}))
    d.fix(NOON, ["yard-a"])  # no enter event: it was there before the engine knew
    d.fix(NOON + M, [], leave("yard-a", NOON + M))
    d.fix(NOON + 2 * M, ["apron"])
    assert d.seen() == [("yard", "raised", NOON + M), ("apron", "raised", NOON + 2 * M)]
    assert d.alerts[-1].details["reason"] == "inside"


def test_an_exit_from_a_device_the_engine_has_not_seen_inside_still_raises_keep_inside():
    d = Device(make_engine({"id": "yard", "kind": "keep_inside", "geofences": ["yard-a"]}))
    d.fix(NOON, [], leave("yard-a", NOON))  # state lost (or rules deployed) while inside; then it left
    assert d.seen() == [("yard", "raised", NOON)]


def test_keep_out_raises_on_entry_and_clears_on_exit():
    d = Device(make_engine({"id": "apron", "kind": "keep_out", "geofences": ["apron", "rail"]}))
    d.fix(NOON)
    d.fix(NOON + M, ["apron"], enter("apron", NOON + M))
    d.fix(NOON + 2 * M, ["apron", "rail"], enter("rail", NOON + 2 * M))
    d.fix(NOON + 3 * M, ["rail"], leave("apron", NOON + 3 * M))
    d.fix(NOON + 4 * M, [], leave("rail", NOON + 4 * M))
    assert d.seen() == [("apron", "raised", NOON + M), ("apron", "cleared", NOON + 4 * M)]
    assert d.state is None


def test_keep_inside_at_night_from_schedule_boundaries():
    rule = {"id": "night", "kind": "keep_inside", "geofences": ["depot"],
            "schedule": {"timezone": "Europe/London", "windows": ["22:00-06:00"]}}
    d = Device(make_engine(rule))
    d.fix(local_ms(17), ["depot"], enter("depot", local_ms(17)))
    d.fix(local_ms(18), [], leave("depot", local_ms(18)))  # leaves in the evening: allowed
    assert d.seen() == []
    assert d.engine.next_deadline(d.state) == local_ms(22)
    assert brief(d.tick(local_ms(23))) == [("night", "raised", local_ms(22))]  # still out at 22:00
    assert d.alerts[0].details["reason"] == "schedule" and "22:00-06:00" in d.alerts[0].details["schedule"]
    d.fix(local_ms(23, 30), ["depot"], enter("depot", local_ms(23, 30)))
    assert d.seen()[-1] == ("night", "cleared", local_ms(23, 30))
    d.fix(local_ms(2, day=26), [], leave("depot", local_ms(2, day=26)))  # leaves at 02:00: theft?
    assert d.seen()[-1] == ("night", "raised", local_ms(2, day=26))
    assert brief(d.tick(local_ms(7, day=26))) == [("night", "cleared", local_ms(6, day=26))]  # night over


def test_time_window_allows_presence_only_within_hours():
    rule = {"id": "bay", "kind": "time_window", "geofences": ["bay-7"],
            "allowed": {"timezone": "Europe/London", "windows": ["06:00-22:00"]}}
    d = Device(make_engine(rule))
    d.fix(local_ms(21), ["bay-7"], enter("bay-7", local_ms(21)))
    assert d.seen() == []
    d.fix(local_ms(21, 50), ["bay-7"])
    d.fix(local_ms(22, 10), ["bay-7"])  # the 22:00 deadline fires on this fix
    assert d.seen() == [("bay", "raised", local_ms(22))]
    assert d.alerts[0].details["allowed"] == "06:00-22:00 Europe/London"
    d.fix(local_ms(22, 20), [], leave("bay-7", local_ms(22, 20)))
    d.fix(local_ms(23), ["bay-7"], enter("bay-7", local_ms(23)))
    d.tick(local_ms(8, day=26))
    assert d.seen()[1:] == [("bay", "cleared", local_ms(22, 20)), ("bay", "raised", local_ms(23)),
                            ("bay", "cleared", local_ms(6, day=26))]


# --- offline --------------------------------------------------------------------------------------------------------

OFFLINE = {"id": "offline", "kind": "offline", "severity": "major", "after": "10m"}


def test_offline_fires_from_the_timer_and_clears_when_the_device_reports():
    d = Device(make_engine(OFFLINE))
    d.fix(NOON)
    d.tele(NOON + 2 * M, battery_v=12.5)  # telemetry counts as a report too
    assert d.engine.next_deadline(d.state) == NOON + 12 * M
    assert d.tick(NOON + 11 * M) == []
    assert brief(d.tick(NOON + 12 * M + 300)) == [("offline", "raised", NOON + 12 * M)]
    assert d.alerts[0].details == {"kind": "offline", "last_seen_ts_ms": NOON + 2 * M, "after_s": 600.0}
    assert d.tick(NOON + H) == []  # once
    assert d.engine.next_deadline(d.state) is None  # nothing more until it reports
    d.fix(NOON + 2 * H)
    assert d.seen()[-1] == ("offline", "cleared", NOON + 2 * H)
    assert d.alerts[-1].alert_id == d.alerts[0].alert_id and d.alerts[-1].details["offline_s"] == 7080
    assert d.engine.next_deadline(d.state) == NOON + 2 * H + 10 * M


def test_offline_without_a_timer_gives_the_same_alerts_on_the_next_message():
    with_timer, without = Device(make_engine(OFFLINE)), Device(make_engine(OFFLINE))
    for d in (with_timer, without):
        d.fix(NOON)
    with_timer.tick(NOON + 30 * M)
    for d in (with_timer, without):
        d.fix(NOON + H)
    assert with_timer.seen() == without.seen() == [("offline", "raised", NOON + 10 * M),
                                                   ("offline", "cleared", NOON + H)]
    assert [a.alert_id for a in with_timer.alerts] == [a.alert_id for a in without.alerts]


def test_offline_across_a_restart_is_neither_lost_nor_repeated():
    engine = make_engine(OFFLINE)
    d = Device(engine)
    d.fix(NOON)
    d.tick(NOON + 15 * M)
    stored = orjson.dumps(d.state.to_json())
    # a new worker process: a new engine over the same rules, the state read back from the changelog
    restarted = Device(make_engine(OFFLINE))
    restarted.state = DeviceAlertState.from_json(orjson.loads(stored))
    assert restarted.tick(NOON + 20 * M) == []  # already raised: not again
    restarted.fix(NOON + 25 * M)
    assert restarted.seen() == [("offline", "cleared", NOON + 25 * M)]
    assert restarted.alerts[0].alert_id == d.alerts[0].alert_id
    # and a pending one (not yet raised when stored) fires after the restart
    pending = Device(make_engine(OFFLINE))
    pending.state = DeviceAlertState.from_json(orjson.loads(orjson.dumps(restarted.state.to_json())))
    assert brief(pending.tick(NOON + H)) == [("offline", "raised", NOON + 35 * M)]


def test_offline_late_message_from_before_the_raise_does_not_clear_and_two_rules_are_separate():
    d = Device(make_engine(OFFLINE, {"id": "gone", "kind": "offline", "severity": "critical", "after": "1h"}))
    d.fix(NOON)
    d.tick(NOON + 2 * H)
    assert d.seen() == [("offline", "raised", NOON + 10 * M), ("gone", "raised", NOON + H)]
    d.tele(NOON + 5 * M, fuel_pct=50)  # buffered data from before it went quiet: not back yet
    assert len(d.alerts) == 2
    d.fix(NOON + 2 * H)
    assert sorted(d.seen()[2:]) == [("gone", "cleared", NOON + 2 * H), ("offline", "cleared", NOON + 2 * H)]


# --- maintenance ----------------------------------------------------------------------------------------------------

SERVICE = {"id": "service", "kind": "maintenance", "severity": "minor", "every_km": 15000}


def test_maintenance_once_per_interval_and_reset_by_telemetry():
    d = Device(make_engine(SERVICE))
    d.fix(NOON, odometer_m=3_000_000)  # first reading: next due at 15 000 km
    d.fix(NOON + H, odometer_m=14_999_000)
    assert d.seen() == []
    d.fix(NOON + 2 * H, odometer_m=15_000_500)
    assert d.seen() == [("service", "raised", NOON + 2 * H)]
    assert d.alerts[0].details == {"kind": "maintenance", "metric": "odometer_m", "value": 15_000_500,
                                   "due_at": 15_000_000.0, "every": 15_000_000.0}
    d.fix(NOON + 3 * H, odometer_m=31_000_000)  # overdue for two intervals: still one alert
    assert len(d.alerts) == 1
    d.tele(NOON + 4 * H, service_reset=1)
    assert d.seen()[-1] == ("service", "cleared", NOON + 4 * H)
    assert d.alerts[-1].details["reason"] == "reset"
    d.fix(NOON + 5 * H, odometer_m=31_100_000)  # the next service counts from here
    d.fix(NOON + 6 * H, odometer_m=46_099_000)
    assert len(d.alerts) == 2
    d.fix(NOON + 7 * H, odometer_m=46_100_000)
    assert d.seen()[-1] == ("service", "raised", NOON + 7 * H)


def test_maintenance_on_engine_hours_and_a_first_reading_past_an_interval():
    d = Device(make_engine({"id": "hours", "kind": "maintenance", "every_hours": 250}))
    d.tele(NOON, engine_hours=260)  # unknown history: no alert for the interval already passed
    d.tele(NOON + H, engine_hours=499)
    d.tele(NOON + 2 * H, engine_hours=500, service_reset=0)
    assert d.seen() == [("hours", "raised", NOON + 2 * H)]
    d.tele(NOON + 3 * H, engine_hours=503, service_reset=1)  # the reset message carries the counter
    d.tele(NOON + 4 * H, engine_hours=752)
    d.tele(NOON + 5 * H, engine_hours=753)
    assert d.seen()[1:] == [("hours", "cleared", NOON + 3 * H), ("hours", "raised", NOON + 5 * H)]


# --- predictive -----------------------------------------------------------------------------------------------------

BATTERY = {"id": "battery", "kind": "predictive", "metric": "battery_v", "op": "<", "threshold": 11.8,
           "window": "6h", "horizon": "24h", "min_samples": 6, "buckets": 24}


def test_predictive_forecasts_the_crossing_of_a_falling_battery():
    d = Device(make_engine(BATTERY), "reefer-1")
    slope_per_h = -0.02  # 12.6 V falling 0.02 V an hour reaches 11.8 V after 40 hours
    for i in range(0, 20 * 60, 10):
        d.tele(NOON + i * M, battery_v=12.6 + slope_per_h * i / 60)
    assert d.seen() == [("battery", "raised", d.alerts[0].ts_ms)]
    raised = d.alerts[0]
    hours_in = (raised.ts_ms - NOON) / H
    # the crossing comes within 24 h at hour 16; the fit runs on the first sample of each 15-minute bucket
    assert 16 <= hours_in <= 16 + 0.25 + 10 / 60
    assert raised.details["forecast_ts_ms"] == pytest.approx(NOON + 40 * H, abs=2 * M)
    assert raised.details["slope_per_h"] == pytest.approx(slope_per_h)
    assert raised.details["forecast_in_s"] == pytest.approx((NOON + 40 * H - raised.ts_ms) / 1000, abs=120)
    for i in range(20 * 60, 27 * 60, 10):  # charged again and steady
        d.tele(NOON + i * M, battery_v=12.7)
    assert d.seen()[-1][:2] == ("battery", "cleared")
    assert d.alerts[-1].details["reason"] == "no_longer_forecast"


def test_predictive_is_quiet_for_a_steady_or_sparse_metric():
    d = Device(make_engine(BATTERY), "reefer-1")
    for i in range(0, 12 * 60, 30):
        d.tele(NOON + i * M, battery_v=12.6 + (0.05 if i % 60 else -0.05))
    sparse = Device(make_engine(BATTERY), "reefer-2")
    for i in range(5):  # a steep fall, but fewer than min_samples points
        sparse.tele(NOON + i * H, battery_v=12.6 - 0.3 * i)
    assert d.seen() == sparse.seen() == []


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6 * 3600), st.floats(-50, 50)), min_size=3, max_size=60))
def test_bucketed_least_squares_matches_numpy(samples):
    bucket_ms = 900_000
    buckets: dict[int, list[float]] = {}
    for second, value in samples:
        ts = NOON + second * 1000
        index = ts // bucket_ms
        u = (ts - index * bucket_ms) / 1000
        b = buckets.setdefault(index, [0, 0.0, 0.0, 0.0, 0.0])
        b[0] += 1
        b[1] += u
        b[2] += value
        b[3] += u * u
        b[4] += u * value
    fit = least_squares(sorted((i, int(b[0]), *b[1:]) for i, b in buckets.items()), bucket_ms)
    times = np.array([(NOON + s * 1000) / 1000 for s, _ in samples])
    values = np.array([v for _, v in samples])
    if np.ptp(times) < 1:
        assert fit is None
        return
    assert fit is not None
    n, intercept, slope, origin_ms = fit
    expected_slope, expected_intercept = np.polyfit(times - origin_ms / 1000, values, 1)
    assert n == len(samples)
    assert slope == pytest.approx(expected_slope, abs=1e-9 + 1e-6 * abs(expected_slope))
    assert intercept == pytest.approx(expected_intercept, abs=1e-6 * (1 + abs(expected_intercept)))


# --- rule changes, state format -------------------------------------------------------------------------------------

def test_alerts_of_a_removed_rule_are_cleared_on_the_next_input_or_tick():
    rules = [COLD, OFFLINE]
    d = Device(make_engine(*rules), "reefer-7")
    d.tele(NOON, temperature_c=12)
    d.tick(NOON + 11 * M)
    assert d.seen() == [("cold", "raised", NOON + 10 * M), ("offline", "raised", NOON + 10 * M)]
    same_rules = Device(make_engine(*rules), "reefer-7")  # a restart: nothing changes
    same_rules.state = d.state
    assert same_rules.tick(NOON + 12 * M) == []
    d.engine = make_engine(OFFLINE)  # cold chain rule deleted from the rules topic
    cleared = d.tick(NOON + 12 * M)
    assert brief(cleared) == [("cold", "cleared", NOON + 12 * M)]
    assert cleared[0].details == {"reason": "rule_removed"} and cleared[0].alert_id == d.alerts[0].alert_id
    d.engine = make_engine()
    assert brief(d.tele(NOON + 13 * M, temperature_c=3)) == [("offline", "cleared", NOON + 13 * M)]
    assert d.state is None


def test_state_json_is_plain_and_round_trips():
    engine = make_engine(COLD, THEFT, IDLE, SERVICE, BATTERY, OFFLINE,
                         {"id": "speed", "kind": "overspeed", "limit_kmh": 90, "for": "1m"},
                         {"id": "yard", "kind": "keep_inside", "geofences": ["yard"]})
    d = Device(engine)
    d.fix(NOON, ["yard"], enter("yard", NOON), speed_kmh=0, odometer_m=1000)
    for i in range(1, 30):
        d.tele(NOON + i * M, temperature_c=9, fuel_pct=80 - i, ignition=1, battery_v=12.6 - i / 100)
    d.fix(NOON + 31 * M, ["yard"], speed_kmh=100, odometer_m=2000)
    data = d.state.to_json()
    assert set(data["rules"]) == {"cold", "theft", "idle", "service", "battery", "speed", "yard"}
    text = orjson.dumps(data)
    assert orjson.loads(text) == data  # nothing that JSON changes (no tuples, sets, inf, enums by identity)
    back = DeviceAlertState.from_json(orjson.loads(text))
    assert back.to_json() == data and back.rules == d.state.rules
    assert DeviceAlertState.coerce(data).to_json() == data and DeviceAlertState.coerce(d.state) is d.state
    assert DeviceAlertState.coerce(None) is None
    with pytest.raises(ValueError, match="version"):
        DeviceAlertState.from_json({**data, "v": 99})


def test_a_position_fix_visits_no_telemetry_rule(monkeypatch):
    engine = make_engine(*({"id": f"t{i}", "kind": "threshold", "when": f"fuel_pct < {i}"} for i in range(30)))
    calls = []
    monkeypatch.setattr(alerts_module._Threshold, "on_telemetry", lambda self, *a: calls.append(1))
    monkeypatch.setattr(alerts_module._Threshold, "on_position", lambda self, *a: calls.append(1))
    state, out = engine.on_position(None, "truck-1", NOON, {"speed_kmh": 50, "fuel_pct": 1})
    assert (state, out, calls) == (None, [], [])


# --- properties over random sequences --------------------------------------------------------------------------------

def reference_threshold(samples, op, limit, for_ms, clear_below, clear_for_ms, end_ms):
    """Per-second scan of the held value: raise once the condition has held for ``for`` since it began, clear
    once the clear condition has held for ``clear_for``; deadlines are checked before the second's sample."""
    on = {">": limit.__lt__, "<": limit.__gt__}[op]
    clearing = (lambda v: v < clear_below) if clear_below is not None else (lambda v: not on(v))
    by_time = dict(samples)
    out, value = [], None
    run_start = raised = clear_start = None
    for t in range(samples[0][0], end_ms + 1, 1000):
        if raised is None and run_start is not None and t - run_start >= for_ms:
            raised = t
            out.append(("raised", t))
        elif raised is not None and clear_start is not None and t - clear_start >= clear_for_ms:
            out.append(("cleared", t))
            raised = clear_start = run_start = None
        value = by_time.get(t, value)
        if raised is None:
            if on(value):
                run_start = t if run_start is None else run_start
                if for_ms == 0:
                    raised = t
                    out.append(("raised", t))
            else:
                run_start = None
        elif clearing(value):
            clear_start = t if clear_start is None else clear_start
            if clear_for_ms == 0:
                out.append(("cleared", t))
                raised = clear_start = run_start = None
        else:
            clear_start = None
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.integers(1, 90), st.integers(0, 20)), min_size=1, max_size=40),
    st.sampled_from([">", "<"]), st.integers(0, 120), st.integers(0, 60), st.booleans(),
    st.lists(st.integers(1, 90), max_size=10),
)
def test_threshold_with_duration_matches_a_per_second_scan(steps, op, for_s, clear_for_s, hysteresis, tick_gaps):
    limit = 10.0
    clear_below = (8.0 if op == ">" else None) if hysteresis else None
    rule = {"id": "t", "kind": "threshold", "metric": "level", "op": op, "value": limit, "for": for_s,
            "clear_for": clear_for_s}
    if clear_below is not None:
        rule["clear_below"] = clear_below
    d = Device(make_engine(rule))
    samples, t = [], NOON
    ticks = iter(tick_gaps)
    for gap_s, value in steps:
        t += gap_s * 1000
        samples.append((t, float(value)))
    for i, (ts, value) in enumerate(samples):
        d.tele(ts, level=value)
        gap = next(ticks, None)  # timers between inputs must not change anything
        if gap is not None and i + 1 < len(samples) and ts + gap * 1000 < samples[i + 1][0]:
            d.tick(ts + gap * 1000)
    end = samples[-1][0] + 200_000
    d.tick(end)
    expected = reference_threshold(samples, op, limit, for_s * 1000, clear_below, clear_for_s * 1000, end)
    assert [(state, ts) for _, state, ts in d.seen()] == expected


DEPOT_NIGHT = {"id": "night", "kind": "keep_inside", "geofences": ["depot"], "groups": ["trucks"],
               "schedule": {"timezone": "Europe/London", "windows": ["22:00-06:00"]}}
MIXED = [
    COLD, THEFT, IDLE, OFFLINE, SERVICE | {"every_km": 20}, DEPOT_NIGHT,
    {"id": "low-fuel", "kind": "threshold", "when": "fuel_pct < 20", "clear_above": 25},
    {"id": "fast", "kind": "threshold", "when": "speed_kmh > 120 for 30s", "clear_for": "20s"},
    {"id": "speed", "kind": "overspeed", "limit_kmh": 90, "tolerance_kmh": 3, "for": "20s"},
    {"id": "zone-speed", "kind": "overspeed", "geofence_limits": True, "for": "10s", "clear_for": "10s"},
    {"id": "apron", "kind": "keep_out", "geofences": ["apron"]},
    {"id": "bay", "kind": "time_window", "geofences": ["bay"],
     "allowed": {"timezone": "Europe/London", "windows": ["06:00-21:00"]}},
    {"id": "silent", "kind": "offline", "after": "45m"},
    {"id": "battery", "kind": "predictive", "metric": "battery_v", "op": "<", "threshold": 11.8, "window": "1h",
     "buckets": 6, "horizon": "12h", "min_samples": 4},
    {"id": "warming", "kind": "rate_of_change", "when": "temperature_c rises > 4 within 10m"},
]
LIMITS = {"depot": 15.0, "bay": 10.0, "school": 30.0}
FENCES = ("depot", "apron", "bay", "school")

gaps = st.one_of(st.integers(1, 90), st.integers(1, 1200))  # seconds between steps: bursts and pauses
fix_step = st.tuples(st.just("fix"), gaps, st.sampled_from([0, 0, 0, 5, 25, 60, 95, 130]),
                     st.sets(st.sampled_from(FENCES), max_size=2), st.integers(0, 20_000))
tele_step = st.tuples(st.just("tele"), gaps,
                      st.fixed_dictionaries({}, optional={
                          "temperature_c": st.sampled_from([2.0, 6.0, 7.5, 9.0, 14.0]),
                          "fuel_pct": st.sampled_from([90.0, 60.0, 30.0, 15.0]),
                          "ignition": st.sampled_from([0, 1]), "rpm": st.sampled_from([0, 900]),
                          "battery_v": st.floats(11.0, 12.8), "service_reset": st.sampled_from([0, 1])}))
tick_step = st.tuples(st.just("tick"), st.integers(1, 3600))
steps_strategy = st.lists(st.one_of(fix_step, tele_step, tick_step), min_size=1, max_size=50)


EVENING = local_ms(19)  # random sequences start at 19:00 local, so they cross 21:00, 22:00 and 06:00


def play(engine, steps, start=EVENING, roundtrip=False, ticks=True, calm=False, tick_ahead_s=0):
    """Feed a step list to one device; fence events follow the changes of the fence set. ``tick_ahead_s``: the
    timer runs that far ahead of the fixes' times (a backlog caught up: the worker's timer reads the wall clock)."""
    d = Device(engine, "truck-1", roundtrip=roundtrip)
    t, inside, odometer = start, set(), 0.0
    for step in steps:
        t += step[1] * 1000
        if step[0] == "fix":
            _, _, speed, fences, metres = step
            odometer += metres
            events = [FenceEvent("exit", f, t) for f in sorted(inside - fences)] + \
                     [FenceEvent("enter", f, t) for f in sorted(fences - inside)]
            inside = set(fences)
            d.fix(t, sorted(fences), events, speed_kmh=float(speed), odometer_m=odometer)
        elif step[0] == "tele":
            if step[2]:
                d.tele(t, **step[2])
        elif ticks:
            d.tick(t + tick_ahead_s * 1000)
    if calm:  # every condition ends: parked in the depot, engine off, readings normal and steady
        events = [FenceEvent("exit", f, t + 1000) for f in sorted(inside - {"depot"})]
        if "depot" not in inside:
            events.append(FenceEvent("enter", "depot", t + 1000))
        d.fix(t + 1000, ["depot"], events, speed_kmh=5.0, odometer_m=odometer)
        d.tele(t + 2000, service_reset=1, ignition=0, rpm=0)
        for i in range(1, 200):
            now = t + i * 60_000
            d.fix(now, ["depot"], speed_kmh=5.0, odometer_m=odometer)
            d.tele(now + 1, temperature_c=4.0, fuel_pct=60.0, battery_v=12.6)
        d.tick(now + M)  # (later, the silence itself would raise offline)
    else:
        d.tick(t + 2 * H)
    return d


def check_alternation(alerts):
    """Per (rule, subject): raised, cleared, raised ... ; a clear carries its raise's id and is not earlier."""
    open_alerts: dict[tuple[str, str], Alert] = {}
    for alert in alerts:
        key = (alert.rule, alert.subject_id)
        if alert.state.value == "raised":
            assert key not in open_alerts, f"second raise without a clear: {alert}"
            assert alert.alert_id == make_alert_id(alert.rule, alert.subject_id, alert.ts_ms)
            open_alerts[key] = alert
        else:
            assert key in open_alerts, f"clear without a raise: {alert}"
            raised = open_alerts.pop(key)
            assert alert.alert_id == raised.alert_id and alert.ts_ms >= raised.ts_ms
    return open_alerts


def engine_for_mixed():
    return make_engine(*MIXED, groups={"trucks": ["truck-*"]}, limits=LIMITS)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps_strategy)
def test_random_sequences_alternate_and_every_alert_clears_once_conditions_end(steps):
    d = play(engine_for_mixed(), steps, calm=True)
    assert check_alternation(d.alerts) == {}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps_strategy)
def test_restart_mid_sequence_and_replay_give_the_same_alerts(steps):
    uninterrupted = play(engine_for_mixed(), steps)
    check_alternation(uninterrupted.alerts)
    replay = play(engine_for_mixed(), steps)
    restarted = play(engine_for_mixed(), steps, roundtrip=True)  # state stored and read back after every input
    assert replay.alerts == uninterrupted.alerts
    assert restarted.alerts == uninterrupted.alerts
    final = uninterrupted.state.to_json() if uninterrupted.state else None
    assert (restarted.state.to_json() if restarted.state else None) == final


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps_strategy)
def test_timers_between_inputs_do_not_change_the_alerts(steps):
    with_ticks = play(engine_for_mixed(), steps)
    without = play(engine_for_mixed(), steps, ticks=False)
    key = lambda a: (a.ts_ms, a.rule, a.state.value, a.alert_id)  # noqa: E731
    assert sorted(with_ticks.alerts, key=key) == sorted(without.alerts, key=key)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps_strategy)
def test_the_precomputed_fast_path_matches_calling_every_rule(steps):
    fast = play(engine_for_mixed(), steps)
    never = alerts_module._NEVER
    with pytest.MonkeyPatch.context() as patch:  # every rule's quiet interval empty: every rule runs every fix
        for cls in (alerts_module._Threshold, alerts_module._Overspeed, alerts_module._Idle,
                    alerts_module._Maintenance):
            patch.setattr(cls, "quiet", lambda self, rs, fence_speed: never)
        slow = play(engine_for_mixed(), steps)
    assert fast.alerts == slow.alerts
    assert (fast.state.to_json() if fast.state else None) == (slow.state.to_json() if slow.state else None)


def play_in_runs(engine, steps, split_every=0, tick_ahead_s=0):
    """``play`` with each run of consecutive fixes handed to ``on_positions`` at once (what the worker does with
    a device's fixes in one batch); ``split_every`` > 0 cuts runs after that many fixes."""
    d = Device(engine, "truck-1")
    t, inside, odometer = EVENING, set(), 0.0
    run: list = []

    def flush():
        if run:
            d._keep(engine.on_positions(d.state, d.device_id, list(run)))
            run.clear()

    for step in steps:
        t += step[1] * 1000
        if step[0] == "fix":
            _, _, speed, fences, metres = step
            odometer += metres
            events = [FenceEvent("exit", f, t) for f in sorted(inside - fences)] + \
                     [FenceEvent("enter", f, t) for f in sorted(fences - inside)]
            inside = set(fences)
            values = {"speed_kmh": float(speed), "odometer_m": odometer, "lat": 53.4, "lon": -2.98,
                      "motion": "moving" if speed > 2 else "stopped"}
            run.append((t, values, tuple(sorted(fences)), events))
            if split_every and len(run) >= split_every:
                flush()
            continue
        flush()
        if step[0] == "tele":
            if step[2]:
                d.tele(t, **step[2])
        else:
            d.tick(t + tick_ahead_s * 1000)
    flush()
    d.tick(t + 2 * H)
    return d


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps_strategy, st.integers(0, 4))
def test_a_run_of_fixes_at_once_gives_what_one_call_per_fix_gives(steps, split_every):
    one_by_one = play(engine_for_mixed(), steps)
    in_runs = play_in_runs(engine_for_mixed(), steps, split_every)
    assert in_runs.alerts == one_by_one.alerts
    assert (in_runs.state.to_json() if in_runs.state else None) == \
        (one_by_one.state.to_json() if one_by_one.state else None)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps_strategy, st.integers(0, 4), st.sampled_from([0, 600, 3000, 7200]))
def test_runs_match_one_call_per_fix_when_the_timer_is_ahead_of_the_fixes(steps, split_every, ahead_s):
    """A timer ahead of the fixes raises offline alerts that later fixes (older than the raise) do not clear:
    the run's fast path lets such fixes through without changing the alert."""
    one_by_one = play(engine_for_mixed(), steps, tick_ahead_s=ahead_s)
    in_runs = play_in_runs(engine_for_mixed(), steps, split_every, tick_ahead_s=ahead_s)
    assert in_runs.alerts == one_by_one.alerts
    assert (in_runs.state.to_json() if in_runs.state else None) == \
        (one_by_one.state.to_json() if one_by_one.state else None)


def test_fixes_older_than_a_raised_offline_alert_pass_the_fast_path_and_keep_it():
    engine = make_engine({"id": "silent", "kind": "offline", "after": "10m"},
                         {"id": "slow", "kind": "offline", "after": "1h"},
                         {"id": "fast", "kind": "overspeed", "limit_kmh": 100})
    state, _ = engine.on_position(None, "van-1", 1_000, {"speed_kmh": 40.0, "motion": "moving"})
    state, raised = engine.tick(state, "van-1", 1_000 + 20 * M)  # the wall clock is ahead: offline at 10m
    assert [a.rule for a in raised] == ["silent"] and state.offline == {"silent": 1_000 + 10 * M}
    run = [(1_000 + i * 5_000, {"speed_kmh": 40.0 + i, "motion": "moving"}, (), ()) for i in range(1, 30)]
    after, alerts = engine.on_positions(state, "van-1", run)
    expected = state
    for ts, values, fences, events in run:
        expected, _ = engine.on_position(expected, "van-1", ts, values, fences, events)
    assert alerts == []
    assert after == expected and after.offline == {"silent": 1_000 + 10 * M}
    assert after.last_seen_ms == run[-1][0] and after.due_ms == run[-1][0] + 60 * M  # the 1h rule is next
    back = run[-1][0] + 10 * M  # a fix after the raise clears it
    cleared, alerts = engine.on_positions(after, "van-1", [(back, {"speed_kmh": 40.0, "motion": "moving"}, (), ())])
    assert [(a.rule, a.state.value) for a in alerts] == [("silent", "cleared")] and cleared.offline is None


def test_a_quiet_run_of_fixes_builds_one_state_and_moves_last_seen_to_its_newest_fix():
    engine = make_engine({"id": "silent", "kind": "offline", "after": "10m"},
                         {"id": "fast", "kind": "overspeed", "limit_kmh": 100})
    state, _ = engine.on_position(None, "van-1", 1_000, {"speed_kmh": 40.0, "motion": "moving"})
    run = [(1_000 + i * 5_000, {"speed_kmh": 40.0 + i, "motion": "moving"}, (), ()) for i in range(1, 30)]
    after, alerts = engine.on_positions(state, "van-1", run)
    assert alerts == []
    assert after.last_seen_ms == run[-1][0]
    assert after.due_ms == run[-1][0] + 10 * M
    fast, alerts = engine.on_positions(after, "van-1", [(run[-1][0] + 1_000, {"speed_kmh": 130.0}, (), ())])
    assert fast.last_seen_ms == run[-1][0] + 1_000 and fast.rules  # the overspeed run started


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53), st.floats(allow_nan=False),
                     st.text(max_size=5))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(sorted(alerts_module._FLAT, key=lambda cls: cls.__name__)), st.data())
def test_flat_rule_states_encode_as_the_general_walk_does(cls, data):
    """The encoder's shortcut for all-scalar states gives what walking every field gives, and reads back."""
    rs = cls(*(data.draw(_scalars) for _ in cls._fields))
    general = [alerts_module._TAGS[cls], *(alerts_module._plain(v) for v in rs)]
    assert alerts_module._encode_rule_state(rs) == general
    assert orjson.dumps(alerts_module._encode_rule_state(rs)) == orjson.dumps(general)


def test_the_flat_rule_states_declare_no_tuple_fields():
    """The shortcut is only right while these states hold scalars: a tuple field must take the general walk."""
    for cls in alerts_module._FLAT:
        assert not any("tuple" in str(hint) for hint in cls.__annotations__.values()), cls
    for cls in set(alerts_module._STATE_TYPES.values()) - alerts_module._FLAT:
        assert any("tuple" in str(hint) for hint in cls.__annotations__.values()), cls
