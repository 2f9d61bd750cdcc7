"""Fleet simulator and trace replay: the producers of ``fleet.positions``.

Pure part (seeded, no I/O): :func:`generate_records` drives vehicles over a street grid (blocks, arterial rows
and columns, a few diagonal arterials), accelerating and braking within limits, stopping at lights and for
1-10 minute deliveries, and reports noisy fixes. Every record says what it is (:class:`RecordKind`) so tests
can count what the worker must do with it. :func:`trace_records` makes the same records from a real trace.

I/O part: :func:`publish` sends with ``create_batch``/``send_batch`` per partition (~7x cheaper per message than
a keyed ``send``, FIELD-NOTES) to the partition a keyed send would choose: murmur2 of the key, as Kafka's Java
client, aiokafka and Faust do. :func:`simulate` and :func:`replay` pace it in event time.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from itertools import zip_longest
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from fleetstream.domain.geo import EARTH_RADIUS_M, bearing_deg, destination
from fleetstream.traces import TraceFix, TraceFormatError, read_trace

__all__ = [
    "PublishStats", "RecordKind", "SimRecord", "SimulationConfig", "TraceFix", "TraceFormatError",
    "generate_records", "partition_for_key", "publish", "read_trace", "replay", "simulate", "trace_records",
]

M_PER_DEG_LAT = EARTH_RADIUS_M * math.pi / 180.0  # the sphere haversine_m uses, so derived speeds agree


class RecordKind(StrEnum):
    GOOD = "good"
    DUPLICATE = "duplicate"  # an exact copy of the previous fix of the device, sent right after it
    OUT_OF_ORDER = "out_of_order"  # held back and sent after the device's next (newer) fix
    OUTLIER = "outlier"  # a valid fix 50-200 m away from where the vehicle is
    MALFORMED = "malformed"  # bad JSON or a contract violation: must end in the dead-letter topic


_KIND_RANK = {RecordKind.GOOD: 0, RecordKind.OUTLIER: 1, RecordKind.DUPLICATE: 2, RecordKind.OUT_OF_ORDER: 3,
              RecordKind.MALFORMED: 4}


class SimRecord(NamedTuple):
    """One message for ``fleet.positions``, with what each fix in it is."""

    key: bytes
    value: bytes
    ts_ms: int  # event time the message is sent at (records come in this order)
    kind: RecordKind  # the most unusual of fix_kinds (malformed > out of order > duplicate > outlier > good)
    fix_kinds: tuple[RecordKind, ...]  # one per fix, in message order; a message that is not JSON counts as one

    @property
    def fixes(self) -> int:
        return len(self.fix_kinds)


@dataclass(frozen=True, slots=True)
class SimulationConfig:
    vehicles: int = 100
    rate_per_s: float = 100.0  # fixes per second across the fleet; each vehicle reports every vehicles/rate s
    duration_s: float = 60.0  # event time covered
    seed: int = 1
    center_lat: float = 53.40  # Liverpool
    center_lon: float = -2.98
    area_km: float = 8.0  # side of the square the streets cover
    block_m: float = 160.0
    noise_m: float = 4.0  # GPS error, 1-sigma per axis, correlated over ~30 s as real receivers' is
    outlier_share: float = 0.002
    duplicate_share: float = 0.005
    out_of_order_share: float = 0.005
    malformed_share: float = 0.01
    batch_size: int = 1  # fixes per message; > 1 sends JSON arrays of up to batch_size fixes of one device
    start_ms: int = 1_780_000_000_000  # 2026-05-28T20:26:40Z: fixed, so a seed always gives the same bytes

    def __post_init__(self) -> None:
        if self.vehicles < 1 or self.rate_per_s <= 0 or self.duration_s < 0:
            raise ValueError("vehicles and rate_per_s must be positive, duration_s not negative")
        if not 1 <= self.batch_size <= 1000:
            raise ValueError(f"batch_size must be 1..1000 (the contract's array limit), got {self.batch_size}")
        shares = (self.outlier_share, self.duplicate_share, self.out_of_order_share, self.malformed_share)
        if any(not 0.0 <= share <= 1.0 for share in shares) or sum(shares) > 1.0:
            raise ValueError(f"shares must be within [0, 1] and sum to at most 1, got {shares}")
        if self.area_km * 1000.0 < 4 * self.block_m or self.block_m < 20.0:
            raise ValueError("area_km must hold at least 4 blocks of block_m >= 20 m")


# --- streets and driving ---------------------------------------------------------------------------------------

STEPS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))  # direction d heads d * 45 deg
UNIT = tuple((di / math.hypot(di, dj), dj / math.hypot(di, dj)) for di, dj in STEPS)
ARTERIAL_EVERY_BLOCKS = 6
DIAGONAL_EVERY_BLOCKS = 14
RESIDENTIAL_KMH, ARTERIAL_KMH, DIAGONAL_KMH = 30.0, 50.0, 60.0
MIN_CRUISE_KMH, MAX_CRUISE_KMH = 20.0, 60.0
TURN_KMH = {45: 30.0, 90: 18.0, 135: 12.0, 180: 8.0}  # speed to take a turn of so many degrees at
TURN_WEIGHTS = {0: 6.0, 45: 2.0, 90: 1.5, 135: 0.3}
BRAKE_MPS2, MAX_BRAKE_MPS2 = 2.0, 4.0  # planned braking, and the hardest a driver brakes when surprised
MAX_STEP_S = 1.0  # physics sub-step: a vehicle reporting every 30 s still brakes for a light
NOISE_CORRELATION_S = 30.0
DELIVERY_S = (60.0, 600.0)


@dataclass(frozen=True, slots=True)
class StreetGrid:
    """Streets in a local metric frame around the centre: x east, y north, intersections every ``block_m``."""

    center_lat: float
    center_lon: float
    block_m: float
    half_blocks: int
    rising: frozenset[int]  # diagonal arterials i - j = c (running SW-NE)
    falling: frozenset[int]  # diagonal arterials i + j = c (running NW-SE)
    bearings_deg: tuple[float, ...]  # of each direction, from geo.bearing_deg at the centre

    @classmethod
    def build(cls, config: SimulationConfig, rng: random.Random) -> StreetGrid:
        n = int(config.area_km * 500.0 // config.block_m)
        offsets = rng.randrange(DIAGONAL_EVERY_BLOCKS), rng.randrange(DIAGONAL_EVERY_BLOCKS)
        rising = frozenset(c for c in range(-2 * n, 2 * n + 1) if (c - offsets[0]) % DIAGONAL_EVERY_BLOCKS == 0)
        falling = frozenset(c for c in range(-2 * n, 2 * n + 1) if (c - offsets[1]) % DIAGONAL_EVERY_BLOCKS == 0)
        grid = cls(config.center_lat, config.center_lon, config.block_m, n, rising, falling, ())
        lat0, lon0 = grid.latlon(0.0, 0.0)
        bearings = tuple(bearing_deg(lat0, lon0, *grid.latlon(di * config.block_m, dj * config.block_m))
                         for di, dj in STEPS)
        return cls(config.center_lat, config.center_lon, config.block_m, n, rising, falling, bearings)

    def latlon(self, x_m: float, y_m: float) -> tuple[float, float]:
        lat = self.center_lat + y_m / M_PER_DEG_LAT
        return lat, self.center_lon + x_m / (M_PER_DEG_LAT * math.cos(math.radians(self.center_lat)))

    def exits(self, i: int, j: int) -> list[int]:
        n = self.half_blocks
        out = []
        for d, (di, dj) in enumerate(STEPS):
            if not (-n <= i + di <= n and -n <= j + dj <= n):
                continue
            if d % 2 and ((i - j) not in self.rising if d in (1, 5) else (i + j) not in self.falling):
                continue
            out.append(d)
        return out

    def limit_kmh(self, i: int, j: int, direction: int) -> float:
        if direction % 2:
            return DIAGONAL_KMH
        line = i if direction in (0, 4) else j  # north-south streets are columns i, east-west ones rows j
        return ARTERIAL_KMH if line % ARTERIAL_EVERY_BLOCKS == 0 else RESIDENTIAL_KMH

    def stop_chance(self, i: int, j: int) -> tuple[float, float, float]:
        """(chance of stopping, shortest and longest wait in s) at an intersection: lights where arterials meet."""
        arterials = ((i % ARTERIAL_EVERY_BLOCKS == 0) + (j % ARTERIAL_EVERY_BLOCKS == 0)
                     + ((i - j) in self.rising) + ((i + j) in self.falling))
        if arterials >= 2:
            return 0.4, 10.0, 60.0  # traffic lights
        if arterials == 1:
            return 0.15, 5.0, 30.0  # pedestrian crossing lights
        return 0.1, 2.0, 6.0  # give way


@dataclass(slots=True)
class _Vehicle:
    device_id: str
    i: int  # the intersection the current street segment starts at
    j: int
    direction: int
    accel_mps2: float
    driver_factor: float  # how this driver relates to speed limits
    delivery_chance: float  # per street segment
    next_direction: int = 0
    along_m: float = 0.0
    segment_m: float = 0.0
    cruise_mps: float = 0.0
    end_mps: float = 0.0  # speed to reach the segment's end at (a turn)
    speed_mps: float = 0.0
    stop_at_m: float | None = None
    stop_s: float = 0.0
    dwell_until_s: float = 0.0
    clock_s: float = 0.0
    reported_heading_deg: float = 0.0
    noise_east_m: float = 0.0
    noise_north_m: float = 0.0


def _turn_deg(from_direction: int, to_direction: int) -> int:
    return abs((to_direction - from_direction + 4) % 8 - 4) * 45


def _enter_segment(v: _Vehicle, grid: StreetGrid, rng: random.Random, *, plan_stop: bool = True) -> None:
    """Plan the street segment ahead: speed, where to turn next, and whether to stop on it."""
    di, dj = STEPS[v.direction]
    v.segment_m = grid.block_m * (math.sqrt(2.0) if v.direction % 2 else 1.0)
    limit_kmh = grid.limit_kmh(v.i, v.j, v.direction) * v.driver_factor
    v.cruise_mps = min(MAX_CRUISE_KMH, max(MIN_CRUISE_KMH, limit_kmh)) / 3.6
    end_i, end_j = v.i + di, v.j + dj
    options = [d for d in grid.exits(end_i, end_j) if _turn_deg(v.direction, d) < 180]
    if options:
        v.next_direction = rng.choices(options, [TURN_WEIGHTS[_turn_deg(v.direction, d)] for d in options])[0]
    else:  # a dead end at the edge of the map: turn round
        v.next_direction = (v.direction + 4) % 8
    turn = _turn_deg(v.direction, v.next_direction)
    v.end_mps = min(v.cruise_mps, TURN_KMH[turn] / 3.6) if turn else v.cruise_mps
    v.stop_at_m = None
    if not plan_stop:
        return
    if rng.random() < v.delivery_chance:
        braking_m = v.speed_mps**2 / (2 * BRAKE_MPS2) + 5.0
        v.stop_at_m = min(v.segment_m, max(v.along_m + braking_m, rng.uniform(0.2, 0.8) * v.segment_m))
        v.stop_s = rng.uniform(*DELIVERY_S)
        return
    chance, shortest_s, longest_s = grid.stop_chance(end_i, end_j)
    if rng.random() < chance:
        v.stop_at_m, v.stop_s = v.segment_m, rng.uniform(shortest_s, longest_s)


def _drive(v: _Vehicle, until_s: float, grid: StreetGrid, rng: random.Random) -> None:
    """Move the vehicle to time ``until_s``: accelerate to cruise, brake for stops and turns, dwell."""
    t = v.clock_s
    while t < until_s - 1e-9:
        if v.dwell_until_s > t:
            t = min(until_s, v.dwell_until_s)
            v.speed_mps = 0.0
            continue
        dt = min(MAX_STEP_S, until_s - t)
        t += dt
        if v.stop_at_m is not None:
            remaining_m, end_mps = v.stop_at_m - v.along_m, 0.0
        else:
            remaining_m, end_mps = v.segment_m - v.along_m, v.end_mps
        speed = v.speed_mps
        # the fastest speed at the end of this step from which braking still makes the stop (or turn) ahead
        budget = end_mps * end_mps + BRAKE_MPS2 * (2.0 * remaining_m - speed * dt)
        root = math.sqrt(BRAKE_MPS2 * BRAKE_MPS2 * dt * dt + 4.0 * budget) if budget > 0.0 else 0.0
        allowed = min(v.cruise_mps, max(0.0, (root - BRAKE_MPS2 * dt) * 0.5))
        new = min(allowed, speed + v.accel_mps2 * dt) if speed < allowed else max(allowed, speed - MAX_BRAKE_MPS2 * dt)
        v.along_m += (speed + new) * 0.5 * dt
        v.speed_mps = new
        if v.stop_at_m is not None and v.along_m >= v.stop_at_m - 0.5:
            v.along_m, v.speed_mps = v.stop_at_m, 0.0
            v.dwell_until_s, v.stop_at_m = t + v.stop_s, None
            continue
        while v.along_m >= v.segment_m:
            di, dj = STEPS[v.direction]
            v.along_m -= v.segment_m
            v.i, v.j, v.direction = v.i + di, v.j + dj, v.next_direction
            _enter_segment(v, grid, rng)
    v.clock_s = until_s


def _new_vehicle(number: int, grid: StreetGrid, config: SimulationConfig, rng: random.Random) -> _Vehicle:
    n = grid.half_blocks - 1
    i, j = rng.randint(-n, n), rng.randint(-n, n)
    v = _Vehicle(f"veh-{number:04d}", i, j, 0, accel_mps2=rng.uniform(1.0, 2.0),
                 driver_factor=rng.uniform(0.85, 1.1), delivery_chance=rng.uniform(0.005, 0.04))
    v.direction = rng.choice(grid.exits(i, j))
    v.speed_mps = rng.uniform(0.0, 1.0) * grid.limit_kmh(i, j, v.direction) / 3.6
    _enter_segment(v, grid, rng, plan_stop=False)
    v.along_m = rng.uniform(0.0, v.segment_m * 0.5)
    if rng.random() < 0.2:  # parked at a delivery when the simulation starts
        v.speed_mps, v.dwell_until_s = 0.0, rng.uniform(0.0, DELIVERY_S[1])
    v.reported_heading_deg = round(grid.bearings_deg[v.direction], 1)
    v.noise_east_m, v.noise_north_m = rng.gauss(0.0, config.noise_m), rng.gauss(0.0, config.noise_m)
    return v


def _observe(v: _Vehicle, ts_ms: int, grid: StreetGrid, config: SimulationConfig, rng: random.Random,
             outlier: bool) -> dict[str, Any]:
    """What the tracker reports: the position with its (correlated) error, Doppler speed, course, accuracy."""
    ux, uy = UNIT[v.direction]
    lat, lon = grid.latlon(v.i * grid.block_m + ux * v.along_m + v.noise_east_m,
                           v.j * grid.block_m + uy * v.along_m + v.noise_north_m)
    accuracy_m = round(max(1.0, config.noise_m * 1.5 * rng.uniform(0.8, 1.3)), 1)
    if outlier:  # multipath: far off, and the receiver only sometimes knows it
        lat, lon = destination(lat, lon, rng.uniform(0.0, 360.0), rng.uniform(50.0, 200.0))
        if rng.random() < 0.5:
            accuracy_m = round(rng.uniform(20.0, 100.0), 1)
    if v.speed_mps > 1.0:  # a receiver standing still keeps its last course
        v.reported_heading_deg = round((grid.bearings_deg[v.direction] + rng.gauss(0.0, 1.5)) % 360.0, 1) % 360.0
    speed_kmh = round(max(0.0, v.speed_mps * 3.6 + rng.gauss(0.0, 0.5)), 1) if v.speed_mps > 0.05 else 0.0
    return {"device_id": v.device_id, "ts": _format_ts(ts_ms), "lat": round(lat, 6), "lon": round(lon, 6),
            "speed_kmh": speed_kmh, "heading_deg": v.reported_heading_deg, "accuracy_m": accuracy_m}


_ts_prefix_cache: dict[int, str] = {}


def _format_ts(ts_ms: int) -> str:
    """Epoch ms -> ``2026-11-25T10:00:00.123Z`` (the per-second prefix is cached: times come in order)."""
    seconds, millis = divmod(ts_ms, 1000)
    prefix = _ts_prefix_cache.get(seconds)
    if prefix is None:
        if len(_ts_prefix_cache) > 4096:
            _ts_prefix_cache.clear()
        prefix = _ts_prefix_cache[seconds] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{prefix}.{millis:03d}Z"


# --- malformed records: each violates the contract in one way a real gateway does ------------------------------

def _nan_literal(body: Any) -> bytes:
    """The fix with ``"lat":NaN``, as some JSON writers emit it; NaN is not JSON."""
    fix = body[0] if isinstance(body, list) else body
    text = orjson.dumps([{**fix, "lat": "__nan__"}] if isinstance(body, list) else {**fix, "lat": "__nan__"})
    return text.replace(b'"__nan__"', b"NaN")


MESSAGE_DEFECTS: tuple[Callable[[Any, random.Random], bytes], ...] = (  # break the whole message
    lambda body, rng: orjson.dumps(body)[: -rng.randint(1, 12)],  # truncated upload
    lambda body, rng: _nan_literal(body),
    lambda body, rng: rng.choice((b"null", b"42", b'"veh"', b"true", b"[]", b"{}")),  # not a position
    lambda body, rng: b"",
    lambda body, rng: bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randint(4, 40))),  # not UTF-8
)
ITEM_DEFECTS: tuple[Callable[[dict[str, Any], random.Random], Any], ...] = (  # break one fix
    lambda fix, rng: _without(fix, rng.choice(("device_id", "ts", "lat", "lon"))),
    lambda fix, rng: {**fix, "lat": rng.choice((1, -1)) * rng.uniform(90.001, 180.0)},
    lambda fix, rng: {**fix, "lon": rng.choice((1, -1)) * rng.uniform(180.001, 360.0)},
    lambda fix, rng: {**fix, rng.choice(("lat", "lon")): rng.choice(("NaN", "nan", "Infinity", "-inf"))},
    lambda fix, rng: {**fix, "lat": str(fix["lat"])},  # a number as text
    lambda fix, rng: {**fix, "ts": rng.choice(("not a time", "2026-13-01T00:00:00Z", "2026-02-30T10:00:00Z",
                                              fix["ts"][:-1], "yesterday", -1, 1.7e12 + 0.5))},
    lambda fix, rng: {("latitude" if k == "lat" else k): v for k, v in fix.items()},  # a wrong field name
    lambda fix, rng: {**fix, "device_id": ""},
    lambda fix, rng: {**fix, "device_id": fix["device_id"].upper()},  # not the record key's device
    lambda fix, rng: {**fix, rng.choice(("speed_kmh", "heading_deg", "accuracy_m")): rng.choice(("fast", -5.0))},
    lambda fix, rng: {**fix, "heading_deg": rng.uniform(360.5, 720.0)},
    lambda fix, rng: rng.choice((42, "veh", None, f"{fix['lat']},{fix['lon']}")),  # an item that is no object
)


def _without(fix: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in fix.items() if k != name}


# --- messages ---------------------------------------------------------------------------------------------------

class _Batcher:
    """Per-device buffers that become one message when full (or, for replay, when their oldest fix is old)."""

    def __init__(self, batch_size: int, max_age_ms: int | None = None) -> None:
        self.batch_size = batch_size
        self.max_age_ms = max_age_ms
        self._buffers: dict[bytes, tuple[int, list[Any], list[RecordKind]]] = {}  # in order of first fix

    def add(self, key: bytes, item: Any, kind: RecordKind, ts_ms: int) -> Iterator[SimRecord]:
        if self.batch_size == 1:
            yield SimRecord(key, orjson.dumps(item), ts_ms, kind, (kind,))
            return
        if self.max_age_ms is not None:
            yield from self.flush(older_than_ms=ts_ms - self.max_age_ms, ts_ms=ts_ms)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = (ts_ms, [], [])
        buffer[1].append(item)
        buffer[2].append(kind)
        if len(buffer[1]) >= self.batch_size:
            del self._buffers[key]
            yield _message(key, buffer[1], buffer[2], ts_ms)

    def flush(self, *, ts_ms: int, older_than_ms: int | None = None) -> Iterator[SimRecord]:
        while self._buffers:
            key = next(iter(self._buffers))
            started_ms, items, kinds = self._buffers[key]
            if older_than_ms is not None and started_ms >= older_than_ms:
                return
            del self._buffers[key]
            yield _message(key, items, kinds, ts_ms)


def _message(key: bytes, items: list[Any], kinds: list[RecordKind], ts_ms: int) -> SimRecord:
    return SimRecord(key, orjson.dumps(items), ts_ms, max(kinds, key=_KIND_RANK.__getitem__), tuple(kinds))


def generate_records(config: SimulationConfig) -> Iterator[SimRecord]:
    """The fleet's messages in event-time order, ``rate_per_s * duration_s`` observations with imperfections.

    An observation is one report of one vehicle: a fix, or a malformed record in its place. Duplicates are
    extra copies. A held-back (out-of-order) fix is sent after the device's next fix, which is then always good.
    """
    rng = random.Random(config.seed)
    grid = StreetGrid.build(config, rng)
    fleet = [_new_vehicle(number + 1, grid, config, rng) for number in range(config.vehicles)]
    keys = [v.device_id.encode() for v in fleet]
    total = round(config.rate_per_s * config.duration_s)
    step_ms = 1000.0 / config.rate_per_s
    interval_s = config.vehicles / config.rate_per_s
    noise_keep = math.exp(-interval_s / NOISE_CORRELATION_S)  # AR(1) GPS error: slow drift, not white noise
    noise_new = config.noise_m * math.sqrt(1.0 - noise_keep * noise_keep)
    batcher = _Batcher(config.batch_size)
    held: dict[int, dict[str, Any]] = {}
    cut_malformed = config.malformed_share
    cut_outlier = cut_malformed + config.outlier_share
    cut_held = cut_outlier + config.out_of_order_share
    cut_duplicate = cut_held + config.duplicate_share
    ts_ms = config.start_ms
    for n in range(total):
        index = n % config.vehicles
        v, key = fleet[index], keys[index]
        ts_ms = config.start_ms + round(n * step_ms)
        _drive(v, (ts_ms - config.start_ms) / 1000.0, grid, rng)
        v.noise_east_m = v.noise_east_m * noise_keep + rng.gauss(0.0, noise_new)
        v.noise_north_m = v.noise_north_m * noise_keep + rng.gauss(0.0, noise_new)
        roll = 1.0 if index in held else rng.random()  # the fix after a held one is always good
        fix = _observe(v, ts_ms, grid, config, rng, outlier=cut_malformed <= roll < cut_outlier)
        if roll < cut_malformed:
            yield from _malformed(fix, key, batcher, ts_ms, rng)
        elif roll < cut_outlier:
            yield from batcher.add(key, fix, RecordKind.OUTLIER, ts_ms)
        elif roll < cut_held:
            held[index] = fix
        else:
            yield from batcher.add(key, fix, RecordKind.GOOD, ts_ms)
            if index in held:
                yield from batcher.add(key, held.pop(index), RecordKind.OUT_OF_ORDER, ts_ms)
            elif roll < cut_duplicate:
                yield from batcher.add(key, fix, RecordKind.DUPLICATE, ts_ms)
    for index, fix in held.items():  # nothing newer was sent after them: they arrive in order after all
        yield from batcher.add(keys[index], fix, RecordKind.GOOD, ts_ms)
    yield from batcher.flush(ts_ms=ts_ms)


def _malformed(fix: dict[str, Any], key: bytes, batcher: _Batcher, ts_ms: int,
               rng: random.Random) -> Iterator[SimRecord]:
    """A broken message on its own, or (in arrays) a broken fix among good ones: the worker checks each fix."""
    pick = rng.randrange(len(MESSAGE_DEFECTS) + len(ITEM_DEFECTS) + 1)
    if pick < len(MESSAGE_DEFECTS):
        body = [fix] if batcher.batch_size > 1 else fix
        value = MESSAGE_DEFECTS[pick](body, rng)
        yield SimRecord(key, value, ts_ms, RecordKind.MALFORMED, (RecordKind.MALFORMED,))
    elif pick < len(MESSAGE_DEFECTS) + len(ITEM_DEFECTS):
        item = ITEM_DEFECTS[pick - len(MESSAGE_DEFECTS)](fix, rng)
        if batcher.batch_size == 1 and not isinstance(item, dict):
            yield SimRecord(key, orjson.dumps(item), ts_ms, RecordKind.MALFORMED, (RecordKind.MALFORMED,))
        else:
            yield from batcher.add(key, item, RecordKind.MALFORMED, ts_ms)
    else:  # a good message under another device's key
        body = [fix] if batcher.batch_size > 1 else fix
        yield SimRecord(key.upper(), orjson.dumps(body), ts_ms, RecordKind.MALFORMED, (RecordKind.MALFORMED,))


# --- traces -----------------------------------------------------------------------------------------------------

def trace_records(path: str | Path, *, batch_size: int = 1, device_prefix: str = "",
                  max_batch_age_ms: int = 60_000) -> list[SimRecord]:
    """A trace as messages in event-time order, each device's fixes in file order (a backwards step stays).

    With ``batch_size`` > 1 a device's buffer is also sent once its oldest fix is ``max_batch_age_ms`` old, as
    a gateway's timer would: traces have gaps of days.
    """
    by_device: dict[str, list[TraceFix]] = {}
    for fix in read_trace(path):
        by_device.setdefault(fix.device_id, []).append(fix)
    batcher = _Batcher(batch_size, max_batch_age_ms)
    records: list[SimRecord] = []
    now_ms = 0
    for fix in heapq.merge(*by_device.values(), key=lambda f: f.ts_ms):  # a merge: keeps each list's order
        now_ms = max(now_ms, fix.ts_ms)
        device_id = device_prefix + fix.device_id
        doc: dict[str, Any] = {"device_id": device_id, "ts": _format_ts(fix.ts_ms), "lat": fix.lat, "lon": fix.lon}
        for name in ("speed_kmh", "heading_deg", "altitude_m"):
            if (value := getattr(fix, name)) is not None:
                doc[name] = value
        records.extend(batcher.add(device_id.encode(), doc, RecordKind.GOOD, now_ms))
    records.extend(batcher.flush(ts_ms=now_ms))
    return records


# --- publishing -------------------------------------------------------------------------------------------------

def partition_for_key(key: bytes | None, partition_count: int) -> int:
    """The partition a keyed send picks: murmur2 of the key, positive, modulo the count (Kafka's default)."""
    if key is None:
        return random.randrange(partition_count)  # as aiokafka's DefaultPartitioner does for keyless records
    return (murmur2(key) & 0x7FFFFFFF) % partition_count


@dataclass(slots=True)
class PublishStats:
    """What the broker acknowledged."""

    records: int = 0
    fixes: int = 0  # SimRecord fixes; a plain (key, value) pair counts as one
    bytes: int = 0
    kinds: Counter[str] = field(default_factory=Counter)  # fixes by RecordKind
    partitions: Counter[int] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def fixes_per_s(self) -> float:
        return self.fixes / self.seconds if self.seconds else 0.0

    def __str__(self) -> str:
        return (f"{self.records:,} records, {self.fixes:,} fixes in {self.seconds:.1f}s "
                f"({self.fixes_per_s:,.0f} fixes/s)")


Record = SimRecord | tuple[bytes | None, bytes | None]
StatusCallback = Callable[[PublishStats], None]


async def publish(
    bootstrap_servers: str,
    topic: str,
    records: Iterable[Record] | AsyncIterable[Record],
    *,
    rate_per_s: float | None = None,
    tail_single_record: bool = True,
    linger_s: float = 0.02,
    max_chunk_records: int = 10_000,
    status_cb: StatusCallback | None = None,
    producer_options: dict[str, Any] | None = None,
) -> PublishStats:
    """Send records (SimRecords or (key, value) pairs) and wait for every acknowledgement.

    ``rate_per_s`` paces to so many fixes per second (None: as fast as possible). Records are gathered for up to
    ``linger_s`` and sent as one ``send_batch`` per partition; with ``tail_single_record`` the last record of
    each such flush goes in a batch of its own, because the embedded Tansu broker reports a partition's end
    offset as the newest batch's base offset + 1 (FIELD-NOTES). Harmless on real Kafka.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers.split(","), acks="all", max_batch_size=256 * 1024,
        client_id="fleetstream-publisher", **(producer_options or {}),
    )
    await producer.start()
    try:
        return await _publish_with(producer, topic, records, rate_per_s=rate_per_s,
                                   tail_single_record=tail_single_record, linger_s=linger_s,
                                   max_chunk_records=max_chunk_records, status_cb=status_cb)
    finally:
        await producer.stop()


async def _publish_with(producer: Any, topic: str, records: Iterable[Record] | AsyncIterable[Record], *,
                        rate_per_s: float | None, tail_single_record: bool, linger_s: float,
                        max_chunk_records: int, status_cb: StatusCallback | None,
                        max_chunks_in_flight: int = 4) -> PublishStats:
    """The sending loop, on any object with aiokafka's ``partitions_for``/``create_batch``/``send_batch``."""
    stats = PublishStats()
    started = time.monotonic()
    partitions = sorted(await producer.partitions_for(topic))
    partition_of: dict[bytes | None, int] = {}
    queue: asyncio.Queue[list[Record] | BaseException | None] = asyncio.Queue(maxsize=32)
    feeder = asyncio.create_task(_feed(records, queue, rate_per_s))
    in_flight: deque[tuple[list[asyncio.Future], PublishStats]] = deque()
    try:
        done = False
        while not done:
            chunk, done = await _next_chunk(queue, linger_s, max_chunk_records)
            if chunk:
                if len(partition_of) > 100_000:
                    partition_of.clear()
                in_flight.append(await _send_chunk(producer, topic, partitions, partition_of, chunk,
                                                   tail_single_record))
            while in_flight and (len(in_flight) > max_chunks_in_flight or done
                                 or all(f.done() for f in in_flight[0][0])):
                futures, chunk_stats = in_flight.popleft()
                await asyncio.gather(*futures)  # raises the first delivery error
                _add(stats, chunk_stats)
                stats.seconds = time.monotonic() - started
                if status_cb is not None:
                    status_cb(stats)
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        for futures, _ in in_flight:  # after a failure: retrieve the others' errors so asyncio does not log them
            for future in futures:
                if future.done() and not future.cancelled():
                    future.exception()
    stats.seconds = time.monotonic() - started
    return stats


async def _feed(records: Iterable[Record] | AsyncIterable[Record],
                queue: asyncio.Queue[list[Record] | BaseException | None], rate_per_s: float | None) -> None:
    """Pull records (a slow source or pacing never delays a flush: the sender waits on the queue, not on us)."""
    items: list[Record] = []
    fixes = 0
    started = time.monotonic()
    try:
        async for record in _aiter(records):
            if rate_per_s:
                ahead_s = fixes / rate_per_s - (time.monotonic() - started)
                if ahead_s > 0.005:
                    if items:
                        await queue.put(items)
                        items = []
                    await asyncio.sleep(ahead_s)
                fixes += record.fixes if type(record) is SimRecord else 1
            items.append(record)
            if len(items) >= 500:
                await queue.put(items)
                items = []
                await asyncio.sleep(0)  # let the sender in
        if items:
            await queue.put(items)
        await queue.put(None)
    except Exception as exc:  # the sender re-raises it
        await queue.put(exc)


async def _aiter(records: Iterable[Record] | AsyncIterable[Record]) -> AsyncIterator[Record]:
    if isinstance(records, AsyncIterable):
        async for record in records:
            yield record
    else:
        for record in records:
            yield record


async def _next_chunk(queue: asyncio.Queue[list[Record] | BaseException | None], linger_s: float,
                      max_records: int) -> tuple[list[Record], bool]:
    """Records that arrive within ``linger_s`` of the first one (at most about ``max_records``); True at the end."""
    chunk: list[Record] = []
    deadline = 0.0
    while len(chunk) < max_records:
        if not chunk:
            item = await queue.get()
            deadline = time.monotonic() + linger_s
        elif not queue.empty():
            item = queue.get_nowait()
        else:
            try:
                item = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
        if item is None:
            return chunk, True
        if isinstance(item, BaseException):
            raise item
        chunk.extend(item)
    return chunk, False


async def _send_chunk(producer: Any, topic: str, partitions: list[int], partition_of: dict[bytes | None, int],
                      chunk: list[Record], tail_single_record: bool) -> tuple[list[asyncio.Future], PublishStats]:
    """One flush: the chunk's records per partition, in order, as few batches as fit (plus the one-record tail)."""
    by_partition: dict[int, list[Record]] = {}
    chunk_stats = PublishStats()
    for record in chunk:
        key = record[0]
        partition = partition_of.get(key)
        if partition is None:
            partition = partitions[partition_for_key(key, len(partitions))]
            if key is not None:
                partition_of[key] = partition
        by_partition.setdefault(partition, []).append(record)
        if type(record) is SimRecord:
            chunk_stats.fixes += len(record.fix_kinds)
            if record.kind is RecordKind.GOOD:
                chunk_stats.kinds[RecordKind.GOOD] += len(record.fix_kinds)
            else:
                chunk_stats.kinds.update(record.fix_kinds)
        else:
            chunk_stats.fixes += 1
        chunk_stats.bytes += len(record[1] or b"")
    chunk_stats.records = len(chunk)
    batches_by_partition = []
    for partition, items in by_partition.items():
        chunk_stats.partitions[partition] = len(items)
        split = len(items) - 1 if tail_single_record and len(items) > 1 else len(items)
        batches_by_partition.append([(partition, batch) for batch in _build_batches(producer, items[:split])]
                                    + [(partition, batch) for batch in _build_batches(producer, items[split:])])
    futures = []
    # round robin over partitions: aiokafka holds one batch per partition until it is on the wire, so this way
    # one produce request carries a batch of every partition instead of waiting partition by partition
    for batches in zip_longest(*batches_by_partition):
        for entry in batches:
            if entry is not None:
                futures.append(await producer.send_batch(entry[1], topic, partition=entry[0]))
    return futures, chunk_stats


def _build_batches(producer: Any, items: list[Record]) -> list[Any]:
    batches = []
    batch = None
    for record in items:
        if batch is None or batch.append(key=record[0], value=record[1], timestamp=None) is None:
            if batch is not None:
                batches.append(batch)
            batch = producer.create_batch()
            if batch.append(key=record[0], value=record[1], timestamp=None) is None:
                raise ValueError(f"a record of {len(record[1] or b'')} bytes is larger than the producer's batch")
    if batch is not None:
        batches.append(batch)
    return batches


def _add(total: PublishStats, part: PublishStats) -> None:
    total.records += part.records
    total.fixes += part.fixes
    total.bytes += part.bytes
    total.kinds.update(part.kinds)
    total.partitions.update(part.partitions)


async def _paced_by_event_time(records: Iterable[SimRecord], speed: float) -> AsyncIterator[SimRecord]:
    """Records released when their event time comes, ``speed`` times faster than real time (0 or inf: at once)."""
    started = time.monotonic()
    first_ms: int | None = None
    for count, record in enumerate(records):
        if speed > 0 and math.isfinite(speed):
            first_ms = record.ts_ms if first_ms is None else first_ms
            wait_s = (record.ts_ms - first_ms) / 1000.0 / speed - (time.monotonic() - started)
            if wait_s > 0.005:
                await asyncio.sleep(wait_s)
        elif count % 1000 == 999:
            await asyncio.sleep(0)
        yield record


async def simulate(bootstrap_servers: str, config: SimulationConfig, topic: str = "fleet.positions",
                   status_cb: StatusCallback | None = None,
                   producer_options: dict[str, Any] | None = None) -> PublishStats:
    """Publish a simulated fleet in real time: ``config.rate_per_s`` fixes per second of wall time.
    ``producer_options``: extra aiokafka producer arguments (TLS / SASL)."""
    return await publish(bootstrap_servers, topic, _paced_by_event_time(generate_records(config), 1.0),
                         status_cb=status_cb, producer_options=producer_options)


async def replay(bootstrap_servers: str, path: str | Path, topic: str = "fleet.positions", speed: float = 1.0,
                 batch_size: int = 1, device_prefix: str = "",
                 status_cb: StatusCallback | None = None,
                 producer_options: dict[str, Any] | None = None) -> PublishStats:
    """Replay a trace file or folder: ``speed`` 1 = real time, 60 = a minute per second, 0 or inf = at once."""
    records = trace_records(path, batch_size=batch_size, device_prefix=device_prefix)
    if not records:
        raise ValueError(f"{path}: no fixes")
    return await publish(bootstrap_servers, topic, _paced_by_event_time(records, speed), status_cb=status_cb,
                         producer_options=producer_options)
