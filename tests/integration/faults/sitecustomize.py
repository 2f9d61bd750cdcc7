"""Fault injection for worker processes started by the integration tests (loaded as ``sitecustomize`` when this
directory leads PYTHONPATH; see ``helpers.fault_env``):

- ``FLEETSTREAM_TEST_SLOW_SEEK_S``: Faust's seek of the stream partitions to their committed offsets takes that
  many seconds longer, as a slow offset fetch on a loaded broker or machine would. It widens races at the end of
  table recovery that are otherwise a matter of luck.
- ``FLEETSTREAM_TEST_NO_COMMITS``: the worker never commits offsets, as one killed before its group's first
  commit (Faust commits every 2.8 s, so a kill cannot be timed to come first)."""

from __future__ import annotations

import asyncio
import os

_delay_s = float(os.environ.get("FLEETSTREAM_TEST_SLOW_SEEK_S") or 0)

if _delay_s > 0:
    from faust.transport.consumer import ThreadDelegateConsumer

    _seek_to_committed = ThreadDelegateConsumer.seek_to_committed

    async def _slow_seek_to_committed(self):  # type: ignore[no-untyped-def]
        await asyncio.sleep(_delay_s)
        return await _seek_to_committed(self)

    ThreadDelegateConsumer.seek_to_committed = _slow_seek_to_committed

if os.environ.get("FLEETSTREAM_TEST_NO_COMMITS"):
    from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread

    async def _no_commit(self, offsets):  # type: ignore[no-untyped-def]
        return False

    AIOKafkaConsumerThread.commit = _no_commit
