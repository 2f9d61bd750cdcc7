"""The HTTP query API over the worker's state, served by every worker on Faust's web server (aiohttp).

Per-device state lives on the worker that owns the device's partition. Requests for one key are routed to the
owner with Faust's table routing (the owner's ``canonical_url``, from the group's assignment); requests over
many keys (lists, ``/nearby``) are gathered: the worker asked sends the same request with ``scope=local`` to
every worker of the group and merges, so the answer is the same whichever worker is asked.

Errors are JSON ``{"error": code, "detail": text}``: 400 for bad parameters (naming the parameter), 401 without
the bearer token when ``api_token`` is set, 404 for unknown ids, 503 while the group's assignment is unknown.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any

import faust
import h3
from faust.web.exceptions import ServiceUnavailable

from fleetstream.codecs import DecodeError, format_ts, parse_ts
from fleetstream.config import Settings
from fleetstream.domain.aggregation import (
    CellStats,
    DistanceWindow,
    GeofenceStats,
    cells_geojson,
    merge_geofence_stats,
)
from fleetstream.domain.geofences import geofence_to_feature
from fleetstream.domain.models import DeviceState
from fleetstream.domain.signals import DeviceSignals, active_alerts
from fleetstream.streaming.aggregates import Aggregation, merge_windows_of

if TYPE_CHECKING:
    from fleetstream.streaming.app import PositionWorker

log = logging.getLogger("fleetstream.api")

MAX_LIMIT = 1000
SEVERITIES = ("critical", "major", "minor", "warning", "info")
DEFAULT_LIMIT = 100
MAX_NEARBY_RADIUS_M = 500_000.0
MAX_CELLS = 10_000  # cells per /cells page
MAX_WINDOWS = 60  # windows of statistics per geofence or fleet answer, newest first
OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi.yaml"

Handler = Callable[..., Awaitable[Any]]


class BadRequest(Exception):
    """A request parameter the API cannot use; the message names it."""


class Missing(Exception):
    """What was asked for does not exist here (404); the message says what."""


def device_view(state: DeviceState) -> dict[str, Any]:
    """The public JSON of a device's latest state (``GET /devices/{id}``)."""
    return {
        "device_id": state.device_id,
        "ts": format_ts(state.ts_ms),
        "lat": state.lat,
        "lon": state.lon,
        "h3": state.h3,
        "geofences": list(state.geofences),
        "speed_kmh": state.speed_kmh,
        "heading_deg": state.heading_deg,
        "motion": str(state.motion),
        "odometer_m": state.odometer_m,
        "fixes": state.fixes,
        "trip": trip_view(state),
    }


def trip_view(state: DeviceState) -> dict[str, Any] | None:
    """The open trip while the device moves: where and when it started, distance and top speed so far."""
    trip = state.trip
    if trip is None:
        return None
    return {"start": format_ts(trip.start_ms), "start_lat": trip.lat, "start_lon": trip.lon,
            "start_geofences": list(trip.geofences), "distance_m": round(state.odometer_m - trip.odometer_m, 1),
            "duration_s": round((state.ts_ms - trip.start_ms) / 1000, 3), "max_speed_kmh": trip.max_speed_kmh}


def signals_view(signals: DeviceSignals | None, rules: Any) -> dict[str, Any]:
    """Latest telemetry and active alerts of a device (part of ``GET /devices/{id}``)."""
    if signals is None:
        return {"telemetry": None, "telemetry_ts": None, "active_alerts": []}
    return {
        "telemetry": dict(signals.telemetry) if signals.telemetry is not None else None,
        "telemetry_ts": format_ts(signals.telemetry_ts_ms) if signals.telemetry_ts_ms is not None else None,
        "active_alerts": [alert_view(rule_id, alert_id, raised_ms, signals.device_id, rules)
                          for rule_id, alert_id, raised_ms in active_alerts(signals.alerts, signals.device_id)],
    }


def alert_view(rule_id: str, alert_id: str, raised_ms: int, subject_id: str, rules: Any) -> dict[str, Any]:
    """An active vehicle alert, its severity from the rule set."""
    rule = rules.get(rule_id) if rules is not None else None
    return raised_alert(rule_id, alert_id, raised_ms, subject_id, str(rule.severity) if rule is not None else None)


def raised_alert(rule_id: str, alert_id: str, raised_ms: int, subject_id: str, severity: str | None
                 ) -> dict[str, Any]:
    """The JSON of an active alert (``GET /alerts``, ``active_alerts`` of a device), vehicle or RFID asset."""
    return {"alert_id": alert_id, "rule": rule_id, "severity": severity, "state": "raised",
            "subject_id": subject_id, "ts": format_ts(raised_ms)}


def _int_param(query: Any, name: str, default: int, low: int, high: int) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name}: expected an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise BadRequest(f"{name}: {value} is outside {low}..{high}")
    return value


def _float_param(query: Any, name: str, low: float, high: float, default: float | None = None) -> float:
    raw = query.get(name)
    if raw is None:
        if default is None:
            raise BadRequest(f"{name}: required")
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest(f"{name}: expected a number, got {raw!r}") from None
    if not low <= value <= high:  # also refuses NaN
        raise BadRequest(f"{name}: {value} is outside {low}..{high}")
    return value


def filter_devices(
    states: Iterable[DeviceState], *, geofence: str | None, cell: str | None, after: str | None, limit: int
) -> list[DeviceState]:
    """Devices matching the filters, sorted by id, starting after the ``after`` cursor, at most ``limit``."""
    if cell is not None:
        res = h3.get_resolution(cell)
    out = []
    for state in states:
        if after is not None and state.device_id <= after:
            continue
        if geofence is not None and geofence not in state.geofences:
            continue
        if cell is not None and (
            state.h3 is None or h3.get_resolution(state.h3) < res or h3.cell_to_parent(state.h3, res) != cell
        ):
            continue
        out.append(state)
    out.sort(key=lambda s: s.device_id)
    return out[:limit]


def _window_param(query: Any) -> int | None:
    """``window``: a window's start as RFC 3339 or epoch milliseconds (absent: the latest window)."""
    raw = query.get("window")
    if raw is None:
        return None
    try:
        return parse_ts(int(raw) if raw.lstrip("-").isdigit() else raw)
    except (DecodeError, ValueError, TypeError):
        raise BadRequest(f"window: expected a window start as RFC 3339 or epoch ms, got {raw!r}") from None


def _bbox_param(query: Any) -> tuple[float, float, float, float] | None:
    """``bbox=min_lat,min_lon,max_lat,max_lon`` (min_lon > max_lon: across the antimeridian)."""
    raw = query.get("bbox")
    if raw is None:
        return None
    try:
        min_lat, min_lon, max_lat, max_lon = (float(v) for v in raw.split(","))
    except ValueError:
        raise BadRequest(f"bbox: expected min_lat,min_lon,max_lat,max_lon, got {raw!r}") from None
    if not (-90 <= min_lat <= max_lat <= 90 and -180 <= min_lon <= 180 and -180 <= max_lon <= 180):
        raise BadRequest(f"bbox: {raw!r} is not a box of latitudes -90..90 (min <= max) and longitudes -180..180")
    return min_lat, min_lon, max_lat, max_lon


def json_error(web: faust.web.Web, status: int, code: str, detail: str) -> faust.web.Response:
    return web.json({"error": code, "detail": detail}, status=status)


def make_guard(settings: Settings) -> Callable[[Handler], Handler]:
    """A decorator for view handlers: the bearer-token check and uniform JSON errors (400, 401, 404, 503)."""
    token = settings.api_token.encode()

    def guarded(handler: Handler) -> Handler:
        @wraps(handler)
        async def wrapper(view: faust.web.View, request: faust.web.Request, *args: Any, **kwargs: Any) -> Any:
            if token:
                given = request.headers.get("Authorization", "")
                if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token)):
                    return json_error(view.web, 401, "unauthorized", "a bearer token is required")
            try:
                return await handler(view, request, *args, **kwargs)
            except BadRequest as exc:
                return json_error(view.web, 400, "bad_request", str(exc))
            except Missing as exc:
                return json_error(view.web, 404, "not_found", str(exc))
            except ServiceUnavailable:
                return json_error(view.web, 503, "unavailable", "the group's partition assignment is not known yet")

        return wrapper

    return guarded


def make_gather(app: faust.App) -> Callable[[faust.web.Request, Callable[[], Any]], Awaitable[list[Any]]]:
    """``gather(request, local)``: ``local()`` here and the same request with ``scope=local`` on every other
    worker of the group (from the assignment), this worker's answer first."""

    async def gather(request: faust.web.Request, local: Callable[[], Any]) -> list[Any]:
        if request.query.get("scope") == "local":
            return [local()]
        me = str(app.conf.canonical_url).rstrip("/")
        others = sorted({str(url).rstrip("/") for url in app.router.tables_metadata()} - {me})
        headers = {"Authorization": request.headers["Authorization"]} if "Authorization" in request.headers else {}

        async def remote(host: str) -> Any:
            params = {**request.query, "scope": "local"}
            async with app.http_client.get(f"{host}{request.path}", params=params, headers=headers) as response:
                if response.status != 200:
                    raise ServiceUnavailable(f"{host} answered {response.status}")
                return await response.json()

        return [local(), *await asyncio.gather(*(remote(host) for host in others))]

    return gather


def register_api(app: faust.App, worker: PositionWorker, settings: Settings, table: faust.Table,
                 cells_table: faust.Table | None = None) -> None:
    """Add the query API's views to ``app``."""
    guarded = make_guard(settings)
    gather = make_gather(app)

    @app.page("/devices/{device_id}")
    class DeviceView(faust.web.View):
        @guarded
        @app.table_route(table=table, match_info="device_id")
        async def get(self, request: faust.web.Request, device_id: str) -> faust.web.Response:
            state = worker.device_state(device_id)
            signals = worker.device_signals(device_id)
            if state is None and signals is None:
                return json_error(self.web, 404, "not_found", f"device {device_id!r} is not known")
            body = device_view(state) if state is not None else {"device_id": device_id, "ts": None}
            return self.json({**body, **signals_view(signals, current_rules())})

    @app.page("/devices")
    class DevicesView(faust.web.View):
        @guarded
        async def get(self, request: faust.web.Request) -> faust.web.Response:
            query = request.query
            limit = _int_param(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
            cell = query.get("cell")
            if cell is not None and not h3.is_valid_cell(cell):
                raise BadRequest(f"cell: {cell!r} is not an H3 cell")
            geofence, after = query.get("geofence"), query.get("after")
            group = query.get("group")
            in_group: Callable[[str], bool] | None = None
            if group is not None:  # device groups are declared with the alert rules (docs/RULES.md)
                rules = current_rules()
                if rules is None or group not in rules.groups:
                    raise BadRequest(f"group: {group!r} is not a group of the current rules")
                in_group = rules.group_matcher(group)

            def local() -> list[dict[str, Any]]:
                candidates = worker.local_states()
                if in_group is not None:
                    candidates = [s for s in candidates if in_group(s.device_id)]
                states = filter_devices(candidates, geofence=geofence, cell=cell, after=after, limit=limit)
                return [device_view(s) for s in states]

            merged = sorted((d for part in await gather(request, local) for d in part), key=lambda d: d["device_id"])
            if query.get("scope") == "local":
                return self.json(merged)
            page = merged[:limit]
            next_after = page[-1]["device_id"] if len(merged) > limit else None
            return self.json({"devices": page, "next_after": next_after})

    @app.page("/nearby")
    class NearbyView(faust.web.View):
        @guarded
        async def get(self, request: faust.web.Request) -> faust.web.Response:
            query = request.query
            lat = _float_param(query, "lat", -90, 90)
            lon = _float_param(query, "lon", -180, 180)
            radius_m = _float_param(query, "radius_m", 0, MAX_NEARBY_RADIUS_M)
            limit = _int_param(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)

            def local() -> list[dict[str, Any]]:
                return [
                    {**device_view(state), "distance_m": distance}
                    for state, distance in worker.nearby(lat, lon, radius_m, limit)
                ]

            merged = sorted(
                (d for part in await gather(request, local) for d in part),
                key=lambda d: (d["distance_m"], d["device_id"]),
            )[:limit]
            if query.get("scope") == "local":
                return self.json(merged)
            return self.json({"devices": merged})

    def current_rules() -> Any:
        return worker.rules.ruleset if worker.rules is not None else None

    @app.page("/alerts")
    class AlertsView(faust.web.View):
        @guarded
        async def get(self, request: faust.web.Request) -> faust.web.Response:
            query = request.query
            state = query.get("state", "raised")
            if state != "raised":
                raise BadRequest("state: only 'raised' (active) alerts are held; the alerts topic has the history")
            severity = query.get("severity")
            if severity is not None and severity not in SEVERITIES:
                raise BadRequest(f"severity: {severity!r} is not one of {', '.join(SEVERITIES)}")
            rule = query.get("rule")
            limit = _int_param(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
            after = query.get("after")

            def local() -> list[dict[str, Any]]:
                rules = current_rules()
                found = []
                for signals in worker.local_signals():
                    for rule_id, alert_id, raised_ms in active_alerts(signals.alerts, signals.device_id):
                        view = alert_view(rule_id, alert_id, raised_ms, signals.device_id, rules)
                        if severity is not None and view["severity"] != severity:
                            continue
                        if (rule is not None and rule_id != rule) or (after is not None and alert_id <= after):
                            continue
                        found.append(view)
                rfid = getattr(app, "fleetstream_rfid", None)  # the assets' alerts (asset_missing, ...) too
                for rule_id, alert_id, raised_ms, tag, level in rfid.local_alerts() if rfid is not None else ():
                    if (severity is not None and level != severity) or (rule is not None and rule_id != rule):
                        continue
                    if after is None or alert_id > after:
                        found.append(raised_alert(rule_id, alert_id, raised_ms, tag, level))
                return sorted(found, key=lambda a: a["alert_id"])[:limit]

            merged = sorted((a for part in await gather(request, local) for a in part), key=lambda a: a["alert_id"])
            if query.get("scope") == "local":
                return self.json(merged)
            page = merged[:limit]
            return self.json({"alerts": page, "next_after": page[-1]["alert_id"] if len(merged) > limit else None})

    @app.page("/geofences")
    class GeofencesView(faust.web.View):
        @guarded
        async def get(self, request: faust.web.Request) -> faust.web.Response:
            limit = _int_param(request.query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
            after = request.query.get("after")
            index = worker.geofences.index if worker.geofences is not None else None
            ids = sorted(index.ids if index is not None else ())
            if after is not None:
                ids = [i for i in ids if i > after]
            page = ids[:limit]
            assert index is not None or not page
            body = [geofence_summary(index.get(i)) for i in page] if index is not None else []
            return self.json({"geofences": body, "next_after": page[-1] if len(ids) > limit else None})

    @app.page("/geofences/{geofence_id}")
    class GeofenceView(faust.web.View):
        @guarded
        async def get(self, request: faust.web.Request, geofence_id: str) -> faust.web.Response:
            index = worker.geofences.index if worker.geofences is not None else None
            fence = index.get(geofence_id) if index is not None else None
            if fence is None:
                return json_error(self.web, 404, "not_found", f"geofence {geofence_id!r} is not known")

            def local() -> dict[str, Any]:
                aggregation = worker.aggregation
                return {
                    # the occupancy table kept from the transitions (per partition, summed here); a scan of the
                    # devices' states when aggregation is off
                    "inside": sorted(aggregation.local_occupancy(geofence_id)) if aggregation is not None else
                    sorted(s.device_id for s in worker.local_states() if geofence_id in s.geofences),
                    "windows": [list(w) for w in aggregation.local_geofence_windows(geofence_id)]
                    if aggregation is not None else [],
                }

            parts = await gather(request, local)
            if request.query.get("scope") == "local":
                return self.json(parts[0])
            inside = sorted(d for part in parts for d in part["inside"])
            windows = merge_windows_of((GeofenceStats(*w) for part in parts for w in part["windows"]),
                                       key=lambda w: w.window_start_ms, merge=merge_geofence_stats)
            return self.json({
                **geofence_summary(fence), "feature": geofence_to_feature(fence),
                "occupancy": len(inside), "devices_inside": inside[:MAX_LIMIT],
                "stats": [w.to_dict() for w in reversed(windows)][:MAX_WINDOWS],
            })

    def aggregation() -> Aggregation:
        if worker.aggregation is None:
            raise Missing("aggregation is off on this worker (aggregation_enabled)")
        return worker.aggregation

    def cell_param(cell: str) -> str:
        if not h3.is_valid_cell(cell):
            raise BadRequest(f"h3: {cell!r} is not an H3 cell")
        if h3.get_resolution(cell) not in settings.aggregation_resolutions:
            raise BadRequest(f"h3: resolution {h3.get_resolution(cell)} is not aggregated (aggregation_resolutions: "
                             f"{', '.join(map(str, settings.aggregation_resolutions))})")
        return cell

    if cells_table is not None:
        @app.page("/cells/{h3_cell}")
        class CellView(faust.web.View):
            @guarded
            @app.table_route(table=cells_table, match_info="h3_cell")
            async def get(self, request: faust.web.Request, h3_cell: str) -> faust.web.Response:
                cell = cell_param(h3_cell)
                window = _window_param(request.query)
                agg = aggregation()
                stats = agg.cell(agg.partition_of(cell), cell, window)
                if stats is None:
                    which = "any retained window" if window is None else f"the window starting {format_ts(window)}"
                    return json_error(self.web, 404, "not_found", f"cell {cell} has no statistics for {which}")
                return self.json(stats.to_dict())

    @app.page("/cells")
    class CellsView(faust.web.View):
        @guarded
        async def get(self, request: faust.web.Request) -> faust.web.Response:
            query = request.query
            resolution = _int_param(query, "resolution", max(settings.aggregation_resolutions), 0, 15)
            if resolution not in settings.aggregation_resolutions:
                raise BadRequest(f"resolution: {resolution} is not aggregated (aggregation_resolutions: "
                                 f"{', '.join(map(str, settings.aggregation_resolutions))})")
            bbox = _bbox_param(query)
            window = _window_param(query)
            limit = _int_param(query, "limit", MAX_LIMIT, 1, MAX_CELLS)
            after = query.get("after")
            as_geojson = query.get("format", "json")
            if as_geojson not in ("json", "geojson"):
                raise BadRequest(f"format: {as_geojson!r} is not json or geojson")

            def local() -> dict[str, Any]:
                agg = aggregation()
                windows = agg.local_windows(resolution)
                start = window if window is not None else (windows[-1] if windows else None)
                found = agg.local_cells(resolution, start, bbox) if start is not None else []
                found = [c for c in found if after is None or c.h3 > after]
                found.sort(key=lambda c: c.h3)
                return {"windows": windows, "cells": [c.to_json() for c in found[: limit + 1]]}

            parts = await gather(request, local)
            if query.get("scope") == "local":
                return self.json(parts[0])
            if window is None:  # the latest window any worker holds; ask again for it where it differs
                latest = max((w for part in parts for w in part["windows"][-1:]), default=None)
                if latest is not None and any(part["windows"][-1:] != [latest] for part in parts):
                    window = latest
                    parts = await gather(_with_window(request, latest), local)
            cells = sorted((CellStats.from_json(c) for part in parts for c in part["cells"]), key=lambda c: c.h3)
            cells = [c for c in cells if after is None or c.h3 > after]
            page = cells[:limit]
            next_after = page[-1].h3 if len(cells) > limit else None
            if as_geojson == "geojson":
                return self.json({**cells_geojson(page), "next_after": next_after})
            return self.json({"resolution": resolution, "cells": [c.to_dict() for c in page], "next_after": next_after})

    @app.page("/fleet")
    class FleetView(faust.web.View):
        @guarded
        async def get(self, request: faust.web.Request) -> faust.web.Response:
            now_ms = int(time.time() * 1000)
            offline_ms = settings.fleet_offline_after_s * 1000

            def local() -> dict[str, Any]:
                motion: dict[str, int] = {}
                online = offline = 0
                for state in worker.local_states():
                    motion[str(state.motion)] = motion.get(str(state.motion), 0) + 1
                    if now_ms - state.ts_ms > offline_ms:
                        offline += 1
                    else:
                        online += 1
                rules = current_rules()
                severities: dict[str, int] = {}
                for signals in worker.local_signals():
                    for rule_id, _, _ in active_alerts(signals.alerts, signals.device_id):
                        rule = rules.get(rule_id) if rules is not None else None
                        severity = str(rule.severity) if rule is not None else "unknown"
                        severities[severity] = severities.get(severity, 0) + 1
                agg = worker.aggregation
                return {"online": online, "offline": offline, "motion": motion, "alerts": severities,
                        "distance": [list(w) for w in agg.local_distance()] if agg is not None else []}

            parts = await gather(request, local)
            if request.query.get("scope") == "local":
                return self.json(parts[0])
            motion: dict[str, int] = {}
            alerts = dict.fromkeys(SEVERITIES, 0)
            for part in parts:
                for key, count in part["motion"].items():
                    motion[key] = motion.get(key, 0) + count
                for key, count in part["alerts"].items():
                    alerts[key] = alerts.get(key, 0) + count
            distance = merge_windows_of(
                (DistanceWindow(*w) for part in parts for w in part["distance"]), key=lambda w: w.window_start_ms,
                merge=lambda ws: DistanceWindow(ws[0].window_start_ms, ws[0].window_end_ms,
                                                sum(w.distance_m for w in ws), sum(w.fixes for w in ws),
                                                all(w.final for w in ws)))
            return self.json({
                "devices": sum(p["online"] + p["offline"] for p in parts),
                "online": sum(p["online"] for p in parts), "offline": sum(p["offline"] for p in parts),
                "moving": motion.get("moving", 0), "stopped": motion.get("stopped", 0),
                "motion_unknown": motion.get("unknown", 0), "active_alerts": alerts,
                "distance": [{"window_start": format_ts(w.window_start_ms), "window_end": format_ts(w.window_end_ms),
                              "distance_km": round(w.distance_m / 1000, 3), "fixes": w.fixes, "final": w.final}
                             for w in reversed(distance)][:MAX_WINDOWS],
            })

    @app.page("/docs")
    async def docs(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return web.html(_DOCS_PAGE)

    @app.page("/openapi.yaml")
    async def openapi(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        return web.text(OPENAPI_PATH.read_text(), content_type="application/yaml")


def _with_window(request: faust.web.Request, window_ms: int) -> Any:
    """The request with ``window`` set (to ask every worker for the same window)."""
    return request.clone(rel_url=request.rel_url.update_query(window=str(window_ms)))


def geofence_summary(fence: Any) -> dict[str, Any]:
    return {"id": fence.id, "name": fence.name, "kind": str(fence.kind), "tags": list(fence.tags)}


_DOCS_PAGE = """<!doctype html>
<html><head><title>fleetstream API</title><meta charset="utf-8">
<link rel="stylesheet" href="https://unpkg.com/swagger-ui-dist@5/swagger-ui.css"></head>
<body><div id="ui"></div>
<script src="https://unpkg.com/swagger-ui-dist@5/swagger-ui-bundle.js"></script>
<script>SwaggerUIBundle({url: "/openapi.yaml", dom_id: "#ui"});</script>
<noscript>The API description is at <a href="/openapi.yaml">/openapi.yaml</a>.</noscript>
</body></html>
"""

