"""Windowed aggregation against plain-Python references over the same events (late and out-of-order ones, grace,
hopping windows), once-only emission, expiry, and state that survives snapshots and crashes."""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction
from typing import Any

import h3
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleetstream.codecs import format_ts as codec_format_ts
from fleetstream.codecs import validate_output
from fleetstream.domain.aggregation import (
    CellAggregator,
    CellStats,
    CellStatsStore,
    DistanceAggregator,
    GeofenceAggregator,
    GeofenceStats,
    WindowSpec,
    cells_geojson,
    fleet_counts,
    format_ts,
    merge_cell_stats,
    merge_fleet_counts,
    merge_geofence_stats,
)
from fleetstream.domain.geoindex import parent_cells
from fleetstream.domain.models import DeviceState, Motion
from fleetstream.domain.transitions import GeofenceEvent, GeofenceEventType

RES = (7, 8)
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Cells around two cities plus a pentagon's neighbourhood: several res-9 cells per res-8/7 parent.
POOL = sorted(
    set(h3.grid_disk(h3.latlng_to_cell(52.37, 4.90, 9), 3))
    | set(h3.grid_disk(h3.latlng_to_cell(-33.86, 151.2, 9), 1))
    | set(h3.grid_disk(h3.get_pentagons(9)[3], 2))
)
DEVICES = [f"veh-{i}" for i in range(8)]

Row = tuple[str, str, int, float | None, bool]  # res-9 cell, device, ts_ms, speed, stopped


def spec_strategy() -> st.SearchStrategy[WindowSpec]:
    return st.builds(
        lambda size, step, grace: WindowSpec(size / 1000, None if step is None or step > size else step / 1000,
                                             grace / 1000, retention_s=3600),
        st.sampled_from([1000, 2000, 3000]), st.sampled_from([None, 500, 1000, 1500, 2000]),
        st.sampled_from([0, 400, 1000, 2500]),
    )


speeds = st.one_of(st.none(), st.floats(0, 150, allow_nan=False), st.sampled_from([0.0, 0.5, 1.5, 2.5, 30.0]))
rows = st.tuples(st.sampled_from(POOL), st.sampled_from(DEVICES), st.integers(0, 12_000), speeds, st.booleans())


@st.composite
def batches(draw: Any, row_strategy: Any = rows, ts_of: Any = lambda row: row[2]) -> list[tuple[list[Any], int]]:
    """Batches with the watermark the caller would pass after each: the largest event time seen, sometimes
    pushed further; the last batch closes everything."""
    out = []
    seen = 0
    for batch in draw(st.lists(st.lists(row_strategy, max_size=12), min_size=1, max_size=8)):
        seen = max([seen, *map(ts_of, batch)])
        seen += draw(st.sampled_from([0, 0, 0, 700, 3000]))
        out.append((batch, seen))
    out.append(([], 10**9))
    return out


# --- reference ---------------------------------------------------------------------------------------------------

def window_starts(spec: WindowSpec, ts: int) -> list[int]:
    size, step = spec.size_ms, spec.step_ms
    return [s for s in range((ts // step - size // step - 2) * step, ts + 1, step) if s <= ts < s + size]


def expected_cell(key: tuple[int, int, str], rows_in: list[Row], spec: WindowSpec, bin_kmh: float) -> tuple:
    start, res, cell = key
    milli = [round(r[3] * 1000) for r in rows_in if r[3] is not None]
    bin_milli = round(bin_kmh * 1000)
    binned = sorted(math.floor(Fraction(m, bin_milli) + Fraction(1, 2)) for m in milli)
    p95 = binned[math.ceil(Fraction(95, 100) * len(binned)) - 1] * bin_kmh if binned else None
    return (cell, res, start, start + spec.size_ms, len(rows_in), len({r[1] for r in rows_in}),
            len({r[1] for r in rows_in if r[4]}), len(milli), sum(milli), p95, tuple(sorted(Counter(binned).items())))


def observed_cell(s: CellStats) -> tuple:
    return (s.h3, s.resolution, s.window_start_ms, s.window_end_ms, s.events, s.devices, s.stopped_devices,
            s.speed_samples, s.speed_sum_milli, s.p95_speed_kmh, tuple(zip(s.speed_bins, s.speed_counts, strict=True)))


def reference_cells(plan: list[tuple[list[Row], int]], spec: WindowSpec, bin_kmh: float = 1.0
                    ) -> tuple[list[tuple], list[int]]:
    """Plain Python: a fix joins every window containing it that is still open (end + grace > watermark of the
    last advance); it is late if it misses one. After each batch, windows with end + grace <= watermark close."""
    wm: int | None = None
    data: dict[tuple[int, int, str], list[Row]] = {}
    done: set[tuple[int, int, str]] = set()
    out, lates = [], []
    for batch, watermark in plan:
        late = 0
        for row in batch:
            starts = window_starts(spec, row[2])
            opened = [s for s in starts if wm is None or s + spec.size_ms + spec.grace_ms > wm]
            late += len(opened) < len(starts)
            for s in opened:
                for r in RES:
                    data.setdefault((s, r, h3.cell_to_parent(row[0], r)), []).append(row)
        lates.append(late)
        wm = watermark if wm is None else max(wm, watermark)
        due = [k for k in data if k[0] + spec.size_ms + spec.grace_ms <= wm and k not in done]
        for key in sorted(due, key=lambda k: (k[0], k[1], int(k[2], 16))):
            done.add(key)
            out.append(expected_cell(key, data[key], spec, bin_kmh))
    return out, lates


def columns(batch: list[Row]) -> tuple[list[str], list[str], list[int], list[float | None], list[bool]]:
    return ([r[0] for r in batch], [r[1] for r in batch], [r[2] for r in batch], [r[3] for r in batch],
            [r[4] for r in batch])


def run_cells(plan: list[tuple[list[Row], int]], agg: CellAggregator) -> tuple[list[CellStats], list[int]]:
    out, lates = [], []
    for batch, watermark in plan:
        lates.append(agg.add_batch(*columns(batch)))
        out.extend(agg.advance(watermark))
    return out, lates


# --- windows and helpers -------------------------------------------------------------------------------------------

@given(spec_strategy(), st.integers(-10**7, 10**13))
def test_window_starts_are_exactly_the_windows_containing_the_time(spec, ts):
    assert list(spec.starts(ts)) == window_starts(spec, ts)
    assert spec.size_ms % spec.pane_ms == 0 and spec.step_ms % spec.pane_ms == 0


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"size_s": 0}, "size"), ({"step_s": 90}, "step"), ({"step_s": 0}, "step"), ({"grace_s": -1}, "grace"),
    ({"grace_s": 30, "retention_s": 10}, "retention"),
])
def test_bad_window_settings_are_refused_with_the_reason(kwargs, named):
    with pytest.raises(ValueError, match=named):
        WindowSpec(**kwargs)


@given(st.integers(0, 253_402_300_799_999))
def test_format_ts_agrees_with_the_codec(ts):
    assert format_ts(ts) == codec_format_ts(ts)


@given(st.floats(-90, 90), st.floats(-180, 180), st.sampled_from([9, 11, 15]), st.integers(0, 8))
def test_vectorized_parents_equal_h3_cell_to_parent(lat, lon, fine, res):
    pentagon_kids = [h3.cell_to_center_child(c, fine) for c in h3.cell_to_children(h3.get_pentagons(res)[1], res + 1)]
    cells = [h3.latlng_to_cell(lat, lon, fine), *pentagon_kids]
    got = parent_cells(np.array([int(c, 16) for c in cells], dtype=np.uint64), res)
    assert [format(int(c), "x") for c in got] == [h3.cell_to_parent(c, res) for c in cells]


# --- cells against the reference --------------------------------------------------------------------------------

@FAST
@given(spec_strategy(), batches(), st.sampled_from([1.0, 0.5, 5.0]))
def test_cell_windows_match_the_reference(spec, plan, bin_kmh):
    expected, expected_late = reference_cells(plan, spec, bin_kmh)
    got, late = run_cells(plan, CellAggregator(spec, RES, bin_kmh=bin_kmh))
    assert late == expected_late
    assert [observed_cell(s) for s in got] == expected
    assert all(s.final for s in got)
    keys = [(s.h3, s.window_start_ms) for s in got]
    assert len(keys) == len(set(keys)), "each window is emitted once"
    for s, e in zip(got, expected, strict=True):
        assert s.avg_speed_kmh == (pytest.approx(e[8] / e[7] / 1000) if e[7] else None)


def test_a_worked_example():
    """Hand-checked: 20 speeds 1..20 km/h -> p95 is the 19th (nearest rank ceil(0.95 * 20) = 19)."""
    cell = POOL[0]
    agg = CellAggregator(WindowSpec(60, grace_s=5), RES)
    devices = [f"d{i % 4}" for i in range(20)]
    stopped = [i == 3 or i == 7 for i in range(20)]  # d3 twice: one stopped device
    assert agg.add_batch([cell] * 21, [*devices, "d9"], [1000 * i for i in range(21)],
                         [*(float(i + 1) for i in range(20)), None], [*stopped, False]) == 0
    assert agg.advance(64_999) == []  # end 60 s + grace 5 s not reached
    s7, s8 = agg.advance(65_000)
    assert (s7.resolution, s8.resolution) == RES
    assert (s8.events, s8.devices, s8.stopped_devices, s8.speed_samples) == (21, 5, 1, 20)
    assert s8.avg_speed_kmh == 10.5 and s8.p95_speed_kmh == 19.0
    assert s8.h3 == h3.cell_to_parent(cell, 8) and s7.h3 == h3.cell_to_parent(cell, 7)
    assert agg.advance(10**9) == [] and agg.rows() == 0
    assert agg.add_batch([cell], ["late"], [59_999], [5.0], [False]) == 1  # its window closed: late, dropped
    assert agg.late_total == 1 and agg.rows() == 0


def test_late_within_grace_updates_and_after_grace_is_dropped():
    cell = POOL[5]
    agg = CellAggregator(WindowSpec(60, grace_s=10), (8,))
    agg.add_batch([cell], ["a"], [30_000], [10.0], [False])
    assert agg.advance(65_000) == []  # past the end, within grace
    assert agg.add_batch([cell], ["b"], [59_000], [20.0], [False]) == 0  # late but within grace: counts
    [closed] = agg.advance(70_000)
    assert (closed.events, closed.devices) == (2, 2)
    assert agg.add_batch([cell, cell], ["c", "d"], [59_500, 70_000], [1.0, 1.0], [False, False]) == 1
    assert agg.advance(10**9)[0].events == 1  # the on-time one, in the next window


def test_hopping_fix_late_for_its_earliest_window_still_counts_in_the_open_one():
    cell = POOL[7]
    agg = CellAggregator(WindowSpec(60, step_s=30, grace_s=0), (8,))
    agg.add_batch([cell], ["a"], [40_000], [5.0], [False])
    first = agg.advance(60_000)  # closes [0, 60)
    assert [(s.window_start_ms, s.events) for s in first] == [(0, 1)]
    assert agg.add_batch([cell], ["b"], [45_000], [7.0], [False]) == 1  # late for [0, 60), on time for [30, 90)
    assert [(s.window_start_ms, s.events, s.devices) for s in agg.advance(90_000)] == [(30_000, 2, 2)]


def test_hex_strings_uint64_and_cells_by_resolution_agree():
    """The same cells in any of the accepted forms give the same result. Parents depend on the input resolution
    (H3's hierarchy is not geometric), so the caller should always pass cells of the same resolution."""
    points = [(52.37 + 0.003 * i, 4.9 + 0.002 * i) for i in range(30)]
    n = len(points)
    args = ([f"d{i % 7}" for i in range(n)], [1000 * i for i in range(n)], [float(i) for i in range(n)],
            [i % 3 == 0 for i in range(n)])
    res11 = [h3.latlng_to_cell(a, o, 11) for a, o in points]
    results = []
    for cells in (
        res11,
        np.array([int(c, 16) for c in res11], dtype=np.uint64),
        {8: np.array([int(h3.cell_to_parent(c, 8), 16) for c in res11], dtype=np.uint64)},
    ):
        agg = CellAggregator(WindowSpec(60), RES)
        agg.add_batch(cells, *args)
        results.append([observed_cell(s) for s in agg.advance(10**9)])
    assert results[0] and results[0] == results[1] == results[2]
    assert {s[0] for s in results[0] if s[1] == 8} == {h3.cell_to_parent(c, 8) for c in res11}


def test_bad_inputs_are_refused():
    agg = CellAggregator(WindowSpec(60), RES)
    with pytest.raises(ValueError, match="resolution 8 or finer"):
        agg.add_batch([h3.latlng_to_cell(1, 1, 7)], ["a"], [0], [1.0], [False])
    with pytest.raises(ValueError, match="negative"):
        agg.add_batch([POOL[0]], ["a"], [0], [-1.0], [False])
    with pytest.raises(ValueError, match="same length"):
        agg.add_batch([POOL[0]], ["a", "b"], [0], [1.0], [False])
    with pytest.raises(ValueError, match="resolutions"):
        CellAggregator(WindowSpec(60), (16,))
    assert agg.add_batch([], [], [], [], []) == 0


@FAST
@given(spec_strategy(), batches(), st.sampled_from([0, 1500]))
def test_interim_updates_show_the_current_value_and_finals_stay_once(spec, plan, interval_ms):
    agg = CellAggregator(spec, RES, interim_interval_s=interval_ms / 1000)
    finals, interims = [], []
    seen: dict[tuple[int, int, str], list[Row]] = {}
    wm: int | None = None
    for batch, watermark in plan:
        for row in batch:
            starts = window_starts(spec, row[2])
            for s in starts:
                if wm is None or s + spec.size_ms + spec.grace_ms > wm:
                    for r in RES:
                        seen.setdefault((s, r, h3.cell_to_parent(row[0], r)), []).append(row)
        agg.add_batch(*columns(batch))
        wm = watermark if wm is None else max(wm, watermark)
        for s in agg.advance(watermark):
            (finals if s.final else interims).append(s)
            if not s.final:  # the value so far, of a window still open
                assert s.window_start_ms + spec.size_ms + spec.grace_ms > wm
                assert observed_cell(s) == expected_cell((s.window_start_ms, s.resolution, s.h3),
                                                         seen[(s.window_start_ms, s.resolution, s.h3)], spec, 1.0)
    assert [observed_cell(s) for s in finals] == reference_cells(plan, spec)[0]


def test_peek_reads_an_open_window():
    agg = CellAggregator(WindowSpec(60), RES)
    agg.add_batch([POOL[0], POOL[0]], ["a", "b"], [1000, 2000], [10.0, 20.0], [False, True])
    now = agg.peek(h3.cell_to_parent(POOL[0], 8))
    assert now is not None and not now.final and (now.events, now.stopped_devices) == (2, 1)
    assert agg.peek(h3.cell_to_parent(POOL[0], 8), 120_000) is None
    with pytest.raises(ValueError, match="not aggregated"):
        agg.peek(POOL[0])


# --- merging partitions ------------------------------------------------------------------------------------------

@FAST
@given(spec_strategy(), batches(), st.integers(2, 4))
def test_partials_of_partitions_merge_into_the_single_partition_value(spec, plan, partitions):
    """Positions are partitioned by device: each partition aggregates its devices, the merge equals the whole."""
    whole, _ = run_cells(plan, CellAggregator(spec, RES))
    store = CellStatsStore(spec)
    parts: dict[tuple[str, int], list[CellStats]] = {}
    for p in range(partitions):
        mine = [([r for r in batch if DEVICES.index(r[1]) % partitions == p], wm) for batch, wm in plan]
        got, _ = run_cells(mine, CellAggregator(spec, RES))
        store.add(got, source=p)
        store.add(got[: len(got) // 2], source=p)  # a replayed partial replaces, never adds
        for s in got:
            parts.setdefault((s.h3, s.window_start_ms), []).append(s)
    for s in whole:
        assert observed_cell(merge_cell_stats(parts[(s.h3, s.window_start_ms)])) == observed_cell(s)
        assert observed_cell(store.get(s.h3, s.window_start_ms)) == observed_cell(s)
    assert len(parts) == len(whole)


def test_store_completes_each_window_once_when_every_source_has_closed_it():
    spec = WindowSpec(60, grace_s=5)
    a, b = CellAggregator(spec, (8,)), CellAggregator(spec, (8,))
    a.add_batch([POOL[0]], ["a"], [1000], [10.0], [False])
    b.add_batch([POOL[0]], ["b"], [2000], [30.0], [True])
    store = CellStatsStore(spec)
    store.add(a.advance(70_000), source=0)
    assert store.complete({0: 70_000, 1: 30_000}) == []  # source 1 has not closed the window yet
    store.add(b.advance(70_000), source=1)
    [final] = store.complete({1: 70_000})
    assert (final.events, final.devices, final.stopped_devices, final.avg_speed_kmh) == (2, 2, 1, 20.0)
    assert store.complete({0: 10**9, 1: 10**9}) == []
    restored = CellStatsStore.restore(orjson.loads(orjson.dumps(store.changes())), spec)
    assert restored.get(final.h3) == final
    assert restored.complete({0: 10**9, 1: 10**9}) == []


def test_store_expires_after_retention_and_filters_by_bbox():
    spec = WindowSpec(60, grace_s=0, retention_s=120)
    agg = CellAggregator(spec, (8,))
    amsterdam, sydney = h3.latlng_to_cell(52.37, 4.9, 9), h3.latlng_to_cell(-33.86, 151.2, 9)
    agg.add_batch([amsterdam, sydney], ["a", "b"], [1000, 1000], [1.0, 2.0], [False, False])
    store = CellStatsStore(spec)
    store.add(agg.advance(60_000))
    assert [s.h3[:2] for s in store.cells(8)] == ["88", "88"]
    assert [s.h3 for s in store.cells(8, 0, bbox=(50, 3, 54, 6))] == [h3.cell_to_parent(amsterdam, 8)]
    assert [s.h3 for s in store.cells(8, 0, bbox=(-40, 150, -30, -170))] == [h3.cell_to_parent(sydney, 8)]
    assert store.expire(179_999) == 0 and store.get(h3.cell_to_parent(sydney, 8)) is not None
    assert store.expire(180_000) == 1 and store.get(h3.cell_to_parent(sydney, 8)) is None
    assert store.changes()[0] == ("cells:8:0", None)


def test_cells_as_geojson_including_one_across_the_antimeridian():
    agg = CellAggregator(WindowSpec(60), (8,))
    across = next(c for c in h3.grid_disk(h3.latlng_to_cell(0.0, 179.999, 9), 2)
                  if len({lon > 0 for _, lon in h3.cell_to_boundary(h3.cell_to_parent(c, 8))}) == 2)
    agg.add_batch([POOL[0], across], ["a", "b"], [1, 2], [3.0, 4.0], [False, False])
    doc = cells_geojson(agg.advance(10**9))
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == 2
    for feature in doc["features"]:
        ring = feature["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) == 7
        assert max(p[0] for p in ring) - min(p[0] for p in ring) < 1  # continuous, even across 180
        validate_output("cell_stats", feature["properties"])
        lat, lon = h3.cell_to_latlng(feature["id"])
        lon = lon + 360 if lon < min(p[0] for p in ring) - 180 else lon
        assert min(p[1] for p in ring) < lat < max(p[1] for p in ring)
        assert min(p[0] for p in ring) < lon < max(p[0] for p in ring)


# --- state ---------------------------------------------------------------------------------------------------------

@FAST
@given(spec_strategy(), batches(), st.data())
def test_a_snapshot_taken_mid_stream_gives_the_same_emissions(spec, plan, data):
    whole, whole_late = run_cells(plan, CellAggregator(spec, RES))
    cut = data.draw(st.integers(0, len(plan)))
    agg = CellAggregator(spec, RES)
    first, late1 = run_cells(plan[:cut], agg)
    state = orjson.loads(orjson.dumps(agg.to_state()))
    again = CellAggregator.from_state(state, spec, RES)
    second, late2 = run_cells(plan[cut:], again)
    assert [observed_cell(s) for s in first + second] == [observed_cell(s) for s in whole]
    assert late1 + late2 == whole_late and again.late_total == sum(whole_late)


class Changelog:
    """A compacted changelog partition: latest value per key, None deletes."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def write(self, writes: list[tuple[str, Any]]) -> None:
        for key, value in orjson.loads(orjson.dumps(writes)):  # JSON round trip, as the table would
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value


@FAST
@given(spec_strategy(), batches(), st.data())
def test_a_crash_anywhere_loses_no_window_and_counts_no_fix_twice(spec, plan, data):
    """Batches are flushed with their checkpoint, acknowledged one batch later (two in flight), offsets committed
    after the acknowledgement. The crash keeps any prefix of one flush's changelog writes, with or without its
    outputs; the worker restores and replays from the committed offset."""
    expected = {(s.h3, s.window_start_ms): observed_cell(s) for s in run_cells(plan, CellAggregator(spec, RES))[0]}
    crash_at = data.draw(st.integers(0, len(plan) - 1))
    changelog, published = Changelog(), []
    agg = CellAggregator(spec, RES)
    offsets = np.cumsum([0] + [len(b) for b, _ in plan]).tolist()
    unacked: list[tuple[int, int]] = []  # (batch index, checkpoint seq)
    committed, i, crashed = 0, 0, False
    while i < len(plan):
        batch, watermark = plan[i]
        agg.add_batch(*columns(batch), offsets=list(range(offsets[i], offsets[i + 1])))
        out = agg.advance(watermark)
        cp = agg.checkpoint()
        if i == crash_at and not crashed:
            keep = data.draw(st.integers(0, len(cp.writes)))
            changelog.write(cp.writes[:keep])
            if data.draw(st.booleans()):
                published.extend(out)
            agg = CellAggregator.restore(changelog.data.items(), spec, RES)
            unacked, i, crashed = [], committed, True
            continue
        changelog.write(cp.writes)
        published.extend(out)
        unacked.append((i, cp.seq))
        if len(unacked) > 1:  # the previous flush's acknowledgement arrives while this one is out
            done, seq = unacked.pop(0)
            agg.acknowledge(seq)
            committed = done + 1
        i += 1
    got: dict[tuple[str, int], set[tuple]] = {}
    for s in published:
        got.setdefault((s.h3, s.window_start_ms), set()).add(observed_cell(s))
    assert set(got) == set(expected), "no window lost, none invented"
    for key, values in got.items():
        assert values == {expected[key]}, "duplicates are identical, no fix counted twice"
    if not crashed:
        assert len(published) == len(expected)


def test_state_is_bounded_closed_panes_are_deleted_after_acknowledgement():
    spec = WindowSpec(60, grace_s=0)
    agg = CellAggregator(spec, RES)
    changelog = Changelog()
    for minute in range(5):
        agg.add_batch([POOL[minute]], [f"d{minute}"], [minute * 60_000 + 1], [1.0], [False], offsets=[minute])
        agg.advance(minute * 60_000 + 1)
        cp = agg.checkpoint()
        changelog.write(cp.writes)
        agg.acknowledge(cp.seq)
    changelog.write(agg.checkpoint().writes)
    assert sorted(changelog.data) == ["meta", "pane:240000:4"]  # only the open window's chunk is left
    assert len(agg.to_state()) == 2
    with pytest.raises(ValueError, match="fresh state"):
        CellAggregator.restore(changelog.data.items(), WindowSpec(30), RES)
    with pytest.raises(ValueError, match="fresh state"):
        CellAggregator.restore(changelog.data.items(), spec, (8,))


@pytest.mark.parametrize("checkpoints", [False, True])
def test_closed_rows_and_the_devices_only_they_used_are_dropped(checkpoints):
    agg = CellAggregator(WindowSpec(1, grace_s=0), (8,), checkpoints=checkpoints)
    agg._compacted_at = 10  # the real threshold is 65,536 ids
    for second in range(30):
        agg.add_batch([POOL[0]], [f"d{second}"], [second * 1000], [1.0], [False], offsets=[second])
        agg.advance(second * 1000)
        if checkpoints:  # closed rows wait for their chunk to be written, then go
            agg.acknowledge(agg.checkpoint().seq)
    assert len(agg._ids) <= 21 and len(agg._retired) == 0 and agg.rows() == 1
    assert agg.advance(10**9)[0].devices == 1
    if not checkpoints:
        with pytest.raises(RuntimeError):
            agg.checkpoint()


# --- schemas -----------------------------------------------------------------------------------------------------

def test_records_match_their_schemas():
    agg = CellAggregator(WindowSpec(60), RES, interim_interval_s=0)
    agg.add_batch([POOL[0], POOL[1]], ["a", "b"], [1000, 2000], [None, 12.5], [True, False])
    for s in agg.advance(2000) + agg.advance(10**9):
        validate_output("cell_stats", s.to_dict())
    fences = GeofenceAggregator(WindowSpec(60))
    fences.add_events([GeofenceEvent(GeofenceEventType.EXIT, "a", "depot", 1000, 0.0, 0.0, 61.5),
                       GeofenceEvent(GeofenceEventType.ENTER, "b", "yard", 2000, 0.0, 0.0)])
    stats = fences.advance(10**9)
    assert len(stats) == 2
    for s in stats:
        validate_output("geofence_stats", s.to_dict())


def test_cell_stats_json_round_trip():
    agg = CellAggregator(WindowSpec(60), RES)
    agg.add_batch([POOL[0]] * 3, ["a", "b", "a"], [1, 2, 3], [1.0, 2.0, None], [True, False, False])
    for s in agg.advance(10**9):
        assert CellStats.from_json(orjson.loads(orjson.dumps(s.to_json()))) == s


# --- geofences ---------------------------------------------------------------------------------------------------

KINDS = [GeofenceEventType.ENTER, GeofenceEventType.EXIT, GeofenceEventType.DWELL, GeofenceEventType.CROSS]
events = st.builds(
    lambda kind, device, fence, ts, dwell: GeofenceEvent(kind, device, fence, ts, 0.0, 0.0,
                                                         dwell if kind is GeofenceEventType.EXIT else None),
    st.sampled_from(KINDS), st.sampled_from(DEVICES[:4]), st.sampled_from(["f1", "f2", "f3"]),
    st.integers(0, 12_000), st.one_of(st.none(), st.floats(0, 5000, allow_nan=False)),
)


def reference_fences(plan: list[tuple[list[GeofenceEvent], int]], spec: WindowSpec) -> tuple[list[tuple], list[int]]:
    wm: int | None = None
    data: dict[tuple[int, str], list[GeofenceEvent]] = {}
    done: set[tuple[int, str]] = set()
    out, lates = [], []
    for batch, watermark in plan:
        late = 0
        for e in batch:
            starts = window_starts(spec, e.ts_ms)
            opened = [s for s in starts if wm is None or s + spec.size_ms + spec.grace_ms > wm]
            late += len(opened) < len(starts)
            for s in opened:
                data.setdefault((s, e.geofence_id), []).append(e)
        lates.append(late)
        wm = watermark if wm is None else max(wm, watermark)
        for key in sorted(k for k in data if k[0] + spec.size_ms + spec.grace_ms <= wm and k not in done):
            done.add(key)
            evs = data[key]
            dwells = [round(e.dwell_s * 1000) for e in evs
                      if e.type is GeofenceEventType.EXIT and e.dwell_s is not None]
            out.append((key[1], key[0], key[0] + spec.size_ms,
                        sum(e.type in (GeofenceEventType.ENTER, GeofenceEventType.CROSS) for e in evs),
                        sum(e.type in (GeofenceEventType.EXIT, GeofenceEventType.CROSS) for e in evs),
                        len({e.device_id for e in evs}), len(dwells), sum(dwells), max(dwells, default=None)))
    return out, lates


def observed_fence(s: GeofenceStats) -> tuple:
    return (s.geofence_id, s.window_start_ms, s.window_end_ms, s.entries, s.exits, s.devices, s.dwell_samples,
            s.dwell_sum_ms, s.max_dwell_ms)


@FAST
@given(spec_strategy(), batches(events, lambda e: e.ts_ms), st.data())
def test_geofence_windows_match_the_reference_and_survive_snapshots(spec, plan, data):
    expected, expected_late = reference_fences(plan, spec)
    agg = GeofenceAggregator(spec)
    got, late = [], []
    cut = data.draw(st.integers(0, len(plan)))
    for i, (batch, watermark) in enumerate(plan):
        if i == cut:
            agg = GeofenceAggregator.from_state(orjson.loads(orjson.dumps(agg.to_state())), spec)
        late.append(agg.add_events(batch))
        got.extend(agg.advance(watermark))
    assert [observed_fence(s) for s in got] == expected
    assert late == expected_late
    inside: dict[str, set[str]] = {}
    for batch, _ in plan:
        for e in batch:
            if e.type in (GeofenceEventType.ENTER, GeofenceEventType.DWELL):
                inside.setdefault(e.geofence_id, set()).add(e.device_id)
            elif e.type is GeofenceEventType.EXIT:
                inside.get(e.geofence_id, set()).discard(e.device_id)
    for fence in ("f1", "f2", "f3"):
        assert agg.occupants(fence) == sorted(inside.get(fence, ()))
        assert agg.occupancy(fence) == len(inside.get(fence, ()))


@FAST
@given(spec_strategy(), batches(events, lambda e: e.ts_ms), st.data())
def test_geofence_state_survives_a_crash_without_double_counting(spec, plan, data):
    expected = {(s[0], s[1]): s for s in reference_fences(plan, spec)[0]}
    crash_at = data.draw(st.integers(0, len(plan) - 1))
    changelog, published = Changelog(), []
    agg = GeofenceAggregator(spec)
    offsets = np.cumsum([0] + [len(b) for b, _ in plan]).tolist()
    committed, i, crashed = 0, 0, False
    while i < len(plan):
        batch, watermark = plan[i]
        agg.add_events(batch, offsets=list(range(offsets[i], offsets[i + 1])))
        out = agg.advance(watermark)
        cp = agg.checkpoint()
        if i == crash_at and not crashed:
            changelog.write(cp.writes[: data.draw(st.integers(0, len(cp.writes)))])
            if data.draw(st.booleans()):
                published.extend(out)
            agg = GeofenceAggregator.restore(changelog.data.items(), spec)
            i, crashed = committed, True
            continue
        changelog.write(cp.writes)
        published.extend(out)
        agg.acknowledge(cp.seq)
        committed = i = i + 1
    got: dict[tuple[str, int], set[tuple]] = {}
    for s in published:
        got.setdefault((s.geofence_id, s.window_start_ms), set()).add(observed_fence(s))
    assert set(got) == set(expected)
    assert all(values == {expected[key]} for key, values in got.items())


def test_geofence_example_and_merge():
    spec = WindowSpec(60, grace_s=0)
    agg = GeofenceAggregator(spec)
    agg.add_events([
        GeofenceEvent(GeofenceEventType.ENTER, "a", "depot", 1000, 0.0, 0.0),
        GeofenceEvent(GeofenceEventType.ENTER, "b", "depot", 2000, 0.0, 0.0),
        GeofenceEvent(GeofenceEventType.EXIT, "a", "depot", 31_000, 0.0, 0.0, 30.0),
        GeofenceEvent(GeofenceEventType.CROSS, "c", "depot", 40_000, 0.0, 0.0),
    ])
    assert agg.occupants("depot") == ["b"]
    peek = agg.peek("depot", 0)
    assert peek is not None and not peek.final and peek.entries == 3
    [s] = agg.advance(60_000)
    assert (s.entries, s.exits, s.devices, s.avg_dwell_s, s.max_dwell_s) == (3, 2, 3, 30.0, 30.0)
    other = s._replace(entries=1, exits=0, devices=1, dwell_samples=1, dwell_sum_ms=90_000, max_dwell_ms=90_000)
    merged = merge_geofence_stats([s, other])
    assert (merged.entries, merged.devices, merged.avg_dwell_s, merged.max_dwell_s) == (4, 4, 60.0, 90.0)
    agg.set_occupancy([("x", ["depot", "yard"]), ("y", ["yard"])])
    assert (agg.occupancy("depot"), agg.occupancy("yard")) == (1, 2)
    writes = dict(agg.checkpoint().writes)
    assert writes["occ:yard"] == ["x", "y"] and writes["occ:depot"] == ["x"]


# --- fleet distance and summary ------------------------------------------------------------------------------------

distances = st.tuples(st.integers(0, 12_000), st.floats(0, 5000, allow_nan=False))


@FAST
@given(spec_strategy(), batches(distances, lambda row: row[0]), st.data())
def test_distance_windows_match_the_reference(spec, plan, data):
    wm: int | None = None
    sums: dict[int, list[int]] = {}
    done: set[int] = set()
    expected = []
    for batch, watermark in plan:
        for ts, d in batch:
            for s in window_starts(spec, ts):
                if wm is None or s + spec.size_ms + spec.grace_ms > wm:
                    acc = sums.setdefault(s, [0, 0])
                    acc[0] += round(d * 1000)
                    acc[1] += 1
        wm = watermark if wm is None else max(wm, watermark)
        for s in sorted(k for k in sums if k + spec.size_ms + spec.grace_ms <= wm and k not in done):
            done.add(s)
            expected.append((s, s + spec.size_ms, sums[s][0] / 1000, sums[s][1]))
    agg = DistanceAggregator(spec)
    got = []
    cut = data.draw(st.integers(0, len(plan)))
    for i, (batch, watermark) in enumerate(plan):
        if i == cut:
            agg = DistanceAggregator.from_state(orjson.loads(orjson.dumps(agg.to_state())), spec)
        agg.add_batch([t for t, _ in batch], [d for _, d in batch])
        got.extend((w.window_start_ms, w.window_end_ms, w.distance_m, w.fixes) for w in agg.advance(watermark))
    assert got == expected


@pytest.mark.parametrize("make", [GeofenceAggregator, DistanceAggregator])
def test_small_aggregators_keep_nothing_of_closed_windows_without_checkpoints(make):
    agg = make(WindowSpec(1, grace_s=0), checkpoints=False)
    for second in range(50):
        if make is GeofenceAggregator:
            agg.add_events([GeofenceEvent(GeofenceEventType.ENTER, "a", "f", second * 1000, 0.0, 0.0)])
        else:
            agg.add_batch([second * 1000], [1.0])
        assert len(agg.advance(second * 1000)) == (second > 0)
    assert len(agg._acc) == 1 and not agg._retired
    with pytest.raises(RuntimeError):
        agg.checkpoint()


def test_distance_replay_is_skipped_by_offset():
    spec = WindowSpec(60)
    agg = DistanceAggregator(spec)
    agg.add_batch([1000, 2000], [10.0, 5.5], offsets=[0, 1])
    restored = DistanceAggregator.restore(agg.checkpoint().writes, spec)
    restored.add_batch([1000, 2000, 3000], [10.0, 5.5, 1.0], offsets=[0, 1, 2])
    [w] = restored.advance(10**9)
    assert (w.distance_m, w.fixes) == (16.5, 3)


def test_fleet_counts():
    now = 1_795_600_800_000
    states = [
        DeviceState("a", now - 1000, 0, 0, motion=Motion.MOVING),
        DeviceState("b", now - 1000, 0, 0, motion=Motion.STOPPED),
        DeviceState("c", now - 1000, 0, 0),
        DeviceState("d", now - 600_001, 0, 0, motion=Motion.MOVING),  # offline: its motion is stale
        DeviceState("e", now + 5000, 0, 0, motion=Motion.STOPPED),  # a little in the future: online
    ]
    counts = fleet_counts(states, now, offline_after_s=600, alert_severities=["critical", "warning", "critical"])
    assert counts[:6] == (5, 4, 1, 1, 2, 1)
    assert counts.alerts_by_severity == {"critical": 2, "warning": 1}
    both = merge_fleet_counts([counts, counts])
    assert both[:6] == (10, 8, 2, 2, 4, 2) and both.alerts_by_severity == {"critical": 4, "warning": 2}
    assert counts.to_dict()["online"] == 4
