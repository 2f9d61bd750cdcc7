"""Windowed aggregates in the worker, in two stages (the domain is :mod:`fleetstream.domain.aggregation`).

Positions are partitioned by device, so no worker sees every fix of a cell. Hence:

1. **Per input partition** (the position agent's batch): a :class:`CellAggregator`, a
   :class:`GeofenceAggregator` (windowed entries/exits/dwell, and occupancy) and a :class:`DistanceAggregator`,
   fed with the batch's accepted fixes and geofence events. The partition's watermark is the newest event time
   it has accepted. Windows it closes become *partials*: each cell's part goes to the ``fleet.cells.partials``
   partition its key (the cell) hashes to, in one message per partition that also carries the source's
   watermark (every partition gets one, so every stage-2 partition hears every source; one message per cell
   would cost more than the cells: Faust spends ~200 µs per consumed message). Closed geofence and distance
   windows stay here, queryable and merged at query time. All of it is checkpointed to the ``aggregates`` table
   (changelog: acknowledged with the batch's outputs).
2. **Per cell** (the same agent reads ``fleet.cells.partials``, co-partitioned with the positions topic): a
   :class:`CellStatsStore` per partition collects the partials and every source partition's watermark, and
   publishes each window to ``fleet.cells`` once, merged, when every source has closed it. A source with no
   input for ``aggregation_idle_s`` follows the others: its watermark moves up to the newest any source has
   reported, closing its own windows (so its partials go out before stage 2 can complete them); its fixes that
   arrive later than that are late. Stored in the ``cell-stats`` table; served by ``GET /cells``.

Both stages are replay-safe (the domain's checkpoints skip input offsets already counted, and stage 2 upserts
partials per source), so a crash at any point republishes at most identical values.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import orjson
from aiokafka.partitioner import DefaultPartitioner

from fleetstream.codecs import dumps
from fleetstream.config import Settings
from fleetstream.domain.aggregation import (
    NO_WATERMARK,
    CellAggregator,
    CellStats,
    CellStatsStore,
    DistanceAggregator,
    DistanceWindow,
    GeofenceAggregator,
    GeofenceStats,
    merge_cell_stats,
)
from fleetstream.streaming.output import OutRecord

AGGREGATES_TABLE = "aggregates"  # stage 1: key "<partition>/<c|g|d|x>/<aggregator key>"
CELL_STATS_TABLE = "cell-stats"  # stage 2: key "<partition>/<store key>"
_PREFIXES = ("c", "g", "d", "x")
_PARTITIONER = DefaultPartitioner()  # cells, geofences, distance, closed windows kept for queries


_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX_VALUE[_c] = _i
    _HEX_VALUE[bytes([_c]).upper()[0]] = _i
_NIBBLE_SHIFTS = np.arange(14, -1, -1, dtype=np.uint64) * np.uint64(4)


def h3_ints(cells: Sequence[str]) -> np.ndarray:
    """H3 cell strings -> uint64, vectorized (one join and a lookup table instead of ``int(c, 16)`` per cell)."""
    n = len(cells)
    joined = "".join(cells)
    if len(joined) != 15 * n or not joined.isascii():  # (every H3 index is 15 hex digits)
        return np.fromiter((int(c, 16) for c in cells), dtype=np.uint64, count=n)
    nibbles = _HEX_VALUE[np.frombuffer(joined.encode("ascii"), dtype=np.uint8)].reshape(n, 15)
    if (nibbles == 255).any():
        raise ValueError("not an H3 cell: a character is not a hex digit")
    return np.bitwise_or.reduce(nibbles.astype(np.uint64) << _NIBBLE_SHIFTS, axis=1)


class BatchRows:
    """One partition's accepted fixes and geofence events of one batch, collected on the per-fix path: one tuple
    append per fix ``(h3, device_id, ts_ms, speed_kmh, motion, distance_m, offset)``; the columns are built once
    per batch."""

    __slots__ = ("event_offsets", "events", "fixes")

    def __init__(self) -> None:
        self.fixes: list[tuple[str, str, int, float | None, str, float, int]] = []
        self.events: list[Any] = []
        self.event_offsets: list[int] = []

    def add(self, cell: str, device_id: str, ts_ms: int, speed_kmh: float | None, stopped: bool,
            distance_m: float, offset: int) -> None:
        """(For callers off the hot path, e.g. tests.)"""
        self.fixes.append((cell, device_id, ts_ms, speed_kmh, "stopped" if stopped else "moving", distance_m,
                           offset))


class SourceAggregates:
    """Stage 1 for one input partition."""

    def __init__(self, partition: int, settings: Settings) -> None:
        spec = settings.window_spec()
        self.partition = partition
        self.spec = spec
        interim = settings.aggregation_interim_s or None
        self.cells = CellAggregator(spec, settings.aggregation_resolutions, interim_interval_s=interim)
        self.fences = GeofenceAggregator(spec)
        self.distance = DistanceAggregator(spec)
        # closed windows, start -> geofence -> stats (a window emitted again after a restart replaces itself)
        self.closed_fences: dict[int, dict[str, GeofenceStats]] = {}
        self.closed_distance: dict[int, DistanceWindow] = {}
        self._closed_writes: list[tuple[str, Any]] = []
        self.last_input_wall_ms = 0
        self.sent_watermark: int | None = None

    @property
    def watermark(self) -> int | None:
        return self.cells.watermark

    @classmethod
    def restore(cls, partition: int, settings: Settings, entries: Iterable[tuple[str, Any]]) -> SourceAggregates:
        """From this partition's ``aggregates`` entries (keys without the partition prefix)."""
        parts: dict[str, list[tuple[str, Any]]] = {p: [] for p in _PREFIXES}
        for key, value in entries:
            kind, _, rest = key.partition("/")
            parts[kind].append((rest, value))
        agg = cls(partition, settings)
        spec = agg.spec
        interim = settings.aggregation_interim_s or None
        agg.cells = CellAggregator.restore(parts["c"], spec, settings.aggregation_resolutions,
                                           interim_interval_s=interim)
        agg.fences = GeofenceAggregator.restore(parts["g"], spec)
        agg.distance = DistanceAggregator.restore(parts["d"], spec)
        for key, value in parts["x"]:
            if value is None:
                continue
            kind, start = key.split(":")
            if kind == "fences":
                agg.closed_fences[int(start)] = {v[0]: GeofenceStats(*v) for v in value}
            else:
                agg.closed_distance[int(start)] = DistanceWindow(*value)
        return agg

    def add(self, rows: BatchRows) -> int:
        """Add a batch; returns how many of its fixes were late for their windows."""
        late = 0
        if rows.fixes:  # (the distance windows judge the same fixes late: counted once, here)
            cells, devices, ts, speeds, motions, distances, offsets = zip(*rows.fixes, strict=True)
            stopped = [m == "stopped" for m in motions]
            late = self.cells.add_batch(h3_ints(cells), devices, ts, speeds, stopped, offsets)
            self.distance.add_batch(ts, distances, offsets)
        if rows.events:
            self.fences.add_events(rows.events, rows.event_offsets)
        return late

    def advance(self, watermark_ms: int) -> list[CellStats]:
        """Raise the watermark: the cells' closed partials out, the geofence and distance windows kept (and
        written to the checkpoint) for queries until their retention passes."""
        partials = self.cells.advance(watermark_ms)
        changed = set()
        for stats in self.fences.advance(watermark_ms):
            self.closed_fences.setdefault(stats.window_start_ms, {})[stats.geofence_id] = stats
            changed.add(stats.window_start_ms)
        for start in sorted(changed):
            window = self.closed_fences[start]
            self._closed_writes.append((f"fences:{start}", [list(window[g]) for g in sorted(window)]))
        for window in self.distance.advance(watermark_ms):
            self.closed_distance[window.window_start_ms] = window
            self._closed_writes.append((f"distance:{window.window_start_ms}", list(window)))
        wm = self.cells.watermark
        if wm is not None:
            horizon = wm - self.spec.size_ms - self.spec.retention_ms
            for closed, kind in ((self.closed_fences, "fences"), (self.closed_distance, "distance")):
                for start in [s for s in closed if s < horizon]:
                    del closed[start]
                    self._closed_writes.append((f"{kind}:{start}", None))
        return partials

    def checkpoint(self) -> tuple[list[tuple[str, Any]], Callable[[], None]]:
        """(writes with their kind prefix, what to call once they and the outputs before them are acked)."""
        writes: list[tuple[str, Any]] = []
        seqs = []
        for prefix, agg in (("c", self.cells), ("g", self.fences), ("d", self.distance)):
            checkpoint = agg.checkpoint()
            seqs.append((agg, checkpoint.seq))
            writes.extend((f"{prefix}/{key}", value) for key, value in checkpoint.writes)
        writes.extend((f"x/{key}", value) for key, value in self._closed_writes)
        self._closed_writes = []

        def acknowledge() -> None:
            for agg, seq in seqs:
                agg.acknowledge(seq)

        return writes, acknowledge

    # -- queries (this partition's part) ---------------------------------------------------------------------

    def geofence_windows(self, geofence_id: str) -> list[GeofenceStats]:
        """This partition's part of every window of a geofence: closed ones, then open ones (``final=False``)."""
        out = [window[geofence_id] for window in self.closed_fences.values() if geofence_id in window]
        for start in sorted(self.fences._acc):
            open_ = self.fences.peek(geofence_id, start)
            if open_ is not None:
                out.append(open_)
        return out

    def distance_windows(self) -> list[DistanceWindow]:
        out = list(self.closed_distance.values())
        for start, window in sorted(self.distance._acc.items()):
            acc = window.get("fleet")
            if acc is not None:
                out.append(DistanceWindow(start, start + self.spec.size_ms, acc["mm"] / 1000, acc["fixes"], False))
        return out


class CellStage:
    """Stage 2 for one partition of the partials topic."""

    def __init__(self, settings: Settings, store: CellStatsStore | None = None) -> None:
        self.store = store or CellStatsStore(settings.window_spec())

    def watermarks(self, sources: int) -> dict[int, int] | None:
        """Every source's watermark, or None until each has sent one (an idle source sends the newest it knows
        of, after closing its own windows: it never holds the others back for long, and never loses its fixes
        by being taken as caught up before its partials are in)."""
        known = self.store.watermarks
        return known if len(known) >= sources else None


class Aggregation:
    """Both stages for the partitions this worker holds; called by the position pipeline with no await."""

    def __init__(self, settings: Settings, items: Callable[[str], Iterator[tuple[int, bytes, bytes]]] | None = None,
                 sources: int | None = None, wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
                 active: Callable[[], Iterable[int]] | None = None) -> None:
        self.settings = settings
        self.items = items  # table name -> (partition, key, value) of the active partitions' records
        self.sources = sources or settings.partitions  # partitions of the positions topic
        self.wall_ms = wall_ms
        self.by_source: dict[int, SourceAggregates] = {}
        self.by_cells: dict[int, CellStage] = {}
        self.changelogs: dict[str, str] = {}
        self.spec = settings.window_spec()
        self._all = list(range(self.sources))  # (the partials topic has as many partitions as the positions topic)
        self._cell_partitions: dict[str, int] = {}
        self.active = active  # the partitions held here, once their tables are recovered (for queries)

    def _load_active(self) -> None:
        """Queries may come before any input: load every held partition's state first."""
        for partition in self.active() if self.active is not None else ():
            self.source(partition)
            self.cell_stage(partition)

    def reset(self) -> None:
        """Partitions moved: restore lazily from the tables on next use."""
        self.by_source.clear()
        self.by_cells.clear()

    # -- stage 1 ---------------------------------------------------------------------------------------------

    def source(self, partition: int) -> SourceAggregates:
        agg = self.by_source.get(partition)
        if agg is None:
            entries = self._entries(AGGREGATES_TABLE, partition)
            agg = SourceAggregates.restore(partition, self.settings, entries) if entries else \
                SourceAggregates(partition, self.settings)
            self.by_source[partition] = agg
        return agg

    def _entries(self, table: str, partition: int) -> list[tuple[str, Any]]:
        if self.items is None:
            return []
        prefix = f"{partition}/"
        return [(key.decode()[len(prefix):], orjson.loads(value)) for p, key, value in self.items(table)
                if p == partition and key.decode().startswith(prefix)]

    def on_batch(self, rows: Mapping[int, BatchRows], records: list[OutRecord],
                 state_writes: list[tuple[int, bytes, bytes | None]], acks: list[Callable[[], None]]) -> int:
        """Stage 1 for a batch's rows per partition: partials and watermarks to ``records``, checkpoints to
        ``state_writes`` (and ``records``, as changelog records); returns the late count."""
        late = 0
        now = self.wall_ms()
        for partition, batch in rows.items():
            agg = self.source(partition)
            agg.last_input_wall_ms = now
            late += agg.add(batch)
            if batch.fixes:
                wm = max(fix[2] for fix in batch.fixes)
                if agg.watermark is not None:
                    wm = max(wm, agg.watermark)
                self._advance(agg, wm, records, idle=False)
            self._checkpoint(agg, records, state_writes, acks)
        return late

    def _advance(self, agg: SourceAggregates, wm: int, records: list[OutRecord], idle: bool) -> None:
        partials = agg.advance(wm)
        if partials or idle or agg.sent_watermark is None or self._window_moved(agg.sent_watermark, wm):
            self.send(agg.partition, wm, idle, partials, records)
            agg.sent_watermark = wm

    def _window_moved(self, sent: int, wm: int) -> bool:
        """Whether a watermark update could close a window at stage 2 (at most one per step of windows)."""
        spec = self.spec
        return (wm - spec.grace_ms) // spec.step_ms != (sent - spec.grace_ms) // spec.step_ms

    def partition_of(self, cell: str) -> int:
        """The partials partition of a cell: murmur2 of its key, as a keyed send (and Faust's table routing) does."""
        found = self._cell_partitions.get(cell)
        if found is None:
            if len(self._cell_partitions) > 1_000_000:
                self._cell_partitions.clear()
            found = self._cell_partitions[cell] = _PARTITIONER(cell.encode(), self._all, self._all)
        return found

    def send(self, source: int, wm: int | None, idle: bool, partials: Sequence[CellStats],
             records: list[OutRecord]) -> None:
        """One message per partials partition: this source's watermark and its partials for that partition's
        cells. (Faust costs ~200 µs per consumed message: a message per cell would cost more than the cells.)"""
        by_partition: dict[int, list[list[Any]]] = {q: [] for q in range(self.sources)}
        for stats in partials:
            by_partition[self.partition_of(stats.h3)].append(stats.to_json())
        key = f"source:{source}".encode()
        topic = self.settings.cell_partials_topic
        for partition, stats_list in by_partition.items():
            value = dumps({"type": "partials", "source": source, "watermark_ms": wm, "idle": idle,
                           "stats": stats_list})
            records.append(OutRecord(topic, key, value, partition))

    def _checkpoint(self, agg: SourceAggregates, records: list[OutRecord],
                    state_writes: list[tuple[int, bytes, bytes | None]], acks: list[Callable[[], None]]) -> None:
        writes, ack = agg.checkpoint()
        topic = self.changelog(AGGREGATES_TABLE)
        for key, value in writes:
            raw_key = f"{agg.partition}/{key}".encode()
            raw = dumps(value) if value is not None else None
            state_writes.append((agg.partition, raw_key, raw))
            records.append(OutRecord(topic, raw_key, raw, agg.partition))
        acks.append(ack)

    def on_timer(self, partitions: Iterable[int], records: list[OutRecord],
                 state_writes: list[tuple[int, bytes, bytes | None]], acks: list[Callable[[], None]]) -> None:
        """Partitions with no input for ``aggregation_idle_s`` (or none yet) follow the others: their watermark
        moves up to the newest any source has reported (as the stage-2 partitions held here know it), which
        closes their own windows, and they tell stage 2 they are idle. Their fixes arriving later than that are
        late (counted, left out), as after any watermark."""
        now = self.wall_ms()
        idle_ms = self.settings.aggregation_idle_s * 1000
        known = [wm for stage in self.by_cells.values() for wm in stage.store.watermarks.values()]
        newest = max(known) if known else None
        for partition in partitions:
            agg = self.source(partition)
            if now - agg.last_input_wall_ms < idle_ms:
                continue
            agg.last_input_wall_ms = now  # (said again after another idle period)
            own = agg.watermark
            if newest is not None and (own is None or newest > own):
                self._advance(agg, newest, records, idle=True)
                self._checkpoint(agg, records, state_writes, acks)
            else:
                self.send(partition, own, True, (), records)

    # -- stage 2 ---------------------------------------------------------------------------------------------

    def cell_stage(self, partition: int) -> CellStage:
        stage = self.by_cells.get(partition)
        if stage is None:
            entries = self._entries(CELL_STATS_TABLE, partition)
            store = CellStatsStore.restore(entries, self.settings.window_spec()) if entries else None
            stage = self.by_cells[partition] = CellStage(self.settings, store)
        return stage

    def on_partials(self, partition: int, values: Sequence[Mapping[str, Any]], records: list[OutRecord],
                    state_writes: list[tuple[int, bytes, bytes | None]]) -> int:
        """Stage 2: collect partials and watermarks; publish what every source has closed; returns how many."""
        stage = self.cell_stage(partition)
        store = stage.store
        interim: set[tuple[str, int]] = set()
        for value in values:
            source = int(value["source"])
            stats = [CellStats.from_json(s) for s in value["stats"]]
            store.add(stats, source)
            interim.update((s.h3, s.window_start_ms) for s in stats if not s.final)
            if value["watermark_ms"] is not None:
                store.note_watermark(source, int(value["watermark_ms"]))
        published = 0
        for cell, start in sorted(interim):  # (aggregation_interim_s: the merged value so far, final false)
            current = store.get(cell, start)
            if current is not None:
                records.append(OutRecord(self.settings.cells_topic, cell.encode(),
                                         dumps(current._replace(final=False).to_dict()), partition))
        marks = stage.watermarks(self.sources)
        if marks is not None:
            finals = store.complete(marks)
            for stats in finals:
                records.append(OutRecord(self.settings.cells_topic, stats.h3.encode(), dumps(stats.to_dict()),
                                         partition))
            published = len(finals)
            store.expire(min(marks.values()))
        topic = self.changelog(CELL_STATS_TABLE)
        for key, value in store.changes():
            raw_key = f"{partition}/{key}".encode()
            raw = dumps(value) if value is not None else None
            state_writes.append((partition, raw_key, raw))
            records.append(OutRecord(topic, raw_key, raw, partition))
        return published

    def changelog(self, table: str) -> str:
        """The table's changelog topic (Faust's naming unless the worker says otherwise)."""
        return self.changelogs.get(table) or f"{self.settings.app_id}-{table}-changelog"

    # -- queries ---------------------------------------------------------------------------------------------

    def cell(self, partition: int, cell: str, window_start_ms: int | None) -> CellStats | None:
        return self.cell_stage(partition).store.get(cell, window_start_ms)

    def local_windows(self, resolution: int) -> list[int]:
        """Starts of the windows the stage-2 partitions held here have cells of."""
        self._load_active()
        return sorted({start for stage in self.by_cells.values() for start in stage.store.windows(resolution)})

    def local_cells(self, resolution: int, window_start_ms: int | None,
                    bbox: tuple[float, float, float, float] | None) -> list[CellStats]:
        """Cells of the stage-2 partitions held here (each cell lives in exactly one)."""
        self._load_active()
        out: list[CellStats] = []
        for stage in self.by_cells.values():
            out.extend(stage.store.cells(resolution, window_start_ms, bbox))
        return out

    def local_geofence_windows(self, geofence_id: str) -> list[GeofenceStats]:
        self._load_active()
        return [s for agg in self.by_source.values() for s in agg.geofence_windows(geofence_id)]

    def local_distance(self) -> list[DistanceWindow]:
        self._load_active()
        return [w for agg in self.by_source.values() for w in agg.distance_windows()]

    def local_occupancy(self, geofence_id: str) -> list[str]:
        self._load_active()
        return [d for agg in self.by_source.values() for d in agg.fences.occupants(geofence_id)]


def merge_windows_of(parts: Iterable[Any], key: Callable[[Any], Any], merge: Callable[[list[Any]], Any]) -> list[Any]:
    """Group per-partition parts by ``key`` and merge each group, sorted by key."""
    groups: dict[Any, list[Any]] = {}
    for part in parts:
        groups.setdefault(key(part), []).append(part)
    return [merge(groups[k]) for k in sorted(groups)]


__all__ = ["AGGREGATES_TABLE", "CELL_STATS_TABLE", "NO_WATERMARK", "Aggregation", "BatchRows", "CellStage",
           "SourceAggregates", "merge_cell_stats", "merge_windows_of"]
