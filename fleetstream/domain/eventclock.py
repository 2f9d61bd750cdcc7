"""Event-time watermarks per input partition, for timers that fire deadlines in event time (RFID assets, and the
alert engine's deadlines in the position worker).

The asset domain fires its deadlines (a switch of place, ``asset_missing``, ``separation``) at event times and
wants a *watermark*: a time no read still to come is older than. The worker's wall clock is wrong for that on a
replay or a backlog (every deadline would fire at once, before the reads that would have prevented it), and the
newest read of one partition is wrong for a partition that has gone quiet (its deadlines would never fire).
So, per partition:

- while reads keep arriving on it (within ``idle_ms`` of wall time), its watermark is its newest read time less
  ``lateness_ms``: partitions fetched unevenly never fire each other's deadlines early;
- once it is idle, it follows the worker's event clock (the newest read time over all partitions), which itself
  runs on with the wall clock once no read at all has arrived for ``idle_ms``: at night, with no reads anywhere,
  missing assets still go missing.

Pure: wall times are passed in, so it is tested without sleeping.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable


class EventClock:
    """Watermarks of the partitions this worker holds (see the module doc)."""

    __slots__ = ("_arrived", "_last_input_ms", "_max_seen", "_seen", "idle_ms", "lateness_ms")

    def __init__(self, lateness_ms: int, idle_ms: int) -> None:
        self.lateness_ms = lateness_ms
        self.idle_ms = idle_ms
        self._seen: dict[int, int] = {}  # partition -> newest read time
        self._arrived: dict[int, int] = {}  # partition -> wall time of its latest read
        self._max_seen: int | None = None
        self._last_input_ms: int | None = None

    def observe(self, partition: int, ts_ms: int, wall_ms: int) -> None:
        """A read of ``partition`` with event time ``ts_ms`` arrived at ``wall_ms``."""
        seen = self._seen.get(partition)
        if seen is None or ts_ms > seen:
            self._seen[partition] = ts_ms
        if self._max_seen is None or ts_ms > self._max_seen:
            self._max_seen = ts_ms
        self._arrived[partition] = wall_ms
        self._last_input_ms = wall_ms

    def restore(self, partition: int, ts_ms: int, wall_ms: int) -> None:
        """Event time known from stored state (after a restart or rebalance): the partition counts as idle."""
        seen = self._seen.get(partition)
        if seen is None or ts_ms > seen:
            self._seen[partition] = ts_ms
        if self._max_seen is None or ts_ms > self._max_seen:
            self._max_seen = ts_ms
        if self._last_input_ms is None:
            self._last_input_ms = wall_ms

    def forget(self) -> None:
        """Partitions moved: what is known comes back from the stored states (``restore``) and new reads."""
        self._seen.clear()
        self._arrived.clear()
        self._max_seen = None

    def clock(self, wall_ms: int) -> int | None:
        """The worker's event clock: the newest read time, run on with the wall clock once input has stopped."""
        if self._max_seen is None or self._last_input_ms is None:
            return None
        quiet = wall_ms - self._last_input_ms - self.idle_ms
        return self._max_seen + quiet if quiet > 0 else self._max_seen

    def watermark(self, partition: int, wall_ms: int) -> int | None:
        """No read still to come on ``partition`` should be older than this (None: nothing known yet)."""
        own = self._seen.get(partition)
        arrived = self._arrived.get(partition)
        if own is not None and arrived is not None and wall_ms - arrived < self.idle_ms:
            return own - self.lateness_ms
        clock = self.clock(wall_ms)
        if clock is None:
            return None
        if own is not None and own > clock:
            clock = own
        return clock - self.lateness_ms

    def watermarks(self, wall_ms: int) -> Callable[[int], int | None]:
        """``watermark`` at ``wall_ms`` as a function of the partition, each asked once (a timer tick's view)."""
        marks: dict[int, int | None] = {}

        def watermark(partition: int) -> int | None:
            if partition not in marks:
                marks[partition] = self.watermark(partition, wall_ms)
            return marks[partition]
        return watermark


def pop_due(heap: list[tuple[int, str, int]], watermark: Callable[[int], int | None], partitions: Iterable[int]
            ) -> list[tuple[int, str]]:
    """(partition, key) of the heap's ``(due_ms, key, partition)`` entries that their own partition's watermark has
    passed, once per key. Entries due only by another partition's clock go back on the heap."""
    newest = max((w for w in map(watermark, partitions) if w is not None), default=None)
    due: dict[str, int] = {}
    later = []
    while heap and newest is not None and heap[0][0] <= newest:
        entry = heapq.heappop(heap)
        mark = watermark(entry[2])
        if mark is not None and entry[0] <= mark:
            due[entry[1]] = entry[2]
        else:
            later.append(entry)
    for entry in later:
        heapq.heappush(heap, entry)
    return [(partition, key) for key, partition in due.items()]
