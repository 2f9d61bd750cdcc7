"""The Faust application: built by :func:`create_app` from Settings (no module-level app singleton).

Faust gives us the consumer group, partition assignment, offsets, table changelogs, recovery and the web
server. The per-fix work happens in :class:`~fleetstream.streaming.pipeline.PositionPipeline` over whole
batches, and outputs leave through :class:`~fleetstream.streaming.output.BatchProducer`, so Faust's
per-message costs are paid once per Kafka message, not once per fix or per output.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import faust
from faust.types import TP, EventT

from fleetstream.config import Settings
from fleetstream.streaming.kafka import ssl_context
from fleetstream.streaming.output import BatchProducer
from fleetstream.streaming.pipeline import InRecord, PipelineStats, PositionPipeline

log = logging.getLogger("fleetstream.worker")

DEVICE_STATE_TABLE = "device-state"


def broker_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    """SASL / TLS settings for the Kafka client, or None for PLAINTEXT."""
    protocol = settings.security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = ssl_context(settings)
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    credentials = faust.SASLCredentials(
        username=settings.sasl_username, password=settings.sasl_password,
        mechanism=settings.sasl_mechanism, ssl_context=context,
    )
    credentials.protocol = faust.types.auth.AuthProtocol(protocol)
    return credentials


def store_url(settings: Settings) -> str:
    if settings.table_store == "memory":
        return "memory://"
    if settings.table_store == "rocksdb":
        return "rocksdb://"
    try:
        import rocksdict  # noqa: F401
    except ImportError:
        return "memory://"
    return "rocksdb://"


@dataclass(slots=True)
class _ChangelogMessage:
    key: bytes
    value: bytes
    partition: int
    offset: int
    tp: TP


@dataclass(slots=True)
class _ChangelogEvent:
    """The shape ``Table.apply_changelog_batch`` reads during recovery: we apply our own writes the same way."""

    key: bytes
    value: bytes
    message: _ChangelogMessage


class TableState:
    """Reads and writes a raw-bytes Faust table by explicit partition.

    Faust's stores pick the partition from the *current event*, which inside a batch is not the record being
    handled; reading by partition directly keeps each device's state in its own partition's store.
    """

    def __init__(self, table: faust.Table) -> None:
        self.table = table

    def get(self, partition: int, key: bytes) -> bytes | None:
        store = self.table.data
        db_for_partition = getattr(store, "_db_for_partition", None)
        if db_for_partition is not None:  # RocksDB store: one database per partition
            return db_for_partition(partition).get(key)
        return store.data.get(key)

    def apply(self, writes: Sequence[tuple[int, bytes, bytes]], offsets: dict[int, list[int]]) -> None:
        """Apply acknowledged changelog writes to the local store, as recovery would (persisted offsets too)."""
        if not writes:
            return
        topic = self.table.changelog_topic_name
        cursor: dict[int, int] = {}
        events = []
        for partition, key, value in writes:
            i = cursor.get(partition, 0)
            cursor[partition] = i + 1
            offset = offsets[partition][i]
            message = _ChangelogMessage(key, value, partition, offset, TP(topic, partition))
            events.append(_ChangelogEvent(key, value, message))
        self.table.apply_changelog_batch(events)


class PositionWorker:
    """Glue between the Faust agent and the pipeline: decode batch, flush outputs, apply state."""

    def __init__(self, app: faust.App, settings: Settings, table: faust.Table) -> None:
        self.app = app
        self.settings = settings
        self.state = TableState(table)
        self.stats = PipelineStats()
        self.pipeline: PositionPipeline | None = None
        self.output: BatchProducer | None = None

    async def start(self) -> None:
        producer = self.app.producer._ensure_producer()  # the aiokafka producer Faust started for us
        self.output = BatchProducer(producer, tail_single_record=self.settings.tail_single_record)
        n_in = await self.output.partitions_for(self.settings.positions_topic)
        n_out = await self.output.partitions_for(self.settings.enriched_topic)
        if n_in != n_out:
            log.warning(
                "%s has %d partitions and %s has %d: enriched records are partitioned by key instead of "
                "following their input partition", self.settings.positions_topic, n_in,
                self.settings.enriched_topic, n_out,
            )
        self.pipeline = PositionPipeline(
            self.settings, self.state, changelog_topic=self.state.table.changelog_topic_name,
            copartitioned=n_in == n_out, stats=self.stats,
        )

    async def handle(self, events: Iterable[EventT]) -> None:
        if self.pipeline is None:
            await self.start()
        assert self.pipeline is not None and self.output is not None
        records = [
            InRecord(m.topic, m.partition, m.offset, m.key, m.value) for m in (event.message for event in events)
        ]
        output = self.pipeline.process(records)
        offsets = await self.output.flush(output.records)
        changelog = self.state.table.changelog_topic_name
        self.state.apply(
            output.state_writes,
            {partition: found for (topic, partition), found in offsets.items() if topic == changelog},
        )


def create_app(settings: Settings, **faust_overrides: Any) -> faust.App:
    """Build a Faust app for these settings, with its topics, table, agent and web views."""
    app = faust.App(
        settings.app_id,
        broker=[f"kafka://{server}" for server in settings.bootstrap_servers],
        broker_credentials=broker_credentials(settings),
        store=store_url(settings),
        datadir=settings.data_dir,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_max_batch_size=512 * 1024,
        producer_linger_ms=0,
        web_host=settings.web_host,
        web_port=settings.web_port,
        web_enabled=True,
        autodiscover=False,
        **faust_overrides,
    )
    positions = app.topic(
        settings.positions_topic, key_type=bytes, value_type=bytes,
        key_serializer="raw", value_serializer="raw", partitions=settings.partitions,
    )
    table = app.Table(
        DEVICE_STATE_TABLE, default=None, partitions=settings.partitions,
        key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
    )
    worker = PositionWorker(app, settings, table)
    app.fleetstream_worker = worker  # type: ignore[attr-defined]

    @app.agent(positions, name="positions")
    async def process_positions(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.batch_max, within=settings.batch_within_s):
            await worker.handle(events)

    @app.page("/status")
    async def status(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return web.json({"app_id": settings.app_id, **worker.stats.as_dict()})

    @app.page("/health")
    async def health(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return web.json({"status": "ok"})

    return app
