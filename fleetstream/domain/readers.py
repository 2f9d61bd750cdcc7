"""RFID reader registry: ``reader_id`` -> a fixed place (location, zone, role) or a vehicle (a mobile reader).

Readers come from the compacted ``fleet.readers`` topic (one JSON object per reader, schemas/reader.json, a null
value deletes it) or from a file (``fleetstream readers load FILE``: a JSON/YAML list, or ``{"readers": [...]}``).
A bad definition is refused with :class:`ReaderError` naming the reader and the problem, so nothing half-valid
reaches :mod:`fleetstream.domain.assets`.

Roles say what a read at the reader means for an asset (the zone alone cannot: a gate is not a place one stays):

- ``area`` (default), ``dock``, ``shelf``: *storage*, inside the site. An asset resolved there is in the zone.
  (``dock`` and ``shelf`` behave like ``area``; they are labels for people and dashboards.)
- ``gate``, ``exit``: *boundary*, a pass-through point of the site perimeter (a vehicle gate, a door). An asset
  resolved there has left: it is in no zone. A boundary read of an asset on a vehicle marks the vehicle leaving.
- ``outside``: a fixed reader beyond the perimeter (yard, car park); its zone, if any, is a real zone, but an
  asset resolved there has left the site just the same.
- ``vehicle``: implied by ``vehicle_id`` (a reader carried by a vehicle); it may not be combined with a zone or
  another role. The location of such a reader is the vehicle's latest position (``lat``/``lon`` are its home,
  used until the vehicle reports).

Two readers with the same kind and zone are one *place* (antennas of one dock door): resolving a tag from one to
the other changes its reader, not its zone, and produces no event. A fixed reader without a zone is a place of
its own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple


class ReaderError(ValueError):
    """A reader definition (or readers file) that cannot be used; the message names the reader and the problem."""


STORAGE, BOUNDARY, OUTSIDE, VEHICLE = "storage", "boundary", "outside", "vehicle"
ROLES: dict[str, str] = {  # role -> kind (what resolution and the alerts go by)
    "area": STORAGE, "dock": STORAGE, "shelf": STORAGE,
    "gate": BOUNDARY, "exit": BOUNDARY,
    "outside": OUTSIDE,
    "vehicle": VEHICLE,
}
FIELDS = frozenset({"reader_id", "lat", "lon", "zone_id", "vehicle_id", "role", "name"})
MAX_ID_LEN = 128


class Reader(NamedTuple):
    """One reader. ``kind`` and ``place`` are derived from the role, zone and vehicle (see the module doc)."""

    reader_id: str
    lat: float
    lon: float
    zone_id: str | None
    vehicle_id: str | None
    role: str
    name: str | None
    kind: str  # storage | boundary | outside | vehicle
    place: str  # "s:<zone or reader>", "b:...", "o:...", "v:<vehicle>": readers of one place are interchangeable

    def to_dict(self) -> dict[str, Any]:
        """The ``fleet.readers`` value (absent optional fields left out)."""
        out: dict[str, Any] = {"reader_id": self.reader_id, "lat": self.lat, "lon": self.lon}
        for name in ("zone_id", "vehicle_id", "name"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.role not in ("area", "vehicle"):
            out["role"] = self.role
        return out


def parse_reader(doc: Any, key: str | None = None) -> Reader:
    """One reader from a parsed JSON object (a ``fleet.readers`` value or a file entry). ``key``: the record key,
    which must equal ``reader_id`` when given. Absent and null optional fields are the same."""
    if not isinstance(doc, Mapping):
        raise ReaderError(f"reader {key!r}: expected an object, got {type(doc).__name__}")
    reader_id = doc.get("reader_id")
    label = repr(reader_id if isinstance(reader_id, str) else key)
    if not isinstance(reader_id, str) or not 1 <= len(reader_id) <= MAX_ID_LEN:
        raise ReaderError(f"reader {label}: reader_id must be a string of 1 to {MAX_ID_LEN} characters")
    if key is not None and key != reader_id:
        raise ReaderError(f"reader {label}: record key {key!r} differs from reader_id")
    unknown = sorted(set(doc) - FIELDS)
    if unknown:
        raise ReaderError(f"reader {label}: unknown field {unknown[0]!r} (allowed: {', '.join(sorted(FIELDS))})")
    lat = _coordinate(doc.get("lat"), "lat", 90.0, label)
    lon = _coordinate(doc.get("lon"), "lon", 180.0, label)
    zone_id = _optional_id(doc.get("zone_id"), "zone_id", label)
    vehicle_id = _optional_id(doc.get("vehicle_id"), "vehicle_id", label)
    name = doc.get("name")
    if name is not None and not isinstance(name, str):
        raise ReaderError(f"reader {label}: name must be a string")
    role = doc.get("role")
    if role is None:
        role = "vehicle" if vehicle_id is not None else "area"
    if role not in ROLES:
        raise ReaderError(f"reader {label}: role {role!r} is not one of {', '.join(ROLES)}")
    if vehicle_id is not None:
        if role != "vehicle":
            raise ReaderError(f"reader {label}: a reader on vehicle {vehicle_id!r} has no fixed role ({role!r})")
        if zone_id is not None:
            raise ReaderError(f"reader {label}: a reader on vehicle {vehicle_id!r} covers no fixed zone "
                              f"({zone_id!r}); its zones are the vehicle's geofences")
    elif role == "vehicle":
        raise ReaderError(f"reader {label}: role 'vehicle' needs a vehicle_id")
    kind = ROLES[role]
    where = vehicle_id if vehicle_id is not None else zone_id if zone_id is not None else reader_id
    place = f"{kind[0]}:{where}"
    return Reader(reader_id, lat, lon, zone_id, vehicle_id, role, name, kind, place)


def _coordinate(value: Any, name: str, bound: float, label: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ReaderError(f"reader {label}: {name} must be a number (degrees), got {value!r}")
    if not math.isfinite(value) or not -bound <= value <= bound:
        raise ReaderError(f"reader {label}: {name} {value} is outside [-{bound:g}, {bound:g}]")
    return float(value)


def _optional_id(value: Any, name: str, label: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_ID_LEN:
        raise ReaderError(f"reader {label}: {name} must be a string of 1 to {MAX_ID_LEN} characters or null")
    return value


class ReaderRegistry(Mapping[str, Reader]):
    """Immutable ``reader_id -> Reader``; changes return a new registry (swapped in by the feed with one assignment,
    like the geofence index). ``get`` is the plain dict's, bound once: the hot path calls it."""

    __slots__ = ("_readers", "get")

    def __init__(self, readers: Iterable[Reader] = ()) -> None:
        table: dict[str, Reader] = {}
        for reader in readers:
            if reader.reader_id in table:
                raise ReaderError(f"reader {reader.reader_id!r}: defined twice")
            table[reader.reader_id] = reader
        self._readers = table
        self.get = table.get  # type: ignore[method-assign]

    @classmethod
    def from_dicts(cls, docs: Iterable[Any]) -> ReaderRegistry:
        return cls(parse_reader(doc) for doc in docs)

    @classmethod
    def load(cls, path: str | Path) -> ReaderRegistry:
        """A readers file: a JSON (or YAML, by suffix) list of readers, or an object with a ``readers`` list."""
        return cls.from_dicts(load_reader_docs(path))

    def with_reader(self, reader: Reader) -> ReaderRegistry:
        """This registry with ``reader`` added or replaced."""
        return ReaderRegistry({**self._readers, reader.reader_id: reader}.values())

    def without(self, reader_id: str) -> ReaderRegistry:
        return ReaderRegistry(r for rid, r in self._readers.items() if rid != reader_id)

    def apply(self, key: str, value: Mapping[str, Any] | None) -> ReaderRegistry:
        """One ``fleet.readers`` record: a definition (validated against ``key``) or a tombstone (None)."""
        return self.without(key) if value is None else self.with_reader(parse_reader(value, key))

    def __getitem__(self, reader_id: str) -> Reader:
        return self._readers[reader_id]

    def __contains__(self, reader_id: object) -> bool:
        return reader_id in self._readers

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)

    def __repr__(self) -> str:
        return f"ReaderRegistry({len(self._readers)} readers)"


def load_reader_docs(path: str | Path) -> list[Any]:
    """The raw reader objects of a readers file (for ``fleetstream readers load`` to publish as they are)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ReaderError(f"{path.name}: not valid YAML: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ReaderError(f"{path.name}: not valid JSON: {exc}") from None
    if isinstance(data, Mapping) and set(data) <= {"readers", "description"}:
        data = data.get("readers")
    if not isinstance(data, list):
        raise ReaderError(f"{path.name}: expected a list of readers or an object with a 'readers' list")
    return data
