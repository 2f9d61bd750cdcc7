"""Geofences from GeoJSON: polygons (holes respected), circles (Point + radius_m) and corridors (LineString +
buffer_m), with their per-geofence settings. A bad feature is refused with a message naming the geofence and
the problem; nothing half-valid gets into an index.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson
import shapely
from shapely.geometry import LineString, MultiPolygon, Point, Polygon, shape

DEFAULT_MAX_VERTICES = 10_000
SETTING_NAMES = ("dwell_s", "enter_after_s", "exit_after_s", "exit_buffer_m", "min_accuracy_m")


class GeofenceKind(StrEnum):
    POLYGON = "polygon"
    CIRCLE = "circle"
    CORRIDOR = "corridor"


class GeofenceError(ValueError):
    """A geofence definition that cannot be used; the message names the geofence and the problem."""


@dataclass(frozen=True, slots=True)
class FenceSettings:
    """Anti-flapping and dwell settings; None = use the worker's default."""

    dwell_s: float | None = None
    enter_after_s: float | None = None
    exit_after_s: float | None = None
    exit_buffer_m: float | None = None
    min_accuracy_m: float | None = None
    cross: bool = False

    @property
    def neutral(self) -> bool:
        """Nothing of its own that a transition would apply: every setting unset or 0, no ``cross``."""
        return not (self.dwell_s or self.enter_after_s or self.exit_after_s or self.exit_buffer_m
                    or self.min_accuracy_m or self.cross)


@dataclass(frozen=True, slots=True, eq=False)
class Geofence:
    """One geofence. ``geometry`` is planar lon/lat (RFC 7946) for polygons; for circles the centre Point and
    for corridors the centre LineString, with ``radius_m`` (circle radius or corridor half-width)."""

    id: str
    kind: GeofenceKind
    geometry: Polygon | MultiPolygon | Point | LineString
    radius_m: float = 0.0
    name: str = ""
    tags: tuple[str, ...] = ()
    settings: FenceSettings = field(default_factory=FenceSettings)
    properties: Mapping[str, Any] = field(default_factory=dict)

    def same_shape(self, other: Geofence) -> bool:
        return self.kind == other.kind and self.radius_m == other.radius_m and self.geometry.equals_exact(
            other.geometry, 0.0
        )


def parse_geofence(feature: Any, *, max_vertices: int = DEFAULT_MAX_VERTICES) -> Geofence:
    """A GeoJSON Feature -> Geofence, or GeofenceError saying what is wrong."""
    if not isinstance(feature, dict) or feature.get("type") != "Feature":
        raise GeofenceError(f"geofence: expected a GeoJSON Feature object, got {type(feature).__name__}")
    properties = feature.get("properties") or {}
    if not isinstance(properties, dict):
        raise GeofenceError("geofence: properties must be an object")
    raw_id = feature.get("id", properties.get("id"))
    if isinstance(raw_id, bool) or not isinstance(raw_id, str | int | float) or str(raw_id) == "":
        raise GeofenceError("geofence: needs a non-empty 'id' (or properties.id)")
    fence_id = str(raw_id)
    if len(fence_id) > 128:
        raise GeofenceError(f"geofence {fence_id[:40]!r}...: id longer than 128 characters")

    def fail(problem: str) -> GeofenceError:
        return GeofenceError(f"geofence {fence_id!r}: {problem}")

    geometry = feature.get("geometry")
    if not isinstance(geometry, dict):
        raise fail("missing geometry")
    geom_type = geometry.get("type")
    coordinates = geometry.get("coordinates")
    if geom_type not in ("Polygon", "MultiPolygon", "Point", "LineString"):
        raise fail(f"unsupported geometry type {geom_type!r} (Polygon, MultiPolygon, Point + radius_m, "
                   "LineString + buffer_m)")
    _check_coordinates(coordinates, geom_type, fail, max_vertices)
    settings = _settings(properties, fail)
    try:
        geom = shape(geometry)
    except Exception as exc:  # shapely raises several types for malformed coordinates
        raise fail(f"invalid coordinates: {exc}") from None
    radius_m = 0.0
    if geom_type in ("Polygon", "MultiPolygon"):
        kind = GeofenceKind.POLYGON
        if not geom.is_valid:
            raise fail(f"invalid polygon: {shapely.is_valid_reason(geom)}")
        if geom.is_empty or geom.area == 0:
            raise fail("polygon has no area")
    elif geom_type == "Point":
        kind = GeofenceKind.CIRCLE
        radius_m = _positive(properties, "radius_m", fail)
    else:
        kind = GeofenceKind.CORRIDOR
        radius_m = _positive(properties, "buffer_m", fail)
        if geom.length == 0:
            raise fail("corridor line has zero length")
    min_x, _, max_x, _ = geom.bounds
    if max_x - min_x > 180:
        raise fail("crosses the antimeridian (split it into two geofences)")
    tags = properties.get("tags") or ()
    if not isinstance(tags, list | tuple) or not all(isinstance(t, str) for t in tags):
        raise fail("tags must be a list of strings")
    return Geofence(fence_id, kind, geom, radius_m, str(properties.get("name") or ""), tuple(tags), settings,
                    dict(properties))


def _check_coordinates(coordinates: Any, geom_type: str, fail: Any, max_vertices: int) -> None:
    def position(p: Any) -> None:
        if not isinstance(p, list | tuple) or len(p) < 2 or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in p[:2]
        ):
            raise fail(f"bad position {p!r}: expected [lon, lat]")
        if not -180 <= p[0] <= 180 or not -90 <= p[1] <= 90:
            raise fail(f"position {list(p[:2])} out of range (lon -180..180, lat -90..90)")

    def ring(r: Any) -> int:
        if not isinstance(r, list) or len(r) < 4:
            raise fail("a polygon ring needs at least 4 positions")
        for p in r:
            position(p)
        if list(r[0][:2]) != list(r[-1][:2]):
            raise fail(f"ring is not closed: first {list(r[0][:2])} != last {list(r[-1][:2])}")
        return len(r)

    if not isinstance(coordinates, list):
        raise fail("missing coordinates")
    if geom_type == "Point":
        position(coordinates)
        return
    if geom_type == "LineString":
        if len(coordinates) < 2:
            raise fail("a corridor line needs at least 2 positions")
        for p in coordinates:
            position(p)
        count = len(coordinates)
    elif geom_type == "Polygon":
        if not coordinates:
            raise fail("polygon has no rings")
        count = sum(ring(r) for r in coordinates)
    else:
        if not coordinates or not all(isinstance(poly, list) and poly for poly in coordinates):
            raise fail("multipolygon needs at least one polygon with rings")
        count = sum(ring(r) for poly in coordinates for r in poly)
    if count > max_vertices:
        raise fail(f"{count} vertices, more than the limit of {max_vertices}")


def _positive(properties: Mapping[str, Any], name: str, fail: Any) -> float:
    value = properties.get(name)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise fail(f"properties.{name} is required and must be a number of metres")
    if value <= 0:
        raise fail(f"properties.{name} must be positive, got {value}")
    return float(value)


def _settings(properties: Mapping[str, Any], fail: Any) -> FenceSettings:
    values: dict[str, Any] = {}
    for name in SETTING_NAMES:
        value = properties.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise fail(f"properties.{name} must be a number")
        if value < 0:
            raise fail(f"properties.{name} must not be negative, got {value}")
        values[name] = float(value)
    cross = properties.get("cross", False)
    if not isinstance(cross, bool):
        raise fail("properties.cross must be true or false")
    return FenceSettings(**values, cross=cross)


def geofence_to_feature(fence: Geofence) -> dict[str, Any]:
    """The GeoJSON Feature to publish for a geofence (round-trips through parse_geofence)."""
    properties = dict(fence.properties)
    properties["name"] = fence.name
    if fence.tags:
        properties["tags"] = list(fence.tags)
    if fence.kind is GeofenceKind.CIRCLE:
        properties["radius_m"] = fence.radius_m
    elif fence.kind is GeofenceKind.CORRIDOR:
        properties["buffer_m"] = fence.radius_m
    return {"type": "Feature", "id": fence.id, "geometry": shapely.geometry.mapping(fence.geometry),
            "properties": properties}


def load_geofences(
    source: str | Path | Mapping[str, Any], *, max_vertices: int = DEFAULT_MAX_VERTICES
) -> list[Geofence]:
    """Geofences from a FeatureCollection or Feature (a dict, a .geojson/.json file, or a directory of them).

    All-or-nothing: the first bad feature raises GeofenceError naming the file and the geofence.
    """
    if isinstance(source, Mapping):
        return _from_document(source, max_vertices, "")
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".geojson", ".json"))
        fences = [fence for file in files for fence in load_geofences(file, max_vertices=max_vertices)]
    else:
        try:
            document = orjson.loads(path.read_bytes())
        except orjson.JSONDecodeError as exc:
            raise GeofenceError(f"{path}: not valid JSON: {exc}") from None
        fences = _from_document(document, max_vertices, f"{path}: ")
    seen: set[str] = set()
    for fence in fences:
        if fence.id in seen:
            raise GeofenceError(f"{source}: geofence id {fence.id!r} appears twice")
        seen.add(fence.id)
    return fences


def _from_document(document: Any, max_vertices: int, where: str) -> list[Geofence]:
    if isinstance(document, Mapping) and document.get("type") == "FeatureCollection":
        features: Iterable[Any] = document.get("features") or []
    else:
        features = [document]
    try:
        return [parse_geofence(feature, max_vertices=max_vertices) for feature in features]
    except GeofenceError as exc:
        raise GeofenceError(f"{where}{exc}") from None
