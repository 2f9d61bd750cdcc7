"""``fleetstream demo``: the embedded broker, a real worker process and the simulator, with a live status line.

The worker runs as a child process (``python -m fleetstream worker``), exactly as in production; the demo
only adds the broker in front and a simulator behind, and reads the worker's ``/status`` to print progress.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import orjson

from fleetstream.config import Settings
from fleetstream.embedded import EmbeddedBroker, free_port


@dataclass(frozen=True, slots=True)
class DemoOptions:
    duration_s: float | None = None
    vehicles: int = 200
    rate_per_s: float = 2000.0
    fixes_per_message: int = 10
    malformed_share: float = 0.01
    use_embedded: bool = True
    status_interval_s: float = 0.25


def _fetch_status(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=1) as response:
            return orjson.loads(response.read())
    except OSError:
        return None


def run_demo(settings: Settings, options: DemoOptions) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="fleetstream-demo-"))
    broker = EmbeddedBroker(log_path=workdir / "tansu.log") if options.use_embedded else None
    worker: subprocess.Popen[bytes] | None = None
    try:
        if broker is not None:
            broker.start()
            print(f"embedded Tansu broker on {broker.url}", flush=True)
        # A fresh broker has no changelogs: table state must start fresh too.
        settings = settings.with_overrides(
            broker=broker.url if broker else None, data_dir=str(workdir / "state"),
            web_port=free_port() if options.use_embedded else None,
        )
        log_path = workdir / "worker.log"
        worker = subprocess.Popen(
            [sys.executable, "-m", "fleetstream", "worker"], env={**os.environ, **settings.to_env()},
            stdout=open(log_path, "ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,  # noqa: SIM115
            start_new_session=True,
        )
        print(f"worker pid {worker.pid}, API on http://127.0.0.1:{settings.web_port}/status, log {log_path}",
              flush=True)
        asyncio.run(_run(settings, options, worker, log_path))
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        print("\nstopping ...", flush=True)
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
        if broker is not None:
            broker.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def _run(settings: Settings, options: DemoOptions, worker: subprocess.Popen[bytes], log_path: Path) -> None:
    from fleetstream.simulate import SimulationConfig, simulate
    from fleetstream.streaming.topics import ensure_topics

    await ensure_topics(settings)
    published = [0]

    def on_progress(stats: object) -> None:
        published[0] = int(getattr(stats, "fixes", getattr(stats, "records", 0)))

    duration = options.duration_s if options.duration_s is not None else 7 * 86_400.0
    config = SimulationConfig(
        vehicles=options.vehicles, rate_per_s=options.rate_per_s, duration_s=duration,
        batch_size=options.fixes_per_message, malformed_share=options.malformed_share,
        start_ms=int(time.time() * 1000),
    )
    producer = asyncio.create_task(
        simulate(",".join(settings.bootstrap_servers), config, topic=settings.positions_topic, status_cb=on_progress)
    )
    started = time.monotonic()
    window: deque[tuple[float, int, int]] = deque()  # rates over the last ~2 s: the worker takes bursts
    try:
        while True:
            await asyncio.sleep(options.status_interval_s)
            elapsed = time.monotonic() - started
            if worker.poll() is not None:
                raise SystemExit(f"worker exited with {worker.returncode}; see {log_path}")
            status = await asyncio.to_thread(_fetch_status, settings.web_port)
            if status is not None:
                now = time.monotonic()
                fixes_in, fixes_out = int(status["fixes_in"]), int(status["enriched"]) + int(status["deadlettered"])
                window.append((now, fixes_in, fixes_out))
                while now - window[0][0] > 2.0:
                    window.popleft()
                previous = window[0]
                if now > previous[0]:
                    rate_in = (fixes_in - previous[1]) / (now - previous[0])
                    rate_out = (fixes_out - previous[2]) / (now - previous[0])
                    line = (
                        f"\r{elapsed:6.1f}s  in {rate_in:8,.0f}/s  out {rate_out:8,.0f}/s  "
                        f"devices {status['devices_seen']:>6,}  dead letters {status['deadlettered']:>6,}  "
                        f"lag {max(0, published[0] - fixes_in):>7,}  "
                    )
                    sys.stdout.write(line if sys.stdout.isatty() else line.strip("\r") + "\n")
                    sys.stdout.flush()
            if options.duration_s is not None and elapsed >= options.duration_s:
                break
            if producer.done() and producer.exception() is not None:
                raise producer.exception()  # type: ignore[misc]
    finally:
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)
