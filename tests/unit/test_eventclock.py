"""Event-time watermarks for the RFID and alert timers: busy partitions keep their own, idle ones follow the
worker's clock, which runs on with the wall clock once input stops."""

from __future__ import annotations

import heapq

from fleetstream.domain.eventclock import EventClock, pop_due

T = 1_795_600_800_000
WALL = 1_000_000


def test_nothing_known_gives_no_watermark():
    clock = EventClock(lateness_ms=2000, idle_ms=5000)
    assert clock.watermark(0, WALL) is None and clock.clock(WALL) is None


def test_a_busy_partition_is_not_pushed_ahead_by_a_faster_one():
    clock = EventClock(lateness_ms=2000, idle_ms=5000)
    clock.observe(0, T + 900_000, WALL)  # partition 0 fetched far ahead
    clock.observe(1, T + 60_000, WALL + 100)  # partition 1 still working through older reads
    assert clock.watermark(1, WALL + 200) == T + 58_000
    assert clock.watermark(0, WALL + 200) == T + 898_000


def test_an_idle_partition_follows_the_workers_clock():
    clock = EventClock(lateness_ms=2000, idle_ms=5000)
    clock.observe(1, T + 10_000, WALL)
    clock.observe(0, T + 900_000, WALL + 4000)
    # partition 1 idle (6 s without reads), partition 0 still busy: 1 takes the worker's newest read time
    assert clock.watermark(1, WALL + 6000) == T + 898_000
    assert clock.watermark(7, WALL + 6000) == T + 898_000  # a partition never read likewise


def test_the_clock_runs_on_with_the_wall_clock_once_input_stops():
    clock = EventClock(lateness_ms=2000, idle_ms=5000)
    clock.observe(0, T, WALL)
    assert clock.clock(WALL + 5000) == T
    assert clock.clock(WALL + 65_000) == T + 60_000
    assert clock.watermark(0, WALL + 65_000) == T + 58_000


def test_restored_time_counts_as_idle_and_forget_clears():
    clock = EventClock(lateness_ms=1000, idle_ms=5000)
    clock.restore(3, T, WALL)
    clock.restore(3, T - 5000, WALL)  # never goes back
    assert clock.watermark(3, WALL) == T - 1000
    assert clock.watermark(3, WALL + 15_000) == T + 9000  # no input since the restore: runs on
    clock.forget()
    assert clock.watermark(3, WALL) is None


def test_pop_due_takes_what_each_partitions_own_watermark_has_passed_once_per_key():
    heap = [(100, "a", 0), (150, "b", 1), (120, "a", 0), (300, "c", 0), (90, "d", 2)]
    heapq.heapify(heap)
    marks = {0: 200, 1: 140, 2: None}  # partition 1 lags; partition 2 knows nothing yet
    assert sorted(pop_due(heap, marks.get, marks)) == [(0, "a")]
    assert sorted(heap) == [(90, "d", 2), (150, "b", 1), (300, "c", 0)]  # due only by another clock: kept
    marks = {0: 400, 1: 150, 2: 90}
    assert sorted(pop_due(heap, marks.get, marks)) == [(0, "c"), (1, "b"), (2, "d")]
    assert heap == [] and pop_due(heap, marks.get, marks) == []
    assert pop_due([(1, "x", 0)], {0: None}.get, [0]) == []  # no watermark anywhere: nothing fires
