"""Compiled inner loops of GeofenceIndex lookups (numba).

Why: a lookup is a few reads per point into tables larger than the CPU caches (hash slots, fence lists, polygon
buckets and edges) and very little arithmetic. The numpy version paid for ~150 whole-array calls and their
temporaries per batch; these loops read each slot, list and edge once, in phases over the batch whose
iterations do not wait on each other, so the CPU keeps many cache misses in flight (about 2x the numpy
version's rate at 10,000 geofences, measured side by side). The arithmetic is plain IEEE double (no fast-math);
tests check the answers against shapely and haversine references.

Compiled on first use and cached on disk (``cache=True``: next to this file, or in ``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_RES_MASK = np.uint64(0xF) << np.uint64(52)
_LOW32 = np.uint64(0xFFFFFFFF)
SINGLE = np.uint64(1) << np.uint64(63)  # a slot word holding its slot's only fence value


@njit(cache=True, nogil=True, inline="always")
def _slot(cell: np.uint64, capacity: np.uint64) -> np.int64:
    """A cell's home slot: splitmix64's finaliser, then modulo the capacity (H3 cells differ in few, structured
    bits, which a plain multiply clusters; the modulo lets the capacity be any size, not a power of 2)."""
    x = cell ^ (cell >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    x = x ^ (x >> np.uint64(31))
    return np.int64(x % capacity)


@njit(cache=True, nogil=True, inline="always")
def _probe(records: np.ndarray, key: np.uint64, capacity: np.uint64, max_probe: np.int64) -> np.int64:
    """The slot holding ``key`` (linear probing from its hash slot; an empty slot ends the search), or -1."""
    slot = _slot(key, capacity)
    for probe in range(max_probe + 1):
        held = records[slot + probe, 0]
        if held == key:
            return slot + probe
        if held == 0:
            return -1
    return -1


@njit(cache=True, nogil=True)
def home_slots(cells: np.ndarray, capacity: np.uint64) -> np.ndarray:
    """``_slot`` of every cell: where ``CellHash.build`` starts placing each (the same hash the probes use)."""
    out = np.empty(len(cells), dtype=np.int64)
    for k in range(len(cells)):
        out[k] = _slot(cells[k], capacity)
    return out


@njit(cache=True, nogil=True)
def find_slots(records: np.ndarray, cells: np.ndarray, capacity: np.uint64, max_probe: np.int64) -> np.ndarray:
    """``CellHash.find``: the slot of every cell, -1 where absent."""
    out = np.empty(len(cells), dtype=np.int64)
    for k in range(len(cells)):
        out[k] = _probe(records, cells[k], capacity, max_probe)
    return out


@njit(cache=True, nogil=True, inline="always")
def _parent(cell: np.uint64, res: np.uint64) -> np.uint64:
    """``geoindex.parent_cells`` for one cell: the resolution field set, the digits below it all ones."""
    unused = (np.uint64(1) << (np.uint64(3) * (np.uint64(15) - res))) - np.uint64(1)
    return (cell & ~_RES_MASK) | (res << np.uint64(52)) | unused


@njit(cache=True, nogil=True, inline="always")
def _bucket(g: np.int64, px: float, py: float, params: np.ndarray) -> np.int64:
    """The bucket of polygon grid ``g`` holding (px, py), -1 outside the grid."""
    i = np.int64(math.floor((px - params[g, 0]) / params[g, 2]))
    j = np.int64(math.floor((py - params[g, 1]) / params[g, 3]))
    nx = np.int64(params[g, 4])
    if i < 0 or i >= nx or j < 0 or j >= np.int64(params[g, 5]):
        return -1
    return np.int64(params[g, 6]) + j * nx + i


@njit(cache=True, nogil=True, inline="always")
def _crossings(g: np.int64, bucket: np.int64, first: np.int64, last: np.int64, px: float, py: float,
               params: np.ndarray, edges: np.ndarray, vertices: np.ndarray) -> bool:
    """Inside status of (px, py) in its bucket: the corner's status (low bit of ``first``) flipped by every edge
    crossing the path right to the bucket's right side, then down it to the corner; True on an edge."""
    x0 = params[g, 0]
    y0 = params[g, 1]
    dx = params[g, 2]
    dy = params[g, 3]
    nx = np.int64(params[g, 4])
    local = bucket - np.int64(params[g, 6])
    i = local % nx
    j = local // nx
    odd = (first & 1) == 1
    right = x0 + (i + 1) * dx
    bottom = y0 + j * dy
    for k in range((first >> 1), (last >> 1)):
        e = edges[k]
        x1 = vertices[e, 0]
        y1 = vertices[e, 1]
        x2 = vertices[e + 1, 0]
        y2 = vertices[e + 1, 1]
        ex = x2 - x1
        ey = y2 - y1
        rx = px - x1
        ry = py - y1
        if ex * ry == ey * rx and rx * (px - x2) <= 0 and ry * (py - y2) <= 0:
            return True  # on the edge: covers
        if (y1 > py) != (y2 > py):
            xint = x1 + ry * ex / ey
            if xint > px and xint <= right:
                odd = not odd
        if (x1 > right) != (x2 > right):
            yint = y1 + (right - x1) * ey / ex
            if yint > bottom and yint <= py:
                odd = not odd
    return odd


@njit(cache=True, nogil=True)
def covers_one(g: np.int64, px: float, py: float, params: np.ndarray, ptr: np.ndarray, edges: np.ndarray,
               vertices: np.ndarray) -> bool:
    """Whether polygon grid ``g`` covers the point (px, py) = (lon, lat): ``PolygonGrids.covers`` for one pair
    (crossing numbers over the point's bucket's edges from the bucket corner's known status)."""
    bucket = _bucket(g, px, py, params)
    if bucket < 0:
        return False
    return _crossings(g, bucket, ptr[bucket], ptr[bucket + 1], px, py, params, edges, vertices)


@njit(cache=True, nogil=True)
def covers_many(fences: np.ndarray, lons: np.ndarray, lats: np.ndarray, params: np.ndarray, ptr: np.ndarray,
                edges: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    out = np.zeros(len(fences), dtype=np.bool_)
    for k in range(len(fences)):
        out[k] = covers_one(fences[k], lons[k], lats[k], params, ptr, edges, vertices)
    return out


@njit(cache=True, nogil=True)
def within_one(f: np.int64, kind: np.int8, lat: float, lon: float, centre_unit: np.ndarray, chord2: np.ndarray,
               sin_r: np.ndarray, seg_ptr: np.ndarray, seg_vectors: np.ndarray, seg_degenerate: np.ndarray) -> bool:
    """Circle (kind 1) or corridor (kind 2) ``f`` contains the point: ``_Shapes.within`` for one pair (chord
    length to the centre; cross-track sine and end-point chords per corridor segment)."""
    phi = math.radians(lat)
    lam = math.radians(lon)
    c = math.cos(phi)
    qx = c * math.cos(lam)
    qy = c * math.sin(lam)
    qz = math.sin(phi)
    limit = chord2[f]
    if kind == 1:
        dx = qx - centre_unit[f, 0]
        dy = qy - centre_unit[f, 1]
        dz = qz - centre_unit[f, 2]
        return dx * dx + dy * dy + dz * dz <= limit
    for s in range(seg_ptr[f], seg_ptr[f + 1]):
        v = seg_vectors[s]
        for end in range(2):
            dx = qx - v[3 * end]
            dy = qy - v[3 * end + 1]
            dz = qz - v[3 * end + 2]
            if dx * dx + dy * dy + dz * dz <= limit:
                return True
        if seg_degenerate[s]:
            continue
        beside = qx * v[9] + qy * v[10] + qz * v[11] >= 0 and qx * v[12] + qy * v[13] + qz * v[14] >= 0
        if beside and abs(qx * v[6] + qy * v[7] + qz * v[8]) <= sin_r[f]:
            return True
    return False


@njit(cache=True, nogil=True)
def within_many(fences: np.ndarray, kinds: np.ndarray, lats: np.ndarray, lons: np.ndarray, centre_unit: np.ndarray,
                chord2: np.ndarray, sin_r: np.ndarray, seg_ptr: np.ndarray, seg_vectors: np.ndarray,
                seg_degenerate: np.ndarray) -> np.ndarray:
    out = np.zeros(len(fences), dtype=np.bool_)
    for k in range(len(fences)):
        f = fences[k]
        out[k] = within_one(f, kinds[f], lats[k], lons[k], centre_unit, chord2, sin_r, seg_ptr, seg_vectors,
                            seg_degenerate)
    return out


@njit(cache=True, nogil=True)
def lookup_pairs(cells: np.ndarray, lats: np.ndarray, lons: np.ndarray, resolutions: np.ndarray,
                 records: np.ndarray, capacity: np.uint64, max_probe: np.int64, values: np.ndarray,
                 kinds: np.ndarray, grid_of: np.ndarray, params: np.ndarray, gptr: np.ndarray, gedges: np.ndarray,
                 vertices: np.ndarray, centre_unit: np.ndarray, chord2: np.ndarray, sin_r: np.ndarray,
                 seg_ptr: np.ndarray, seg_vectors: np.ndarray,
                 seg_degenerate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (point, fence number) pair where the fence covers the point: per point, its cell's parent at each
    resolution of the table is probed (linear probing, as ``CellHash.find``); each fence listed in a found slot
    is taken as is (interior, value f) or after the exact test (boundary, value ~f). A slot's second word holds
    its only fence value (SINGLE set, the value's 32 bits below) or where its list is in ``values`` (start << 32
    | end).

    In phases over the whole batch, each a loop of independent reads (hash slots, then fence lists, then the
    polygons' buckets, then their edges): the tables are larger than the CPU caches, and a loop whose
    iterations do not wait on each other keeps many cache misses in flight where one chain per point would
    wait for each in turn."""
    n = len(cells)
    n_res = len(resolutions)
    # 1. hash slots of every (point, resolution) key, and what the table holds there
    probes = n * n_res
    wanted = np.empty(probes, dtype=np.uint64)
    slots = np.empty(probes, dtype=np.int64)
    for p in range(n):
        for r in range(n_res):
            key = _parent(cells[p], resolutions[r])
            wanted[p * n_res + r] = key
            slots[p * n_res + r] = _slot(key, capacity)
    held = np.empty(probes, dtype=np.uint64)
    words = np.empty(probes, dtype=np.uint64)
    for k in range(probes):
        held[k] = records[slots[k], 0]
        words[k] = records[slots[k], 1]  # the same cache line
    # 2. found slots -> their fence values
    found_word = np.empty(probes, dtype=np.uint64)
    found_point = np.empty(probes, dtype=np.int64)
    m = 0
    total = 0
    for k in range(probes):
        if held[k] == wanted[k]:
            word = words[k]
        elif held[k] != 0:
            slot = _probe(records, wanted[k], capacity, max_probe)
            if slot < 0:
                continue
            word = records[slot, 1]
        else:
            continue
        found_word[m] = word
        found_point[m] = k // n_res
        m += 1
        total += 1 if word & SINGLE else np.int64(word & _LOW32) - np.int64(word >> np.uint64(32))
    points = np.empty(total, dtype=np.int64)
    fences = np.empty(total, dtype=np.int64)
    count = 0
    for k in range(m):
        word = found_word[k]
        if word & SINGLE:
            v = np.int64(word & _LOW32)
            points[count] = found_point[k]
            fences[count] = v - (np.int64(1) << 32) if v >= np.int64(1) << 31 else v
            count += 1
            continue
        for e in range(np.int64(word >> np.uint64(32)), np.int64(word & _LOW32)):
            points[count] = found_point[k]
            fences[count] = values[e]
            count += 1
    # 3. boundary pairs: polygons' buckets first (one read of the grid's parameters each), then their edges
    grid = np.full(total, -1, dtype=np.int64)
    for k in range(total):
        v = fences[k]
        if v < 0 and kinds[~v] == 0:
            grid[k] = grid_of[~v]
    bucket = np.full(total, -1, dtype=np.int64)
    for k in range(total):
        if grid[k] >= 0:
            bucket[k] = _bucket(grid[k], lons[points[k]], lats[points[k]], params)
    first = np.empty(total, dtype=np.int64)
    for k in range(total):
        if bucket[k] >= 0:
            first[k] = gptr[bucket[k]]
    # the first edge's vertex of every pair, read ahead in a loop of its own (see above); kept so it is not dropped
    ahead = 0.0
    for k in range(total):
        if bucket[k] >= 0 and (first[k] >> 1) < (gptr[bucket[k] + 1] >> 1):
            ahead += vertices[gedges[first[k] >> 1], 0]
    keep = 0
    for k in range(total):
        v = fences[k]
        if v < 0:
            f = ~v
            p = points[k]
            if kinds[f] == 0:
                ok = bucket[k] >= 0 and _crossings(grid[k], bucket[k], first[k], gptr[bucket[k] + 1],
                                                    lons[p], lats[p], params, gedges, vertices)
            else:
                ok = within_one(f, kinds[f], lats[p], lons[p], centre_unit, chord2, sin_r, seg_ptr, seg_vectors,
                                seg_degenerate)
            if not ok:
                continue
            v = f
        points[keep] = points[k]
        fences[keep] = v
        keep += 1
    if ahead != ahead:  # never (NaN): only uses the read-ahead sum
        keep = 0
    return points[:keep], fences[:keep]


@njit(cache=True, nogil=True)
def point_sets(n: np.int64, points: np.ndarray, fences: np.ndarray, salt: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per point of (point, fence) pairs given in point order: how many fences, the first one, where its pairs
    start, and the two salted sums that name its set (``AnswerSets``; sums wrap mod 2**64)."""
    count = np.zeros(n, dtype=np.int64)
    first = np.zeros(n, dtype=np.int64)
    start = np.zeros(n, dtype=np.int64)
    sum0 = np.zeros(n, dtype=np.uint64)
    sum1 = np.zeros(n, dtype=np.uint64)
    for k in range(len(points)):
        p = points[k]
        f = fences[k]
        if count[p] == 0:
            first[p] = f
            start[p] = k
        count[p] += 1
        sum0[p] += salt[0, f]
        sum1[p] += salt[1, f]
    return count, first, start, sum0, sum1


def warm_up() -> None:
    """Compile (or load from the disk cache) every kernel now, on tiny inputs: a worker calls this before it
    consumes, so that its first batch with geofences does not wait seconds for the compiler."""
    from fleetstream.domain.geofences import parse_geofence
    from fleetstream.domain.geoindex import GeofenceIndex

    features = [
        {"type": "Feature", "id": "p", "geometry": {"type": "Polygon",
                                                    "coordinates": [[[0, 0], [0.01, 0], [0.01, 0.01], [0, 0]]]}},
        {"type": "Feature", "id": "c", "geometry": {"type": "Point", "coordinates": [0.005, 0.005]},
         "properties": {"radius_m": 200}},
        {"type": "Feature", "id": "r", "geometry": {"type": "LineString", "coordinates": [[0, 0.005], [0.01, 0.005]]},
         "properties": {"buffer_m": 50}},
    ]
    index = GeofenceIndex.build([parse_geofence(f) for f in features])
    index.lookup(np.array([0.004, 0.006]), np.array([0.005, 0.002]))
    index._table.find(np.zeros(1, dtype=np.uint64))
