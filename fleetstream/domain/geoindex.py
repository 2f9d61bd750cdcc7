"""GeofenceIndex: which geofences contain each of many points, answered in vectorized steps.

Two phases, as in tile38: a broad phase over an H3 cover of every geofence, then an exact test only where the
broad phase cannot decide.

- Each geofence is covered with H3 cells at a resolution chosen from its size (about a few dozen cells). Cells
  wholly inside the geofence are *interior*: a point in one is inside, no geometry needed. The rest are
  *boundary* cells: a point in one gets the exact test. H3 edges are great-circle arcs while polygon edges are
  straight in lon/lat (RFC 7946), so a cell counts as interior only if its hexagon, grown by a margin larger
  than the arc-versus-chord gap, is inside the polygon; for circles and corridors every vertex must be inside
  by the cell's circumradius plus 1 m (every point of a cell is that close to a vertex).
- Points arrive as H3 cells at LOOKUP_RESOLUTION (11); the cell of every coarser resolution is derived with
  bit operations on the 64-bit index (the parent keeps the leading digits), vectorized with numpy, and looked
  up with ``searchsorted`` in per-resolution sorted arrays. H3's hierarchy is not exact: the descendants of a
  cell stick out of its hexagon by up to about the size of its children (a point's derived coarse cell can be
  a neighbour of the cell containing it). So interior cells get that much more margin, and the ring of
  neighbours around the boundary cells catches derived cells just outside the overlap cover.
- Exact tests: ``shapely.intersects_xy`` over prepared polygons (covers semantics: the boundary is inside),
  haversine for circles, spherical cross-track distance for corridors.

The index is immutable: ``with_changes`` builds a new one (reusing the covers of unchanged geofences) for the
worker to swap in whole.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import h3
import numpy as np
import shapely
import shapely.ops
from shapely.geometry import Polygon

from fleetstream.domain.geo import EARTH_RADIUS_M, destination
from fleetstream.domain.geofences import Geofence, GeofenceKind

MIN_RESOLUTION = 2
MAX_RESOLUTION = 11
LOOKUP_RESOLUTION = MAX_RESOLUTION  # points are looked up by their cell at this resolution, and its parents
CELLS_ACROSS = 6  # aim for cells about 1/6 of the geofence's extent (finer: more interior hits, slower builds)
M_PER_DEG = 111_320.0
_RES_SHIFT = np.uint64(52)
_RES_MASK = np.uint64(0xF) << _RES_SHIFT
_latlng_to_cell_int = h3.api.basic_int.latlng_to_cell


@dataclass(frozen=True, slots=True)
class FenceCover:
    resolution: int
    interior: np.ndarray  # uint64 cells wholly inside
    boundary: np.ndarray  # uint64 cells that need the exact test


def parent_cells(cells: np.ndarray, resolution: int) -> np.ndarray:
    """Vectorized ``h3.cell_to_parent`` for cells at a finer resolution: set the resolution field and mark the
    digits below it unused (all ones), as the H3 index layout defines."""
    unused = np.uint64((1 << (3 * (15 - resolution))) - 1)
    return (cells & ~_RES_MASK) | (np.uint64(resolution) << _RES_SHIFT) | unused


def choose_resolution(fence: Geofence) -> int:
    min_x, min_y, max_x, max_y = _candidate_polygon(fence).bounds
    mid_lat = math.radians((min_y + max_y) / 2)
    extent_m = max((max_y - min_y) * M_PER_DEG, (max_x - min_x) * M_PER_DEG * math.cos(mid_lat), 1.0)
    target_edge_m = extent_m / CELLS_ACROSS
    for res in range(MIN_RESOLUTION, MAX_RESOLUTION + 1):
        if h3.average_hexagon_edge_length(res, "m") <= target_edge_m:
            return res
    return MAX_RESOLUTION


def _candidate_polygon(fence: Geofence) -> Polygon:
    """A lon/lat polygon containing every point of the geofence (the shape itself, for polygons)."""
    if fence.kind is GeofenceKind.POLYGON:
        return fence.geometry  # type: ignore[return-value]
    if fence.kind is GeofenceKind.CIRCLE:
        lat, lon = fence.geometry.y, fence.geometry.x  # type: ignore[union-attr]
        n = 48
        reach = fence.radius_m / math.cos(math.pi / n) * 1.01 + 1.0  # chords stay outside the circle
        ring = [destination(lat, lon, 360.0 * i / n, reach) for i in range(n)]
        return Polygon([(p[1], p[0]) for p in ring])
    max_lat = max(abs(y) for _, y in fence.geometry.coords)  # type: ignore[union-attr]
    degrees = fence.radius_m * 1.02 / (M_PER_DEG * math.cos(math.radians(min(max_lat + 1, 89.0)))) + 1e-7
    return fence.geometry.buffer(degrees, quad_segs=8)


def cover_fence(fence: Geofence) -> FenceCover:
    """The H3 cells covering a geofence, split into interior and boundary cells."""
    res = choose_resolution(fence)
    candidate = _candidate_polygon(fence)
    shape = h3.geo_to_h3shape(shapely.geometry.mapping(candidate))
    cells = set(h3.h3shape_to_cells_experimental(shape, res, contain="overlap"))
    if not cells:  # smaller than a cell: the cell of its centre
        point = candidate.representative_point()
        cells = {h3.latlng_to_cell(point.y, point.x, res)}
    interior = _interior_cells(fence, sorted(cells), res)
    # Insurance against the geodesic/planar difference at the edge: the ring around the non-interior cells is
    # tested too (cells outside simply fail the exact test).
    edge = cells - interior
    for cell in list(edge):
        edge.update(h3.grid_disk(cell, 1))
    edge -= interior
    return FenceCover(
        res,
        np.array(sorted(h3.str_to_int(c) for c in interior), dtype=np.uint64),
        np.array(sorted(h3.str_to_int(c) for c in edge), dtype=np.uint64),
    )


def _hierarchy_slack_m(res: int) -> float:
    """How far the LOOKUP_RESOLUTION descendants of a res ``res`` cell may reach beyond its hexagon."""
    return 0.0 if res >= LOOKUP_RESOLUTION else 2.0 * h3.average_hexagon_edge_length(res + 1, "m")


def _interior_cells(fence: Geofence, cells: list[str], res: int) -> set[str]:
    if not cells:
        return set()
    slack_m = _hierarchy_slack_m(res)
    boundaries = [h3.cell_to_boundary(c) for c in cells]  # (lat, lon) vertices
    hexes = [i for i, b in enumerate(boundaries) if len(b) == 6]  # the rare pentagons stay boundary cells
    if not hexes:
        return set()
    verts = np.array([boundaries[i] for i in hexes], dtype=np.float64)  # (n, 6, 2) lat, lon
    cells = [cells[i] for i in hexes]
    if fence.kind is not GeofenceKind.POLYGON:
        # Every point of a cell is within its circumradius of a vertex: inside if each vertex is that much
        # (plus 1 m) inside the circle or corridor.
        reach = h3.average_hexagon_edge_length(res, "m") * 1.5 + 1.0 + slack_m
        if fence.kind is GeofenceKind.CIRCLE:
            lat0, lon0 = fence.geometry.y, fence.geometry.x  # type: ignore[union-attr]
            distance = _haversine_np(lat0, lon0, verts[..., 0], verts[..., 1])
        else:
            flat = corridor_distance_m(list(fence.geometry.coords), verts[..., 0].ravel(), verts[..., 1].ravel())
            distance = flat.reshape(verts.shape[:2])
        inside = (distance <= fence.radius_m - reach).all(axis=1)
        return {c for c, ok in zip(cells, inside, strict=True) if ok}
    edge_m = h3.average_hexagon_edge_length(res, "m")
    lat = np.abs(verts[:, 0, 0])
    # arc-vs-chord gap of an edge, grown for lon/lat distortion; at least 0.5 m; in degrees of longitude
    gap_m = np.maximum(0.5, 2.0 * edge_m * edge_m / EARTH_RADIUS_M * (1.0 + np.tan(np.radians(np.minimum(lat, 85.0)))))
    gap_m = gap_m + slack_m
    margins = gap_m / (M_PER_DEG * np.cos(np.radians(np.minimum(lat + 1.0, 89.0))))
    rings = np.concatenate([verts[:, :, ::-1], verts[:, :1, ::-1]], axis=1)  # (n, 7, 2) lon, lat, closed
    hexagons = shapely.polygons(rings)
    grown = shapely.buffer(hexagons, margins, quad_segs=1)
    shapely.prepare(fence.geometry)
    inside = shapely.contains(fence.geometry, grown)
    return {c for c, ok in zip(cells, inside, strict=True) if ok}


def _haversine_np(lat1: float | np.ndarray, lon1: float | np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    p1, p2 = np.radians(lat1), np.radians(lat2)
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(np.radians(lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.minimum(1.0, np.sqrt(a)))


def segment_distance_rad(p1: np.ndarray, l1: np.ndarray, p2: np.ndarray, l2: np.ndarray,
                         phi: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Angular distance from points (phi, lam) to great-circle segments (p1, l1)-(p2, l2), all in radians and
    broadcast together: the cross-track distance where the point projects inside the segment, else the nearer
    endpoint."""

    def angular(pa: np.ndarray, la: np.ndarray, pb: np.ndarray, lb: np.ndarray) -> np.ndarray:
        a = np.sin((pb - pa) / 2) ** 2 + np.cos(pa) * np.cos(pb) * np.sin((lb - la) / 2) ** 2
        return 2 * np.arcsin(np.minimum(1.0, np.sqrt(a)))

    def bearing(pa: np.ndarray, la: np.ndarray, pb: np.ndarray, lb: np.ndarray) -> np.ndarray:
        return np.arctan2(
            np.sin(lb - la) * np.cos(pb), np.cos(pa) * np.sin(pb) - np.sin(pa) * np.cos(pb) * np.cos(lb - la)
        )

    d12 = angular(p1, l1, p2, l2)
    d13 = angular(p1, l1, phi, lam)
    d23 = angular(p2, l2, phi, lam)
    delta = bearing(p1, l1, phi, lam) - bearing(p1, l1, p2, l2)
    cross = np.arcsin(np.clip(np.sin(d13) * np.sin(delta), -1.0, 1.0))
    along = np.arccos(np.clip(np.cos(d13) / np.maximum(np.cos(cross), 1e-15), -1.0, 1.0))
    on_segment = (np.cos(delta) > 0) & (along <= d12)
    return np.where(on_segment, np.abs(cross), np.minimum(d13, d23))


def corridor_distance_m(line_coords: Sequence[tuple[float, float]], lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
    """Great-circle distance (m) from each point to a polyline of (lon, lat) vertices."""
    coords = np.radians(np.asarray(line_coords, dtype=np.float64)[:, :2])
    phi = np.radians(np.asarray(lats, dtype=np.float64))[:, None]
    lam = np.radians(np.asarray(lons, dtype=np.float64))[:, None]
    distance = segment_distance_rad(coords[None, :-1, 1], coords[None, :-1, 0], coords[None, 1:, 1],
                                    coords[None, 1:, 0], phi, lam)
    return distance.min(axis=1) * EARTH_RADIUS_M


@dataclass(frozen=True, slots=True)
class _ResolutionTable:
    """Cells of one resolution, sorted, with CSR lists of interior and boundary fence numbers per cell."""

    resolution: int
    cells: np.ndarray
    interior_ptr: np.ndarray
    interior: np.ndarray
    boundary_ptr: np.ndarray
    boundary: np.ndarray


def _csr(cells: np.ndarray, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((values, keys))
    keys, values = keys[order], values[order]
    counts = np.zeros(len(cells), dtype=np.int64)
    if len(keys):
        np.add.at(counts, np.searchsorted(cells, keys), 1)
    ptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
    return ptr, values.astype(np.int32)


def _expand(ptr: np.ndarray, data: np.ndarray, rows: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each (point, row) pair, one (point, value) pair per value stored in that CSR row."""
    starts = ptr[rows]
    counts = ptr[rows + 1] - starts
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int32)
    offsets = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(total)
    return np.repeat(points, counts), data[offsets]


class GeofenceIndex:
    """Immutable index of geofences; ``lookup`` answers many points at once."""

    @classmethod
    def empty(cls) -> GeofenceIndex:
        return cls([], {})

    def __init__(self, fences: Sequence[Geofence], covers: dict[str, FenceCover]) -> None:
        self.fences: tuple[Geofence, ...] = tuple(sorted(fences, key=lambda f: f.id))
        self._number = {fence.id: i for i, fence in enumerate(self.fences)}
        self._covers = covers
        self.ids = np.array([f.id for f in self.fences], dtype=object)
        self._kinds = np.array([list(GeofenceKind).index(f.kind) for f in self.fences], dtype=np.int8)
        self._geoms = np.array([f.geometry for f in self.fences], dtype=object)
        polygons = self._geoms[self._kinds == 0] if len(self.fences) else self._geoms
        shapely.prepare(polygons)
        self._radius = np.array([f.radius_m for f in self.fences], dtype=np.float64)
        self._center = np.array(
            [(f.geometry.y, f.geometry.x) if f.kind is GeofenceKind.CIRCLE else (0.0, 0.0) for f in self.fences],
            dtype=np.float64,
        ).reshape(-1, 2)
        # every corridor's segments in one table (radians: lat1, lon1, lat2, lon2), CSR by fence number
        segments = [np.radians(np.asarray(f.geometry.coords, dtype=np.float64)[:, :2])
                    if f.kind is GeofenceKind.CORRIDOR else np.empty((1, 2)) for f in self.fences]
        counts = np.array([len(c) - 1 if len(c) > 1 else 0 for c in segments], dtype=np.int64)
        self._seg_ptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        self._segs = (np.concatenate([np.column_stack((c[:-1, 1], c[:-1, 0], c[1:, 1], c[1:, 0]))
                                      for c in segments if len(c) > 1]) if counts.sum() else np.empty((0, 4)))
        self._cross = [(f.id, _candidate_polygon(f)) for f in self.fences if f.settings.cross]
        self.has_cross = bool(self._cross)
        self._tables = self._build_tables()
        self.finest_resolution = LOOKUP_RESOLUTION

    @classmethod
    def build(cls, fences: Iterable[Geofence]) -> GeofenceIndex:
        fences = list(fences)
        return cls(fences, {f.id: cover_fence(f) for f in fences})

    def with_changes(self, upserts: Iterable[Geofence] = (), deletes: Iterable[str] = ()) -> GeofenceIndex:
        """A new index with geofences added, replaced or removed; unchanged geofences keep their covers."""
        fences = {f.id: f for f in self.fences}
        covers = dict(self._covers)
        for fence_id in deletes:
            fences.pop(fence_id, None)
            covers.pop(fence_id, None)
        for fence in upserts:
            old = fences.get(fence.id)
            if old is None or not old.same_shape(fence):
                covers[fence.id] = cover_fence(fence)
            fences[fence.id] = fence
        return GeofenceIndex(list(fences.values()), covers)

    def _build_tables(self) -> list[_ResolutionTable]:
        by_res: dict[int, list[tuple[int, FenceCover]]] = {}
        for number, fence in enumerate(self.fences):
            cover = self._covers[fence.id]
            by_res.setdefault(cover.resolution, []).append((number, cover))
        tables = []
        for res, items in sorted(by_res.items()):
            inner_keys = np.concatenate([c.interior for _, c in items]) if items else np.empty(0, np.uint64)
            inner_vals = np.concatenate([np.full(len(c.interior), n, np.int32) for n, c in items])
            edge_keys = np.concatenate([c.boundary for _, c in items])
            edge_vals = np.concatenate([np.full(len(c.boundary), n, np.int32) for n, c in items])
            cells = np.unique(np.concatenate([inner_keys, edge_keys]))
            interior_ptr, interior = _csr(cells, inner_keys, inner_vals)
            boundary_ptr, boundary = _csr(cells, edge_keys, edge_vals)
            tables.append(_ResolutionTable(res, cells, interior_ptr, interior, boundary_ptr, boundary))
        return tables

    def __len__(self) -> int:
        return len(self.fences)

    def get(self, fence_id: str) -> Geofence | None:
        number = self._number.get(fence_id)
        return None if number is None else self.fences[number]

    @property
    def resolutions(self) -> tuple[int, ...]:
        return tuple(t.resolution for t in self._tables)

    def cells_for(self, lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
        """The points' H3 cells (as uint64) at LOOKUP_RESOLUTION: what ``lookup`` takes."""
        res = self.finest_resolution
        return np.fromiter((_latlng_to_cell_int(a, o, res) for a, o in zip(lats, lons, strict=True)),
                           dtype=np.uint64, count=len(lats))

    def lookup(self, lats: np.ndarray, lons: np.ndarray, cells: np.ndarray | None = None) -> list[tuple[str, ...]]:
        """Sorted ids of the geofences covering each point. ``cells``: the points' cells at LOOKUP_RESOLUTION
        (uint64), when the caller has them already."""
        n = len(lats)
        if n == 0 or not self.fences:
            return [()] * n
        lats = np.asarray(lats, dtype=np.float64)
        lons = np.asarray(lons, dtype=np.float64)
        if cells is None:
            cells = self.cells_for(lats, lons)
        points = np.arange(n)
        hit_points, hit_fences = [], []
        for table in self._tables:
            keys = parent_cells(cells, table.resolution)
            pos = np.minimum(np.searchsorted(table.cells, keys), len(table.cells) - 1)
            found = table.cells[pos] == keys
            if not found.any():
                continue
            rows, where = pos[found], points[found]
            p, f = _expand(table.interior_ptr, table.interior, rows, where)
            hit_points.append(p)
            hit_fences.append(f)
            p, f = _expand(table.boundary_ptr, table.boundary, rows, where)
            if len(p):
                ok = self._exact(p, f, lats, lons)
                hit_points.append(p[ok])
                hit_fences.append(f[ok])
        return self._group(n, hit_points, hit_fences)

    def lookup_one(self, lat: float, lon: float) -> tuple[str, ...]:
        return self.lookup(np.array([lat]), np.array([lon]))[0]

    def _exact(self, points: np.ndarray, fences: np.ndarray, lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
        ok = np.zeros(len(points), dtype=bool)
        kinds = self._kinds[fences]
        poly = kinds == 0
        if poly.any():
            ok[poly] = shapely.intersects_xy(self._geoms[fences[poly]], lons[points[poly]], lats[points[poly]])
        circle = kinds == 1
        if circle.any():
            c = self._center[fences[circle]]
            d = _haversine_np(c[:, 0], c[:, 1], lats[points[circle]], lons[points[circle]])
            ok[circle] = d <= self._radius[fences[circle]]
        corridor = np.flatnonzero(kinds == 2)
        if len(corridor):  # all (pair, segment) combinations at once, then the minimum per pair
            pair, seg = _expand(self._seg_ptr, np.arange(len(self._segs)), fences[corridor], np.arange(len(corridor)))
            s = self._segs[seg]
            d = segment_distance_rad(s[:, 0], s[:, 1], s[:, 2], s[:, 3], np.radians(lats[points[corridor]][pair]),
                                     np.radians(lons[points[corridor]][pair]))
            starts = np.flatnonzero(np.diff(pair, prepend=-1))
            nearest = np.minimum.reduceat(d, starts) * EARTH_RADIUS_M
            ok[corridor[pair[starts]]] = nearest <= self._radius[fences[corridor[pair[starts]]]]
        return ok

    def _group(self, n: int, hit_points: list[np.ndarray], hit_fences: list[np.ndarray]) -> list[tuple[str, ...]]:
        result: list[tuple[str, ...]] = [()] * n
        if not hit_points:
            return result
        p = np.concatenate(hit_points)
        if not len(p):
            return result
        f = np.concatenate(hit_fences)
        order = np.lexsort((f, p))  # fence numbers follow sorted ids, so ids come out sorted
        p = p[order]
        names = self.ids[f[order]].tolist()
        starts = np.flatnonzero(np.diff(p, prepend=-1)).tolist()
        owners = p[starts].tolist()
        starts.append(len(names))
        for i, point in enumerate(owners):
            result[point] = tuple(names[starts[i] : starts[i + 1]])
        return result

    def distance_outside_m(self, fence_id: str, lat: float, lon: float) -> float:
        """Metres from a point outside the geofence to it (0 inside): for the exit buffer against GPS jitter."""
        fence = self.get(fence_id)
        if fence is None:
            return math.inf
        if fence.kind is GeofenceKind.CIRCLE:
            d = float(_haversine_np(fence.geometry.y, fence.geometry.x, np.array(lat), np.array(lon)))
            return max(0.0, d - fence.radius_m)
        if fence.kind is GeofenceKind.CORRIDOR:
            d = float(corridor_distance_m(list(fence.geometry.coords), np.array([lat]), np.array([lon]))[0])
            return max(0.0, d - fence.radius_m)
        if shapely.intersects_xy(fence.geometry, lon, lat):
            return 0.0
        # nearest boundary point in lon/lat, then the true distance to it
        nearest = shapely.ops.nearest_points(fence.geometry.boundary, shapely.Point(lon, lat))[0]
        return float(_haversine_np(lat, lon, np.array(nearest.y), np.array(nearest.x)))

    def fences_crossed(self, lat1: float, lon1: float, lat2: float, lon2: float) -> tuple[str, ...]:
        """Geofences with ``cross`` enabled whose area the straight segment between two fixes passes through
        (circles and corridors by their lon/lat outline, a few metres generous)."""
        if not self._cross:
            return ()
        segment = shapely.LineString([(lon1, lat1), (lon2, lat2)])
        return tuple(fence_id for fence_id, area in self._cross if area.intersects(segment))

    def memory_bytes(self) -> int:
        """Index memory: numpy arrays exactly, geometries estimated from their coordinates (16 B each plus
        ~200 B per geometry object), plus ~100 B per fence for records and the id map."""
        arrays = sum(
            a.nbytes for t in self._tables
            for a in (t.cells, t.interior_ptr, t.interior, t.boundary_ptr, t.boundary)
        )
        covers = sum(c.interior.nbytes + c.boundary.nbytes for c in self._covers.values())
        coords = int(shapely.get_num_coordinates(self._geoms).sum()) if len(self._geoms) else 0
        return arrays + covers + coords * 16 + len(self.fences) * 300
