"""Fixes for faust-streaming's input-offset bookkeeping after table recovery (0.15.x; installed by ``create_app``).

**What goes wrong.** When table recovery ends (``Recovery.on_recovery_completed``) Faust *resumes* the stream
partitions and only then *seeks* them to their committed offsets. The fetcher runs during recovery, so records
of the input partitions arrive in that window: they are put on the agents' queues, which are cleared a moment
later when flow control resumes, and the fetch loop may still be handing out the rest of that batch when the
seek has put its read offset back to the committed offset. The next record then looks like a jump of hundreds of
offsets, and ``Consumer._add_gap`` records the "skipped" offsets as if they had been processed. Seen after a
SIGKILL and restart with an empty data dir (all tables restored from their changelogs): records that were
cleared from the queue and never processed were committed (lost: at-least-once broken), and the gap's offsets,
acknowledged a second time when processed, left duplicates in Faust's acknowledged list, so every commit after
that moved the group's offset by one (a later restart replays almost everything). Upstream still resumes before
it seeks (0.15.3, the latest release, and the master branch as last checked); the related issues
faust-streaming#596 (recovery race leaves gaps in acked offsets) and #606 (wrong offset commit with gaps) are open.

**What this changes.**

1. ``Recovery.on_recovery_completed`` seeks the stream partitions to their committed offsets *before* it resumes
   them (the order of earlier faust-streaming releases; the code is otherwise Faust 0.15.3's). Records of the input
   partitions are then fetched only from the committed offset on, after the queues were cleared. This is the fix.
   (``Recovery._resume_streams``, Faust's path for apps without tables, is left alone: this app has tables.)
2. The fetch asks aiokafka for the partitions active *when it is made* (a copy of Faust's set of active
   partitions, and nothing when it is empty). Faust passed its live set: when every partition got paused while
   a fetch was waiting (the end of changelog reading), aiokafka took the empty set for "all partitions" and
   handed over input records, which Faust dropped as paused while aiokafka's position moved past them, up to
   the end of the partitions while recovery finished; a batch fetched before a resume could also deliver
   records from before the seek.
3. Seeking to the committed offsets also moves this app's input partitions that have no committed offset yet
   to their beginning (the app reads from the earliest offset): aiokafka leaves them where they are, so records
   dropped as above were never read again. Seen when a worker was killed before its group's first commit and a
   new one restored its tables: it processed nothing at all.
4. For this app's own input topics (never compacted, written without transactions, so their offsets have no
   holes), the acknowledgement bookkeeping is made exact, so that nothing can commit an offset whose record was
   not processed:

   - ``_add_gap`` counts as done only offsets below the partition's log start (records removed by retention
     while the group was away, which aiokafka skips by resetting to the earliest offset); Faust counted every
     offset it had not seen, including ones fetched before a seek, and the record it had just fetched.
   - ``_new_offset`` ignores duplicate acknowledgements (Faust's run detection stops at a duplicate) and
     commits only a run that starts at the committed offset. Faust committed past a single unacknowledged
     record at the committed offset (off by one: it tests ``min(acked) - committed > 1``), which the worker's
     overlapping batches could hit when a later batch's outputs are acknowledged first. Before a partition's
     first commit there is no committed offset to start from: a run is committed only when no record below
     it is delivered and still unacknowledged (Faust committed the lowest run acknowledged, which could be a
     later batch's while the first one was still in flight).

Other topics keep Faust's behaviour. Check this module against Faust's sources before moving the pin off 0.15.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import faust
from aiokafka import TopicPartition
from faust.tables.recovery import Recovery
from faust.transport.consumer import Consumer
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread
from faust.types import TP

log = logging.getLogger(__name__)

SUPPORTED_FAUST = "0.15."  # the copied recovery code and the bookkeeping below follow faust-streaming 0.15.x

_ATTR = "_fleetstream_exact_topics"  # on the app: the input topics with exact acknowledgement bookkeeping
_original: dict[str, Any] = {}


def install(app: faust.App, exact_topics: Iterable[str]) -> None:
    """Seek-before-resume for ``app``'s recovery, exact acknowledgements for ``exact_topics`` (the app's own
    input topics). The classes are patched once per process; apps without this call keep Faust's behaviour."""
    if not faust.__version__.startswith(SUPPORTED_FAUST):
        raise RuntimeError(
            f"fleetstream.streaming.faust_fixes follows faust-streaming {SUPPORTED_FAUST}x, found {faust.__version__}:"
            " check whether that release fixed recovery's resume-before-seek and its gap handling, then update "
            "or drop these fixes"
        )
    setattr(app, _ATTR, frozenset(exact_topics))
    if not _original:
        _original.update(
            on_recovery_completed=Recovery.on_recovery_completed,
            getmany=AIOKafkaConsumerThread.getmany,
            perform_seek=Consumer.perform_seek,
            add_gap=Consumer._add_gap,
            new_offset=Consumer._new_offset,
        )
        Recovery.on_recovery_completed = _on_recovery_completed  # type: ignore[method-assign]
        AIOKafkaConsumerThread.getmany = _getmany  # type: ignore[method-assign]
        Consumer.perform_seek = _perform_seek  # type: ignore[method-assign]
        Consumer._add_gap = _add_gap  # type: ignore[method-assign]
        Consumer._new_offset = _new_offset  # type: ignore[method-assign]


def _exact_topics(app: Any) -> frozenset[str] | None:
    return getattr(app, _ATTR, None)


async def _on_recovery_completed(self: Recovery, generation_id: int = 0) -> None:
    """Faust 0.15.3's ``Recovery.on_recovery_completed`` with the seek moved before ``resume_partitions``."""
    if _exact_topics(self.app) is None:
        return await _original["on_recovery_completed"](self, generation_id)
    consumer = self.app.consumer
    self.log.info("Restore complete!")
    await self.app.on_rebalance_complete.send()
    self._set_recovery_ended()
    callback_coros = [
        asyncio.ensure_future(table.on_recovery_completed(self.actives_for_table[table],
                                                          self.standbys_for_table[table]))
        for table in self.tables.values()
    ]
    if callback_coros:
        await asyncio.wait(callback_coros)
    assignment = consumer.assignment()
    if self.app.consumer_generation_id != generation_id:
        self.log.warning(f"Recovery rebalancing again app id {self.app.consumer_generation_id} param {generation_id}")
        return
    if assignment:
        # Seek while the stream partitions are still paused: nothing of them is fetched before the committed
        # offset is the read offset. (Faust resumed them first; see the module docstring.)
        self.log.info("Seek stream partitions to committed offsets.")
        await self._wait(consumer.perform_seek(), timeout=self.app.conf.broker_request_timeout)
    consumer.resume_partitions({tp for tp in assignment if not self._is_changelog_tp(tp)})
    self.completed.set()
    self.log.dev("Resume stream partitions")
    self.app.flow_control.resume()
    consumer.resume_flow()
    await self.app._fetcher.maybe_start()  # finally make sure the fetcher is running
    self.tables.on_actives_ready()
    if not self.app.assignor.assigned_standbys():
        self.tables.on_standbys_ready()
    self.app.on_rebalance_end()
    self.log.info("Worker ready")


async def _getmany(self: AIOKafkaConsumerThread, active_partitions: set[TP] | None, timeout: float) -> Any:
    """Fetch for the partitions active now: a copy, so that pausing partitions while the fetch waits can neither
    empty it (aiokafka reads an empty set as every partition) nor let it return records of paused partitions."""
    if _exact_topics(self.app) is None or active_partitions is None:
        return await _original["getmany"](self, active_partitions, timeout)
    if not active_partitions:
        return {}
    return await _original["getmany"](self, set(active_partitions), timeout)


async def _perform_seek(self: Consumer) -> None:
    """Faust's seek to the committed offsets, then the app's input partitions without a committed offset to their
    beginning (aiokafka does not move them; records it fetched while they were paused were dropped)."""
    await _original["perform_seek"](self)
    topics = _exact_topics(self.app)
    if topics is None or self.app.conf.consumer_auto_offset_reset != "earliest":
        return
    fresh = [tp for tp in self.assignment() if tp.topic in topics and self._committed_offset[tp] is None]
    if fresh:
        await self._thread.seek_to_beginning(*(TopicPartition(tp.topic, tp.partition) for tp in fresh))
        for tp in fresh:
            self._read_offset[tp] = None


async def _add_gap(self: Consumer, tp: TP, offset_from: int, offset_to: int) -> None:
    """The fetch loop saw ``offset_to`` after ``offset_from - 1``. For an exact topic, only offsets below the log
    start are gone for good; every other record is acknowledged by the stream that processes it."""
    topics = _exact_topics(self.app)
    if topics is None or tp.topic not in topics:
        return await _original["add_gap"](self, tp, offset_from, offset_to)
    try:
        log_start = (await self.earliest_offsets(tp)).get(tp)
    except Exception:  # no answer: count nothing as done (commits wait; at-least-once holds)
        log.warning("could not read the log start of %s after a jump to offset %d", tp, offset_to, exc_info=True)
        return
    committed = self._committed_offset[tp]
    first = offset_from if committed is None else min(offset_from, committed)
    end = min(offset_to, log_start) if log_start is not None else first  # exclusive
    if first < end:
        log.info("%s: offsets %d..%d are below the log start %d: counted as done", tp, first, end - 1, log_start)
        self._gap[tp].addi(first, end)
        self._gap[tp].merge_overlaps()
    else:
        log.warning("%s: fetched offset %d after %d; the offsets between are not counted as done",
                    tp, offset_to, offset_from - 1)


def _delivered_below(self: Consumer, tp: TP, offset: int) -> bool:
    """A record of ``tp`` below ``offset`` was delivered to a stream and is not acknowledged yet. Records reach
    the streams in offset order, so before a partition's first commit this is what tells a later batch
    acknowledged first (overlapping batches) from the start of the partition."""
    return any(m.tp == tp and m.offset < offset and not m.acked for m in list(self._unacked_messages))


def _new_offset(self: Consumer, tp: TP) -> int | None:
    """The offset to commit for ``tp``: for an exact topic, the end of the run of done offsets that starts at
    the committed offset (before the first commit: at the lowest done offset, once no record below it is in
    flight)."""
    topics = _exact_topics(self.app)
    if topics is None or tp.topic not in topics:
        return _original["new_offset"](self, tp)
    acked = self._acked[tp]
    gap = self._gap.get(tp)
    if not acked and not gap:
        return None
    done = set(acked)
    if gap:
        for interval in gap:
            done.update(range(interval.begin, interval.end))
        gap.clear()
    committed = self._committed_offset[tp]
    if committed is not None:
        done = {offset for offset in done if offset >= committed}
    ordered = sorted(done)
    acked[:] = ordered
    index = self._acked_index[tp]
    index.intersection_update(done)
    if not ordered or (committed is not None and ordered[0] != committed):
        return None  # the record at the committed offset is not done yet
    if committed is None and _delivered_below(self, tp, ordered[0]):
        return None  # before the first commit: an earlier batch is still in flight
    last = ordered[0]
    for offset in ordered[1:]:
        if offset != last + 1:
            break
        last = offset
    run = last - ordered[0] + 1
    del acked[:run]
    index.difference_update(range(ordered[0], last + 1))
    return last + 1
