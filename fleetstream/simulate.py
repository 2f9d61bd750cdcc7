"""The fleet simulator and trace replay: producers for ``fleet.positions``.

The generator part is pure and seeded (tests count what it made); ``publish`` is the only I/O and sends with
``send_batch`` per partition, the murmur2 partition of the key, so records land where a keyed send would.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer

from fleetstream.codecs import format_ts
from fleetstream.domain.geo import destination
from fleetstream.streaming.output import BatchProducer, OutRecord
from fleetstream.traces import read_trace

M_PER_DEG_LAT = 111_320.0


class RecordKind(StrEnum):
    GOOD = "good"
    DUPLICATE = "duplicate"
    OUT_OF_ORDER = "out_of_order"
    OUTLIER = "outlier"
    MALFORMED = "malformed"


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    vehicles: int = 100
    rate_per_s: float = 1000.0  # fixes per second across the fleet (event time)
    duration_s: float = 60.0  # event time covered
    seed: int = 1
    center_lat: float = 53.40  # Liverpool
    center_lon: float = -2.98
    area_km: float = 8.0
    block_m: float = 180.0
    noise_m: float = 4.0
    outlier_share: float = 0.002
    duplicate_share: float = 0.005
    out_of_order_share: float = 0.005
    malformed_share: float = 0.01
    batch_size: int = 1  # fixes per message; > 1 sends arrays of buffered fixes of one device
    start_ms: int = 1_780_000_000_000


@dataclass(frozen=True, slots=True)
class SimRecord:
    key: bytes
    value: bytes
    ts_ms: int
    kind: RecordKind
    fixes: int  # fixes the record carries (a malformed record counts as one)


@dataclass(slots=True)
class _Vehicle:
    device_id: str
    lat: float
    lon: float
    heading: float  # one of 0, 90, 180, 270: the grid's directions
    to_next_m: float  # distance left to the next intersection
    speed_kmh: float = 0.0
    cruise_kmh: float = 40.0
    stopped_until_ms: int = 0


def _new_vehicle(i: int, config: SimulationConfig, rng: random.Random) -> _Vehicle:
    half = config.area_km * 500.0
    north = round(rng.uniform(-half, half) / config.block_m) * config.block_m
    east = round(rng.uniform(-half, half) / config.block_m) * config.block_m
    lat = config.center_lat + north / M_PER_DEG_LAT
    lon = config.center_lon + east / (M_PER_DEG_LAT * math.cos(math.radians(config.center_lat)))
    return _Vehicle(f"veh-{i:04d}", lat, lon, rng.choice((0.0, 90.0, 180.0, 270.0)), config.block_m,
                    cruise_kmh=rng.uniform(25, 55))


def _advance(v: _Vehicle, dt_s: float, now_ms: int, config: SimulationConfig, rng: random.Random) -> None:
    """Drive along the grid: accelerate to cruise speed, stop at some intersections (lights, deliveries)."""
    if now_ms < v.stopped_until_ms:
        v.speed_kmh = 0.0
        return
    v.speed_kmh = min(v.cruise_kmh, v.speed_kmh + 10.0 * dt_s)  # ~2.8 m/s² at most
    travel = v.speed_kmh / 3.6 * dt_s
    while travel > 0:
        step = min(travel, v.to_next_m)
        v.lat, v.lon = destination(v.lat, v.lon, v.heading, step)
        v.to_next_m -= step
        travel -= step
        if v.to_next_m <= 0:
            v.to_next_m = config.block_m
            v.heading = (v.heading + rng.choice((0.0, 0.0, 90.0, -90.0))) % 360.0
            if _outside(v, config):
                v.heading = (v.heading + 180.0) % 360.0
            roll = rng.random()
            if roll < 0.15:  # a red light
                v.stopped_until_ms = now_ms + rng.randint(10_000, 60_000)
            elif roll < 0.17:  # a delivery
                v.stopped_until_ms = now_ms + rng.randint(60_000, 600_000)
            if v.stopped_until_ms > now_ms:
                v.speed_kmh = 0.0
                return


def _outside(v: _Vehicle, config: SimulationConfig) -> bool:
    half_deg = config.area_km * 500.0 / M_PER_DEG_LAT
    return abs(v.lat - config.center_lat) > half_deg or abs(v.lon - config.center_lon) > half_deg * 1.6


MALFORMED_KINDS: tuple[Callable[[dict, random.Random], tuple[bytes | None, bytes]], ...] = (
    lambda f, r: (f["device_id"].encode(), orjson.dumps(f)[:-3]),  # truncated JSON
    lambda f, r: (f["device_id"].encode(), orjson.dumps({**f, "lat": 91.5 + r.random()})),
    lambda f, r: (f["device_id"].encode(), orjson.dumps({k: v for k, v in f.items() if k != "lon"})),
    lambda f, r: (f["device_id"].encode(), orjson.dumps({**f, "ts": "not a time"})),
    lambda f, r: (f["device_id"].encode(), orjson.dumps({**f, "speed_kmh": "fast"})),
    lambda f, r: (b"veh-unknown", orjson.dumps(f)),  # key does not match device_id
    lambda f, r: (b"", orjson.dumps({**f, "device_id": ""})),
    lambda f, r: (f["device_id"].encode(), b"null"),
)


def generate_records(config: SimulationConfig) -> Iterator[SimRecord]:
    """Keyed position records in (near) event-time order, with the configured share of imperfections."""
    rng = random.Random(config.seed)
    fleet = [_new_vehicle(i, config, rng) for i in range(config.vehicles)]
    interval_ms = max(1, round(config.vehicles / config.rate_per_s * 1000))
    total_fixes = int(config.rate_per_s * config.duration_s)
    buffers: dict[str, list[tuple[dict, RecordKind]]] = {}
    held: dict[str, dict] = {}  # a fix held back to be sent after the next one (out of order)
    made = 0
    tick = 0
    while made < total_fixes:
        for n, v in enumerate(fleet):
            if made >= total_fixes:
                break
            now_ms = config.start_ms + tick * interval_ms + n * interval_ms // max(1, len(fleet))
            _advance(v, interval_ms / 1000.0, now_ms, config, rng)
            made += 1
            fix, kind = _observe(v, now_ms, config, rng)
            if rng.random() < config.malformed_share:
                key, value = rng.choice(MALFORMED_KINDS)(fix, rng)
                yield SimRecord(key, value, now_ms, RecordKind.MALFORMED, 1)
                continue
            out: list[tuple[dict, RecordKind]] = []
            if v.device_id in held:
                out.append((fix, kind))
                out.append((held.pop(v.device_id), RecordKind.OUT_OF_ORDER))
            elif rng.random() < config.out_of_order_share:
                held[v.device_id] = fix
                made -= 1  # counted when it is sent
                continue
            else:
                out.append((fix, kind))
            if rng.random() < config.duplicate_share:
                out.append((dict(fix), RecordKind.DUPLICATE))
                made += 1
            buffer = buffers.setdefault(v.device_id, [])
            buffer.extend(out)
            while len(buffer) >= config.batch_size:
                chunk, buffer[:] = buffer[: config.batch_size], buffer[config.batch_size :]
                yield _message(v.device_id, chunk, config.batch_size, now_ms)
        tick += 1
    end_ms = config.start_ms + tick * interval_ms
    for device_id, buffer in buffers.items():
        if buffer:
            yield _message(device_id, buffer, config.batch_size, end_ms)
    for device_id, fix in held.items():
        yield _message(device_id, [(fix, RecordKind.OUT_OF_ORDER)], 1, end_ms)


def _observe(v: _Vehicle, now_ms: int, config: SimulationConfig, rng: random.Random) -> tuple[dict, RecordKind]:
    """What the tracker reports: the true position plus GPS noise, now and then an outlier."""
    kind = RecordKind.GOOD
    error_m = abs(rng.gauss(0.0, config.noise_m))
    if rng.random() < config.outlier_share:
        error_m = rng.uniform(50.0, 200.0)
        kind = RecordKind.OUTLIER
    lat, lon = destination(v.lat, v.lon, rng.uniform(0.0, 360.0), error_m)
    fix = {
        "device_id": v.device_id, "ts": format_ts(now_ms), "lat": round(lat, 7), "lon": round(lon, 7),
        "speed_kmh": round(max(0.0, v.speed_kmh + rng.gauss(0.0, 1.0)) if v.speed_kmh else 0.0, 1),
        "heading_deg": v.heading, "accuracy_m": round(max(3.0, config.noise_m * 1.5 + rng.random()), 1),
    }
    return fix, kind


def _message(device_id: str, chunk: list[tuple[dict, RecordKind]], batch_size: int, ts_ms: int) -> SimRecord:
    fixes = [fix for fix, _ in chunk]
    kinds = {kind for _, kind in chunk}
    kind = next(iter(kinds)) if len(kinds) == 1 else RecordKind.GOOD
    value = orjson.dumps(fixes if batch_size > 1 else fixes[0])
    return SimRecord(device_id.encode(), value, ts_ms, kind, len(fixes))


@dataclass(slots=True)
class PublishStats:
    records: int = 0
    fixes: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def __str__(self) -> str:
        rate = self.fixes / self.seconds if self.seconds else 0.0
        return f"{self.records:,} records, {self.fixes:,} fixes in {self.seconds:.1f}s ({rate:,.0f} fixes/s)"


async def publish(
    bootstrap_servers: str,
    topic: str,
    records: Iterable[SimRecord] | AsyncIterator[SimRecord],
    *,
    rate_per_s: float | None = None,
    tail_single_record: bool = True,
    status_cb: Callable[[PublishStats], None] | None = None,
    producer_options: dict | None = None,
) -> PublishStats:
    """Send records keyed, in chunks of ~50 ms worth (``rate_per_s`` fixes/s; None = as fast as possible)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers.split(","), acks="all", max_batch_size=512 * 1024,
        **(producer_options or {}),
    )
    await producer.start()
    stats = PublishStats()
    started = time.monotonic()
    chunk_fixes = max(1, int(rate_per_s / 20)) if rate_per_s else 5000
    try:
        out = BatchProducer(producer, tail_single_record=tail_single_record)
        chunk: list[SimRecord] = []
        chunk_fixes_now = 0
        chunk_started = time.monotonic()
        async for record in _aiter(records):
            chunk.append(record)
            chunk_fixes_now += record.fixes
            if chunk_fixes_now >= chunk_fixes or time.monotonic() - chunk_started > 0.05:
                await _send_chunk(out, topic, chunk, stats, started, rate_per_s, status_cb)
                chunk, chunk_fixes_now, chunk_started = [], 0, time.monotonic()
        if chunk:
            await _send_chunk(out, topic, chunk, stats, started, rate_per_s, status_cb)
    finally:
        stats.seconds = time.monotonic() - started
        await producer.stop()
    return stats


async def _send_chunk(out: BatchProducer, topic: str, chunk: list[SimRecord], stats: PublishStats, started: float,
                      rate_per_s: float | None, status_cb: Callable[[PublishStats], None] | None) -> None:
    await out.flush(OutRecord(topic, r.key, r.value) for r in chunk)
    stats.records += len(chunk)
    stats.fixes += sum(r.fixes for r in chunk)
    stats.kinds.update(r.kind.value for r in chunk)
    stats.seconds = time.monotonic() - started
    if status_cb is not None:
        status_cb(stats)
    if rate_per_s:
        ahead_s = stats.fixes / rate_per_s - (time.monotonic() - started)
        if ahead_s > 0:
            await asyncio.sleep(ahead_s)


async def _aiter(records: Iterable[SimRecord] | AsyncIterator[SimRecord]) -> AsyncIterator[SimRecord]:
    if hasattr(records, "__aiter__"):
        async for record in records:  # type: ignore[union-attr]
            yield record
    else:
        for i, record in enumerate(records):  # type: ignore[union-attr]
            yield record
            if i % 1000 == 999:
                await asyncio.sleep(0)  # let the status line and signals in


async def simulate(bootstrap_servers: str, config: SimulationConfig, topic: str = "fleet.positions",
                   status_cb: Callable[[PublishStats], None] | None = None) -> PublishStats:
    """Publish a simulated fleet at ``config.rate_per_s`` fixes per second of wall time."""
    return await publish(bootstrap_servers, topic, generate_records(config), rate_per_s=config.rate_per_s,
                         status_cb=status_cb)


def trace_records(path: str | Path, *, batch_size: int = 1, device_prefix: str = "") -> list[SimRecord]:
    """A trace as keyed records in event-time order (stable: per-device order is kept)."""
    fixes = sorted(read_trace(path), key=lambda f: f.ts_ms)
    records: list[SimRecord] = []
    buffers: dict[str, list[dict]] = {}
    for fix in fixes:
        device_id = device_prefix + fix.device_id
        doc = {"device_id": device_id, "ts": format_ts(fix.ts_ms), "lat": fix.lat, "lon": fix.lon}
        if fix.speed_kmh is not None:
            doc["speed_kmh"] = fix.speed_kmh
        if fix.heading_deg is not None:
            doc["heading_deg"] = fix.heading_deg
        if fix.altitude_m is not None:
            doc["altitude_m"] = round(fix.altitude_m, 2)
        buffer = buffers.setdefault(device_id, [])
        buffer.append(doc)
        if len(buffer) >= batch_size:
            records.append(_trace_message(device_id, buffer, batch_size, fix.ts_ms))
            buffers[device_id] = []
    for device_id, buffer in buffers.items():
        if buffer:
            records.append(_trace_message(device_id, buffer, batch_size, fixes[-1].ts_ms))
    return records


def _trace_message(device_id: str, docs: list[dict], batch_size: int, ts_ms: int) -> SimRecord:
    value = orjson.dumps(docs if batch_size > 1 else docs[0])
    return SimRecord(device_id.encode(), value, ts_ms, RecordKind.GOOD, len(docs))


async def replay(bootstrap_servers: str, path: str | Path, topic: str = "fleet.positions", speed: float = 0.0,
                 batch_size: int = 1, device_prefix: str = "",
                 status_cb: Callable[[PublishStats], None] | None = None) -> PublishStats:
    """Replay a trace: ``speed`` 1 = real time, 10 = ten times faster, 0 = as fast as possible."""
    records = trace_records(path, batch_size=batch_size, device_prefix=device_prefix)
    if not records:
        raise ValueError(f"{path}: no fixes")
    return await publish(bootstrap_servers, topic, _paced(records, speed), status_cb=status_cb)


async def _paced(records: list[SimRecord], speed: float) -> AsyncIterator[SimRecord]:
    start_ts = records[0].ts_ms
    started = time.monotonic()
    for i, record in enumerate(records):
        if speed > 0 and math.isfinite(speed):
            wait_s = (record.ts_ms - start_ts) / 1000.0 / speed - (time.monotonic() - started)
            if wait_s > 0:
                await asyncio.sleep(wait_s)
        elif i % 1000 == 999:
            await asyncio.sleep(0)
        yield record
