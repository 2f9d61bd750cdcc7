"""The worker's two aggregation stages wired together in process (tables as dicts, topics as lists): every window
of every cell published once, equal to a plain-Python reference, across restarts and replays of unacknowledged
batches, with idle partitions neither holding windows back nor losing their own fixes."""

from __future__ import annotations

import math
import random
from collections import defaultdict

import h3
import orjson
import pytest
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetstream.codecs import parse_ts
from fleetstream.config import Settings
from fleetstream.streaming.aggregates import AGGREGATES_TABLE, CELL_STATS_TABLE, Aggregation, BatchRows, h3_ints
from fleetstream.streaming.pipeline import check_partial

PARTITIONS = 3
WINDOW_MS = 60_000
T0 = 1_790_000_040_000 // WINDOW_MS * WINDOW_MS
_partitioner = DefaultPartitioner()


def partition_of(key: bytes) -> int:
    return _partitioner(key, list(range(PARTITIONS)), list(range(PARTITIONS)))


class Cluster:
    """Stage 1 and 2 over in-memory tables; ``crash`` drops what was not acknowledged and restarts."""

    def __init__(self, **overrides: object) -> None:
        self.settings = Settings.load(env={}, partitions=PARTITIONS, aggregation_idle_s=2.0, **overrides)
        self.tables: dict[str, dict[bytes, bytes]] = {AGGREGATES_TABLE: {}, CELL_STATS_TABLE: {}}
        self.wall = 0
        self.stage2: dict[int, list[dict]] = defaultdict(list)  # partials topic, per partition, not yet read
        self.cells: list[dict] = []
        self.late = 0
        self.start()

    def start(self) -> None:
        def items(table: str):
            for key, value in list(self.tables[table].items()):
                yield int(key.split(b"/", 1)[0]), key, value

        self.agg = Aggregation(self.settings, items=items, sources=PARTITIONS,
                               wall_ms=lambda: self.wall, active=lambda: range(PARTITIONS))

    def _deliver(self, records, writes, acks, table: str, ack: bool = True) -> None:
        if not ack:
            return
        for _, key, value in writes:
            if value is None:
                self.tables[table].pop(key, None)
            else:
                self.tables[table][key] = value
        for record in records:
            if record.topic == self.settings.cell_partials_topic:
                value = orjson.loads(record.value)
                check_partial(value)
                partition = record.partition if record.partition is not None else partition_of(record.key)
                self.stage2[partition].append(value)
            elif record.topic == self.settings.cells_topic:
                self.cells.append(orjson.loads(record.value))
        for acknowledge in acks:
            acknowledge()

    def batch(self, rows: dict[int, BatchRows], ack: bool = True) -> None:
        records, writes, acks = [], [], []
        self.late += self.agg.on_batch(rows, records, writes, acks)
        self._deliver(records, writes, acks, AGGREGATES_TABLE, ack)

    def timer(self) -> None:
        records, writes, acks = [], [], []
        self.agg.on_timer(range(PARTITIONS), records, writes, acks)
        self._deliver(records, writes, acks, AGGREGATES_TABLE)

    def read_partials(self) -> None:
        for partition in range(PARTITIONS):
            values, self.stage2[partition] = self.stage2[partition], []
            if values:
                records, writes = [], []
                self.agg.on_partials(partition, values, records, writes)
                self._deliver(records, writes, [], CELL_STATS_TABLE)

    def crash(self) -> None:
        self.start()


def rows_for(fixes: list[tuple[str, int, float, float, float, int]]) -> dict[int, BatchRows]:
    out: dict[int, BatchRows] = {}
    for device, ts, lat, lon, speed, offset in fixes:
        rows = out.setdefault(partition_of(device.encode()), BatchRows())
        rows.add(h3.latlng_to_cell(lat, lon, 9), device, ts, speed, False, 0.0, offset)
    return out


def reference(fixes) -> dict[tuple[str, int], tuple[int, int, float, float]]:
    rows: dict[tuple[str, int], list[tuple[str, float]]] = defaultdict(list)
    for device, ts, lat, lon, speed, _ in fixes:
        fine = h3.latlng_to_cell(lat, lon, 9)
        for res in (7, 8):
            rows[(h3.cell_to_parent(fine, res), ts // WINDOW_MS * WINDOW_MS)].append((device, speed))
    out = {}
    for key, values in rows.items():
        speeds = sorted(math.floor(s + 0.5) for _, s in values)
        out[key] = (len(values), len({d for d, _ in values}), sum(s for _, s in values) / len(values),
                    float(speeds[math.ceil(0.95 * len(speeds)) - 1]))
    return out


def fleet(seed: int, devices: int, minutes: int) -> list[tuple[str, int, float, float, float, int]]:
    """Fixes in arrival order: every 10 s per device, devices shifted by up to 15 s (within the 10 s grace of the
    next window's close... and a little out of order across devices); each device's offset increases."""
    rng = random.Random(seed)
    fixes = []
    for d in range(devices):
        lat, lon, delay = 51.5 + rng.uniform(-0.05, 0.05), -0.1 + rng.uniform(-0.05, 0.05), rng.uniform(0, 8_000)
        for k in range(minutes * 6):
            lat, lon = lat + rng.uniform(-0.001, 0.001), lon + rng.uniform(-0.001, 0.001)
            fixes.append((f"dev-{d}", T0 + k * 10_000, lat, lon, float(rng.randint(0, 130)), delay))
    fixes.sort(key=lambda f: f[1] + f[5])
    return [(d, ts, lat, lon, speed, offset) for offset, (d, ts, lat, lon, speed, _) in enumerate(fixes)]


def published(cluster: Cluster) -> dict[tuple[str, int], tuple[int, int, float, float]]:
    """The final values published, by (cell, window start); a window published twice must be identical."""
    out: dict[tuple[str, int], tuple[int, int, float, float]] = {}
    for record in cluster.cells:
        if not record["final"]:
            continue
        key = (record["h3"], parse_ts(record["window_start"]))
        value = (record["events"], record["devices"], record["avg_speed_kmh"], record["p95_speed_kmh"])
        assert out.get(key, value) == value, f"published twice, differently: {key}"
        assert record["final"] is True
        out[key] = value
    return out


def close_everything(cluster: Cluster, fixes, batch: int) -> None:
    """A fix far ahead on one partition, then idle time: every other partition follows and closes its windows."""
    last = max(f[1] for f in fixes)
    cluster.wall += 3_000  # every partition idle (and saying so) before the closing fix
    cluster.timer()
    cluster.read_partials()
    cluster.batch(rows_for([("closer", last + 10 * WINDOW_MS, 51.5, -0.1, 1.0, len(fixes))]))
    for _ in range(4):
        cluster.read_partials()
        cluster.wall += 3_000
        cluster.timer()
    cluster.read_partials()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000), st.integers(4, 12), st.sampled_from([20, 60]), st.sampled_from([None, 1, 3]),
       st.booleans())
def test_every_window_is_published_once_and_equals_the_reference(seed, devices, batch, crash_at, acked):
    """A crash loses a batch's outputs (``acked`` False) or only its input offsets (True: the state and outputs
    made it, the inputs come again): either way the batch is processed again after the restart."""
    fixes = fleet(seed, devices, minutes=4)
    cluster = Cluster()
    for n, i in enumerate(range(0, len(fixes), batch)):
        chunk = fixes[i:i + batch]
        if crash_at is not None and n == crash_at:
            cluster.batch(rows_for(chunk), ack=acked)
            if acked:
                cluster.read_partials()
            cluster.crash()
        cluster.batch(rows_for(chunk))
        cluster.read_partials()
    close_everything(cluster, fixes, batch)
    expected = reference(fixes)
    got = published(cluster)
    assert set(got) == set(expected)
    for key, (events, devs, avg, p95) in expected.items():
        assert got[key][:2] == (events, devs), key
        assert got[key][2] == pytest.approx(avg, abs=1e-6)
        assert got[key][3] == p95
    assert cluster.late == 0


def test_late_fixes_are_counted_and_left_out_and_queries_see_the_cells():
    fixes = fleet(3, 6, minutes=4)
    cluster = Cluster()
    cluster.batch(rows_for(fixes))
    cluster.read_partials()
    late = [(f"late-{i}", T0 + 1_000, 51.5, -0.1, 99.0, len(fixes) + i) for i in range(PARTITIONS * 3)]
    on_time = [f for f in late if cluster.agg.source(partition_of(f[0].encode())).watermark is None]
    assert len(on_time) <= 6
    cluster.batch(rows_for(late))
    assert cluster.late == len(late) - len(on_time)  # (a partition with no watermark yet has closed nothing)
    close_everything(cluster, fixes + late, 100)
    expected = reference(fixes + on_time)
    assert published(cluster).keys() == expected.keys()
    cluster.crash()  # the queries read the stores back from the tables
    cell, start = min(expected)
    found = cluster.agg.cell(partition_of(cell.encode()), cell, start)
    assert found is not None and (found.events, found.devices) == expected[(cell, start)][:2]
    res8 = {c for c, s in expected if s == T0 and h3.get_resolution(c) == 8}
    assert {c.h3 for c in cluster.agg.local_cells(8, T0, None)} == res8
    assert cluster.agg.local_windows(8)[0] == T0


@given(st.lists(st.tuples(st.floats(-89, 89), st.floats(-179.9, 179.9), st.integers(0, 15)), max_size=50),
       st.booleans())
def test_h3_ints_parses_cells_like_int_base_16(points, upper):
    cells = [h3.latlng_to_cell(lat, lon, res) for lat, lon, res in points]
    cells = [c.upper() for c in cells] if upper else cells
    assert h3_ints(cells).tolist() == [int(c, 16) for c in cells]


def test_h3_ints_refuses_what_is_not_hex():
    with pytest.raises(ValueError, match="hex"):
        h3_ints(["8928308280fffff", "8928308280fffzz"])


def test_interim_values_come_before_the_final_one_and_never_exceed_it():
    fixes = fleet(5, 8, minutes=4)
    cluster = Cluster(aggregation_interim_s=20)
    for i in range(0, len(fixes), 20):
        cluster.batch(rows_for(fixes[i:i + 20]))
        cluster.read_partials()
    close_everything(cluster, fixes, 20)
    expected = reference(fixes)
    assert published(cluster).keys() == expected.keys()
    interim = [r for r in cluster.cells if not r["final"]]
    assert interim, "interim values were asked for"
    final_at = {(r["h3"], r["window_start"]): n for n, r in enumerate(cluster.cells) if r["final"]}
    for n, record in enumerate(cluster.cells):
        if record["final"]:
            continue
        key = (record["h3"], record["window_start"])
        if parse_ts(key[1]) > max(f[1] for f in fixes):
            continue  # the closing fix's own window: still open
        assert n < final_at[key]
        assert record["events"] <= expected[(key[0], parse_ts(key[1]))][0]
