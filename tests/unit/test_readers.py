"""Reader registry: definitions parsed into places and kinds, refusals that name the reader and the problem."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fleetstream.codecs import decode_reader
from fleetstream.domain.readers import BOUNDARY, OUTSIDE, STORAGE, VEHICLE, ReaderError, ReaderRegistry, parse_reader

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "readers.json"
DOCK = {"reader_id": "dock-door-1", "lat": 53.401, "lon": -2.985, "zone_id": "dock-1", "role": "dock"}


def test_the_example_registry_has_every_kind_of_reader():
    registry = ReaderRegistry.load(EXAMPLE)
    kinds = {reader_id: (reader.kind, reader.place) for reader_id, reader in registry.items()}
    assert kinds["dock-door-1"] == (STORAGE, "s:dock-1")
    assert kinds["gate-1"] == (BOUNDARY, "b:yard-gate")
    assert kinds["side-door"] == (BOUNDARY, "b:side-door")
    assert kinds["car-park"] == (OUTSIDE, "o:car-park")
    assert kinds["truck-12-bay"] == (VEHICLE, "v:veh-0012")
    # two antennas of one shelf are one place
    assert kinds["shelf-a"][1] == kinds["shelf-a-rear"][1] == "s:shelf-a"
    assert registry["truck-12-bay"].vehicle_id == "veh-0012" and registry["truck-12-bay"].zone_id is None


def test_defaults_and_places():
    assert parse_reader({"reader_id": "r1", "lat": 1, "lon": 2}).role == "area"
    zoneless = parse_reader({"reader_id": "r1", "lat": 1, "lon": 2})
    assert (zoneless.kind, zoneless.place, zoneless.lat) == (STORAGE, "s:r1", 1.0)
    mobile = parse_reader({"reader_id": "t", "lat": 1, "lon": 2, "vehicle_id": "v"})
    assert (mobile.role, mobile.kind, mobile.place) == ("vehicle", VEHICLE, "v:v")
    # a storage and a boundary reader naming the same zone are different places
    assert parse_reader({**DOCK, "reader_id": "x", "role": "gate"}).place != parse_reader(DOCK).place


def test_the_topic_decoder_output_parses_and_to_dict_round_trips():
    decoded = decode_reader(b"dock-door-3", json.dumps({"reader_id": "dock-door-3", "lat": 53.4, "lon": -2.9,
                                                        "zone_id": "dock-3"}).encode())
    assert isinstance(decoded, dict)
    reader = parse_reader(decoded, "dock-door-3")  # absent fields come as None
    assert (reader.zone_id, reader.vehicle_id, reader.role) == ("dock-3", None, "area")
    for doc in json.loads(EXAMPLE.read_text())["readers"]:
        reader = parse_reader(doc)
        assert parse_reader(reader.to_dict()) == reader


@pytest.mark.parametrize(("doc", "key", "message"), [
    ({**DOCK, "colour": "red"}, None, "reader 'dock-door-1': unknown field 'colour'"),
    ({**DOCK, "lat": 91}, None, "reader 'dock-door-1': lat 91 is outside [-90, 90]"),
    ({**DOCK, "lon": "x"}, None, "reader 'dock-door-1': lon must be a number"),
    ({**DOCK, "lat": True}, None, "reader 'dock-door-1': lat must be a number"),
    ({k: v for k, v in DOCK.items() if k != "lat"}, None, "reader 'dock-door-1': lat must be a number"),
    ({**DOCK, "role": "door"}, None, "reader 'dock-door-1': role 'door' is not one of"),
    ({**DOCK, "vehicle_id": "v1", "role": None}, None, "reader 'dock-door-1': a reader on vehicle 'v1' covers no"),
    ({**DOCK, "zone_id": None, "vehicle_id": "v1"}, None, "reader 'dock-door-1': a reader on vehicle 'v1' has no "
                                                           "fixed role ('dock')"),
    ({**DOCK, "role": "vehicle"}, None, "reader 'dock-door-1': role 'vehicle' needs a vehicle_id"),
    ({**DOCK, "zone_id": ""}, None, "reader 'dock-door-1': zone_id must be a string"),
    ({**DOCK, "name": 3}, None, "reader 'dock-door-1': name must be a string"),
    ({**DOCK, "reader_id": ""}, None, "reader_id must be a string of 1 to 128"),
    (DOCK, "dock-door-9", "reader 'dock-door-1': record key 'dock-door-9' differs"),
    ([DOCK], "k", "reader 'k': expected an object, got list"),
])
def test_bad_definitions_are_refused_naming_reader_and_problem(doc, key, message):
    with pytest.raises(ReaderError) as raised:
        parse_reader(doc, key)
    assert message in str(raised.value)


def test_registry_changes_return_a_new_registry():
    registry = ReaderRegistry.from_dicts([DOCK])
    moved = registry.apply("dock-door-1", {**DOCK, "zone_id": "dock-9"})
    assert registry["dock-door-1"].zone_id == "dock-1" and moved["dock-door-1"].zone_id == "dock-9"
    added = moved.apply("gate-1", {"reader_id": "gate-1", "lat": 1, "lon": 1, "role": "gate"})
    assert sorted(added) == ["dock-door-1", "gate-1"] and len(moved) == 1
    assert "dock-door-1" not in added.apply("dock-door-1", None) and added.get("nope") is None
    with pytest.raises(ReaderError, match="differs from reader_id"):
        registry.apply("other", DOCK)
    with pytest.raises(ReaderError, match="'dock-door-1': defined twice"):
        ReaderRegistry.from_dicts([DOCK, DOCK])


def test_files(tmp_path):
    (tmp_path / "r.yaml").write_text("readers:\n  - {reader_id: a, lat: 1, lon: 2, role: exit}\n")
    assert ReaderRegistry.load(tmp_path / "r.yaml")["a"].kind == BOUNDARY
    (tmp_path / "r.json").write_text(json.dumps([DOCK]))
    assert list(ReaderRegistry.load(tmp_path / "r.json")) == ["dock-door-1"]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ReaderError, match=r"bad\.json: not valid JSON"):
        ReaderRegistry.load(tmp_path / "bad.json")
    (tmp_path / "bad.yaml").write_text("readers: [")
    with pytest.raises(ReaderError, match=r"bad\.yaml: not valid YAML"):
        ReaderRegistry.load(tmp_path / "bad.yaml")
    (tmp_path / "obj.json").write_text(json.dumps({"dock": DOCK}))
    with pytest.raises(ReaderError, match="expected a list of readers"):
        ReaderRegistry.load(tmp_path / "obj.json")
