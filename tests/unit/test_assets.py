"""RFID asset tracking at domain level: de-duplication, zone resolution with hysteresis, asset events, alerts and
inventory, by hand-checked cases (a scripted warehouse day among them) and properties against simple references."""

from __future__ import annotations

import json
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetstream.codecs import format_ts, validate_output
from fleetstream.domain.assets import (
    NO_ASSETS,
    AssetConfig,
    AssetError,
    AssetRegistry,
    AssetState,
    Inventory,
    VehicleFix,
    next_deadline,
    step,
    tick,
)
from fleetstream.domain.models import DeviceState, Motion, RfidRead
from fleetstream.domain.readers import ReaderError, ReaderRegistry

READERS = ReaderRegistry.load(Path(__file__).resolve().parents[2] / "examples" / "readers.json")
T0 = 1_795_600_800_000  # 2026-11-25T10:00:00Z
CFG = AssetConfig(dedup_window_s=1, switch_margin_db=6, switch_after_s=5, separation_after_s=60)
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def ms(seconds: float) -> int:
    return T0 + round(seconds * 1000)


def ev(event) -> tuple:
    """An event as (type, tag, zone or vehicle, seconds after T0): what the hand-checked lists compare."""
    return event.type, event.tag_id, event.zone_id or event.vehicle_id, (event.ts_ms - T0) / 1000


def al(alert) -> tuple:
    return alert.rule, alert.state, alert.subject_id, (alert.ts_ms - T0) / 1000


class Run:
    """Feeds reads and timer ticks to the domain for any number of tags, collecting every output."""

    def __init__(self, assets=NO_ASSETS, config=CFG, vehicles=None, readers=READERS):
        self.assets, self.config, self.readers = assets, config, readers
        self.vehicles = {} if vehicles is None else vehicles
        self.states: dict[str, AssetState] = {}
        self.events: list = []
        self.alerts: list = []

    def read(self, tag, reader, seconds, rssi=-55.0):
        state, events, alerts = step(self.states.get(tag), RfidRead(tag, reader, ms(seconds), rssi), self.readers,
                                     self.vehicles, self.assets, self.config)
        self.states[tag] = state
        self.events += events
        self.alerts += alerts
        return [ev(e) for e in events], [al(a) for a in alerts]

    def tick(self, seconds):
        out_events, out_alerts = [], []
        for tag, state in list(self.states.items()):
            self.states[tag], events, alerts = tick(state, ms(seconds), self.readers, self.vehicles, self.assets,
                                                    self.config)
            out_events += events
            out_alerts += alerts
        self.events += out_events
        self.alerts += out_alerts
        return [ev(e) for e in out_events], [al(a) for a in out_alerts]


# --- de-duplication -------------------------------------------------------------------------------------------------

def test_duplicates_collapse_into_the_windows_strongest_rssi_and_latest_time():
    run = Run()
    assert run.read("p", "dock-door-1", 0, -60) == ([("arrived", "p", "dock-1", 0)], [])
    for seconds, rssi in ((0.2, -55), (0.5, -58), (0.9, -70)):
        assert run.read("p", "dock-door-1", seconds, rssi) == ([], [])
    state = run.states["p"]
    assert state.sightings["dock-door-1"] == (ms(0), ms(0.9), -55)
    assert (state.last_seen_ms, state.place_seen_ms, state.clock_ms) == (ms(0.9), ms(0.9), ms(0.9))
    # a duplicate that adds nothing (not later, not stronger) returns the very same state: no changelog write
    again, events, alerts = step(state, RfidRead("p", "dock-door-1", ms(0.5), -56.0), READERS, config=CFG)
    assert again is state and not events and not alerts
    # the window is tumbling: the first read at or after start + window opens the next one
    run.read("p", "dock-door-1", 1.0, -65)
    assert run.states["p"].sightings["dock-door-1"] == (ms(1), ms(1), -65)
    # a late read (older than the reader's current window) changes nothing
    run.read("p", "dock-door-1", 0.95, -30)
    assert run.states["p"].sightings["dock-door-1"] == (ms(1), ms(1), -65)
    # reads without rssi keep the window's rssi; a window of such reads has none
    run.read("p", "dock-door-1", 1.5, None)
    assert run.states["p"].sightings["dock-door-1"] == (ms(1), ms(1.5), -65)
    run.read("p", "dock-door-1", 2.0, None)
    run.read("p", "dock-door-1", 2.1, None)
    assert run.states["p"].sightings["dock-door-1"] == (ms(2), ms(2.1), None)
    assert run.events == [run.events[0]] and not run.alerts


def test_the_duplicate_path_is_taken_only_before_the_next_deadline():
    assets = AssetRegistry.from_dict({"p": {"missing_after_s": 2}})
    run = Run(assets)
    run.read("p", "shelf-b", 0)
    assert next_deadline(run.states["p"]) == ms(2)
    run.read("p", "shelf-b", 0.9)  # duplicate: moves the real deadline, not the cached lower bound
    assert next_deadline(run.states["p"]) == ms(2)
    state = run.states["p"]
    ticked, events, alerts = tick(state, ms(2.5), READERS, assets=assets, config=CFG)
    assert not events and not alerts and next_deadline(ticked) == ms(2.9)  # recomputed, nothing was due
    assert tick(ticked, ms(2.8), READERS, assets=assets, config=CFG)[0] is ticked  # not due: same object
    assert run.tick(3) == ([], [("asset_missing", "raised", "p", 2.9)])


# --- zone resolution ------------------------------------------------------------------------------------------------

def test_a_neighbour_within_the_margin_does_not_take_the_tag_and_one_beyond_it_does():
    run = Run(config=AssetConfig(dedup_window_s=1, switch_margin_db=6, switch_after_s=5, unaccompanied_motion=False))
    run.read("p", "dock-door-1", 0, -60)
    assert run.read("p", "dock-door-2", 0.1, -55) == ([], [])  # 5 dB: within the margin
    assert run.read("p", "dock-door-1", 1.0, -60) == ([], [])
    events, _ = run.read("p", "dock-door-2", 1.2, -54)  # 6 dB over dock-door-1's window: clear win
    assert events == [("departed", "p", "dock-1", 1.2), ("arrived", "p", "dock-2", 1.2)]
    state = run.states["p"]
    assert (state.reader_id, state.zones, state.since_ms, state.lat) == ("dock-door-2", ("dock-2",), ms(1.2),
                                                                        READERS["dock-door-2"].lat)


@pytest.mark.parametrize("ticked", [True, False])
def test_a_silent_place_loses_the_tag_at_its_deadline_whether_a_timer_runs_or_a_read_comes(ticked):
    run = Run(config=AssetConfig(dedup_window_s=1, switch_margin_db=6, switch_after_s=5, unaccompanied_motion=False))
    for seconds in (0, 1, 2):
        run.read("p", "dock-door-1", seconds, -50)
    for seconds in (2.5, 3.5, 4.5, 5.5, 6.5):  # weaker: only the silence of dock-door-1 can hand it over
        assert run.read("p", "dock-door-2", seconds, -60) == ([], [])
    assert next_deadline(run.states["p"]) == ms(7)  # dock-door-1 last read at 2 s, + switch_after_s
    if ticked:
        assert run.tick(6.999) == ([], [])
        assert run.tick(8) == ([("departed", "p", "dock-1", 7), ("arrived", "p", "dock-2", 7)], [])
        assert run.read("p", "dock-door-2", 8.5, -60) == ([], [])
    else:
        assert run.read("p", "dock-door-2", 8.5, -60) == ([("departed", "p", "dock-1", 7),
                                                          ("arrived", "p", "dock-2", 7)], [])
    assert run.states["p"].since_ms == ms(7) and run.states["p"].place_seen_ms == ms(8.5)


def test_a_candidate_made_by_duplicates_alone_still_takes_the_tag_at_the_deadline():
    run = Run(config=AssetConfig(dedup_window_s=1, switch_margin_db=6, switch_after_s=5, unaccompanied_motion=False))
    run.read("p", "dock-door-1", 0, -50)
    run.read("p", "dock-door-2", 0.5, -60)  # not yet a window after dock-door-1's last read: no candidate
    assert next_deadline(run.states["p"]) == ms(5)  # armed anyway: the window is open
    run.read("p", "dock-door-2", 1.4, -60)  # a duplicate (no resolution runs) that makes it one
    assert run.tick(10) == ([("departed", "p", "dock-1", 5), ("arrived", "p", "dock-2", 5)], [])


def test_a_tag_leaving_every_readers_range_stays_where_it_was_last_seen():
    run = Run()
    for seconds in range(11):
        run.read("p", "dock-door-1", seconds, -50)
    run.read("p", "dock-door-2", 10.6, -60)  # the neighbour happens to read it last, 0.6 s later
    assert run.tick(3600) == ([], [])
    assert run.states["p"].zones == ("dock-1",)


def test_antennas_of_one_place_share_the_tag_without_events():
    run = Run()
    run.read("p", "shelf-a", 0, -60)
    assert run.read("p", "shelf-a-rear", 0.5, -40) == ([], [])
    state = run.states["p"]
    assert (state.reader_id, state.zones, state.place_seen_ms) == ("shelf-a-rear", ("shelf-a",), ms(0.5))
    assert state.lat == READERS["shelf-a-rear"].lat


def test_a_redefined_reader_moves_its_tags_without_alerts():
    run = Run(AssetRegistry.from_dict({"p": {"keep_inside": True}}))
    run.read("p", "dock-door-1", 0)
    run.readers = READERS.apply("dock-door-1", {**READERS["dock-door-1"].to_dict(), "zone_id": "dock-9"})
    assert run.read("p", "dock-door-1", 0.5) == ([], [])  # a duplicate: still the window of the old definition
    assert run.read("p", "dock-door-1", 1.0) == ([("departed", "p", "dock-1", 1), ("arrived", "p", "dock-9", 1)], [])
    run.readers = run.readers.apply("dock-door-1", {**READERS["dock-door-1"].to_dict(), "role": "exit"})
    assert run.read("p", "dock-door-1", 2.0) == ([("departed", "p", "dock-9", 2)], [])
    assert run.states["p"].inside is False


def test_an_unknown_reader_is_refused():
    with pytest.raises(ReaderError, match="'nowhere': unknown"):
        step(None, RfidRead("p", "nowhere", T0), READERS)


# --- vehicles --------------------------------------------------------------------------------------------------------

def test_loaded_tags_follow_the_vehicle_and_its_geofences_then_unload():
    truck = {"veh-0012": VehicleFix(53.4010, -2.9849, "stopped", ("depot",))}
    run = Run(vehicles=truck)
    run.read("p", "dock-door-2", 0, -55)
    events, alerts = run.read("p", "truck-12-bay", 10, -40)
    assert events == [("departed", "p", "dock-2", 10), ("loaded", "p", "veh-0012", 10), ("arrived", "p", "depot", 10)]
    assert not alerts and {e.vehicle_id for e in run.events[-3:]} == {"veh-0012"}
    assert (run.events[-1].lat, run.events[-1].lon) == (53.4010, -2.9849)  # the vehicle's, not the reader's home
    truck["veh-0012"] = VehicleFix(53.3990, -2.9870, "moving", ())
    assert run.read("p", "truck-12-bay", 10.5, -40) == ([], [])  # a duplicate: location refreshed per window
    assert run.read("p", "truck-12-bay", 11, -40) == ([("departed", "p", "depot", 11)], [])
    assert (run.states["p"].lat, run.events[-1].vehicle_id) == (53.3990, "veh-0012")
    truck["veh-0012"] = DeviceState("veh-0012", ms(12), 53.39, -2.99, motion=Motion.MOVING, geofences=("m62",))
    assert run.read("p", "truck-12-bay", 12, -40) == ([("arrived", "p", "m62", 12)], [])
    # delivered: the customer's dock reads it and the truck stops reading it
    events, alerts = run.read("p", "dock-door-1", 20, -60)
    assert events == [("departed", "p", "m62", 20), ("unloaded", "p", "veh-0012", 20), ("arrived", "p", "dock-1", 20)]
    assert not alerts and run.states["p"].vehicle_id is None


def test_a_vehicle_whose_position_is_unknown_leaves_its_load_where_it_was():
    """A worker that restarts before the vehicle reports again must not take the load out of its geofences."""
    truck = {"veh-0012": VehicleFix(53.4010, -2.9849, "stopped", ("depot",))}
    run = Run(vehicles=truck)
    run.read("p", "truck-12-bay", 0, -40)
    assert run.states["p"].zones == ("depot",)
    del truck["veh-0012"]
    assert run.read("p", "truck-12-bay", 5, -40) == ([], [])
    assert run.states["p"].zones == ("depot",) and run.states["p"].lat == 53.4010
    truck["veh-0012"] = VehicleFix(53.3990, -2.9870, "moving", ())
    assert run.read("p", "truck-12-bay", 10, -40) == ([("departed", "p", "depot", 10)], [])


def test_a_gate_never_takes_a_tag_from_a_vehicle_still_reading_it():
    run = Run(vehicles={"veh-0012": VehicleFix(53.4, -2.98, "moving", ("depot",))})
    run.read("p", "truck-12-bay", 0, -45)
    run.read("p", "truck-12-bay", 1, -45)
    assert run.read("p", "gate-1", 1.5, -20) == ([], [])  # 25 dB stronger, but the truck read it 0.5 s ago
    assert run.states["p"].vehicle_id == "veh-0012" and run.states["p"].inside is False


def test_gate_reads_of_a_load_raise_unauthorised_exit_only_off_authorised_vehicles():
    assets = AssetRegistry.from_dict({
        "ok": {"keep_inside": True, "authorised_vehicles": ["veh-0012"]},
        "bad": {"keep_inside": True, "authorised_vehicles": ["veh-0012"]},
        "free": {},
    })
    run = Run(assets, vehicles={"veh-0012": VehicleFix(53.4, -2.98, "moving")})
    for tag, vehicle_reader in (("ok", "truck-12-bay"), ("bad", "forklift-3"), ("free", "forklift-3")):
        run.read(tag, "shelf-a", 0, -60)
        assert run.read(tag, vehicle_reader, 2, -40)[1] == []  # loading onto any vehicle is no exit
    assert run.read("ok", "gate-1", 4, -50) == ([], [])
    assert run.read("bad", "gate-1", 4, -50) == ([], [("unauthorised_exit", "raised", "bad", 4)])
    assert run.alerts[-1].details == {"from_zone": None, "reader_id": "gate-1", "zone_id": "yard-gate",
                                      "vehicle_id": "fl-03"}
    assert run.read("free", "gate-1", 4, -50) == ([], [])
    assert run.read("bad", "gate-1", 5, -50) == ([], [])  # raised once


def test_an_inbound_load_read_at_the_gate_is_not_an_exit():
    run = Run(AssetRegistry.from_dict({"p": {"keep_inside": True}}), vehicles={})
    run.read("p", "truck-12-bay", 0, -40)  # first seen on a truck: never inside the site
    assert run.read("p", "gate-1", 1, -50) == ([], [])
    events, alerts = run.read("p", "dock-door-1", 10, -50)
    assert events == [("unloaded", "p", "veh-0012", 10), ("arrived", "p", "dock-1", 10)] and not alerts
    assert run.states["p"].inside is True


# --- alerts ---------------------------------------------------------------------------------------------------------

def test_stolen_through_a_side_door_then_brought_back():
    run = Run(AssetRegistry.from_dict({"p": {"keep_inside": True, "authorised_vehicles": ["veh-0012"]}}))
    for seconds in range(11):
        run.read("p", "shelf-b", seconds, -50)
    events, alerts = run.read("p", "side-door", 30, -60)
    assert events == [("departed", "p", "shelf-b", 30)]
    assert alerts == [("unaccompanied_motion", "raised", "p", 30), ("unauthorised_exit", "raised", "p", 30)]
    assert run.alerts[-1].alert_id == f"unauthorised_exit:p:{ms(30)}" and run.alerts[-1].severity == "critical"
    assert run.alerts[-1].details == {"from_zone": "shelf-b", "reader_id": "side-door", "zone_id": "side-door",
                                      "vehicle_id": None}
    assert run.states["p"].zones == () and run.states["p"].inside is False
    events, alerts = run.read("p", "car-park", 40, -60)  # from a boundary: no new unaccompanied motion
    assert events == [("arrived", "p", "car-park", 40)]
    assert alerts == [("unaccompanied_motion", "cleared", "p", 40)]
    assert run.alerts[-1].alert_id == f"unaccompanied_motion:p:{ms(30)}"
    events, alerts = run.read("p", "shelf-b", 100, -50)
    assert events == [("departed", "p", "car-park", 100), ("arrived", "p", "shelf-b", 100)]
    assert alerts == [("unauthorised_exit", "cleared", "p", 100)] and run.states["p"].alerts == {}


def test_an_outside_reader_is_an_exit_too():
    run = Run(AssetRegistry.from_dict({"p": {"keep_inside": True}}))
    run.read("p", "side-door", 0, -50)  # first seen at a boundary: not inside, nothing to leave
    run.read("p", "shelf-b", 10, -50)
    assert run.read("p", "car-park", 20, -50)[1] == [("unaccompanied_motion", "raised", "p", 20),
                                                     ("unauthorised_exit", "raised", "p", 20)]


def test_unaccompanied_motion_is_raised_by_a_move_without_vehicle_and_cleared_by_the_next_move():
    assets = AssetRegistry.from_dict({"p": {}, "quiet": {"unaccompanied_motion": False}})
    run = Run(assets)
    for tag in ("p", "quiet"):
        run.read(tag, "shelf-a", 0, -50)
        assert run.read(tag, "shelf-b", 20, -50)[0] == [("departed", tag, "shelf-a", 20),
                                                        ("arrived", tag, "shelf-b", 20)]
    assert [al(a) for a in run.alerts] == [("unaccompanied_motion", "raised", "p", 20)]
    assert run.alerts[0].details == {"from_zone": "shelf-a", "from_reader": "shelf-a", "zone_id": "shelf-b",
                                     "reader_id": "shelf-b"}
    assert run.read("p", "forklift-3", 21, -30) == (
        [("departed", "p", "shelf-b", 21), ("loaded", "p", "fl-03", 21)],
        [("unaccompanied_motion", "cleared", "p", 21)])
    off = Run(config=AssetConfig(dedup_window_s=1, switch_after_s=5, unaccompanied_motion=False))
    off.read("p", "shelf-a", 0)
    assert off.read("p", "shelf-b", 20)[1] == []


def test_asset_missing_in_a_zone_that_expects_it():
    assets = AssetRegistry.from_dict({"p": {"missing_after_s": 60, "expected_zones": ["shelf-a"]},
                                      "q": {"missing_after_s": 60, "expected_zones": ["shelf-a"]}})
    run = Run(assets)
    run.read("p", "shelf-a", 0)
    run.read("p", "shelf-a", 1)
    run.read("q", "dock-door-1", 0)
    assert next_deadline(run.states["p"]) == ms(61) and next_deadline(run.states["q"]) is None
    assert run.tick(60.999) == ([], [])
    assert run.tick(100) == ([], [("asset_missing", "raised", "p", 61)])
    assert run.alerts[-1].details == {"zone_id": "shelf-a", "reader_id": "shelf-a", "last_seen_ms": ms(1),
                                      "missing_after_s": 60.0}
    assert run.tick(1000) == ([], [])  # raised once
    assert run.read("p", "shelf-a-rear", 120) == ([], [("asset_missing", "cleared", "p", 120)])
    assert run.alerts[-1].alert_id == run.alerts[-2].alert_id == f"asset_missing:p:{ms(61)}"
    assert next_deadline(run.states["p"]) == ms(180)


def test_asset_missing_defaults_to_any_storage_zone_and_never_on_a_vehicle():
    run = Run(config=AssetConfig(dedup_window_s=1, switch_after_s=5, missing_after_s=30))
    run.read("p", "dock-door-2", 0)
    run.read("t", "truck-12-bay", 0)
    run.read("g", "gate-1", 0)
    assert run.tick(40) == ([], [("asset_missing", "raised", "p", 30)])


def test_separation_while_the_vehicle_moves():
    vehicles = {"veh-0012": VehicleFix(53.4, -2.98, "moving")}
    run = Run(vehicles=vehicles)
    run.read("p", "truck-12-bay", 0, -40)
    run.read("p", "truck-12-bay", 10, -40)
    assert next_deadline(run.states["p"]) == ms(70)
    assert run.tick(69.999) == ([], [])
    assert run.tick(75) == ([], [("separation", "raised", "p", 70)])
    assert run.alerts[-1].details == {"vehicle_id": "veh-0012", "reader_id": "truck-12-bay", "last_read_ms": ms(10),
                                      "separation_after_s": 60.0}
    assert run.read("p", "truck-12-bay", 80, -40) == ([], [("separation", "cleared", "p", 80)])
    # a parked vehicle is checked again recheck_s after the check, and raises once it moves
    vehicles["veh-0012"] = VehicleFix(53.4, -2.98, "stopped")
    assert run.tick(145) == ([], [])
    assert next_deadline(run.states["p"]) == ms(175)
    vehicles["veh-0012"] = VehicleFix(53.4, -2.98, "moving")
    assert run.tick(176) == ([], [("separation", "raised", "p", 175)])
    # found elsewhere: cleared by the move
    assert run.read("p", "dock-door-1", 200, -60) == (
        [("unloaded", "p", "veh-0012", 200), ("arrived", "p", "dock-1", 200)],
        [("separation", "cleared", "p", 200)])


# --- state, outputs, configuration ------------------------------------------------------------------------------------

def test_outputs_match_their_schemas():
    run = warehouse_day(ticks=False)
    assert run.events and run.alerts
    for event in run.events:
        validate_output("asset_event", event.to_dict(format_ts))
    for alert in run.alerts:
        validate_output("alert", alert.to_dict(format_ts))
    assert run.events[0].to_dict(format_ts)["ts"] == "2026-11-25T10:00:01.000Z"


def test_state_round_trips_through_json():
    run = warehouse_day(ticks=False)
    for state in run.states.values():
        assert AssetState.from_dict(orjson.loads(orjson.dumps(state.to_dict()))) == state
    with pytest.raises(ValueError, match="unknown version"):
        AssetState.from_dict({**run.states["P1"].to_dict(), "v": 99})


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"dedup_window_s": -1}, "dedup_window_s must be a number >= 0"),
    ({"switch_margin_db": 0}, "switch_margin_db must be > 0"),
    ({"dedup_window_s": 3, "switch_after_s": 5}, "at least twice dedup_window_s"),
    ({"missing_after_s": -5}, "missing_after_s must be a number of seconds"),
    ({"severities": {"asset_missing": "panic"}}, "levels {'asset_missing': 'panic'}"),
    ({"severities": {"nope": "info"}}, "unknown rules ['nope']"),
    ({"recheck_s": 0}, "recheck_s must be > 0"),
])
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(AssetError) as raised:
        AssetConfig(**kwargs)
    assert message in str(raised.value)


@pytest.mark.parametrize(("data", "message"), [
    ({"p": {"keep_inside": "yes"}}, "asset 'p': keep_inside and unaccompanied_motion must be true or false"),
    ({"p": {"authorised_vehicles": "veh-1"}}, "asset 'p': authorised_vehicles must be a list of ids"),
    ({"p": {"expected_zones": [""]}}, "asset 'p': expected_zones must hold ids"),
    ({"p": {"missing_after_s": "10m"}}, "asset 'p': missing_after_s must be a number of seconds"),
    ({"p": {"colour": "red"}}, "asset 'p': unknown property 'colour'"),
    ({"p": {"tag_id": "q"}}, "asset 'p': tag_id 'q' differs from its key"),
    ({"p": []}, "asset 'p': expected an object of properties"),
    ([{"tag_id": "p"}, {"tag_id": "p"}], "asset 'p': defined twice"),
    ([{"keep_inside": True}], "every list item needs a tag_id"),
    ("p", "expected {tag_id: properties}"),
])
def test_bad_asset_metadata_is_refused(data, message):
    with pytest.raises(AssetError) as raised:
        AssetRegistry.from_dict(data)
    assert message in str(raised.value)


def test_asset_files(tmp_path):
    (tmp_path / "a.yaml").write_text("assets:\n  - {tag_id: p, keep_inside: true, authorised_vehicles: [v]}\n")
    profile = AssetRegistry.load(tmp_path / "a.yaml")["p"]
    assert profile.keep_inside and profile.authorised_vehicles == {"v"}
    assert AssetRegistry.from_dict(json.loads(json.dumps({"p": profile.to_dict()})))["p"] == profile
    (tmp_path / "a.json").write_text("{")
    with pytest.raises(AssetError, match=r"a\.json: not valid JSON"):
        AssetRegistry.load(tmp_path / "a.json")
    assert AssetRegistry().get("anything").keep_inside is False


# --- a warehouse day -----------------------------------------------------------------------------------------------

DOCK_2 = (53.40102, -2.98490)
PALLETS = {f"P{k}": {"keep_inside": True, "authorised_vehicles": ["veh-0012"], "missing_after_s": 600}
           for k in range(1, 6)}
DUPLICATES = ((0, 0.0), (20, 0.5), (40, -0.5))  # each read reported three times: ms later, rssi jitter


def every(tag: str, reader: str, start: float, end: float, rssi: float, period: float = 0.5,
          duplicates=DUPLICATES) -> list[tuple[int, int, object]]:
    """Reads of ``tag`` by ``reader`` every ``period`` s from ``start`` to before ``end``, each duplicated."""
    out = []
    for i in range(round((end - start) / period)):
        at = ms(start + i * period)
        out += [(at + delay, 1, RfidRead(tag, reader, at + delay, rssi + jitter)) for delay, jitter in duplicates]
    return out


def vehicle(seconds: float, lat: float, lon: float, motion: str, geofences: tuple[str, ...]) -> tuple:
    return ms(seconds), 0, ("veh-0012", VehicleFix(lat, lon, motion, geofences))


def warehouse_script() -> list[tuple]:
    """Pallets P1-P5 are delivered to dock 1 by an untracked truck (P_k first read at k s; dock door 2 next to
    it picks them up faintly now and then). Forklift 3 takes P1, P2 to shelf A and P3, P4 to shelf B (the
    forklift reads its load at -40 dBm; the dock and shelf readers keep reading a pallet for 2 s after pick-up).
    P5 is pushed out of every reader's range at 200 s and forgotten. Truck 12 parks at dock 2 (geofence depot)
    at 300 s; the forklift loads P1 (at 320 s) and P3 (at 360 s) into it. At 400 s someone carries P2 off shelf
    A; the side door reads it at 420 s. The truck leaves at 500 s, through the gate at 520 s, out of the depot
    geofence at 523 s. The day is looked at again at 900 s."""
    script = []
    for k, pickup, shelf, stay_until in ((1, 60, "shelf-a", 320), (2, 90, "shelf-a", 400.5),
                                         (3, 120, "shelf-b", 360), (4, 150, "shelf-b", 900)):
        tag = f"P{k}"
        script += every(tag, "dock-door-1", k, pickup + 2, -55)
        script += every(tag, "dock-door-2", k + 1, pickup, -68, period=2, duplicates=((0, 0.0),))
        script += every(tag, "forklift-3", pickup, pickup + 20, -40)
        script += every(tag, shelf, pickup + 20, stay_until + (2 if stay_until in (320, 360) else 0), -50)
    script += every("P5", "dock-door-1", 5, 200, -55)
    script += every("P5", "dock-door-2", 6, 199, -68, period=2, duplicates=((0, 0.0),))
    for tag, loaded in (("P1", 320), ("P3", 360)):
        script += every(tag, "forklift-3", loaded, loaded + 20, -40)
        script += every(tag, "truck-12-bay", loaded + 20, 900, -45)
        script += every(tag, "gate-1", 520, 523, -50)
    script += every("P2", "side-door", 420, 423, -45)
    script += [vehicle(300, *DOCK_2, "stopped", ("depot",)), vehicle(500, *DOCK_2, "moving", ("depot",)),
               vehicle(523, 53.40060, -2.98500, "moving", ()), vehicle(600, 53.3900, -2.9900, "moving", ())]
    return sorted(script, key=lambda item: (item[0], item[1]))  # a vehicle update before reads of the same time


def warehouse_day(ticks: bool, round_trip: bool = False) -> Run:
    """Plays the script; with ``ticks``, timers run every second (as a watermark: never ahead of the reads)."""
    run = Run(AssetRegistry.from_dict(PALLETS))
    next_tick = 1
    for at, _, item in warehouse_script():
        while ticks and ms(next_tick) <= at:
            run.tick(next_tick)
            next_tick += 1
        if isinstance(item, RfidRead):
            run.read(item.tag_id, item.reader_id, (item.ts_ms - T0) / 1000, item.rssi_dbm)
        else:
            run.vehicles[item[0]] = item[1]
        if round_trip:
            run.states = {tag: AssetState.from_dict(orjson.loads(orjson.dumps(state.to_dict())))
                          for tag, state in run.states.items()}
    run.tick(900)
    return run


EXPECTED_DAY_EVENTS = [
    ("arrived", "P1", "dock-1", 1),
    ("departed", "P1", "dock-1", 60), ("loaded", "P1", "fl-03", 60),
    # the forklift last reads P1 at 79.54 s; shelf A, weaker, takes it when the forklift has been silent 5 s
    ("unloaded", "P1", "fl-03", 84.54), ("arrived", "P1", "shelf-a", 84.54),
    ("departed", "P1", "shelf-a", 320), ("loaded", "P1", "fl-03", 320),
    ("unloaded", "P1", "fl-03", 344.54), ("loaded", "P1", "veh-0012", 344.54), ("arrived", "P1", "depot", 344.54),
    ("departed", "P1", "depot", 523),
    ("arrived", "P2", "dock-1", 2),
    ("departed", "P2", "dock-1", 90), ("loaded", "P2", "fl-03", 90),
    ("unloaded", "P2", "fl-03", 114.54), ("arrived", "P2", "shelf-a", 114.54),
    ("departed", "P2", "shelf-a", 420),
    ("arrived", "P3", "dock-1", 3),
    ("departed", "P3", "dock-1", 120), ("loaded", "P3", "fl-03", 120),
    ("unloaded", "P3", "fl-03", 144.54), ("arrived", "P3", "shelf-b", 144.54),
    ("departed", "P3", "shelf-b", 360), ("loaded", "P3", "fl-03", 360),
    ("unloaded", "P3", "fl-03", 384.54), ("loaded", "P3", "veh-0012", 384.54), ("arrived", "P3", "depot", 384.54),
    ("departed", "P3", "depot", 523),
    ("arrived", "P4", "dock-1", 4),
    ("departed", "P4", "dock-1", 150), ("loaded", "P4", "fl-03", 150),
    ("unloaded", "P4", "fl-03", 174.54), ("arrived", "P4", "shelf-b", 174.54),
    ("arrived", "P5", "dock-1", 5),
]
EXPECTED_DAY_ALERTS = [
    ("unaccompanied_motion", "raised", "P2", 420), ("unauthorised_exit", "raised", "P2", 420),
    # P5: last read at 199.54 s, missing_after_s 600
    ("asset_missing", "raised", "P5", 799.54),
]


@pytest.mark.parametrize(("ticks", "round_trip"), [(False, False), (True, False), (True, True)])
def test_a_warehouse_day(ticks, round_trip):
    run = warehouse_day(ticks, round_trip)
    events = sorted((ev(e) for e in run.events), key=lambda e: (e[1], e[3]))  # per tag, stable within a change
    assert events == EXPECTED_DAY_EVENTS
    assert [al(a) for a in run.alerts] == EXPECTED_DAY_ALERTS
    inventory = Inventory()
    inventory.apply(run.events)
    assert inventory.to_dict() == {
        "zones": {"dock-1": {"count": 1, "assets": ["P5"]}, "shelf-b": {"count": 1, "assets": ["P4"]}},
        "vehicles": {"veh-0012": {"count": 2, "assets": ["P1", "P3"]}},
    }
    assert inventory == Inventory.from_states(run.states.values())
    assert run.states["P1"].lat == 53.3900 and run.states["P2"].zones == () and not run.states["P2"].inside
    assert run.states["P1"].inside is False and run.states["P4"].inside is True


def test_inventory_queries_and_merge():
    first, second = Inventory(), Inventory()
    first.apply(warehouse_day(ticks=False).events)
    second.zones["dock-1"] = {"X"}
    first.merge(second)
    assert first.count("dock-1") == 2 and first.assets_in("dock-1") == ["P5", "X"] and first.count("nowhere") == 0
    assert first.on_vehicle("veh-0012") == ["P1", "P3"] and first.counts() == {"dock-1": 2, "shelf-b": 1}
    state = warehouse_day(ticks=False).states["P1"]
    first.remove(state)
    assert first.on_vehicle("veh-0012") == ["P3"]


# --- properties ---------------------------------------------------------------------------------------------------

FIXED = ["dock-door-1", "dock-door-2", "shelf-a"]


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(FIXED), st.integers(0, 1500),
                          st.one_of(st.none(), st.floats(-90, -30).map(lambda x: round(x, 1)))), min_size=1,
                max_size=80))
def test_dedup_matches_a_brute_force_window_scan(reads):
    """Per reader, the tag's sighting is the latest window of a scan that opens a window at a read not within
    dedup_window of the current window's first read: first read, latest read, strongest rssi."""
    state, t = None, T0
    seen: dict[str, list[tuple[int, float | None]]] = {}
    for reader, gap, rssi in reads:
        t += gap
        state, _, _ = step(state, RfidRead("p", reader, t, rssi), READERS, config=CFG)
        seen.setdefault(reader, []).append((t, rssi))
        for name, history in seen.items():
            start = history[0][0]
            window = []
            for at, value in history:
                if at >= start + CFG.dedup_ms:
                    start, window = at, []
                window.append((at, value))
            strongest = max((v for _, v in window if v is not None), default=None)
            expected = (start, window[-1][0], strongest)
            if name in state.sightings:
                assert state.sightings[name] == expected, name
            else:  # forgotten: only once nothing it could say matters any more
                assert history[-1][0] < state.clock_ms - CFG.switch_ms - CFG.dedup_ms
                assert history[-1][0] <= state.place_seen_ms


@PROPERTY
@given(st.lists(st.tuples(st.integers(200, 1500), st.lists(st.integers(0, 899), min_size=1, max_size=6),
                          st.lists(st.integers(0, 899), min_size=1, max_size=6)), min_size=1, max_size=40),
       st.floats(-70, -50), st.randoms(use_true_random=False))
def test_noise_from_two_neighbouring_readers_moves_nothing(rounds, base, rnd):
    """Both dock doors keep reading the tag (each at least once in every round of under a second), their rssi
    jittering within the margin: after the first arrival, no event and no alert, even once both fall silent."""
    jitter = CFG.switch_margin_db / 2 - 0.01
    reads, start = [], T0
    for gap, offsets_a, offsets_b in rounds:
        start += gap
        reads += [(start + o, "dock-door-1") for o in offsets_a] + [(start + o, "dock-door-2") for o in offsets_b]
    reads.sort()
    run = Run(AssetRegistry.from_dict({"p": {"keep_inside": True, "missing_after_s": 3600}}))
    for at, reader in reads:
        run.read("p", reader, (at - T0) / 1000, round(base + rnd.uniform(-jitter, jitter), 2))
    run.tick((reads[-1][0] - T0) / 1000 + 60)
    assert len(run.events) == 1 and run.events[0].type == "arrived" and not run.alerts


ALL = ["dock-door-1", "dock-door-2", "shelf-a", "shelf-a-rear", "shelf-b", "gate-1", "side-door", "car-park",
       "truck-12-bay", "forklift-3"]
mixed_reads = st.lists(st.tuples(st.sampled_from(["p", "q", "r"]), st.sampled_from(ALL), st.integers(0, 40_000),
                                 st.one_of(st.none(), st.integers(-90, -30).map(float)), st.booleans()),
                       min_size=1, max_size=60)
MIXED_ASSETS = AssetRegistry.from_dict({
    "p": {"keep_inside": True, "authorised_vehicles": ["veh-0012"], "missing_after_s": 30},
    "q": {"keep_inside": True, "separation_after_s": 20, "expected_zones": ["shelf-a", "dock-1"],
          "missing_after_s": 15},
})
MIXED_VEHICLES = {"veh-0012": VehicleFix(53.4, -2.98, "moving", ("depot",)),
                  "fl-03": VehicleFix(53.4, -2.98, "moving", ())}


def play(reads, *, ticks: bool = False, round_trip: bool = False) -> Run:
    """Mixed reads of three tags at every kind of reader; vehicles always moving (so that separation, the one
    check that looks at the present, does not depend on when it runs). Gaps up to 40 s cross every timeout."""
    run = Run(MIXED_ASSETS, vehicles=MIXED_VEHICLES)
    t = 0.0
    for tag, reader, gap, rssi, tick_before in reads:
        t += gap / 1000
        if ticks and tick_before:
            run.tick(t - 0.001)
        run.read(tag, reader, t, rssi)
        if round_trip:
            run.states[tag] = AssetState.from_dict(orjson.loads(orjson.dumps(run.states[tag].to_dict())))
    run.tick(t + 3600)
    return run


@PROPERTY
@given(mixed_reads)
def test_a_state_round_trip_at_any_point_changes_nothing(reads):
    plain, restored = play(reads), play(reads, round_trip=True)
    assert restored.events == plain.events and restored.alerts == plain.alerts
    assert restored.states == plain.states


def per_tag(outputs: list) -> dict[str, list]:
    tags: dict[str, list] = {}
    for output in outputs:
        tags.setdefault(getattr(output, "tag_id", None) or output.subject_id, []).append(output)
    return tags


@PROPERTY
@given(mixed_reads)
def test_outputs_do_not_depend_on_when_timers_run(reads):
    """Each tag's outputs, times and ids included (tags interleave differently: a timer fires between reads)."""
    plain, ticked = play(reads), play(reads, ticks=True)
    assert per_tag(ticked.events) == per_tag(plain.events)
    assert per_tag(ticked.alerts) == per_tag(plain.alerts)


@PROPERTY
@given(mixed_reads)
def test_inventory_from_events_equals_inventory_from_states(reads):
    run = play(reads)
    inventory = Inventory()
    inventory.apply(run.events)
    assert inventory == Inventory.from_states(run.states.values())
    # every raise is cleared at most once, by an alert with its id
    raised = {a.alert_id for a in run.alerts if a.state == "raised"}
    cleared = [a.alert_id for a in run.alerts if a.state == "cleared"]
    assert len(cleared) == len(set(cleared)) and set(cleared) <= raised
    for alert in run.alerts:
        validate_output("alert", alert.to_dict(format_ts))
    for event in run.events:
        validate_output("asset_event", event.to_dict(format_ts))
