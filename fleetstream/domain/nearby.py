"""Nearby search: an in-memory H3 grid index of device positions (latest position per device).

Devices are bucketed by the H3 cell containing them at ``resolution`` (default 8, ~0.5 km edges). A query at
point q takes the grid disk of k rings around q's cell, then filters by exact haversine distance. The disk holds
every point within

    B(k) = min over the cells c of ring k+1 of (distance(q, centre(c)) - R)

where R bounds the circumradius of any cell at that resolution: a path from q to a point outside the disk has to
cross a ring-(k+1) cell, and every point of that cell is within R of its centre. k is first estimated from the
radius and the local spacing of cell centres, then raised until B(k) covers the radius, so answers are exact
wherever the disk is used: across the antimeridian (H3 has no seam), near the poles and around pentagons (which
have five neighbours and are smaller than R). R is 1.15 x the resolution's average hexagon edge + 1 m: the largest
circumradius over every cell of resolutions 0-4 is 1.0998 x that edge, and 1.1019 x over samples at finer
resolutions, concentrated around the worst cells.

When the disk would cost more than looking at every device (few devices, or a radius of many rings) the query
scans all devices with vectorized haversine instead, which is exact at any radius.

Ties in distance are broken by device id, everywhere, so partial answers from several workers merge into the
answer one worker holding every device would give (:func:`merge_nearby`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from itertools import chain

import h3
import numpy as np

from fleetstream.domain.geo import EARTH_RADIUS_M
from fleetstream.domain.geoindex import parent_cells

CIRCUMRADIUS_FACTOR = 1.15  # x average hexagon edge; see the module doc
DISK_CELLS_PER_DEVICE = 0.1  # scan every device instead when the disk has more cells than this per device
PRUNE_ABOVE = 256  # devices in a disk above which cells too far to matter are skipped before exact distances
MAX_RINGS = 120  # beyond this the disk costs more than a scan of any realistic index
RING_ADVANCE = 0.9 * 1.5  # x edge: each ring of a hexagon grid reaches >= 1.5 edges further out; less for safety
HALF_CIRCUMFERENCE_M = math.pi * EARTH_RADIUS_M

_bi = h3.api.basic_int
_latlng_to_cell = _bi.latlng_to_cell
_cell_to_latlng = _bi.cell_to_latlng
_grid_disk = _bi.grid_disk
_grid_ring = _bi.grid_ring
_cell_area = _bi.cell_area
_EMPTY: frozenset[int] = frozenset()


def haversine_many(lat: float, lon: float, lats: np.ndarray, lons: np.ndarray) -> np.ndarray:
    """Great-circle distances (m) from one point to many, as geo.haversine_m computes them."""
    p1, p2 = math.radians(lat), np.radians(lats)
    a = np.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * np.cos(p2) * np.sin(np.radians(lons - lon) / 2) ** 2
    return 2 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.minimum(a, 1.0)))


def circumradius_bound_m(resolution: int) -> float:
    """No point of any H3 cell at ``resolution`` is farther than this from the cell's centre."""
    return CIRCUMRADIUS_FACTOR * h3.average_hexagon_edge_length(resolution, "m") + 1.0


def descendant_reach_m(resolution: int, fine_resolution: int) -> float:
    """How far from the centre of a cell at ``resolution`` a point can be whose ``fine_resolution`` cell has that
    cell as parent. H3 descendants stick out of their ancestor's hexagon by about a child cell (the hierarchy is
    not geometric); twice the circumradius plus the fine cell's is a generous bound."""
    return 2 * circumradius_bound_m(resolution) + circumradius_bound_m(fine_resolution)


class NearbyIndex:
    """Latest position of each device, indexed by H3 cell, for radius, cell and bounding-box queries.

    ``cell_resolution``: the resolution of the device cell the worker already has (the enriched fix's ``h3``);
    ``devices_in_cell`` answers from it with the same parent rule as the rest of the system. Pass it to
    ``update`` as ``cell`` to save computing it.
    """

    def __init__(self, resolution: int = 8, cell_resolution: int = 9, capacity: int = 1024) -> None:
        if not 0 <= resolution <= 15 or not 0 <= cell_resolution <= 15:
            raise ValueError("resolutions must be in 0..15")
        self.resolution = resolution
        self.cell_resolution = cell_resolution
        self._rmax = circumradius_bound_m(resolution)
        self.disk_cells_per_device = DISK_CELLS_PER_DEVICE  # tests set it to inf to force the disk
        capacity = max(16, capacity)
        self._lat = np.zeros(capacity)
        self._lon = np.zeros(capacity)
        self._ts = np.zeros(capacity, dtype=np.int64)
        self._cell = np.zeros(capacity, dtype=np.uint64)  # the device's cell at cell_resolution
        self._alive = np.zeros(capacity, dtype=bool)
        self._ids: list[str | None] = [None] * capacity
        self._where: list[int] = [0] * capacity  # slot -> grid cell at ``resolution``
        self._slot: dict[str, int] = {}
        self._free: list[int] = []
        self._top = 0
        # grid cell -> [slots in it, those slots as an array (built on demand), centre lat, centre lon]
        self._grid: dict[int, list] = {}

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._slot

    # -- writing ------------------------------------------------------------------------------------------------

    def update(self, device_id: str, lat: float, lon: float, ts_ms: int = 0, cell: str | int | None = None) -> None:
        """Set a device's position (its newest; the caller keeps out stale fixes). ``cell``: the device's H3 cell
        at ``cell_resolution`` when the caller has it."""
        if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
            raise ValueError(f"position out of range: {lat}, {lon}")
        grid_cell = _latlng_to_cell(lat, lon, self.resolution)
        if cell is None:
            key_cell = grid_cell if self.cell_resolution == self.resolution else \
                _latlng_to_cell(lat, lon, self.cell_resolution)
        else:
            key_cell = int(cell, 16) if isinstance(cell, str) else int(cell)
            if (key_cell >> 52) & 0xF != self.cell_resolution:
                raise ValueError(f"cell {cell} is not at resolution {self.cell_resolution}")
        slot = self._slot.get(device_id)
        if slot is None:
            slot = self._allocate(device_id)
        else:
            old = self._where[slot]
            if old == grid_cell:
                self._lat[slot], self._lon[slot], self._ts[slot], self._cell[slot] = lat, lon, ts_ms, key_cell
                return
            self._leave(slot, old)
        self._where[slot] = grid_cell
        entry = self._grid.get(grid_cell)
        if entry is None:
            self._grid[grid_cell] = [{slot}, None, *_cell_to_latlng(grid_cell)]
        else:
            entry[0].add(slot)
            entry[1] = None
        self._lat[slot], self._lon[slot], self._ts[slot], self._cell[slot] = lat, lon, ts_ms, key_cell

    def _leave(self, slot: int, cell: int) -> None:
        entry = self._grid[cell]
        entry[0].discard(slot)
        if entry[0]:
            entry[1] = None
        else:
            del self._grid[cell]

    def _allocate(self, device_id: str) -> int:
        if self._free:
            slot = self._free.pop()
        else:
            slot = self._top
            self._top += 1
            if slot >= len(self._ids):
                grow = len(self._ids)
                self._lat = np.concatenate([self._lat, np.zeros(grow)])
                self._lon = np.concatenate([self._lon, np.zeros(grow)])
                self._ts = np.concatenate([self._ts, np.zeros(grow, dtype=np.int64)])
                self._cell = np.concatenate([self._cell, np.zeros(grow, dtype=np.uint64)])
                self._alive = np.concatenate([self._alive, np.zeros(grow, dtype=bool)])
                self._ids.extend([None] * grow)
                self._where.extend([0] * grow)
        self._slot[device_id] = slot
        self._ids[slot] = device_id
        self._alive[slot] = True
        return slot

    def remove(self, device_id: str) -> bool:
        """Forget a device (deleted, or its partition moved to another worker); False if it was not there."""
        slot = self._slot.pop(device_id, None)
        if slot is None:
            return False
        self._leave(slot, self._where[slot])
        self._ids[slot] = None
        self._alive[slot] = False
        self._free.append(slot)
        return True

    def position(self, device_id: str) -> tuple[float, float, int] | None:
        slot = self._slot.get(device_id)
        if slot is None:
            return None
        return float(self._lat[slot]), float(self._lon[slot]), int(self._ts[slot])

    # -- queries ------------------------------------------------------------------------------------------------

    def nearby(self, lat: float, lon: float, radius_m: float, limit: int) -> list[tuple[str, float]]:
        """Devices within ``radius_m`` of (lat, lon), nearest first (ties by id), at most ``limit``."""
        if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0):
            raise ValueError(f"position out of range: {lat}, {lon}")
        if not radius_m >= 0:
            raise ValueError(f"radius must be a non-negative number, got {radius_m}")
        if limit <= 0 or not self._slot:
            return []
        live = len(self._slot)
        if radius_m >= HALF_CIRCUMFERENCE_M:
            return self._within(lat, lon, self._everyone(), radius_m, limit)
        origin, edge = self._origin(lat, lon)
        advance = RING_ADVANCE * edge
        estimate = self._rings_estimate(radius_m, advance)
        # Dense areas: the `limit` nearest are usually much nearer than the radius. First try a disk sized to
        # cover 1.25 x the distance holding `limit` devices at the index's mean density (devices per occupied
        # cell); its answer stands if its limit-th result is inside what the disk is shown to cover.
        cell_area = 1.5 * math.sqrt(3) * edge * edge
        expected = math.sqrt(limit * cell_area * len(self._grid) / (math.pi * live))
        small = self._rings_estimate(1.25 * expected, advance)
        while small < estimate and not self._scan_cheaper(small):
            slots, distances = self._disk_devices(lat, lon, origin, small, radius_m, limit)
            inside = distances <= radius_m
            if np.count_nonzero(inside) >= limit:
                nearest = np.partition(distances[inside], limit - 1)[limit - 1]
                if nearest <= self._covered(lat, lon, origin, small):
                    return self._nearest(slots[inside], distances[inside], limit)
            small = 2 * small + 1
        k = self._rings(lat, lon, origin, radius_m, advance)
        if k is None:
            return self._within(lat, lon, self._everyone(), radius_m, limit)
        slots, distances = self._disk_devices(lat, lon, origin, k, radius_m, limit)
        inside = distances <= radius_m
        return self._nearest(slots[inside], distances[inside], limit)

    def _within(self, lat: float, lon: float, slots: np.ndarray, radius_m: float, limit: int
                ) -> list[tuple[str, float]]:
        distances = haversine_many(lat, lon, self._lat[slots], self._lon[slots])
        inside = distances <= radius_m
        return self._nearest(slots[inside], distances[inside], limit)

    def _nearest(self, slots: np.ndarray, distances: np.ndarray, limit: int) -> list[tuple[str, float]]:
        if len(slots) > limit:  # keep the nearest `limit`, and everything tied with the last of them
            cutoff = np.partition(distances, limit - 1)[limit - 1]
            keep = distances <= cutoff
            slots, distances = slots[keep], distances[keep]
        order = np.argsort(distances, kind="stable")
        ordered = distances[order]
        ids = self._ids
        found = list(zip([ids[s] for s in slots[order].tolist()], ordered.tolist(), strict=True))
        if len(ordered) > 1 and bool((ordered[1:] == ordered[:-1]).any()):  # equal distances: by id
            found.sort(key=lambda r: (r[1], r[0]))  # type: ignore[arg-type]
        return found[:limit]  # type: ignore[return-value]

    def _origin(self, lat: float, lon: float) -> tuple[int, float]:
        """The point's cell, and the edge of a regular hexagon of its area (the local scale of the grid)."""
        origin = _latlng_to_cell(lat, lon, self.resolution)
        return origin, math.sqrt(2 * _cell_area(origin, "m^2") / (3 * math.sqrt(3)))

    def _rings_estimate(self, radius_m: float, advance: float) -> int:
        return max(0, math.ceil((radius_m + 2 * self._rmax) / advance) - 1)

    def _scan_cheaper(self, k: int) -> bool:
        return k > MAX_RINGS or 3 * k * (k + 1) + 1 > len(self._slot) * self.disk_cells_per_device

    def _rings(self, lat: float, lon: float, origin: int, radius_m: float, advance: float) -> int | None:
        """The k of a grid disk around ``origin`` shown to cover ``radius_m``, or None when scanning every device
        is cheaper (or the radius too large for a disk)."""
        k = self._rings_estimate(radius_m, advance)
        while True:
            if self._scan_cheaper(k):
                return None
            reach = self._covered(lat, lon, origin, k)
            if reach >= radius_m:
                return k
            k += max(1, math.ceil((radius_m - reach) / advance))

    def _disk_devices(self, lat: float, lon: float, origin: int, k: int, radius_m: float, limit: int
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Slots and distances of the devices in grid_disk(origin, k) that may count. A cell is skipped when even
        its nearest point is beyond the radius, or beyond the distance within which ``limit`` devices of the disk
        are certain to be (every device is within R of its cell's centre)."""
        grid = self._grid
        entries = [e for e in map(grid.get, _grid_disk(origin, k)) if e is not None]
        n = len(entries)
        if not n:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        if n <= 8 or sum(len(e[0]) for e in entries) <= PRUNE_ABOVE:  # few devices: pruning costs more
            slots = np.concatenate([self._members(e) for e in entries])
            return slots, haversine_many(lat, lon, self._lat[slots], self._lon[slots])
        centre = haversine_many(lat, lon, np.fromiter((e[2] for e in entries), np.float64, n),
                                np.fromiter((e[3] for e in entries), np.float64, n))
        rmax = self._rmax
        cutoff = radius_m
        counts = np.fromiter((len(e[0]) for e in entries), np.int64, n)
        if counts.sum() > limit:
            far = centre + rmax
            order = np.argsort(far)
            enough = int(np.searchsorted(np.cumsum(counts[order]), limit))
            cutoff = min(cutoff, float(far[order[enough]]))
        keep = np.flatnonzero(centre - rmax <= cutoff).tolist()
        if not keep:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        slots = np.concatenate([self._members(entries[i]) for i in keep])
        return slots, haversine_many(lat, lon, self._lat[slots], self._lon[slots])

    def _candidates(self, lat: float, lon: float, radius_m: float) -> np.ndarray:
        """Slots of every device that may be within ``radius_m``."""
        if radius_m >= HALF_CIRCUMFERENCE_M:
            return self._everyone()
        origin, edge = self._origin(lat, lon)
        k = self._rings(lat, lon, origin, radius_m, RING_ADVANCE * edge)
        if k is None:
            return self._everyone()
        grid = self._grid
        arrays = [self._members(e) for e in map(grid.get, _grid_disk(origin, k)) if e is not None]
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)

    @staticmethod
    def _members(entry: list) -> np.ndarray:
        array = entry[1]
        if array is None:
            array = entry[1] = np.fromiter(entry[0], dtype=np.int64, count=len(entry[0]))
        return array

    def _covered(self, lat: float, lon: float, origin: int, k: int) -> float:
        """B(k): every point nearer than this to (lat, lon) lies in grid_disk(origin, k)."""
        ring = _grid_ring(origin, k + 1)
        if not ring:
            return math.inf
        centres = np.fromiter(chain.from_iterable(map(_cell_to_latlng, ring)), np.float64, 2 * len(ring))
        return float(haversine_many(lat, lon, centres[0::2], centres[1::2]).min()) - self._rmax

    def _everyone(self) -> np.ndarray:
        return np.flatnonzero(self._alive[: self._top])

    def devices_in_cell(self, cell: str | int, after: str | None = None, limit: int | None = None) -> list[str]:
        """Ids (sorted, after the ``after`` cursor, at most ``limit``) of the devices in an H3 cell of any
        resolution. At ``cell_resolution`` or coarser: the cell is the parent of the device's cell (the rule the
        aggregation and ``GET /devices?cell=`` use); finer: the cell contains the device's position."""
        try:
            target = int(cell, 16) if isinstance(cell, str) else int(cell)
        except ValueError:
            target = 0
        if not _bi.is_valid_cell(target):
            raise ValueError(f"not an H3 cell: {cell}")
        res = _bi.get_resolution(target)
        clat, clon = _cell_to_latlng(target)
        if res <= self.cell_resolution:
            slots = self._candidates(clat, clon, descendant_reach_m(res, self.cell_resolution))
            cells = self._cell[slots]
            hit = (cells if res == self.cell_resolution else parent_cells(cells, res)) == np.uint64(target)
            slots = slots[hit]
        else:
            slots = self._candidates(clat, clon, circumradius_bound_m(res))
            lats, lons = self._lat[slots].tolist(), self._lon[slots].tolist()
            slots = slots[[_latlng_to_cell(a, o, res) == target for a, o in zip(lats, lons, strict=True)]] \
                if len(slots) else slots
        return self._page(slots, after, limit)

    def devices_in_bbox(self, min_lat: float, min_lon: float, max_lat: float, max_lon: float,
                        after: str | None = None, limit: int | None = None) -> list[str]:
        """Ids (sorted, paged as ``devices_in_cell``) of the devices inside a lat/lon box, edges included;
        ``min_lon > max_lon`` means the box crosses the antimeridian."""
        if not -90 <= min_lat <= max_lat <= 90 or not (-180 <= min_lon <= 180 and -180 <= max_lon <= 180):
            raise ValueError(f"bad bounding box: {min_lat}, {min_lon}, {max_lat}, {max_lon}")
        slots = self._everyone()
        lats, lons = self._lat[slots], self._lon[slots]
        ok = (lats >= min_lat) & (lats <= max_lat)
        ok &= ((lons >= min_lon) & (lons <= max_lon)) if min_lon <= max_lon else ((lons >= min_lon) | (lons <= max_lon))
        return self._page(slots[ok], after, limit)

    def _page(self, slots: np.ndarray, after: str | None, limit: int | None) -> list[str]:
        ids = self._ids
        found = sorted(ids[s] for s in slots.tolist())  # type: ignore[type-var]
        if after is not None:
            found = [d for d in found if d > after]  # type: ignore[operator]
        return found[:limit] if limit is not None else found  # type: ignore[return-value]


def merge_nearby(results: Iterable[Sequence[tuple[str, float]]], limit: int) -> list[tuple[str, float]]:
    """Merge nearest-first answers of several workers into one: ordered by (distance, id), a device listed twice
    (while a partition moves) kept once at its smaller distance, at most ``limit``."""
    out: list[tuple[str, float]] = []
    seen: set[str] = set()
    for device, distance in heapq.merge(*results, key=lambda r: (r[1], r[0])):
        if device not in seen:
            seen.add(device)
            out.append((device, distance))
            if len(out) == limit:
                break
    return out
