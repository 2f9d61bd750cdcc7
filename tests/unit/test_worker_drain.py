"""The worker's drain (run before a rebalance hands partitions away) waits for every batch in flight, including one
still being put on the wire: were it to return early, the pending states would be cleared and the aggregation
reset under that batch, which then applies its states and lets its offsets commit."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from fleetstream.config import Settings
from fleetstream.streaming.pipeline import BatchOutput


class _SlowOutput:
    """A producer whose send (the put-on-the-wire part) waits until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.sending = asyncio.Event()

    async def send(self, records: object) -> asyncio.Future[dict]:
        self.sending.set()
        await self.release.wait()
        acknowledged: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        acknowledged.set_result({})
        return acknowledged


def test_drain_waits_for_a_batch_still_being_sent():
    from fleetstream.streaming.app import create_app

    async def scenario() -> list[str]:
        app = create_app(Settings.load(env={}), CollectorRegistry())
        worker = app.fleetstream_worker
        output = worker.output = _SlowOutput()
        order: list[str] = []
        emitting = asyncio.ensure_future(worker._emit(BatchOutput(), (), 0.0))
        await output.sending.wait()

        async def drain() -> None:
            await worker.drain()
            order.append("drained")

        draining = asyncio.ensure_future(drain())
        await asyncio.sleep(0.05)
        order.append("released")
        output.release.set()
        await asyncio.wait_for(asyncio.gather(emitting, draining), timeout=5)
        assert not worker._inflight
        return order

    assert asyncio.run(scenario()) == ["released", "drained"]
