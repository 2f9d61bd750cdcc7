"""Cost of windowed aggregation per fix: what the worker pays with aggregation on (budget: ~3 µs a fix for two
resolutions, against ~20 µs a fix for the rest of the worker).

    python benchmarks/aggregation.py [--devices 20000] [--seconds 150] [--rate 10000] [--batch 500] [--runs 5]

The stream: ``--devices`` vehicles in a 40 km square (random walks), ``--rate`` fixes a second of event time in
batches of ``--batch``, event times jittered by up to 3 s and 0.5% of fixes 20-90 s late (some past the grace).
Every figure covers ``add_batch`` + ``advance`` for every batch plus the final advance that closes the last windows,
so the closing work of every fix is in it; it is the median over ``--runs`` runs, in µs per fix of thread CPU time
(other processes on a shared machine inflate wall time, not this).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h3
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleetstream.domain.aggregation import CellAggregator, DistanceAggregator, GeofenceAggregator, WindowSpec
from fleetstream.domain.transitions import GeofenceEvent, GeofenceEventType

CENTER = (52.0, 5.0)
T0 = 1_795_600_800_000


class Batch:
    def __init__(self, cells: np.ndarray, devices: list[str], ts: np.ndarray, speeds: np.ndarray,
                 stopped: np.ndarray, offsets: np.ndarray, distance: np.ndarray) -> None:
        self.cells, self.devices, self.ts, self.speeds, self.stopped = cells, devices, ts, speeds, stopped
        self.offsets, self.distance = offsets, distance
        self.watermark = 0
        # what a caller holding Python objects would pass instead
        self.hex = [format(int(c), "x") for c in cells]
        self.speed_list = [None if math.isnan(s) else float(s) for s in speeds]
        self.ts_list = ts.tolist()
        self.stopped_list = stopped.tolist()


def make_stream(devices: int, seconds: int, rate: int, batch: int, seed: int = 7) -> list[Batch]:
    rng = np.random.default_rng(seed)
    half_deg = 20_000 / 111_320
    lat = CENTER[0] + rng.uniform(-half_deg, half_deg, devices)
    lon = CENTER[1] + rng.uniform(-half_deg, half_deg, devices) / math.cos(math.radians(CENTER[0]))
    ids = [f"veh-{i:06d}" for i in range(devices)]
    total = seconds * rate
    who = np.arange(total) % devices
    ts = T0 + (np.arange(total) * 1000 // rate) + rng.integers(-3000, 1, total)
    late = rng.random(total) < 0.005
    ts[late] -= rng.integers(20_000, 90_000, int(late.sum()))
    speed = rng.gamma(2.0, 15.0, total)
    speed[rng.random(total) < 0.2] = 0.0
    speed[rng.random(total) < 0.05] = np.nan
    step = np.where(np.isnan(speed), 0.0, speed) / 3.6 * (devices / rate) / 111_320  # degrees moved per fix
    angle = rng.uniform(0, 2 * math.pi, total)
    to_cell = h3.api.basic_int.latlng_to_cell
    cells = np.empty(total, dtype=np.uint64)
    for i in range(total):
        d = who[i]
        lat[d] += step[i] * math.cos(angle[i])
        lon[d] += step[i] * math.sin(angle[i])
        cells[i] = to_cell(lat[d], lon[d], 9)
    out = []
    seen = 0
    for a in range(0, total, batch):
        b = min(total, a + batch)
        sl = slice(a, b)
        chunk = Batch(cells[sl], [ids[d] for d in who[sl]], ts[sl], speed[sl], speed[sl] < 3.0,
                      np.arange(a, b, dtype=np.int64), np.nan_to_num(step[sl]) * 111_320)
        seen = max(seen, int(ts[sl].max()))
        chunk.watermark = seen
        out.append(chunk)
    return out


def run_cells(stream: list[Batch], make: Callable[[], CellAggregator], *, python_inputs: bool = False,
              checkpoint: bool = False) -> tuple[float, int]:
    agg = make()
    emitted = 0
    start = time.thread_time()
    for b in stream:
        if python_inputs:
            agg.add_batch(b.hex, b.devices, b.ts_list, b.speed_list, b.stopped_list)
        else:
            agg.add_batch(b.cells, b.devices, b.ts, b.speeds, b.stopped, b.offsets if checkpoint else None)
        emitted += len(agg.advance(b.watermark))
        if checkpoint:
            cp = agg.checkpoint()
            for key, value in cp.writes:
                orjson.dumps(key)
                orjson.dumps(value)
            agg.acknowledge(cp.seq)
    emitted += len(agg.advance(2**62))
    return time.thread_time() - start, emitted


def run_small(stream: list[Batch], kind: str) -> float:
    spec = WindowSpec(60, grace_s=10)
    start = time.thread_time()
    if kind == "distance":
        agg = DistanceAggregator(spec)
        for b in stream:
            agg.add_batch(b.ts, b.distance, b.offsets)
            agg.advance(b.watermark)
        agg.advance(2**62)
    else:
        fences = GeofenceAggregator(spec)
        for b in stream:
            # ~2% of fixes make a transition (a busy deployment), as the transitions module would emit them
            events = [GeofenceEvent(GeofenceEventType.EXIT if i % 2 else GeofenceEventType.ENTER, d, f"g{i % 300}",
                                    t, 0.0, 0.0, 60.0 if i % 2 else None)
                      for i, (d, t) in enumerate(zip(b.devices[::50], b.ts_list[::50], strict=True))]
            fences.add_events(events)
            fences.advance(b.watermark)
        fences.advance(2**62)
    return time.thread_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=20_000)
    parser.add_argument("--seconds", type=int, default=150)
    parser.add_argument("--rate", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    stream = make_stream(args.devices, args.seconds, args.rate, args.batch)
    fixes = sum(len(b.ts) for b in stream)
    print(f"{fixes:,} fixes, {args.devices:,} devices, {len(stream)} batches of {args.batch}; "
          f"median of {args.runs} runs, µs per fix (add_batch + advance, closing included)")
    tumbling = WindowSpec(60, grace_s=10)
    cases: list[tuple[str, Callable[[], tuple[float, int]]]] = [
        ("res 7+8, 60 s tumbling, uint64 res-9 cells, arrays",
         lambda: run_cells(stream, lambda: CellAggregator(tumbling, (7, 8), checkpoints=False))),
        ("  same, with checkpoint() + orjson.dumps of the writes each batch",
         lambda: run_cells(stream, lambda: CellAggregator(tumbling, (7, 8)), checkpoint=True)),
        ("  same, from hex strings and Python lists",
         lambda: run_cells(stream, lambda: CellAggregator(tumbling, (7, 8), checkpoints=False), python_inputs=True)),
        ("  same, interim updates every 10 s",
         lambda: run_cells(stream, lambda: CellAggregator(tumbling, (7, 8), interim_interval_s=10,
                                                          checkpoints=False))),
        ("res 8 only, 60 s tumbling",
         lambda: run_cells(stream, lambda: CellAggregator(tumbling, (8,), checkpoints=False))),
        ("res 7+8, 300 s windows hopping by 60 s",
         lambda: run_cells(stream, lambda: CellAggregator(WindowSpec(300, step_s=60, grace_s=10), (7, 8),
                                                          checkpoints=False))),
    ]
    for name, case in cases:
        times, emitted = [], 0
        for _ in range(args.runs):
            seconds, emitted = case()
            times.append(seconds)
        print(f"{name:70s} {statistics.median(times) / fixes * 1e6:6.2f} µs/fix  ({emitted:,} cell records)")
    for kind, label in (("distance", "fleet distance per window"),
                        ("fences", "geofence stats (events for 2% of fixes)")):
        t = statistics.median(run_small(stream, kind) for _ in range(args.runs))
        print(f"{label:70s} {t / fixes * 1e6:6.2f} µs/fix")


if __name__ == "__main__":
    main()
