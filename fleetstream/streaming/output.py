"""Batched output: one ``send_batch`` per topic-partition per flush instead of one ``send`` per record.

Faust's ``Topic.send`` costs ~250 µs per record and aiokafka's keyed ``send`` 17 µs; ``send_batch`` costs about
2.5 µs per record (FIELD-NOTES). The worker collects a whole input batch's outputs, flushes them here and awaits
every acknowledgement before the input offsets may be committed (at-least-once).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Iterable
from typing import NamedTuple

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner


class OutRecord(NamedTuple):  # a NamedTuple: built for every output record, 4x cheaper than a frozen dataclass
    topic: str
    key: bytes | None
    value: bytes | None
    partition: int | None = None  # None: murmur2 of the key, like a keyed send


class BatchProducer:
    """Flushes records per topic-partition with ``create_batch``/``send_batch`` and awaits the acks."""

    def __init__(self, producer: AIOKafkaProducer, *, tail_single_record: bool = True) -> None:
        self._producer = producer
        self._partitioner = DefaultPartitioner()
        self._tail_single_record = tail_single_record
        self._partition_counts: dict[str, int] = {}

    async def partitions_for(self, topic: str) -> int:
        count = self._partition_counts.get(topic)
        if count is None:
            found = await self._producer.partitions_for(topic)
            count = self._partition_counts[topic] = len(found)
        return count

    async def flush(self, records: Iterable[OutRecord]) -> dict[tuple[str, int], list[int]]:
        """Send every record and wait; return, per (topic, partition), the offsets the records got, in order."""
        return await (await self.send(records))

    async def send(self, records: Iterable[OutRecord]) -> Awaitable[dict[tuple[str, int], list[int]]]:
        """Hand every record to the producer now; the returned awaitable gives the offsets once acknowledged.

        Lets the worker process the next batch while this one is on the wire.
        """
        by_tp: dict[tuple[str, int], list[OutRecord]] = defaultdict(list)
        for record in records:
            partition = record.partition
            if partition is None:
                count = await self.partitions_for(record.topic)
                partition = self._partitioner(record.key, list(range(count)), list(range(count)))
            by_tp[(record.topic, partition)].append(record)
        pending = {tp: await self._send_partition(tp[0], tp[1], items) for tp, items in by_tp.items()}
        return self._offsets(pending)

    async def _offsets(
        self, pending: dict[tuple[str, int], list[tuple[asyncio.Future, int]]]
    ) -> dict[tuple[str, int], list[int]]:
        result: dict[tuple[str, int], list[int]] = {}
        for tp, chunks in pending.items():
            offsets = result[tp] = []
            for future, count in chunks:
                metadata = await future
                offsets.extend(range(metadata.offset, metadata.offset + count))
        return result

    async def _send_partition(
        self, topic: str, partition: int, records: list[OutRecord]
    ) -> list[tuple[asyncio.Future, int]]:
        # Tansu reports end offset = base offset of the newest batch + 1, so the last record goes alone.
        split = len(records) - 1 if self._tail_single_record and len(records) > 1 else len(records)
        chunks: list[tuple[asyncio.Future, int]] = []
        for group in (records[:split], records[split:]):
            batch = self._producer.create_batch()
            count = 0
            for record in group:
                if batch.append(key=record.key, value=record.value, timestamp=None) is None:
                    chunks.append((await self._producer.send_batch(batch, topic, partition=partition), count))
                    batch = self._producer.create_batch()
                    count = 0
                    if batch.append(key=record.key, value=record.value, timestamp=None) is None:
                        raise ValueError(f"record for {topic} is larger than the producer's max batch size")
                count += 1
            if count:
                chunks.append((await self._producer.send_batch(batch, topic, partition=partition), count))
        return chunks
