"""The OpenAPI description ships with the package and describes exactly the routes the worker serves."""

from __future__ import annotations

import yaml

from fleetstream.config import Settings
from fleetstream.domain.models import DeviceState
from fleetstream.streaming.api import OPENAPI_PATH, filter_devices
from fleetstream.streaming.app import create_app


def served_paths() -> set[str]:
    app = create_app(Settings.load(env={}))
    return {resource.canonical for resource in app.web.web_app.router.resources()}


def test_openapi_lists_every_served_path_and_nothing_else():
    spec = yaml.safe_load(OPENAPI_PATH.read_text())
    assert spec["openapi"].startswith("3.")
    assert set(spec["paths"]) == served_paths()


def test_the_description_is_valid_openapi():
    from openapi_spec_validator import validate

    validate(yaml.safe_load(OPENAPI_PATH.read_text()))


def test_every_operation_documents_its_path_parameters_and_responses():
    spec = yaml.safe_load(OPENAPI_PATH.read_text())
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            assert operation.get("responses"), (path, method)
            declared = {p["name"] for p in operation.get("parameters", []) if p.get("in") == "path"}
            expected = {part[1:-1] for part in path.split("/") if part.startswith("{")}
            assert declared == expected, (path, method)


def test_filter_devices_pages_by_id_and_filters_by_geofence_and_parent_cell():
    import h3

    states = [
        DeviceState(f"d{i}", 0, 52.0 + i * 0.01, 4.0, h3=h3.latlng_to_cell(52.0 + i * 0.01, 4.0, 9),
                    geofences=("depot",) if i % 2 else ())
        for i in range(10)
    ]
    in_depot = filter_devices(states, geofence="depot", cell=None, after=None, limit=100)
    assert [s.device_id for s in in_depot] == ["d1", "d3", "d5", "d7", "d9"]
    page = filter_devices(states, geofence=None, cell=None, after="d4", limit=3)
    assert [s.device_id for s in page] == ["d5", "d6", "d7"]
    parent = h3.cell_to_parent(states[0].h3, 6)
    in_cell = filter_devices(states, geofence=None, cell=parent, after=None, limit=100)
    assert {s.device_id for s in in_cell} == {
        s.device_id for s in states if h3.cell_to_parent(s.h3, 6) == parent
    } and in_cell


def test_device_view_of_a_moving_device_shows_its_open_trip_and_matches_the_schema():
    import jsonschema

    from fleetstream.domain.geo import haversine_m
    from fleetstream.domain.models import Position
    from fleetstream.domain.tracking import TrackingConfig, step_position
    from fleetstream.streaming.api import device_view

    config = TrackingConfig()
    state, start = None, 1_790_000_000_000
    points = [(52.0 + k * 0.0007, 4.0) for k in range(60)]  # ~78 m every 5 s: ~56 km/h north
    for k, (lat, lon) in enumerate(points):
        state, _ = step_position(state, Position("van-1", start + k * 5_000, lat, lon), config, start + k * 5_000)
    view = device_view(state)
    trip = view["trip"]
    assert trip is not None and state.trip is not None
    first = next(k for k, p in enumerate(points) if (p[0], p[1]) == (state.trip.lat, state.trip.lon))
    travelled = sum(haversine_m(*a, *b) for a, b in zip(points[first:], points[first + 1:], strict=False))
    assert abs(trip["distance_m"] - travelled) < 0.1
    assert trip["duration_s"] == (len(points) - 1 - first) * 5
    spec = yaml.safe_load(OPENAPI_PATH.read_text())
    schema = {**spec["components"]["schemas"]["Device"], "components": spec["components"]}
    jsonschema.validate(view, schema)
    parked = device_view(state._replace(trip=None))
    assert parked["trip"] is None
    jsonschema.validate(parked, schema)
