"""GeofenceIndex: which geofences contain each of many points, answered in vectorized steps.

Two phases, as in tile38: a broad phase over an H3 cover of every geofence, then an exact test only where the
broad phase cannot decide. Building runs as numpy / shapely / h3ronpy / h3cells calls over whole arrays (all
geofences at once), nothing looping per cell in Python; lookups run as a few compiled loops over the batch of
points (``kernels.lookup_pairs``, numba; the points' cells from ``h3cells``).

Regions. A point is looked up by its H3 cell at LOOKUP_RESOLUTION (11); its cell at a coarser resolution r is
*derived* from that one with bit operations (keep the leading digits). So the set of points a res-r cell C
answers for, its *region*, is the union of C's res-11 descendants, not C's hexagon: H3 children stick out of
their parent. Two facts about regions carry the design, both checked against H3 by tests/unit/test_geoindex.py:

- every point of region(C) lies within REACH x (average edge length at r) of C's centre (children sit sqrt(3/7)
  edges from the centre, so the overhang sums to about 1.05 edges, 1.14 measured with H3's cell-size spread);
- a point's derived res-r cell is in the grid disk of radius 1 around the true res-r cell of any point within
  a quarter edge of it, and in the disk of radius 2 around that of any point within one edge.

Covers, built for all geofences at once. Each geofence starts from the radius-2 disk around the cell of its
bounding-box centre at the finest resolution whose edge exceeds the box's half-diagonal (these regions cover it),
and is refined DEPTH levels: a cell is *interior* (kept, no geometry at lookup), *outside* (dropped) or *mixed*
(replaced by its 7 children; at the last level kept as a *boundary* cell that gets the exact test).

- Polygons: the boundary rings are sampled every half edge of the finest level and each sample's cell grown by
  one ring: this *band* holds every finest cell whose region touches the boundary. A cell none of whose
  finest descendants is in the band has its whole region on one side of the boundary, and its centre (which
  lies in its region) tells which: ``shapely.contains_xy``. So an interior cell is truly inside in lon/lat
  planar terms (RFC 7946), whatever the geodesic shape of its hexagon.
- Circles and corridors: by the geodesic distance d of the cell's centre: interior if d + reach <= radius,
  outside if d - reach > radius (reach = REACH x edge length).
- Corridors are refined further, until cells are narrower than their half-width.
- Pentagons are always mixed: they end as boundary cells, never interior or dropped.

The band is a few finest cells wide, so at DEPTH 3 an average geofence keeps a few dozen to a hundred cells;
jagged polygons (many short spikes) still leave a good share of their points to the exact test.

Lookup, per batch of points (cells at LOOKUP_RESOLUTION given or computed), compiled (``kernels``), in phases
over the batch so that the CPU keeps many cache misses in flight (the tables outgrow its caches):

- Table: an open-addressing hash table (``cellhash.CellHash``: splitmix64, linear probing, half full; one or
  two probes per key whatever the number of geofences, where a sorted array took ~20 cache-missing steps)
  keyed by *group*: a cover cell at GROUP_RESOLUTION (9) or finer is stored under its GROUP_RESOLUTION
  ancestor, a coarser one under itself. Each slot owns one list of entries (32 bits: the fence value, f for
  interior and ~f for boundary, and a code naming the key itself, its child or its grandchild:
  ``_entry_codes``). A point probes its group and each coarser resolution present, and keeps the entries
  with its own codes: one probe and one short contiguous list where three probes (resolutions 9, 10, 11) and
  their lists missed the caches separately (at 100,000 geofences the table is far larger than the caches,
  so each probe costs a DRAM access). The table shrinks too: one slot per group, 4 bytes per entry (the
  index of 100,000 geofences: 579 MB, 825 MB with a slot per cell). A sparse coarsest resolution is stored
  as its descendants (``_push_down``): one resolution fewer to probe.
- Exact test of boundary pairs, without GEOS: polygons by crossing numbers over per-polygon bucket grids
  (``polygrid.PolygonGrids``: each pair reads the few edges of its bucket and the bucket corner's precomputed
  status); circles by chord length between unit vectors, corridors by cross-track sines and end-point chords
  (monotonic in the great-circle distance, so the same answer as the geodesic distance the covers are built
  with, without trigonometry per pair). Covers semantics hold for every point farther than rounding (~1e-15
  degrees) from a polygon's boundary, and for points exactly on a vertex or an axis-parallel edge (inside).
- Answers: (point, fence number) pairs become tuples of ids only at the end (numpy): a point in exactly one
  geofence gets that fence's cached 1-tuple, a point in several the tuple cached for its set (``AnswerSets``).

Memory: each cover cell is stored once (a 4-byte entry; each group a hash slot of 2 x 16 B; ``with_changes``
and ``cover`` read covers back from the table, ``_entry_cells``); polygons add their vertices (16 B each) and
about two grid buckets per edge (8 B each).

The index is immutable: ``with_changes`` builds a new one (covering only new or reshaped geofences) for the
worker to swap in whole. Only the memory of answer tuples grows as lookups meet new sets of geofences (it is
used from one thread, the worker's event loop).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass

import arro3.core
import h3
import h3ronpy
import numpy as np
import shapely
import shapely.ops
from h3ronpy import vector as h3v
from shapely.geometry import Polygon

from fleetstream.domain.cellhash import CellHash
from fleetstream.domain.geo import EARTH_RADIUS_M, destination
from fleetstream.domain.geofences import Geofence, GeofenceKind
from fleetstream.domain.h3cells import latlng_to_cells
from fleetstream.domain.kernels import (
    ENTRY_CODE_SHIFT,
    ENTRY_VALUE_MASK,
    SINGLE,
    add_sets,
    find_sets,
    lookup_pairs,
    point_sets,
    within_many,
)
from fleetstream.domain.polygrid import PolygonGrids

LOOKUP_RESOLUTION = 11  # points are looked up by their cell at this resolution, and its parents
MAX_RESOLUTION = LOOKUP_RESOLUTION
GROUP_RESOLUTION = LOOKUP_RESOLUTION - 2  # table slots are keyed by a cell's ancestor here (see _entry_codes)
DEPTH = 3  # refinement levels below a geofence's start resolution (deeper: fewer exact tests, more cells)
REACH = 1.25  # every point of a res-r cell's region is within REACH * edge(r) of its centre (1.14 measured)
SAMPLE_STEP = 0.5  # polygon boundary samples every SAMPLE_STEP * edge(finest res) (a quarter edge to the nearest)
BAND_FINER = 0  # the band is found at this many resolutions below the finest level (tighter band)
SEED_RING = 2  # the start disk's radius (covers every region within one edge of the start point)
PUSH_DOWN = 0.05  # a sparse coarsest resolution is stored as its descendants if that grows the table <= 5%
BUILD_CHUNK = 2_500  # geofences covered together (vectorized; bounds the build's temporary memory)
BUILD_THREADS = 2  # chunks built side by side: numpy, shapely, h3ronpy and h3cells release the GIL
M_PER_DEG = 111_320.0  # metres per degree, at least as long as any degree of latitude or longitude
_EDGE_M = np.array([h3.average_hexagon_edge_length(r, "m") for r in range(16)])
_RES_SHIFT = np.uint64(52)
_RES_MASK = np.uint64(0xF) << _RES_SHIFT
_BASE_SHIFT = np.uint64(45)
_PENTAGON_BASES = np.array(sorted(h3.api.basic_int.get_base_cell_number(p) for p in h3.api.basic_int.get_pentagons(0)),
                           dtype=np.uint64)
_RES0_CELLS = np.array(sorted(h3.api.basic_int.get_res0_cells()), dtype=np.uint64)
_KINDS = (GeofenceKind.POLYGON, GeofenceKind.CIRCLE, GeofenceKind.CORRIDOR)  # kind numbers used in arrays
_U3, _U15, _U1 = np.uint64(3), np.uint64(15), np.uint64(1)


@dataclass(frozen=True, slots=True)
class FenceCover:
    """One geofence's cells (uint64, of several resolutions): interior ones answer alone, boundary ones need the
    exact test. ``resolution`` is the finest level."""

    resolution: int
    interior: np.ndarray
    boundary: np.ndarray


def parent_cells(cells: np.ndarray, resolution: int | np.ndarray) -> np.ndarray:
    """Vectorized ``h3.cell_to_parent`` for cells at a finer resolution: set the resolution field and mark the
    digits below it unused (all ones), as the H3 index layout defines. ``resolution`` broadcasts."""
    res = np.asarray(resolution, dtype=np.uint64)
    unused = (_U1 << (_U3 * (_U15 - res))) - _U1
    return (cells & ~_RES_MASK) | (res << _RES_SHIFT) | unused


def cell_resolutions(cells: np.ndarray) -> np.ndarray:
    return ((cells & _RES_MASK) >> _RES_SHIFT).astype(np.int64)


def _is_pentagon(cells: np.ndarray, res: np.ndarray) -> np.ndarray:
    """Pentagons are the cells of the 12 pentagon base cells whose digits are all 0."""
    r = res.astype(np.uint64)
    digits = (cells >> (_U3 * (_U15 - r))) & ((_U1 << (_U3 * r)) - _U1)
    return np.isin((cells >> _BASE_SHIFT) & np.uint64(0x7F), _PENTAGON_BASES) & (digits == 0)


def _children(cells: np.ndarray, res: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The children of every cell (res < 15), with the index of their parent; digit 1 does not exist below a
    pentagon. Bit operations only, so a child's region is exactly its share of the parent's."""
    shift = _U3 * (np.uint64(14) - res.astype(np.uint64))  # where the next digit goes
    first = ((cells & ~_RES_MASK) | ((res + 1).astype(np.uint64) << _RES_SHIFT)) & ~(np.uint64(7) << shift)
    digits = np.arange(7, dtype=np.uint64)
    kids = first[:, None] | (digits[None, :] << shift[:, None])
    keep = ~(_is_pentagon(cells, res)[:, None] & (digits[None, :] == _U1))
    owner = np.broadcast_to(np.arange(len(cells))[:, None], kids.shape)
    return kids[keep], owner[keep]


def _pack(fences: np.ndarray, cells: np.ndarray, res: np.ndarray) -> np.ndarray:
    """One sortable uint64 per (fence number, cell) when each fence's cells share a resolution <= 12: the fence
    number (< 2**21) above the base cell and digits (7 + 3 * res <= 43 bits)."""
    r = res.astype(np.uint64)
    digits = (cells >> (_U3 * (_U15 - r))) & ((_U1 << (np.uint64(7) + _U3 * r)) - _U1)
    return (fences.astype(np.uint64) << np.uint64(43)) | digits


def _centres(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not len(cells):
        return np.empty(0), np.empty(0)
    batch = h3v.cells_to_coordinates(cells)
    return np.asarray(batch.column("lat")), np.asarray(batch.column("lng"))


def _disks(cells: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``grid_disk(cell, k)`` of every cell, flattened, with the index of the cell each came from."""
    if not len(cells):
        return np.empty(0, np.uint64), np.empty(0, np.int64)
    disks = h3ronpy.grid_disk(cells, k, flatten=False)
    offsets = np.asarray(arro3.core.list_offsets(disks)).astype(np.int64)
    values = np.asarray(arro3.core.list_flatten(disks)).astype(np.uint64)
    return values, np.repeat(np.arange(len(cells)), np.diff(offsets))


def _unique_pairs(fences: np.ndarray, cells: np.ndarray, res: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (fence number, cell) pairs, sorted; ``res``: the resolution of each fence's cells."""
    if not len(cells):
        return fences, cells
    keys = _pack(fences, cells, res[fences])
    _, first = np.unique(keys, return_index=True)
    return fences[first], cells[first]


def _drop_repeats(fences: np.ndarray, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop pairs equal to the one before (samples along a ring fall in the same cell many times in a row)."""
    keep = np.ones(len(cells), dtype=bool)
    keep[1:] = (fences[1:] != fences[:-1]) | (cells[1:] != cells[:-1])
    return fences[keep], cells[keep]


def _haversine_np(lat1: float | np.ndarray, lon1: float | np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    p1, p2 = np.radians(lat1), np.radians(lat2)
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(np.radians(lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.minimum(1.0, np.sqrt(a)))


def _unit(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Unit vectors (n, 3) of points given in radians."""
    out = np.empty((len(lat), 3))
    c = np.cos(lat)
    out[:, 0] = c * np.cos(lon)
    out[:, 1] = c * np.sin(lon)
    out[:, 2] = np.sin(lat)
    return out


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


def _expand(ptr: np.ndarray, data: np.ndarray, rows: np.ndarray, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each (point, row) pair, one (point, value) pair per value stored in that CSR row."""
    starts = ptr[rows]
    counts = ptr[rows + 1] - starts
    total = int(counts.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=data.dtype)
    offsets = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(total)
    return np.repeat(points, counts), data[offsets]


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
    return fence.geometry.buffer(_corridor_degrees(fence.geometry, fence.radius_m), quad_segs=8)


def _corridor_degrees(line: shapely.LineString, radius_m: float) -> float:
    """A corridor's half-width in degrees, generous (longitude degrees shrink towards the poles)."""
    max_lat = max(abs(y) for _, y in line.coords)
    return radius_m * 1.02 / (M_PER_DEG * math.cos(math.radians(min(max_lat + 1, 89.0)))) + 1e-7


class _Shapes:
    """The geofences as arrays for vectorized tests: kind numbers, geometries, circle centres, radii and every
    corridor segment (radians: lat1, lon1, lat2, lon2) in one table, CSR by fence number. ``exact``: also the
    lookup's structures (polygon grids, unit vectors); without it (building covers) polygons are prepared for
    shapely's vectorized predicates instead."""

    def __init__(self, fences: Sequence[Geofence], exact: bool = False) -> None:
        self.kinds = np.array([_KINDS.index(f.kind) for f in fences], dtype=np.int8)
        self.geoms = np.empty(len(fences), dtype=object)
        self.geoms[:] = [f.geometry for f in fences]
        polygons = np.flatnonzero(self.kinds == 0)
        self.grids: PolygonGrids | None = None
        if exact:  # the lookup's exact test: polygon grids (numbered by polygon) instead of GEOS
            self.grids = PolygonGrids(self.geoms[polygons])
            self.grid_of = np.full(len(fences), -1, dtype=np.int64)
            self.grid_of[polygons] = np.arange(len(polygons))
        elif len(polygons):
            shapely.prepare(self.geoms[polygons])
        self.radius = np.array([f.radius_m for f in fences], dtype=np.float64)
        circles = self.kinds == 1
        self.center = np.zeros((len(fences), 2))
        if circles.any():
            self.center[circles, 0] = shapely.get_y(self.geoms[circles])
            self.center[circles, 1] = shapely.get_x(self.geoms[circles])
        lines = np.flatnonzero(self.kinds == 2)
        counts = np.zeros(len(fences), dtype=np.int64)
        self.segs = np.empty((0, 4))
        if len(lines):
            coords, which = shapely.get_coordinates(self.geoms[lines], return_index=True)
            rad = np.radians(coords)
            same = which[1:] == which[:-1]  # consecutive vertices of one line
            self.segs = np.column_stack((rad[:-1, 1], rad[:-1, 0], rad[1:, 1], rad[1:, 0]))[same]
            counts[lines] = np.bincount(which[1:][same], minlength=len(lines))
        self.seg_ptr = np.concatenate(([0], np.cumsum(counts))).astype(np.int64)
        if exact:
            self._prepare_vectors()

    def _prepare_vectors(self) -> None:
        """Unit vectors for the lookup's circle and corridor tests (chord lengths and dot products, no
        trigonometry per pair): circle centres; per corridor segment its ends a, b, the unit normal n of its
        great circle and the normals n x a, b x n of the great circles through its ends (a point projects
        inside the segment when it is on their positive sides)."""
        angle = self.radius / EARTH_RADIUS_M
        self.chord2 = (2 * np.sin(np.minimum(angle, math.pi) / 2)) ** 2
        self.sin_r = np.sin(np.minimum(angle, math.pi / 2))
        self.centre_unit = _unit(np.radians(self.center[:, 0]), np.radians(self.center[:, 1]))
        a, b = _unit(self.segs[:, 0], self.segs[:, 1]), _unit(self.segs[:, 2], self.segs[:, 3])
        n = np.cross(a, b)
        norm = np.linalg.norm(n, axis=1, keepdims=True)
        n = np.where(norm > 0, n / np.where(norm > 0, norm, 1), 0)  # a zero-length segment: its ends only
        ta, tb = np.cross(n, a), np.cross(b, n)
        self.seg_vectors = np.concatenate((a, b, n, ta, tb), axis=1)
        self.seg_degenerate = norm[:, 0] == 0

    def within(self, fences: np.ndarray, lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
        """Circle and corridor pairs: the point within the radius of the centre / centre line, by chord
        length and cross-track sine (monotonic in the great-circle distance, so the same answer; compiled:
        ``kernels.within_one``, the test lookups run)."""
        return within_many(np.ascontiguousarray(fences, dtype=np.int64), self.kinds,
                           np.ascontiguousarray(lats, dtype=np.float64), np.ascontiguousarray(lons, dtype=np.float64),
                           self.centre_unit, self.chord2, self.sin_r, self.seg_ptr,
                           np.ascontiguousarray(self.seg_vectors), self.seg_degenerate)

    def distance_m(self, fences: np.ndarray, lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
        """Geodesic distance from each point to its circle's centre or corridor's centre line."""
        out = np.empty(len(fences))
        kinds = self.kinds[fences]
        circle = kinds == 1
        if circle.any():
            c = self.center[fences[circle]]
            out[circle] = _haversine_np(c[:, 0], c[:, 1], lats[circle], lons[circle])
        corridor = np.flatnonzero(kinds == 2)
        if len(corridor):  # all (pair, segment) combinations at once, then the minimum per pair
            pair, seg = _expand(self.seg_ptr, np.arange(len(self.segs)), fences[corridor], np.arange(len(corridor)))
            s = self.segs[seg]
            d = segment_distance_rad(s[:, 0], s[:, 1], s[:, 2], s[:, 3], np.radians(lats[corridor][pair]),
                                     np.radians(lons[corridor][pair]))
            starts = np.flatnonzero(np.diff(pair, prepend=-1))
            out[corridor[pair[starts]]] = np.minimum.reduceat(d, starts) * EARTH_RADIUS_M
        return out

    def extents(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per geofence a centre (lat, lon) and a distance (m) from it that every point of the geofence is
        within: the bounding box's centre and farthest corner (circles: centre and radius)."""
        n = len(self.kinds)
        bounds = np.zeros((n, 4))
        poly, circle, corridor = self.kinds == 0, self.kinds == 1, self.kinds == 2
        if poly.any():
            bounds[poly] = shapely.bounds(self.geoms[poly])
        if corridor.any():
            lines = self.geoms[corridor]
            grow = np.array([_corridor_degrees(g, r) for g, r in zip(lines, self.radius[corridor], strict=True)])
            bounds[corridor] = shapely.bounds(lines) + grow[:, None] * np.array([-1, -1, 1, 1])
        lat = (bounds[:, 1] + bounds[:, 3]) / 2
        lon = (bounds[:, 0] + bounds[:, 2]) / 2
        far = np.zeros(n)
        for x, y in ((0, 1), (0, 3), (2, 1), (2, 3)):
            far = np.maximum(far, _haversine_np(lat, lon, bounds[:, y], bounds[:, x]))
        far = far * 1.02 + 1.0
        lat[circle], lon[circle] = self.center[circle, 0], self.center[circle, 1]
        far[circle] = self.radius[circle] * 1.001 + 1.0
        return lat, lon, far


def cover_fences(fences: Sequence[Geofence], pool: Executor | None = None) -> list[FenceCover]:
    """The covers of many geofences, built together (see the module docstring), BUILD_CHUNK at a time so the
    temporary arrays (boundary samples, grid disks) stay bounded; on ``pool``'s threads when given."""
    chunks = [fences[i : i + BUILD_CHUNK] for i in range(0, len(fences), BUILD_CHUNK)]
    built = pool.map(_cover_chunk, chunks) if pool is not None and len(chunks) > 1 else map(_cover_chunk, chunks)
    return [cover for chunk in built for cover in chunk]


def _build_pool(threads: int) -> contextlib.AbstractContextManager[Executor | None]:
    return ThreadPoolExecutor(threads, thread_name_prefix="geofence-build") if threads > 1 else contextlib.nullcontext()


def _shapes_of(pool: Executor | None, fences: Sequence[Geofence]) -> Future[_Shapes] | None:
    """The lookup's exact-test structures of ``fences`` (sorted by id), started on the pool if there is one."""
    return pool.submit(_Shapes, fences, True) if pool is not None else None


def _cover_chunk(fences: Sequence[Geofence]) -> list[FenceCover]:
    n = len(fences)
    if n == 0:
        return []
    shapes = _Shapes(fences)
    lat, lon, far = shapes.extents()
    # the finest resolution whose edge exceeds the extent (-1: bigger than a base cell)
    start = np.searchsorted(-_EDGE_M[: MAX_RESOLUTION + 1], -far, side="right") - 1
    huge = start < 0
    start = np.maximum(start, 0)
    fine = np.minimum(start + DEPTH, LOOKUP_RESOLUTION)
    # corridors are narrow: their finest cells about their half-width, or they would be boundary cells only
    corridor = shapes.kinds == 2
    narrow = np.searchsorted(-_EDGE_M[: LOOKUP_RESOLUTION + 1], -shapes.radius[corridor], side="right")
    fine[corridor] = np.minimum(np.maximum(fine[corridor], narrow), LOOKUP_RESOLUTION)
    numbers = np.arange(n)

    # seeds: the disk around the start cell, or every base cell
    small = np.flatnonzero(~huge)
    seed_cells, owner = _disks(latlng_to_cells(lat[small], lon[small], start[small]), SEED_RING)
    cand_f = np.concatenate((small[owner], np.repeat(numbers[huge], len(_RES0_CELLS))))
    cand_c = np.concatenate((seed_cells, np.tile(_RES0_CELLS, int(huge.sum()))))
    cand_f, cand_c = _unique_pairs(cand_f, cand_c, start)

    # the band of every polygon: finest cells whose regions may touch its boundary
    poly = np.flatnonzero(shapes.kinds == 0)
    band_f, band_c = np.empty(0, np.int64), np.empty(0, np.uint64)
    if len(poly):
        sample_res = np.minimum(fine + BAND_FINER, 15)
        step = SAMPLE_STEP * _EDGE_M[sample_res[poly]] / M_PER_DEG
        rings = shapely.segmentize(shapely.boundary(shapes.geoms[poly]), step)
        coords, which = shapely.get_coordinates(rings, return_index=True)
        sample_f = poly[which]
        sample_f, sample_c = _drop_repeats(
            sample_f, latlng_to_cells(coords[:, 1], coords[:, 0], sample_res[sample_f]))
        band_c, owner = _disks(sample_c, 1)
        band_f = sample_f[owner]
        band_f, band_c = _unique_pairs(band_f, parent_cells(band_c, fine[band_f]), fine)

    interior: list[tuple[np.ndarray, np.ndarray]] = []
    boundary: list[tuple[np.ndarray, np.ndarray]] = []
    for level in range(LOOKUP_RESOLUTION + 1):
        if not len(cand_f):
            break
        res = start[cand_f] + level
        state = _classify(shapes, cand_f, cand_c, res, band_f, band_c, start[band_f] + level)
        interior.append((cand_f[state == 1], cand_c[state == 1]))
        mixed = state == 2
        last = mixed & (res >= fine[cand_f])
        boundary.append((cand_f[last], cand_c[last]))
        split = mixed & ~last
        cand_c, owner = _children(cand_c[split], res[split])
        cand_f = cand_f[split][owner]
    return _split_covers(n, fine, interior, boundary)


def _classify(shapes: _Shapes, fences: np.ndarray, cells: np.ndarray, res: np.ndarray,
              band_f: np.ndarray, band_c: np.ndarray, band_res: np.ndarray) -> np.ndarray:
    """0 outside, 1 interior, 2 mixed, for each (fence number, cell) candidate of one level."""
    state = np.full(len(cells), 2, dtype=np.int8)
    kinds = shapes.kinds[fences]
    decide = ~_is_pentagon(cells, res)
    poly = kinds == 0
    if poly.any() and len(band_f):
        # mixed: some finest descendant is in the band
        ancestors = np.unique(_pack(band_f, parent_cells(band_c, band_res), band_res))
        keys = _pack(fences[poly], cells[poly], res[poly])
        pos = np.minimum(np.searchsorted(ancestors, keys), len(ancestors) - 1)
        decide[poly] &= ancestors[pos] != keys
    todo = np.flatnonzero(decide)
    lats, lons = _centres(cells[todo])
    f = fences[todo]
    poly_todo = kinds[todo] == 0
    inside = np.zeros(len(todo), dtype=bool)
    if poly_todo.any():
        inside[poly_todo] = shapely.contains_xy(shapes.geoms[f[poly_todo]], lons[poly_todo], lats[poly_todo])
    state[todo[poly_todo]] = inside[poly_todo]
    other = ~poly_todo
    if other.any():
        d = shapes.distance_m(f[other], lats[other], lons[other])
        reach = REACH * _EDGE_M[res[todo[other]]] + 0.01
        radius = shapes.radius[f[other]]
        state[todo[other]] = np.where(d + reach <= radius, 1, np.where(d - reach > radius, 0, 2))
    return state


def _split_covers(n: int, fine: np.ndarray, interior: list[tuple[np.ndarray, np.ndarray]],
                  boundary: list[tuple[np.ndarray, np.ndarray]]) -> list[FenceCover]:
    def per_fence(parts: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        f = np.concatenate([p[0] for p in parts]) if parts else np.empty(0, np.int64)
        c = np.concatenate([p[1] for p in parts]) if parts else np.empty(0, np.uint64)
        order = np.lexsort((c, f))
        return np.split(c[order], np.cumsum(np.bincount(f, minlength=n))[:-1])

    inner, edge = per_fence(interior), per_fence(boundary)
    return [FenceCover(int(fine[i]), inner[i], edge[i]) for i in range(n)]


def cover_fence(fence: Geofence) -> FenceCover:
    """The H3 cells covering one geofence, split into interior and boundary cells."""
    return cover_fences([fence])[0]


def _entry_codes(cells: np.ndarray, res: np.ndarray) -> np.ndarray:
    """Which descendant of its group key (GROUP_RESOLUTION ancestor) each cell is: 0 the key itself (and
    cells coarser than GROUP_RESOLUTION, their own keys), 1 + d its child of digit d, 8 + 7 d + e the
    grandchild of digits d, e (< 57: 6 bits). A point matches codes 0, 1 + d and 8 + 7 d + e of its own digits
    (``kernels.lookup_pairs``)."""
    assert int(res.max(initial=0)) <= GROUP_RESOLUTION + 2
    d = (cells >> (_U3 * (_U15 - np.uint64(GROUP_RESOLUTION + 1)))) & np.uint64(7)
    e = (cells >> (_U3 * (_U15 - np.uint64(GROUP_RESOLUTION + 2)))) & np.uint64(7)
    below = res.astype(np.int64) - GROUP_RESOLUTION
    return np.where(below == 1, 1 + d, np.where(below == 2, 8 + 7 * d + e, 0)).astype(np.uint32)


def _entry_cells(groups: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The cells of entries from their group keys and codes (``_entry_codes`` undone)."""
    codes = codes.astype(np.uint64)
    child = (codes >= 1) & (codes < 8)
    grandchild = codes >= 8
    d = np.where(child, codes - _U1, np.where(grandchild, (codes - np.uint64(8)) // np.uint64(7), 0))
    e = np.where(grandchild, (codes - np.uint64(8)) % np.uint64(7), 0)
    res = np.where(child, GROUP_RESOLUTION + 1, GROUP_RESOLUTION + 2).astype(np.uint64)
    shift_d = _U3 * (_U15 - np.uint64(GROUP_RESOLUTION + 1))
    shift_e = _U3 * (_U15 - np.uint64(GROUP_RESOLUTION + 2))
    below = (groups & ~_RES_MASK & ~(np.uint64(7) << shift_d)) | (res << _RES_SHIFT) | (d << shift_d)
    below = np.where(grandchild, (below & ~(np.uint64(7) << shift_e)) | (e << shift_e), below)
    return np.where(codes == 0, groups, below)


def _entry_values(entries: np.ndarray) -> np.ndarray:
    """The fence values (f or ~f) of entries: their low ENTRY_CODE_SHIFT bits, sign extended."""
    low = (entries & np.uint32(ENTRY_VALUE_MASK)).astype(np.int32)
    sign = np.int32(1 << (ENTRY_CODE_SHIFT - 1))
    return np.where(low >= sign, low - 2 * sign, low).astype(np.int32)


def _push_down(keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Store the coarsest resolution's cells as their descendants at the next resolution present while that
    adds at most PUSH_DOWN x the table's size: a resolution fewer to probe for every point of every batch (a
    cell's region is exactly the union of its children's, so answers do not change)."""
    while len(keys):
        res = cell_resolutions(keys)
        present = np.unique(res)
        if len(present) < 2:
            break
        at = res == present[0]
        steps = int(present[1] - present[0])
        if int(at.sum()) * (7**steps - 1) > PUSH_DOWN * len(keys):
            break
        cells, owner = keys[at], np.flatnonzero(at)
        for _ in range(steps):
            cells, up = _children(cells, cell_resolutions(cells))
            owner = owner[up]
        keys = np.concatenate((keys[~at], cells))
        values = np.concatenate((values[~at], values[owner]))
    return keys, values


class GeofenceIndex:
    """Immutable index of geofences; ``lookup`` answers many points at once."""

    @classmethod
    def empty(cls) -> GeofenceIndex:
        return cls([], {})

    def __init__(self, fences: Sequence[Geofence], covers: dict[str, FenceCover],
                 shapes: Future[_Shapes] | None = None) -> None:
        """``shapes``: the lookup's exact-test structures of the sorted ``fences``, when already being built."""
        self.fences: tuple[Geofence, ...] = tuple(sorted(fences, key=lambda f: f.id))
        parts = [covers[f.id] for f in self.fences]
        numbers = np.arange(len(parts), dtype=np.int32)
        inner = [c.interior for c in parts]
        edge = [c.boundary for c in parts]
        cells = np.concatenate([*inner, *edge]) if parts else np.empty(0, np.uint64)
        values = np.concatenate((np.repeat(numbers, [len(c) for c in inner]),
                                 ~np.repeat(numbers, [len(c) for c in edge])))
        self._setup(cells, values, shapes)

    def _setup(self, cells: np.ndarray, values: np.ndarray, shapes: Future[_Shapes] | None = None) -> None:
        """The lookup structures, from every cover cell with its fence number (f: interior, ~f: boundary)."""
        self._number = {fence.id: i for i, fence in enumerate(self.fences)}
        self.ids = np.array([f.id for f in self.fences], dtype=object)
        self._shapes = shapes.result() if shapes is not None else _Shapes(self.fences, exact=True)
        self._answers = AnswerSets(self.ids)
        self._cross = [(f.id, _candidate_polygon(f)) for f in self.fences if f.settings.cross]
        self.has_cross = bool(self._cross)
        # no geofence with settings of its own: transitions under all-zero defaults need no per-geofence rules
        self.plain = all(f.settings.neutral for f in self.fences)
        self._build_table(cells.astype(np.uint64), values.astype(np.int32))
        self.finest_resolution = LOOKUP_RESOLUTION

    @classmethod
    def build(cls, fences: Iterable[Geofence], threads: int = BUILD_THREADS) -> GeofenceIndex:
        """The index of ``fences``: their covers (in chunks) and the exact-test structures (polygon grids) are
        built side by side on ``threads`` threads (10,000 geofences: ~1.5x faster on two cores)."""
        fences = list(fences)
        with _build_pool(threads) as pool:
            shapes = _shapes_of(pool, sorted(fences, key=lambda f: f.id))
            covers = cover_fences(fences, pool)
            return cls(fences, dict(zip((f.id for f in fences), covers, strict=True)), shapes)

    def with_changes(self, upserts: Iterable[Geofence] = (), deletes: Iterable[str] = ()) -> GeofenceIndex:
        """A new index with geofences added, replaced or removed; unchanged geofences keep their covers (read
        back from the lookup table: the index keeps no second copy)."""
        fences = {f.id: f for f in self.fences}
        for fence_id in deletes:
            fences.pop(fence_id, None)
        changed = []
        for fence in upserts:
            old = fences.get(fence.id)
            if old is None or not old.same_shape(fence):
                changed.append(fence)
            fences[fence.id] = fence
        changed = list({f.id: f for f in changed}.values())  # the last version of a geofence upserted twice
        fresh = GeofenceIndex.__new__(GeofenceIndex)
        fresh.fences = tuple(sorted(fences.values(), key=lambda f: f.id))
        with _build_pool(BUILD_THREADS) as pool:
            shapes = _shapes_of(pool, fresh.fences)
            fresh._setup(*self._carried_over(fresh, changed, pool), shapes)
        return fresh

    def _carried_over(self, fresh: GeofenceIndex, changed: list[Geofence], pool: Executor | None
                      ) -> tuple[np.ndarray, np.ndarray]:
        """The entries of ``fresh`` (fences numbered anew): this index's, for the geofences it keeps unchanged,
        plus the new covers of ``changed``."""
        new_number = {f.id: i for i, f in enumerate(fresh.fences)}
        stale = {f.id for f in changed}
        # old fence number -> new one (-1: deleted or reshaped)
        renumber = np.array([-1 if i in stale else new_number.get(i, -1) for i in self.ids.tolist()],
                            dtype=np.int32)
        cells, values = self._entries()
        number = np.where(values >= 0, values, ~values)
        kept = renumber[number] >= 0
        cells, values = cells[kept], np.where(values[kept] >= 0, renumber[number[kept]], ~renumber[number[kept]])
        new_cells, new_values = [cells], [values]
        for fence, cover in zip(changed, cover_fences(changed, pool), strict=True):
            f = np.int32(new_number[fence.id])
            new_cells += [cover.interior, cover.boundary]
            new_values += [np.full(len(cover.interior), f, np.int32), np.full(len(cover.boundary), ~f, np.int32)]
        return np.concatenate(new_cells), np.concatenate(new_values)

    def _entries(self) -> tuple[np.ndarray, np.ndarray]:
        """Every (cell, fence value) entry of the table (value f: interior, ~f: boundary)."""
        keys, word = self._table.keys, self._table.payload
        single = (word & SINGLE) != 0
        low = (word & np.uint64(0xFFFFFFFF)).astype(np.int64)
        starts = (word >> np.uint64(32)).astype(np.int64)
        counts = np.where(single | (keys == 0), 0, low - starts)
        listed = np.repeat(np.arange(len(keys)), counts)
        offsets = np.repeat(starts - np.cumsum(counts) + counts, counts) + np.arange(int(counts.sum()))
        groups = np.concatenate((keys[single], keys[listed]))
        entries = np.concatenate((low[single].astype(np.uint32), self._group_entries[offsets]))
        return _entry_cells(groups, entries >> np.uint32(ENTRY_CODE_SHIFT)), _entry_values(entries)

    def cover(self, fence_id: str) -> FenceCover:
        """One geofence's cover, read back from the lookup table."""
        f = self._number[fence_id]
        cells, values = self._entries()
        inner, edge = np.sort(cells[values == f]), np.sort(cells[values == ~f])
        both = np.concatenate((inner, edge))
        return FenceCover(int(cell_resolutions(both).max()) if len(both) else LOOKUP_RESOLUTION, inner, edge)

    def _build_table(self, keys: np.ndarray, values: np.ndarray) -> None:
        """All cover cells in one hash table keyed by their GROUP_RESOLUTION ancestor (cells of a coarser
        resolution: by themselves), one slot per group; per slot the entries of its group: fence value (f
        interior, ~f boundary) and which descendant of the key it belongs to (``_entry_codes``). A point
        probes one slot per coarse resolution present and one for its group, then reads one contiguous list."""
        keys, values = _push_down(keys, values)
        self._n_entries = len(keys)
        limit = (1 << (ENTRY_CODE_SHIFT - 1)) - 1  # fence numbers (and their ~f) must fit an entry's value bits
        if len(self.fences) > limit:
            raise ValueError(f"{len(self.fences):,} geofences: one index holds at most {limit:,}")
        res = cell_resolutions(keys)
        self._resolutions = tuple(np.flatnonzero(np.bincount(res, minlength=16)).tolist())
        groups = np.where(res >= GROUP_RESOLUTION, parent_cells(keys, np.minimum(res, GROUP_RESOLUTION)), keys)
        codes = _entry_codes(keys, res)
        entries = (codes.astype(np.uint32) << np.uint32(ENTRY_CODE_SHIFT)) | (
            values.astype(np.int32).view(np.uint32) & np.uint32(ENTRY_VALUE_MASK))
        cells, rows = np.unique(groups, return_inverse=True)
        self._table, slot_of = CellHash.build(cells)
        slots = slot_of[rows]
        order = np.lexsort((entries, slots))
        slots, entries = slots[order], entries[order]
        # a slot with one entry keeps it in its word; the others point into one array of their entries
        counts = np.bincount(slots, minlength=len(self._table))
        listed = counts[slots] > 1
        self._group_entries = entries[listed]
        ptr = np.concatenate(([0], np.cumsum(np.bincount(slots[listed], minlength=len(self._table))))).astype(np.uint64)
        word = self._table.payload
        word[:] = (ptr[:-1] << np.uint64(32)) | ptr[1:]
        alone = ~listed
        word[slots[alone]] = SINGLE | entries[alone].astype(np.uint64)
        coarse = np.array([r for r in self._resolutions if r < GROUP_RESOLUTION], dtype=np.uint64)
        shapes = self._shapes
        grids = shapes.grids.kernel_arrays() if shapes.grids is not None else ()
        self._kernel_args = (coarse, np.uint64(GROUP_RESOLUTION), self._table.records, self._table.capacity,
                             self._table.max_probe, self._group_entries, shapes.kinds, shapes.grid_of, *grids,
                             shapes.centre_unit, shapes.chord2, shapes.sin_r, shapes.seg_ptr,
                             np.ascontiguousarray(shapes.seg_vectors), shapes.seg_degenerate)

    def __len__(self) -> int:
        return len(self.fences)

    def get(self, fence_id: str) -> Geofence | None:
        number = self._number.get(fence_id)
        return None if number is None else self.fences[number]

    @property
    def resolutions(self) -> tuple[int, ...]:
        return self._resolutions

    def cells_for(self, lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
        """The points' H3 cells (as uint64) at LOOKUP_RESOLUTION: what ``lookup`` takes."""
        return latlng_to_cells(lats, lons, self.finest_resolution)

    def lookup(self, lats: np.ndarray, lons: np.ndarray, cells: np.ndarray | None = None) -> list[tuple[str, ...]]:
        """Sorted ids of the geofences covering each point. ``cells``: the points' cells at LOOKUP_RESOLUTION
        (uint64), when the caller has them already."""
        n = len(lats)
        if n == 0 or not self._n_entries:
            return [()] * n
        lats = np.ascontiguousarray(lats, dtype=np.float64)
        lons = np.ascontiguousarray(lons, dtype=np.float64)
        if cells is None:
            cells = self.cells_for(lats, lons)
        points, fences = lookup_pairs(np.ascontiguousarray(cells, dtype=np.uint64), lats, lons, *self._kernel_args)
        return self._answers.tuples(n, points, fences)

    def lookup_one(self, lat: float, lon: float) -> tuple[str, ...]:
        return self.lookup(np.array([lat]), np.array([lon]))[0]

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
        """Index memory: numpy arrays exactly (hash table, CSR fence lists, polygon grids, corridor segments),
        geometries estimated from their coordinates (16 B each plus ~200 B per geometry object), plus ~300 B
        per geofence for records, the id map and the cached 1-tuples. Answer tuples learned at lookup and the
        Geofence objects' own copies of the geometries are not counted."""
        arrays = sum(a.nbytes for a in (self._group_entries, self._shapes.segs, self._shapes.seg_ptr))
        arrays += self._table.memory_bytes()
        arrays += self._shapes.grids.memory_bytes() if self._shapes.grids is not None else 0
        geoms = self._shapes.geoms
        coords = int(shapely.get_num_coordinates(geoms).sum()) if len(geoms) else 0
        return arrays + coords * 16 + len(self.fences) * 500


class AnswerSets:
    """Turns (point, fence number) pairs into one tuple of sorted ids per point without a Python loop per
    point: every set of fence numbers met gets a number and its tuple is built once. Set numbers: 0 the empty
    set, f + 1 the set {f}; a set of several fences is known by two 64-bit sums (mod 2**64) of a hash of each
    member (``kernels.point_sets``), looked up in an open-addressing table (``kernels.find_sets``: one probe,
    where a binary search over 100,000s of sets missed the caches several times). Two different sets share
    both sums with probability about 2**-128 per pair of sets. Sets learned during a batch are added at its
    end, their tuples sliced from one sorted array of ids (a few per batch once warm; at 100,000 geofences a
    cold start meets a new set at a third of the points); past ``limit`` sets the memory starts again from the
    single sets (the table then holds at most 2**21 rows of 24 bytes)."""

    def __init__(self, ids: np.ndarray, limit: int = 1_000_000) -> None:
        self._ids = np.asarray(ids, dtype=object)
        self._limit = limit
        self._reset()

    def _reset(self) -> None:
        self._slots = np.zeros((1024, 3), dtype=np.uint64)  # rows: sum0, sum1, set number (0: empty row)
        self._several = 0  # sets of several fences in the table
        self._tuples = np.empty(len(self._ids) + 1 + 1024, dtype=object)
        self._tuples[: len(self._ids) + 1] = [(), *((i,) for i in self._ids.tolist())]
        self._count = len(self._ids) + 1

    def __len__(self) -> int:
        return self._count

    def tuples(self, n: int, points: np.ndarray, fences: np.ndarray) -> list[tuple[str, ...]]:
        """The sorted ids per point, from its (point, fence number) pairs (in point order, each at most once)."""
        if self._count > self._limit:  # between batches, so no set number in use goes stale
            self._reset()
        count, first, start, sum0, sum1 = point_sets(n, points, fences)
        sets = np.where(count == 1, first + 1, 0)
        several = np.flatnonzero(count > 1)
        if len(several):
            sets[several] = self._numbers(sum0[several], sum1[several], fences, start[several], count[several])
        return self._tuples[sets].tolist()

    def _numbers(self, first: np.ndarray, second: np.ndarray, fences: np.ndarray, starts: np.ndarray,
                 counts: np.ndarray) -> np.ndarray:
        """The set number of every group of ``fences`` (``counts`` from ``starts``), learning new sets."""
        result = find_sets(first, second, self._slots)
        unknown = np.flatnonzero(result < 0)
        if not len(unknown):
            return result
        # the sets not known yet, each once
        order = unknown[np.lexsort((second[unknown], first[unknown]))]
        fresh = np.ones(len(order), dtype=bool)
        fresh[1:] = (first[order[1:]] != first[order[:-1]]) | (second[order[1:]] != second[order[:-1]])
        numbers = self._count + np.arange(int(fresh.sum()))
        result[order] = numbers[np.cumsum(fresh) - 1]
        # their tuples: the members of one point per set, sorted by fence number (= by id), sliced per set
        reps = order[fresh]
        sizes = counts[reps]
        ends = np.cumsum(sizes)
        owner = np.repeat(np.arange(len(reps)), sizes)
        members = fences[np.repeat(starts[reps] - ends + sizes, sizes) + np.arange(int(ends[-1]))]
        names = self._ids[members[np.lexsort((members, owner))]].tolist()
        bounds = ends.tolist()
        tuples = np.fromiter((tuple(names[a:b]) for a, b in zip([0, *bounds[:-1]], bounds, strict=True)),
                             dtype=object, count=len(reps))
        end = self._count + len(reps)
        if end > len(self._tuples):
            grown = np.empty(max(2 * len(self._tuples), end), dtype=object)
            grown[: self._count] = self._tuples[: self._count]
            self._tuples = grown
        self._tuples[self._count : end] = tuples
        self._count = end
        self._several += len(reps)
        if 2 * self._several > len(self._slots):  # keep the table at most half full: grow, put every set back
            used = self._slots[self._slots[:, 2] != 0]
            size = max(2 * len(self._slots), 1 << (2 * self._several).bit_length())
            self._slots = np.zeros((size, 3), dtype=np.uint64)
            add_sets(used[:, 0], used[:, 1], used[:, 2].astype(np.int64), self._slots)
        add_sets(first[reps], second[reps], numbers, self._slots)
        return result
