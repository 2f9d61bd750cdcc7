"""Query API latency and rate while the worker ingests: ``/devices/{id}`` and ``/nearby``.

    python benchmarks/api.py [--devices 100000] [--ingest-rate 10000] [--per-message 10] [--seconds 20]
                             [--concurrency 8] [--runs 3]

A fresh embedded broker and one real ``fleetstream worker``; N devices each report one fix (the tracked state),
then a producer keeps sending fixes at ``--ingest-rate`` per second while a client asks the API with
``--concurrency`` requests in flight. Per endpoint: requests per second, p50 and p99 latency (median over
runs), and the ingest rate the worker actually achieved during the run. The same client against ``/health``
(no state touched) is the baseline measured in the same run: the HTTP floor of Faust's web server.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.throughput import load
from fleetstream.codecs import format_ts
from fleetstream.config import Settings
from fleetstream.embedded import EmbeddedBroker, free_port
from fleetstream.streaming.topics import ensure_topics
from tests.integration.helpers import WorkerProcess

CENTER = (53.40, -2.98)
SPREAD_DEG = 0.5  # devices over a ~55 x 35 km area


def fix_dict(device: str, ts_ms: int, rng: random.Random) -> dict:
    return {"device_id": device, "ts": format_ts(ts_ms),
            "lat": round(CENTER[0] + rng.uniform(-SPREAD_DEG, SPREAD_DEG) / 2, 6),
            "lon": round(CENTER[1] + rng.uniform(-SPREAD_DEG, SPREAD_DEG) / 2, 6), "speed_kmh": 30.0}


def fix(device: str, ts_ms: int, rng: random.Random) -> bytes:
    return orjson.dumps(fix_dict(device, ts_ms, rng))


async def ingest(bootstrap: str, topic: str, devices: list[str], rate: float, stop: asyncio.Event,
                 per_message: int) -> int:
    """Send fixes of random devices at ``rate`` per second, in 20 ms slices, until ``stop``; ``per_message``
    fixes of one device per Kafka message (trackers that buffer, as in benchmarks/throughput.py)."""
    from aiokafka import AIOKafkaProducer

    from fleetstream.streaming.output import BatchProducer, OutRecord

    rng = random.Random(3)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, max_batch_size=512 * 1024)
    await producer.start()
    sent = 0
    try:
        out = BatchProducer(producer)
        started = time.monotonic()
        while not stop.is_set():
            due = int((time.monotonic() - started) * rate) - sent
            if due > 0:
                now_ms = int(time.time() * 1000)
                records = []
                for _ in range(max(1, due // per_message)):
                    device = devices[rng.randrange(len(devices))]
                    fixes = [fix_dict(device, now_ms - (per_message - i) * 1000, rng) for i in range(per_message)]
                    value = orjson.dumps(fixes if per_message > 1 else fixes[0])
                    records.append(OutRecord(topic, device.encode(), value))
                await out.flush(records)
                sent += len(records) * per_message
            await asyncio.sleep(0.02)
    finally:
        await producer.stop()
    return sent


async def hammer(session: aiohttp.ClientSession, urls: list[str], seconds: float, concurrency: int) -> list[float]:
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    rng = random.Random(5)

    async def one_client() -> None:
        while time.monotonic() < deadline:
            url = urls[rng.randrange(len(urls))]
            started = time.perf_counter()
            async with session.get(url) as response:
                await response.read()
                if response.status != 200:
                    raise RuntimeError(f"{url}: {response.status}")
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(one_client() for _ in range(concurrency)))
    return latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_once(worker: WorkerProcess, bootstrap: str, devices: list[str], args: argparse.Namespace) -> dict:
    base = worker.base_url
    rng = random.Random(11)
    endpoints = {
        "health (baseline)": [f"{base}/health"],
        "devices/{id}": [f"{base}/devices/{devices[rng.randrange(len(devices))]}" for _ in range(1000)],
        "nearby 2 km, limit 20": [
            f"{base}/nearby?lat={CENTER[0] + rng.uniform(-0.2, 0.2):.5f}&lon={CENTER[1] + rng.uniform(-0.2, 0.2):.5f}"
            f"&radius_m=2000&limit=20" for _ in range(1000)
        ],
    }
    results = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency)) as session:
        for name, urls in endpoints.items():
            stop = asyncio.Event()
            before = worker.status()["fixes_in"]
            ingest_task = asyncio.create_task(ingest(bootstrap, worker.settings.positions_topic, devices,
                                                     args.ingest_rate, stop, args.per_message))
            started = time.monotonic()
            latencies = await hammer(session, urls, args.seconds, args.concurrency)
            elapsed = time.monotonic() - started
            stop.set()
            await ingest_task
            processed = worker.status()["fixes_in"] - before
            results[name] = {"rps": len(latencies) / elapsed, "p50_ms": percentile(latencies, 0.5) * 1000,
                             "p99_ms": percentile(latencies, 0.99) * 1000, "ingest_per_s": processed / elapsed}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=100_000)
    parser.add_argument("--ingest-rate", type=float, default=10_000)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--per-message", type=int, default=10, help="fixes per Kafka message while ingesting")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--partitions", type=int, default=4)
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="fleetstream-api-bench-"))
    broker = EmbeddedBroker(log_path=workdir / "tansu.log").start()
    port = free_port()
    settings = Settings.load(env={}, broker=broker.url, partitions=args.partitions, web_port=port,
                             web_host="127.0.0.1", advertised_url=f"http://127.0.0.1:{port}",
                             data_dir=str(workdir / "data"), rebalance_timeout_s=3, table_store="memory")
    worker = None
    try:
        asyncio.run(ensure_topics(settings))
        devices = [f"veh-{i:06d}" for i in range(args.devices)]
        rng = random.Random(1)
        now_ms = int(time.time() * 1000) - 60_000
        asyncio.run(load(broker.bootstrap, settings.positions_topic,
                         [(d.encode(), fix(d, now_ms, rng)) for d in devices]))
        worker = WorkerProcess(settings, workdir / "worker.log").start()
        deadline = time.monotonic() + 600
        while worker.status()["fixes_in"] < args.devices and time.monotonic() < deadline:
            time.sleep(1)
        print(f"{args.devices} devices tracked; ingesting {args.ingest_rate:.0f} fixes/s during each measurement, "
              f"{args.concurrency} requests in flight, {args.seconds:.0f} s per endpoint, {args.runs} runs")
        runs = [asyncio.run(run_once(worker, broker.bootstrap, devices, args)) for _ in range(args.runs)]
        print(f"{'endpoint':<24}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'ingest/s':>11}")
        for name in runs[0]:
            med = {k: statistics.median(r[name][k] for r in runs) for k in runs[0][name]}
            print(f"{name:<24}{med['rps']:>10.0f}{med['p50_ms']:>10.2f}{med['p99_ms']:>10.2f}{med['ingest_per_s']:>11.0f}")
    finally:
        if worker is not None:
            worker.stop()
        broker.stop()


if __name__ == "__main__":
    main()
