"""Domain models: what the streams carry once decoded. Plain frozen dataclasses, no I/O.

Times are integer epoch milliseconds (``ts_ms``) inside the domain; codecs turn RFC 3339 strings into
them on the way in and back into ``YYYY-MM-DDTHH:MM:SS.mmmZ`` on the way out.

Models built once per fix (Position, DeviceState) are NamedTuples: as immutable as a frozen dataclass and
about 4x cheaper to build (0.4 vs 1.6 µs measured), which matters at tens of thousands of fixes a second.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NamedTuple


class Motion(StrEnum):
    UNKNOWN = "unknown"
    MOVING = "moving"
    STOPPED = "stopped"


class FilterReason(StrEnum):
    """Why a valid fix did not change device state (it is still published, flagged ``filtered``)."""

    DUPLICATE = "duplicate"  # same device and ts as the last accepted fix
    OUT_OF_ORDER = "out_of_order"  # older than the last accepted fix


class Position(NamedTuple):
    """One GPS fix of one device."""

    device_id: str
    ts_ms: int
    lat: float
    lon: float
    speed_kmh: float | None = None
    heading_deg: float | None = None
    accuracy_m: float | None = None
    altitude_m: float | None = None
    attributes: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class RfidRead:
    """One read of one tag by one reader."""

    tag_id: str
    reader_id: str
    ts_ms: int
    rssi_dbm: float | None = None
    antenna: int | None = None


@dataclass(frozen=True, slots=True)
class Telemetry:
    """A set of named numeric readings from one device at one time."""

    device_id: str
    ts_ms: int
    metrics: dict[str, float] = field(default_factory=dict)


class DeviceState(NamedTuple):
    """What a worker remembers about a device between fixes (the per-device table value)."""

    device_id: str
    ts_ms: int
    lat: float
    lon: float
    odometer_m: float = 0.0
    speed_kmh: float | None = None
    heading_deg: float | None = None
    motion: Motion = Motion.UNKNOWN
    fixes: int = 0  # accepted fixes so far
    h3: str | None = None
    geofences: tuple[str, ...] = ()  # what the index said for the last accepted fix
    fences: dict[str, Any] | None = None  # geofence memberships (see transitions.Membership)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "ts_ms": self.ts_ms,
            "lat": self.lat,
            "lon": self.lon,
            "odometer_m": self.odometer_m,
            "speed_kmh": self.speed_kmh,
            "heading_deg": self.heading_deg,
            "motion": self.motion.value,
            "fixes": self.fixes,
            "h3": self.h3,
            "geofences": list(self.geofences),
            "fences": self.fences,  # NamedTuples inside are written as arrays by codecs.dumps
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeviceState:  # type: ignore[misc]
        return cls(
            device_id=data["device_id"],
            ts_ms=int(data["ts_ms"]),
            lat=float(data["lat"]),
            lon=float(data["lon"]),
            odometer_m=float(data.get("odometer_m", 0.0)),
            speed_kmh=data.get("speed_kmh"),
            heading_deg=data.get("heading_deg"),
            motion=Motion(data.get("motion", Motion.UNKNOWN)),
            fixes=int(data.get("fixes", 0)),
            h3=data.get("h3"),
            geofences=tuple(data.get("geofences", ())),
            fences=data.get("fences") or None,
        )
