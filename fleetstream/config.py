"""Settings: one typed, frozen object, read from ``FLEETSTREAM_*`` environment variables, overridden by CLI flags.

Every field documents itself (``metadata["help"]``); the CLI turns each field into a ``--kebab-case`` flag, so
``fleetstream worker --help`` lists them all. A bad value is refused at start with a message naming the setting.
"""

from __future__ import annotations

import math
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from fleetstream.domain.aggregation import WindowSpec

ENV_PREFIX = "FLEETSTREAM_"


class SettingsError(ValueError):
    """A setting has a value the worker cannot run with; the message names the setting."""


def _opt(default: Any, help: str, **checks: Any) -> Any:
    return field(default=default, metadata={"help": help, **checks})


@dataclass(frozen=True, slots=True)
class Settings:
    # --- Kafka ---------------------------------------------------------------------------------------
    broker: str = _opt("kafka://localhost:9092", "Kafka bootstrap servers, kafka://host:port[,host:port]")
    app_id: str = _opt("fleetstream", "Consumer group and changelog prefix; workers with one app_id share work")
    partitions: int = _opt(8, "Partitions for topics the worker creates", min=1)
    replication_factor: int = _opt(1, "Replication factor for topics the worker creates", min=1)
    security_protocol: str = _opt(
        "PLAINTEXT", "PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL",
        choices=("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"),
    )
    sasl_mechanism: str = _opt(
        "PLAIN", "PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512", choices=("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
    )
    sasl_username: str = _opt("", "SASL user name (with a SASL_* security protocol)")
    sasl_password: str = _opt("", "SASL password (prefer the environment variable over the flag)")
    ssl_cafile: str = _opt("", "CA bundle for TLS (SSL / SASL_SSL)")
    ssl_certfile: str = _opt("", "Client certificate for mutual TLS")
    ssl_keyfile: str = _opt("", "Client key for mutual TLS")
    session_timeout_s: float = _opt(
        10.0, "Consumer group session timeout: a worker silent this long loses its partitions", min=1
    )
    rebalance_timeout_s: float = _opt(
        10.0, "How long a rebalance waits for members to rejoin (the embedded broker waits it out on join)", min=1
    )
    tail_single_record: bool = _opt(
        True,
        "Send the last record of every output flush as its own batch, so brokers that report the end offset "
        "as 'base offset of the newest batch + 1' (the embedded Tansu) report it right; harmless on Kafka",
    )
    # --- topics ----------------------------------------------------------------------------------------
    positions_topic: str = _opt("fleet.positions", "Input: GPS fixes (key device_id)")
    enriched_topic: str = _opt("fleet.positions.enriched", "Output: enriched fixes (key device_id)")
    deadletter_topic: str = _opt("fleet.deadletter", "Output: rejected records with the reason")
    geofences_topic: str = _opt("fleet.geofences", "Compacted: geofence GeoJSON features (key geofence id)")
    geofence_events_topic: str = _opt("fleet.geofence.events", "Output: enter/exit/dwell events")
    telemetry_topic: str = _opt("fleet.telemetry", "Input: device telemetry {device_id, ts, metrics} (key device_id)")
    trips_topic: str = _opt("fleet.trips", "Output: trips and stops when they close (key device_id)")
    alerts_topic: str = _opt("fleet.alerts", "Output: alerts raised and cleared (key subject id)")
    rules_topic: str = _opt("fleet.rules", "Compacted: alert rules (key rule id)")
    cells_topic: str = _opt("fleet.cells", "Output: final statistics per H3 cell and window (key cell)")
    cell_partials_topic: str = _opt(
        "fleet.cells.partials", "Internal: each partition's part of a cell's window and the partitions' "
        "watermarks, merged by the worker owning the cell (same partition count as the positions topic)"
    )
    # --- processing --------------------------------------------------------------------------------------
    h3_resolution: int = _opt(9, "Primary H3 resolution written to enriched fixes", min=0, max=15)
    h3_extra_resolutions: tuple[int, ...] = _opt((), "Extra H3 resolutions (comma separated)", min=0, max=15)
    batch_max: int = _opt(2000, "Most Kafka messages the worker processes in one batch", min=1)
    batch_within_s: float = _opt(0.05, "Longest wait to fill a batch, seconds", min=0.001)
    max_future_skew_s: float = _opt(300.0, "Fixes more than this far in the future are dead-lettered", min=0)
    max_message_bytes: int = _opt(1_048_576, "Larger input messages are dead-lettered", min=64)
    max_batch_items: int = _opt(1000, "Most fixes in one array message", min=1)
    # --- position filters (each off at 0 unless said otherwise) and motion ----------------------------------
    filter_null_island: bool = _opt(True, "Filter fixes at exactly (0, 0), a common receiver failure value")
    filter_max_future_s: float = _opt(
        60.0, "Filter fixes more than this ahead of the worker's clock (0: off; beyond max_future_skew_s they are "
        "dead-lettered)", min=0,
    )
    filter_max_age_s: float = _opt(0.0, "Filter fixes older than this behind the worker's clock (0: off)", min=0)
    max_accuracy_m: float = _opt(100.0, "Filter fixes reporting a worse accuracy (0: off)", min=0)
    max_speed_kmh: float = _opt(
        300.0, "Filter a fix whose distance from the last accepted one implies a faster speed: an outlier jump "
        "(0: off)", min=0,
    )
    min_interval_s: float = _opt(0.0, "Downsampling: filter fixes sooner than this after the last accepted", min=0)
    min_distance_m: float = _opt(0.0, "Downsampling: filter fixes nearer than this to the last accepted", min=0)
    reorder_window_s: float = _opt(
        0.0, "Hold each device's fixes this long (event time, and at most this long in wall time) to re-sort them "
        "before they change state; older arrivals are filtered as late (0: re-sort within each batch only)", min=0,
    )
    filtered_output: str = _opt(
        "publish", "Filtered fixes: publish them to the enriched topic flagged 'filtered', or drop them (always "
        "counted by reason)", choices=("publish", "drop"),
    )
    stop_speed_kmh: float = _opt(3.0, "At or below this speed a device is slow (a stop candidate)", min=0)
    start_speed_kmh: float = _opt(8.0, "A stopped device reporting more than this is moving again", min=0)
    stop_after_s: float = _opt(180.0, "Slow this long before a stop is confirmed (and a trip closes)", min=0)
    start_distance_m: float = _opt(
        100.0, "A stopped device this far from its stop is moving again, whatever its speed", min=1,
    )
    trips_enabled: bool = _opt(True, "Motion with hysteresis, stops and trips (published to the trips topic)")
    # --- geofences (defaults; each geofence may override them in its properties) -----------------------
    geofences_file: str = _opt("", "GeoJSON file or directory of geofences to publish and load at start")
    geofence_enter_after_s: float = _opt(0.0, "Time inside before an enter is confirmed", min=0)
    geofence_exit_after_s: float = _opt(0.0, "Time outside before an exit is confirmed", min=0)
    geofence_exit_buffer_m: float = _opt(0.0, "Distance beyond the boundary before a device counts as outside", min=0)
    geofence_min_accuracy_m: float = _opt(
        0.0, "Fixes reporting a worse accuracy do not change geofence state (0: off)", min=0
    )
    geofence_dwell_s: float = _opt(0.0, "Emit one dwell event after this long inside (0: off)", min=0)
    # --- alerts -------------------------------------------------------------------------------------------
    rules_file: str = _opt("", "YAML or JSON alert rules to publish to the rules topic and load at start")
    timer_interval_s: float = _opt(
        1.0, "How often the worker checks timers (offline devices, held fixes, timed alert conditions)", min=0.05
    )
    alert_lateness_s: float = _opt(
        30.0, "Alert deadlines (offline, durations met on held values) fire from the timer once the partition's "
        "event time is this far past them, so fixes uploaded that late still count", min=0,
    )
    alert_idle_s: float = _opt(
        10.0, "A partition without input this long (wall time) follows the worker's event clock, which runs on with "
        "the wall clock once no input arrives at all", min=0.1,
    )
    max_geofence_vertices: int = _opt(10_000, "Geofences with more vertices are refused", min=4)
    # --- aggregation (event-time windows) ----------------------------------------------------------------
    aggregation_enabled: bool = _opt(
        True, "Windowed statistics per H3 cell (to the cells topic), per geofence and for the fleet"
    )
    aggregation_resolutions: tuple[int, ...] = _opt((7, 8), "H3 resolutions cells are aggregated at", min=0, max=15)
    aggregation_window_s: float = _opt(60.0, "Window size, seconds of event time", min=0.001)
    aggregation_step_s: float = _opt(0.0, "Hopping windows: a window starts every this many seconds (0: tumbling)",
                                     min=0)
    aggregation_grace_s: float = _opt(
        10.0, "Fixes up to this late (behind the partition's newest event time) still update their window", min=0
    )
    aggregation_retention_s: float = _opt(3600.0, "How long closed windows stay queryable (event time)", min=0)
    aggregation_interim_s: float = _opt(
        0.0, "Also publish interim (final=false) values of open windows at most this often, in event time "
        "(0: final values only)", min=0,
    )
    aggregation_idle_s: float = _opt(
        30.0, "A partition with no input for this long (wall time) stops holding back the closing of windows",
        min=0.1,
    )
    fleet_offline_after_s: float = _opt(
        600.0, "The fleet summary (GET /fleet) counts a device offline when its last fix is older than this", min=1
    )
    # --- RFID assets (readers, reads, asset state, inventory) ---------------------------------------------
    rfid_topic: str = _opt("fleet.rfid", "Input: RFID reads {tag_id, reader_id, ts, rssi_dbm?, antenna?} (key tag_id)")
    readers_topic: str = _opt("fleet.readers", "Compacted: RFID readers (key reader_id; null deletes)")
    asset_registry_topic: str = _opt(
        "fleet.asset.registry", "Compacted: per-tag asset metadata (keep_inside, authorised_vehicles, "
        "expected_zones, timeouts; key tag_id; null deletes)",
    )
    assets_topic: str = _opt("fleet.assets", "Output: asset arrived/departed/loaded/unloaded events (key tag_id)")
    readers_file: str = _opt("", "JSON or YAML readers file to publish to the readers topic and load at start")
    assets_file: str = _opt("", "JSON or YAML asset metadata file to publish to the asset registry topic at start")
    rfid_unknown_reader: str = _opt(
        "deadletter", "A read from a reader the registry does not know: dead-letter it (reason unknown_reader), "
        "or hold it in the tag's held reads until the reader is defined (at most rfid_hold_max per tag, for "
        "rfid_hold_s; then dead-lettered)", choices=("deadletter", "hold"),
    )
    rfid_hold_max: int = _opt(100, "Most reads held per tag while their reader is unknown", min=1)
    rfid_hold_s: float = _opt(300.0, "Longest a read waits for its unknown reader (event time)", min=0)
    rfid_dedup_window_s: float = _opt(1.0, "Reads of a tag by one reader within this window are duplicates", min=0)
    rfid_switch_margin_db: float = _opt(
        6.0, "Another place takes a tag at once when its reader is this many dB stronger", min=0.001
    )
    rfid_switch_after_s: float = _opt(
        5.0, "Another place takes a tag when its current place has not read it this long (at least twice the "
        "dedup window)", min=0,
    )
    rfid_missing_after_s: float = _opt(
        0.0, "asset_missing after this long unread at a storage place (0: only assets that set missing_after_s)",
        min=0,
    )
    rfid_separation_after_s: float = _opt(
        120.0, "separation when a loaded asset is not read by its moving vehicle this long (0: off)", min=0
    )
    rfid_unaccompanied_motion: bool = _opt(True, "Alert when an asset moves between fixed places with no vehicle")
    rfid_lateness_s: float = _opt(
        2.0, "Deadlines (switches, missing, separation) fire this long after the event time reaches them, so "
        "reads that arrive that late still count", min=0,
    )
    rfid_idle_s: float = _opt(
        5.0, "A partition without reads this long (wall time) follows the worker's event clock, which runs on with "
        "the wall clock once no reads arrive at all", min=0.1,
    )
    rfid_vehicle_lookback: int = _opt(
        10_000, "Enriched positions re-read per partition at start to learn where reader-carrying vehicles are",
        min=0,
    )
    # --- storage and serving ------------------------------------------------------------------------------
    data_dir: str = _opt("fleetstream-data", "Directory for table storage (RocksDB) and worker state")
    table_store: str = _opt(
        "auto", "Table storage: rocksdb, memory, or auto (rocksdb when rocksdict is installed)",
        choices=("auto", "rocksdb", "memory"),
    )
    web_host: str = _opt("0.0.0.0", "HTTP API / metrics bind address")
    web_port: int = _opt(6066, "HTTP API / metrics port", min=1, max=65535)
    metrics_enabled: bool = _opt(
        True, "Record Prometheus metrics (off: /metrics serves an empty registry; for overhead measurements)"
    )
    advertised_url: str = _opt(
        "", "URL other workers reach this worker's API at, for routing requests to a key's owner "
        "(default http://<hostname>:<web_port>)"
    )
    api_token: str = _opt("", "Bearer token the HTTP API requires when set (health, ready and metrics stay open)")
    log_level: str = _opt("warning", "debug, info, warning or error", choices=("debug", "info", "warning", "error"))

    # -----------------------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        for f in fields(self):
            _check(f.name, getattr(self, f.name), f.metadata)
        for server in self.bootstrap_servers:
            if not re.fullmatch(r"[\w.\-]+:\d{1,5}|\[[0-9a-fA-F:]+\]:\d{1,5}", server):
                raise SettingsError(f"broker: {self.broker!r} is not kafka://host:port[,host:port]")
        if self.aggregation_enabled:
            if not self.aggregation_resolutions:
                raise SettingsError("aggregation_resolutions: give at least one resolution (or turn aggregation off)")
            if max(self.aggregation_resolutions) > self.h3_resolution:
                raise SettingsError(
                    f"aggregation_resolutions: {max(self.aggregation_resolutions)} is finer than h3_resolution "
                    f"{self.h3_resolution} (cells are aggregated from the fixes' cells)")
            try:
                self.window_spec()
            except ValueError as exc:
                raise SettingsError(f"aggregation_window_s / step / grace / retention: {exc}") from exc

    def window_spec(self) -> WindowSpec:
        """The aggregation windows these settings describe."""
        return WindowSpec(self.aggregation_window_s, self.aggregation_step_s or None, self.aggregation_grace_s,
                          self.aggregation_retention_s)

    @property
    def bootstrap_servers(self) -> list[str]:
        """``kafka://a:9092,b:9092`` -> ``["a:9092", "b:9092"]``."""
        raw = self.broker.removeprefix("kafka://")
        return [part.strip().removeprefix("kafka://") for part in raw.split(",") if part.strip()]

    @property
    def all_h3_resolutions(self) -> tuple[int, ...]:
        return (self.h3_resolution, *[r for r in self.h3_extra_resolutions if r != self.h3_resolution])

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``FLEETSTREAM_*`` variables from ``env``, then ``overrides`` (CLI flags; None = unset)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = parse_value(f.name, raw, f.type)
        for name, value in overrides.items():
            if value is None:
                continue
            if name not in _FIELD_TYPES:
                raise SettingsError(f"{name}: unknown setting")
            values[name] = parse_value(name, value, _FIELD_TYPES[name]) if isinstance(value, str) else value
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_env(self) -> dict[str, str]:
        """``FLEETSTREAM_*`` variables that reproduce these settings in a child process (demo, tests)."""
        env = {}
        for f in fields(self):
            value = getattr(self, f.name)
            env[ENV_PREFIX + f.name.upper()] = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        return env

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked, for logs and the status endpoint."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for secret in ("sasl_password", "api_token"):
            if out[secret]:
                out[secret] = "***"
        return out


def setting_fields() -> list[tuple[str, type, Any, str, dict[str, Any]]]:
    """(name, type, default, help, checks) for every setting: what the CLI builds its flags from."""
    out = []
    for f in fields(Settings):
        default = f.default if f.default is not MISSING else None
        out.append((f.name, _FIELD_TYPES[f.name], default, f.metadata["help"], dict(f.metadata)))
    return out


def parse_value(name: str, raw: Any, type_: Any) -> Any:
    """Parse a string from the environment or a flag into the field's type, naming the setting on failure."""
    if isinstance(type_, str):
        type_ = _FIELD_TYPES[name]
    origin = typing.get_origin(type_)
    try:
        if type_ is bool:
            lowered = str(raw).strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if type_ is int:
            return int(str(raw).strip())
        if type_ is float:
            value = float(str(raw).strip())
            if not math.isfinite(value):
                raise ValueError("expected a finite number")
            return value
        if origin is tuple:
            return tuple(int(part) for part in str(raw).split(",") if part.strip())
        if origin in (types.UnionType, typing.Union):
            return str(raw)
        return str(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} ({ENV_PREFIX}{name.upper()}): invalid value {raw!r}: {exc}") from None


def _check(name: str, value: Any, meta: Mapping[str, Any]) -> None:
    items = value if isinstance(value, tuple) else (value,)
    for item in items:
        if isinstance(item, bool) and _FIELD_TYPES[name] is not bool:
            raise SettingsError(f"{name}: expected a number, got {item!r}")
        if "min" in meta and item < meta["min"]:
            raise SettingsError(f"{name}: {item!r} is below the minimum {meta['min']}")
        if "max" in meta and item > meta["max"]:
            raise SettingsError(f"{name}: {item!r} is above the maximum {meta['max']}")
        if "choices" in meta and item not in meta["choices"]:
            raise SettingsError(f"{name}: {item!r} is not one of {', '.join(meta['choices'])}")


_FIELD_TYPES: dict[str, Any] = typing.get_type_hints(Settings)
