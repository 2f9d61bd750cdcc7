"""What Prometheus metrics cost a worker: end-to-end throughput with metrics on and off, in the same run.

    python benchmarks/metrics_overhead.py [--fixes 100000] [--runs 3] [--modes 1,50] [--partitions 4]

One embedded broker is loaded once per message mode (``1`` = one fix per Kafka message, ``50`` = arrays of 50);
then real ``fleetstream worker`` processes read the same input, alternately with ``FLEETSTREAM_METRICS_ENABLED``
true and false (on, off, off, on, ... so drift on a shared machine falls on both sides). The rate is measured as
in benchmarks/throughput.py, from the worker's first batch to its last acknowledged flush. Prints every run, the
median rate and CPU per fix of each side, and the overhead: 1 - rate(on) / rate(off). Target: under 5%.

End-to-end rates on a shared 2-core machine swing by +-25% run to run, more than the effect measured. So the
script also times, in process, the only code the setting switches (the worker's per-batch metric updates, on a
real batch of the same messages) and prints it per fix next to the worker's CPU per fix.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import load, make_messages, run_worker
from fleetstream.config import Settings
from fleetstream.embedded import EmbeddedBroker
from fleetstream.streaming.topics import TopicSpec, ensure_topics


def observe_cost_us(messages: list[tuple[bytes, bytes]], batch_messages: int, reps: int = 300) -> tuple[float, int]:
    """CPU microseconds the worker's metric updates take for one batch of ``batch_messages`` messages, and the
    fixes in that batch: the worker's own ``_process`` and ``_observe`` on a real batch, no broker."""
    from faust.types.tuples import Message
    from prometheus_client import CollectorRegistry

    from fleetstream.streaming.app import create_app
    from fleetstream.streaming.pipeline import InRecord, PositionPipeline

    class NoState:
        def get(self, partition: int, key: bytes) -> bytes | None:
            return None

    settings = Settings.load(env={})
    worker = create_app(settings, CollectorRegistry()).fleetstream_worker
    worker.pipeline = PositionPipeline(settings, NoState(), changelog_topic="bench-changelog")
    now = time.time()
    batch = messages[:batch_messages]
    records = [InRecord(settings.positions_topic, i % 4, i, key, value) for i, (key, value) in enumerate(batch)]
    consumed = [Message(r.topic, r.partition, r.offset, now, 0, [], r.key, r.value, None) for r in records]
    output = worker._process(records)
    offsets: dict[tuple[str, int], list[int]] = {}
    for n, out in enumerate(output.records):
        offsets.setdefault((out.topic, out.partition or 0), []).append(n)
    started = time.process_time()
    for _ in range(reps):
        worker._observe(output, offsets, consumed, time.perf_counter())
    return (time.process_time() - started) / reps * 1e6, output.fixes


def order(runs: int) -> list[bool]:
    """on, off, off, on, on, off, ...: each side goes first equally often."""
    out: list[bool] = []
    for run in range(runs):
        pair = [True, False] if run % 2 == 0 else [False, True]
        out += pair
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixes", type=int, default=100_000, help="fixes per run in the array mode")
    parser.add_argument("--single-fix-limit", type=int, default=20_000,
                        help="fixes per run in the 1-fix-per-message mode (Faust pays ~200 us per message)")
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3, help="runs per side and mode")
    parser.add_argument("--modes", default="1,50", help="fixes per message, comma separated")
    parser.add_argument("--batch-messages", type=int, default=200,
                        help="messages per batch for the in-process timing (workers here see ~50-400)")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="fleetstream-metrics-bench-"))
    broker = EmbeddedBroker(log_path=workdir / "tansu.log").start()
    print(f"broker {broker.url}; {args.partitions} partitions; {args.runs} runs per side; work dir {workdir}")
    results: dict[tuple[int, bool], list[tuple[float, float]]] = {}
    observe: dict[int, tuple[float, int]] = {}
    try:
        for mode in (int(m) for m in args.modes.split(",")):
            n = min(args.fixes, args.single_fix_limit) if mode == 1 else args.fixes
            topic = f"bench.metrics.x{mode}"
            base = Settings.load(env={}, broker=broker.url, partitions=args.partitions)
            asyncio.run(ensure_topics(base, [TopicSpec(topic, args.partitions)]))
            messages = make_messages(n, args.devices, mode)
            observe[mode] = observe_cost_us(messages, args.batch_messages)
            asyncio.run(load(broker.bootstrap, topic, messages))
            print(f"\nmode {mode} fix(es)/message: {n:,} fixes in {len(messages):,} messages")
            for i, enabled in enumerate(order(args.runs)):
                tag = f"m{'on' if enabled else 'off'}{mode}r{i}"
                # the wrapper sets the variable after Settings.to_env() has set every other one
                wrapper = ["env", f"FLEETSTREAM_METRICS_ENABLED={'true' if enabled else 'false'}"]
                wall, cpu = run_worker(broker.url, topic, n, args.partitions, workdir, tag, wrapper=wrapper)
                results.setdefault((mode, enabled), []).append((n / wall, cpu / n * 1e6))
                print(f"  run {i} metrics {'on ' if enabled else 'off'} {n / wall:10,.0f} fixes/s "
                      f"{cpu / n * 1e6:7.1f} CPU us/fix")
    finally:
        broker.stop()

    print("\nmedians")
    for mode in sorted({m for m, _ in results}):
        on_rate = statistics.median(r for r, _ in results[(mode, True)])
        off_rate = statistics.median(r for r, _ in results[(mode, False)])
        on_cpu = statistics.median(c for _, c in results[(mode, True)])
        off_cpu = statistics.median(c for _, c in results[(mode, False)])
        overhead = 1 - on_rate / off_rate
        print(f"  {mode:>3} fix/msg: metrics on {on_rate:,.0f}/s ({on_cpu:.1f} us/fix), off {off_rate:,.0f}/s "
              f"({off_cpu:.1f} us/fix): on/off = {on_rate / off_rate:.3f}, overhead {overhead:+.1%} of throughput, "
              f"{on_cpu - off_cpu:+.1f} CPU us/fix {'(within 5%)' if overhead < 0.05 else '(OVER the 5% target)'}")
        batch_us, fixes = observe[mode]
        share = batch_us / fixes / off_cpu
        print(f"           in process: metric updates {batch_us:.0f} us per batch of {args.batch_messages} messages "
              f"({fixes} fixes) = {batch_us / fixes:.2f} us/fix = {share:.2%} of the worker's "
              f"{off_cpu:.1f} CPU us/fix without metrics")


if __name__ == "__main__":
    main()
