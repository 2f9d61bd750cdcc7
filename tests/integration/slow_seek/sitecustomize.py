"""Fault injection for worker processes started by the integration tests (loaded as ``sitecustomize`` when this
directory leads PYTHONPATH): Faust's seek of the stream partitions to their committed offsets takes
``FLEETSTREAM_TEST_SLOW_SEEK_S`` seconds longer, as a slow offset fetch on a loaded broker or machine would.

It widens a race that is otherwise a matter of luck: records fetched between the end of table recovery and that
seek must not upset the worker's offset bookkeeping."""

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
