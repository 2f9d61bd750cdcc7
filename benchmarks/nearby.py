"""Nearby search latency and update cost with 100,000 tracked devices, against the brute-force scan (vectorized
haversine over every device, what the worker did before) measured in the same run.

    python benchmarks/nearby.py [--devices 100000] [--queries 500] [--runs 5]

Devices are spread over a disk around a centre, uniformly by area: a metro area (25 km radius, ~50 devices a km2)
and a region (250 km). Query points are uniform over the inner 80% of the disk; radius 1, 2 and 5 km; limit 10,
100 (the API default) and 1,000 (its maximum). Each figure is the median over ``--runs`` runs of that run's p50 or
p99, in µs, thread CPU time (other processes on a shared machine inflate wall time, not this).
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleetstream.domain.geo import destination
from fleetstream.domain.nearby import NearbyIndex, haversine_many

CENTER = (52.0, 5.0)


def spread(n: int, radius_m: float, rng: random.Random) -> list[tuple[float, float]]:
    return [destination(*CENTER, rng.uniform(0, 360), radius_m * math.sqrt(rng.random())) for _ in range(n)]


def brute(lats: np.ndarray, lons: np.ndarray, ids: list[str], q: tuple[float, float], radius: float,
          limit: int) -> list[tuple[str, float]]:
    d = haversine_many(*q, lats, lons)
    inside = np.flatnonzero(d <= radius)
    order = inside[np.argsort(d[inside], kind="stable")][:limit]
    return [(ids[i], float(d[i])) for i in order]


def percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return samples[len(samples) // 2], samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(11)
    clock = time.thread_time
    for area, area_m in (("metro, 25 km", 25_000.0), ("region, 250 km", 250_000.0)):
        points = spread(args.devices, area_m, rng)
        ids = [f"veh-{i:06d}" for i in range(args.devices)]
        index = NearbyIndex()
        t = clock()
        for device, (lat, lon) in zip(ids, points, strict=True):
            index.update(device, lat, lon, 0)
        insert_us = (clock() - t) / args.devices * 1e6
        moved = [(lat + 0.0002, lon) for lat, lon in points]  # ~22 m: what most updates are
        t = clock()
        for device, (lat, lon) in zip(ids, moved, strict=True):
            index.update(device, lat, lon, 1)
        update_us = (clock() - t) / args.devices * 1e6
        lats = np.array([p[0] for p in moved])
        lons = np.array([p[1] for p in moved])
        print(f"{area}: {args.devices:,} devices; insert {insert_us:.2f} µs, move {update_us:.2f} µs a device")
        print(f"  {'radius':>8} {'limit':>6} {'p50 µs':>8} {'p99 µs':>8} {'scan p50':>9} {'found':>6}")
        for radius in (1000.0, 2000.0, 5000.0):
            for limit in (10, 100, 1000):
                p50s, p99s, scans = [], [], []
                found = 0
                for _ in range(args.runs):
                    queries = spread(args.queries, area_m * 0.8, rng)
                    took, scan = [], []
                    for q in queries:
                        t = clock()
                        got = index.nearby(*q, radius, limit)
                        took.append(clock() - t)
                        found += len(got)
                    for q in queries[:50]:
                        t = clock()
                        expected = brute(lats, lons, ids, q, radius, limit)
                        scan.append(clock() - t)
                        assert [d for d, _ in index.nearby(*q, radius, limit)] == [d for d, _ in expected]
                    p50, p99 = percentiles(took)
                    p50s.append(p50)
                    p99s.append(p99)
                    scans.append(percentiles(scan)[0])
                print(f"  {radius:>8.0f} {limit:>6} {statistics.median(p50s) * 1e6:>8.0f} "
                      f"{statistics.median(p99s) * 1e6:>8.0f} {statistics.median(scans) * 1e6:>9.0f} "
                      f"{found / args.runs / args.queries:>6.0f}")


if __name__ == "__main__":
    main()
