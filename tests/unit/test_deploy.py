"""The deployment files hold together: docker-compose.yml, the Dockerfile, the Kubernetes base, the Prometheus
rules and the Grafana provisioning and dashboard.

No Docker engine or cluster is available, so the files are checked the way their tools would read them:
the compose file against the Compose specification (the compose_spec parser), the Kubernetes manifests against
the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields are errors) and through
``kubectl kustomize`` when kubectl is installed; every command they run is parsed by the real CLI parser,
every FLEETSTREAM_* variable by the real Settings, the topic-creation script is run with a stand-in
kafka-topics.sh, and every metric the dashboard or the rules name is one the code exports."""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from compose_spec import PyCompose

from fleetstream.cli import build_parser
from fleetstream.config import ENV_PREFIX, Settings, setting_fields
from fleetstream.domain.geofences import load_geofences
from fleetstream.streaming.topics import topic_specs
from tests.deploy_support import (
    DASHBOARD,
    DEPLOY,
    PROMETHEUS_BUILTIN,
    PROMETHEUS_CONFIG,
    REPO_ROOT,
    RULES_DIR,
    dashboard,
    dashboard_panels,
    dashboard_queries,
    exported_labels,
    exported_sample_names,
    metric_names,
)

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.31"
SETTING_NAMES = {name for name, *_ in setting_fields()}
DASHBOARD_URL = "http://localhost:3000/d/fleetstream/fleetstream"


# --- helpers ---------------------------------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    """The compose file with YAML merge keys resolved, as Compose sees it, after the spec's own parser."""
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    PyCompose.from_json(json.dumps(data)).validate()
    return data


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """(instruction, arguments) per build stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((instruction.upper(), args.strip()))
    return stages


def image_env() -> dict[str, str]:
    """The ENV of the Dockerfile's final stage."""
    env: dict[str, str] = {}
    for instruction, args in dockerfile_stages()[-1]:
        if instruction == "ENV":
            for part in shlex.split(args):
                key, _, value = part.partition("=")
                env[key] = value
    return env


def exec_form(instruction: str) -> list[str]:
    values = [json.loads(args) for name, args in dockerfile_stages()[-1] if name == instruction]
    assert len(values) == 1, f"one exec-form {instruction} in the final stage"
    return values[0]


def parses_in_cli(argv: list[str]) -> Any:
    """The real argument parser accepts this command line (argparse exits on an unknown command or flag)."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"fleetstream {' '.join(argv)}: refused by the CLI ({exc})") from None


def settings_from_env(env: dict[str, str]) -> Settings:
    for key in env:
        if key.startswith(ENV_PREFIX):
            assert key.removeprefix(ENV_PREFIX).lower() in SETTING_NAMES, f"{key} is not a setting"
    return Settings.load(env={k: str(v) for k, v in env.items()})


def k8s_documents() -> dict[str, dict[str, Any]]:
    """Every manifest the base lists, by file name."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out = {}
    for name in kustomization["resources"]:
        documents = list(yaml.safe_load_all((K8S / name).read_text()))
        assert len(documents) == 1, name
        out[name] = documents[0]
    return out


def by_kind(documents: dict[str, dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in documents.values() if d["kind"] == kind]


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- docker compose --------------------------------------------------------------------------------------------

def test_compose_file_follows_the_compose_specification():
    services = compose()["services"]
    assert set(services) == {"kafka", "kafka-init", "geofences", "worker-1", "worker-2", "simulator", "prometheus",
                             "grafana"}
    broken = yaml.safe_load(COMPOSE_FILE.read_text())
    broken["services"]["worker-1"]["healthchek"] = broken["services"]["worker-1"].pop("healthcheck")
    with pytest.raises(ValueError, match="healthchek"):  # the parser is strict: a typo does not pass
        PyCompose.from_json(json.dumps(broken))


def test_compose_runs_official_images_with_pinned_versions():
    services = compose()["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["prometheus"]["image"].startswith("prom/prometheus:v")
    assert services["grafana"]["image"].startswith("grafana/grafana:")
    for name, service in services.items():
        tag = service["image"].rpartition(":")[2]
        if service["image"].startswith("fleetstream:"):
            assert service["build"] == ".", name  # built from this repository's Dockerfile
        else:
            assert re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin a version, not {tag!r}"


def test_kafka_runs_in_kraft_mode():
    kafka = compose()["services"]["kafka"]
    env = {k: str(v) for k, v in kafka["environment"].items()}
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not any("ZOOKEEPER" in key for key in env)
    node = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"] == f"{node}@kafka:9093"
    listeners = dict(part.split("://") for part in env["KAFKA_LISTENERS"].split(","))
    protocols = dict(part.split(":") for part in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    assert set(listeners) == set(protocols) and env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    advertised = dict(part.split("://") for part in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert advertised["PLAINTEXT"] == "kafka:9092"  # what the other containers use
    assert f"{advertised['HOST'].rpartition(':')[2]}:{listeners['HOST'].rpartition(':')[2]}" in kafka["ports"]
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16  # a Kafka Uuid
    assert env["KAFKA_LOG_DIRS"] in [v.split(":")[1] for v in kafka["volumes"]]


def test_compose_ports_volumes_and_healthchecks():
    data = compose()
    services = data["services"]
    published = [p.split(":")[0] for s in services.values() for p in s.get("ports", [])]
    assert len(published) == len(set(published)), published
    assert "3000:3000" in services["grafana"]["ports"] and "9090:9090" in services["prometheus"]["ports"]
    assert {"6066:6066", "6067:6066"} == {p for w in ("worker-1", "worker-2") for p in services[w]["ports"]}

    declared = set(data["volumes"])
    used = set()
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (REPO_ROOT / source).exists(), f"{name}: {source} does not exist"
            else:
                used.add(source)
    assert used == declared, "every named volume is declared, every declared one is used"

    data_dir = image_env()["FLEETSTREAM_DATA_DIR"]
    for worker in ("worker-1", "worker-2"):
        assert f"{worker}-data:{data_dir}" in services[worker]["volumes"]  # RocksDB tables survive restarts

    long_running = {"kafka", "worker-1", "worker-2", "prometheus", "grafana"}
    for name in long_running:
        assert services[name]["healthcheck"]["test"], name
    web_port = settings_from_env(services["worker-1"]["environment"]).web_port
    assert f"127.0.0.1:{web_port}/ready" in " ".join(services["worker-1"]["healthcheck"]["test"])
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, (name, dependency)
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
            if condition["condition"] == "service_completed_successfully":
                assert services[dependency]["restart"] == "no", (name, dependency)


def test_compose_commands_exist_in_the_cli_and_settings_parse():
    services = compose()["services"]
    entrypoint = exec_form("ENTRYPOINT")
    assert entrypoint == ["fleetstream"]
    ours = {name: s for name, s in services.items() if s["image"].startswith("fleetstream:")}
    assert set(ours) == {"geofences", "worker-1", "worker-2", "simulator"}
    commands = {}
    for name, service in ours.items():
        args = parses_in_cli(service.get("command", exec_form("CMD")))
        commands[name] = args.command
        settings = settings_from_env({**image_env(), **service.get("environment", {})})
        assert settings.broker == "kafka://kafka:9092"
    assert commands == {"geofences": "geofences", "worker-1": "worker", "worker-2": "worker", "simulator": "simulate"}
    worker_settings = [settings_from_env({**image_env(), **services[w]["environment"]})
                       for w in ("worker-1", "worker-2")]
    assert worker_settings[0].app_id == worker_settings[1].app_id  # one consumer group
    assert {s.advertised_url for s in worker_settings} == {"http://worker-1:6066", "http://worker-2:6066"}
    mount = services["geofences"]["volumes"][0].split(":")
    assert services["geofences"]["command"][-1] == mount[1]
    assert len(load_geofences(str(REPO_ROOT / mount[0]), max_vertices=10_000)) >= 3


def test_compose_creates_the_topics_the_workers_use(tmp_path: Path):
    """Run the kafka-init script (after Compose's $$ unescaping) with a stand-in kafka-topics.sh that records
    its arguments, and compare with the topics, partition counts and compaction the workers expect."""
    services = compose()["services"]
    init = services["kafka-init"]
    script = init["command"][0]
    assert not re.search(r"(?<!\$)\$(?!\$)", script), "a single $ would be interpolated by Compose"
    script = script.replace("$$", "$")
    calls = tmp_path / "calls"
    stub = tmp_path / "kafka-topics.sh"
    stub.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    stub.chmod(0o755)
    bash = shutil.which("bash")
    assert bash
    done = subprocess.run([bash, "-ec", script.replace("/opt/kafka/bin/kafka-topics.sh", str(stub))],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    created = {}
    for line in calls.read_text().splitlines():
        args = line.split()
        if "--create" not in args:
            continue
        option = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("--")}
        created[option["--topic"]] = (int(option["--partitions"]), option["--config"] == "cleanup.policy=compact")
        assert option["--bootstrap-server"] == "kafka:9092" and "--if-not-exists" in args
    settings = settings_from_env({**image_env(), **services["worker-1"]["environment"]})
    assert created == {spec.name: (spec.partitions, spec.compacted) for spec in topic_specs(settings)}


def test_compose_prometheus_and_grafana_provisioning():
    services = compose()["services"]
    prometheus = services["prometheus"]
    mounts = {target: source for source, target in (v.split(":")[:2] for v in prometheus["volumes"])}
    assert (REPO_ROOT / mounts["/etc/prometheus"]).resolve() == PROMETHEUS_CONFIG.parent
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {t for group in jobs["fleetstream"]["static_configs"] for t in group["targets"]}
    assert targets == {f"{w}:{image_env()['FLEETSTREAM_WEB_PORT']}" for w in ("worker-1", "worker-2")}
    assert jobs["fleetstream"].get("metrics_path", "/metrics") == "/metrics"

    grafana = services["grafana"]
    grafana_mounts = {target: source for source, target in (v.split(":")[:2] for v in grafana["volumes"])}
    provisioning = REPO_ROOT / grafana_mounts["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasources[0]["url"] == "http://prometheus:9090" and datasources[0]["type"] == "prometheus"
    providers = yaml.safe_load((provisioning / "dashboards" / "fleetstream.yml").read_text())["providers"]
    dashboards_dir = providers[0]["options"]["path"]
    assert (REPO_ROOT / grafana_mounts[dashboards_dir]).resolve() == DASHBOARD.parent
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{dashboards_dir}/{DASHBOARD.name}"
    uids = {ref["uid"] for panel in dashboard_panels() for ref in [panel.get("datasource")] if ref}
    uids |= {t["datasource"]["uid"] for panel in dashboard_panels() for t in panel.get("targets", [])}
    assert uids == {datasources[0]["uid"]}


def test_dashboard_url_is_documented():
    board = dashboard()
    assert f"http://localhost:3000/d/{board['uid']}/{board['title']}" == DASHBOARD_URL
    assert DASHBOARD_URL in COMPOSE_FILE.read_text()
    assert DASHBOARD_URL in (REPO_ROOT / "docs" / "OPERATIONS.md").read_text()


# --- Dockerfile ----------------------------------------------------------------------------------------------------

def test_dockerfile_is_multi_stage_non_root_with_runtime_dependencies_only():
    stages = dockerfile_stages()
    assert len(stages) >= 2
    build, final = stages[0], stages[-1]
    assert re.search(r"\bAS build\b", build[0][1])
    installs = [args for name, args in build if name == "RUN" and "pip install" in args]
    assert any('".[rocksdb]"' in args for args in installs), installs
    assert not any(re.search(r"\[.*\b(dev|bench|embedded)\b", args) for args in installs)
    users = [args for name, args in final if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert all("--from=build" in args for name, args in final if name in ("COPY", "ADD"))  # no sources in runtime
    assert exec_form("ENTRYPOINT") == ["fleetstream"]
    parses_in_cli(exec_form("CMD"))
    exposed = [args for name, args in final if name == "EXPOSE"]
    assert exposed == [str(Settings.load(env=image_env()).web_port)]
    assert any(name == "HEALTHCHECK" and "/health" in args for name, args in final)


def test_docker_build_context_keeps_what_the_build_copies():
    ignored = [line.strip() for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for must_ignore in (".git", "tests", ".venv*", "state", ".hypothesis"):
        assert must_ignore in ignored
    for name, args in dockerfile_stages()[0]:
        if name == "COPY":
            for source in args.split()[:-1]:
                assert (REPO_ROOT / source).exists(), source
                assert source not in ignored


# --- Kubernetes ----------------------------------------------------------------------------------------------------

def test_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == present


def test_manifests_validate_against_the_kubernetes_schemas():
    documents = k8s_documents()
    assert {d["kind"] for d in documents.values()} >= {"StatefulSet", "Service", "ConfigMap", "Secret"}
    for document in documents.values():
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
    statefulset = copy.deepcopy(by_kind(documents, "StatefulSet")[0])
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    probe = container["readinessProbe"]["httpGet"]
    probe["paht"] = probe.pop("path")
    with pytest.raises(kubernetes_validate.ValidationError):  # strict: a misspelled field is refused
        kubernetes_validate.validate(statefulset, KUBERNETES_VERSION, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders_the_base_and_the_servicemonitor_component(tmp_path: Path):
    rendered = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    documents = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        assert document["metadata"]["labels"]["app.kubernetes.io/part-of"] == "fleetstream"
    containers = [c for d in documents if d["kind"] == "StatefulSet"
                  for c in d["spec"]["template"]["spec"]["containers"]]
    assert [c["image"] for c in containers] == ["fleetstream:latest"]

    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(K8S, overlay)
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [base], "components": [f"{base}/servicemonitor"]}))
    rendered = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(rendered.stdout) if d]
    assert kinds.count("ServiceMonitor") == 1 and len(kinds) == len(documents) + 1


def test_statefulset_services_probes_storage_and_configuration():
    documents = k8s_documents()
    statefulset = by_kind(documents, "StatefulSet")[0]
    spec = statefulset["spec"]
    pod = spec["template"]
    pod_labels = pod["metadata"]["labels"]
    assert matches(spec["selector"]["matchLabels"], pod_labels)
    services = {s["metadata"]["name"]: s for s in by_kind(documents, "Service")}
    headless = services[spec["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"  # per-pod DNS for table routing
    assert all(matches(s["spec"]["selector"], pod_labels) for s in services.values())
    assert len(services) == 2  # headless + the API

    container = pod["spec"]["containers"][0]
    parses_in_cli(container["args"])
    assert container["args"][0] == "worker"
    config = by_kind(documents, "ConfigMap")[0]
    secret = by_kind(documents, "Secret")[0]
    assert [ref["configMapRef"]["name"] for ref in container["envFrom"] if "configMapRef" in ref] == [
        config["metadata"]["name"]]
    assert [ref["secretRef"]["name"] for ref in container["envFrom"] if "secretRef" in ref] == [
        secret["metadata"]["name"]]
    assert set(secret["stringData"]) == {"FLEETSTREAM_SASL_USERNAME", "FLEETSTREAM_SASL_PASSWORD"}
    assert not any("SASL_PASSWORD" in key or "SASL_USERNAME" in key for key in config["data"])

    # $(VAR) references only to variables defined before them (Kubernetes expands nothing else)
    env: dict[str, str] = {}
    for variable in container["env"]:
        value = variable.get("value", f"<{variable['name']}>")
        for ref in re.findall(r"\$\((\w+)\)", value):
            assert ref in env, f"{variable['name']} uses $({ref}) before it is defined"
            value = value.replace(f"$({ref})", env[ref])
        env[variable["name"]] = value
    assert env["FLEETSTREAM_ADVERTISED_URL"].startswith(f"http://<POD_NAME>.{headless['metadata']['name']}.")
    settings = settings_from_env({**config["data"], **secret["stringData"], **env})
    assert env["FLEETSTREAM_ADVERTISED_URL"].endswith(f":{settings.web_port}")

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["web"] == settings.web_port
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "web"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "web"}
    assert container["startupProbe"]["httpGet"]["path"] == "/health"
    for service in services.values():
        assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(settings.web_port, "web")]
    requests = container["resources"]["requests"]
    assert requests["cpu"] and requests["memory"]

    claims = {c["metadata"]["name"] for c in spec["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts.keys() == claims and settings.data_dir in mounts.values()  # RocksDB on the persistent volume
    assert settings.table_store == "rocksdb"

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(settings.web_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    security = pod["spec"]["securityContext"]
    image_user = [args for name, args in dockerfile_stages()[-1] if name == "USER"][-1].split(":")[0]
    assert security["runAsNonRoot"] is True and str(security["runAsUser"]) == image_user
    assert spec["replicas"] <= settings.partitions


def test_servicemonitor_scrapes_each_worker_once_as_job_fleetstream():
    documents = k8s_documents()
    component = yaml.safe_load((K8S / "servicemonitor" / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    monitor = yaml.safe_load((K8S / "servicemonitor" / component["resources"][0]).read_text())
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "ServiceMonitor"
    selected = [s for s in by_kind(documents, "Service")
                if matches(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert len(selected) == 1 and selected[0]["spec"]["clusterIP"] == "None"  # headless: not-ready pods too
    port_names = {p["name"] for p in selected[0]["spec"]["ports"]}
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("web", "/metrics")]
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    assert selected[0]["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "fleetstream"


# --- dashboard and rules against the exported metrics -------------------------------------------------------------

def _labels_in(expr: str) -> set[str]:
    names = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        names |= {n.strip() for n in group.split(",") if n.strip()}
    for matcher in re.findall(r"\{([^}]*)\}", expr):
        names |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matcher))
    return names


def _check_queries(queries: list[str], also_known: set[str] = frozenset()) -> None:
    exported = exported_sample_names()
    labels = exported_labels()
    for query in queries:
        names = metric_names(query)
        assert names, query
        for name in names - PROMETHEUS_BUILTIN - also_known:
            assert name in exported, f"{name} (in {query!r}) is not exported by fleetstream"
        allowed = {"instance", "job"} | {label for n in names if n in exported for label in labels[exported[n][0]]}
        unknown = _labels_in(query) - allowed
        assert not unknown, f"{query!r} uses labels {unknown} its metrics do not have"


def test_dashboard_queries_use_exported_metrics_and_labels():
    queries = dashboard_queries()
    assert len(queries) >= 30
    _check_queries(queries)
    used = set().union(*(metric_names(q) for q in queries))
    for required in ("fleetstream_input_records_total", "fleetstream_output_records_total",
                     "fleetstream_deadlettered_records_total", "fleetstream_consumer_lag_records",
                     "fleetstream_event_lag_seconds_bucket", "fleetstream_processing_latency_seconds_bucket",
                     "fleetstream_geofence_transitions_total", "fleetstream_alerts_total",
                     "fleetstream_active_alerts", "fleetstream_devices_tracked"):
        assert required in used, required


def test_query_checks_catch_a_wrong_name_or_label():
    with pytest.raises(AssertionError, match="not exported"):
        _check_queries(["sum(rate(fleetstream_input_records[5m]))"])  # a Counter is exported as _total
    with pytest.raises(AssertionError, match="labels"):
        _check_queries(["sum by (device_id) (rate(fleetstream_input_records_total[5m]))"])


def test_dashboard_layout():
    panels = list(dashboard_panels())
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
    titles = {p["title"] for p in panels if p["type"] == "row"}
    assert {"Throughput", "Lag and latency", "Per worker"} <= titles
    per_worker = False
    for panel in panels:
        for target in panel.get("targets", []):
            per_worker |= '$instance' in target["expr"]
    assert per_worker


def test_rules_use_exported_metrics_and_labels():
    recorded, queries = set(), []
    for path in RULES_DIR.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                queries.append(rule["expr"])
                if "record" in rule:
                    recorded.add(rule["record"])
    _check_queries([q for q in queries if not metric_names(q) & recorded])
    for query in queries:  # queries over recorded series name only recorded or exported ones
        exported = exported_sample_names()
        assert metric_names(query) <= recorded | set(exported) | PROMETHEUS_BUILTIN, query
