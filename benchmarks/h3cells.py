"""H3 cells of points: fleetstream.domain.h3cells.latlng_to_cells against h3ronpy's coordinates_to_cells (what
GeofenceIndex called before it) and an h3-py latlng_to_cell loop, measured in the same run.

    python benchmarks/h3cells.py [--points 20000] [--runs 7] [--batches 500,10000] [--resolutions 9,11]

Points are uniform over a 100 km square around a city (the worker's fixes); each variant converts --points of
them in batches of the given size (500: a small worker batch, 10,000: a large one), at each resolution. Figures
are ns per point (wall time, batch call overhead included), the median of --runs runs interleaved across
variants (the order rotating each run) so that machine noise hits them alike, and the ratios of the other two
to this module. The three are checked to give the same cells before timing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from h3.api.basic_int import latlng_to_cell
from h3ronpy import vector as h3v

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleetstream.domain.h3cells import latlng_to_cells

CENTER = (52.0, 5.0)


def numba_cells(lats: np.ndarray, lons: np.ndarray, res: int) -> np.ndarray:
    return latlng_to_cells(lats, lons, res)


def h3ronpy_cells(lats: np.ndarray, lons: np.ndarray, res: int) -> np.ndarray:
    # as fleetstream/domain/geoindex.py's _to_cells calls it
    return np.asarray(h3v.coordinates_to_cells(lats, lons, np.full(len(lats), res, np.uint8))).astype(np.uint64)


def h3py_cells(lats: np.ndarray, lons: np.ndarray, res: int) -> np.ndarray:
    return np.fromiter((latlng_to_cell(a, b, res) for a, b in zip(lats.tolist(), lons.tolist(), strict=True)),
                       dtype=np.uint64, count=len(lats))


VARIANTS = {"h3cells (numba)": numba_cells, "h3ronpy": h3ronpy_cells, "h3-py loop": h3py_cells}


def timed(fn, batches: list[tuple[np.ndarray, np.ndarray]], res: int) -> float:
    """Seconds to convert every batch."""
    start = time.perf_counter()
    for lats, lons in batches:
        fn(lats, lons, res)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--batches", default="500,10000")
    parser.add_argument("--resolutions", default="9,11")
    args = parser.parse_args()
    sizes = [int(s) for s in args.batches.split(",")]
    resolutions = [int(r) for r in args.resolutions.split(",")]

    rng = np.random.default_rng(3)
    half = 50_000 / 111_320 / 2  # a 100 km square, in degrees of latitude
    lats = CENTER[0] + rng.uniform(-half, half, args.points)
    lons = CENTER[1] + rng.uniform(-half, half, args.points) / np.cos(np.radians(CENTER[0]))
    split = {size: [(lats[k : k + size], lons[k : k + size]) for k in range(0, args.points, size)] for size in sizes}

    for res in resolutions:  # compile, warm up, and check that all agree
        want = numba_cells(lats, lons, res)
        for name, fn in VARIANTS.items():
            if not np.array_equal(fn(lats, lons, res), want):
                raise SystemExit(f"{name} disagrees with h3cells at res {res}")

    configs = [(size, res) for size in sizes for res in resolutions]
    samples: dict[tuple[int, int, str], list[float]] = {(s, r, v): [] for s, r in configs for v in VARIANTS}
    names = list(VARIANTS)
    for run in range(args.runs):
        order = names[run % len(names):] + names[: run % len(names)]
        for size, res in configs:
            for name in order:
                samples[size, res, name].append(timed(VARIANTS[name], split[size], res) / args.points * 1e9)

    print(f"{args.points:,} points, median of {args.runs} runs, ns per point")
    print(f"{'batch':>7} {'res':>4} " + " ".join(f"{n:>16}" for n in names) + "   h3ronpy/h3cells  h3-py/h3cells")
    for size, res in configs:
        med = {name: statistics.median(samples[size, res, name]) for name in names}
        base = med[names[0]]
        print(f"{size:>7,} {res:>4} " + " ".join(f"{med[n]:>16.0f}" for n in names)
              + f"   {med[names[1]] / base:>15.2f}x {med[names[2]] / base:>13.2f}x")


if __name__ == "__main__":
    main()
