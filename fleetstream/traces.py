"""Readers for real GPS traces, for ``fleetstream replay``: CSV (plain or gzip), GeoLife ``.plt`` and GPX.

The format is told from the file (suffix, then first line), so ``read_trace`` takes any of them, or a directory:

* CSV with a header row naming a device column (device_id, device, vehicle_id, vehicle, uid, user_id, user, id;
  without one, the file name is the device id), a time column (ts, timestamp, time, datetime, date_time ...)
  and lat/lon columns (lat/latitude, lon/lng/long/longitude); optional speed_kmh (or speed_mps), heading
  (heading_deg, heading, bearing, course) and altitude_m columns. A bare ``speed`` column is ignored: its unit
  is anyone's guess. Times are ISO date-times (naive ones are UTC) or epoch seconds / ms / µs by magnitude.
  ``.gz`` files are read transparently (the GeoLife sample is ``lat,lng,datetime,uid`` in a ``.txt.gz``).
* GeoLife ``.plt``: six header lines, then ``lat,lon,0,altitude_ft,days_since_1899,date,time`` (UTC); the
  device id is the parent folder (``plt/000/x.plt`` -> ``000``; GeoLife's own ``000/Trajectory/x.plt`` too).
  Altitude -777 means unknown.
* GPX: every ``trkpt`` with its ``time`` (and ``ele``); the device id is the file name.

Anything else raises :class:`TraceFormatError` (a ValueError) naming the file and the line.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import IO

from fleetstream.domain.models import Position

TraceFix = Position  # a trace fix is a domain Position: replay and the pure pipeline take the same thing

FEET_TO_M = 0.3048
PLT_MISSING_ALTITUDE_FT = -777.0
PLT_HEADER_LINES = 6
PLT_SIGNATURE = "geolife trajectory"

DEVICE_COLUMNS = ("device_id", "device", "vehicle_id", "vehicle", "uid", "user_id", "user", "id")
TIME_COLUMNS = ("ts", "timestamp", "time", "datetime", "date_time", "recorded_at", "gps_time", "ts_ms")
LAT_COLUMNS = ("lat", "latitude")
LON_COLUMNS = ("lon", "lng", "long", "longitude")
SPEED_KMH_COLUMNS = ("speed_kmh", "speed_kph")
SPEED_MPS_COLUMNS = ("speed_mps", "speed_m_s")
HEADING_COLUMNS = ("heading_deg", "heading", "bearing", "course")
ALTITUDE_COLUMNS = ("altitude_m", "altitude", "elevation", "ele")
TRACE_SUFFIXES = (".plt", ".csv", ".csv.gz", ".txt.gz", ".gpx")


class TraceFormatError(ValueError):
    """The trace file is not in a format we read; the message names the file and line."""


def read_trace(path: str | Path) -> Iterator[TraceFix]:
    """Every fix of a trace file in file order, or of every trace file under a directory (sorted by path)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(TRACE_SUFFIXES))
        if not files:
            raise TraceFormatError(f"{path}: no {', '.join(TRACE_SUFFIXES)} trace files in this directory")
        for file in files:
            yield from read_trace(file)
        return
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    name = path.name.lower()
    if name.endswith(".gpx"):
        yield from _read_gpx(path)
        return
    with _open_text(path) as handle:
        first_line = handle.readline()
        handle.seek(0)
        if name.endswith(".plt") or first_line.strip().lower().startswith(PLT_SIGNATURE):
            yield from _read_plt(path, handle)
        else:
            yield from _read_csv(path, handle)


def _open_text(path: Path) -> IO[str]:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")  # the caller closes it


# --- times ------------------------------------------------------------------------------------------------------

_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_day_ms: dict[str, int] = {}  # "2008-10-23" -> epoch ms of its midnight: traces hold few distinct days


def parse_time_ms(text: str) -> int:
    """ISO date-time (naive = UTC) or epoch seconds / milliseconds / microseconds (by magnitude) -> epoch ms."""
    text = text.strip()
    if len(text) == 19 and text[10] in "T " and text[13] == ":" and text[16] == ":":  # 2008-10-23 05:53:05
        day_ms = _day_ms.get(text[:10])
        if day_ms is None:
            day_ms = _day_ms[text[:10]] = (date.fromisoformat(text[:10]).toordinal() - _EPOCH_ORDINAL) * 86_400_000
        hours, minutes, seconds = int(text[11:13]), int(text[14:16]), int(text[17:19])
        if hours < 24 and minutes < 60 and seconds < 61:
            return day_ms + (hours * 3600 + minutes * 60 + seconds) * 1000
    try:
        number = float(text)
    except ValueError:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return round(parsed.timestamp() * 1000)
    if not math.isfinite(number):
        raise ValueError(f"time {text!r} is not a number of seconds or milliseconds")
    if number > 1e14:
        return int(number // 1000)  # microseconds
    return int(number if number > 1e11 else number * 1000)  # 1e11 ms is 1973; 1e11 s is the year 5138


# --- CSV --------------------------------------------------------------------------------------------------------

def _pick(header: list[str], names: tuple[str, ...]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    return None


def _number(row: list[str], index: int, name: str) -> float:
    value = float(row[index])
    if not math.isfinite(value):
        raise ValueError(f"{name} {row[index]!r} is not a finite number")
    return value


def _optional_number(row: list[str], index: int | None, name: str) -> float | None:
    if index is None or index >= len(row) or not row[index].strip():
        return None
    return _number(row, index, name)


def _read_csv(path: Path, handle: IO[str]) -> Iterator[TraceFix]:
    reader = csv.reader(handle)
    header = next(reader, None)
    if not header:
        raise TraceFormatError(f"{path}:1: empty file, expected a CSV header row")
    device, time_col = _pick(header, DEVICE_COLUMNS), _pick(header, TIME_COLUMNS)
    lat, lon = _pick(header, LAT_COLUMNS), _pick(header, LON_COLUMNS)
    if time_col is None or lat is None or lon is None:
        raise TraceFormatError(
            f"{path}:1: header {header!r} is not a trace: needs a time column (one of {', '.join(TIME_COLUMNS)}), "
            f"lat ({'/'.join(LAT_COLUMNS)}) and lon ({'/'.join(LON_COLUMNS)}), and best a device column "
            f"({', '.join(DEVICE_COLUMNS)})"
        )
    file_device_id = path.name.split(".")[0]
    speed_kmh, speed_mps = _pick(header, SPEED_KMH_COLUMNS), _pick(header, SPEED_MPS_COLUMNS)
    heading, altitude = _pick(header, HEADING_COLUMNS), _pick(header, ALTITUDE_COLUMNS)
    for line, row in enumerate(reader, start=2):
        if not row:  # a blank line
            continue
        try:
            speed = _optional_number(row, speed_kmh, "speed_kmh")
            if speed is None and (mps := _optional_number(row, speed_mps, "speed_mps")) is not None:
                speed = mps * 3.6
            yield Position(
                row[device].strip() if device is not None else file_device_id,
                parse_time_ms(row[time_col]), _number(row, lat, "lat"), _number(row, lon, "lon"),
                speed_kmh=speed, heading_deg=_optional_number(row, heading, "heading"),
                altitude_m=_optional_number(row, altitude, "altitude"),
            )
        except (ValueError, IndexError) as exc:
            raise TraceFormatError(f"{path}:{line}: {exc} in row {row!r}") from None


# --- GeoLife PLT ------------------------------------------------------------------------------------------------

def _read_plt(path: Path, handle: IO[str]) -> Iterator[TraceFix]:
    parent = path.parent
    device_id = parent.parent.name if parent.name.lower() == "trajectory" else parent.name
    for line_no, line in enumerate(handle, start=1):
        if line_no == 1 and not line.strip().lower().startswith(PLT_SIGNATURE):
            raise TraceFormatError(f"{path}:1: not a GeoLife .plt file (first line should be 'Geolife trajectory')")
        if line_no <= PLT_HEADER_LINES or not line.strip():
            continue
        parts = line.strip().split(",")
        try:
            if len(parts) != 7:
                raise ValueError(f"expected 7 comma-separated fields (lat,lon,0,altitude_ft,days,date,time), "
                                 f"got {len(parts)}")
            altitude_ft = float(parts[3])
            yield Position(
                device_id, parse_time_ms(f"{parts[5]} {parts[6]}"), float(parts[0]), float(parts[1]),
                altitude_m=None if altitude_ft == PLT_MISSING_ALTITUDE_FT else altitude_ft * FEET_TO_M,
            )
        except ValueError as exc:
            raise TraceFormatError(f"{path}:{line_no}: {exc}") from None


# --- GPX --------------------------------------------------------------------------------------------------------

def _read_gpx(path: Path) -> Iterator[TraceFix]:
    """GPX 1.0/1.1 track points (line numbers are not known to ElementTree: errors name the point instead)."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise TraceFormatError(f"{path}:{exc.position[0]}: not a GPX (XML) file: {exc}") from None
    namespace = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    if root.tag != f"{namespace}gpx":
        raise TraceFormatError(f"{path}:1: root element is {root.tag!r}, expected 'gpx'")
    device_id = path.name.split(".")[0]
    for number, point in enumerate(root.iter(f"{namespace}trkpt"), start=1):
        time_text = point.findtext(f"{namespace}time")
        elevation = point.findtext(f"{namespace}ele")
        try:
            if time_text is None:
                raise ValueError("no <time>")
            yield Position(device_id, parse_time_ms(time_text), float(point.attrib["lat"]),
                           float(point.attrib["lon"]), altitude_m=float(elevation) if elevation else None)
        except (ValueError, KeyError) as exc:
            raise TraceFormatError(f"{path}: trkpt #{number}: {exc}") from None
