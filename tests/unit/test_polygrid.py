"""The numpy building blocks of GeofenceIndex lookups against plain references: PolygonGrids against shapely's
``covers`` (points off the boundary), CellHash against a dict."""

from __future__ import annotations

import math

import numpy as np
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetstream.domain.cellhash import CellHash
from fleetstream.domain.polygrid import PolygonGrids

NEAR_DEG = 1e-10  # points this close to a boundary (about 10 micrometres) are not judged


def _star(cx: float, cy: float, size: float, radii: list[float], rotation: float) -> list[tuple[float, float]]:
    n = len(radii)
    return [(cx + size * r * math.cos(rotation + 2 * math.pi * k / n),
             cy + size * r * math.sin(rotation + 2 * math.pi * k / n)) for k, r in enumerate(radii)]


@st.composite
def polygons(draw: st.DrawFn) -> shapely.Geometry:
    cx, cy = draw(st.floats(-170, 170)), draw(st.floats(-80, 80))
    size = draw(st.floats(1e-4, 5.0))
    kind = draw(st.sampled_from(["star", "rect", "steps", "holes", "multi"]))
    if kind == "star":
        n = draw(st.integers(3, 60))
        radii = draw(st.lists(st.floats(0.2, 1.0), min_size=n, max_size=n))
        return shapely.Polygon(_star(cx, cy, size, radii, draw(st.floats(0, 6.3))))
    if kind == "rect":  # horizontal and vertical edges, vertices sharing coordinates
        return shapely.box(cx, cy, cx + size, cy + size * draw(st.floats(0.05, 3.0)))
    if kind == "steps":  # a staircase: many vertices on the same horizontal and vertical lines
        k = draw(st.integers(1, 12))
        step = size / k
        ring = [(cx, cy)]
        for i in range(k):
            ring += [(cx + (i + 1) * step, cy + i * step), (cx + (i + 1) * step, cy + (i + 1) * step)]
        ring += [(cx, cy + k * step)]
        return shapely.Polygon(ring)
    if kind == "holes":
        outer = _star(cx, cy, size, [1.0] * draw(st.integers(4, 30)), 0.1)
        hole = _star(cx, cy, size * 0.4, [1.0] * draw(st.integers(3, 12)), 0.3)
        return shapely.Polygon(outer, [hole])
    a = shapely.Polygon(_star(cx, cy, size / 3, [1.0] * 8, 0.0))
    b = shapely.Polygon(_star(cx + size, cy, size / 3, [0.6, 1.0] * 5, 0.2))
    return shapely.MultiPolygon([a, b])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(polygons(), min_size=1, max_size=5), st.integers(0, 2**32 - 1))
def test_polygon_grids_equal_shapely_covers(geoms, seed):
    """Random points over each polygon's box, points on the horizontal and vertical lines through its vertices
    (the crossing rule's degenerate cases), points just off its vertices, and points exactly on its boundary
    (vertices, axis-parallel edges: inside)."""
    geoms = [g for g in geoms if g.is_valid]
    if not geoms:
        return
    array = np.array(geoms, dtype=object)
    grids = PolygonGrids(array)
    rng = np.random.default_rng(seed)
    fences, xs, ys = [], [], []
    for number, geom in enumerate(geoms):
        x0, y0, x1, y1 = geom.bounds
        w, h = x1 - x0, y1 - y0
        vertices = shapely.get_coordinates(geom)
        m = 300
        px = rng.uniform(x0 - 0.1 * w, x1 + 0.1 * w, m)
        py = rng.uniform(y0 - 0.1 * h, y1 + 0.1 * h, m)
        pick = rng.integers(0, len(vertices), m)
        on_row, on_col, jitter = slice(0, 60), slice(60, 120), slice(120, 180)
        py[on_row] = vertices[pick[on_row], 1]
        px[on_col] = vertices[pick[on_col], 0]
        px[jitter] = vertices[pick[jitter], 0] + rng.normal(0, 1e-5 * (w + h), 60)
        py[jitter] = vertices[pick[jitter], 1] + rng.normal(0, 1e-5 * (w + h), 60)
        fences.append(np.full(m, number))
        xs.append(px)
        ys.append(py)
        # exactly on the boundary: vertices, and points of axis-parallel edges (covers: inside)
        a, b = vertices[:-1], vertices[1:]
        flat = np.flatnonzero((a[:, 0] == b[:, 0]) | (a[:, 1] == b[:, 1]))
        t = rng.uniform(0, 1, len(flat))
        on = np.where((a[flat, 0] == b[flat, 0])[:, None],
                      np.column_stack((a[flat, 0], a[flat, 1] + t * (b[flat, 1] - a[flat, 1]))),
                      np.column_stack((a[flat, 0] + t * (b[flat, 0] - a[flat, 0]), a[flat, 1])))
        on = np.concatenate((on, vertices[rng.integers(0, len(vertices), 20)]))
        fences.append(np.full(len(on), number))
        xs.append(on[:, 0])
        ys.append(on[:, 1])
    fences, xs, ys = np.concatenate(fences), np.concatenate(xs), np.concatenate(ys)
    order = rng.permutation(len(fences))  # pairs of several polygons, mixed
    fences, xs, ys = fences[order], xs[order], ys[order]
    got = grids.covers(fences, xs, ys)
    expected = shapely.intersects_xy(array[fences], xs, ys)
    distance = shapely.distance(shapely.boundary(array[fences]), shapely.points(xs, ys))
    judged = (distance > NEAR_DEG) | (distance == 0)
    assert judged.sum() > len(fences) // 3
    wrong = np.flatnonzero((got != expected) & judged)
    assert not len(wrong), [(int(fences[i]), xs[i], ys[i], bool(expected[i])) for i in wrong[:5]]


def test_polygon_grids_outside_the_grid_and_empty_input():
    grids = PolygonGrids(np.array([shapely.box(0, 0, 1, 1)], dtype=object))
    got = grids.covers(np.array([0, 0, 0]), np.array([-5.0, 0.5, 5.0]), np.array([0.5, 0.5, 0.5]))
    assert got.tolist() == [False, True, False]
    assert grids.covers(np.empty(0, np.int64), np.empty(0), np.empty(0)).tolist() == []


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3000), st.integers(0, 2**32 - 1))
def test_cell_hash_finds_rows_and_misses(n, seed):
    """Against a dict, with real-looking H3 cells (many sharing their leading bits) and absent ones."""
    rng = np.random.default_rng(seed)
    base = np.uint64(0x08B1_F000_0000_0000)
    cells = np.unique(base | rng.integers(1, 2**30, n, dtype=np.uint64))
    table, slot_of = CellHash.build(cells)
    where = {int(c): int(s) for c, s in zip(cells.tolist(), slot_of.tolist(), strict=True)}
    assert len(set(where.values())) == len(cells)
    assert all(int(table.keys[s]) == c for c, s in where.items())
    queries = np.concatenate((cells, base | rng.integers(1, 2**30, 2 * n + 5, dtype=np.uint64)))
    rng.shuffle(queries)
    assert table.find(queries).tolist() == [where.get(int(q), -1) for q in queries.tolist()]


def test_polygon_grids_of_no_polygons():
    grids = PolygonGrids(np.empty(0, dtype=object))
    assert grids.covers(np.empty(0, np.int64), np.empty(0), np.empty(0)).tolist() == []


def test_bucket_edges_as_runs_or_lists_give_the_same_answers():
    """A bucket whose edges are consecutive edges of one ring reads them straight from the vertex array; one
    whose ring passes twice (or closes in it) lists them. Both kinds occur, and answers equal shapely's."""
    rng = np.random.default_rng(3)
    spiky = shapely.Polygon(_star(0.0, 0.0, 1.0, list(rng.uniform(0.1, 1.0, 300)), 0.0))
    grids = PolygonGrids(np.array([spiky], dtype=object))
    count = (grids.words >> 2) & 0xFFFFF
    listed = (grids.words & 2) != 0
    assert (listed & (count > 0)).any() and (~listed & (count > 0)).any()
    assert len(grids.edges) == count[listed].sum()
    xs, ys = rng.uniform(-1, 1, 20_000), rng.uniform(-1, 1, 20_000)
    got = grids.covers(np.zeros(len(xs), np.int64), xs, ys)
    expected = shapely.intersects_xy(spiky, xs, ys)
    judged = shapely.distance(spiky.boundary, shapely.points(xs, ys)) > NEAR_DEG
    assert (got == expected)[judged].all()
