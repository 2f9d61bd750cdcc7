"""faust_fixes: exact acknowledgement bookkeeping for the app's own input topics, Faust's for the others."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace

import pytest
from faust.types import TP
from intervaltree import IntervalTree

from fleetstream.streaming import faust_fixes

OWN = TP("fleet.positions", 0)
OTHER = TP("someone.elses.topic", 0)


class Delivered:
    """A message delivered to a stream (hashable by identity, as Faust's messages)."""

    def __init__(self, tp: TP, offset: int) -> None:
        self.tp, self.offset, self.acked = tp, offset, False


class FakeConsumer:
    """The state Faust's Consumer keeps per partition, and a log start for ``earliest_offsets``."""

    def __init__(self, committed: int | None, log_start: int = 0) -> None:
        self.app = SimpleNamespace()
        faust_fixes.install(self.app, [OWN.topic])
        self._acked: defaultdict = defaultdict(list)
        self._acked_index: defaultdict = defaultdict(set)
        self._gap: defaultdict = defaultdict(IntervalTree)
        self._committed_offset: defaultdict = defaultdict(lambda: None)
        self._committed_offset[OWN] = self._committed_offset[OTHER] = committed
        self._unacked_messages: set = set()  # delivered to a stream, not acknowledged (Consumer.track_message)
        self.log_start = log_start

    def deliver(self, tp: TP, *offsets: int) -> None:
        self._unacked_messages.update(Delivered(tp, offset) for offset in offsets)

    def ack(self, tp: TP, *offsets: int) -> None:  # as Consumer.ack: one entry per acknowledgement
        for message in [m for m in self._unacked_messages if m.tp == tp and m.offset in offsets]:
            message.acked = True
            self._unacked_messages.discard(message)
        for offset in offsets:
            self._acked[tp].append(offset)
            self._acked_index[tp].add(offset)

    async def earliest_offsets(self, *tps: TP) -> dict[TP, int]:
        return {tp: self.log_start for tp in tps}

    def new_offset(self, tp: TP) -> int | None:
        return faust_fixes._new_offset(self, tp)

    def add_gap(self, tp: TP, offset_from: int, offset_to: int) -> None:
        asyncio.run(faust_fixes._add_gap(self, tp, offset_from, offset_to))


def test_duplicate_acknowledgements_do_not_hold_the_commit_back():
    c = FakeConsumer(committed=100)
    c.ack(OWN, *range(100, 111))
    c._acked[OWN].extend(range(101, 106))  # offsets counted twice (as a gap once, then processed)
    assert c.new_offset(OWN) == 111
    assert c._acked[OWN] == [] and not c._acked_index[OWN]


def test_an_unprocessed_record_right_after_the_committed_offset_holds_the_commit():
    c = FakeConsumer(committed=100)
    c.ack(OWN, *range(101, 111))  # 100 is still being processed
    assert c.new_offset(OWN) is None
    c.ack(OWN, 100)
    assert c.new_offset(OWN) == 111


def test_a_run_stops_at_the_first_unprocessed_record():
    c = FakeConsumer(committed=100)
    c.ack(OWN, 100, 101, 102, 104, 105)
    assert c.new_offset(OWN) == 103
    c._committed_offset[OWN] = 103
    assert c.new_offset(OWN) is None
    c.ack(OWN, 103)
    assert c.new_offset(OWN) == 106


def test_a_jump_in_the_fetched_offsets_counts_nothing_that_still_exists_as_done():
    c = FakeConsumer(committed=100, log_start=0)
    c.add_gap(OWN, 101, 1109)  # the fetch loop's view after a seek back to 100 mid-batch
    assert not c._gap[OWN]
    c.ack(OWN, *range(1109, 1120))
    assert c.new_offset(OWN) is None  # 100..1108 must be processed first


def test_records_removed_by_retention_are_counted_as_done():
    c = FakeConsumer(committed=100, log_start=500)
    c.add_gap(OWN, 101, 500)  # aiokafka reset to the log start: 100..499 are gone
    c.ack(OWN, *range(500, 511))
    assert c.new_offset(OWN) == 511


def test_before_the_first_commit_the_lowest_run_is_committed():
    c = FakeConsumer(committed=None)
    c.deliver(OWN, *range(5, 12))
    c.ack(OWN, 5, 6, 7, 9)
    assert c.new_offset(OWN) == 8


def test_before_the_first_commit_a_later_batch_acknowledged_first_waits_for_the_earlier_one():
    """Overlapping batches: 0..99 still in flight when 100..199 are acknowledged. Committing 200 then would
    lose 0..99 if the worker stopped before their outputs were written."""
    c = FakeConsumer(committed=None)
    c.deliver(OWN, *range(0, 200))
    c.deliver(OTHER, 0)  # another partition's record in flight holds nothing back here
    c.ack(OWN, *range(100, 200))
    assert c.new_offset(OWN) is None
    c.ack(OWN, *range(0, 100))
    assert c.new_offset(OWN) == 200


def test_before_the_first_commit_a_partition_starting_past_zero_commits_its_first_run():
    """The first record need not be offset 0 (retention): what holds a run back is a record delivered below it
    and not acknowledged, of the same partition; records after the run do not."""
    c = FakeConsumer(committed=None)
    late = TP(OWN.topic, 1)
    c._committed_offset[late] = None
    c.deliver(OWN, 40)  # partition 0's batch in flight
    c.deliver(late, *range(1000, 1010))
    c.ack(late, 1000)
    assert c.new_offset(late) == 1001


@pytest.mark.parametrize("case", ["off_by_one", "duplicates"])
def test_other_topics_keep_fausts_bookkeeping(case):
    c = FakeConsumer(committed=100)
    if case == "off_by_one":
        c.ack(OTHER, *range(101, 111))
        assert c.new_offset(OTHER) == 111  # Faust's: 100 was never acknowledged
    else:
        c.ack(OTHER, *range(100, 111))
        c._acked[OTHER].extend(range(101, 106))
        assert c.new_offset(OTHER) == 102  # Faust's: stops at the first duplicate
