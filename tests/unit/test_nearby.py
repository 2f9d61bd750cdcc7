"""NearbyIndex against brute-force haversine over random devices: around the antimeridian, the poles and
pentagons, through the grid disk and through the scan; cell and bounding-box queries; merging workers' answers."""

from __future__ import annotations

import math
import random
from itertools import pairwise

import h3
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fleetstream.domain.geo import destination, haversine_m
from fleetstream.domain.nearby import NearbyIndex, circumradius_bound_m, descendant_reach_m, merge_nearby

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

CENTRES = st.one_of(
    st.tuples(st.floats(-85, 85), st.floats(-180, 180)),
    st.tuples(st.floats(-85, 85), st.sampled_from([179.999, -179.999, 180.0, -180.0])),  # antimeridian
    st.tuples(st.sampled_from([90.0, -90.0, 89.99, -89.97]), st.floats(-180, 180)),  # poles
    st.sampled_from([h3.cell_to_latlng(p) for p in h3.get_pentagons(7)]),  # pentagons
)


@st.composite
def scenes(draw):
    """Devices spread around a centre, a query point near it, and a radius."""
    lat, lon = draw(CENTRES)
    spread = draw(st.sampled_from([300.0, 3000.0, 30_000.0]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    n = draw(st.integers(0, 250))
    devices = {f"d{i:03d}": destination(lat, lon, rng.uniform(0, 360), spread * math.sqrt(rng.random()))
               for i in range(n)}
    q = destination(lat, lon, rng.uniform(0, 360), spread * rng.random())
    radius = draw(st.sampled_from([0.0, 50.0, 0.2, 0.5, 1.0, 2.0])) * spread
    return devices, q, radius


def brute(devices: dict[str, tuple[float, float]], q: tuple[float, float], radius: float,
          limit: int) -> list[tuple[str, float]]:
    found = sorted((haversine_m(*q, *p), d) for d, p in devices.items())
    return [(d, dist) for dist, d in found if dist <= radius][:limit]


def assume_no_near_ties(devices: dict[str, tuple[float, float]], q: tuple[float, float], radius: float) -> None:
    """numpy and math may differ in the last bits: keep away from distances that tie or sit on the radius."""
    distances = sorted(haversine_m(*q, *p) for p in devices.values())
    assume(all(abs(d - radius) > 1e-6 for d in distances))
    assume(all(b - a > 1e-6 for a, b in pairwise(distances)))


def build(devices: dict[str, tuple[float, float]], resolution: int = 8, force_disk: bool = False) -> NearbyIndex:
    index = NearbyIndex(resolution=resolution, cell_resolution=9)
    if force_disk:
        index.disk_cells_per_device = math.inf
    for device, (lat, lon) in devices.items():
        index.update(device, lat, lon, 1)
    return index


def same(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    assert [d for d, _ in got] == [d for d, _ in expected]
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert a == pytest.approx(b, abs=1e-6)


@FAST
@given(scenes(), st.integers(1, 40), st.sampled_from([6, 7, 8, 9]), st.booleans())
def test_nearby_matches_brute_force(scene, limit, resolution, force_disk):
    devices, q, radius = scene
    assume_no_near_ties(devices, q, radius)
    index = build(devices, resolution, force_disk)
    same(index.nearby(*q, radius, limit), brute(devices, q, radius, limit))


@settings(FAST, max_examples=60)
@given(CENTRES, st.integers(0, 2**32 - 1), st.integers(1, 30))
def test_dense_devices_use_the_small_disk_and_stay_exact(centre, seed, limit):
    """Many devices close by, a large radius: the limit nearest come from a small disk, verified."""
    rng = random.Random(seed)
    devices = {f"d{i:04d}": destination(*centre, rng.uniform(0, 360), 4000 * math.sqrt(rng.random()))
               for i in range(1500)}
    q = destination(*centre, rng.uniform(0, 360), 2000 * rng.random())
    assume_no_near_ties(devices, q, 50_000)
    index = build(devices, 9, force_disk=True)
    same(index.nearby(*q, 50_000, limit), brute(devices, q, 50_000, limit))


@FAST
@given(scenes(), st.integers(1, 10))
def test_the_disk_grows_until_it_is_shown_to_cover_the_radius(scene, limit):
    """Even from a first guess of a single cell, the verified coverage B(k) decides the disk."""
    devices, q, radius = scene
    assume_no_near_ties(devices, q, radius)
    index = build(devices, 8, force_disk=True)
    index._rings_estimate = lambda radius_m, advance: 0  # type: ignore[method-assign]
    same(index.nearby(*q, radius, limit), brute(devices, q, radius, limit))


@settings(FAST, max_examples=60)
@given(st.integers(0, 2**32 - 1), st.integers(1, 5))
def test_a_small_first_disk_is_only_trusted_when_verified(seed, limit):
    """A dense cluster elsewhere makes the mean density high, so the first disk around a sparse query point is
    tiny; it often holds `limit` devices while a nearer one sits just outside it."""
    rng = random.Random(seed)
    devices = {f"c{i:04d}": destination(10.0, 10.0, rng.uniform(0, 360), 300 * rng.random()) for i in range(3000)}
    q = (52.0, 5.0)
    devices |= {f"s{i:03d}": destination(*q, rng.uniform(0, 360), 2500 * math.sqrt(rng.random())) for i in range(40)}
    assume_no_near_ties(devices, q, 20_000)
    index = build(devices, 9, force_disk=True)
    same(index.nearby(*q, 20_000, limit), brute(devices, q, 20_000, limit))


@FAST
@given(st.floats(-90, 90), st.floats(-180, 180), st.integers(0, 9))
def test_a_point_is_within_reach_of_the_centre_of_its_fine_cells_ancestors(lat, lon, res):
    ancestor = h3.cell_to_parent(h3.latlng_to_cell(lat, lon, 9), res)
    assert haversine_m(lat, lon, *h3.cell_to_latlng(ancestor)) <= descendant_reach_m(res, 9)


def test_the_circumradius_bound_holds_for_every_cell_of_resolutions_0_to_2_and_for_samples():
    def circumradius(cell: str) -> float:
        lat, lon = h3.cell_to_latlng(cell)
        return max(haversine_m(lat, lon, a, b) for a, b in h3.cell_to_boundary(cell))

    for res in range(3):
        cells = [c for base in h3.get_res0_cells() for c in h3.cell_to_children(base, res)]
        assert max(map(circumradius, cells)) <= circumradius_bound_m(res)
    rng = random.Random(5)
    for res in (6, 8, 10, 12):
        sample = [h3.latlng_to_cell(rng.uniform(-90, 90), rng.uniform(-180, 180), res) for _ in range(2000)]
        sample += list(h3.get_pentagons(res))
        assert max(map(circumradius, sample)) <= circumradius_bound_m(res)


def test_updates_moves_and_removals():
    index = NearbyIndex()
    index.update("a", 52.0, 5.0, 1)
    index.update("b", 52.001, 5.0, 2)
    assert [d for d, _ in index.nearby(52.0, 5.0, 500, 10)] == ["a", "b"]
    index.update("a", 53.0, 5.0, 3)  # moved ~111 km: out of the old cell
    assert [d for d, _ in index.nearby(52.0, 5.0, 500, 10)] == ["b"]
    assert [d for d, _ in index.nearby(53.0, 5.0, 10, 10)] == ["a"]
    assert index.position("a") == (53.0, 5.0, 3)
    assert index.remove("a") and not index.remove("a") and "a" not in index and len(index) == 1
    assert index.nearby(53.0, 5.0, 10, 10) == []
    for i in range(3000):  # reuses the freed slot, grows the arrays
        index.update(f"x{i}", 10.0 + i * 1e-4, 20.0, i)
    assert len(index) == 3001 and index.position("x2999") == (10.0 + 2999e-4, 20.0, 2999)
    assert [d for d, _ in index.nearby(10.0, 20.0, 12, 5)] == ["x0", "x1"]
    assert len(index.nearby(0.0, 0.0, 2.1e7, 10_000)) == 3001  # half the Earth: everyone, by a scan


def test_equal_distances_are_ordered_by_id_so_workers_agree():
    index = NearbyIndex()
    for device in ("c", "a", "d", "b"):
        index.update(device, 10.0, 10.0)
    index.update("z", 10.0, 10.001)
    assert index.nearby(10.0, 10.0, 1000, 2) == [("a", 0.0), ("b", 0.0)]
    assert [d for d, _ in index.nearby(10.0, 10.0, 1000, 10)] == ["a", "b", "c", "d", "z"]


def test_bad_arguments_are_refused():
    index = NearbyIndex()
    with pytest.raises(ValueError, match="range"):
        index.update("a", 91.0, 0.0)
    with pytest.raises(ValueError, match="resolution 9"):
        index.update("a", 1.0, 1.0, cell=h3.latlng_to_cell(1.0, 1.0, 8))
    with pytest.raises(ValueError, match="radius"):
        index.nearby(0.0, 0.0, -1.0, 5)
    with pytest.raises(ValueError, match="radius"):
        index.nearby(0.0, 0.0, math.nan, 5)
    with pytest.raises(ValueError, match="box"):
        index.devices_in_bbox(10, 0, 5, 1)
    with pytest.raises(ValueError, match="H3"):
        index.devices_in_cell("not-a-cell")
    assert index.nearby(0.0, 0.0, 10.0, 0) == []


@FAST
@given(scenes(), st.integers(3, 12), st.data())
def test_devices_in_cell_matches_brute_force(scene, res, data):
    devices, q, _ = scene
    index = build(devices, 8)
    cell = data.draw(st.sampled_from([h3.latlng_to_cell(*q, res),
                                      *(h3.latlng_to_cell(*p, res) for p in list(devices.values())[:5])]))

    def inside(lat: float, lon: float) -> bool:
        if res <= 9:  # the parent rule, from the device's res-9 cell
            return h3.cell_to_parent(h3.latlng_to_cell(lat, lon, 9), res) == cell
        return h3.latlng_to_cell(lat, lon, res) == cell

    expected = sorted(d for d, p in devices.items() if inside(*p))
    assert index.devices_in_cell(cell) == expected
    if expected:
        assert index.devices_in_cell(cell, after=expected[0], limit=2) == expected[1:3]


@FAST
@given(scenes(), st.floats(-90, 90), st.floats(-90, 90), st.floats(-180, 180), st.floats(-180, 180))
def test_devices_in_bbox_matches_brute_force_across_the_antimeridian(scene, lat1, lat2, lon1, lon2):
    devices, _, _ = scene
    index = build(devices)
    south, north = min(lat1, lat2), max(lat1, lat2)

    def inside(lat: float, lon: float) -> bool:
        if not south <= lat <= north:
            return False
        return lon1 <= lon <= lon2 if lon1 <= lon2 else (lon >= lon1 or lon <= lon2)

    assert index.devices_in_bbox(south, lon1, north, lon2) == sorted(d for d, p in devices.items() if inside(*p))


def test_bbox_across_the_antimeridian_example():
    index = NearbyIndex()
    index.update("east", 0.0, 179.9)
    index.update("west", 0.0, -179.9)
    index.update("greenwich", 0.0, 0.0)
    assert index.devices_in_bbox(-1, 179, 1, -179) == ["east", "west"]
    assert index.devices_in_bbox(-1, -179, 1, 179) == ["greenwich"]


@FAST
@given(scenes(), st.integers(1, 30), st.integers(2, 4), st.integers(0, 2**32 - 1))
def test_merging_workers_answers_equals_one_index_of_everything(scene, limit, workers, seed):
    devices, q, radius = scene
    assume_no_near_ties(devices, q, radius)
    rng = random.Random(seed)
    parts: list[dict[str, tuple[float, float]]] = [{} for _ in range(workers)]
    for device, position in devices.items():
        parts[rng.randrange(workers)][device] = position
    merged = merge_nearby([build(p).nearby(*q, radius, limit) for p in parts], limit)
    same(merged, brute(devices, q, radius, limit))


def test_merge_keeps_a_device_listed_twice_once_at_its_smaller_distance():
    merged = merge_nearby([[("a", 5.0), ("b", 7.0)], [("c", 1.0), ("a", 9.0)], []], 10)
    assert merged == [("c", 1.0), ("a", 5.0), ("b", 7.0)]
    assert merge_nearby([[("b", 1.0)], [("a", 1.0)]], 1) == [("a", 1.0)]  # ties by id
