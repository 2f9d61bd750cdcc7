"""What the deploy/ files say, read the way Prometheus and Grafana read them: shared by the unit checks of the
files (tests/unit/test_deploy.py) and the end-to-end test against a real Prometheus (tests/e2e)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from fleetstream.observability.metrics import BulkHistogram, Metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "fleetstream.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
RULES_DIR = DEPLOY / "prometheus" / "rules"

# metrics Prometheus makes itself for every target (not exported by the worker)
PROMETHEUS_BUILTIN = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
_NAME = re.compile(r"(?<![\w:$\"'])([a-zA-Z_:][\w:]*)")
_PROMQL_WORDS = frozenset({
    "sum", "min", "max", "avg", "count", "by", "without", "rate", "irate", "increase", "deriv", "delta",
    "histogram_quantile", "time", "absent", "and", "or", "unless", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "topk", "bottomk", "label_values", "abs", "clamp_min", "clamp_max", "vector", "scalar",
    "inf", "nan",
})


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(board: dict | None = None) -> Iterator[dict]:
    """Every panel, rows' nested panels included."""
    for panel in (board or dashboard())["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(board: dict | None = None) -> list[str]:
    """The PromQL of every panel target and of every query variable."""
    board = board or dashboard()
    queries = [t["expr"] for p in dashboard_panels(board) for t in p.get("targets", []) if t.get("expr")]
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            queries.append(query["query"] if isinstance(query, dict) else query)
    return queries


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: identifiers that are not functions, keywords, label names in
    ``by (...)``/``{...}``, label values, durations or Grafana variables."""
    stripped = re.sub(r"label_values\((.*),\s*\w+\s*\)", r"label_values(\1)", expr)  # Grafana: drop the label
    stripped = re.sub(r"\{[^}]*\}", "{}", stripped)  # label matchers
    stripped = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", stripped)  # grouping label lists
    stripped = re.sub(r"\[[^\]]*\]", "[]", stripped)  # range selectors
    stripped = re.sub(r'"[^"]*"', '""', stripped)
    names = set()
    for match in _NAME.finditer(stripped):
        name = match.group(1)
        rest = stripped[match.end():].lstrip()
        if name in _PROMQL_WORDS or rest.startswith("("):
            continue
        names.add(name)
    return names


def exported_sample_names(registry: CollectorRegistry | None = None) -> dict[str, tuple[str, str]]:
    """Sample name -> (family name, type) for everything :class:`Metrics` registers, as the text format
    writes it: a Counter ``x`` is ``x_total``, a histogram ``x`` is ``x_bucket``/``x_sum``/``x_count``."""
    registry = registry or Metrics(CollectorRegistry()).registry
    out: dict[str, tuple[str, str]] = {}
    for family in registry.collect():
        if family.type == "counter":
            out[family.name + "_total"] = (family.name + "_total", "counter")
        elif family.type == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                out[family.name + suffix] = (family.name, "histogram")
        else:
            out[family.name] = (family.name, family.type)
    return out


def exported_labels(metrics: Metrics | None = None) -> dict[str, set[str]]:
    """Family name (as in :func:`exported_sample_names`) -> the label names its samples carry (``le`` too for
    histograms), from the metric objects :class:`Metrics` holds."""
    metrics = metrics or Metrics(CollectorRegistry())
    out: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            kind = value._type
            family = value._name + ("_total" if kind == "counter" else "")
            out[family] = set(value._labelnames) | ({"le"} if kind == "histogram" else set())
        elif isinstance(value, BulkHistogram):
            out[value.name] = {"le"}
    return out


def grafana_to_promql(expr: str, rate_window: str = "1m") -> str:
    """A dashboard query as Grafana sends it to Prometheus with every worker selected (a variable's
    ``label_values(selector, label)`` becomes a query of the selector)."""
    expr = re.sub(r"^label_values\((.*),\s*\w+\s*\)$", r"\1", expr.strip())
    return expr.replace("$__rate_interval", rate_window).replace("$instance", ".*")
