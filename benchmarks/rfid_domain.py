"""The RFID domain step per read: 10,000 tags, 200 readers, each observation reported 11 times (a 10x duplicate
rate), neighbour noise and moving tags. CPU only (no Kafka): what the worker pays per read on top of decoding.

    python benchmarks/rfid_domain.py [--tags 10000] [--readers 200] [--seconds 5] [--runs 5]

Workload, per simulated second (= the dedup window): every tag is observed by the reader it is at; 20% of them
also, more faintly, by a neighbouring reader (noise within the switch margin); 1% move, to another shelf or dock,
onto a vehicle or off one (a move is taken over once the old place has been silent for switch_after_s, or at
once in the second second, where the new reader reads 12 dB stronger than the old one did). Every observation
is reported 11 times within the second at the reader's cycle phase (1 window-opening read + 10 duplicates), all
reads in time order across tags. Readers:
120 shelves, 40 dock doors, 10 gates, 10 exits, 20 on vehicles (moving, some inside a depot geofence).

Figures, median of ``--runs`` runs, in process CPU time (``time.process_time``: this machine's 2 cores are
shared, and wall time counts the time other processes hold them):
- all reads: µs per read of the stream in time order, state lookup/store in a dict included (the worker reads
  each tag's state once per batch; per read is the pessimistic case);
- the same reads phased per second (the window-opening reads, then the duplicates) to split the two costs;
- per touched tag per second: ``to_dict`` + ``orjson.dumps`` (the changelog record of the tag's state);
- ``codecs.decode_rfid`` per read (one read per message), for scale: what the worker pays before the step.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleetstream.codecs import decode_rfid
from fleetstream.domain.assets import AssetConfig, AssetRegistry, VehicleFix, step, tick
from fleetstream.domain.models import RfidRead
from fleetstream.domain.readers import ReaderRegistry

T0 = 1_795_600_800_000
DUPLICATES = 10


def make_readers(n: int) -> tuple[ReaderRegistry, list[str], list[str]]:
    """(registry, fixed storage readers, vehicle readers) in the proportions of the module doc."""
    shares = (("shelf", 0.60), ("dock", 0.20), ("gate", 0.05), ("exit", 0.05))
    docs, storage, mobile = [], [], []
    for role, share in shares:
        for i in range(round(n * share)):
            reader_id = f"{role}-{i:03d}"
            docs.append({"reader_id": reader_id, "lat": 53.4 + i * 1e-5, "lon": -2.98, "zone_id": f"z-{reader_id}",
                         "role": role})
            if role in ("shelf", "dock"):
                storage.append(reader_id)
    for i in range(n - len(docs)):
        docs.append({"reader_id": f"veh-reader-{i:03d}", "lat": 53.4, "lon": -2.98, "vehicle_id": f"veh-{i:03d}"})
        mobile.append(f"veh-reader-{i:03d}")
    return ReaderRegistry.from_dicts(docs), storage, mobile


def make_workload(tags: int, readers: int, seconds: int, seed: int = 7):
    """Reads per second as (window-opening reads, duplicates), each list in time order; and the registries."""
    rnd = random.Random(seed)
    registry, storage, mobile = make_readers(readers)
    places = storage + mobile
    at = {f"tag-{i:05d}": rnd.choice(storage) if rnd.random() < 0.85 else rnd.choice(mobile) for i in range(tags)}
    noisy = {tag: places[(places.index(reader) + 1) % len(places)] for tag, reader in at.items()
             if rnd.random() < 0.2}
    assets = AssetRegistry.from_dict({tag: {"keep_inside": True, "authorised_vehicles": ["veh-000"]}
                                      for tag in list(at)[: tags // 10]})
    vehicles = {f"veh-{i:03d}": VehicleFix(53.4, -2.98, "moving", ("depot",) if i % 2 else ())
                for i in range(len(mobile))}
    per_second = []
    phase: dict[tuple[str, str], int] = {}
    for second in range(seconds):
        base = T0 + second * 1000
        firsts, duplicates = [], []
        for tag in at:
            if second and rnd.random() < 0.01:  # moves
                at[tag] = rnd.choice(places)
                noisy.pop(tag, None)
            observations = [(at[tag], -50.0 if second else -62.0)]
            if tag in noisy:
                observations.append((noisy[tag], -58.0))
            for reader, rssi in observations:
                offset = phase.setdefault((tag, reader), rnd.randrange(0, 400))  # a reader's read cycle
                firsts.append(RfidRead(tag, reader, base + offset, rssi))
                duplicates += [RfidRead(tag, reader, base + offset + 1 + k * 50, rssi + rnd.uniform(-2, 2))
                               for k in range(DUPLICATES)]
        firsts.sort(key=lambda r: r.ts_ms)
        duplicates.sort(key=lambda r: r.ts_ms)
        per_second.append((firsts, duplicates))
    return registry, assets, vehicles, per_second


def run_once(registry, assets, vehicles, per_second, config, phased: bool) -> tuple[float, float, float, int, int]:
    """Seconds spent on (all reads | window-opening reads, duplicates), reads, events; steady state only (the
    first second creates the states and is not timed)."""
    states: dict[str, object] = {}
    get = states.get
    first_reads = dup_reads = total = 0.0
    reads = events = 0
    for index, (firsts, duplicates) in enumerate(per_second):
        if phased:
            batches = [firsts, duplicates]
        else:
            merged = sorted(firsts + duplicates, key=lambda r: r.ts_ms)
            batches = [merged]
        times = []
        for batch in batches:
            started = time.process_time()
            for read in batch:
                state, out_events, _ = step(get(read.tag_id), read, registry, vehicles, assets, config)
                states[read.tag_id] = state
                events += len(out_events)
            times.append(time.process_time() - started)
        if index:
            reads += len(firsts) + len(duplicates)
            if phased:
                first_reads += times[0]
                dup_reads += times[1]
            else:
                total += times[0]
    return total, first_reads, dup_reads, reads, events


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tags", type=int, default=10_000)
    parser.add_argument("--readers", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    config = AssetConfig(dedup_window_s=1, switch_margin_db=6, switch_after_s=5, missing_after_s=600)
    registry, assets, vehicles, per_second = make_workload(args.tags, args.readers, args.seconds)
    n_first = sum(len(f) for f, _ in per_second[1:])
    n_dup = sum(len(d) for _, d in per_second[1:])
    print(f"{args.tags} tags, {len(registry)} readers, {args.seconds} s simulated; timed (after the first second): "
          f"{n_first + n_dup} reads, {n_first} window-opening, {n_dup} duplicates ({n_dup / n_first:.0f}x)")

    mixed, firsts, dups, events = [], [], [], 0
    for _ in range(args.runs):
        total, _, _, reads, events = run_once(registry, assets, vehicles, per_second, config, phased=False)
        mixed.append(total / reads * 1e6)
        _, first_s, dup_s, _, _ = run_once(registry, assets, vehicles, per_second, config, phased=True)
        firsts.append(first_s / n_first * 1e6)
        dups.append(dup_s / n_dup * 1e6)
    print(f"  events emitted per run: {events}")
    print(f"  all reads, in time order          {statistics.median(mixed):6.2f} µs/read  "
          f"(runs: {', '.join(f'{v:.2f}' for v in mixed)})")
    print(f"  window-opening reads (phased)     {statistics.median(firsts):6.2f} µs/read")
    print(f"  duplicates (phased)               {statistics.median(dups):6.2f} µs/read")

    # the changelog record per touched tag, and timers with nothing due
    states: dict[str, object] = {}
    for firsts_, duplicates in per_second:
        for read in sorted(firsts_ + duplicates, key=lambda r: r.ts_ms):
            states[read.tag_id], _, _ = step(states.get(read.tag_id), read, registry, vehicles, assets, config)
    values = list(states.values())
    serialise, ticks = [], []
    now = per_second[-1][0][-1].ts_ms
    for _ in range(args.runs):
        started = time.process_time()
        for state in values:
            orjson.dumps(state.to_dict())
        serialise.append((time.process_time() - started) / len(values) * 1e6)
        started = time.process_time()
        for state in values:
            tick(state, now, registry, vehicles, assets, config)
        ticks.append((time.process_time() - started) / len(values) * 1e6)
    size = statistics.mean(len(orjson.dumps(s.to_dict())) for s in values)
    print(f"  state to_dict + orjson.dumps      {statistics.median(serialise):6.2f} µs/tag  ({size:.0f} bytes)")
    print(f"  tick, nothing due                 {statistics.median(ticks):6.2f} µs/tag")

    # decoding, for scale: one read per message, as a reader gateway sends them
    sample = [r for r, _ in zip((r for f, _ in per_second for r in f), range(20_000), strict=False)]
    messages = [(r.tag_id.encode(), orjson.dumps({"tag_id": r.tag_id, "reader_id": r.reader_id, "ts": r.ts_ms,
                                                  "rssi_dbm": r.rssi_dbm})) for r in sample]
    decode = []
    for _ in range(args.runs):
        started = time.process_time()
        for key, value in messages:
            decode_rfid(key, value, now_ms=now)
        decode.append((time.process_time() - started) / len(messages) * 1e6)
    print(f"  codecs.decode_rfid (for scale)    {statistics.median(decode):6.2f} µs/read")


if __name__ == "__main__":
    main()
