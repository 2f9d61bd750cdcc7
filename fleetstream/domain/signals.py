"""What a worker remembers about a device besides its track: latest telemetry and the alert engine's state.

Kept apart from :class:`~fleetstream.domain.models.DeviceState` (the per-fix track) because telemetry-only
devices (a reefer sensor, a vending machine) have no position at all, and because with no rules and no
telemetry nothing here is read or written on the position hot path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from fleetstream.domain.alerts import DeviceAlertState, make_alert_id


class DeviceSignals(NamedTuple):
    """Latest telemetry (name -> value, and the time of the newest reading) and the alert engine's state."""

    device_id: str
    telemetry: Mapping[str, float] | None = None
    telemetry_ts_ms: int | None = None
    alerts: DeviceAlertState | None = None

    def with_telemetry(self, ts_ms: int, metrics: Mapping[str, float]) -> DeviceSignals:
        """Merge a reading: newer values replace older ones per metric; an older reading fills only gaps."""
        if self.telemetry is None:
            return self._replace(telemetry=dict(metrics), telemetry_ts_ms=ts_ms)
        if self.telemetry_ts_ms is not None and ts_ms < self.telemetry_ts_ms:
            merged = {**metrics, **self.telemetry}
            return self._replace(telemetry=merged)
        return self._replace(telemetry={**self.telemetry, **metrics}, telemetry_ts_ms=ts_ms)

    @property
    def empty(self) -> bool:
        return self.telemetry is None and self.alerts is None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"device_id": self.device_id}
        if self.telemetry is not None:
            out["telemetry"] = dict(self.telemetry)
            out["telemetry_ts_ms"] = self.telemetry_ts_ms
        if self.alerts is not None:
            out["alerts"] = self.alerts.to_json()
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DeviceSignals:  # type: ignore[misc]
        alerts = data.get("alerts")
        return cls(
            str(data["device_id"]), data.get("telemetry"), data.get("telemetry_ts_ms"),
            DeviceAlertState.from_json(alerts) if alerts else None,
        )


def active_alerts(state: DeviceAlertState | None, subject_id: str) -> list[tuple[str, str, int]]:
    """(rule id, alert id, raise time) of every alert raised and not yet cleared in an engine state."""
    if state is None:
        return []
    out = []
    for rule_id, rule_state in (state.rules or {}).items():
        raised_ms = getattr(rule_state, "raised_ms", None)
        if raised_ms is not None:
            out.append((rule_id, make_alert_id(rule_id, subject_id, raised_ms), raised_ms))
    for rule_id, raised_ms in (state.offline or {}).items():
        out.append((rule_id, make_alert_id(rule_id, subject_id, raised_ms), raised_ms))
    return sorted(out)
