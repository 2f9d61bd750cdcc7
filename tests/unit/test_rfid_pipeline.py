"""The RFID batch pipeline without a broker: every read ends in one place (state, dead letter or held), duplicates
write nothing, held reads are stepped once their reader is defined or dead-lettered after rfid_hold_s, the timer
fires deadlines against the watermark it is given."""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path

import orjson
import pytest

from fleetstream.codecs import format_ts, parse_ts
from fleetstream.config import Settings
from fleetstream.domain.assets import AssetRegistry
from fleetstream.domain.models import RfidRead
from fleetstream.domain.readers import ReaderRegistry
from fleetstream.streaming.pipeline import InRecord
from fleetstream.streaming.rfid_pipeline import RfidOutput, RfidPipeline, TagEntry, decode_entry, encode_entry

T0 = 1_795_600_800_000
READERS = ReaderRegistry.from_dicts([
    {"reader_id": "dock", "lat": 53.4, "lon": -2.98, "zone_id": "dock-1", "role": "dock"},
    {"reader_id": "shelf", "lat": 53.4001, "lon": -2.98, "zone_id": "shelf-a", "role": "shelf"},
])
CHANGELOG = "app-asset-state-changelog"


class Store:
    """The table's store: what acknowledged batches applied."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}

    def get(self, partition: int, key: bytes) -> bytes | None:
        return self.data.get(key)

    def apply(self, out: RfidOutput) -> None:
        for _, key, value in out.state_writes:
            self.data[key] = value


def pipeline(store: Store, readers: Mapping[str, ReaderRegistry], **settings: object) -> RfidPipeline:
    return RfidPipeline(
        Settings.load(env={}, rfid_switch_after_s=5, **settings), store, changelog_topic=CHANGELOG,
        readers=lambda: readers["now"], assets=lambda: AssetRegistry.from_dict({"p": {"missing_after_s": 60}}),
        clock_ms=lambda: T0 + 3_600_000,
    )


def read(tag: str, reader: str, seconds: float, offset: int, rssi: float = -50.0) -> InRecord:
    doc = {"tag_id": tag, "reader_id": reader, "ts": format_ts(T0 + round(seconds * 1000)), "rssi_dbm": rssi}
    return InRecord("fleet.rfid", 0, offset, tag.encode(), orjson.dumps(doc))


def topics(out: RfidOutput) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for record in out.records:
        found.setdefault(record.topic, []).append(orjson.loads(record.value) if record.value else None)
    return found


def test_reads_move_a_tag_duplicates_write_nothing_bad_reads_are_dead_lettered():
    store, readers = Store(), {"now": READERS}
    rfid = pipeline(store, readers)
    out = rfid.process([read("p", "dock", 0, 0), read("p", "dock", 0.2, 1),
                        InRecord("fleet.rfid", 0, 2, b"q", b"{broken"), read("q", "ghost", 1, 3)])
    store.apply(out)
    found = topics(out)
    assert [(e["type"], e["zone_id"]) for e in found["fleet.assets"]] == [("arrived", "dock-1")]
    assert sorted(d["error"]["reason"] for d in found["fleet.deadletter"]) == ["malformed_json", "unknown_reader"]
    assert out.reads == 4 and len(found[CHANGELOG]) == 1  # p once per batch; q has no state
    # a later batch: a pure duplicate (same window, weaker, older) changes nothing and writes nothing
    out = rfid.process([read("p", "dock", 0.1, 4, rssi=-70)])
    assert out.records == [] and out.new_entries == {}
    # the shelf reads it 8 s later, the dock no more: it moves
    out = rfid.process([read("p", "shelf", 8, 5)])
    assert [(e["type"], e["zone_id"]) for e in topics(out)["fleet.assets"]] == [("departed", "dock-1"),
                                                                               ("arrived", "shelf-a")]
    assert out.alerts[("unaccompanied_motion", "warning", "raised")] == 1


def test_the_timer_fires_deadlines_against_the_watermark_it_is_given():
    store, readers = Store(), {"now": READERS}
    rfid = pipeline(store, readers)
    store.apply(rfid.process([read("p", "dock", 0, 0)]))  # p: missing after 60 s
    out = rfid.tick([(0, "p")], {}, lambda partition: T0 + 59_000)
    assert out.records == []
    out = rfid.tick([(0, "p")], {}, lambda partition: T0 + 61_000)
    [alert] = topics(out)["fleet.alerts"]
    assert (alert["rule"], alert["state"], alert["ts"]) == ("asset_missing", "raised", format_ts(T0 + 60_000))


def test_held_reads_are_stepped_once_their_reader_is_defined():
    store, readers = Store(), {"now": ReaderRegistry([READERS["dock"]])}
    rfid = pipeline(store, readers, rfid_unknown_reader="hold")
    out = rfid.process([read("p", "shelf", 0, 0), read("p", "shelf", 0.5, 1)])
    store.apply(out)
    assert "fleet.deadletter" not in topics(out) and out.held == 2
    assert decode_entry(store.data[b"p"]) == TagEntry(None, decode_entry(store.data[b"p"]).held)
    assert len(decode_entry(store.data[b"p"]).held) == 2
    assert rfid.tick([(0, "p")], {}, lambda partition: T0 + 1000).records == []  # still unknown: kept
    readers["now"] = READERS  # the shelf reader is defined
    out = rfid.tick([(0, "p")], {}, lambda partition: T0 + 1000)
    store.apply(out)
    assert [(e["type"], e["zone_id"]) for e in topics(out)["fleet.assets"]] == [("arrived", "shelf-a")]
    entry = decode_entry(store.data[b"p"])
    assert entry.held == () and entry.state is not None and entry.state.zones == ("shelf-a",)


def test_held_reads_are_dead_lettered_after_the_hold_time_or_beyond_the_limit():
    store, readers = Store(), {"now": READERS}
    rfid = pipeline(store, readers, rfid_unknown_reader="hold", rfid_hold_s=30, rfid_hold_max=2)
    out = rfid.process([read("p", "ghost", 0, 0), read("p", "ghost", 1, 1), read("p", "ghost", 2, 2)])
    store.apply(out)
    [dead] = topics(out)["fleet.deadletter"]
    assert dead["error"]["reason"] == "unknown_reader" and dead["offset"] == 0  # the oldest went
    assert rfid.tick([(0, "p")], {}, lambda partition: T0 + 30_500).records == []
    out = rfid.tick([(0, "p")], {}, lambda partition: T0 + 31_500)  # the read at 1 s has waited 30 s
    assert [d["offset"] for d in topics(out)["fleet.deadletter"]] == [1]


def test_entries_round_trip():
    store, readers = Store(), {"now": READERS}
    out = pipeline(store, readers).process([read("p", "dock", 0, 0)])
    _, entry = out.new_entries["p"]
    assert decode_entry(encode_entry("p", entry)) == entry


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_batches_in_flight_give_the_domains_warehouse_day(seed):
    """The warehouse day through the pipeline in random batch sizes, two batches in flight (the second reads the
    first's states from ``pending``, not the store), timers between batches: exactly the domain's events and
    alerts."""
    from tests.unit.test_assets import EXPECTED_DAY_ALERTS, EXPECTED_DAY_EVENTS, PALLETS, warehouse_script
    from tests.unit.test_assets import T0 as DAY_T0

    store, vehicles = Store(), {}
    readers = ReaderRegistry.load(Path(__file__).resolve().parents[2] / "examples" / "readers.json")
    rfid = RfidPipeline(
        Settings.load(env={}, rfid_switch_after_s=5, rfid_separation_after_s=60), store, changelog_topic=CHANGELOG,
        readers=lambda: readers, assets=lambda: AssetRegistry.from_dict(PALLETS), vehicles=lambda: vehicles,
        clock_ms=lambda: DAY_T0 + 3_600_000,
    )
    rng = random.Random(seed)
    outputs: list[RfidOutput] = []
    inflight: list[RfidOutput] = []

    def pending() -> dict:
        merged: dict = {}
        for out in inflight:  # oldest first: newer batches win
            merged.update(out.new_entries)
        return merged

    def flush(out: RfidOutput) -> None:
        outputs.append(out)
        inflight.append(out)
        if len(inflight) > 1:  # the oldest batch is acknowledged: its states reach the store
            store.apply(inflight.pop(0))

    batch: list[InRecord] = []
    newest = DAY_T0
    for offset, (_, _, item) in enumerate(warehouse_script()):
        if isinstance(item, RfidRead):
            doc = {"tag_id": item.tag_id, "reader_id": item.reader_id, "ts": item.ts_ms, "rssi_dbm": item.rssi_dbm}
            batch.append(InRecord("fleet.rfid", 0, offset, item.tag_id.encode(), orjson.dumps(doc)))
            newest = max(newest, item.ts_ms)
            if len(batch) < rng.randrange(1, 400):
                continue
        else:
            vehicles[item[0]] = item[1]  # the truck's fix reaches the view before the reads after it
        if batch:
            flush(rfid.process(batch, pending()))
            batch = []
            tags = {tag for out in outputs for tag in out.new_entries}
            flush(rfid.tick([(0, tag) for tag in sorted(tags)], pending(), lambda partition, mark=newest: mark))
    flush(rfid.process(batch, pending()))
    flush(rfid.tick([(0, tag) for tag in PALLETS], pending(), lambda partition: DAY_T0 + 900_000))

    found = [topics(out) for out in outputs]
    events = [(e["type"], e["tag_id"], e["zone_id"] or e["vehicle_id"], (parse_ts(e["ts"]) - DAY_T0) / 1000)
              for f in found for e in f.get("fleet.assets", ())]
    alerts = [(a["rule"], a["state"], a["subject_id"], (parse_ts(a["ts"]) - DAY_T0) / 1000)
              for f in found for a in f.get("fleet.alerts", ())]
    assert sorted(events, key=lambda e: (e[1], e[3])) == EXPECTED_DAY_EVENTS
    assert sorted(alerts, key=lambda a: (a[3], a[0])) == EXPECTED_DAY_ALERTS
