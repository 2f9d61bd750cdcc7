"""RFID reads per second through a real ``fleetstream worker``, against a plain aiokafka batch pipeline doing the
decode/lookup/encode part of the same work on the same input, in the same run; and the core worker's positions
against the same baseline, so the two ratios can be compared.

    python benchmarks/rfid.py [--tags 10000] [--readers 200] [--seconds 2] [--runs 3] [--modes 1,11]

Workload (``benchmarks/rfid_domain.py``): 10,000 tags, 200 readers (shelves, docks, gates, exits, 20 on vehicles),
per simulated second every tag observed by its reader, 20% also faintly by a neighbour, 1% moving; every
observation reported 11 times (1 window-opening read + 10 duplicates: the 10x duplicate rate), all reads in
time order. Message modes: ``1`` = one read per Kafka message (capped by ``--single-read-limit``: Faust pays
~200 us per message), ``11`` = the 11 reports of one observation in one array message (a reader's burst).

- ``worker``: a real worker (decode + validate + reader lookup + de-duplication + resolution + state + events +
  alerts + changelog + dead letters), from its first batch to its last acknowledged flush (``/rfid/status``).
- ``aiokafka``: plain aiokafka, batch in, ``send_batch`` out: decode + validate + reader lookup + encode one
  output per read (no state, no group protocol cost beyond a commit per batch, no changelog).
- ``positions``: ``benchmarks/throughput.py``'s worker and aiokafka pipelines on its single-fix positions, same
  broker, same run (``--positions N`` fixes; 0 skips).

Prints each run, then medians and the ratios worker / aiokafka for reads and for positions.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import throughput
from benchmarks.rfid_domain import make_workload
from fleetstream.codecs import DecodeError, decode_rfid, format_ts
from fleetstream.config import Settings
from fleetstream.domain.readers import ReaderRegistry
from fleetstream.embedded import EmbeddedBroker, free_port
from fleetstream.streaming.topics import TopicSpec, ensure_topics


def make_messages(per_second: list, mode: int, limit: int | None) -> list[tuple[bytes, bytes]]:
    """Keyed messages in time order: one read each (mode 1), or each observation's reports in one array."""
    reads = sorted((r for firsts, dups in per_second for r in firsts + dups), key=lambda r: r.ts_ms)
    if limit is not None:
        reads = reads[:limit]

    def doc(read: object) -> dict:
        return {"tag_id": read.tag_id, "reader_id": read.reader_id, "ts": format_ts(read.ts_ms),  # type: ignore[attr-defined]
                "rssi_dbm": round(read.rssi_dbm, 1), "antenna": 1}  # type: ignore[attr-defined]

    if mode == 1:
        return [(r.tag_id.encode(), orjson.dumps(doc(r))) for r in reads]
    bursts: dict[tuple[str, str, int], list] = {}  # (tag, reader, second) -> its reports, in time order
    for r in reads:
        bursts.setdefault((r.tag_id, r.reader_id, r.ts_ms // 1000), []).append(doc(r))
    ordered = sorted(bursts.items(), key=lambda kv: kv[1][0]["ts"])
    return [(tag.encode(), orjson.dumps(items)) for (tag, _, _), items in ordered]


def baseline_work(registry: ReaderRegistry):
    """The aiokafka baseline's per-message work: decode + validate + reader lookup + encode, one output per read."""

    def work(key: bytes | None, value: bytes | None, now_ms: int) -> list[bytes]:
        out = []
        for item in decode_rfid(key, value, now_ms=now_ms):
            if isinstance(item, DecodeError):
                out.append(orjson.dumps({"error": item.reason}))
                continue
            reader = registry.get(item.reader_id)
            out.append(orjson.dumps({"tag_id": item.tag_id, "reader_id": item.reader_id, "ts": format_ts(item.ts_ms),
                                     "zone_id": reader.zone_id if reader is not None else None}))
        return out

    return work


def run_worker(broker_url: str, topic: str, n_reads: int, partitions: int, workdir: Path, tag: str,
               readers_topic: str, assets_topic: str) -> tuple[float, float]:
    settings = Settings.load(
        env={}, broker=broker_url, app_id=f"bench-{tag}", rfid_topic=topic, readers_topic=readers_topic,
        asset_registry_topic=assets_topic, assets_topic=f"{topic}.{tag}.assets", positions_topic=f"{topic}.{tag}.pos",
        enriched_topic=f"{topic}.{tag}.enriched", deadletter_topic=f"{topic}.{tag}.dead",
        geofence_events_topic=f"{topic}.{tag}.events", geofences_topic=f"bench.{tag}.geofences",
        telemetry_topic=f"{topic}.{tag}.telemetry", alerts_topic=f"{topic}.{tag}.alerts",
        trips_topic=f"{topic}.{tag}.trips", rules_topic=f"bench.{tag}.rules", partitions=partitions,
        web_port=free_port(), web_host="127.0.0.1", data_dir=str(workdir / tag),
    )
    env = {**os.environ, **settings.to_env()}
    log = open(workdir / f"{tag}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "fleetstream", "worker"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited {proc.returncode}; see {workdir / f'{tag}.log'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/rfid/status", timeout=2) as r:
                    status = orjson.loads(r.read())
            except OSError:
                time.sleep(0.2)
                continue
            if status["reads_in"] >= n_reads and status["last_flush_wall_s"]:
                if status["deadlettered"]:
                    raise RuntimeError(f"dead letters in the benchmark: {status['deadlettered_by_reason']}")
                return (status["last_flush_wall_s"] - status["first_batch_wall_s"],
                        status["last_flush_cpu_s"] - status["first_batch_cpu_s"])
            time.sleep(0.1)
        raise TimeoutError("worker did not finish in time")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def measure_vehicle_feed(bootstrap: str, n: int, partitions: int, runs: int) -> dict:
    """The cost of the replicated vehicle view (``streaming/vehicle_feed.py``) to every worker: a group-less
    consumer over the enriched positions, keys filtered before decoding (``keyed``), against decoding every record
    (``decode all``, what a view without the key filter would pay). Rate and CPU per enriched record."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from fleetstream.streaming.vehicle_feed import VehicleView, apply_enriched

    topic = "bench.rfid.enriched"
    records = []
    for key, value in throughput.make_messages(n, 1000, 1):
        doc = orjson.loads(value)
        doc.update(h3="891f1d48a2bffff", geofences=["depot"], motion="moving", odometer_m=1234.5)
        records.append((key, orjson.dumps(doc)))
    asyncio.run(ensure_topics(Settings.load(env={}, partitions=partitions, broker=f"kafka://{bootstrap}"),
                              [TopicSpec(topic, partitions)]))
    asyncio.run(throughput.load(bootstrap, topic, records))
    wanted = frozenset(f"veh-{i:05d}".encode() for i in range(20))

    async def skim(decode_all: bool) -> tuple[float, float]:
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                    max_partition_fetch_bytes=4 * 1024 * 1024)
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in range(partitions)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            view, done = VehicleView(), 0
            t0, c0 = time.perf_counter(), time.process_time()
            while done < n:
                batch = await consumer.getmany(timeout_ms=500, max_records=20_000)
                for messages in batch.values():
                    done += len(messages)
                    for m in messages:
                        if decode_all:
                            orjson.loads(m.value)
                        if m.key in wanted:
                            apply_enriched(view, wanted, m.key, m.value)
            assert len(view) == len(wanted)
            return time.perf_counter() - t0, time.process_time() - c0
        finally:
            await consumer.stop()

    out: dict[tuple[str, str], list[tuple[float, float]]] = {}
    print(f"\nvehicle feed: {n:,} enriched positions of 1,000 devices, 20 carry readers")
    for run in range(runs):
        for name, decode_all in (("keyed", False), ("decode all", True)):
            wall, cpu = asyncio.run(skim(decode_all))
            out.setdefault(("vehicle feed", name), []).append((n / wall, cpu / n * 1e6))
            print(f"  run {run} {name:10s} {n / wall:10,.0f} records/s  {cpu / n * 1e6:6.2f} CPU us/record")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tags", type=int, default=10_000)
    parser.add_argument("--readers", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=2, help="simulated seconds of reads (~132k reads each)")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default="1,11", help="reads per message: 1 and/or 11 (an observation's burst)")
    parser.add_argument("--single-read-limit", type=int, default=40_000)
    parser.add_argument("--positions", type=int, default=20_000, help="single-fix positions for the core ratio")
    parser.add_argument("--vehicle-feed", type=int, default=200_000,
                        help="enriched positions the vehicle feed skims (20 of 1,000 devices carry readers); 0 skips")
    args = parser.parse_args()

    from fleetstream.streaming.readers_feed import publish_assets, publish_readers

    registry, assets, _, per_second = make_workload(args.tags, args.readers, args.seconds)
    workdir = Path(tempfile.mkdtemp(prefix="fleetstream-bench-rfid-"))
    broker = EmbeddedBroker(log_path=workdir / "tansu.log").start()
    print(f"broker {broker.url}; {args.tags:,} tags, {len(registry)} readers; {args.partitions} partitions; "
          f"{args.runs} runs")
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    try:
        base = Settings.load(env={}, broker=broker.url, partitions=args.partitions,
                             readers_topic="bench.rfid.readers", asset_registry_topic="bench.rfid.registry")
        asyncio.run(ensure_topics(base, [TopicSpec(base.readers_topic, 1, compacted=True),
                                         TopicSpec(base.asset_registry_topic, 1, compacted=True)]))
        asyncio.run(publish_readers(base, registry))
        asyncio.run(publish_assets(base, assets))
        work = baseline_work(registry)
        for mode in (int(m) for m in args.modes.split(",") if m):
            messages = make_messages(per_second, mode, args.single_read_limit if mode == 1 else None)
            n = sum(len(orjson.loads(v)) if mode != 1 else 1 for _, v in messages)
            topic = f"bench.rfid.x{mode}"
            asyncio.run(ensure_topics(base, [TopicSpec(topic, args.partitions)]))
            asyncio.run(throughput.load(broker.bootstrap, topic, messages))
            print(f"\nmode {mode} read(s)/message: {n:,} reads in {len(messages):,} messages")
            for run in range(args.runs):
                for name in ("worker", "aiokafka"):
                    tag = f"rfid{name}{mode}r{run}"
                    if name == "worker":
                        wall, cpu = run_worker(broker.url, topic, n, args.partitions, workdir, tag,
                                               base.readers_topic, base.asset_registry_topic)
                    else:
                        out_topic = f"{topic}.{tag}.out"
                        asyncio.run(ensure_topics(base, [TopicSpec(out_topic, args.partitions)]))
                        wall, cpu = asyncio.run(throughput.run_aiokafka(broker.bootstrap, topic, out_topic, n,
                                                                        work=work))
                    results.setdefault((f"reads x{mode}", name), []).append((n / wall, cpu / n * 1e6))
                    print(f"  run {run} {name:9s} {n / wall:10,.0f} reads/s  {cpu / n * 1e6:7.1f} CPU us/read")
        if args.positions:
            topic = "bench.rfid.positions"
            asyncio.run(ensure_topics(base, [TopicSpec(topic, args.partitions)]))
            asyncio.run(throughput.load(broker.bootstrap, topic, throughput.make_messages(args.positions, 1000, 1)))
            print(f"\npositions, 1 fix/message: {args.positions:,} fixes")
            for run in range(args.runs):
                for name in ("worker", "aiokafka"):
                    tag = f"pos{name}r{run}"
                    if name == "worker":
                        wall, cpu = throughput.run_worker(broker.url, topic, args.positions, args.partitions,
                                                          workdir, tag)
                    else:
                        out_topic = f"{topic}.{tag}.out"
                        asyncio.run(ensure_topics(base, [TopicSpec(out_topic, args.partitions)]))
                        wall, cpu = asyncio.run(throughput.run_aiokafka(broker.bootstrap, topic, out_topic,
                                                                        args.positions))
                    results.setdefault(("positions x1", name), []).append((args.positions / wall,
                                                                           cpu / args.positions * 1e6))
                    print(f"  run {run} {name:9s} {args.positions / wall:10,.0f} fixes/s  "
                          f"{cpu / args.positions * 1e6:7.1f} CPU us/fix")
        if args.vehicle_feed:
            results.update(measure_vehicle_feed(broker.bootstrap, args.vehicle_feed, args.partitions, args.runs))
    finally:
        broker.stop()

    print("\nmedians")
    for workload in sorted({w for w, _ in results}):
        if workload.startswith("vehicle feed"):
            for name in sorted(n for w, n in results if w == workload):
                rate = statistics.median(r for r, _ in results[(workload, name)])
                cpu = statistics.median(c for _, c in results[(workload, name)])
                print(f"  {workload} {name}: {rate:,.0f} records/s ({cpu:.2f} us CPU per record)")
            continue
        rate = {name: statistics.median(r for r, _ in results[(workload, name)]) for w, name in results
                if w == workload}
        cpu = {name: statistics.median(c for _, c in results[(workload, name)]) for w, name in results
               if w == workload}
        print(f"  {workload:13s} worker {rate['worker']:,.0f}/s ({cpu['worker']:.1f} us CPU); aiokafka "
              f"{rate['aiokafka']:,.0f}/s ({cpu['aiokafka']:.1f} us CPU); worker / aiokafka = "
              f"{rate['worker'] / rate['aiokafka']:.2f}")


if __name__ == "__main__":
    main()
