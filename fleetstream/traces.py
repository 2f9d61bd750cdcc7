"""Readers for real GPS traces, for ``fleetstream replay``: CSV (plain or gzip) and GeoLife ``.plt``.

CSV: a header row naming a device column (device_id, device, vehicle_id, vehicle, uid, user, id), a time
column (ts, timestamp, time, datetime, date_time) and lat/lon columns (lat/latitude, lon/lng/longitude);
optional speed (speed_kmh) and bearing/heading columns. Times are ISO date-times (naive ones are taken as
UTC) or epoch seconds/milliseconds. GeoLife ``.plt``: six header lines, then
``lat,lon,0,altitude_ft,days_since_1899,date,time``; the device id is the parent folder name.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from fleetstream.domain.models import Position

FEET_TO_M = 0.3048
PLT_MISSING_ALTITUDE = -777

DEVICE_COLUMNS = ("device_id", "device", "vehicle_id", "vehicle", "uid", "user_id", "user", "id")
TIME_COLUMNS = ("ts", "timestamp", "time", "datetime", "date_time")
LAT_COLUMNS = ("lat", "latitude")
LON_COLUMNS = ("lon", "lng", "long", "longitude")
SPEED_COLUMNS = ("speed_kmh", "speed")
HEADING_COLUMNS = ("heading_deg", "heading", "bearing", "course")


class TraceFormatError(ValueError):
    """The trace file is not in a format we read; the message names the file and line."""


def read_trace(path: str | Path) -> Iterator[Position]:
    """Every fix of a trace file, or of every ``.plt``/``.csv`` file under a directory (sorted by name)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _is_trace(p))
        if not files:
            raise TraceFormatError(f"{path}: no .plt or .csv trace files in this directory")
        for file in files:
            yield from read_trace(file)
        return
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix.lower() == ".plt":
        yield from _read_plt(path)
    else:
        yield from _read_csv(path)


def _is_trace(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".plt", ".csv", ".csv.gz", ".txt.gz"))


def _open_text(path: Path) -> IO[str]:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _pick(header: list[str], names: tuple[str, ...]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    return None


def parse_time_ms(text: str) -> int:
    """ISO date-time (naive = UTC) or epoch seconds / milliseconds (by magnitude) -> epoch ms."""
    text = text.strip()
    try:
        number = float(text)
    except ValueError:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return round(parsed.timestamp() * 1000)
    return int(number if number > 1e11 else number * 1000)


def _float_or_none(row: list[str], index: int | None) -> float | None:
    if index is None or index >= len(row) or not row[index].strip():
        return None
    return float(row[index])


def _read_csv(path: Path) -> Iterator[Position]:
    with _open_text(path) as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise TraceFormatError(f"{path}: empty file")
        device, time_col = _pick(header, DEVICE_COLUMNS), _pick(header, TIME_COLUMNS)
        lat, lon = _pick(header, LAT_COLUMNS), _pick(header, LON_COLUMNS)
        if None in (device, time_col, lat, lon):
            raise TraceFormatError(
                f"{path}:1: header {header!r} needs device, time, lat and lon columns "
                f"(e.g. {DEVICE_COLUMNS[0]}, {TIME_COLUMNS[1]}, {LAT_COLUMNS[0]}, {LON_COLUMNS[0]})"
            )
        speed, heading = _pick(header, SPEED_COLUMNS), _pick(header, HEADING_COLUMNS)
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                yield Position(
                    row[device].strip(), parse_time_ms(row[time_col]), float(row[lat]), float(row[lon]),  # type: ignore[index]
                    speed_kmh=_float_or_none(row, speed), heading_deg=_float_or_none(row, heading),
                )
            except (ValueError, IndexError) as exc:
                raise TraceFormatError(f"{path}:{line}: {exc}") from None


def _read_plt(path: Path) -> Iterator[Position]:
    device_id = path.parent.name if path.parent.name != "Trajectory" else path.parent.parent.name
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if line_no <= 6:
                continue
            parts = line.strip().split(",")
            if len(parts) < 7:
                if line.strip():
                    raise TraceFormatError(f"{path}:{line_no}: expected 7 comma-separated fields")
                continue
            try:
                altitude_ft = float(parts[3])
                ts = datetime.fromisoformat(f"{parts[5]}T{parts[6]}").replace(tzinfo=UTC)
                yield Position(
                    device_id, round(ts.timestamp() * 1000), float(parts[0]), float(parts[1]),
                    altitude_m=None if altitude_ft == PLT_MISSING_ALTITUDE else altitude_ft * FEET_TO_M,
                )
            except ValueError as exc:
                raise TraceFormatError(f"{path}:{line_no}: {exc}") from None
