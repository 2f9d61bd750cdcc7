"""latlng_to_cells against h3-py's ``latlng_to_cell`` (the H3 C library), bit for bit: random points at every
resolution, and the places where rounding decides: pentagons, poles, the antimeridian, icosahedron face edges
and vertices, cell edges and vertices to the last ulp, and hypothesis' choice of floats."""

from __future__ import annotations

import itertools
import math

import h3
import numpy as np
import pytest
from h3.api.basic_int import is_pentagon, latlng_to_cell
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from fleetstream.domain._h3tables import FACE_CENTER_POINT
from fleetstream.domain.h3cells import _round7, latlng_to_cells

RESOLUTIONS = range(16)


def reference(lats, lons, res) -> np.ndarray:
    """h3-py, one call per point; ``res`` one int or one per point."""
    lats = np.asarray(lats, dtype=np.float64).tolist()
    lons = np.asarray(lons, dtype=np.float64).tolist()
    per_point = np.broadcast_to(np.asarray(res), (len(lats),)).tolist()
    return np.fromiter(map(latlng_to_cell, lats, lons, per_point), dtype=np.uint64, count=len(lats))


def assert_same(lats, lons, res) -> None:
    lats = np.asarray(lats, dtype=np.float64)
    lons = np.asarray(lons, dtype=np.float64)
    got = latlng_to_cells(lats, lons, res)
    want = reference(lats, lons, res)
    assert got.dtype == np.uint64
    bad = np.flatnonzero(got != want)
    shown = [
        f"lat={lats[k]!r} lon={lons[k]!r} res={np.broadcast_to(np.asarray(res), lats.shape)[k]}: "
        f"{int(got[k]):x} != h3 {int(want[k]):x}"
        for k in bad[:5]
    ]
    assert not len(bad), f"{len(bad)} of {len(lats)} differ, e.g.\n" + "\n".join(shown)


def assert_same_everywhere(lats, lons) -> None:
    for res in RESOLUTIONS:
        assert_same(lats, lons, res)


def to_latlng(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors to degrees."""
    return (
        np.degrees(np.arcsin(np.clip(points[:, 2], -1.0, 1.0))),
        np.degrees(np.arctan2(points[:, 1], points[:, 0])),
    )


def unit(lat_deg, lng_deg) -> np.ndarray:
    lat, lng = math.radians(lat_deg), math.radians(lng_deg)
    return np.array([math.cos(lat) * math.cos(lng), math.cos(lat) * math.sin(lng), math.sin(lat)])


def around(lats, lons, offsets, directions: int) -> tuple[np.ndarray, np.ndarray]:
    """Each point plus points at each offset (degrees) in ``directions`` evenly spread directions."""
    angle = np.linspace(0.0, 2 * np.pi, directions, endpoint=False)
    step = np.concatenate(([0.0], np.repeat(offsets, directions)))
    dlat = np.concatenate(([0.0], np.tile(np.sin(angle), len(offsets)))) * step
    dlon = np.concatenate(([0.0], np.tile(np.cos(angle), len(offsets)))) * step
    return (np.add.outer(lats, dlat).ravel(), np.add.outer(lons, dlon).ravel())


def ulps_around(lats, lons, steps) -> tuple[np.ndarray, np.ndarray]:
    """Each point moved by every combination of the given numbers of ulps in latitude and longitude."""
    lats, lons = np.asarray(lats, dtype=np.float64), np.asarray(lons, dtype=np.float64)
    grid = np.array(list(itertools.product(steps, steps)), dtype=np.float64)
    return (
        (lats[:, None] + np.spacing(lats)[:, None] * grid[:, 0]).ravel(),
        (lons[:, None] + np.spacing(lons)[:, None] * grid[:, 1]).ravel(),
    )


def test_h3_is_the_ported_version():
    # H3 4.5 computes faces and azimuths on unit vectors; h3 4.4 gives other cells for points within a few
    # ulps of a cell edge, so this module matches 4.5 and the tests below need it.
    assert tuple(int(p) for p in h3.__version__.split(".")[:2]) >= (4, 5), h3.__version__


def test_random_points_on_the_sphere_at_every_resolution():
    rng = np.random.default_rng(20240611)
    n = 300_000
    lats = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))  # uniform by area
    lons = rng.uniform(-180.0, 180.0, n)
    assert_same_everywhere(lats, lons)


def test_around_every_pentagon_at_every_resolution():
    centres = np.array([h3.cell_to_latlng(p) for res in RESOLUTIONS for p in h3.get_pentagons(res)])
    lats, lons = around(centres[:, 0], centres[:, 1], [1e-13, 1e-10, 1e-7, 1e-5, 1e-3, 0.1, 2.0], 16)
    assert_same_everywhere(lats, lons)
    for res in RESOLUTIONS:
        pentagons = [latlng_to_cell(*h3.cell_to_latlng(p), res) for p in h3.get_pentagons(res)]
        at_centres = latlng_to_cells(centres[12 * res : 12 * res + 12, 0], centres[12 * res : 12 * res + 12, 1], res)
        assert at_centres.tolist() == pentagons
        assert all(map(is_pentagon, pentagons))


def test_poles():
    rng = np.random.default_rng(7)
    lats = np.concatenate([
        np.repeat([90.0, -90.0], 25),
        rng.uniform(89.9, 90.0, 2000),
        rng.uniform(-90.0, -89.9, 2000),
        90.0 - 10.0 ** -rng.uniform(2, 15, 1000),
        -90.0 + 10.0 ** -rng.uniform(2, 15, 1000),
        np.nextafter([90.0, -90.0], 0.0),
    ])
    lons = np.concatenate([np.linspace(-540.0, 540.0, 50), rng.uniform(-180.0, 180.0, len(lats) - 50)])
    assert_same_everywhere(lats, lons)


def test_antimeridian_and_longitudes_outside_180():
    rng = np.random.default_rng(8)
    special = np.array([
        180.0, -180.0, 179.9999999, -179.9999999, np.nextafter(180.0, 0.0), np.nextafter(-180.0, 0.0),
        180.0000001, -180.0000001, 540.5, -190.0, 360.0, -360.0, 720.25, 1e6 + 0.3, -1e7, 1e15, 1e300, -1e300,
        5e-324, -0.0, 0.0,
    ])
    lats = np.concatenate([rng.uniform(-90.0, 90.0, 150), np.degrees(np.arcsin(rng.uniform(-1, 1, 150))),
                           [0.0, 45.0, -45.0, 89.99, -89.99]])
    assert_same_everywhere(np.repeat(lats, len(special)), np.tile(special, len(lats)))


def test_icosahedron_face_edges_and_vertices():
    """Great-circle arcs between adjacent icosahedron vertices (the res 0 pentagons) are where the closest
    face changes; the bisectors between adjacent face centres too. Vertices and face centres to the ulp."""
    rng = np.random.default_rng(9)
    vertices = np.array([unit(*h3.cell_to_latlng(p)) for p in h3.get_pentagons(0)])
    edges = [(a, b) for a, b in itertools.combinations(range(12), 2) if vertices[a] @ vertices[b] > 0.4]
    assert len(edges) == 30
    t = np.concatenate([np.linspace(0.0, 1.0, 301), rng.uniform(0.0, 1.0, 300)])[:, None]
    arcs = []
    for a, b in edges:
        omega = math.acos(vertices[a] @ vertices[b])
        arcs.append((np.sin((1 - t) * omega) * vertices[a] + np.sin(t * omega) * vertices[b]) / math.sin(omega))
    for f, g in itertools.combinations(range(20), 2):
        if FACE_CENTER_POINT[f] @ FACE_CENTER_POINT[g] < 0.7:  # adjacent faces only
            continue
        normal = FACE_CENTER_POINT[f] - FACE_CENTER_POINT[g]
        mid = FACE_CENTER_POINT[f] + FACE_CENTER_POINT[g]
        mid /= np.linalg.norm(mid)
        along = np.cross(normal / np.linalg.norm(normal), mid)
        s = np.linspace(-0.7, 0.7, 301)[:, None]
        arcs.append(np.cos(s) * mid + np.sin(s) * along)
    lats, lons = to_latlng(np.concatenate(arcs))
    assert_same_everywhere(lats, lons)

    corner_lats, corner_lons = to_latlng(np.concatenate([vertices, FACE_CENTER_POINT]))
    lats, lons = ulps_around(corner_lats, corner_lons, range(-4, 5))
    assert_same_everywhere(lats, lons)


@pytest.mark.parametrize("res", RESOLUTIONS)
def test_cell_vertices_and_edges(res):
    """Cell boundary vertices and edge midpoints, 1e-9° around them and a few ulps around them."""
    rng = np.random.default_rng(100 + res)
    points = []
    for lat, lon in zip(np.degrees(np.arcsin(rng.uniform(-1, 1, 60))), rng.uniform(-180, 180, 60), strict=True):
        boundary = h3.cell_to_boundary(h3.latlng_to_cell(lat, lon, res))
        points += boundary
        following = boundary[1:] + boundary[:1]
        points += [((p[0] + q[0]) / 2, (p[1] + q[1]) / 2) for p, q in zip(boundary, following, strict=True)]
    points = np.array(points)
    lats, lons = around(points[:, 0], points[:, 1], [1e-9], 8)
    assert_same(lats, lons, res)
    lats, lons = ulps_around(points[:, 0], points[:, 1], range(-2, 3))
    assert_same(lats, lons, res)


@settings(max_examples=400, deadline=None)
@given(
    lat=st.floats(-90.0, 90.0),
    lon=st.floats(allow_nan=False, allow_infinity=False),
    res=st.integers(0, 15),
)
def test_any_float_point_matches_h3(lat, lon, res):
    assert_same([lat], [lon], res)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-90.0, 90.0), st.floats(-1e4, 1e4), st.integers(0, 15)),
        max_size=50,
    )
)
def test_batches_with_per_point_resolutions_match_h3(points):
    lats = np.array([p[0] for p in points], dtype=np.float64)
    lons = np.array([p[1] for p in points], dtype=np.float64)
    res = np.array([p[2] for p in points], dtype=np.uint8)
    assert_same(lats, lons, res)


def test_latitudes_beyond_the_poles_as_h3():
    # outside the documented range, but finite: the C library takes them as they come (cos and sin of the
    # angle), and so does this
    assert_same_everywhere([90.0000001, -90.0000001, 91.0, 135.0, 180.0, -270.0, 1e10, -1e300],
                           [0.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0])


def test_per_point_resolutions_equal_the_single_resolution_results():
    rng = np.random.default_rng(11)
    n = 20_000
    lats = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    lons = rng.uniform(-180, 180, n)
    res = rng.integers(0, 16, n)
    expected = np.zeros(n, dtype=np.uint64)
    for r in RESOLUTIONS:
        expected[res == r] = latlng_to_cells(lats[res == r], lons[res == r], r)
    for dtype in (np.uint8, np.int8, np.int32, np.int64, np.uint64):
        np.testing.assert_array_equal(latlng_to_cells(lats, lons, res.astype(dtype)), expected)
    np.testing.assert_array_equal(latlng_to_cells(lats, lons, np.full(n, 9, np.uint8)), latlng_to_cells(lats, lons, 9))
    np.testing.assert_array_equal(latlng_to_cells(lats, lons, np.int64(9)), latlng_to_cells(lats, lons, 9))


def test_shapes_and_empty_input():
    for res in (0, 9, np.zeros(0, np.uint8)):
        out = latlng_to_cells(np.zeros(0), np.zeros(0), res)
        assert out.dtype == np.uint64
        assert out.shape == (0,)
    lats = np.array([[52.0, 52.1], [-33.9, 0.0]])
    lons = np.array([[4.9, 5.0], [18.4, 0.0]])
    out = latlng_to_cells(lats, lons, 9)
    assert out.shape == (2, 2)
    np.testing.assert_array_equal(out.ravel(), reference(lats.ravel(), lons.ravel(), 9))
    # lists and non-contiguous or float32 arrays are converted
    assert latlng_to_cells([52.0], [4.9], 9)[0] == latlng_to_cell(52.0, 4.9, 9)
    wide = np.array([[52.0, 0.0], [53.0, 0.0]])
    np.testing.assert_array_equal(latlng_to_cells(wide[:, 0], wide[:, 0] / 10, 5),
                                  reference(wide[:, 0], wide[:, 0] / 10, 5))
    np.testing.assert_array_equal(latlng_to_cells(np.float32([52.5]), np.float32([4.25]), 7),
                                  reference([52.5], [4.25], 7))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_coordinates_raise(bad):
    good = np.array([52.0, 52.1, 52.2])
    spoiled = good.copy()
    spoiled[1] = bad
    with pytest.raises(ValueError, match="non-finite"):
        latlng_to_cells(spoiled, good, 9)
    with pytest.raises(ValueError, match="non-finite"):
        latlng_to_cells(good, spoiled, np.full(3, 9, np.uint8))


@pytest.mark.parametrize("res", [16, -1, 255, 1 << 40])
def test_resolutions_outside_0_to_15_raise(res):
    lats, lons = np.array([52.0, 52.1]), np.array([4.9, 5.0])
    with pytest.raises(ValueError, match=r"outside 0\.\.15"):
        latlng_to_cells(lats, lons, res)
    with pytest.raises(ValueError, match=r"outside 0\.\.15"):
        latlng_to_cells(lats, lons, np.array([9, res], dtype=np.int64))
    with pytest.raises(ValueError, match=r"outside 0\.\.15"):  # also where there are no points
        latlng_to_cells(np.zeros(0), np.zeros(0), res)


def test_mismatched_inputs_raise():
    with pytest.raises(ValueError):
        latlng_to_cells(np.zeros(3), np.zeros(2), 9)
    with pytest.raises(ValueError):
        latlng_to_cells(np.zeros(3), np.zeros(3), np.zeros(2, np.uint8))
    with pytest.raises(TypeError):
        latlng_to_cells(np.zeros(3), np.zeros(3), np.zeros(3))


@njit(cache=False)
def _c_lround_mismatches(limit: int) -> int:
    """How many n in [-limit, limit] have _round7(n) != C's lround(n * M_ONESEVENTH) (halves away from zero)."""
    one_seventh = 0.14285714285714285714285714285714285
    bad = 0
    for n in range(-limit, limit + 1):
        x = n * one_seventh
        t = float(int(x))
        if x - t >= 0.5:
            t += 1.0
        elif x - t <= -0.5:
            t -= 1.0
        if _round7(n) != int(t):
            bad += 1
    return bad


def test_integer_rounding_equals_the_c_lround():
    # |n| stays under 2**25 at res 15; every n up to 2**26 is checked
    assert _c_lround_mismatches(1 << 26) == 0
