"""The HTTP API on two real workers in one group: every device is answered by whichever worker is asked (routed
to its owner), lists and /nearby are gathered across workers, and errors are JSON with the right status."""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.error
import urllib.request
from pathlib import Path

import orjson
import pytest

from fleetstream.codecs import format_ts
from fleetstream.domain.geo import haversine_m
from fleetstream.embedded import free_port
from tests.integration.helpers import WorkerProcess, produce, wait_for_count, worker_settings

pytestmark = pytest.mark.integration

TOKEN = "s3cret-token"


def get(url: str, token: str | None = TOKEN) -> tuple[int, dict | list]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def wait_until_both_own_partitions(workers: list[WorkerProcess], timeout_s: float = 90) -> None:
    """Both workers ready and the group's assignment spread over both (each has a share of the partitions)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ready = [urllib.request.urlopen(f"{w.base_url}/ready", timeout=5).status == 200 for w in workers]
        except (urllib.error.URLError, ConnectionError):
            ready = [False]
        if all(ready):
            return
        time.sleep(0.5)
    raise AssertionError("workers did not become ready")


def test_two_workers_answer_for_every_device(broker, prefix, tmp_path: Path):
    settings_a = worker_settings(broker.url, prefix, tmp_path, partitions=4, api_token=TOKEN)
    settings_b = settings_a.with_overrides(web_port=(port := free_port()),
                                           advertised_url=f"http://127.0.0.1:{port}",
                                           data_dir=str(tmp_path / "b-data"))
    rng = random.Random(7)
    now_ms = int(time.time() * 1000) - 60_000
    devices = {f"veh-{i:03d}": (52.0 + rng.uniform(-0.05, 0.05), 4.0 + rng.uniform(-0.05, 0.05)) for i in range(60)}
    records = [
        (device.encode(), orjson.dumps({"device_id": device, "ts": format_ts(now_ms), "lat": lat, "lon": lon}))
        for device, (lat, lon) in devices.items()
    ]
    workers = [WorkerProcess(settings_a, tmp_path / "a.log").start(),
               WorkerProcess(settings_b, tmp_path / "b.log").start()]
    try:
        wait_until_both_own_partitions(workers)
        asyncio.run(produce(broker.bootstrap, settings_a.positions_topic, records))
        asyncio.run(wait_for_count(broker.bootstrap, settings_a.enriched_topic, len(records)))

        # assignment spread: each worker owns some devices locally
        local = [get(f"{w.base_url}/devices?scope=local&limit=1000")[1] for w in workers]
        assert all(len(part) > 0 for part in local), local
        assert sorted(d["device_id"] for part in local for d in part) == sorted(devices)

        for worker in workers:  # every device from every worker, whichever owns it
            for device, (lat, lon) in devices.items():
                status, body = get(f"{worker.base_url}/devices/{device}")
                assert status == 200, (device, body)
                assert (body["device_id"], body["lat"], body["lon"]) == (device, lat, lon)

            status, body = get(f"{worker.base_url}/devices?limit=25")
            assert status == 200
            seen = [d["device_id"] for d in body["devices"]]
            while body["next_after"]:
                status, body = get(f"{worker.base_url}/devices?limit=25&after={body['next_after']}")
                seen += [d["device_id"] for d in body["devices"]]
            assert seen == sorted(devices)

            centre = (52.0, 4.0)
            status, body = get(f"{worker.base_url}/nearby?lat={centre[0]}&lon={centre[1]}&radius_m=3000&limit=10")
            assert status == 200
            expected = sorted(
                (d, haversine_m(*centre, lat, lon)) for d, (lat, lon) in devices.items()
                if haversine_m(*centre, lat, lon) <= 3000
            )
            expected.sort(key=lambda item: (item[1], item[0]))
            assert [d["device_id"] for d in body["devices"]] == [d for d, _ in expected[:10]]
            for got, (_, distance) in zip(body["devices"], expected, strict=False):
                assert got["distance_m"] == pytest.approx(distance, rel=1e-9, abs=1e-6)

            assert get(f"{worker.base_url}/devices/nobody")[0] == 404
            status, body = get(f"{worker.base_url}/nearby?lat=95&lon=4&radius_m=10")
            assert status == 400 and "lat" in body["detail"]
            assert get(f"{worker.base_url}/nearby?lat=52&lon=4&radius_m=10&limit=0")[0] == 400
            assert get(f"{worker.base_url}/devices/veh-001", token=None)[0] == 401
            assert get(f"{worker.base_url}/devices/veh-001", token="wrong")[0] == 401
            assert urllib.request.urlopen(f"{worker.base_url}/health", timeout=5).status == 200
    finally:
        for worker in workers:
            worker.stop()
