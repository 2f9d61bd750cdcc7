"""Geofence lookups per second at 1,000 / 10,000 / 100,000 geofences, against a per-point STRtree baseline
measured in the same run; index build time and memory.

    python benchmarks/geofence_index.py [--sizes 1000,10000,100000] [--points 300000] [--runs 5] [--trace-memory]

Geofences: polygons of 20-200 vertices and 100 m - 5 km across, log-uniform (80%), circles (15%), corridors (5%), spread
over a region whose area grows with the count (a metro area at 1,000, a country at 100,000), so the density a
fix sees stays that of a real deployment. Points: uniform over the same region, looked up in batches of
1,000 (the worker's batch). Two lookup figures: with the points' H3 cells given (the index alone) and with the
cells computed inside the lookup (what the worker calls: H3 itself then costs about as much as the index).
Lookup rates and the baseline are medians of --runs runs, interleaved across sizes and variants so that machine
noise hits them alike (all indexes are built first; each timed pass follows an untimed tenth; 300,000 points
make each pass last 0.1-0.5 s, long enough that another tenant's burst does not decide a run); the build is
timed once.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import shapely

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleetstream.domain.geo import destination
from fleetstream.domain.geofences import GeofenceError, parse_geofence
from fleetstream.domain.geoindex import GeofenceIndex

CENTER = (52.0, 5.0)


def region_km(n: int) -> float:
    return 30.0 * math.sqrt(n / 1000)  # 30 km square at 1,000 geofences


def make_fences(n: int, seed: int = 1, center: tuple[float, float] = CENTER) -> list:
    rng = random.Random(seed)
    half_m = region_km(n) * 500
    fences = []
    while len(fences) < n:
        i = len(fences)
        lat, lon = destination(*center, rng.uniform(0, 360), math.sqrt(rng.random()) * half_m)
        roll = rng.random()
        if roll < 0.8:
            vertices = rng.randint(20, 200)
            size = math.exp(rng.uniform(math.log(50), math.log(2500)))  # 100 m - 5 km across, log-uniform
            radii = [rng.uniform(0.6, 1.0) for _ in range(vertices)]
            ring = [list(reversed(destination(lat, lon, 360 * k / vertices, size * r))) for k, r in enumerate(radii)]
            ring.append(ring[0])
            feature = {"type": "Feature", "id": f"p{i}", "geometry": {"type": "Polygon", "coordinates": [ring]}}
        elif roll < 0.95:
            feature = {"type": "Feature", "id": f"c{i}", "geometry": {"type": "Point", "coordinates": [lon, lat]},
                       "properties": {"radius_m": rng.uniform(50, 1000)}}
        else:
            points = [(lat, lon)]
            for _ in range(rng.randint(1, 4)):
                points.append(destination(*points[-1], rng.uniform(0, 360), rng.uniform(500, 3000)))
            feature = {"type": "Feature", "id": f"r{i}",
                       "geometry": {"type": "LineString", "coordinates": [[p[1], p[0]] for p in points]},
                       "properties": {"buffer_m": rng.uniform(20, 100)}}
        try:
            fences.append(parse_geofence(feature))
        except GeofenceError:
            continue
    return fences


def make_points(n_fences: int, count: int, seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    half_m = region_km(n_fences) * 500
    dlat = half_m / 111_320
    dlon = dlat / math.cos(math.radians(CENTER[0]))
    return CENTER[0] + rng.uniform(-dlat, dlat, count), CENTER[1] + rng.uniform(-dlon, dlon, count)


def strtree(fences: list) -> shapely.STRtree:
    """The baseline's tree over the geofences' outlines (circles and corridors buffered in degrees)."""
    return shapely.STRtree([f.geometry if f.kind == "polygon" else f.geometry.buffer(f.radius_m / 70_000)
                            for f in fences])


def strtree_baseline(tree: shapely.STRtree, lats: np.ndarray, lons: np.ndarray) -> float:
    """Per-point STRtree query over the geofences' outlines (the broad phase alone, no exact test)."""
    started = time.perf_counter()
    for lat, lon in zip(lats.tolist(), lons.tolist(), strict=True):
        tree.query(shapely.Point(lon, lat), predicate="intersects")
    return len(lats) / (time.perf_counter() - started)


def index_rate(index: GeofenceIndex, lats: np.ndarray, lons: np.ndarray, with_cells: bool, batch: int = 1000) -> float:
    cells = index.cells_for(lats, lons) if with_cells else None
    for i in range(0, len(lats) // 10, batch):  # untimed: the other sizes' runs just had the caches and the TLB
        index.lookup(lats[i : i + batch], lons[i : i + batch], None if cells is None else cells[i : i + batch])
    started = time.perf_counter()
    for i in range(0, len(lats), batch):
        index.lookup(lats[i : i + batch], lons[i : i + batch], None if cells is None else cells[i : i + batch])
    return len(lats) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000")
    parser.add_argument("--points", type=int, default=300_000)
    parser.add_argument("--baseline-points", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--trace-memory", action="store_true", help="also report the build's peak memory")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    built = {}
    for n in sizes:  # every index first, so that the lookup runs below interleave the sizes
        fences = make_fences(n)
        started = time.perf_counter()
        index = GeofenceIndex.build(fences)
        build_s = time.perf_counter() - started
        traced = ""
        if args.trace_memory:  # a second build under tracemalloc (which slows it): the build's peak
            tracemalloc.start()
            GeofenceIndex.build(fences)
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            traced = f" (build peak {peak / 1e6:.0f} MB)"
        lats, lons = make_points(n, args.points)
        hits = sum(1 for r in index.lookup(lats[:10_000], lons[:10_000]) if r)
        print(f"{n:>7,} geofences: build {build_s:6.1f}s  index memory {index.memory_bytes() / 1e6:7.1f} MB{traced}  "
              f"resolutions {index.resolutions}  points in a fence {hits / 100:.1f}%", flush=True)
        built[n] = (strtree(fences), index, lats, lons)
    rates: dict[int, tuple[list[float], list[float], list[float]]] = {n: ([], [], []) for n in sizes}
    for _ in range(args.runs):  # interleaved, so that machine noise hits every size and variant alike
        for n, (tree, index, lats, lons) in built.items():
            given, computed, base = rates[n]
            given.append(index_rate(index, lats, lons, with_cells=True))
            computed.append(index_rate(index, lats, lons, with_cells=False))
            base.append(strtree_baseline(tree, lats[: args.baseline_points], lons[: args.baseline_points]))
    print(f"\nlookups/s, medians of {args.runs} interleaved runs (batches of 1,000 points):")
    for n, (given, computed, base) in rates.items():
        g, c, b = statistics.median(given), statistics.median(computed), statistics.median(base)
        print(f"{n:>7,} geofences: {g:11,.0f} with cells given, {c:11,.0f} computing cells; "
              f"STRtree per point {b:9,.0f} -> {g / b:5.1f}x / {c / b:5.1f}x")
    if len(sizes) > 1:
        smallest, largest = min(sizes), max(sizes)
        for label, k in (("cells given", 0), ("computing cells", 1)):
            paired = [a / b for a, b in zip(rates[smallest][k], rates[largest][k], strict=True)]
            print(f"slowdown {largest:,} vs {smallest:,} ({label}): {statistics.median(paired):.2f}x "
                  f"(median of per-run ratios; runs: {', '.join(f'{r:.2f}' for r in paired)})")

if __name__ == "__main__":
    main()
