"""Helpers for tests against a real broker: worker processes, producing and reading topics to the end."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from fleetstream.config import Settings
from fleetstream.embedded import free_port


@dataclass
class Consumed:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    def json(self) -> dict:
        assert self.value is not None
        return orjson.loads(self.value)


def settings_env(settings: Settings) -> dict[str, str]:
    return settings.to_env()


@dataclass
class WorkerProcess:
    """A real ``fleetstream worker`` process (python -m fleetstream worker) with its own web port."""

    settings: Settings
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # extra environment (e.g. fault_env())
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.web_port}"

    def start(self, timeout_s: float = 60) -> WorkerProcess:
        env = {**os.environ, **self.env, **settings_env(self.settings)}
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fleetstream", "worker"], env=env, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited with {self.process.returncode}: {self.log_tail()}")
            try:
                self.status()
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"worker did not serve /status within {timeout_s}s: {self.log_tail()}")

    def status(self) -> dict:
        with urllib.request.urlopen(self.base_url + "/status", timeout=2) as response:
            return orjson.loads(response.read())

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, timeout_s: float = 30) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


def fault_env(*, slow_seek_s: float = 0, no_commits: bool = False) -> dict[str, str]:
    """Environment for a WorkerProcess with injected faults (see ``faults/sitecustomize.py``): its seek to the
    committed offsets at the end of table recovery takes ``slow_seek_s`` longer, as on a loaded broker; with
    ``no_commits`` it never commits offsets (a worker killed before its group's first commit)."""
    path = str(Path(__file__).parent / "faults")
    inherited = os.environ.get("PYTHONPATH")
    env = {"PYTHONPATH": path + (os.pathsep + inherited if inherited else "")}
    if slow_seek_s:
        env["FLEETSTREAM_TEST_SLOW_SEEK_S"] = str(slow_seek_s)
    if no_commits:
        env["FLEETSTREAM_TEST_NO_COMMITS"] = "1"
    return env


def worker_settings(broker_url: str, prefix: str, tmp: Path, **overrides: object) -> Settings:
    """Settings with topics, app id, web port and data dir private to one test."""
    return Settings.load(
        env={},
        broker=broker_url,
        app_id=f"{prefix}-app",
        positions_topic=f"{prefix}.positions",
        enriched_topic=f"{prefix}.positions.enriched",
        deadletter_topic=f"{prefix}.deadletter",
        geofences_topic=f"{prefix}.geofences",
        geofence_events_topic=f"{prefix}.geofence.events",
        telemetry_topic=f"{prefix}.telemetry",
        trips_topic=f"{prefix}.trips",
        alerts_topic=f"{prefix}.alerts",
        rules_topic=f"{prefix}.rules",
        cells_topic=f"{prefix}.cells",
        cell_partials_topic=f"{prefix}.cells.partials",
        web_port=(port := free_port()),
        advertised_url=f"http://127.0.0.1:{port}",
        data_dir=str(tmp / f"{prefix}-data"),
        web_host="127.0.0.1",
        rebalance_timeout_s=3,  # the embedded broker waits half of it before a new group's first join
        **overrides,
    )


async def produce(bootstrap: str, topic: str, records: Iterable[tuple[bytes | None, bytes]]) -> int:
    """Keyed sends (default partitioner, like any Kafka producer), all acknowledged."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [await producer.send(topic, key=key, value=value) for key, value in records]
        await asyncio.gather(*futures)
        return len(futures)
    finally:
        await producer.stop()


async def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int | None]:
    """A consumer group's committed offsets (``consumer.committed`` works on Tansu; the admin client's
    ``list_consumer_group_offsets`` does not). Does not join the group."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


def missing_report(inputs: list[Consumed], enriched_ids: set[str], dead: list[Consumed]) -> dict[int, str]:
    """Per input partition, the valid events (``partition-offset-index``) neither enriched nor dead-lettered,
    as a count and input offset range: tells a partition never consumed from a few holes."""
    dead_ids = {f"{d['partition']}-{d['offset']}-{d.get('index') or 0}" for d in (r.json() for r in dead)}
    missing: dict[int, list[int]] = {}
    for record in inputs:
        try:
            value = orjson.loads(record.value) if record.value else None
        except orjson.JSONDecodeError:
            continue
        for index in range(len(value) if isinstance(value, list) else 1):
            event_id = f"{record.partition}-{record.offset}-{index}"
            if event_id not in enriched_ids and event_id not in dead_ids:
                missing.setdefault(record.partition, []).append(record.offset)
    return {p: f"{len(offsets)} events at offsets {min(offsets)}..{max(offsets)} ({len(set(offsets))} records)"
            for p, offsets in sorted(missing.items())}


async def read_topic(
    bootstrap: str, topic: str, *, expect: int | None = None, idle_s: float = 5.0, timeout_s: float = 120.0
) -> list[Consumed]:
    """Read a topic from the beginning: until ``expect`` records arrived (then ``idle_s`` more for extras),
    or until nothing new came for ``idle_s``. Never trusts end offsets (Tansu under-reports them)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    out: list[Consumed] = []
    try:
        partitions = None
        deadline = time.monotonic() + timeout_s
        while partitions is None and time.monotonic() < deadline:
            partitions = consumer.partitions_for_topic(topic)
            if not partitions:
                await consumer._client.force_metadata_update()  # topic may not exist yet
                partitions = consumer.partitions_for_topic(topic) or None
                if partitions is None:
                    await asyncio.sleep(0.2)
        if not partitions:
            return out
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        last_new = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200, max_records=10_000)
            got = 0
            for tp, messages in batch.items():
                for m in messages:
                    out.append(Consumed(tp.topic, tp.partition, m.offset, m.key, m.value))
                    got += 1
            now = time.monotonic()
            if got:
                last_new = now
            elif (expect is not None and len(out) >= expect and now - last_new > min(idle_s, 1.0)) or (
                    now - last_new > idle_s and (expect is None or len(out) >= expect)):
                break
        return out
    finally:
        await consumer.stop()


async def wait_for_count(bootstrap: str, topic: str, expect: int, timeout_s: float = 120) -> list[Consumed]:
    """Poll a topic until it holds at least ``expect`` records (or time runs out) and return them all."""
    return await read_topic(bootstrap, topic, expect=expect, idle_s=timeout_s, timeout_s=timeout_s)


def wait_for_every_event(
    settings: Settings, bootstrap: str, n_valid: int, *, malformed: int = 0, n_inputs: int | None = None,
    workers: Iterable[WorkerProcess] = (), context: str = "", timeout_s: float = 240,
) -> tuple[list[Consumed], list[Consumed]]:
    """Enriched and dead-lettered records once ``n_valid`` distinct event ids are enriched, or fail saying which
    input records never came out (per input partition), where the group's committed offsets stand and how the
    workers' logs end.

    Waits for distinct event ids, not a record count: a replay's duplicates can reach the count while the rest is
    still to come (e.g. behind the rebalance when a killed member's session expires)."""
    deadline = time.monotonic() + timeout_s
    while True:
        enriched = asyncio.run(read_topic(bootstrap, settings.enriched_topic, expect=n_valid, idle_s=4))
        distinct = {orjson.loads(r.value)["event_id"] for r in enriched if r.value}
        if len(distinct) >= n_valid or time.monotonic() > deadline:
            break
        time.sleep(2)
    dead = asyncio.run(read_topic(bootstrap, settings.deadletter_topic, expect=malformed or None, idle_s=2))
    if len(distinct) < n_valid:
        inputs = asyncio.run(read_topic(bootstrap, settings.positions_topic, expect=n_inputs, idle_s=3))
        committed = asyncio.run(committed_offsets(bootstrap, settings.app_id, settings.positions_topic,
                                                  settings.partitions))
        pytest.fail(
            f"{len(distinct)} of {n_valid} event ids after {timeout_s:.0f} s; missing by input partition: "
            f"{missing_report(inputs, distinct, dead)}; {context}; committed now: {committed}; "
            + "; ".join(f"log tail of {w.log_path.name}: {w.log_tail(1500)}" for w in workers)
        )
    return enriched, dead
