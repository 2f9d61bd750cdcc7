"""Rule definitions: durations, every kind's fields, every refusal, files, device targeting and schedules."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetstream.domain.rules import (
    GeofenceRule,
    IdleRule,
    MaintenanceRule,
    OfflineRule,
    OverspeedRule,
    PredictiveRule,
    RateRule,
    RuleError,
    RuleKind,
    RuleSet,
    Schedule,
    Severity,
    ThresholdRule,
    load_rules,
    parse_duration_ms,
    parse_rule,
    parse_rules,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "rules.yaml"


@pytest.mark.parametrize(("text", "ms"), [
    ("10m", 600_000), ("30s", 30_000), ("2h", 7_200_000), ("1d", 86_400_000), ("500ms", 500), ("1h30m", 5_400_000),
    ("1.5s", 1500), (" 10 m ", 600_000), (90, 90_000), (1.5, 1500), (0, 0), ("45", 45_000),
])
def test_durations(text, ms):
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("text", ["10x", "", "m", "10 minutes", "-5s", -1, True, None, "1.5.5s", float("nan"), [10]])
def test_bad_durations_are_refused(text):
    with pytest.raises(ValueError, match=r"duration|seconds"):
        parse_duration_ms(text)


def test_threshold_fields_and_shorthand_agree():
    long = parse_rule({"id": "cold", "kind": "threshold", "metric": "temperature_c", "op": ">", "value": 8,
                       "for": "10m", "clear_below": 7, "clear_for": "2m", "severity": "major"})
    short = parse_rule({"id": "cold", "kind": "threshold", "when": "temperature_c > 8 for 10m", "clear_below": 7,
                        "clear_for": "2m", "severity": "major"})
    for rule in (long, short):
        assert isinstance(rule, ThresholdRule)
        assert (rule.metric, rule.op, rule.value, rule.for_ms, rule.clear_below, rule.clear_for_ms) == (
            "temperature_c", ">", 8.0, 600_000, 7.0, 120_000)
        assert rule.severity is Severity.MAJOR and rule.kind is RuleKind.THRESHOLD
    vending = parse_rule({"id": "v", "kind": "threshold", "when": "stock_units <= 3"})
    assert (vending.metric, vending.op, vending.value, vending.for_ms) == ("stock_units", "<=", 3.0, 0)
    assert vending.severity is Severity.WARNING  # the default


def test_rate_fields_and_shorthand_agree():
    short = parse_rule({"id": "theft", "kind": "rate_of_change", "when": "fuel_pct drops > 15 within 5m while stopped"})
    long = parse_rule({"id": "theft", "kind": "rate_of_change", "metric": "fuel_pct", "direction": "drops", "by": 15,
                       "within": "5m", "while": "stopped"})
    for rule in (short, long):
        assert isinstance(rule, RateRule)
        assert (rule.metric, rule.direction, rule.by, rule.within_ms, rule.while_motion, rule.inclusive) == (
            "fuel_pct", "drops", 15.0, 300_000, "stopped", False)
    rises = parse_rule({"id": "r", "kind": "rate_of_change", "when": "temperature_c rises >= 5 within 10m"})
    assert (rises.direction, rises.inclusive, rises.while_motion) == ("rises", True, None)


def test_every_other_kind_parses():
    overspeed = parse_rule({"id": "o", "kind": "overspeed", "limit_kmh": 90, "tolerance_kmh": 5, "for": "30s"})
    assert isinstance(overspeed, OverspeedRule)
    assert (overspeed.limit_kmh, overspeed.tolerance_kmh, overspeed.for_ms, overspeed.geofence_limits) == (
        90.0, 5.0, 30_000, True)
    idle = parse_rule({"id": "i", "kind": "idle", "for": "10m", "engine_metric": "engine_rpm", "engine_min": 300})
    assert isinstance(idle, IdleRule)
    assert (idle.for_ms, idle.max_speed_kmh, idle.ignition_metric, idle.engine_metric, idle.engine_min) == (
        600_000, 2.0, "ignition", "engine_rpm", 300.0)
    inside = parse_rule({"id": "k", "kind": "keep_inside", "geofences": ["b", "a", "a"],
                         "schedule": {"timezone": "Europe/London", "windows": ["22:00-06:00"]}})
    assert isinstance(inside, GeofenceRule) and inside.geofences == ("a", "b")
    assert inside.schedule is not None and inside.schedule.windows == ((1320, 360),)
    window = parse_rule({"id": "w", "kind": "time_window", "geofences": "bay",
                         "allowed": {"timezone": "UTC", "windows": "06:00-22:00", "days": ["Mon", "tuesday"]}})
    assert window.schedule.days == frozenset({0, 1}) and window.geofences == ("bay",)
    offline = parse_rule({"id": "off", "kind": "offline", "after": "10m"})
    assert isinstance(offline, OfflineRule) and offline.after_ms == 600_000
    km = parse_rule({"id": "m", "kind": "maintenance", "every_km": 15000})
    assert isinstance(km, MaintenanceRule) and (km.metric, km.every, km.reset_metric) == (
        "odometer_m", 15_000_000.0, "service_reset")
    hours = parse_rule({"id": "h", "kind": "maintenance", "every_hours": 250, "reset_metric": "serviced"})
    assert (hours.metric, hours.every, hours.reset_metric) == ("engine_hours", 250.0, "serviced")
    generic = parse_rule({"id": "g", "kind": "maintenance", "metric": "pump_cycles", "every": 1e6})
    assert (generic.metric, generic.every) == ("pump_cycles", 1e6)
    predictive = parse_rule({"id": "p", "kind": "predictive", "metric": "battery_v", "op": "<", "threshold": 11.8,
                             "window": "6h", "horizon": "24h"})
    assert isinstance(predictive, PredictiveRule)
    assert (predictive.window_ms, predictive.horizon_ms, predictive.clear_horizon_ms, predictive.min_samples,
            predictive.buckets) == (21_600_000, 86_400_000, 86_400_000, 10, 24)


def test_topic_key_names_the_rule_and_must_match():
    rule = parse_rule({"kind": "offline", "after": 60}, rule_id="from-key")
    assert rule.id == "from-key"
    with pytest.raises(RuleError, match=r"rule 'from-key': its id field says 'other'"):
        parse_rule({"id": "other", "kind": "offline", "after": 60}, rule_id="from-key")


GOOD = {
    "threshold": {"kind": "threshold", "metric": "temperature_c", "op": ">", "value": 8},
    "rate": {"kind": "rate_of_change", "metric": "fuel_pct", "direction": "drops", "by": 15, "within": "5m"},
    "overspeed": {"kind": "overspeed", "limit_kmh": 90},
    "idle": {"kind": "idle", "for": "10m"},
    "keep_inside": {"kind": "keep_inside", "geofences": ["depot"]},
    "time_window": {"kind": "time_window", "geofences": ["bay"], "allowed": {"windows": ["06:00-22:00"]}},
    "offline": {"kind": "offline", "after": "10m"},
    "maintenance": {"kind": "maintenance", "every_km": 15000},
    "predictive": {"kind": "predictive", "metric": "battery_v", "op": "<", "threshold": 11.8, "window": "6h",
                   "horizon": "1d"},
}


def with_(base: str, **changes):
    rule = {"id": "r1", **GOOD[base]}
    for name, value in changes.items():
        if value is ...:
            rule.pop(name, None)
        else:
            rule[name] = value
    return rule


BAD = [
    ({"kind": "offline", "after": 60}, r"rule '\?': needs a non-empty string 'id'"),
    ({"id": "", "kind": "offline", "after": 60}, r"needs a non-empty string 'id'"),
    ({"id": 7, "kind": "offline", "after": 60}, r"needs a non-empty string 'id', got 7"),
    ({"id": "x" * 129, "kind": "offline", "after": 60}, r"id longer than 128"),
    ({"id": "r1"}, r"rule 'r1': missing field 'kind'"),
    ({"id": "r1", "kind": "treshold"}, r"rule 'r1': unknown kind 'treshold'"),
    (with_("threshold", severity="urgent"), r"rule 'r1': bad severity 'urgent'"),
    (with_("threshold", treshold=3), r"rule 'r1': unknown field\(s\) 'treshold' for kind threshold"),
    (with_("threshold", description=5), r"description must be a string"),
    (with_("threshold", metric=...), r"rule 'r1': missing field 'metric'"),
    (with_("threshold", op="=>"), r"rule 'r1': unknown operator '=>'"),
    (with_("threshold", op=...), r"missing field 'op'"),
    (with_("threshold", value="8"), r"rule 'r1': value must be a number, got '8'"),
    (with_("threshold", value=True), r"value must be a number"),
    (with_("threshold", value=...), r"missing field 'value'"),
    (with_("threshold", **{"for": "10x"}), r"rule 'r1': for: bad duration '10x'"),
    (with_("threshold", clear_for=-3), r"clear_for: must be a non-negative number"),
    (with_("threshold", op="<", clear_below=5), r"clear_below goes with > or >=, not <"),
    (with_("threshold", clear_below=9), r"clear_below 9 must not be above the threshold 8"),
    (with_("threshold", clear_above=9), r"clear_above goes with < or <=, not >"),
    (with_("threshold", op="<", clear_above=7), r"clear_above 7 must not be below the threshold 8"),
    (with_("threshold", when="temperature_c > 8"), r"give either 'when' or metric, op, value, not both"),
    ({"id": "r1", "kind": "threshold", "when": "temperature is hot"}, r"cannot read when: 'temperature is hot'"),
    ({"id": "r1", "kind": "threshold", "when": "t > 8 for 10y"}, r"for: bad duration '10y'"),
    (with_("threshold", metric="x" * 65), r"metric must be a metric name of 1 to 64 characters"),
    (with_("rate", direction="falls"), r"direction must be drops or rises, got 'falls'"),
    (with_("rate", direction=...), r"missing field 'direction'"),
    (with_("rate", by=0), r"by must be positive"),
    (with_("rate", within=...), r"missing field 'within'"),
    (with_("rate", within=0), r"within must be longer than zero"),
    (with_("rate", op="<"), r"unknown operator '<' \(one of >, >="),
    (with_("rate", **{"while": "parked"}), r"while must be stopped or moving, got 'parked'"),
    ({"id": "r1", "kind": "rate_of_change", "when": "fuel_pct drops 15"}, r"cannot read when"),
    (with_("overspeed", limit_kmh=-5), r"limit_kmh must be positive"),
    (with_("overspeed", limit_kmh=..., geofence_limits=False), r"needs limit_kmh, or geofence_limits: true"),
    (with_("overspeed", geofence_limits="yes"), r"geofence_limits must be true or false"),
    (with_("overspeed", tolerance_kmh=-1), r"tolerance_kmh must not be negative"),
    (with_("idle", **{"for": ...}), r"rule 'r1': missing field 'for'"),
    (with_("idle", **{"for": 0}), r"for must be longer than zero"),
    (with_("keep_inside", geofences=...), r"missing field 'geofences'"),
    (with_("keep_inside", geofences=[1, 2]), r"geofences must be a list of non-empty strings"),
    (with_("keep_inside", schedule={"timezone": "Mars/Olympus", "windows": ["22:00-06:00"]}),
     r"rule 'r1': schedule: unknown timezone 'Mars/Olympus'"),
    (with_("keep_inside", schedule={"windows": ["25:00-06:00"]}), r"schedule: bad time in window '25:00-06:00'"),
    (with_("keep_inside", schedule={"windows": [1320]}), r"schedule: bad window 1320 \(expected 'HH:MM-HH:MM'"),
    (with_("keep_inside", schedule={"windows": ["06:00-06:00"]}), r"window '06:00-06:00' is empty"),
    (with_("keep_inside", schedule={"windows": []}), r"windows must be a non-empty list"),
    (with_("keep_inside", schedule={"windows": ["06:00-22:00"], "days": ["funday"]}), r"bad day 'funday'"),
    (with_("keep_inside", schedule={"windows": ["06:00-22:00"], "tz": "UTC"}), r"schedule: unknown field\(s\) 'tz'"),
    (with_("keep_inside", schedule="nights"), r"schedule: expected an object"),
    (with_("time_window", allowed=...), r"missing field 'allowed'"),
    (with_("keep_inside", allowed={"windows": ["06:00-22:00"]}), r"unknown field\(s\) 'allowed' for kind keep_inside"),
    (with_("offline", after=...), r"missing field 'after'"),
    (with_("offline", after="0s"), r"after must be longer than zero"),
    (with_("maintenance", every_km=...), r"give exactly one of every \(with metric\), every_km or every_hours"),
    (with_("maintenance", every_hours=250), r"give exactly one of"),
    (with_("maintenance", metric="odometer_m"), r"every_km reads odometer_m; drop metric or use every"),
    (with_("maintenance", every_km=0), r"every_km must be positive"),
    (with_("maintenance", every_km=..., every=10), r"missing field 'metric'"),
    (with_("maintenance", reset_metric="odometer_m"), r"reset_metric must differ from metric"),
    (with_("predictive", op=">="), r"unknown operator '>=' \(one of <, >"),
    (with_("predictive", min_samples=2), r"min_samples must be a whole number >= 3"),
    (with_("predictive", min_samples=4.5), r"min_samples must be a whole number >= 3"),
    (with_("predictive", buckets=1), r"buckets must be a whole number from 2 to 1000"),
    (with_("predictive", clear_horizon="1h"), r"clear_horizon must not be shorter than horizon"),
    (with_("predictive", horizon=...), r"missing field 'horizon'"),
    (with_("predictive", threshold=...), r"missing field 'threshold'"),
    (with_("offline", devices=[7]), r"devices must be a list of non-empty strings \(quote ids"),
    (with_("offline", groups={"a": 1}), r"groups must be a list of non-empty strings"),
]


@pytest.mark.parametrize(("raw", "message"), BAD)
def test_bad_rules_are_refused_naming_the_rule_and_problem(raw, message):
    with pytest.raises(RuleError, match=message):
        parse_rule(raw)


def test_not_an_object():
    with pytest.raises(RuleError, match=r"rule 'k': expected an object, got list"):
        parse_rule(["offline"], rule_id="k")


def test_ruleset_refusals():
    offline = parse_rule({"id": "a", "kind": "offline", "after": 60})
    with pytest.raises(RuleError, match=r"rule 'a': id appears twice"):
        RuleSet([offline, parse_rule({"id": "a", "kind": "offline", "after": 90})])
    with pytest.raises(RuleError, match=r"rule 'g': unknown group\(s\) 'vans'"):
        RuleSet([parse_rule({"id": "g", "kind": "offline", "after": 60, "groups": ["vans"]})], {"trucks": ["t-*"]})
    with pytest.raises(RuleError, match=r"group 'trucks': expected a list of device ids"):
        RuleSet([], {"trucks": [1, 2]})
    with pytest.raises(RuleError, match=r"groups must be a map"):
        RuleSet([], ["trucks"])  # type: ignore[arg-type]


def test_example_file_covers_every_kind_and_targets_groups():
    ruleset = load_rules(EXAMPLE)
    assert {rule.kind for rule in ruleset} == set(RuleKind)
    truck = {rule.id for rule in ruleset.rules_for("truck-12")}
    reefer = {rule.id for rule in ruleset.rules_for("reefer-07")}
    vending = {rule.id for rule in ruleset.rules_for("vend-3")}
    assert {"overspeed", "fuel-theft", "depot-at-night", "service-due", "offline"} <= truck
    assert "cold-chain" not in truck and "cold-chain" in reefer and "restock" in vending
    assert "overspeed" not in vending and "offline" in vending  # offline has no target: every device


def test_load_from_text_mapping_json_file_and_rules_keyed_by_id(tmp_path):
    text = "groups:\n  vans: ['van-*']\nrules:\n  - {id: off, kind: offline, after: 10m, groups: [vans]}\n"
    assert [r.id for r in load_rules(text).rules_for("van-1")] == ["off"]
    assert load_rules(text).rules_for("truck-1") == ()
    keyed = load_rules({"rules": {"off": {"kind": "offline", "after": 60}}})
    assert keyed.get("off").after_ms == 60_000
    path = tmp_path / "rules.json"
    path.write_text(json.dumps({"rules": [{"id": "t", "kind": "threshold", "when": "fuel_pct < 10"}]}))
    assert load_rules(path).get("t").op == "<"
    assert load_rules(str(path)).get("t").value == 10
    assert len(load_rules("[]")) == 0 and len(parse_rules(None)) == 0


def test_yaml_scalars_are_read_as_written():
    ruleset = load_rules("rules:\n  - {id: off, kind: offline, after: 10m, devices: [007, no]}\n"
                         "  - {id: yes, kind: keep_inside, geofences: [depot], schedule: {windows: [22:00-06:00]}}\n")
    assert ruleset.get("off").devices == ("007", "no")  # YAML 1.1 would read False, 7 and False
    assert [r.id for r in ruleset.rules_for("007")] == ["off", "yes"]
    with pytest.raises(RuleError, match=r"after: bad duration '10:00'"):  # not the sexagesimal 600
        load_rules("rules:\n  - {id: a, kind: offline, after: 10:00}\n")


@pytest.mark.parametrize(("content", "message"), [
    ("rules: [", r"not valid YAML"),
    ("rule: []", r"unknown top-level key\(s\) 'rule'"),
    ("rules: 5", r"rules must be a list of rules or a map"),
    ("- {id: a, kind: offline}", r"rule 'a': missing field 'after'"),
    ("just text", r"expected a map with 'rules'"),
])
def test_bad_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "rules.yaml"
    path.write_text(content)
    with pytest.raises(RuleError, match=message) as info:
        load_rules(path)
    assert str(path) in str(info.value)


def test_missing_and_invalid_json_files(tmp_path):
    with pytest.raises(RuleError, match="rules file not found"):
        load_rules(tmp_path / "nope.yaml")
    bad = tmp_path / "rules.json"
    bad.write_text("{rules: []}")  # YAML would accept it; a .json file must be JSON
    with pytest.raises(RuleError, match="not valid JSON"):
        load_rules(bad)


def test_targeting_by_ids_globs_groups_and_nothing():
    ruleset = parse_rules({
        "groups": {"reefers": ["reefer-*", "special-1"], "depot": ["truck-[0-4]"]},
        "rules": [
            {"id": "all", "kind": "offline", "after": 60},
            {"id": "ids", "kind": "offline", "after": 60, "devices": ["truck-9", "van-?"]},
            {"id": "groups", "kind": "offline", "after": 60, "groups": ["reefers", "depot"]},
            {"id": "both", "kind": "offline", "after": 60, "devices": ["truck-9"], "groups": ["reefers"]},
        ],
    })
    ids = {d: [r.id for r in ruleset.rules_for(d)] for d in
           ("truck-9", "truck-3", "truck-7", "van-1", "van-12", "reefer-x", "special-1", "special-10")}
    assert ids == {"truck-9": ["all", "ids", "both"], "truck-3": ["all", "groups"], "truck-7": ["all"],
                   "van-1": ["all", "ids"], "van-12": ["all"], "reefer-x": ["all", "groups", "both"],
                   "special-1": ["all", "groups", "both"], "special-10": ["all"]}
    assert ruleset.rules_for("truck-3") is ruleset.rules_for("truck-3")
    assert ruleset.rules_for("truck-1") is ruleset.rules_for("truck-3")  # equal answers are one tuple


def test_records_for_the_topic_stand_alone_and_read_back():
    ruleset = parse_rules({"groups": {"reefers": ["reefer-*"]}, "rules": [
        {"id": "cold", "kind": "threshold", "when": "temperature_c > 8 for 10m", "groups": ["reefers"],
         "devices": ["lab-1"]},
        {"id": "off", "kind": "offline", "after": "10m"},
    ]})
    records = ruleset.to_records()
    assert [key for key, _ in records] == ["cold", "off"]
    assert records[0][1]["devices"] == ["lab-1", "reefer-*"] and "groups" not in records[0][1]
    rebuilt = RuleSet([parse_rule(json.loads(json.dumps(value)), rule_id=key) for key, value in records])
    for device in ("reefer-1", "lab-1", "truck-1"):
        assert [r.id for r in rebuilt.rules_for(device)] == [r.id for r in ruleset.rules_for(device)]
    assert rebuilt.get("cold").for_ms == 600_000


def test_with_and_without_rule_and_the_key():
    base = parse_rules({"rules": [{"id": "a", "kind": "offline", "after": 60}]})
    again = parse_rules({"rules": [{"id": "a", "kind": "offline", "after": 60}]})
    assert base.key == again.key  # same rules, same key (also across processes: no sets or ids in it)
    changed = base.with_rule(parse_rule({"id": "a", "kind": "offline", "after": 90}))
    assert changed.key != base.key and changed.get("a").after_ms == 90_000 and len(changed) == 1
    added = base.with_rule(parse_rule({"id": "b", "kind": "idle", "for": "5m"}))
    assert [r.id for r in added] == ["a", "b"]
    assert [r.id for r in added.without_rule("a")] == ["b"]
    assert len(base) == 1  # immutable


LONDON = ZoneInfo("Europe/London")


def _active_by_scan(windows, days, ts_ms, zone=LONDON):
    """Reference: is local wall time inside a window that started on an allowed day?"""
    local = datetime.fromtimestamp(ts_ms / 1000, zone)
    minute = local.hour * 60 + local.minute
    for start, end in windows:
        today, yesterday = local.date(), local.date() - timedelta(days=1)
        if end > start:
            if start <= minute < end and (days is None or today.weekday() in days):
                return True
        else:
            if minute >= start and (days is None or today.weekday() in days):
                return True
            if minute < end and (days is None or yesterday.weekday() in days):
                return True
    return False


# (start, end) minutes; end 1440 is 24:00; end < start runs past midnight
windows_strategy = st.lists(st.tuples(st.integers(0, 1439), st.integers(1, 1440)).filter(lambda w: w[0] != w[1]),
                            min_size=1, max_size=3)


@settings(max_examples=60, deadline=None)
@given(windows_strategy, st.none() | st.sets(st.integers(0, 6), min_size=1),
       st.lists(st.integers(1_767_225_600, 1_830_297_600), min_size=1, max_size=20))
def test_schedule_matches_a_wall_clock_scan(windows, days, seconds):
    schedule = Schedule("Europe/London", windows, days)
    for second in seconds:
        ts = second // 60 * 60_000  # whole minutes: the reference reads minutes
        expected = _active_by_scan(windows, days, ts)
        assert schedule.active_at(ts) is expected
        change = schedule.next_change_ms(ts)
        assert change > ts
        if change < 2**61:
            assert _active_by_scan(windows, days, change) is not expected
            assert _active_by_scan(windows, days, change - 60_000) is expected


def test_schedule_over_midnight_with_days_and_dst():
    nights = Schedule("Europe/London", [(22 * 60, 6 * 60)], days=[4])  # Friday nights only
    friday_23 = int(datetime(2026, 11, 27, 23, 0, tzinfo=LONDON).timestamp() * 1000)
    saturday_05 = int(datetime(2026, 11, 28, 5, 0, tzinfo=LONDON).timestamp() * 1000)
    saturday_23 = int(datetime(2026, 11, 28, 23, 0, tzinfo=LONDON).timestamp() * 1000)
    assert nights.active_at(friday_23) and nights.active_at(saturday_05) and not nights.active_at(saturday_23)
    assert nights.next_change_ms(friday_23) == int(datetime(2026, 11, 28, 6, 0, tzinfo=LONDON).timestamp() * 1000)
    # the night the clocks go forward (29 March 2026, 01:00 GMT -> 02:00 BST) is one hour shorter in real time
    start = nights_all = Schedule("Europe/London", [(22 * 60, 6 * 60)])
    start = int(datetime(2026, 3, 28, 22, 0, tzinfo=LONDON).timestamp() * 1000)
    assert nights_all.next_change_ms(start) - start == 7 * 3_600_000
    always = Schedule("UTC", [(0, 1440)])
    assert always.active_at(0) and always.next_change_ms(0) >= 2**61
