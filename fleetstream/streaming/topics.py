"""Create the topics the worker uses (before Faust starts), with partition counts and compaction.

Done with the aiokafka admin client rather than left to Faust or broker auto-creation, so producers that
start before the worker (simulator, replay, geofence loader) find the same partition counts, and outputs
stay co-partitioned with their inputs.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from fleetstream.config import Settings
from fleetstream.streaming.kafka import client_security


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    compacted: bool = False


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Every topic the worker reads or writes. Compacted topics hold state every worker needs in full."""
    n = settings.partitions
    return [
        TopicSpec(settings.positions_topic, n),
        TopicSpec(settings.enriched_topic, n),
        TopicSpec(settings.deadletter_topic, n),
        TopicSpec(settings.geofence_events_topic, n),
        TopicSpec(settings.telemetry_topic, n),
        TopicSpec(settings.trips_topic, n),
        TopicSpec(settings.alerts_topic, n),
        TopicSpec(settings.cells_topic, n),
        TopicSpec(settings.cell_partials_topic, n),  # read by the positions agent: co-partitioned with its inputs
        TopicSpec(settings.rules_topic, 1, compacted=True),
        # one partition: read by every worker into a global table (FIELD-NOTES: GlobalTable needs 1)
        TopicSpec(settings.geofences_topic, 1, compacted=True),
        # RFID: reads and asset events by tag; readers and asset metadata read in full by every worker
        TopicSpec(settings.rfid_topic, n),
        TopicSpec(settings.assets_topic, n),
        TopicSpec(settings.readers_topic, 1, compacted=True),
        TopicSpec(settings.asset_registry_topic, 1, compacted=True),
    ]


def admin_client(settings: Settings) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, **client_security(settings))


async def ensure_topics(settings: Settings, specs: list[TopicSpec] | None = None, timeout_s: float = 30) -> list[str]:
    """Create the missing topics; return the names created. Retries while the broker is still starting."""
    specs = topic_specs(settings) if specs is None else specs
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        admin = admin_client(settings)
        try:
            await admin.start()
            existing = set(await admin.list_topics())
            missing = [spec for spec in specs if spec.name not in existing]
            created: list[str] = []
            for spec in missing:
                configs = {"cleanup.policy": "compact"} if spec.compacted else {}
                topic = NewTopic(spec.name, spec.partitions, settings.replication_factor, topic_configs=configs)
                try:
                    await admin.create_topics([topic])
                    created.append(spec.name)
                except TopicAlreadyExistsError:
                    pass
            return created
        except Exception as exc:  # connection refused, metadata not ready, ...: the broker may be starting
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"could not create topics on {settings.broker}: {exc!r}") from exc
            await asyncio.sleep(0.5)
        finally:
            await admin.close()
