"""HTTP routes over the RFID asset states: ``/assets/{tag_id}``, ``/zones/{zone_id}/inventory``, ``/rfid/status``.

Same conventions as :mod:`fleetstream.streaming.api`: bearer token when ``api_token`` is set, JSON errors
``{"error", "detail"}`` (400 naming the parameter, 404 for unknown ids, 503 while the assignment is unknown).
One tag is routed to the worker owning its partition (Faust table routing on the asset-state table); an
inventory is gathered: each worker answers for its active partitions (``scope=local``) and the answers are
merged. A tag lives in exactly one partition, so the union is the inventory; during a rebalance a worker may
answer 503 rather than half an answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import faust
from faust.web.exceptions import ServiceUnavailable

from fleetstream.codecs import format_ts
from fleetstream.config import Settings
from fleetstream.domain.assets import AssetState
from fleetstream.streaming.api import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    _int_param,
    json_error,
    make_gather,
    make_guard,
)

if TYPE_CHECKING:
    from fleetstream.streaming.rfid import RfidWorker

Handler = Callable[..., Awaitable[Any]]


def asset_view(state: AssetState) -> dict[str, Any]:
    """The public JSON of a tag's state (``GET /assets/{tag_id}``)."""
    return {
        "tag_id": state.tag_id, "zones": list(state.zones), "reader_id": state.reader_id,
        "vehicle_id": state.vehicle_id, "lat": state.lat, "lon": state.lon, "inside": state.inside,
        "since": format_ts(state.since_ms), "first_seen": format_ts(state.first_seen_ms),
        "last_seen": format_ts(state.last_seen_ms),
        "active_alerts": [{"rule": rule, "alert_id": f"{rule}:{state.tag_id}:{raised_ms}",
                           "raised": format_ts(raised_ms)} for rule, raised_ms in sorted(state.alerts.items())],
    }


def register_assets_api(app: faust.App, worker: RfidWorker, settings: Settings, table: faust.Table) -> None:
    """Add the asset views to ``app``."""
    guarded = make_guard(settings)
    gather = make_gather(app)

    @app.page("/assets/{tag_id}")
    class AssetView(faust.web.View):
        @guarded
        @app.table_route(table=table, match_info="tag_id")
        async def get(self, request: faust.web.Request, tag_id: str) -> faust.web.Response:
            state = worker.asset_state(tag_id)
            if state is None:
                return json_error(self.web, 404, "not_found", f"asset {tag_id!r} has not been read")
            return self.json(asset_view(state))

    @app.page("/zones/{zone_id}/inventory")
    class ZoneInventoryView(faust.web.View):
        @guarded
        async def get(self, request: faust.web.Request, zone_id: str) -> faust.web.Response:
            query = request.query
            limit = _int_param(query, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
            after = query.get("after")

            def local() -> list[str]:
                if worker.pipeline is None or not worker.recovered():
                    raise ServiceUnavailable("starting, or tables recovering")
                return worker.local_inventory().assets_in(zone_id)

            if query.get("scope") != "local" and not worker.known_zone(zone_id):
                return json_error(self.web, 404, "not_found", f"zone {zone_id!r}: no reader covers it and no "
                                  "geofence has that id")
            tags = sorted({tag for part in await gather(request, local) for tag in part})
            if query.get("scope") == "local":
                return self.json(tags)
            listed = [tag for tag in tags if after is None or tag > after]
            page = listed[:limit]
            return self.json({"zone_id": zone_id, "count": len(tags), "assets": page,
                              "next_after": page[-1] if len(listed) > limit else None})

    @app.page("/rfid/status")
    async def rfid_status(web: faust.web.View, request: faust.web.Request) -> faust.web.Response:
        readers = worker.readers
        vehicles = worker.vehicles
        return web.json({
            **worker.stats.as_dict(),
            "readers": len(readers.registry) if readers is not None else 0,
            "readers_rejected": readers.rejected if readers is not None else 0,
            "vehicles_known": len(vehicles.view) if vehicles is not None else 0,
            "vehicle_updates": vehicles.view.updates if vehicles is not None else 0,
            "enriched_skimmed": vehicles.skimmed if vehicles is not None else 0,
            "started": worker.pipeline is not None,
        })
