"""GeofenceIndex against a brute-force reference: shapely covers for polygons, haversine for circles, a densely
sampled great circle for corridors. Points within 1 cm of a boundary are not judged."""

from __future__ import annotations

import gzip
import math

import h3
import numpy as np
import orjson
import pytest
import shapely
import shapely.ops
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from fleetstream.domain import geoindex
from fleetstream.domain.geo import bearing_deg, destination, haversine_m
from fleetstream.domain.geofences import (
    GeofenceError,
    GeofenceKind,
    geofence_to_feature,
    load_geofences,
    parse_geofence,
)
from fleetstream.domain.geoindex import GeofenceIndex, parent_cells

TOLERANCE_M = 0.01


def polygon_feature(fence_id, rings, **props):
    return {
        "type": "Feature",
        "id": fence_id,
        "geometry": {"type": "Polygon", "coordinates": rings},
        "properties": props,
    }


def star(lat, lon, radius_m, radii, rotation=0.0):
    """A star-shaped (possibly concave) ring: never self-intersecting."""
    n = len(radii)
    ring = []
    for k, r in enumerate(radii):
        p = destination(lat, lon, rotation + 360.0 * k / n, radius_m * r)
        ring.append([p[1], p[0]])
    ring.append(ring[0])
    return ring


def sampled_corridor_distance(coords, lat, lon, step_m=0.05):
    """Reference: the minimum haversine distance to points sampled every few cm along each great-circle segment
    (only near segments; the sampling error is below a millimetre at these distances)."""
    best = math.inf
    for (lon1, lat1), (lon2, lat2) in zip(coords, coords[1:], strict=False):
        length = haversine_m(lat1, lon1, lat2, lon2)
        # coarse pass to find the nearest stretch, then fine sampling around it
        n = max(2, int(length / 5.0))
        pts = [_interp(lat1, lon1, lat2, lon2, i / n) for i in range(n + 1)]
        d = [haversine_m(lat, lon, a, b) for a, b in pts]
        i = int(np.argmin(d))
        lo, hi = max(0, i - 1) / n, min(n, i + 1) / n
        m = max(2, int((hi - lo) * length / step_m))
        for j in range(m + 1):
            a, b = _interp(lat1, lon1, lat2, lon2, lo + (hi - lo) * j / m)
            best = min(best, haversine_m(lat, lon, a, b))
    return best


def _interp(lat1, lon1, lat2, lon2, f):
    """Point at fraction f along the great circle."""
    p1, l1, p2, l2 = map(math.radians, (lat1, lon1, lat2, lon2))
    d = 2 * math.asin(
        math.sqrt(math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin((l2 - l1) / 2) ** 2)
    )
    if d == 0:
        return lat1, lon1
    a = math.sin((1 - f) * d) / math.sin(d)
    b = math.sin(f * d) / math.sin(d)
    x = a * math.cos(p1) * math.cos(l1) + b * math.cos(p2) * math.cos(l2)
    y = a * math.cos(p1) * math.sin(l1) + b * math.cos(p2) * math.sin(l2)
    z = a * math.sin(p1) + b * math.sin(p2)
    return math.degrees(math.atan2(z, math.hypot(x, y))), math.degrees(math.atan2(y, x))


def reference(fences, lat, lon):
    """Sorted ids containing the point, or None when the point is within 1 cm of some boundary."""
    inside = []
    for fence in fences:
        if fence.kind is GeofenceKind.POLYGON:
            point = shapely.Point(lon, lat)
            if shapely.distance(fence.geometry.boundary, point) * 111_320 < 0.02:
                # near the edge in degrees: judge by metres to the boundary
                nearest = shapely.ops.nearest_points(fence.geometry.boundary, point)[0]
                if haversine_m(lat, lon, nearest.y, nearest.x) < TOLERANCE_M:
                    return None
            ok = fence.geometry.covers(point)
        elif fence.kind is GeofenceKind.CIRCLE:
            d = haversine_m(fence.geometry.y, fence.geometry.x, lat, lon)
            if abs(d - fence.radius_m) < TOLERANCE_M:
                return None
            ok = d <= fence.radius_m
        else:
            d = sampled_corridor_distance(list(fence.geometry.coords), lat, lon)
            if abs(d - fence.radius_m) < TOLERANCE_M * 2:
                return None
            ok = d <= fence.radius_m
        if ok:
            inside.append(fence.id)
    return tuple(sorted(inside))


@st.composite
def fence_sets(draw):
    lat0 = draw(st.floats(-75, 75))
    lon0 = draw(st.floats(-170, 170))
    fences = []
    for i in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["convex", "concave", "holes", "multi", "circle", "corridor"]))
        size_m = draw(st.floats(50, 200_000))
        lat, lon = destination(lat0, lon0, draw(st.floats(0, 360)), draw(st.floats(0, size_m)))
        fid = f"f{i}"
        if kind in ("convex", "concave"):
            n = draw(st.integers(3, 40))
            radii = [1.0] * n if kind == "convex" else draw(st.lists(st.floats(0.3, 1.0), min_size=n, max_size=n))
            feature = polygon_feature(fid, [star(lat, lon, size_m, radii, draw(st.floats(0, 90)))])
        elif kind == "holes":
            outer = star(lat, lon, size_m, [1.0] * 12)
            hole = star(lat, lon, size_m * 0.4, [1.0] * 7)[::-1]
            feature = polygon_feature(fid, [outer, hole])
        elif kind == "multi":
            a = star(lat, lon, size_m / 3, [1.0] * 8)
            blat, blon = destination(lat, lon, 90.0, size_m)
            b = star(blat, blon, size_m / 3, [0.6, 1.0] * 5)
            feature = {"type": "Feature", "id": fid, "geometry": {"type": "MultiPolygon", "coordinates": [[a], [b]]}}
        elif kind == "circle":
            feature = {
                "type": "Feature",
                "id": fid,
                "geometry": {"type": "Point", "coordinates": [lon, lat]},
                "properties": {"radius_m": size_m / 4},
            }
        else:
            length = min(size_m, 20_000)
            points = [(lat, lon)]
            for _ in range(draw(st.integers(1, 3))):
                points.append(destination(*points[-1], draw(st.floats(0, 360)), length / 2))
            feature = {
                "type": "Feature",
                "id": fid,
                "geometry": {"type": "LineString", "coordinates": [[p[1], p[0]] for p in points]},
                "properties": {"buffer_m": draw(st.floats(5, 500))},
            }
        try:
            fences.append(parse_geofence(feature))
        except GeofenceError:
            continue  # e.g. a multipolygon whose parts touch: not a valid fence, not what is tested here
    return fences, lat0, lon0


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target],
)  # shrinking these is slow
@given(fence_sets(), st.data())
def test_index_equals_brute_force(case, data):
    fences, lat0, lon0 = case
    if not fences:
        return
    index = GeofenceIndex.build(fences)
    lats, lons = [], []
    for _ in range(60):
        # random points near the fences and points right at their boundaries
        if data.draw(st.booleans()):
            fence = data.draw(st.sampled_from(fences))
            if fence.kind is GeofenceKind.CIRCLE:
                lat, lon = destination(fence.geometry.y, fence.geometry.x, data.draw(st.floats(0, 360)), fence.radius_m)
            elif fence.kind is GeofenceKind.CORRIDOR:  # on the corridor's edge: perpendicular to the line
                f = data.draw(st.floats(0.01, 0.98))
                a = shapely.line_interpolate_point(fence.geometry, f, normalized=True)
                b = shapely.line_interpolate_point(fence.geometry, f + 0.001, normalized=True)
                side = data.draw(st.sampled_from([90.0, -90.0]))
                lat, lon = destination(a.y, a.x, bearing_deg(a.y, a.x, b.y, b.x) + side, fence.radius_m)
            else:
                edge = fence.geometry.boundary if fence.kind is GeofenceKind.POLYGON else fence.geometry
                p = shapely.line_interpolate_point(edge, data.draw(st.floats(0, 1)), normalized=True)
                lat, lon = p.y, p.x
            # often very close to the boundary (centimetres to metres), sometimes well away from it
            offset_m = data.draw(st.one_of(st.floats(0, 2.0), st.floats(0, 2_000)))
            lat, lon = destination(lat, lon, data.draw(st.floats(0, 360)), offset_m)
        else:
            lat, lon = destination(lat0, lon0, data.draw(st.floats(0, 360)), data.draw(st.floats(0, 300_000)))
        lats.append(lat)
        lons.append(lon)
    got = index.lookup(np.array(lats), np.array(lons))
    for lat, lon, answer in zip(lats, lons, got, strict=True):
        expected = reference(fences, lat, lon)
        if expected is not None:
            assert answer == expected, (lat, lon)


def test_parent_cells_match_h3():
    rng = np.random.default_rng(3)
    lats, lons = rng.uniform(-80, 80, 500), rng.uniform(-180, 180, 500)
    cells = np.array(
        [h3.api.basic_int.latlng_to_cell(a, o, 12) for a, o in zip(lats, lons, strict=True)], dtype=np.uint64
    )
    for res in range(13):
        got = parent_cells(cells, res)
        assert [int(c) for c in got] == [h3.api.basic_int.cell_to_parent(int(c), res) for c in cells]


def test_with_changes_equals_a_fresh_build():
    a = parse_geofence(polygon_feature("a", [star(53.4, -2.98, 800, [1.0, 0.5] * 6)]))
    b = parse_geofence(
        {
            "type": "Feature",
            "id": "b",
            "geometry": {"type": "Point", "coordinates": [-2.975, 53.402]},
            "properties": {"radius_m": 500},
        }
    )
    moved = parse_geofence(polygon_feature("a", [star(53.403, -2.97, 600, [1.0] * 9)]))
    c = parse_geofence(polygon_feature("c", [star(53.41, -2.99, 300, [1.0] * 5)]))
    rng = np.random.default_rng(1)
    lats, lons = 53.4 + rng.uniform(-0.02, 0.02, 3000), -2.98 + rng.uniform(-0.03, 0.03, 3000)
    changed = GeofenceIndex.build([a, b]).with_changes([moved, c], ["b"])
    assert changed.lookup(lats, lons) == GeofenceIndex.build([moved, c]).lookup(lats, lons)
    assert [f.id for f in changed.fences] == ["a", "c"]


def test_interior_cells_are_used_and_memory_is_reported():
    fence = parse_geofence(polygon_feature("big", [star(53.4, -2.98, 5000, [1.0] * 30)]))
    index = GeofenceIndex.build([fence])
    cover = index.cover("big")
    assert len(cover.interior) > 0 and len(cover.boundary) > 0
    assert index.memory_bytes() > cover.interior.nbytes + cover.boundary.nbytes


def test_tsinghua_campus_against_brute_force_on_geolife(shared_data):
    feature = orjson.loads((shared_data / "geolife" / "tsinghua_wgs84.geojson").read_bytes())["features"][0]
    fence = parse_geofence({**feature, "id": "tsinghua"})
    index = GeofenceIndex.build([fence])
    with gzip.open(shared_data / "geolife" / "geolife_sample.txt.gz", "rt") as handle:
        next(handle)
        rows = [line.split(",") for line in handle]
    lats = np.array([float(r[0]) for r in rows])
    lons = np.array([float(r[1]) for r in rows])
    got = index.lookup(lats, lons)
    expected = shapely.intersects_xy(fence.geometry, lons, lats)
    assert [bool(g) for g in got] == expected.tolist()
    assert 0.3 < expected.mean() < 0.45  # about 37% of the sample's fixes are on campus (shared/data README)


@pytest.mark.parametrize(
    ("feature", "message"),
    [
        (polygon_feature("x", [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]), "Self-intersection"),
        (polygon_feature("x", [[[0, 0], [1, 0], [1, 1], [0, 1]]]), "not closed"),
        (polygon_feature("x", [[[0, 0], [1, 0], [0, 0]]]), "at least 4"),
        (polygon_feature("x", [[[0, 0], [200, 0], [1, 1], [0, 0]]]), "out of range"),
        (
            {"type": "Feature", "id": "x", "geometry": {"type": "Point", "coordinates": [0, 0]}, "properties": {}},
            "radius_m",
        ),
        (
            {
                "type": "Feature",
                "id": "x",
                "geometry": {"type": "Point", "coordinates": [0, 0]},
                "properties": {"radius_m": -5},
            },
            "positive",
        ),
        (
            {
                "type": "Feature",
                "id": "x",
                "geometry": {"type": "LineString", "coordinates": [[0, 0], [1, 1]]},
                "properties": {"buffer_m": 0},
            },
            "positive",
        ),
        ({"type": "Feature", "id": "x", "geometry": {"type": "GeometryCollection", "geometries": []}}, "unsupported"),
        (
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [0, 0]}, "properties": {"radius_m": 5}},
            "id",
        ),
        (polygon_feature("x", [[[0, 0], [1, 0], [1, 1], [0, 0]]], exit_buffer_m=-1), "exit_buffer_m"),
        (polygon_feature("x", [[[0, 0], [1, 0], [1, 1], [0, 0]]], cross="yes"), "cross"),
    ],
)
def test_bad_geofences_are_refused_with_the_problem_named(feature, message):
    with pytest.raises(GeofenceError, match=message):
        parse_geofence(feature)


def test_too_many_vertices_is_refused():
    with pytest.raises(GeofenceError, match="limit"):
        parse_geofence(polygon_feature("x", [star(10, 10, 1000, [1.0] * 50)]), max_vertices=20)


def test_round_trip_and_file_loading(tmp_path):
    fences = [
        parse_geofence(
            polygon_feature("a", [star(53.4, -2.98, 800, [1.0, 0.5] * 6)], name="A", tags=["depot"], dwell_s=60)
        ),
        parse_geofence(
            {
                "type": "Feature",
                "id": 7,
                "geometry": {"type": "Point", "coordinates": [1, 2]},
                "properties": {"radius_m": 50, "name": "seven"},
            }
        ),
    ]
    collection = {"type": "FeatureCollection", "features": [geofence_to_feature(f) for f in fences]}
    path = tmp_path / "fences.geojson"
    path.write_bytes(orjson.dumps(collection))
    loaded = load_geofences(path)
    assert [f.id for f in loaded] == ["a", "7"]
    assert all(x.same_shape(y) for x, y in zip(loaded, fences, strict=True))
    assert loaded[0].settings.dwell_s == 60 and loaded[0].tags == ("depot",)
    path.write_bytes(orjson.dumps({"type": "FeatureCollection", "features": collection["features"] * 2}))
    with pytest.raises(GeofenceError, match="twice"):
        load_geofences(path)


def test_a_point_whose_derived_coarse_cell_is_not_its_own():
    """Found by the property test: a point 0.75 m outside a ~200 km polygon was answered inside, because its
    res-4 cell derived from its fine cell (an interior cell) is a neighbour of the res-4 cell that contains it
    (H3 children stick out of their parent's hexagon)."""
    coordinates = (
        (
            (-116.71791413364645, 42.78379806470035),
            (-115.96428370313157, 42.6327879644482),
            (-115.42103903866212, 42.22207336243185),
            (-115.2333924488936, 41.66530239730365),
            (-115.44318767654687, 41.113305144185155),
            (-115.98644306749111, 40.71214263504333),
            (-116.71791413364645, 40.56591091796062),
            (-117.44938519980178, 40.71214263504333),
            (-117.99264059074602, 41.113305144185155),
            (-118.2024358183993, 41.66530239730365),
            (-118.01478922863072, 42.22207336243185),
            (-117.47154456416132, 42.6327879644482),
            (-116.71791413364645, 42.78379806470035),
        ),
        (
            (-116.71791413364645, 42.11843192067844),
            (-117.18422111489554, 41.9504804600566),
            (-117.29599744679348, 41.574699597675114),
            (-116.97399688590826, 41.274919808665544),
            (-116.46183138138463, 41.274919808665544),
            (-116.13983082049936, 41.574699597675114),
            (-116.2516071523973, 41.9504804600566),
            (-116.71791413364645, 42.11843192067844),
        ),
    )
    rings = [[list(position) for position in ring] for ring in coordinates]
    fence = parse_geofence({"type": "Feature", "id": "f2", "geometry": {"type": "Polygon", "coordinates": rings}})
    lat, lon = 41.528852621105955, -118.15058547366232
    assert not fence.geometry.covers(shapely.Point(lon, lat))
    small = parse_geofence({"type": "Feature", "id": "small", "properties": {"radius_m": 50},  # a fine cover too
                            "geometry": {"type": "Point", "coordinates": [-116.0, 41.0]}})
    assert GeofenceIndex.build([fence, small]).lookup_one(lat, lon) == ()


# The two facts about H3 regions (a res-r cell answers for its res-11 descendants) the cover relies on; see
# the geoindex module docstring.
@settings(max_examples=300, deadline=None)
@given(
    st.floats(-85, 85), st.floats(-180, 180), st.integers(0, 10), st.floats(0, 360), st.floats(0, 1),
)
def test_h3_region_facts_the_covers_rely_on(lat, lon, res, bearing, fraction):
    edge = h3.average_hexagon_edge_length(res, "m")
    fine = h3.api.basic_int.latlng_to_cell(lat, lon, geoindex.LOOKUP_RESOLUTION)
    derived = int(parent_cells(np.array([fine], dtype=np.uint64), res)[0])
    centre = h3.api.basic_int.cell_to_latlng(derived)
    assert haversine_m(lat, lon, *centre) <= geoindex.REACH * edge
    near = destination(lat, lon, bearing, fraction * geoindex.SAMPLE_STEP / 2 * edge)
    assert derived in h3.api.basic_int.grid_disk(h3.api.basic_int.latlng_to_cell(*near, res), 1)
    farther = destination(lat, lon, bearing, fraction * edge)
    assert derived in h3.api.basic_int.grid_disk(h3.api.basic_int.latlng_to_cell(*farther, res), geoindex.SEED_RING)


@settings(max_examples=100, deadline=None)
@given(st.floats(-85, 85), st.floats(-180, 180), st.integers(0, 10), st.booleans())
def test_children_and_pentagons_match_h3(lat, lon, res, pentagon):
    bi = h3.api.basic_int
    cell = bi.get_pentagons(res)[int(abs(lat)) % 12] if pentagon else bi.latlng_to_cell(lat, lon, res)
    cells = np.array([cell], dtype=np.uint64)
    assert bool(geoindex._is_pentagon(cells, np.array([res]))[0]) == bi.is_pentagon(cell)
    children, owner = geoindex._children(cells, np.array([res]))
    assert sorted(int(c) for c in children) == sorted(bi.cell_to_children(cell, res + 1))
    assert owner.tolist() == [0] * len(children)


def test_cells_for_matches_h3():
    rng = np.random.default_rng(4)
    lats, lons = rng.uniform(-85, 85, 300), rng.uniform(-180, 180, 300)
    got = GeofenceIndex.empty().cells_for(lats, lons)
    assert got.tolist() == [h3.api.basic_int.latlng_to_cell(a, o, 11) for a, o in zip(lats, lons, strict=True)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sets(st.integers(0, 11), max_size=6), min_size=1, max_size=40), min_size=1, max_size=4),
       st.integers(13, 60))
def test_answer_sets_equal_sorted_ids(batches, limit):
    """Against the obvious reference: each point's fence numbers as sorted ids. A small limit makes the set
    memory start over between batches. Pairs come in point order (as the lookup gives them), a point's fences in
    any order."""
    ids = np.array([f"id{i:02d}" for i in range(12)], dtype=object)
    answers = geoindex.AnswerSets(ids, limit=limit)
    rng = np.random.default_rng(len(batches))
    for batch in batches:
        pairs = [(p, f) for p, fences in enumerate(batch) for f in rng.permutation(sorted(fences)).tolist()]
        points = np.array([p for p, _ in pairs], dtype=np.int64)
        fences = np.array([f for _, f in pairs], dtype=np.int32)
        got = answers.tuples(len(batch), points, fences)
        assert got == [tuple(ids[sorted(fences)].tolist()) for fences in batch]


def test_answer_sets_learn_many_sets_at_once():
    """Batches that meet thousands of new sets (a cold start at 100,000 geofences), some several times in one
    batch: the set table grows past its first size and every point still gets its own sorted ids."""
    ids = np.array([f"f{i:05d}" for i in range(50_000)], dtype=object)
    answers = geoindex.AnswerSets(ids)
    rng = np.random.default_rng(5)
    seen = []
    for size in (3000, 1, 40_000, 300):
        batch = [sorted(set(rng.integers(0, 50_000, rng.integers(1, 5)).tolist())) for _ in range(size)]
        batch += batch[: size // 10]  # the same sets again, in the same batch
        pairs = [(p, f) for p, fences in enumerate(batch) for f in rng.permutation(fences).tolist()]
        points = np.array([p for p, _ in pairs], dtype=np.int64)
        fences = np.array([f for _, f in pairs], dtype=np.int64)
        expected = [tuple(ids[f].tolist()) for f in batch]
        assert answers.tuples(len(batch), points, fences) == expected
        seen.append((len(batch), points, fences, expected))
    learned = len(answers)
    assert learned > 50_000 + 30_000
    for n, points, fences, expected in seen:  # met again: found in the table (kept as it grew), none learned anew
        assert answers.tuples(n, points, fences) == expected
    assert len(answers) == learned


def test_covers_use_several_resolutions_and_interior_cells_carry_much_of_the_area():
    """A big polygon is answered for a good part by interior cells of more than one resolution (no geometry at
    lookup); interior and boundary cells together reach beyond the polygon."""
    fence = parse_geofence(polygon_feature("big", [star(53.4, -2.98, 5000, [1.0] * 30)]))
    cover = GeofenceIndex.build([fence]).cover("big")
    assert len(set(geoindex.cell_resolutions(cover.interior).tolist())) > 1

    def area(cells: np.ndarray) -> float:
        return sum(h3.cell_area(h3.int_to_str(int(c)), "m^2") for c in cells)

    polygon_m2 = shapely.area(fence.geometry) * 111_320**2 * math.cos(math.radians(53.4))
    assert area(cover.interior) > 0.4 * polygon_m2
    assert area(cover.interior) + area(cover.boundary) > polygon_m2


@settings(max_examples=60, deadline=None)
@given(st.floats(-80, 80), st.floats(-170, 170), st.floats(5, 20_000), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_lookup_circle_and_corridor_tests_equal_geodesic_distances(lat, lon, radius, legs, seed):
    """The lookup's trigonometry-free tests (chords, cross-track sines) against the great-circle distances the
    covers are built with, for points within 1 cm of the limit left out."""
    rng = np.random.default_rng(seed)
    points = [(lat, lon)]
    for _ in range(legs):
        points.append(destination(*points[-1], float(rng.uniform(0, 360)), float(rng.uniform(0, 4 * radius))))
    circle = parse_geofence({"type": "Feature", "id": "c", "geometry": {"type": "Point", "coordinates": [lon, lat]},
                             "properties": {"radius_m": radius}})
    corridor = parse_geofence({"type": "Feature", "id": "r", "properties": {"buffer_m": radius},
                               "geometry": {"type": "LineString", "coordinates": [[p[1], p[0]] for p in points]}})
    shapes = geoindex._Shapes([circle, corridor], exact=True)
    m = 4000
    fences = rng.integers(0, 2, m)
    bearing, distance = rng.uniform(0, 360, m), rng.uniform(0, 2.5, m) * radius
    anchor = [points[int(k)] for k in rng.integers(0, len(points), m)]
    lats, lons = np.array([destination(*a, b, d) for a, b, d in zip(anchor, bearing, distance, strict=True)]).T
    expected = shapes.distance_m(fences, lats, lons)
    judged = np.abs(expected - radius) > TOLERANCE_M
    got = shapes.within(fences, lats, lons)
    assert (got == (expected <= radius))[judged].all()
    assert 0.1 < got.mean() < 0.9


def test_sparse_coarse_resolution_pushed_down_keeps_every_answer(monkeypatch):
    """Coarse cells stored as their descendants at the next resolution present (forced here with a generous
    PUSH_DOWN) leave one resolution fewer to probe and every answer the same."""
    features = [polygon_feature("big", [star(52.0, 5.0, 20_000, [1.0, 0.7] * 15)])]
    for i in range(300):
        lat, lon = destination(52.0, 5.0, i * 37.0 % 360, 200.0 * i)
        features.append(polygon_feature(f"s{i}", [star(lat, lon, 300, [1.0, 0.6] * 8)]))
    fences = [parse_geofence(f) for f in features]
    monkeypatch.setattr(geoindex, "PUSH_DOWN", 0.0)
    plain = GeofenceIndex.build(fences)
    monkeypatch.setattr(geoindex, "PUSH_DOWN", 1000.0)
    pushed = GeofenceIndex.build(fences)
    assert len(pushed.resolutions) < len(plain.resolutions)
    assert pushed.resolutions[0] > plain.resolutions[0]
    rng = np.random.default_rng(7)
    lats, lons = 52.0 + rng.uniform(-0.2, 0.2, 20_000), 5.0 + rng.uniform(-0.3, 0.3, 20_000)
    got, expected = pushed.lookup(lats, lons), plain.lookup(lats, lons)
    assert got == expected
    assert sum(1 for a in got if "big" in a) > 1000


def test_table_entries_read_back_every_cover(monkeypatch):
    """The table keys cells by their GROUP_RESOLUTION ancestor (coarser cells by themselves) with a code for
    the descendant: ``cover`` decodes them back into exactly the cells built, at every resolution."""
    monkeypatch.setattr(geoindex, "PUSH_DOWN", 0.0)
    features = [polygon_feature("country", [star(52.0, 5.0, 150_000, [1.0, 0.8] * 10)]),
                polygon_feature("town", [star(52.1, 5.1, 3_000, [1.0, 0.6] * 12)]),
                polygon_feature("yard", [star(52.2, 4.9, 60, [1.0, 0.7] * 5)])]
    features += [polygon_feature(f"s{size}", [star(52.0, 5.2, size, [1.0, 0.6] * 9)]) for size in (200, 500, 1200)]
    fences = [parse_geofence(f) for f in features]
    index = GeofenceIndex.build(fences)
    resolutions = set()
    for fence, built in zip(fences, geoindex.cover_fences(fences), strict=True):
        read = index.cover(fence.id)
        assert np.array_equal(read.interior, np.sort(built.interior))
        assert np.array_equal(read.boundary, np.sort(built.boundary))
        resolutions |= set(geoindex.cell_resolutions(np.concatenate((read.interior, read.boundary))).tolist())
    group = geoindex.GROUP_RESOLUTION
    assert min(resolutions) < group and {group, group + 1, group + 2} <= resolutions


def test_build_in_chunks_on_threads_equals_one_serial_pass(monkeypatch):
    """Covers built a few geofences at a time on two threads, beside the exact-test structures, are the covers
    of one serial pass over all of them, and so are the answers (``with_changes`` included)."""
    rng = np.random.default_rng(11)
    features = []
    for i in range(23):
        lat, lon = 52.0 + rng.uniform(-0.05, 0.05), 5.0 + rng.uniform(-0.08, 0.08)
        if i % 3 == 0:
            features.append({"type": "Feature", "id": f"c{i}", "geometry": {"type": "Point", "coordinates": [lon, lat]},
                             "properties": {"radius_m": float(rng.uniform(100, 900))}})
        elif i % 7 == 1:
            features.append({"type": "Feature", "id": f"r{i}", "properties": {"buffer_m": 40},
                             "geometry": {"type": "LineString", "coordinates": [[lon, lat], [lon + 0.03, lat + 0.01]]}})
        else:
            features.append(polygon_feature(f"p{i}", [star(lat, lon, float(rng.uniform(200, 3000)),
                                                           rng.uniform(0.5, 1.0, 12).tolist())]))
    fences = [parse_geofence(f) for f in features]
    serial = GeofenceIndex.build(fences, threads=1)
    monkeypatch.setattr(geoindex, "BUILD_CHUNK", 4)
    threaded = GeofenceIndex.build(fences, threads=2)
    for fence in fences:
        a, b = serial.cover(fence.id), threaded.cover(fence.id)
        assert np.array_equal(a.interior, b.interior) and np.array_equal(a.boundary, b.boundary)
    lats, lons = 52.0 + rng.uniform(-0.07, 0.07, 20_000), 5.0 + rng.uniform(-0.1, 0.1, 20_000)
    expected = serial.lookup(lats, lons)
    assert threaded.lookup(lats, lons) == expected
    assert sum(1 for a in expected if len(a) > 1) > 100
    moved = parse_geofence(polygon_feature("p2", [star(52.01, 5.01, 700, [1.0] * 9)]))
    changed = threaded.with_changes([moved, *fences[10:19]], ["c0"])
    assert changed.lookup(lats, lons) == GeofenceIndex.build([moved, *fences[1:2], *fences[3:]], threads=1).lookup(
        lats, lons)
