"""Geodesy helpers. Coordinates are (lat, lon) in degrees everywhere in code.

GeoJSON writes [lon, lat]; :func:`latlon_from_geojson` is the one place that flips the order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

EARTH_RADIUS_M = 6_371_008.8  # IUGG mean radius, the usual choice for haversine


def latlon_from_geojson(position: Sequence[float]) -> tuple[float, float]:
    """Turn a GeoJSON position ``[lon, lat, ...]`` into ``(lat, lon)``."""
    return float(position[1]), float(position[0])


def geojson_from_latlon(lat: float, lon: float) -> list[float]:
    """Turn ``(lat, lon)`` into a GeoJSON position ``[lon, lat]``."""
    return [lon, lat]


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in metres between two (lat, lon) points."""
    p1 = math.radians(lat1)
    p2 = math.radians(lat2)
    dp = p2 - p1
    dl = math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(a)))


def bearing_deg(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Initial great-circle bearing from point 1 to point 2, degrees clockwise from north in [0, 360)."""
    p1 = math.radians(lat1)
    p2 = math.radians(lat2)
    dl = math.radians(lon2 - lon1)
    y = math.sin(dl) * math.cos(p2)
    x = math.cos(p1) * math.sin(p2) - math.sin(p1) * math.cos(p2) * math.cos(dl)
    return math.degrees(math.atan2(y, x)) % 360.0


def destination(lat: float, lon: float, bearing: float, distance_m: float) -> tuple[float, float]:
    """The point ``distance_m`` from (lat, lon) along the initial ``bearing`` (degrees)."""
    d = distance_m / EARTH_RADIUS_M
    b = math.radians(bearing)
    p1 = math.radians(lat)
    l1 = math.radians(lon)
    p2 = math.asin(math.sin(p1) * math.cos(d) + math.cos(p1) * math.sin(d) * math.cos(b))
    l2 = l1 + math.atan2(math.sin(b) * math.sin(d) * math.cos(p1), math.cos(d) - math.sin(p1) * math.sin(p2))
    return math.degrees(p2), (math.degrees(l2) + 540.0) % 360.0 - 180.0


def distance_bearing(lat1: float, lon1: float, lat2: float, lon2: float) -> tuple[float, float]:
    """Haversine distance (m) and initial bearing (deg) at once, sharing the trigonometry (per-fix hot path)."""
    p1 = lat1 * _RAD
    p2 = lat2 * _RAD
    dl = (lon2 - lon1) * _RAD
    cos_p1 = _cos(p1)
    cos_p2 = _cos(p2)
    sin_dp = _sin((p2 - p1) * 0.5)
    sin_dl = _sin(dl * 0.5)
    a = sin_dp * sin_dp + cos_p1 * cos_p2 * sin_dl * sin_dl
    distance = 2 * EARTH_RADIUS_M * _asin(_sqrt(a) if a < 1.0 else 1.0)
    y = _sin(dl) * cos_p2
    x = cos_p1 * _sin(p2) - _sin(p1) * cos_p2 * _cos(dl)
    return distance, (_atan2(y, x) * _DEG) % 360.0


_RAD = math.pi / 180.0
_DEG = 180.0 / math.pi
_sin, _cos, _asin, _sqrt, _atan2 = math.sin, math.cos, math.asin, math.sqrt, math.atan2
