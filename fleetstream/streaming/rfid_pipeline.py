"""The RFID hot path, one batch of ``fleet.rfid`` records at a time. CPU only: no Faust, no awaits.

Like :class:`~fleetstream.streaming.pipeline.PositionPipeline`: the agent hands a batch of raw records here and
flushes what comes back (asset events, alerts, dead letters and the asset-state changelog) in one go. Every read
ends in exactly one place: it advances its tag's state (an event or alert when something changed; a duplicate
only updates the de-duplication window), or it goes to the dead-letter topic with a reason, or, with
``rfid_unknown_reader=hold``, it waits in its tag's held reads until its reader is defined (then it is stepped)
or until ``rfid_hold_s`` has passed (then it is dead-lettered).

A tag's table value is its :meth:`AssetState.to_dict` plus, only while it has some, ``held`` (reads from unknown
readers); a tag with held reads and no state yet is ``{"tag_id": ..., "held": [...]}``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import orjson

from fleetstream.codecs import CodecLimits, DecodeError, deadletter_record, decode_rfid, dumps, format_ts
from fleetstream.config import Settings
from fleetstream.domain.assets import (
    AssetAlert,
    AssetConfig,
    AssetEvent,
    AssetRegistry,
    AssetState,
    VehicleLike,
)
from fleetstream.domain.assets import step as asset_step
from fleetstream.domain.assets import tick as asset_tick
from fleetstream.domain.models import RfidRead
from fleetstream.domain.readers import ReaderRegistry
from fleetstream.streaming.output import OutRecord
from fleetstream.streaming.pipeline import InRecord, StateReader

UNKNOWN_READER = "unknown_reader"


class HeldRead(NamedTuple):
    """A read waiting for its reader to be defined, with where it came from (for its dead letter, if it comes
    to that)."""

    reader_id: str
    ts_ms: int
    rssi_dbm: float | None
    antenna: int | None
    partition: int
    offset: int
    index: int

    def read(self, tag_id: str) -> RfidRead:
        return RfidRead(tag_id, self.reader_id, self.ts_ms, self.rssi_dbm, self.antenna)


class TagEntry(NamedTuple):
    """A tag's table value: its asset state (None before its first usable read) and its held reads."""

    state: AssetState | None
    held: tuple[HeldRead, ...] = ()


def encode_entry(tag_id: str, entry: TagEntry) -> bytes:
    doc: dict[str, Any] = entry.state.to_dict() if entry.state is not None else {"tag_id": tag_id}
    if entry.held:
        doc["held"] = [list(h) for h in entry.held]
    return dumps(doc)


def decode_entry(raw: bytes) -> TagEntry:
    doc = orjson.loads(raw)
    held = tuple(HeldRead(*h) for h in doc.pop("held", ()))
    return TagEntry(AssetState.from_dict(doc) if "v" in doc else None, held)


@dataclass(slots=True)
class RfidOutput:
    records: list[OutRecord] = field(default_factory=list)
    state_writes: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # (partition, key, value)
    new_entries: dict[str, tuple[int, TagEntry]] = field(default_factory=dict)  # tag -> (partition, entry)
    messages: int = 0
    reads: int = 0
    deadlettered: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)  # asset events by type
    alerts: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # (rule, severity, state)
    held: int = 0  # reads put on hold
    released: int = 0  # held reads stepped once their reader was defined
    newest_ts: dict[int, int] = field(default_factory=dict)  # partition -> newest read time (the event clock)

    def merge(self, other: RfidOutput) -> None:
        self.records.extend(other.records)
        self.state_writes.extend(other.state_writes)
        self.new_entries.update(other.new_entries)
        self.reads += other.reads
        self.deadlettered.update(other.deadlettered)
        self.events.update(other.events)
        self.alerts.update(other.alerts)
        self.held += other.held
        self.released += other.released
        for partition, ts in other.newest_ts.items():
            if ts > self.newest_ts.get(partition, -1):
                self.newest_ts[partition] = ts


@dataclass(slots=True)
class RfidStats:
    """Totals for ``/rfid/status`` and the benchmark (wall and CPU clocks from the first batch to the last flush)."""

    messages_in: int = 0
    reads_in: int = 0
    deadlettered: Counter[str] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    alerts: Counter[str] = field(default_factory=Counter)
    held: int = 0
    released: int = 0
    batches: int = 0
    first_batch_wall_s: float | None = None
    first_batch_cpu_s: float | None = None
    last_flush_wall_s: float | None = None
    last_flush_cpu_s: float | None = None

    def add(self, out: RfidOutput) -> None:
        self.batches += 1
        self.messages_in += out.messages
        self.reads_in += out.reads
        self.deadlettered.update(out.deadlettered)
        self.events.update(out.events)
        for (_, _, state), count in out.alerts.items():
            self.alerts[state] += count
        self.held += out.held
        self.released += out.released
        self.last_flush_wall_s = time.time()
        self.last_flush_cpu_s = time.process_time()

    def mark_batch_start(self) -> None:
        if self.first_batch_wall_s is None:
            self.first_batch_wall_s = time.time()
            self.first_batch_cpu_s = time.process_time()

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages_in": self.messages_in, "reads_in": self.reads_in,
            "deadlettered": sum(self.deadlettered.values()), "deadlettered_by_reason": dict(self.deadlettered),
            "asset_events": dict(self.events), "alerts": dict(self.alerts), "held": self.held,
            "released": self.released, "batches": self.batches,
            "first_batch_wall_s": self.first_batch_wall_s, "first_batch_cpu_s": self.first_batch_cpu_s,
            "last_flush_wall_s": self.last_flush_wall_s, "last_flush_cpu_s": self.last_flush_cpu_s,
        }


def asset_config(settings: Settings) -> AssetConfig:
    """The domain's config from the worker's settings."""
    return AssetConfig(
        dedup_window_s=settings.rfid_dedup_window_s, switch_margin_db=settings.rfid_switch_margin_db,
        switch_after_s=settings.rfid_switch_after_s, missing_after_s=settings.rfid_missing_after_s or None,
        separation_after_s=settings.rfid_separation_after_s or None,
        unaccompanied_motion=settings.rfid_unaccompanied_motion,
    )


_NO_VEHICLES: Mapping[str, VehicleLike] = {}


class RfidPipeline:
    """Decode, validate, de-duplicate, resolve and account for a batch of ``fleet.rfid`` records."""

    def __init__(
        self,
        settings: Settings,
        state: StateReader,
        *,
        changelog_topic: str,
        readers: Callable[[], ReaderRegistry],
        assets: Callable[[], AssetRegistry] = AssetRegistry,
        vehicles: Callable[[], Mapping[str, VehicleLike]] = lambda: _NO_VEHICLES,
        copartitioned: bool = True,
        clock_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.settings = settings
        self.state = state
        self.changelog_topic = changelog_topic
        self.readers = readers
        self.assets = assets
        self.vehicles = vehicles
        self.copartitioned = copartitioned
        self.clock_ms = clock_ms
        self.config = asset_config(settings)
        self.hold = settings.rfid_unknown_reader == "hold"
        self.hold_max = settings.rfid_hold_max
        self.hold_ms = round(settings.rfid_hold_s * 1000)
        self.limits = CodecLimits(
            max_message_bytes=settings.max_message_bytes, max_batch_items=settings.max_batch_items,
            max_future_skew_ms=int(settings.max_future_skew_s * 1000),
        )

    # -- a batch of reads

    def process(self, records: Sequence[InRecord],
                pending: Mapping[str, tuple[int, TagEntry]] | None = None) -> RfidOutput:
        """``pending``: entries of earlier batches not yet acknowledged (read before the store, never modified)."""
        now_ms = self.clock_ms()
        out = RfidOutput(messages=len(records))
        pending = pending or {}
        readers, vehicles, assets, config = self.readers(), self.vehicles(), self.assets(), self.config
        known = readers.get
        work: dict[str, list[Any]] = {}  # tag -> [partition, state, held, changed]
        newest = out.newest_ts
        emit = self._emit
        limits = self.limits
        for record in records:
            partition = record.partition
            items = decode_rfid(record.key, record.value, now_ms=now_ms, limits=limits)
            out.reads += len(items)
            for index, item in enumerate(items):
                if type(item) is DecodeError:
                    out.records.append(self._deadletter(out, record.partition, record.offset, index, record.key,
                                                        record.value, item, now_ms))
                    continue
                read: RfidRead = item  # type: ignore[assignment]
                tag = read.tag_id
                w = work.get(tag)
                if w is None:
                    w = work[tag] = self._load(partition, tag, pending)
                if read.ts_ms > newest.get(partition, -1):
                    newest[partition] = read.ts_ms
                if known(read.reader_id) is None:
                    self._unknown(out, w, record, index, read, record.value if len(items) == 1 else None, now_ms)
                    continue
                state = w[1]
                new, events, alerts = asset_step(state, read, readers, vehicles, assets, config)
                if new is not state:
                    w[1] = new
                    w[3] = True
                if events or alerts:
                    emit(out, w[0], tag, events, alerts)
        self._write(out, work)
        return out

    def _load(self, partition: int, tag: str, pending: Mapping[str, tuple[int, TagEntry]]) -> list[Any]:
        cached = pending.get(tag)
        if cached is not None:
            return [cached[0], cached[1].state, cached[1].held, False]
        raw = self.state.get(partition, tag.encode())
        entry = decode_entry(raw) if raw else TagEntry(None)
        return [partition, entry.state, entry.held, False]

    def _unknown(self, out: RfidOutput, w: list[Any], record: InRecord, index: int, read: RfidRead,
                 raw: bytes | None, now_ms: int) -> None:
        """A read from a reader the registry does not know: dead letter (``raw``: the message when it held just
        this read, else the read alone), or hold (the oldest beyond the limit dead-lettered)."""
        if not self.hold:
            error = DecodeError(UNKNOWN_READER, f"reader {read.reader_id!r} is not in the readers registry")
            out.records.append(self._deadletter(out, record.partition, record.offset, index, record.key,
                                                raw if raw is not None else _read_json(read), error, now_ms))
            return
        held = (*w[2], HeldRead(read.reader_id, read.ts_ms, read.rssi_dbm, read.antenna, record.partition,
                                record.offset, index))
        out.held += 1
        if len(held) > self.hold_max:
            held = tuple(sorted(held, key=lambda h: h.ts_ms))
            for dropped in held[: len(held) - self.hold_max]:
                self._deadletter_held(out, read.tag_id, dropped, "more reads held than rfid_hold_max", now_ms)
            held = held[len(held) - self.hold_max:]
        w[2] = held
        w[3] = True

    # -- the timer

    def tick(self, due: Iterable[tuple[int, str]], pending: Mapping[str, tuple[int, TagEntry]] | None,
             watermark: Callable[[int], int | None]) -> RfidOutput:
        """Deadlines come due (``due``: (partition, tag) pairs; each is re-read and skipped if no longer due),
        and held reads whose reader is now defined (stepped) or that waited ``rfid_hold_s`` (dead-lettered)."""
        out = RfidOutput()
        pending = pending or {}
        readers, vehicles, assets, config = self.readers(), self.vehicles(), self.assets(), self.config
        now_ms = self.clock_ms()
        work: dict[str, list[Any]] = {}
        for partition, tag in due:
            w = work.get(tag) or work.setdefault(tag, self._load(partition, tag, pending))
            mark = watermark(partition)
            state = w[1]
            if state is not None and mark is not None:
                new, events, alerts = asset_tick(state, mark, readers, vehicles, assets, config)
                if new is not state:
                    w[1] = new
                    w[3] = True
                if events or alerts:
                    self._emit(out, w[0], tag, events, alerts)
            if w[2]:
                self._release(out, w, tag, readers, vehicles, assets, mark, now_ms)
        self._write(out, work)
        return out

    def _release(self, out: RfidOutput, w: list[Any], tag: str, readers: ReaderRegistry,
                 vehicles: Mapping[str, VehicleLike], assets: AssetRegistry, mark: int | None, now_ms: int) -> None:
        """Step the held reads whose reader is now known (oldest first); dead-letter those held too long."""
        keep = []
        for held in sorted(w[2], key=lambda h: h.ts_ms):
            if readers.get(held.reader_id) is not None:
                state = w[1]
                new, events, alerts = asset_step(state, held.read(tag), readers, vehicles, assets, self.config)
                w[1] = new
                out.released += 1
                if events or alerts:
                    self._emit(out, w[0], tag, events, alerts)
            elif mark is not None and held.ts_ms < mark - self.hold_ms:
                self._deadletter_held(out, tag, held, f"held {self.hold_ms / 1000:g} s", now_ms)
            else:
                keep.append(held)
        if len(keep) != len(w[2]):
            w[2] = tuple(keep)
            w[3] = True

    # -- outputs

    def _write(self, out: RfidOutput, work: Mapping[str, list[Any]]) -> None:
        topic = self.changelog_topic
        for tag, (partition, state, held, changed) in work.items():
            if not changed:
                continue
            key = tag.encode()
            entry = TagEntry(state, held)
            value = encode_entry(tag, entry)
            out.state_writes.append((partition, key, value))
            out.records.append(OutRecord(topic, key, value, partition))
            out.new_entries[tag] = (partition, entry)

    def _emit(self, out: RfidOutput, partition: int, tag: str, events: Sequence[AssetEvent],
              alerts: Sequence[AssetAlert]) -> None:
        key = tag.encode()
        target = partition if self.copartitioned else None
        assets_topic, alerts_topic = self.settings.assets_topic, self.settings.alerts_topic
        for event in events:
            out.events[event.type] += 1
            out.records.append(OutRecord(assets_topic, key, dumps(event.to_dict(format_ts)), target))
        for alert in alerts:
            out.alerts[(alert.rule, alert.severity, alert.state)] += 1
            out.records.append(OutRecord(alerts_topic, key, dumps(alert.to_dict(format_ts)), target))

    def _deadletter(self, out: RfidOutput, partition: int, offset: int, index: int, key: bytes | None,
                    raw: bytes | None, error: DecodeError, now_ms: int) -> OutRecord:
        out.deadlettered[error.reason] += 1
        value = deadletter_record(
            source_topic=self.settings.rfid_topic, partition=partition, offset=offset, index=index, key=key,
            raw=raw, error=error, now_ms=now_ms, limits=self.limits,
        )
        return OutRecord(self.settings.deadletter_topic, key, value, None)

    def _deadletter_held(self, out: RfidOutput, tag: str, held: HeldRead, why: str, now_ms: int) -> None:
        error = DecodeError(UNKNOWN_READER, f"reader {held.reader_id!r} is not in the readers registry ({why})")
        out.records.append(self._deadletter(out, held.partition, held.offset, held.index, tag.encode(),
                                            _read_json(held.read(tag)), error, now_ms))

    def internal_error(self, record: InRecord, exc: Exception) -> RfidOutput:
        """The output for a record the pipeline failed on: one dead letter naming the error."""
        out = RfidOutput(messages=1, reads=1)
        error = DecodeError("internal_error", f"{type(exc).__name__}: {exc}"[:500])
        out.records.append(self._deadletter(out, record.partition, record.offset, 0, record.key, record.value,
                                            error, self.clock_ms()))
        return out


def _read_json(read: RfidRead) -> bytes:
    """A read as its ``fleet.rfid`` JSON (for the dead letter of one item of an array, or of a held read)."""
    doc: dict[str, Any] = {"tag_id": read.tag_id, "reader_id": read.reader_id, "ts": format_ts(read.ts_ms)}
    if read.rssi_dbm is not None:
        doc["rssi_dbm"] = read.rssi_dbm
    if read.antenna is not None:
        doc["antenna"] = read.antenna
    return orjson.dumps(doc)
