"""Compiled inner loops of GeofenceIndex lookups (numba).

Why: a lookup is a few reads per point into tables larger than the CPU caches (hash slots, entry lists, polygon
buckets and vertices) and very little arithmetic. The numpy version paid for ~150 whole-array calls and their
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
SINGLE = np.uint64(1) << np.uint64(63)  # a slot word holding its slot's only entry
ENTRY_CODE_SHIFT = 26  # a table entry: descendant code (6 bits) << 26 | fence value (f or ~f, 26 bits)
ENTRY_VALUE_MASK = (1 << ENTRY_CODE_SHIFT) - 1
_SIGN = np.int64(1) << np.int64(ENTRY_CODE_SHIFT - 1)


@njit(cache=True, nogil=True, inline="always")
def _mix(x: np.uint64) -> np.uint64:
    """splitmix64's finaliser: a bijection of 64-bit words whose outputs look independent and uniform."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


@njit(cache=True, nogil=True, inline="always")
def _slot(cell: np.uint64, capacity: np.uint64) -> np.int64:
    """A cell's home slot: splitmix64's finaliser, then modulo the capacity (H3 cells differ in few, structured
    bits, which a plain multiply clusters; the modulo lets the capacity be any size, not a power of 2)."""
    return np.int64(_mix(cell) % capacity)


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
def _first_vertex(word: np.int64, edges: np.ndarray) -> np.int64:
    """The first vertex of a bucket's first edge (its word: see ``polygrid._bucket_words``)."""
    start = word >> 22
    return np.int64(edges[start]) if word & 2 else start


@njit(cache=True, nogil=True, inline="always")
def _crossings(g: np.int64, bucket: np.int64, word: np.int64, px: float, py: float, params: np.ndarray,
               edges: np.ndarray, vertices: np.ndarray) -> bool:
    """Inside status of (px, py) in its bucket: the corner's status (bit 0 of the bucket's ``word``) flipped by
    every edge crossing the path right to the bucket's right side, then down it to the corner; True on an edge.
    The bucket's edges are consecutive edges from the word's start, or listed in ``edges`` (bit 1)."""
    x0 = params[g, 0]
    y0 = params[g, 1]
    dx = params[g, 2]
    dy = params[g, 3]
    nx = np.int64(params[g, 4])
    local = bucket - np.int64(params[g, 6])
    i = local % nx
    j = local // nx
    odd = (word & 1) == 1
    listed = (word & 2) != 0
    start = word >> 22
    right = x0 + (i + 1) * dx
    bottom = y0 + j * dy
    for k in range((word >> 2) & 0xFFFFF):
        e = np.int64(edges[start + k]) if listed else start + k
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
def covers_one(g: np.int64, px: float, py: float, params: np.ndarray, words: np.ndarray, edges: np.ndarray,
               vertices: np.ndarray) -> bool:
    """Whether polygon grid ``g`` covers the point (px, py) = (lon, lat): ``PolygonGrids.covers`` for one pair
    (crossing numbers over the point's bucket's edges from the bucket corner's known status)."""
    bucket = _bucket(g, px, py, params)
    if bucket < 0:
        return False
    return _crossings(g, bucket, words[bucket], px, py, params, edges, vertices)


@njit(cache=True, nogil=True)
def covers_many(fences: np.ndarray, lons: np.ndarray, lats: np.ndarray, params: np.ndarray, words: np.ndarray,
                edges: np.ndarray, vertices: np.ndarray) -> np.ndarray:
    out = np.zeros(len(fences), dtype=np.bool_)
    for k in range(len(fences)):
        out[k] = covers_one(fences[k], lons[k], lats[k], params, words, edges, vertices)
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


@njit(cache=True, nogil=True, inline="always")
def _entry_value(entry: np.int64) -> np.int64:
    """The fence value (f or ~f) of a table entry: its low ENTRY_CODE_SHIFT bits, sign extended."""
    v = entry & ENTRY_VALUE_MASK
    return v - 2 * _SIGN if v >= _SIGN else v


@njit(cache=True, nogil=True)
def lookup_pairs(cells: np.ndarray, lats: np.ndarray, lons: np.ndarray, coarse: np.ndarray, group_res: np.uint64,
                 records: np.ndarray, capacity: np.uint64, max_probe: np.int64, entries: np.ndarray,
                 kinds: np.ndarray, grid_of: np.ndarray, params: np.ndarray, gwords: np.ndarray, gedges: np.ndarray,
                 vertices: np.ndarray, centre_unit: np.ndarray, chord2: np.ndarray, sin_r: np.ndarray,
                 seg_ptr: np.ndarray, seg_vectors: np.ndarray,
                 seg_degenerate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (point, fence number) pair where the fence covers the point: per point, one slot is probed for
    its cell's ancestor at ``group_res`` and one per ``coarse`` resolution (linear probing, as
    ``CellHash.find``); of the found slots' entries, those whose code is the point's (0, its child or
    grandchild of the key: ``geoindex._entry_codes``) give fences taken as is (interior, value f) or after
    the exact test (boundary, value ~f). A slot's second word holds its only entry (SINGLE set, the entry's
    32 bits below) or where its list is in ``entries`` (start << 32 | end).

    In phases over the whole batch, each a loop of independent reads (hash slots, then entry lists, then the
    polygons' buckets, then their edges): the tables are larger than the CPU caches, and a loop whose
    iterations do not wait on each other keeps many cache misses in flight where one chain per point would
    wait for each in turn."""
    n = len(cells)
    n_keys = len(coarse) + 1
    shift_child = np.uint64(3) * (np.uint64(14) - group_res)
    # 1. hash slots of every (point, key), and what the table holds there
    probes = n * n_keys
    wanted = np.empty(probes, dtype=np.uint64)
    slots = np.empty(probes, dtype=np.int64)
    for p in range(n):
        for r in range(n_keys):
            key = _parent(cells[p], coarse[r] if r < n_keys - 1 else group_res)
            wanted[p * n_keys + r] = key
            slots[p * n_keys + r] = _slot(key, capacity)
    held = np.empty(probes, dtype=np.uint64)
    words = np.empty(probes, dtype=np.uint64)
    for k in range(probes):
        held[k] = records[slots[k], 0]
        words[k] = records[slots[k], 1]  # the same cache line
    # 2. found slots -> their entries (an upper bound on the pairs first)
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
        found_point[m] = k // n_keys
        m += 1
        total += 1 if word & SINGLE else np.int64(word & _LOW32) - np.int64(word >> np.uint64(32))
    # the lists' first and last entries, read ahead in a loop of their own (the loop below waits on each in
    # turn); kept in a sum so that the reads are not dropped
    listed_ahead = np.uint64(0)
    for k in range(m):
        word = found_word[k]
        if not word & SINGLE:
            listed_ahead += entries[np.int64(word >> np.uint64(32))] + entries[np.int64(word & _LOW32) - 1]
    points = np.empty(total, dtype=np.int64)
    fences = np.empty(total, dtype=np.int64)
    count = 0
    for k in range(m):
        word = found_word[k]
        p = found_point[k]
        d = np.int64((cells[p] >> shift_child) & np.uint64(7))
        e = np.int64((cells[p] >> (shift_child - np.uint64(3))) & np.uint64(7))
        child = 1 + d
        grandchild = 8 + 7 * d + e
        if word & SINGLE:
            lo = np.int64(-1)
            hi = np.int64(0)
        else:
            lo = np.int64(word >> np.uint64(32))
            hi = np.int64(word & _LOW32)
        for i in range(lo, hi):
            entry = np.int64(word & _LOW32) if i < 0 else np.int64(entries[i])
            code = entry >> ENTRY_CODE_SHIFT
            if code in (0, child, grandchild):
                points[count] = p
                fences[count] = _entry_value(entry)
                count += 1
    total = count
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
    word = np.empty(total, dtype=np.int64)
    for k in range(total):
        if bucket[k] >= 0:
            word[k] = gwords[bucket[k]]
    # the first and last vertex of every pair's edges, read ahead in a loop of their own (see above); kept in a
    # sum so that the reads are not dropped
    ahead = 0.0
    for k in range(total):
        edge_count = (word[k] >> 2) & 0xFFFFF
        if bucket[k] >= 0 and edge_count:
            ahead += vertices[_first_vertex(word[k], gedges), 0]
            if not word[k] & 2:
                ahead += vertices[(word[k] >> 22) + edge_count, 0]
    keep = 0
    for k in range(total):
        v = fences[k]
        if v < 0:
            f = ~v
            p = points[k]
            if kinds[f] == 0:
                ok = bucket[k] >= 0 and _crossings(grid[k], bucket[k], word[k], lons[p], lats[p], params,
                                                    gedges, vertices)
            else:
                ok = within_one(f, kinds[f], lats[p], lons[p], centre_unit, chord2, sin_r, seg_ptr, seg_vectors,
                                seg_degenerate)
            if not ok:
                continue
            v = f
        points[keep] = points[k]
        fences[keep] = v
        keep += 1
    ahead += float(listed_ahead & np.uint64(1))
    if ahead != ahead:  # never (NaN: coordinates are finite): only uses the read-ahead sums
        keep = 0
    return points[:keep], fences[:keep]


_SET_SEED0 = np.uint64(0x2545F4914F6CDD1D)
_SET_SEED1 = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True, nogil=True)
def point_sets(n: np.int64, points: np.ndarray, fences: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per point of (point, fence) pairs given in point order: how many fences, the first one, where its pairs
    start, and the two sums that name its set (``AnswerSets``; sums wrap mod 2**64): of ``_mix`` of the fence
    number under two seeds, computed, where a table of random numbers per fence cost a cache miss per pair at
    100,000 geofences."""
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
        sum0[p] += _mix(np.uint64(f) ^ _SET_SEED0)
        sum1[p] += _mix(np.uint64(f) ^ _SET_SEED1)
    return count, first, start, sum0, sum1


@njit(cache=True, nogil=True)
def find_sets(sum0: np.ndarray, sum1: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """The number of the set named by each (sum0, sum1) in the open-addressing table ``slots`` (rows: sum0,
    sum1, number; a power-of-2 length, at most half full, number 0 marking an empty row), -1 if absent."""
    mask = np.uint64(len(slots) - 1)
    out = np.empty(len(sum0), dtype=np.int64)
    for k in range(len(sum0)):
        i = np.int64(sum0[k] & mask)  # the sums are uniform already
        out[k] = -1
        while slots[i, 2] != 0:
            if slots[i, 0] == sum0[k] and slots[i, 1] == sum1[k]:
                out[k] = np.int64(slots[i, 2])
                break
            i = np.int64((np.uint64(i) + np.uint64(1)) & mask)
    return out


@njit(cache=True, nogil=True)
def add_sets(sum0: np.ndarray, sum1: np.ndarray, numbers: np.ndarray, slots: np.ndarray) -> None:
    """Insert sets not in ``slots`` yet (``find_sets``' table; the caller keeps it at most half full)."""
    mask = np.uint64(len(slots) - 1)
    for k in range(len(sum0)):
        i = np.int64(sum0[k] & mask)
        while slots[i, 2] != 0:
            i = np.int64((np.uint64(i) + np.uint64(1)) & mask)
        slots[i, 0] = sum0[k]
        slots[i, 1] = sum1[k]
        slots[i, 2] = np.uint64(numbers[k])


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
