"""RFID asset tracking: per-tag de-duplication, zone resolution with hysteresis, asset events, inventory, alerts.

Pure and per tag, like :mod:`fleetstream.domain.tracking`: the worker keeps one :class:`AssetState` per tag in a
changelogged table (key ``tag_id``, value :meth:`AssetState.to_dict`) and calls

- :func:`step` ``(state | None, read, readers, vehicles, assets, config) -> (state, events, alerts)`` per read;
- :func:`tick` ``(state, now_ms, ...)`` for a tag whose :func:`next_deadline` has come (timers);

then publishes the :class:`AssetEvent` s on ``fleet.assets`` and the :class:`AssetAlert` s on ``fleet.alerts``,
and feeds the events to an :class:`Inventory`. ``vehicles`` maps ``vehicle_id`` to the vehicle's latest state
(anything with ``lat``, ``lon``, ``motion`` and ``geofences``: a ``DeviceState`` will do, or :class:`VehicleFix`).

**De-duplication.** Per (tag, reader), the first read opens a window of ``dedup_window_s``; later reads inside it
are duplicates: they only raise the window's aggregate (strongest rssi, latest ts): no registry, no resolution,
the state rebuilt only when the aggregate changed (0.5 µs when it did not, ~1 µs when it did, with the state in
cache; 2-4 µs over 10,000 tags on the shared 2-core machine: ``benchmarks/rfid_domain.py``). A read older than
its reader's current window is late and ignored. Zone resolution runs once per window per reader.

**Resolution with hysteresis.** A tag has one resolved reader and *place* (readers of one zone are one place, see
:mod:`fleetstream.domain.readers`). A reader of another place takes the tag over when

- it wins clearly: its window's strongest rssi beats the resolved reader's (seen within ``switch_after_s``) by
  ``switch_margin_db`` (never a boundary reader over a fresh vehicle reader: gates read passing trucks' loads); or
- the current place has not read the tag for ``switch_after_s`` while another place has read it since (more
  than a dedup window after the current place's last read: a tag leaving every reader's range stays where it
  was instead of following whichever neighbour read it last). Of those, the one(s) read most recently (within
  a dedup window of the latest) win, strongest first.

So noise from neighbouring readers within the margin, while both keep reading, moves nothing.

**Time.** Every output time is an event time taken from the inputs, never the worker's clock, so a replay gives
the same events and ids (the house rule of the alert engine). Conditions that come due by time alone (a switch,
``asset_missing``, ``separation``) fire at their *deadline*, from :func:`tick` or from the tag's next read, which
first fires every deadline up to its own time; the output carries the deadline either way. Only ``separation``
reads something current at that moment (whether the vehicle is moving); if it is not, the check is repeated
``recheck_s`` after the time it was made. Pass ``tick`` a watermark (the worker's clock less the lateness reads
may have) rather than the bare wall clock, or a late read can lose a switch it would have prevented.

**Events** per place change, in this order: ``departed`` (each zone left), ``unloaded`` (from the old vehicle),
``loaded`` (onto the new one), ``arrived`` (each zone entered). A tag on a vehicle is in the vehicle's geofences,
refreshed at each read by the vehicle's reader, so containers are seen travelling with the truck; those arrived
and departed events carry the vehicle_id. Every event of one change carries the new reader and location.

**Alerts** (schemas/alert.json shape, id ``rule:tag_id:raised_ms``, same id on the clear):

- ``asset_missing``: resolved at a storage place that expects it (the asset's ``expected_zones``, or any storage
  zone) and not read anywhere for ``missing_after_s``. Cleared by the next read.
- ``unauthorised_exit``: a ``keep_inside`` asset inside the site resolves to a boundary (gate, exit) or outside
  reader other than on one of its ``authorised_vehicles``, or, on a vehicle not authorised for it, is read by a
  boundary reader. Cleared when it is back at a storage place.
- ``unaccompanied_motion``: an asset at a storage place resolves to another fixed place with no vehicle between.
  Cleared by its next change of place (which may raise a new one).
- ``separation``: an asset on a vehicle has not been read by the vehicle's readers for ``separation_after_s``
  while the vehicle moves. Cleared when the vehicle reads it again or it is resolved anywhere else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from fleetstream.domain.models import RfidRead
from fleetstream.domain.readers import BOUNDARY, OUTSIDE, STORAGE, VEHICLE, Reader, ReaderError, ReaderRegistry

STATE_VERSION = 1
NEVER = 1 << 62  # "no deadline" (written as null)
MAX_ID_LEN = 128

ASSET_MISSING = "asset_missing"
UNAUTHORISED_EXIT = "unauthorised_exit"
UNACCOMPANIED_MOTION = "unaccompanied_motion"
SEPARATION = "separation"
RULES = (ASSET_MISSING, UNAUTHORISED_EXIT, UNACCOMPANIED_MOTION, SEPARATION)
SEVERITIES = ("critical", "major", "minor", "warning", "info")
DEFAULT_SEVERITIES: Mapping[str, str] = {
    ASSET_MISSING: "major", UNAUTHORISED_EXIT: "critical", UNACCOMPANIED_MOTION: "warning", SEPARATION: "major",
}

ARRIVED, DEPARTED, LOADED, UNLOADED = "arrived", "departed", "loaded", "unloaded"


# --- configuration and asset metadata ---------------------------------------------------------------------------

class AssetError(ValueError):
    """Asset metadata (or an asset config) that cannot be used; the message names the asset and the problem."""


@dataclass(frozen=True, slots=True, eq=False)
class AssetConfig:
    """Worker-wide settings; per-asset metadata overrides the alert timeouts and the motion rule.

    ``missing_after_s`` and ``separation_after_s`` are at least the dedup window (shorter values are raised to
    it): a read after one of them is then always a window's first read, which is what clears look at.
    ``switch_after_s`` is at least two windows: a candidate must read the tag for more than a window after the
    current place last did, and the duplicates of a window opened before the switch are then never needed.
    """

    dedup_window_s: float = 1.0
    switch_margin_db: float = 6.0
    switch_after_s: float = 5.0
    missing_after_s: float | None = None  # None/0: asset_missing only for assets that set missing_after_s
    separation_after_s: float | None = 120.0  # None/0: off unless set per asset
    unaccompanied_motion: bool = True
    recheck_s: float = 30.0  # separation re-check while the vehicle is not moving
    max_sightings: int = 8  # readers remembered per tag (the resolved one always kept)
    severities: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_SEVERITIES))
    dedup_ms: int = field(init=False)
    switch_ms: int = field(init=False)
    recheck_ms: int = field(init=False)

    def __post_init__(self) -> None:
        for name in ("dedup_window_s", "switch_margin_db", "switch_after_s", "recheck_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or value < 0:
                raise AssetError(f"config: {name} must be a number >= 0, got {value!r}")
        if self.switch_margin_db <= 0:
            raise AssetError("config: switch_margin_db must be > 0 (inf turns margin switches off)")
        if self.recheck_s <= 0 or not math.isfinite(self.recheck_s) or not math.isfinite(self.dedup_window_s):
            raise AssetError("config: recheck_s must be > 0 and finite, dedup_window_s finite")
        if not math.isfinite(self.switch_after_s) or self.switch_after_s < 2 * self.dedup_window_s:
            raise AssetError(f"config: switch_after_s ({self.switch_after_s}) must be finite and at least twice "
                             f"dedup_window_s ({self.dedup_window_s})")
        for name in ("missing_after_s", "separation_after_s"):
            _timeout(getattr(self, name), f"config: {name}")
        if self.max_sightings < 2:
            raise AssetError("config: max_sightings must be at least 2")
        unknown = set(self.severities) - set(RULES)
        bad = {rule: level for rule, level in self.severities.items() if level not in SEVERITIES}
        if unknown or bad:
            raise AssetError(f"config: severities: unknown rules {sorted(unknown)} or levels {bad}")
        set_ = object.__setattr__
        set_(self, "severities", {**DEFAULT_SEVERITIES, **self.severities})
        set_(self, "dedup_ms", round(self.dedup_window_s * 1000))
        set_(self, "switch_ms", round(self.switch_after_s * 1000))
        set_(self, "recheck_ms", round(self.recheck_s * 1000))


def _timeout(value: Any, label: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise AssetError(f"{label} must be a number of seconds >= 0 or null, got {value!r}")
    return float(value)


class AssetProfile(NamedTuple):
    """What the asset registry says about one tag. ``None`` fields take the config's value."""

    keep_inside: bool = False
    authorised_vehicles: frozenset[str] = frozenset()
    expected_zones: frozenset[str] | None = None  # None: any storage zone expects it
    missing_after_s: float | None = None
    separation_after_s: float | None = None
    unaccompanied_motion: bool | None = None
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"keep_inside": self.keep_inside,
                               "authorised_vehicles": sorted(self.authorised_vehicles)}
        if self.expected_zones is not None:
            out["expected_zones"] = sorted(self.expected_zones)
        for name in ("missing_after_s", "separation_after_s", "unaccompanied_motion", "name"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


DEFAULT_PROFILE = AssetProfile()
ASSET_FIELDS = frozenset({"tag_id", *AssetProfile._fields, "kind", "attributes"})


def parse_asset(tag_id: str, props: Any) -> AssetProfile:
    """One asset's metadata (``kind`` and ``attributes`` are accepted and ignored: they are for people)."""
    label = f"asset {tag_id!r}"
    if not isinstance(tag_id, str) or not 1 <= len(tag_id) <= MAX_ID_LEN:
        raise AssetError(f"{label}: tag_id must be a string of 1 to {MAX_ID_LEN} characters")
    if not isinstance(props, Mapping):
        raise AssetError(f"{label}: expected an object of properties, got {type(props).__name__}")
    unknown = sorted(set(props) - ASSET_FIELDS)
    if unknown:
        raise AssetError(f"{label}: unknown property {unknown[0]!r} (allowed: {', '.join(sorted(ASSET_FIELDS))})")
    if props.get("tag_id", tag_id) != tag_id:
        raise AssetError(f"{label}: tag_id {props['tag_id']!r} differs from its key")
    keep_inside = props.get("keep_inside", False)
    motion = props.get("unaccompanied_motion")
    if not isinstance(keep_inside, bool) or (motion is not None and not isinstance(motion, bool)):
        raise AssetError(f"{label}: keep_inside and unaccompanied_motion must be true or false")
    name = props.get("name")
    if name is not None and not isinstance(name, str):
        raise AssetError(f"{label}: name must be a string")
    expected = props.get("expected_zones")
    return AssetProfile(
        keep_inside,
        _ids(props.get("authorised_vehicles", ()), label, "authorised_vehicles"),
        None if expected is None else _ids(expected, label, "expected_zones"),
        _timeout(props.get("missing_after_s"), f"{label}: missing_after_s"),
        _timeout(props.get("separation_after_s"), f"{label}: separation_after_s"),
        motion,
        name,
    )


def _ids(value: Any, label: str, name: str) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, list | tuple | set | frozenset):
        raise AssetError(f"{label}: {name} must be a list of ids")
    for item in value:
        if not isinstance(item, str) or not 1 <= len(item) <= MAX_ID_LEN:
            raise AssetError(f"{label}: {name} must hold ids (strings of 1 to {MAX_ID_LEN} characters), got {item!r}")
    return frozenset(value)


class AssetRegistry(Mapping[str, AssetProfile]):
    """``tag_id -> AssetProfile``; ``get`` gives :data:`DEFAULT_PROFILE` for tags it does not list."""

    __slots__ = ("_assets",)

    def __init__(self, assets: Mapping[str, AssetProfile] | None = None) -> None:
        self._assets = dict(assets or {})

    @classmethod
    def from_dict(cls, data: Any) -> AssetRegistry:
        """``{tag_id: properties}``, a list of objects with ``tag_id``, or ``{"assets": either}``."""
        if isinstance(data, Mapping) and set(data) <= {"assets", "description"} and "assets" in data:
            data = data["assets"]
        if isinstance(data, list):
            pairs = []
            for item in data:
                if not isinstance(item, Mapping) or "tag_id" not in item:
                    raise AssetError(f"assets: every list item needs a tag_id, got {item!r}"[:200])
                pairs.append((item["tag_id"], item))
        elif isinstance(data, Mapping):
            pairs = list(data.items())
        else:
            raise AssetError("assets: expected {tag_id: properties} or a list of assets")
        table: dict[str, AssetProfile] = {}
        for tag_id, props in pairs:
            if tag_id in table:
                raise AssetError(f"asset {tag_id!r}: defined twice")
            table[tag_id] = parse_asset(tag_id, props)
        return cls(table)

    @classmethod
    def load(cls, path: str | Path) -> AssetRegistry:
        """An assets file, JSON or (by suffix) YAML."""
        path = Path(path)
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            import yaml

            try:
                return cls.from_dict(yaml.safe_load(text))
            except yaml.YAMLError as exc:
                raise AssetError(f"{path.name}: not valid YAML: {exc}") from None
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise AssetError(f"{path.name}: not valid JSON: {exc}") from None

    def get(self, tag_id: str, default: Any = DEFAULT_PROFILE) -> AssetProfile:  # type: ignore[override]
        return self._assets.get(tag_id, default)

    def __getitem__(self, tag_id: str) -> AssetProfile:
        return self._assets[tag_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._assets)

    def __len__(self) -> int:
        return len(self._assets)


NO_ASSETS = AssetRegistry()
DEFAULT_CONFIG = AssetConfig()


class VehicleLike(Protocol):
    """What resolution reads from a vehicle's latest state (``models.DeviceState`` qualifies)."""

    @property
    def lat(self) -> float: ...
    @property
    def lon(self) -> float: ...
    @property
    def motion(self) -> str: ...
    @property
    def geofences(self) -> tuple[str, ...]: ...


class VehicleFix(NamedTuple):
    """A minimal vehicle state for callers without a ``DeviceState`` (tests, replays)."""

    lat: float
    lon: float
    motion: str = "unknown"  # moving | stopped | unknown
    geofences: tuple[str, ...] = ()


_NO_VEHICLES: Mapping[str, VehicleLike] = {}


# --- outputs ------------------------------------------------------------------------------------------------------

class AssetEvent(NamedTuple):
    """One ``fleet.assets`` message (schemas/asset_event.json), time as epoch ms."""

    type: str  # arrived | departed | loaded | unloaded
    tag_id: str
    ts_ms: int
    zone_id: str | None
    reader_id: str | None
    vehicle_id: str | None
    lat: float | None
    lon: float | None

    @property
    def event_id(self) -> str:
        """Stable across replays, distinct for the several events of one change (they share a time)."""
        return f"{self.tag_id}:{self.type}:{self.zone_id if self.zone_id is not None else self.vehicle_id}:{self.ts_ms}"

    def to_dict(self, format_ts: Callable[[int], str]) -> dict[str, Any]:
        """The message; ``format_ts`` is ``codecs.format_ts`` (the domain does not import codecs)."""
        return {"event_id": self.event_id, "type": self.type, "tag_id": self.tag_id, "zone_id": self.zone_id,
                "reader_id": self.reader_id, "vehicle_id": self.vehicle_id, "ts": format_ts(self.ts_ms),
                "lat": self.lat, "lon": self.lon}


class AssetAlert(NamedTuple):
    """One ``fleet.alerts`` message (schemas/alert.json), time as epoch ms. Same fields, in the same order, as
    ``alerts.Alert`` (severity and state as plain strings), so the alert engine can take it over unchanged."""

    alert_id: str
    rule: str
    severity: str
    state: str  # raised | cleared
    subject_id: str  # the tag
    ts_ms: int
    details: dict[str, Any]

    def to_dict(self, format_ts: Callable[[int], str]) -> dict[str, Any]:
        return {"alert_id": self.alert_id, "rule": self.rule, "severity": self.severity, "state": self.state,
                "subject_id": self.subject_id, "ts": format_ts(self.ts_ms), "details": self.details}


# --- state ---------------------------------------------------------------------------------------------------------

# One reader's latest dedup window for a tag: (first read of the window, latest read of the reader, strongest rssi
# of the window or None when no read in it reported one). A plain tuple: the duplicate path builds one per read.
Sighting = tuple[int, int, float | None]
WINDOW, LAST, RSSI = 0, 1, 2


class AssetState(NamedTuple):
    """Everything a worker remembers about one tag. Immutable: :func:`step` returns a new one when anything
    changed, the same object otherwise. The fields from ``others`` on are the ones duplicates update; the
    resolved reader's window has fields of its own (most duplicates come from it: no dict to copy)."""

    tag_id: str
    place: str  # the resolved place (readers.Reader.place)
    kind: str  # storage | boundary | outside | vehicle
    reader_id: str  # the resolved reader
    zones: tuple[str, ...]  # zones the asset is in: the reader's zone, or the vehicle's geofences; () once out
    vehicle_id: str | None
    lat: float
    lon: float
    since_ms: int  # arrived at the current place
    first_seen_ms: int
    inside: bool  # inside the site: at a storage place, or carried from one, and not past a boundary since
    alerts: dict[str, int]  # active alert rule -> raised_ms (never mutated: replaced)
    sep_recheck_ms: int | None  # separation: earliest re-check after a check found the vehicle not moving
    deadline_ms: int  # earliest time a timer may have work (a lower bound); NEVER when none
    others: dict[str, Sighting]  # the other readers' latest windows (never mutated: replaced)
    last_seen_ms: int  # latest read by any reader
    place_seen_ms: int  # latest read by a reader of the resolved place
    clock_ms: int  # latest input time applied (reads and fired deadlines): outputs never go back before it
    window_ms: int  # the resolved reader's latest window: its first read,
    read_ms: int  # its latest read,
    rssi: float | None  # and its strongest rssi

    @property
    def sightings(self) -> dict[str, Sighting]:
        """Every remembered reader's latest window (the resolved reader's included)."""
        return {self.reader_id: (self.window_ms, self.read_ms, self.rssi), **self.others}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only; ``from_dict(to_dict(s)) == s``."""
        return {
            "v": STATE_VERSION, "tag_id": self.tag_id, "place": self.place, "kind": self.kind,
            "reader_id": self.reader_id, "zones": list(self.zones), "vehicle_id": self.vehicle_id,
            "lat": self.lat, "lon": self.lon, "since_ms": self.since_ms, "first_seen_ms": self.first_seen_ms,
            "inside": self.inside, "alerts": dict(self.alerts), "sep_recheck_ms": self.sep_recheck_ms,
            "deadline_ms": None if self.deadline_ms >= NEVER else self.deadline_ms,
            "last_seen_ms": self.last_seen_ms, "place_seen_ms": self.place_seen_ms, "clock_ms": self.clock_ms,
            "sightings": {reader: [s[0], s[1], s[2]] for reader, s in self.sightings.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AssetState:  # type: ignore[misc]
        if data.get("v") != STATE_VERSION:
            raise ValueError(f"asset state of tag {data.get('tag_id')!r}: unknown version {data.get('v')!r}")
        deadline = data["deadline_ms"]
        reader_id = data["reader_id"]
        sightings = {reader: (int(s[0]), int(s[1]), None if s[2] is None else float(s[2]))
                     for reader, s in data["sightings"].items()}
        window, read, rssi = sightings.pop(reader_id)
        return cls(
            data["tag_id"], data["place"], data["kind"], reader_id, tuple(data["zones"]),
            data["vehicle_id"], float(data["lat"]), float(data["lon"]), int(data["since_ms"]),
            int(data["first_seen_ms"]), bool(data["inside"]), {k: int(v) for k, v in data["alerts"].items()},
            data["sep_recheck_ms"], NEVER if deadline is None else int(deadline), sightings,
            int(data["last_seen_ms"]), int(data["place_seen_ms"]), int(data["clock_ms"]), window, read, rssi,
        )

    def summary(self) -> dict[str, Any]:
        """Where the asset is, for the query API."""
        return {"tag_id": self.tag_id, "zones": list(self.zones), "reader_id": self.reader_id,
                "vehicle_id": self.vehicle_id, "lat": self.lat, "lon": self.lon, "inside": self.inside,
                "since_ms": self.since_ms, "first_seen_ms": self.first_seen_ms, "last_seen_ms": self.last_seen_ms,
                "alerts": sorted(self.alerts)}


def next_deadline(state: AssetState) -> int | None:
    """When :func:`tick` may next have work for this tag (never later than the real deadline), or None."""
    return None if state.deadline_ms >= NEVER else state.deadline_ms


# --- the step ------------------------------------------------------------------------------------------------------

_new = tuple.__new__
_NOTHING: tuple[Any, ...] = ()


def step(
    state: AssetState | None,
    read: RfidRead,
    readers: ReaderRegistry,
    vehicles: Mapping[str, VehicleLike] = _NO_VEHICLES,
    assets: AssetRegistry = NO_ASSETS,
    config: AssetConfig = DEFAULT_CONFIG,
) -> tuple[AssetState, tuple[AssetEvent, ...] | list[AssetEvent], tuple[AssetAlert, ...] | list[AssetAlert]]:
    """Advance one tag by one read (decoded and validated). The reader must be in ``readers``: the worker
    dead-letters or holds reads from unknown readers first (:class:`ReaderError` otherwise).

    The duplicate path comes first and is kept short: it runs for most reads."""
    if state is not None:
        reader_id = read.reader_id
        t = read.ts_ms
        if reader_id == state.reader_id:  # the resolved reader: most duplicates
            window = state.window_ms
            if window <= t < window + config.dedup_ms and t < state.deadline_ms:
                rssi = read.rssi_dbm
                best = state.rssi
                last = state.read_ms
                if rssi is not None and (best is None or rssi > best):
                    best = rssi
                elif t <= last:
                    return state, _NOTHING, _NOTHING  # adds nothing to the window's aggregate
                if t > last:
                    last = t
                last_seen, place_seen, clock = state.last_seen_ms, state.place_seen_ms, state.clock_ms
                return _new(AssetState, state[:15] + (  # noqa: RUF005 (concatenation: 120 vs 200 ns)
                    t if t > last_seen else last_seen, t if t > place_seen else place_seen, t if t > clock else clock,
                    window, last, best,
                )), _NOTHING, _NOTHING
        else:
            seen = state.others.get(reader_id)
            if seen is not None:
                window, last, best = seen
                if window <= t < window + config.dedup_ms and t < state.deadline_ms:
                    rssi = read.rssi_dbm
                    if rssi is not None and (best is None or rssi > best):
                        best = rssi
                    elif t <= last:
                        return state, _NOTHING, _NOTHING
                    if t > last:
                        last = t
                    others = state.others.copy()
                    others[reader_id] = (window, last, best)
                    last_seen, place_seen, clock = state.last_seen_ms, state.place_seen_ms, state.clock_ms
                    if t > place_seen and _same_place(readers, reader_id, state.place):
                        place_seen = t
                    return _new(AssetState, state[:14] + (  # noqa: RUF005
                        others, t if t > last_seen else last_seen, place_seen, t if t > clock else clock,
                    ) + state[18:]), _NOTHING, _NOTHING
    reader = readers.get(read.reader_id)
    if reader is None:
        raise ReaderError(f"reader {read.reader_id!r}: unknown (read of tag {read.tag_id!r}); "
                          f"dead-letter or hold such reads before the step")
    work = _Work(read.tag_id, readers, vehicles, assets.get(read.tag_id), config)
    if state is None:
        work.first(read, reader)
    else:
        work.load(state)
        work.read(read, reader)
    return work.freeze(), work.events, work.alerts


def tick(
    state: AssetState,
    now_ms: int,
    readers: ReaderRegistry,
    vehicles: Mapping[str, VehicleLike] = _NO_VEHICLES,
    assets: AssetRegistry = NO_ASSETS,
    config: AssetConfig = DEFAULT_CONFIG,
) -> tuple[AssetState, list[AssetEvent], list[AssetAlert]]:
    """Fire what has come due by ``now_ms`` (a watermark, see the module doc). The same state object comes back
    when nothing was due, so the caller can skip the changelog write."""
    if now_ms < state.deadline_ms:
        return state, [], []
    work = _Work(state.tag_id, readers, vehicles, assets.get(state.tag_id), config)
    work.load(state)
    work.fire(now_ms)
    work.deadline_ms = work.deadline()
    return work.freeze(), work.events, work.alerts


class _Work:
    """A mutable copy of one tag's state for the (rarer) non-duplicate path: easier to follow than rebuilding
    tuples at every turn, and it collects the events and alerts."""

    # The state's ``alerts`` (active rule -> raised_ms) lives in ``active`` (``alerts`` collects the outputs), and
    # its readers' windows, the resolved one's included, in one dict: ``sightings``.
    __slots__ = ("active", "alerts", "clock_ms", "config", "deadline_ms", "events", "first_seen_ms", "inside", "kind",
                 "last_seen_ms", "lat", "lon", "missing_ms", "motion_rule", "place", "place_seen_ms", "profile",
                 "reader_id", "readers", "sep_recheck_ms", "separation_ms", "sightings", "since_ms", "tag_id",
                 "vehicle_id", "vehicles", "zones")

    def __init__(self, tag_id: str, readers: ReaderRegistry, vehicles: Mapping[str, VehicleLike],
                 profile: AssetProfile, config: AssetConfig) -> None:
        self.tag_id = tag_id
        self.readers = readers
        self.vehicles = vehicles
        self.profile = profile
        self.config = config
        self.events: list[AssetEvent] = []
        self.alerts: list[AssetAlert] = []
        self.missing_ms, self.separation_ms, self.motion_rule = _rules(profile, config)

    # -- state in and out

    def load(self, state: AssetState) -> None:
        (_, self.place, self.kind, self.reader_id, self.zones, self.vehicle_id, self.lat, self.lon, self.since_ms,
         self.first_seen_ms, self.inside, self.active, self.sep_recheck_ms, self.deadline_ms, others,
         self.last_seen_ms, self.place_seen_ms, self.clock_ms, window, read, rssi) = state
        self.sightings = {self.reader_id: (window, read, rssi), **others}

    def freeze(self) -> AssetState:
        sightings = self.sightings
        reader_id = self.reader_id
        window, read, rssi = sightings[reader_id]
        others = {reader: seen for reader, seen in sightings.items() if reader != reader_id}
        return _new(AssetState, (
            self.tag_id, self.place, self.kind, reader_id, self.zones, self.vehicle_id, self.lat, self.lon,
            self.since_ms, self.first_seen_ms, self.inside, self.active, self.sep_recheck_ms, self.deadline_ms,
            others, self.last_seen_ms, self.place_seen_ms, self.clock_ms, window, read, rssi,
        ))

    # -- the first read of a tag

    def first(self, read: RfidRead, reader: Reader) -> None:
        t = read.ts_ms
        self.sightings = {reader.reader_id: (t, t, read.rssi_dbm)}
        self.active = {}
        self.first_seen_ms = self.last_seen_ms = self.place_seen_ms = self.clock_ms = self.since_ms = t
        self.sep_recheck_ms = None
        self.place, self.kind, self.zones, self.vehicle_id = "", "", (), None
        self.inside = False
        self.reader_id = reader.reader_id
        self.move(reader, t, read_ms=t, alerts=False)
        self.deadline_ms = self.deadline()

    # -- a read the fast path did not take: a window's first read, or one at/after a deadline

    def read(self, read: RfidRead, reader: Reader) -> None:
        t = read.ts_ms
        config = self.config
        self.fire(t)
        seen = self.sightings.get(reader.reader_id)
        rssi = read.rssi_dbm
        if seen is not None and t < seen[WINDOW]:
            self.deadline_ms = self.deadline()
            return  # late: older than the reader's current window
        unique = seen is None or t >= seen[WINDOW] + config.dedup_ms
        if seen is None:
            self.sightings[reader.reader_id] = (t, t, rssi)
        elif unique:
            self.sightings[reader.reader_id] = (t, max(t, seen[LAST]), rssi)
        else:  # a duplicate that came this way because a deadline was due: what the duplicate path does
            best = seen[RSSI] if rssi is None or (seen[RSSI] is not None and seen[RSSI] >= rssi) else rssi
            self.sightings[reader.reader_id] = (seen[WINDOW], max(seen[LAST], t), best)
        self.last_seen_ms = max(self.last_seen_ms, t)
        self.clock_ms = max(self.clock_ms, t)
        if reader.reader_id == self.reader_id or reader.place == self.place:
            self.place_seen_ms = max(self.place_seen_ms, t)
        if ASSET_MISSING in self.active:
            self.clear(ASSET_MISSING, self.clock_ms, reader_id=reader.reader_id, zone_id=reader.zone_id)
        if unique:
            self.resolve(reader, t)
        self.prune()
        self.deadline_ms = self.deadline(fired=False)
        if self.deadline_ms <= self.clock_ms:  # the read made something due already
            self.fire(self.clock_ms)
        self.deadline_ms = self.deadline()

    def resolve(self, reader: Reader, t: int) -> None:
        """A window's first read at ``reader``: refresh the current place, or weigh a move to the reader's."""
        config = self.config
        now = self.clock_ms
        current = self.sightings.get(self.reader_id)
        challenger = self.sightings[reader.reader_id]
        if reader.place == self.place:
            if reader.reader_id != self.reader_id and (
                    current is None or now - current[LAST] >= config.switch_ms or _wins(challenger, current, config)):
                self.reader_id = reader.reader_id
                if reader.kind != VEHICLE:
                    self.lat, self.lon = reader.lat, reader.lon
            if reader.kind == VEHICLE:
                self.follow_vehicle(reader, now)
            if SEPARATION in self.active:
                self.clear(SEPARATION, now, reader_id=reader.reader_id, vehicle_id=reader.vehicle_id)
            return
        if reader.reader_id == self.reader_id:  # the resolved reader was redefined: its place changed, not the tag's
            self.move(reader, now, read_ms=t, alerts=False)
            return
        vehicle_fresh = self.kind == VEHICLE and current is not None and now - current[LAST] < config.switch_ms
        if reader.kind == BOUNDARY and self.kind == VEHICLE:
            self.boundary_on_vehicle(reader, now)
        if (current is not None and now - current[LAST] < config.switch_ms
                and not (vehicle_fresh and reader.kind == BOUNDARY) and _wins(challenger, current, config)):
            self.move(reader, now, read_ms=challenger[LAST])
        elif now - self.place_seen_ms >= config.switch_ms:
            best = self.best_candidate()
            if best is not None:
                self.move(best, now, read_ms=self.sightings[best.reader_id][LAST])

    # -- timers

    def fire(self, now: int) -> None:
        """Everything due at or before ``now``, earliest first, each at its own deadline."""
        if now < self.deadline_ms:
            return
        for _ in range(16):  # each round changes the state; a handful is the most one call ever needs
            switch = self.switch_deadline(armed_only=False)
            missing = self.missing_deadline()
            separation = self.separation_deadline()
            due = min(switch, missing, separation)
            if due > now:
                return
            which = "switch" if due == switch else ASSET_MISSING if due == missing else SEPARATION
            due = self.clock_ms = max(self.clock_ms, due)  # outputs never go back in time
            if which == "switch":
                best = self.best_candidate()
                assert best is not None
                self.move(best, due, read_ms=self.sightings[best.reader_id][LAST])
            elif which == ASSET_MISSING:
                self.raise_(ASSET_MISSING, due, zone_id=self.zones[0] if self.zones else None,
                            reader_id=self.reader_id, last_seen_ms=self.last_seen_ms,
                            missing_after_s=self.missing_ms / 1000)
            else:
                vehicle = self.vehicles.get(self.vehicle_id) if self.vehicle_id is not None else None
                if vehicle is not None and vehicle.motion == "moving":
                    self.raise_(SEPARATION, due, vehicle_id=self.vehicle_id, reader_id=self.reader_id,
                                last_read_ms=self.place_seen_ms, separation_after_s=self.separation_ms / 1000)
                else:
                    self.sep_recheck_ms = now + self.config.recheck_ms

    def switch_deadline(self, armed_only: bool) -> int:
        """When the current place goes stale with a candidate waiting; with ``armed_only``, the lower bound the
        cached deadline uses (also armed while another place's window is open: its duplicates, which skip all
        this, may still make it a candidate)."""
        place_seen = self.place_seen_ms
        since = place_seen + self.config.dedup_ms  # a candidate was read after this (see best_candidate)
        armed = False
        for reader_id, seen in self.sightings.items():
            reader = self.readers.get(reader_id)
            if reader is None or reader.place == self.place:
                continue
            if seen[LAST] > since:
                return place_seen + self.config.switch_ms
            if armed_only and seen[WINDOW] + self.config.dedup_ms > since:
                armed = True
        return place_seen + self.config.switch_ms if armed else NEVER

    def missing_deadline(self) -> int:
        if not self.missing_ms or self.kind != STORAGE or ASSET_MISSING in self.active:
            return NEVER
        expected = self.profile.expected_zones
        if expected is not None and not expected.intersection(self.zones):
            return NEVER
        return self.last_seen_ms + self.missing_ms

    def separation_deadline(self) -> int:
        if self.kind != VEHICLE or not self.separation_ms or SEPARATION in self.active:
            return NEVER
        due = self.place_seen_ms + self.separation_ms
        return max(due, self.sep_recheck_ms) if self.sep_recheck_ms is not None else due

    def deadline(self, fired: bool = True) -> int:
        """The cached lower bound of every deadline (checked by the duplicate path and :func:`next_deadline`)."""
        switch = self.switch_deadline(armed_only=True)
        if fired and switch <= self.clock_ms:  # nothing was due (fire ran): no candidate, every window closed
            switch = NEVER
        return min(switch, self.missing_deadline(), self.separation_deadline())

    def best_candidate(self) -> Reader | None:
        """Of the other places' readers that read the tag more than a dedup window after the current place last
        did, the most recent (within a window of the latest), strongest first. The window keeps a tag that
        leaves every reader's range where it was, rather than with whichever neighbour happened to read it last.
        """
        found = []
        since = self.place_seen_ms + self.config.dedup_ms
        for reader_id, seen in self.sightings.items():
            reader = self.readers.get(reader_id)
            if reader is not None and reader.place != self.place and seen[LAST] > since:
                found.append((seen, reader))
        if not found:
            return None
        latest = max(seen[LAST] for seen, _ in found)
        recent = [(seen, reader) for seen, reader in found if seen[LAST] >= latest - self.config.dedup_ms]
        return max(recent, key=lambda sr: (-math.inf if sr[0][RSSI] is None else sr[0][RSSI], sr[0][LAST],
                                           sr[1].reader_id))[1]

    def prune(self) -> None:
        """Forget readers that can no longer matter (bounded state): not read since the current place was, and not
        for a switch delay plus a window; then the oldest beyond ``max_sightings``. The resolved reader stays."""
        config = self.config
        horizon = self.clock_ms - config.switch_ms - config.dedup_ms
        sightings = self.sightings
        old = [reader_id for reader_id, seen in sightings.items() if reader_id != self.reader_id
               and seen[LAST] < horizon and seen[LAST] <= self.place_seen_ms]
        for reader_id in old:
            del sightings[reader_id]
        if len(sightings) > config.max_sightings:
            others = sorted((rid for rid in sightings if rid != self.reader_id),
                            key=lambda rid: (sightings[rid][LAST], rid))
            for reader_id in others[: len(sightings) - config.max_sightings]:
                del sightings[reader_id]

    # -- changes of place

    def place_of(self, reader: Reader) -> tuple[tuple[str, ...], str | None, float, float]:
        """(zones, vehicle, lat, lon) of an asset resolved at ``reader``."""
        if reader.kind == VEHICLE:
            vehicle = self.vehicles.get(reader.vehicle_id)  # type: ignore[arg-type]
            if vehicle is None:
                return (), reader.vehicle_id, reader.lat, reader.lon
            return tuple(vehicle.geofences or ()), reader.vehicle_id, float(vehicle.lat), float(vehicle.lon)
        zones = (reader.zone_id,) if reader.zone_id is not None and reader.kind != BOUNDARY else ()
        return zones, None, reader.lat, reader.lon

    def move(self, reader: Reader, ts: int, read_ms: int, alerts: bool = True) -> None:
        """Resolve the tag at ``reader``'s place from ``ts``; events, and the alerts a move raises or clears."""
        zones, vehicle_id, lat, lon = self.place_of(reader)
        old_zones, old_vehicle, old_kind = self.zones, self.vehicle_id, self.kind
        tag, rid, add = self.tag_id, reader.reader_id, self.events.append
        carrier = vehicle_id  # the vehicle the asset is on after the change
        for zone in old_zones:
            if zone not in zones:
                add(AssetEvent(DEPARTED, tag, ts, zone, rid, carrier, lat, lon))
        if old_vehicle is not None and old_vehicle != vehicle_id:
            add(AssetEvent(UNLOADED, tag, ts, None, rid, old_vehicle, lat, lon))
        if vehicle_id is not None and vehicle_id != old_vehicle:
            add(AssetEvent(LOADED, tag, ts, None, rid, vehicle_id, lat, lon))
        for zone in zones:
            if zone not in old_zones:
                add(AssetEvent(ARRIVED, tag, ts, zone, rid, carrier, lat, lon))
        if alerts:
            self.move_alerts(reader, ts, old_kind, old_vehicle, old_zones)
        if reader.kind == STORAGE:
            self.inside = True
        elif reader.kind in (BOUNDARY, OUTSIDE):
            self.inside = False
        self.place, self.kind, self.reader_id = reader.place, reader.kind, rid
        self.zones, self.vehicle_id, self.lat, self.lon = zones, vehicle_id, lat, lon
        self.since_ms = ts
        self.place_seen_ms = read_ms
        self.sep_recheck_ms = None

    def move_alerts(self, reader: Reader, ts: int, old_kind: str, old_vehicle: str | None,
                    old_zones: tuple[str, ...]) -> None:
        active = self.active
        rid = reader.reader_id
        if SEPARATION in active:
            self.clear(SEPARATION, ts, reader_id=rid, vehicle_id=old_vehicle)
        if UNACCOMPANIED_MOTION in active:
            self.clear(UNACCOMPANIED_MOTION, ts, reader_id=rid, zone_id=reader.zone_id)
        if UNAUTHORISED_EXIT in active and reader.kind == STORAGE:
            self.clear(UNAUTHORISED_EXIT, ts, reader_id=rid, zone_id=reader.zone_id)
        from_zone = old_zones[0] if old_zones else None
        if self.motion_rule and old_kind == STORAGE and reader.kind in (STORAGE, BOUNDARY, OUTSIDE):
            self.raise_(UNACCOMPANIED_MOTION, ts, from_zone=from_zone, from_reader=self.reader_id,
                        zone_id=reader.zone_id, reader_id=rid)
        profile = self.profile
        if (profile.keep_inside and self.inside and reader.kind in (BOUNDARY, OUTSIDE)
                and UNAUTHORISED_EXIT not in active
                and not (old_kind == VEHICLE and old_vehicle in profile.authorised_vehicles)):
            self.raise_(UNAUTHORISED_EXIT, ts, from_zone=from_zone, reader_id=rid, zone_id=reader.zone_id,
                        vehicle_id=old_vehicle if old_kind == VEHICLE else None)

    def boundary_on_vehicle(self, reader: Reader, ts: int) -> None:
        """A gate reads the load of a vehicle passing it: the asset leaves the site with the vehicle."""
        if not self.inside:
            return
        self.inside = False
        profile = self.profile
        if (profile.keep_inside and self.vehicle_id not in profile.authorised_vehicles
                and UNAUTHORISED_EXIT not in self.active):
            self.raise_(UNAUTHORISED_EXIT, ts, from_zone=None, reader_id=reader.reader_id, zone_id=reader.zone_id,
                        vehicle_id=self.vehicle_id)

    def follow_vehicle(self, reader: Reader, ts: int) -> None:
        """Read by its vehicle again: take the vehicle's position and geofences (travelling with it). A vehicle
        whose position is not known (yet, or no longer: a worker restarted) leaves the asset where it was, rather
        than taking it out of its geofences."""
        if self.vehicles.get(reader.vehicle_id) is None:  # type: ignore[arg-type]
            return
        zones, vehicle_id, lat, lon = self.place_of(reader)
        self.lat, self.lon = lat, lon
        if zones == self.zones:
            return
        tag, rid, add = self.tag_id, reader.reader_id, self.events.append
        for zone in self.zones:
            if zone not in zones:
                add(AssetEvent(DEPARTED, tag, ts, zone, rid, vehicle_id, lat, lon))
        for zone in zones:
            if zone not in self.zones:
                add(AssetEvent(ARRIVED, tag, ts, zone, rid, vehicle_id, lat, lon))
        self.zones = zones

    # -- alerts

    def raise_(self, rule: str, ts: int, **details: Any) -> None:
        if rule in self.active:
            return
        self.active = {**self.active, rule: ts}
        self.alerts.append(AssetAlert(f"{rule}:{self.tag_id}:{ts}", rule, self.config.severities[rule], "raised",
                                      self.tag_id, ts, details))

    def clear(self, rule: str, ts: int, **details: Any) -> None:
        active = dict(self.active)
        raised_ms = active.pop(rule)
        self.active = active
        self.alerts.append(AssetAlert(f"{rule}:{self.tag_id}:{raised_ms}", rule, self.config.severities[rule],
                                      "cleared", self.tag_id, ts, details))


def _same_place(readers: ReaderRegistry, reader_id: str, place: str) -> bool:
    reader = readers.get(reader_id)
    return reader is not None and reader.place == place


def _wins(challenger: Sighting, current: Sighting, config: AssetConfig) -> bool:
    return (challenger[RSSI] is not None and current[RSSI] is not None
            and challenger[RSSI] >= current[RSSI] + config.switch_margin_db)


@lru_cache(maxsize=4096)
def _rules(profile: AssetProfile, config: AssetConfig) -> tuple[int, int, bool]:
    """(missing_ms, separation_ms, unaccompanied motion on) for one asset under one config."""
    motion = config.unaccompanied_motion if profile.unaccompanied_motion is None else profile.unaccompanied_motion
    return (_effective_ms(profile.missing_after_s, config.missing_after_s, config),
            _effective_ms(profile.separation_after_s, config.separation_after_s, config), motion)


def _effective_ms(own: float | None, default: float | None, config: AssetConfig) -> int:
    seconds = default if own is None else own
    if not seconds:
        return 0
    return max(round(seconds * 1000), config.dedup_ms)


# --- inventory -----------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Inventory:
    """Per zone and per vehicle, the assets there ("what is in zone Y", "what is on truck 12").

    Kept up to date from the events (:meth:`apply`) and rebuildable from the asset states (:meth:`from_states`,
    after a restart); the two agree. A zone lists an asset by its last known place: one that went missing
    there stays listed (its ``asset_missing`` alert says so). An asset on a vehicle is listed under the
    vehicle and under each of the vehicle's geofences. The worker keeps one per input partition, like the
    asset states; :meth:`merge` sums them for the query API.
    """

    zones: dict[str, set[str]] = field(default_factory=dict)
    vehicles: dict[str, set[str]] = field(default_factory=dict)

    def apply(self, events: Iterable[AssetEvent]) -> None:
        for event in events:
            kind = event.type
            if kind == ARRIVED:
                self.zones.setdefault(event.zone_id, set()).add(event.tag_id)  # type: ignore[arg-type]
            elif kind == DEPARTED:
                _discard(self.zones, event.zone_id, event.tag_id)  # type: ignore[arg-type]
            elif kind == LOADED:
                self.vehicles.setdefault(event.vehicle_id, set()).add(event.tag_id)  # type: ignore[arg-type]
            elif kind == UNLOADED:
                _discard(self.vehicles, event.vehicle_id, event.tag_id)  # type: ignore[arg-type]

    @classmethod
    def from_states(cls, states: Iterable[AssetState]) -> Inventory:
        inventory = cls()
        for state in states:
            inventory.add(state)
        return inventory

    def add(self, state: AssetState) -> None:
        """Count a tag where its state says it is (rebuilding; a tag's events do this as they happen)."""
        for zone in state.zones:
            self.zones.setdefault(zone, set()).add(state.tag_id)
        if state.vehicle_id is not None:
            self.vehicles.setdefault(state.vehicle_id, set()).add(state.tag_id)

    def remove(self, state: AssetState) -> None:
        """Forget a tag (its state was deleted)."""
        for zone in state.zones:
            _discard(self.zones, zone, state.tag_id)
        if state.vehicle_id is not None:
            _discard(self.vehicles, state.vehicle_id, state.tag_id)

    def merge(self, other: Inventory) -> None:
        for zone, tags in other.zones.items():
            self.zones.setdefault(zone, set()).update(tags)
        for vehicle, tags in other.vehicles.items():
            self.vehicles.setdefault(vehicle, set()).update(tags)

    def count(self, zone_id: str) -> int:
        return len(self.zones.get(zone_id, ()))

    def assets_in(self, zone_id: str) -> list[str]:
        return sorted(self.zones.get(zone_id, ()))

    def on_vehicle(self, vehicle_id: str) -> list[str]:
        return sorted(self.vehicles.get(vehicle_id, ()))

    def counts(self) -> dict[str, int]:
        return {zone: len(tags) for zone, tags in sorted(self.zones.items())}

    def to_dict(self) -> dict[str, Any]:
        """For the query API: ``{"zones": {zone: {"count": n, "assets": [...]}}, "vehicles": {...}}``."""
        return {
            "zones": {zone: {"count": len(tags), "assets": sorted(tags)} for zone, tags in sorted(self.zones.items())},
            "vehicles": {vehicle: {"count": len(tags), "assets": sorted(tags)}
                         for vehicle, tags in sorted(self.vehicles.items())},
        }


def _discard(table: dict[str, set[str]], key: str, tag_id: str) -> None:
    tags = table.get(key)
    if tags is not None:
        tags.discard(tag_id)
        if not tags:
            del table[key]
