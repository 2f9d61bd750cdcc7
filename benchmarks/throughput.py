"""End-to-end throughput of a ``fleetstream worker`` against two baselines doing the same work, in one run.

    python benchmarks/throughput.py [--fixes 200000] [--partitions 4] [--runs 3] [--modes 1,50]

A fresh embedded Tansu broker is started and loaded with N positions per message mode (``1`` = one fix per
Kafka message, ``50`` = arrays of 50 buffered fixes of one device). Then, per mode and run, each pipeline
reads the same input with its own consumer group and writes its own output topic:

- ``worker``: a real ``fleetstream worker`` process (decode + validate + state + H3 + derived motion + encode,
  dead letters, changelog). Measured from its first batch to its last acknowledged flush (its ``/status``).
- ``aiokafka``: a plain aiokafka batch consumer-producer doing decode + validate + H3 + encode with
  ``send_batch`` (the practical ceiling: no state, no group rebalancing protocol, no changelog).
- ``quix``: Quix Streams (if installed) doing the same decode + validate + H3 + encode per message.

Prints, per mode, the median rate over the runs, CPU microseconds per fix, and ratios against the baselines.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import h3
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fleetstream.codecs import DecodeError, decode_positions, format_ts
from fleetstream.config import Settings
from fleetstream.embedded import EmbeddedBroker, free_port
from fleetstream.streaming.topics import TopicSpec, ensure_topics

START_MS = 1_780_000_000_000
# the worker with the filter chain and motion/trips off: what "with them off" means for the filters+rules target
BARE = {"filter_null_island": False, "filter_max_future_s": 0.0, "max_accuracy_m": 0.0, "max_speed_kmh": 0.0,
        "trips_enabled": False}


def make_messages(n_fixes: int, devices: int, per_message: int, seed: int = 1) -> list[tuple[bytes, bytes]]:
    """Deterministic keyed messages: devices random-walking around a city, ~148-byte fixes, speeds that follow on
    from fix to fix (as real ones do: rules with durations see runs, not noise)."""
    rng = random.Random(seed)
    state = {f"veh-{i:05d}": [53.40 + rng.uniform(-0.1, 0.1), -2.98 + rng.uniform(-0.1, 0.1), START_MS,
                              rng.uniform(0, 80)] for i in range(devices)}
    ids = list(state)
    out: list[tuple[bytes, bytes]] = []
    made = 0
    while made < n_fixes:
        device = ids[rng.randrange(devices)]
        s = state[device]
        fixes = []
        for _ in range(min(per_message, n_fixes - made)):
            s[0] += rng.gauss(0, 0.0002)
            s[1] += rng.gauss(0, 0.0003)
            s[2] += 5000
            s[3] = min(90.0, max(0.0, s[3] + rng.gauss(0, 3)))  # speed follows on from the last fix
            fixes.append({"device_id": device, "ts": format_ts(s[2]), "lat": round(s[0], 6), "lon": round(s[1], 6),
                          "speed_kmh": round(s[3], 1), "heading_deg": round(rng.uniform(0, 359), 1),
                          "accuracy_m": 5.0})
        made += len(fixes)
        out.append((device.encode(), orjson.dumps(fixes[0] if per_message == 1 else fixes)))
    return out


async def load(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    from aiokafka import AIOKafkaProducer

    from fleetstream.streaming.output import BatchProducer, OutRecord

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=512 * 1024)
    await producer.start()
    try:
        out = BatchProducer(producer)
        for i in range(0, len(messages), 20_000):
            await out.flush(OutRecord(topic, k, v) for k, v in messages[i : i + 20_000])
    finally:
        await producer.stop()


def work(key: bytes | None, value: bytes | None, now_ms: int) -> list[bytes]:
    """The baselines' per-message work: decode + validate + H3 + encode (no state)."""
    out = []
    for item in decode_positions(key, value, now_ms=now_ms):
        if isinstance(item, DecodeError):
            out.append(orjson.dumps({"error": item.reason}))
            continue
        out.append(orjson.dumps({"device_id": item.device_id, "ts": format_ts(item.ts_ms), "lat": item.lat,
                                 "lon": item.lon, "h3": h3.latlng_to_cell(item.lat, item.lon, 9),
                                 "speed_kmh": item.speed_kmh}))
    return out


async def run_aiokafka(bootstrap: str, topic: str, out_topic: str, n_fixes: int,
                       work: Callable[[bytes | None, bytes | None, int], list[bytes]] = work) -> tuple[float, float]:
    """``work``: the per-message work (decode + validate + H3 + encode here; benchmarks/rfid.py passes its own)."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    from fleetstream.streaming.output import BatchProducer, OutRecord

    group = f"bench-aiokafka-{time.time_ns()}"
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest",
                                enable_auto_commit=False, max_partition_fetch_bytes=4 * 1024 * 1024)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", max_batch_size=512 * 1024)
    await consumer.start()
    await producer.start()
    out = BatchProducer(producer)
    done = 0
    t0 = c0 = None
    try:
        while done < n_fixes:
            batches = await consumer.getmany(timeout_ms=500, max_records=2000)
            if not batches:
                continue
            if t0 is None:
                t0, c0 = time.perf_counter(), time.process_time()
            now_ms = int(time.time() * 1000)
            records = []
            for tp, messages in batches.items():
                for m in messages:
                    for value in work(m.key, m.value, now_ms):
                        records.append(OutRecord(out_topic, m.key, value, tp.partition))
            await out.flush(records)
            await consumer.commit()
            done += len(records)
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        await consumer.stop()
        await producer.stop()


def run_quix(bootstrap: str, topic: str, out_topic: str, n_fixes: int) -> tuple[float, float]:
    from quixstreams import Application

    app = Application(broker_address=bootstrap, consumer_group=f"bench-quix-{time.time_ns()}",
                      auto_offset_reset="earliest", loglevel="WARNING", use_changelog_topics=False)
    source = app.topic(topic, key_deserializer="bytes", value_deserializer="bytes")
    sink = app.topic(out_topic, key_serializer="bytes", value_serializer="bytes")
    marks: dict[str, float] = {}
    done = [0]

    def step(value: bytes, key: bytes, timestamp: int, headers: object) -> list[bytes]:
        if "t0" not in marks:
            marks["t0"], marks["c0"] = time.perf_counter(), time.process_time()
        outputs = work(key, value, int(time.time() * 1000))
        done[0] += len(outputs)
        if done[0] >= n_fixes:
            app.stop()
        return outputs

    sdf = app.dataframe(source).apply(step, expand=True, metadata=True)
    sdf.to_topic(sink)
    app.run()
    return time.perf_counter() - marks["t0"], time.process_time() - marks["c0"]


def run_worker(broker_url: str, topic: str, n_fixes: int, partitions: int, workdir: Path, tag: str,
               wrapper: list[str] | None = None, geofences_topic: str | None = None,
               **overrides: object) -> tuple[float, float]:
    """Run a real worker over the loaded topic; ``overrides`` are extra settings (a variant under test)."""
    settings = Settings.load(
        env={}, broker=broker_url, app_id=f"bench-{tag}", positions_topic=topic,
        enriched_topic=f"{topic}.{tag}.enriched", deadletter_topic=f"{topic}.{tag}.dead",
        geofence_events_topic=f"{topic}.{tag}.events", geofences_topic=geofences_topic or f"bench.{tag}.geofences",
        telemetry_topic=f"{topic}.{tag}.telemetry", alerts_topic=f"{topic}.{tag}.alerts",
        trips_topic=f"{topic}.{tag}.trips", cells_topic=f"{topic}.{tag}.cells",
        cell_partials_topic=f"{topic}.{tag}.partials", partitions=partitions, web_port=free_port(),
        web_host="127.0.0.1", data_dir=str(workdir / tag), **{"rules_topic": f"bench.{tag}.rules", **overrides},
    )
    env = {**os.environ, **settings.to_env()}
    log = open(workdir / f"{tag}.log", "wb")  # noqa: SIM115
    command = [*(wrapper or []), sys.executable, "-m", "fleetstream", "worker"]
    proc = subprocess.Popen(command, env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited {proc.returncode}; see {workdir / f'{tag}.log'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/status", timeout=2) as r:
                    status = orjson.loads(r.read())
            except OSError:
                time.sleep(0.2)
                continue
            if status["enriched"] + status["deadlettered"] >= n_fixes and status["last_flush_wall_s"]:
                wall = status["last_flush_wall_s"] - status["first_batch_wall_s"]
                cpu = status["last_flush_cpu_s"] - status["first_batch_cpu_s"]
                return wall, cpu
            time.sleep(0.1)
        raise TimeoutError("worker did not finish in time")
    finally:
        proc.send_signal(signal.SIGINT if wrapper else signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixes", type=int, default=200_000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--modes", default="1,50", help="fixes per message, comma separated")
    parser.add_argument("--single-fix-limit", type=int, default=50_000,
                        help="cap on fixes for the 1-fix-per-message mode (Faust pays ~200 us per message)")
    parser.add_argument("--pipelines", default="worker,aiokafka,quix")
    parser.add_argument("--geofences", default="0",
                        help="geofence counts to run the worker with, comma separated (e.g. 0,10000)")
    parser.add_argument("--rules", default="0",
                        help="alert rule counts to run the worker with, comma separated (e.g. 0,50): a mix of "
                        "overspeed, position thresholds, offline, maintenance, geofence and telemetry rules")
    parser.add_argument("--bare", action="store_true",
                        help="also run the worker with the filter chain and motion/trips off (and no rules): the "
                        "baseline the filters + motion + rules figure is compared with")
    parser.add_argument("--no-aggregation", action="store_true",
                        help="also run the worker with aggregation off (worker-noagg): the baseline of the "
                        "aggregation-on figure (the worker aggregates by default)")
    parser.add_argument("--worker-wrapper", default="", help="command prefix for the worker, e.g. a profiler")
    args = parser.parse_args()
    pipelines = args.pipelines.split(",")
    if "quix" in pipelines:
        try:
            import quixstreams  # noqa: F401
        except ImportError:
            print("quixstreams not installed (pip install -e '.[bench]'): skipping that baseline")
            pipelines.remove("quix")

    fence_counts = [int(g) for g in args.geofences.split(",")]
    rule_counts = [int(r) for r in args.rules.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="fleetstream-bench-"))
    broker = EmbeddedBroker(log_path=workdir / "tansu.log").start()
    print(f"broker {broker.url}; {args.partitions} partitions; {args.runs} runs; work dir {workdir}")
    results: dict[tuple[int, str], list[tuple[float, float]]] = {}
    try:
        fence_topics = {g: publish_fences(broker.url, g) for g in fence_counts if g}
        rule_topics = {r: publish_rules(broker.url, r) for r in rule_counts if r}
        for mode in (int(m) for m in args.modes.split(",")):
            n = min(args.fixes, args.single_fix_limit) if mode == 1 else args.fixes
            topic = f"bench.positions.x{mode}"
            base = Settings.load(env={}, broker=broker.url, partitions=args.partitions)
            asyncio.run(ensure_topics(base, [TopicSpec(topic, args.partitions)]))
            messages = make_messages(n, args.devices, mode)
            size = sum(len(v) for _, v in messages) / n
            asyncio.run(load(broker.bootstrap, topic, messages))
            print(f"\nmode {mode} fix(es)/message: {n:,} fixes in {len(messages):,} messages, {size:.0f} B/fix")
            for run in range(args.runs):
                runs = [(name, 0) for name in pipelines if name != "worker"]
                if "worker" in pipelines:
                    variants = [(g, r) for g in fence_counts for r in rule_counts]
                    runs = [("worker" + (f"+{g}gf" if g else "") + (f"+{r}rules" if r else ""), (g, r))
                            for g, r in variants] + runs
                    if args.bare:
                        runs = [("worker-bare", (0, 0)), *runs]
                    if args.no_aggregation:
                        runs = [("worker-noagg", (0, 0)), *runs]
                for name, (fences, rules) in ((n_, v if isinstance(v, tuple) else (v, 0)) for n_, v in runs):
                    tag = f"{name.replace('+', '')}{mode}r{run}"
                    out_topic = f"{topic}.{tag}.out"
                    asyncio.run(ensure_topics(base, [TopicSpec(out_topic, args.partitions)]))
                    if name.startswith("worker"):
                        wall, cpu = run_worker(broker.url, topic, n, args.partitions, workdir, tag,
                                               wrapper=args.worker_wrapper.split() or None,
                                               geofences_topic=fence_topics.get(fences),
                                               **({"rules_topic": rule_topics[rules]} if rules else {}),
                                               **(BARE if name == "worker-bare" else {}),
                                               **({"aggregation_enabled": False} if name == "worker-noagg" else {}))
                    elif name == "aiokafka":
                        wall, cpu = asyncio.run(run_aiokafka(broker.bootstrap, topic, out_topic, n))
                    else:
                        wall, cpu = _in_subprocess_quix(broker.bootstrap, topic, out_topic, n)
                    results.setdefault((mode, name), []).append((n / wall, cpu / n * 1e6))
                    print(f"  run {run} {name:9s} {n / wall:10,.0f} fixes/s  {cpu / n * 1e6:7.1f} CPU us/fix")
    finally:
        broker.stop()

    print("\nmedians")
    for mode in sorted({m for m, _ in results}):
        rates = {name: statistics.median(r for r, _ in results[(mode, name)]) for m, name in results if m == mode}
        cpus = {name: statistics.median(c for _, c in results[(mode, name)]) for m, name in results if m == mode}
        line = [f"{name} {rates[name]:,.0f}/s ({cpus[name]:.1f} us/fix)" for name in rates]
        print(f"  {mode:>3} fix/msg: " + "; ".join(line))
        if "worker" in rates:
            for other in rates:
                if other != "worker":
                    own = (f" (median of the runs' own ratios: {paired(results, mode, other, 'worker'):.2f}x)"
                           if other.startswith("worker") else "")
                    print(f"           {other} / worker = {rates[other] / rates['worker']:.2f}x{own}")
        if "worker-noagg" in rates and "worker" in rates:
            print(f"           worker (aggregation on) / worker-noagg = {rates['worker'] / rates['worker-noagg']:.2f}x"
                  f" (median of the runs' own ratios: {paired(results, mode, 'worker', 'worker-noagg'):.2f}x)")
        if "worker-bare" in rates:
            for other in rates:
                if other.startswith("worker") and other != "worker-bare":
                    print(f"           {other} / worker-bare = {rates[other] / rates['worker-bare']:.2f}x"
                          f" (median of the runs' own ratios: {paired(results, mode, other, 'worker-bare'):.2f}x)")


def paired(results: dict[tuple[int, str], list[tuple[float, float]]], mode: int, name: str, base: str) -> float:
    """The median over runs of each run's rate ratio: the two ran back to back, so a noisy stretch of the shared
    machine hits both sides of a pair more often than it hits two medians alike."""
    return statistics.median(a[0] / b[0] for a, b in zip(results[(mode, name)], results[(mode, base)], strict=True))


def publish_fences(broker_url: str, count: int) -> str:
    """``count`` geofences around the benchmark's area on their own compacted topic; returns the topic."""
    from benchmarks.geofence_index import make_fences
    from fleetstream.streaming.geofence_feed import publish_geofences

    settings = Settings.load(env={}, broker=broker_url, geofences_topic=f"bench.geofences.{count}")
    fences = make_fences(count, center=(53.40, -2.98))
    asyncio.run(ensure_topics(settings, [TopicSpec(settings.geofences_topic, 1, compacted=True)]))
    asyncio.run(publish_geofences(settings, fences))
    return settings.geofences_topic


def make_rules(count: int) -> dict:
    """``count`` alert rules applying to the benchmark's vehicles, cycling through the kinds a fleet runs:
    overspeed with a duration, position-field thresholds, maintenance by odometer, keep-out geofences,
    telemetry thresholds (not visited by fixes), and one offline rule (which updates every device's state)."""
    rules: list[dict] = [{"id": "offline", "kind": "offline", "severity": "major", "after": "10m"}]
    i = 0
    while len(rules) < count:
        kind = i % 5
        rid = f"r{i}"
        if kind == 0:
            rules.append({"id": rid, "kind": "overspeed", "severity": "major", "limit_kmh": 100 + i % 40,
                          "for": "30s"})
        elif kind == 1:
            rules.append({"id": rid, "kind": "threshold", "severity": "minor",
                          "when": f"speed_kmh > {60 + i % 30} for 5m"})
        elif kind == 2:
            rules.append({"id": rid, "kind": "maintenance", "severity": "info", "every_km": 5000 + 100 * i})
        elif kind == 3:
            rules.append({"id": rid, "kind": "keep_out", "severity": "major", "geofences": [f"restricted-{i}"]})
        else:
            rules.append({"id": rid, "kind": "threshold", "severity": "warning",
                          "when": f"temperature_c > {5 + i % 5} for 10m"})
        i += 1
    return {"groups": {"fleet": ["veh-*"]}, "rules": [{**r, "groups": ["fleet"]} for r in rules[:count]]}


def publish_rules(broker_url: str, count: int) -> str:
    """``count`` rules (see make_rules) on their own compacted rules topic; returns the topic."""
    from fleetstream.domain.rules import parse_rules
    from fleetstream.streaming.rules_feed import publish_rules as publish

    settings = Settings.load(env={}, broker=broker_url, rules_topic=f"bench.rules.{count}")
    asyncio.run(ensure_topics(settings, [TopicSpec(settings.rules_topic, 1, compacted=True)]))
    asyncio.run(publish(settings, parse_rules(make_rules(count))))
    return settings.rules_topic


def _in_subprocess_quix(bootstrap: str, topic: str, out_topic: str, n: int) -> tuple[float, float]:
    """Quix runs in its own process so its librdkafka threads do not share our CPU clock."""
    code = (
        "import sys, orjson; sys.path.insert(0, sys.argv[1]); import benchmarks.throughput as t; "
        "print(orjson.dumps(t.run_quix(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))).decode())"
    )
    done = subprocess.run([sys.executable, "-c", code, str(ROOT), bootstrap, topic, out_topic, str(n)],
                          capture_output=True, text=True, check=True, cwd=ROOT)
    wall, cpu = orjson.loads(done.stdout.strip().splitlines()[-1])
    return wall, cpu


if __name__ == "__main__":
    main()
