"""A real Prometheus, configured from the shipped deploy/prometheus (same jobs, same rule files; targets
rewritten to two real workers on the embedded broker, 1 s scrapes), scrapes while known traffic flows. Through
Prometheus' HTTP API: every dashboard query returns data, every metric the dashboard names is exported, the
alert rules evaluate cleanly, the counts Prometheus holds equal what the test produced, and no series carries
a device or geofence id."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import orjson
import pytest
import shapely
import yaml

from fleetstream.codecs import format_ts
from fleetstream.embedded import free_port, wait_for_port
from tests.deploy_support import (
    PROMETHEUS_BUILTIN,
    PROMETHEUS_CONFIG,
    dashboard_queries,
    exported_sample_names,
    grafana_to_promql,
    metric_names,
)
from tests.integration.helpers import WorkerProcess, produce, settings_env, wait_for_count, worker_settings

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

RULES = """
groups:
  first-device: ["veh-00"]
rules:
  - {id: e2e-overspeed, kind: overspeed, severity: major, groups: [first-device], limit_kmh: 50}
"""
LAT, LON = 53.40, -2.98
DEVICES = 12
FIX_INTERVAL_MS = 180_000


class Prometheus:
    """A ``prometheus`` server process on a free port, with its own storage in a temporary directory."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.config_path = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, config: dict, timeout_s: float = 30) -> Prometheus:
        self.config_path.write_text(yaml.safe_dump(config))
        log = open(self.log_path, "ab")  # noqa: SIM115  (closed with the process)
        self.process = subprocess.Popen(
            [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        assert wait_for_port("127.0.0.1", self.port, timeout_s), self.log_tail()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited {self.process.returncode}: {self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"prometheus not ready in {timeout_s}s: {self.log_tail()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def api(self, path: str, **params: str) -> object:
        url = f"{self.url}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = orjson.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400/422: a bad query; say which
            raise AssertionError(f"{path} {params}: {exc.code} {exc.read()[:500]!r}") from None
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        data = self.api("query", query=expr)
        assert isinstance(data, dict)
        return data["result"]

    def by_label(self, expr: str, label: str) -> dict[str, float]:
        return {r["metric"].get(label, ""): float(r["value"][1]) for r in self.query(expr)}

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


def prometheus_config(shipped: Path, targets: list[str], self_port: int) -> dict:
    """The shipped configuration with its fleetstream targets swapped for the test's workers, rule files made
    absolute and every interval 1 s. Jobs and rule files stay as shipped."""
    config = yaml.safe_load(shipped.read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str((shipped.parent / pattern).resolve()) for pattern in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert "fleetstream" in jobs, "the dashboard and rules expect a job called fleetstream"
    for job in jobs.values():
        job["scrape_interval"] = "1s"
    jobs["fleetstream"]["static_configs"] = [{"targets": targets}]
    if "prometheus" in jobs:
        jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{self_port}"]}]
    return config


def square(fence_id: str, lat: float, lon: float, d: float) -> dict:
    return {"type": "Feature", "id": fence_id, "properties": {},
            "geometry": shapely.geometry.mapping(shapely.box(lon - d, lat - d, lon + d, lat + d))}


def traffic(start_ms: int) -> tuple[list[tuple[bytes, bytes]], dict[str, int]]:
    """Keyed messages with known outcomes, and the counts they must give.

    Every device goes outside -> A -> outside -> B -> outside (two enters, two exits), 3 minutes between fixes
    (3.3-4 km hops: 65-80 km/h, plausible for the worker's speed filter); even devices upload their five fixes as
    one array message, odd ones one message per fix. Three duplicate fixes are filtered; three malformed messages
    and two wrongly keyed fixes are dead-lettered."""
    spots = [(LAT, LON + 0.05), (LAT, LON), (LAT, LON + 0.05), (LAT + 0.02, LON + 0.1), (LAT, LON + 0.05)]
    messages: list[tuple[bytes, bytes]] = []
    for i in range(DEVICES):
        device = f"veh-{i:02d}"
        fixes = [{"device_id": device, "ts": format_ts(start_ms + k * FIX_INTERVAL_MS), "lat": lat, "lon": lon}
                 for k, (lat, lon) in enumerate(spots)]
        if i % 2 == 0:
            messages.append((device.encode(), orjson.dumps(fixes)))
        else:
            messages += [(device.encode(), orjson.dumps(fix)) for fix in fixes]
        if i < 3:  # a duplicate of the last fix: same device, same time
            messages.append((device.encode(), orjson.dumps(fixes[-1])))
    messages += [(b"veh-00", b"{not json")] * 3
    wrong_key = {"device_id": "veh-01", "ts": format_ts(start_ms), "lat": LAT, "lon": LON}
    messages += [(b"someone-else", orjson.dumps(wrong_key))] * 2
    good = DEVICES * len(spots) + 3
    expected = {"messages": len(messages), "records": good + 5, "enriched": good, "enter": 2 * DEVICES,
                "exit": 2 * DEVICES, "duplicate": 3, "malformed_json": 3, "key_mismatch": 2}
    return messages, expected


@pytest.fixture
def prometheus_binary() -> str:
    found = shutil.which("prometheus")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed: .ci/run installs the Debian package 'prometheus'")
        pytest.skip("prometheus not installed (apt-get install prometheus)")
    return found


@pytest.fixture
def two_workers(broker, prefix: str, tmp_path: Path) -> Iterator[list[WorkerProcess]]:
    """Two real workers in one group, with two geofences (zone-A around the origin, zone-B to the north-east)
    and an overspeed rule for veh-00 (its hops between the spots take it to 65-80 km/h)."""
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    first = worker_settings(broker.url, prefix, tmp_path, partitions=4, rules_file=str(rules))
    second = first.with_overrides(web_port=(port := free_port()), advertised_url=f"http://127.0.0.1:{port}",
                                  data_dir=str(tmp_path / "second-data"))
    fences = tmp_path / "fences.geojson"
    fences.write_bytes(orjson.dumps({"type": "FeatureCollection", "features": [
        square("zone-A", LAT, LON, 0.01), square("zone-B", LAT + 0.02, LON + 0.1, 0.01)]}))
    loaded = subprocess.run([sys.executable, "-m", "fleetstream", "geofences", "load", str(fences)],
                            env={**os.environ, **settings_env(first)}, capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    workers = [WorkerProcess(first, tmp_path / "worker-1.log"), WorkerProcess(second, tmp_path / "worker-2.log")]
    try:
        for worker in workers:
            worker.start()
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def wait_until(check: Callable[[], object], timeout_s: float, interval_s: float = 0.5) -> object:
    """Poll ``check`` until it returns something truthy or time runs out; return its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)


@pytest.mark.timeout(180)
def test_prometheus_scrapes_what_the_workers_did(broker, two_workers, prometheus_binary: str, tmp_path: Path):
    settings = two_workers[0].settings
    targets = [f"127.0.0.1:{w.settings.web_port}" for w in two_workers]
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    server = Prometheus(prometheus_binary, workdir)
    server.start(prometheus_config(PROMETHEUS_CONFIG, targets, server.port))
    try:
        # both targets are scraped and healthy before any traffic, so the counters' first values are zeros
        assert wait_until(lambda: server.scalar('sum(up{job="fleetstream"})') == 2, 30), server.log_tail()
        messages, expected = traffic(int(time.time() * 1000) - 5 * FIX_INTERVAL_MS)  # 15 to 3 minutes old
        asyncio.run(produce(broker.bootstrap, settings.positions_topic, messages))
        asyncio.run(wait_for_count(broker.bootstrap, settings.enriched_topic, expected["enriched"], timeout_s=60))
        asyncio.run(wait_for_count(broker.bootstrap, settings.geofence_events_topic,
                                   expected["enter"] + expected["exit"], timeout_s=30))
        records = "sum(fleetstream_input_records_total)"
        seen = wait_until(lambda: server.scalar(records) == expected["records"], 30)
        assert seen, (server.scalar(records), expected, two_workers[0].log_tail())
        time.sleep(2)  # a couple more scrapes: nothing may arrive twice

        # throughput and transitions, as Prometheus holds them, equal what was produced
        assert server.scalar(records) == expected["records"]
        # (the workers also consume their own cell partials: counted under that topic)
        assert server.scalar(f'sum(fleetstream_input_messages_total{{topic="{settings.positions_topic}"}})') == \
            expected["messages"]
        transitions = server.by_label("sum by (type) (fleetstream_geofence_transitions_total)", "type")
        assert transitions == {"enter": expected["enter"], "exit": expected["exit"], "dwell": 0, "cross": 0}
        dead = server.by_label("sum by (reason) (fleetstream_deadlettered_records_total) > 0", "reason")
        assert dead == {"malformed_json": expected["malformed_json"], "key_mismatch": expected["key_mismatch"]}
        filtered = server.by_label("sum by (reason) (fleetstream_filtered_records_total)", "reason")
        assert filtered["duplicate"] == expected["duplicate"]
        out = server.by_label("sum by (topic) (fleetstream_output_records_total)", "topic")
        assert out[settings.enriched_topic] == expected["enriched"]
        assert out[settings.geofence_events_topic] == expected["enter"] + expected["exit"]
        assert out[settings.deadletter_topic] == expected["malformed_json"] + expected["key_mismatch"]
        assert server.scalar("max(fleetstream_geofences_loaded)") == 2
        assert server.scalar(f'sum(fleetstream_assigned_partitions{{topic="{settings.positions_topic}"}})') == 4

        # fixes were 3-15 minutes old when produced (median 9): the event-time lag median lands in the 300-600 s
        # bucket; processing latency (Kafka timestamp to acknowledged output) is well under a minute here
        lag_p50 = server.scalar("histogram_quantile(0.5, sum by (le) (fleetstream_event_lag_seconds_bucket))")
        assert lag_p50 is not None and 300 <= lag_p50 <= 600, lag_p50
        latency_p50 = server.scalar(
            "histogram_quantile(0.5, sum by (le) (fleetstream_processing_latency_seconds_bucket))")
        assert latency_p50 is not None and latency_p50 < 60, f"processing latency p50 {latency_p50} s"

        alerts_raised = server.by_label('sum by (rule) (fleetstream_alerts_total{state="raised"})', "rule")
        assert alerts_raised.get("e2e-overspeed", 0) >= 1, alerts_raised

        # every query of the dashboard runs and returns series (a trailing "> 0", which hides idle series,
        # is left out: whether an increase is still inside the rate window is a matter of timing)
        empty = [q for q in dashboard_queries()
                 if not server.query(re.sub(r"\s*>\s*0\s*$", "", grafana_to_promql(q, "5m")))]
        assert not empty, empty
        # every metric the dashboard names is one the workers export, as Prometheus saw it in their scrapes
        exported = exported_sample_names()
        metadata = server.api("metadata")
        assert isinstance(metadata, dict)
        for name in sorted(set().union(*(metric_names(q) for q in dashboard_queries())) - PROMETHEUS_BUILTIN):
            family, _ = exported[name]
            assert family in metadata, f"{name}: not in what Prometheus scraped ({family})"

        # bounded labels: no series names a device or a geofence
        series = server.api("series", **{"match[]": '{__name__=~"fleetstream_.+"}'})
        assert isinstance(series, list) and len(series) > 50
        label_values = {value for labels in series for name, value in labels.items() if name != "__name__"}
        assert not {v for v in label_values if v.startswith(("veh-", "zone-", "someone"))}, label_values

        # the shipped rules loaded and evaluate without errors against real series
        def rules() -> dict[str, dict]:
            data = server.api("rules")
            assert isinstance(data, dict)
            return {r["name"]: r for group in data["groups"] for r in group["rules"]}

        assert {"FleetstreamWorkerDown", "FleetstreamNoWorkers", "FleetstreamConsumerLagGrowing",
                "FleetstreamDeadLetterRateHigh", "FleetstreamEventLagHigh", "FleetstreamNoInput"} <= set(rules())
        wait_until(lambda: all(r["health"] == "ok" for r in rules().values()), 10)
        unhealthy = {name: r.get("lastError") for name, r in rules().items() if r["health"] != "ok"}
        assert not unhealthy, unhealthy
        # rate() sees the first records only if the series existed (at 0) before them: the worker creates
        # its per-topic series at start (Metrics.prime_inputs / prime_outputs)
        assert server.scalar("fleetstream:input_records:rate5m") > 0, "per-topic series were not primed at 0"
        alerts = server.api("alerts")
        assert isinstance(alerts, dict)
        firing = {a["labels"]["alertname"] for a in alerts["alerts"]}
        assert not firing & {"FleetstreamWorkerDown", "FleetstreamNoWorkers", "FleetstreamNoInput"}, firing
    finally:
        server.stop()
