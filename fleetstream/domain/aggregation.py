"""Event-time windowed statistics per H3 cell, per geofence and for the fleet. Pure and batch-at-a-time: the worker
hands arrays in, gets each closed window out once, and checkpoints the state as plain JSON values.

Windows (:class:`WindowSpec`)
    Aligned to the epoch: starts are multiples of the step, a window is ``[start, start + size)``. Tumbling when
    step == size, hopping otherwise (a fix is then in about size/step windows). Event time only.

Watermark, lateness, closing
    The watermark is what the caller says (the largest event time its input partition has seen); it never goes
    back. A window *closes* when ``watermark >= end + grace``: the ``advance`` that gets there returns its final
    value, once. A fix whose window has closed is *late*: counted (``add_batch`` returns the count) and left out
    of that window. With hopping windows a fix can be late for its earliest window and on time for later ones: it
    counts once as late and still updates the open ones. Lateness is judged against the watermark of the last
    ``advance``, so the fixes of one batch never make each other late.

Why raw rows (cells)
    Per-fix Python work is what the worker cannot afford (~20 µs a fix in total). So ``add_batch`` only converts
    the batch to arrays and appends them to the *pane* (a slice of gcd(size, step); the window itself when
    tumbling) they fall in; every statistic is computed once per window, when it closes, with a few numpy sorts
    over its rows. A row is 8 + 8 + 8 + 1 bytes; panes are dropped when their last window closes.

Mergeable partials
    Positions are partitioned by device, so each partition's aggregator sees some of a cell's fixes. Every
    statistic here merges exactly across partitions (:func:`merge_cell_stats`): counts add, distinct devices add
    (a device lives in one partition), speed sums are integers (0.001 km/h) and p95 comes from a histogram.
    :class:`CellStatsStore` keeps one partial per (cell, window, source) and merges on read; replays upsert.

Persistence (``checkpoint`` / ``acknowledge`` / ``restore``)
    ``checkpoint()`` returns the writes for one changelog partition since the last call: new rows as append-only
    chunks (``pane:<start>:<seq>``, written once, never rewritten), then ``meta`` (watermark, late count, the
    last *acknowledged* closing point), then tombstones of chunks whose windows all closed and whose output was
    acknowledged (``acknowledge(seq)`` after the flush with that checkpoint was acked). Restoring from what the
    changelog holds gives, whatever prefix of the writes survived a crash: no window lost; a window emitted but not
    acknowledged emitted again with identical content; no fix counted twice when the caller passes input offsets
    (a chunk records the offset it covers, replayed rows at or below it are skipped).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import h3
import numpy as np

from fleetstream.domain.geoindex import parent_cells
from fleetstream.domain.models import DeviceState, Motion

NO_WATERMARK = -(1 << 62)  # below any event time; stands for "no watermark yet" in memory
_RES_SHIFT = np.uint64(52)
_RES_BITS = np.uint64(0xF)
_MILLI = 1000  # speeds are kept as integer 0.001 km/h: exact, order-free sums (replays give identical values)
StateWrite = tuple[str, Any]  # (key, JSON-able value, or None to delete the key)


# --- windows -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class WindowSpec:
    """Window settings. ``step_s`` None: tumbling. ``retention_s``: how long closed results stay queryable (from the
    window's end, in event time); at least ``grace_s`` since a window must exist until it closes."""

    size_s: float = 60.0
    step_s: float | None = None
    grace_s: float = 10.0
    retention_s: float = 3600.0
    size_ms: int = field(init=False, repr=False)
    step_ms: int = field(init=False, repr=False)
    grace_ms: int = field(init=False, repr=False)
    retention_ms: int = field(init=False, repr=False)
    pane_ms: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        size = round(self.size_s * 1000)
        step = size if self.step_s is None else round(self.step_s * 1000)
        grace = round(self.grace_s * 1000)
        retention = round(self.retention_s * 1000)
        if size <= 0:
            raise ValueError(f"window size must be at least 1 ms, got {self.size_s} s")
        if not 0 < step <= size:
            raise ValueError(f"window step must be in (0, size]; got step {self.step_s} s for size {self.size_s} s")
        if grace < 0:
            raise ValueError(f"grace must not be negative, got {self.grace_s} s")
        if retention < grace:
            raise ValueError(f"retention ({self.retention_s} s) must be at least grace ({self.grace_s} s)")
        for name, value in (("size_ms", size), ("step_ms", step), ("grace_ms", grace), ("retention_ms", retention),
                            ("pane_ms", math.gcd(size, step))):
            object.__setattr__(self, name, value)

    def starts(self, ts_ms: int) -> range:
        """Starts of the windows containing ``ts_ms``, earliest first."""
        step = self.step_ms
        return range(((ts_ms - self.size_ms) // step + 1) * step, ts_ms // step * step + 1, step)

    def closes_at(self, start_ms: int) -> int:
        """The watermark at which the window starting at ``start_ms`` closes."""
        return start_ms + self.size_ms + self.grace_ms

    def key(self) -> list[int]:
        """What restored state must agree with (retention may change freely)."""
        return [self.size_ms, self.step_ms, self.grace_ms]


def format_ts(ts_ms: int) -> str:
    """Epoch ms -> ``2026-11-25T10:00:00.123Z`` (the domain does not import the codecs; this runs per record)."""
    seconds, millis = divmod(ts_ms, 1000)
    days, rem = divmod(seconds, 86_400)
    y, m, d = _civil_from_days(days)
    return f"{y:04d}-{m:02d}-{d:02d}T{rem // 3600:02d}:{rem // 60 % 60:02d}:{rem % 60:02d}.{millis:03d}Z"


def _civil_from_days(z: int) -> tuple[int, int, int]:
    """Days since 1970-01-01 -> (year, month, day), proleptic Gregorian (H. Hinnant's algorithm)."""
    z += 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d = doy - (153 * mp + 2) // 5 + 1
    m = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (m <= 2), m, d


class Checkpoint(NamedTuple):
    """Writes for one changelog partition, in the order given; ``acknowledge(seq)`` once they and the outputs
    emitted before this checkpoint are acknowledged."""

    seq: int
    writes: list[StateWrite]


class _Closing:
    """Watermark, emission frontier and acknowledgements shared by the windowed aggregators.

    ``_frontier``: every window with ``closes_at <= _frontier`` has been emitted by this instance.
    ``_acked``: the same, but acknowledged (written in ``meta``; a restore starts emitting from there).
    """

    def __init__(self, spec: WindowSpec) -> None:
        self.spec = spec
        self._wm = NO_WATERMARK
        self._frontier = NO_WATERMARK
        self._acked = NO_WATERMARK
        self._seq = 0
        self._pending: dict[int, int] = {}  # checkpoint seq -> frontier when it was taken
        self._freed: list[tuple[int, list[str]]] = []  # (closes_at, keys) to delete once acked that far
        self._ready: list[str] = []  # keys to delete at the next checkpoint
        self._max_offset: int | None = None
        self.late_total = 0

    @property
    def watermark(self) -> int | None:
        return None if self._wm == NO_WATERMARK else self._wm

    def _raise_watermark(self, watermark_ms: int) -> tuple[int, int]:
        """(previous frontier, new watermark): windows closing in between are due now."""
        self._wm = max(self._wm, int(watermark_ms))
        return self._frontier, self._wm

    def acknowledge(self, seq: int) -> None:
        """The flush holding checkpoint ``seq`` (and everything emitted before it) is durable."""
        for s in [s for s in self._pending if s <= seq]:
            self._acked = max(self._acked, self._pending.pop(s))

    def _next_seq(self) -> int:
        seq = self._seq
        self._seq += 1
        self._pending[seq] = self._frontier
        return seq

    def _tombstones(self) -> list[StateWrite]:
        keep = []
        for closes, keys in self._freed:
            if closes <= self._acked:
                self._ready.extend(keys)
            else:
                keep.append((closes, keys))
        self._freed = keep
        out = [(key, None) for key in self._ready]
        self._ready = []
        return out

    def _meta(self, frontier: int, **extra: Any) -> dict[str, Any]:
        return {
            "v": 1, "window": self.spec.key(), "watermark": _opt(self._wm), "frontier": _opt(frontier),
            "late": self.late_total, "max_offset": self._max_offset, "seq": self._seq, **extra,
        }

    def _restore_meta(self, meta: Mapping[str, Any] | None) -> None:
        if meta is None:
            return
        if meta.get("v") != 1:
            raise ValueError(f"unknown aggregation state version {meta.get('v')!r}")
        if list(meta["window"]) != self.spec.key():
            raise ValueError(
                f"state was written with windows {meta['window']} (size, step, grace ms), settings say "
                f"{self.spec.key()}; changing windows needs fresh state")
        self._wm = _int_or(meta["watermark"])
        self._frontier = self._acked = _int_or(meta["frontier"])
        self.late_total = int(meta["late"])
        self._max_offset = meta["max_offset"]
        self._seq = max(self._seq, int(meta["seq"]))

    def _note_offsets(self, offsets: np.ndarray | None) -> None:
        if offsets is not None and len(offsets):
            top = int(offsets.max())
            self._max_offset = top if self._max_offset is None else max(self._max_offset, top)


def _opt(value: int) -> int | None:
    return None if value == NO_WATERMARK else value


def _int_or(value: int | None) -> int:
    return NO_WATERMARK if value is None else int(value)


def _key_seq(key: str) -> int:
    return int(key.rsplit(":", 1)[1])


# --- cell statistics -----------------------------------------------------------------------------------------------

class CellStats(NamedTuple):
    """One cell and window: the whole value, or one partition's part of it (merge with :func:`merge_cell_stats`).

    ``stopped_devices``: distinct devices with at least one fix in the cell and window whose motion was stopped.
    ``p95_speed_kmh``: nearest-rank 95th percentile of the fixes' speeds, each first rounded to the nearest
    multiple of ``bin_kmh`` (half up): the smallest such value with at least 95% of the speeds at or below it. The
    rounding is what makes it exact under merging; ``speed_bins``/``speed_counts`` are that histogram (bin i holds
    the speeds that round to ``i * bin_kmh``). Fixes without a speed count in ``events``, not in the speeds.
    """

    h3: str
    resolution: int
    window_start_ms: int
    window_end_ms: int
    events: int
    devices: int
    stopped_devices: int
    speed_samples: int
    speed_sum_milli: int  # sum of the speeds in 0.001 km/h
    p95_speed_kmh: float | None
    speed_bins: tuple[int, ...]
    speed_counts: tuple[int, ...]
    bin_kmh: float
    final: bool = True

    @property
    def avg_speed_kmh(self) -> float | None:
        return self.speed_sum_milli / self.speed_samples / _MILLI if self.speed_samples else None

    def to_dict(self) -> dict[str, Any]:
        """The ``fleet.cells`` record (schemas/cell_stats.json)."""
        return {
            "h3": self.h3, "resolution": self.resolution,
            "window_start": format_ts(self.window_start_ms), "window_end": format_ts(self.window_end_ms),
            "devices": self.devices, "events": self.events,
            "avg_speed_kmh": self.avg_speed_kmh, "p95_speed_kmh": self.p95_speed_kmh,
            "speed_samples": self.speed_samples, "stopped_devices": self.stopped_devices, "final": self.final,
        }

    def to_json(self) -> list[Any]:
        """Compact, lossless, mergeable form (for state and for shipping partials between workers)."""
        return list(self)

    @classmethod
    def from_json(cls, value: Sequence[Any]) -> CellStats:
        (h3_cell, res, start, end, events, devices, stopped, samples, total, p95, bins, counts, bin_kmh,
         final) = value
        return cls(h3_cell, res, start, end, events, devices, stopped, samples, total, p95, tuple(bins),
                   tuple(counts), bin_kmh, final)


def _p95_bin(bins: Sequence[int], counts: Sequence[int]) -> int | None:
    """Nearest rank: the first bin whose cumulative count reaches ceil(0.95 n)."""
    n = sum(counts)
    if not n:
        return None
    rank = (95 * n + 99) // 100
    seen = 0
    for b, c in zip(bins, counts, strict=True):
        seen += c
        if seen >= rank:
            return b
    raise AssertionError("unreachable")


def merge_cell_stats(parts: Iterable[CellStats]) -> CellStats:
    """One cell and window from the partials of several partitions (each device lives in one partition, so
    distinct counts add). ``final`` only if every part is."""
    parts = list(parts)
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    for p in parts[1:]:
        if (p.h3, p.window_start_ms, p.window_end_ms, p.bin_kmh) != (first.h3, first.window_start_ms,
                                                                     first.window_end_ms, first.bin_kmh):
            raise ValueError(f"cannot merge {p.h3}@{p.window_start_ms} into {first.h3}@{first.window_start_ms}")
    if len(parts) == 1:
        return first
    hist: dict[int, int] = {}
    for p in parts:
        for b, c in zip(p.speed_bins, p.speed_counts, strict=True):
            hist[b] = hist.get(b, 0) + c
    bins = tuple(sorted(hist))
    counts = tuple(hist[b] for b in bins)
    p95 = _p95_bin(bins, counts)
    return first._replace(
        events=sum(p.events for p in parts), devices=sum(p.devices for p in parts),
        stopped_devices=sum(p.stopped_devices for p in parts), speed_samples=sum(p.speed_samples for p in parts),
        speed_sum_milli=sum(p.speed_sum_milli for p in parts),
        p95_speed_kmh=None if p95 is None else p95 * first.bin_kmh,
        speed_bins=bins, speed_counts=counts, final=all(p.final for p in parts),
    )


class _Part(NamedTuple):
    """Rows added under one watermark: they count in the windows that were open then (``closes_at > wm``)."""

    wm: int
    serial: int  # add order, for interim updates
    cells: np.ndarray  # uint64, at the finest aggregation resolution
    devices: np.ndarray  # int64 codes into the aggregator's device table
    speeds: np.ndarray  # int64 0.001 km/h, -1 = unknown
    stopped: np.ndarray  # bool


class _Pane:
    __slots__ = ("keys", "parts", "saved", "start", "through")

    def __init__(self, start: int) -> None:
        self.start = start
        self.parts: list[_Part] = []
        self.saved = 0  # parts[:saved] are in the changelog
        self.keys: list[str] = []  # its chunk keys in the changelog
        self.through: int | None = None  # every row from input offsets <= through is in parts


class CellAggregator:
    """Windowed statistics per H3 cell for one input partition (see the module doc for the semantics).

    ``resolutions``: the aggregation resolutions; input cells may be at any resolution at least as fine as the
    finest of them (the coarser cells are their ``cell_to_parent``, computed with bit operations).
    ``interim_interval_s``: None, no interim updates; otherwise ``advance`` also returns (``final=False``) the
    current value of open windows' cells that got fixes since the last interim update, at most once per that much
    watermark progress (0: every advance). Each costs about as much as closing the windows concerned.
    ``checkpoints``: False when the state is not persisted with ``checkpoint`` (closed rows are then dropped at
    once instead of waiting for their last chunk to be written; ``to_state`` still works).
    """

    def __init__(self, spec: WindowSpec | None = None, resolutions: Sequence[int] = (7, 8), *,
                 bin_kmh: float = 1.0, interim_interval_s: float | None = None, checkpoints: bool = True) -> None:
        self._c = _Closing(spec or WindowSpec())
        self.spec = self._c.spec
        res = tuple(sorted(set(resolutions)))
        if not res or res[0] < 0 or res[-1] > 15:
            raise ValueError(f"resolutions must be in 0..15, got {resolutions}")
        if not bin_kmh > 0:
            raise ValueError(f"bin_kmh must be positive, got {bin_kmh}")
        self.resolutions = res
        self.fine = res[-1]
        self.bin_kmh = float(bin_kmh)
        self._bin_milli = max(1, round(bin_kmh * _MILLI))
        self.interim_ms = None if interim_interval_s is None else round(interim_interval_s * 1000)
        self.checkpoints = checkpoints
        self._panes: dict[int, _Pane] = {}
        self._retired: list[_Pane] = []  # closed panes whose last rows still have to reach the changelog
        self._codes: dict[str, int] = {}
        self._ids: list[str] = []
        self._compacted_at = 65_536
        self._serial = 0
        self._interim_serial = 0
        self._interim_wm = NO_WATERMARK

    # -- reading ------------------------------------------------------------------------------------------------

    @property
    def watermark(self) -> int | None:
        return self._c.watermark

    @property
    def late_total(self) -> int:
        """Late fixes so far (a replay after a crash may count some twice)."""
        return self._c.late_total

    def open_windows(self) -> list[int]:
        """Starts of the windows holding rows and not yet closed."""
        spec, frontier = self.spec, self._c._frontier
        return sorted({s for p in self._panes for s in spec.starts(p) if spec.closes_at(s) > frontier})

    def rows(self) -> int:
        """Rows held (open windows' fixes): what the memory grows with."""
        return sum(len(part.cells) for pane in self._panes.values() for part in pane.parts)

    # -- writing ------------------------------------------------------------------------------------------------

    def add_batch(self, cells: np.ndarray | Sequence[str] | Mapping[int, np.ndarray], device_ids: Sequence[str],
                  ts_ms: np.ndarray | Sequence[int], speeds_kmh: np.ndarray | Sequence[float | None],
                  stopped: np.ndarray | Sequence[bool], offsets: np.ndarray | Sequence[int] | None = None) -> int:
        """Add fixes; returns how many were late. ``cells``: uint64 H3 cells (or hex strings) at least as fine as
        the finest aggregation resolution, or ``{resolution: uint64 cells}`` holding the finest one. Speeds: km/h,
        NaN or None unknown. ``stopped``: the fix's motion was stopped. ``offsets``: the input offset of each fix
        (several fixes may share one); pass them so a replay after a restore skips what the state already holds.
        Call with whole input records only, and ``checkpoint`` between batches."""
        n = len(device_ids)
        fine = self._fine_cells(cells, n)
        if not (len(fine) == len(ts_ms) == len(speeds_kmh) == len(stopped) == n):
            raise ValueError("cells, device_ids, ts_ms, speeds_kmh and stopped must have the same length")
        ts = np.asarray(ts_ms, dtype=np.int64)
        speeds = _milli_speeds(speeds_kmh, n)
        stop = np.asarray(stopped, dtype=bool)
        if n == 0:
            return 0
        spec, c = self.spec, self._c
        panes = ts // spec.pane_ms * spec.pane_ms
        keep = np.ones(n, dtype=bool)
        off = None
        if offsets is not None:
            off = np.asarray(offsets, dtype=np.int64)
            if len(off) != n:
                raise ValueError("offsets must have one entry per fix")
            for start in np.unique(panes).tolist():
                pane = self._panes.get(start)
                if pane is not None and pane.through is not None:
                    keep &= ~((panes == start) & (off <= pane.through))
        late = 0
        if c._wm != NO_WATERMARK:
            step, size, grace = spec.step_ms, spec.size_ms, spec.grace_ms
            first_close = ((ts - size) // step + 1) * step + size + grace
            late_rows = keep & (first_close <= c._wm)
            late = int(np.count_nonzero(late_rows))
            if late:
                keep &= (ts // step * step + size + grace) > c._wm  # still in some open window
        c._note_offsets(off)
        c.late_total += late
        codes = self._device_codes(device_ids)
        if not keep.all():
            panes, fine, speeds, stop, codes = panes[keep], fine[keep], speeds[keep], stop[keep], codes[keep]
            if off is not None:
                off = off[keep]
        if not len(panes):
            return late
        self._serial += 1
        first, last = int(panes.min()), int(panes.max())
        if first == last:
            self._append(first, _Part(c._wm, self._serial, fine, codes, speeds, stop), off)
        else:
            order = np.argsort(panes, kind="stable")
            sp = panes[order]
            cuts = np.flatnonzero(sp[1:] != sp[:-1]) + 1
            for idx in np.split(order, cuts):
                part = _Part(c._wm, self._serial, fine[idx], codes[idx], speeds[idx], stop[idx])
                self._append(int(panes[idx[0]]), part, None if off is None else off[idx])
        return late

    def _append(self, start: int, part: _Part, offsets: np.ndarray | None) -> None:
        pane = self._panes.get(start)
        if pane is None:
            pane = self._panes[start] = _Pane(start)
        pane.parts.append(part)
        if offsets is not None:
            top = int(offsets.max())
            pane.through = top if pane.through is None else max(pane.through, top)

    def _fine_cells(self, cells: np.ndarray | Sequence[str] | Mapping[int, np.ndarray], n: int) -> np.ndarray:
        if isinstance(cells, Mapping):
            if self.fine not in cells:
                raise ValueError(f"cells by resolution must include resolution {self.fine}")
            return np.asarray(cells[self.fine], dtype=np.uint64)
        if isinstance(cells, np.ndarray) and cells.dtype != object:
            arr = cells.astype(np.uint64, copy=False)
        else:
            arr = np.fromiter((int(c, 16) if isinstance(c, str) else c for c in cells), dtype=np.uint64,
                              count=len(cells))
        if not len(arr):
            return arr
        res = (arr >> _RES_SHIFT) & _RES_BITS
        low = int(res.min())
        if low < self.fine:
            raise ValueError(f"cells must be at resolution {self.fine} or finer, got resolution {low}")
        if low == self.fine and int(res.max()) == self.fine:
            return arr
        return parent_cells(arr, self.fine)

    def _device_codes(self, device_ids: Sequence[str]) -> np.ndarray:
        codes = self._codes
        try:
            return np.fromiter(map(codes.__getitem__, device_ids), dtype=np.int64, count=len(device_ids))
        except KeyError:
            ids = self._ids
            for d in device_ids:
                if d not in codes:
                    codes[d] = len(ids)
                    ids.append(d)
            return np.fromiter(map(codes.__getitem__, device_ids), dtype=np.int64, count=len(device_ids))

    def advance(self, watermark_ms: int) -> list[CellStats]:
        """Raise the watermark; the windows it closes, once each, in (window start, resolution, cell) order,
        then interim updates when configured."""
        spec, c = self.spec, self._c
        frontier, wm = c._raise_watermark(watermark_ms)
        out: list[CellStats] = []
        if wm > frontier:
            due = sorted({s for p in self._panes for s in spec.starts(p) if frontier < spec.closes_at(s) <= wm})
            for start in due:
                out.extend(self._window(start, final=True))
            c._frontier = wm
            for start in [p for p in self._panes if spec.closes_at(spec.starts(p)[-1]) <= wm]:
                pane = self._panes.pop(start)
                if self.checkpoints:
                    self._retired.append(pane)
            self._maybe_compact_devices()
        if self.interim_ms is not None and (self._interim_wm == NO_WATERMARK or
                                            wm - self._interim_wm >= self.interim_ms):
            out.extend(self._interim(wm))
        return out

    def _interim(self, wm: int) -> list[CellStats]:
        spec, since = self.spec, self._interim_serial
        fresh = [p for p in self._panes.values() if p.parts and p.parts[-1].serial > since]
        starts = sorted({s for p in fresh for s in spec.starts(p.start) if spec.closes_at(s) > wm})
        out = []
        for start in starts:
            out.extend(self._window(start, final=False, since_serial=since))
        self._interim_serial = self._serial
        self._interim_wm = wm
        return out

    def peek(self, cell: str, window_start_ms: int | None = None) -> CellStats | None:
        """The current (not final) value of one cell in an open window; the latest open window when not given."""
        res = h3.get_resolution(cell)
        if res not in self.resolutions:
            raise ValueError(f"resolution {res} is not aggregated (have {list(self.resolutions)})")
        opened = self.open_windows()
        if not opened:
            return None
        start = opened[-1] if window_start_ms is None else int(window_start_ms)
        if start not in opened:
            return None
        target = np.uint64(int(cell, 16))
        rows = self._rows(start)
        if rows is None:
            return None
        cells, devices, speeds, stopped = rows
        coarse = cells if res == self.fine else parent_cells(cells, res)
        hit = coarse == target
        if not hit.any():
            return None
        gid = np.zeros(int(np.count_nonzero(hit)), dtype=np.int64)
        [stats] = self._stats(np.array([target]), gid, devices[hit], speeds[hit], stopped[hit], res, start,
                              final=False)
        return stats

    # -- computing ----------------------------------------------------------------------------------------------

    def _rows(self, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
        spec = self.spec
        closes = spec.closes_at(start)
        parts = [part for p in range(start, start + spec.size_ms, spec.pane_ms) if (pane := self._panes.get(p))
                 for part in pane.parts if part.wm < closes]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0].cells, parts[0].devices, parts[0].speeds, parts[0].stopped
        return (np.concatenate([p.cells for p in parts]), np.concatenate([p.devices for p in parts]),
                np.concatenate([p.speeds for p in parts]), np.concatenate([p.stopped for p in parts]))

    def _window(self, start: int, *, final: bool, since_serial: int | None = None) -> list[CellStats]:
        rows = self._rows(start)
        if rows is None:
            return []
        cells, devices, speeds, stopped = rows
        fresh = None
        if since_serial is not None:
            spec = self.spec
            new = [part.cells for p in range(start, start + spec.size_ms, spec.pane_ms)
                   if (pane := self._panes.get(p)) for part in pane.parts
                   if part.serial > since_serial and part.wm < spec.closes_at(start)]
            if not new:
                return []
            fresh = np.concatenate(new)
        # Group the rows by fine cell once (one sort); coarser groups are parents of the few distinct fine cells.
        fine_cells, fine_gid = _group(cells)
        out = []
        for res in self.resolutions:
            if res == self.fine:
                uniq, gid = fine_cells, fine_gid
            else:
                uniq, inverse = np.unique(parent_cells(fine_cells, res), return_inverse=True)
                gid = inverse[fine_gid]
            only = None
            if fresh is not None:
                only = np.unique(fresh if res == self.fine else parent_cells(fresh, res))
            out.extend(self._stats(uniq, gid, devices, speeds, stopped, res, start, final=final, only=only))
        return out

    def _stats(self, uniq: np.ndarray, gid: np.ndarray, devices: np.ndarray, speeds: np.ndarray,
               stopped: np.ndarray, res: int, start: int, *, final: bool, only: np.ndarray | None = None
               ) -> list[CellStats]:
        """Every statistic of one window at one resolution: rows in group ``gid`` are in cell ``uniq[gid]``.
        Sorts and bincounts instead of Python loops."""
        groups = len(uniq)
        events = np.bincount(gid, minlength=groups)
        span = int(devices.max()) + 1
        pairs = gid * span + devices
        distinct = np.bincount(_distinct(pairs) // span, minlength=groups)
        stopped_distinct = np.bincount(_distinct(pairs[stopped]) // span, minlength=groups)
        known = speeds >= 0
        kg, ks = gid[known], speeds[known]
        samples = np.bincount(kg, minlength=groups)
        # integer-valued float64 sums are exact below 2**53 (> 10**9 fixes at 2000 km/h): order does not matter
        sums = np.bincount(kg, weights=ks, minlength=groups).astype(np.int64)
        bin_milli = self._bin_milli
        bins = (ks + bin_milli // 2) // bin_milli
        nb = int(bins.max()) + 1 if len(bins) else 1
        hist_keys, hist_counts = _distinct(kg * nb + bins, counts=True)
        hist_group, hist_bin = hist_keys // nb, hist_keys % nb
        bounds = np.searchsorted(hist_group, np.arange(groups + 1))
        cum = np.cumsum(hist_counts)
        before = np.concatenate(([0], cum))[bounds[:-1]]
        rank = (95 * samples + 99) // 100
        at = np.searchsorted(cum, before + rank)
        p95 = np.where(samples > 0, hist_bin[np.minimum(at, max(len(hist_bin) - 1, 0))] if len(hist_bin) else 0, -1)
        pick = range(groups) if only is None else np.flatnonzero(np.isin(uniq, only)).tolist()
        cells_l, events_l, distinct_l, stopped_l = uniq.tolist(), events.tolist(), distinct.tolist(), \
            stopped_distinct.tolist()
        samples_l, sums_l, p95_l, bounds_l = samples.tolist(), sums.tolist(), p95.tolist(), bounds.tolist()
        hb, hc = hist_bin.tolist(), hist_counts.tolist()
        end = start + self.spec.size_ms
        w = self.bin_kmh
        return [
            CellStats(format(cells_l[i], "x"), res, start, end, events_l[i], distinct_l[i], stopped_l[i],
                      samples_l[i], sums_l[i], None if p95_l[i] < 0 else p95_l[i] * w,
                      tuple(hb[bounds_l[i]:bounds_l[i + 1]]), tuple(hc[bounds_l[i]:bounds_l[i + 1]]), w, final)
            for i in pick
        ]

    def _maybe_compact_devices(self) -> None:
        """Forget device ids no open pane uses once the table has doubled (it holds every device seen)."""
        if len(self._ids) <= self._compacted_at:
            return
        live = [part.devices for pane in (*self._panes.values(), *self._retired) for part in pane.parts]
        used = np.unique(np.concatenate(live)) if live else np.zeros(0, dtype=np.int64)
        remap = np.full(len(self._ids), -1, dtype=np.int64)
        remap[used] = np.arange(len(used))
        self._ids = [self._ids[i] for i in used.tolist()]
        self._codes = {d: i for i, d in enumerate(self._ids)}
        for pane in (*self._panes.values(), *self._retired):
            pane.parts = [part._replace(devices=remap[part.devices]) for part in pane.parts]
        self._compacted_at = max(65_536, 2 * len(self._ids))

    # -- state --------------------------------------------------------------------------------------------------

    def checkpoint(self) -> Checkpoint:
        """The changelog writes since the last checkpoint (see the module doc). Keys are unique within this
        aggregator; prefix them with the partition (and a kind) when several share a table."""
        if not self.checkpoints:
            raise RuntimeError("this aggregator was made with checkpoints=False")
        c = self._c
        seq = c._next_seq()
        writes: list[StateWrite] = []
        for pane in sorted((*self._panes.values(), *self._retired), key=lambda p: p.start):
            if pane.saved < len(pane.parts):
                key = f"pane:{pane.start}:{seq}"
                writes.append((key, self._chunk(pane, pane.parts[pane.saved:], c._max_offset)))
                pane.keys.append(key)
                pane.saved = len(pane.parts)
                if c._max_offset is not None:
                    pane.through = c._max_offset
        for pane in self._retired:
            c._freed.append((self.spec.closes_at(self.spec.starts(pane.start)[-1]), pane.keys))
        self._retired = []
        writes.append(("meta", c._meta(c._acked, resolutions=list(self.resolutions), bin_kmh=self.bin_kmh)))
        writes.extend(c._tombstones())
        return Checkpoint(seq, writes)

    def acknowledge(self, seq: int) -> None:
        """Checkpoint ``seq`` and the windows emitted before it are durable: their chunks may be deleted."""
        self._c.acknowledge(seq)

    def _chunk(self, pane: _Pane, parts: Sequence[_Part], through: int | None) -> dict[str, Any]:
        merged: list[dict[str, Any]] = []
        for wm in sorted({p.wm for p in parts}):
            same = [p for p in parts if p.wm == wm]
            used, local = _group(np.concatenate([p.devices for p in same]))
            merged.append({
                "wm": _opt(wm),
                "ids": [self._ids[i] for i in used.tolist()],
                "dev": local.tolist(),
                "cell": np.concatenate([p.cells for p in same]).tolist(),
                "speed": np.concatenate([p.speeds for p in same]).tolist(),
                "stopped": np.flatnonzero(np.concatenate([p.stopped for p in same])).tolist(),
            })
        return {"pane": pane.start, "through": through, "parts": merged}

    def to_state(self) -> dict[str, Any]:
        """A full snapshot, ``{key: value}`` as ``restore`` takes it. It treats every window emitted so far as
        delivered: take it after the outputs of the last ``advance`` are safe."""
        c = self._c
        state: dict[str, Any] = {}
        for pane in sorted((*self._panes.values(), *self._retired), key=lambda p: p.start):
            if pane.parts and any(self.spec.closes_at(s) > c._frontier for s in self.spec.starts(pane.start)):
                state[f"pane:{pane.start}:0"] = self._chunk(pane, pane.parts, c._max_offset)
        state["meta"] = c._meta(c._frontier, resolutions=list(self.resolutions), bin_kmh=self.bin_kmh)
        return state

    @classmethod
    def from_state(cls, state: Mapping[str, Any], spec: WindowSpec | None = None, resolutions: Sequence[int] = (7, 8),
                   **kwargs: Any) -> CellAggregator:
        return cls.restore(state.items(), spec, resolutions, **kwargs)

    @classmethod
    def restore(cls, entries: Iterable[tuple[str, Any]], spec: WindowSpec | None = None,
                resolutions: Sequence[int] = (7, 8), **kwargs: Any) -> CellAggregator:
        """Rebuild from what the changelog holds for one partition (latest value per key; deleted keys absent or
        None). Windows closed but not acknowledged are emitted again by the next ``advance``."""
        agg = cls(spec, resolutions, **kwargs)
        c = agg._c
        meta = None
        chunks = []
        for key, value in entries:
            if value is None:
                continue
            if key == "meta":
                meta = value
            elif key.startswith("pane:"):
                chunks.append((key, value))
            else:
                raise ValueError(f"unknown cell aggregation state key {key!r}")
        c._restore_meta(meta)
        if meta is not None and (meta["resolutions"] != list(agg.resolutions) or meta["bin_kmh"] != agg.bin_kmh):
            raise ValueError(f"state was written for resolutions {meta['resolutions']} and bins of "
                             f"{meta['bin_kmh']} km/h; changing them needs fresh state")
        for key, value in sorted(chunks, key=lambda kv: _key_seq(kv[0])):
            start = int(value["pane"])
            pane = agg._panes.get(start) or agg._panes.setdefault(start, _Pane(start))
            for part in value["parts"]:
                codes = agg._device_codes(part["ids"])
                stopped = np.zeros(len(part["cell"]), dtype=bool)
                stopped[np.asarray(part["stopped"], dtype=np.int64)] = True
                agg._serial += 1
                pane.parts.append(_Part(
                    _int_or(part["wm"]), agg._serial, np.asarray(part["cell"], dtype=np.uint64),
                    codes[np.asarray(part["dev"], dtype=np.int64)], np.asarray(part["speed"], dtype=np.int64),
                    stopped))
            pane.keys.append(key)
            pane.saved = len(pane.parts)
            if value["through"] is not None:
                pane.through = value["through"] if pane.through is None else max(pane.through, value["through"])
            c._seq = max(c._seq, _key_seq(key) + 1)
        for start in list(agg._panes):
            if agg.spec.closes_at(agg.spec.starts(start)[-1]) <= c._frontier:
                c._ready.extend(agg._panes.pop(start).keys)  # all its windows were delivered
        agg._interim_serial = agg._serial
        return agg


def _group(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct values, each row's index into them): ``np.unique(return_inverse=True)`` in one argsort."""
    order = np.argsort(values)
    ordered = values[order]
    starts = np.empty(len(ordered), dtype=bool)
    starts[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    gid = np.empty(len(values), dtype=np.int64)
    gid[order] = np.cumsum(starts) - 1
    return ordered[starts], gid


def _distinct(values: np.ndarray, counts: bool = False) -> Any:
    """Sorted distinct values (and their counts): numpy 2's hash-based ``np.unique`` is several times slower
    than sorting for the int64 keys here."""
    ordered = np.sort(values)
    starts = np.empty(len(ordered), dtype=bool)
    starts[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=starts[1:])
    if not counts:
        return ordered[starts]
    first = np.flatnonzero(starts)
    return ordered[first], np.diff(np.append(first, len(ordered)))


def _milli_speeds(speeds_kmh: np.ndarray | Sequence[float | None], n: int) -> np.ndarray:
    if isinstance(speeds_kmh, np.ndarray) and speeds_kmh.dtype != object:
        s = speeds_kmh.astype(np.float64, copy=False)
    else:
        s = np.fromiter((math.nan if v is None else v for v in speeds_kmh), dtype=np.float64, count=n)
    unknown = ~np.isfinite(s)
    if (s < 0).any():
        raise ValueError("speeds must not be negative")
    return np.where(unknown, -1, np.rint(np.where(unknown, 0.0, s) * _MILLI)).astype(np.int64)


class CellStatsStore:
    """Closed cell statistics for queries, kept ``retention_s`` past their window's end (event time).

    Holds one value per (resolution, cell, window, source) — a source is an input partition — and merges the
    sources on read, so a replayed partial replaces rather than adds. ``complete`` emits each window once every
    expected source's watermark has passed its close: the once-only ``fleet.cells`` value when the partials of all
    partitions meet in one place (a second stage keyed by cell).
    """

    def __init__(self, spec: WindowSpec | None = None) -> None:
        self.spec = spec or WindowSpec()
        self._windows: dict[tuple[int, int], dict[int, dict[int, CellStats]]] = {}  # (res, start) -> cell -> src
        self._watermarks: dict[int, int] = {}
        self._completed = NO_WATERMARK
        self._centres: dict[int, tuple[float, float]] = {}
        self._dirty: set[tuple[int, int]] = set()
        self._deleted: set[tuple[int, int]] = set()

    def add(self, stats: Iterable[CellStats], source: int = 0) -> None:
        for s in stats:
            key = (s.resolution, s.window_start_ms)
            self._windows.setdefault(key, {}).setdefault(int(s.h3, 16), {})[source] = s
            self._dirty.add(key)
            self._deleted.discard(key)

    def expire(self, watermark_ms: int) -> int:
        """Drop windows whose end + retention is at or below the watermark; returns how many."""
        gone = [k for k in self._windows if k[1] + self.spec.size_ms + self.spec.retention_ms <= watermark_ms]
        for key in gone:
            del self._windows[key]
            self._dirty.discard(key)
            self._deleted.add(key)
        return len(gone)

    def windows(self, resolution: int) -> list[int]:
        return sorted(start for res, start in self._windows if res == resolution)

    def get(self, cell: str, window_start_ms: int | None = None) -> CellStats | None:
        """The cell's value in a window (the latest window holding the cell when not given)."""
        res, target = h3.get_resolution(cell), int(cell, 16)
        starts = self.windows(res) if window_start_ms is None else [int(window_start_ms)]
        for start in reversed(starts):
            sources = self._windows.get((res, start), {}).get(target)
            if sources:
                return merge_cell_stats(sources[s] for s in sorted(sources))
        return None

    def cells(self, resolution: int, window_start_ms: int | None = None,
              bbox: tuple[float, float, float, float] | None = None) -> list[CellStats]:
        """A window's cells (the latest window when not given), by cell; ``bbox`` (min_lat, min_lon, max_lat,
        max_lon; min_lon > max_lon crosses the antimeridian) keeps the cells whose centre is inside."""
        if window_start_ms is None:
            starts = self.windows(resolution)
            if not starts:
                return []
            window_start_ms = starts[-1]
        window = self._windows.get((resolution, int(window_start_ms)), {})
        out = []
        for cell in sorted(window):
            if bbox is not None and not _in_bbox(*self._centre(cell), bbox):
                continue
            sources = window[cell]
            out.append(merge_cell_stats(sources[s] for s in sorted(sources)))
        return out

    def _centre(self, cell: int) -> tuple[float, float]:
        centre = self._centres.get(cell)
        if centre is None:
            if len(self._centres) > 1_000_000:
                self._centres.clear()
            centre = self._centres[cell] = h3.api.basic_int.cell_to_latlng(cell)
        return centre

    @property
    def watermarks(self) -> dict[int, int]:
        """The newest watermark recorded per source."""
        return dict(self._watermarks)

    def note_watermark(self, source: int, watermark_ms: int) -> None:
        """Record a source's watermark without completing anything (``complete`` does, over every source)."""
        self._watermarks[source] = max(self._watermarks.get(source, NO_WATERMARK), int(watermark_ms))

    def complete(self, source_watermarks: Mapping[int, int]) -> list[CellStats]:
        """Record each source's watermark; return, once, the merged value of every window that all of them have
        closed (``watermark >= end + grace``), in (start, resolution, cell) order."""
        for source, wm in source_watermarks.items():
            self._watermarks[source] = max(self._watermarks.get(source, NO_WATERMARK), int(wm))
        if not self._watermarks:
            return []
        low = min(self._watermarks.values())
        out = []
        for res, start in sorted(self._windows, key=lambda k: (k[1], k[0])):
            if self._completed < self.spec.closes_at(start) <= low:
                out.extend(s._replace(final=True) for s in self.cells(res, start))
        self._completed = max(self._completed, low)
        return out

    def changes(self) -> list[StateWrite]:
        """Writes since the last call, one key per (resolution, window): ``cells:<res>:<start>``."""
        out: list[StateWrite] = [(f"cells:{r}:{s}", None) for r, s in sorted(self._deleted)]
        for key in sorted(self._dirty):
            window = self._windows[key]
            out.append((f"cells:{key[0]}:{key[1]}", [[src, s.to_json()] for cell in sorted(window)
                                                     for src, s in sorted(window[cell].items())]))
        out.append(("meta", {"watermarks": sorted(self._watermarks.items()), "completed": _opt(self._completed)}))
        self._dirty.clear()
        self._deleted.clear()
        return out

    @classmethod
    def restore(cls, entries: Iterable[tuple[str, Any]], spec: WindowSpec | None = None) -> CellStatsStore:
        store = cls(spec)
        for key, value in entries:
            if value is None:
                continue
            if key == "meta":
                store._watermarks = {int(s): int(w) for s, w in value["watermarks"]}
                store._completed = _int_or(value["completed"])
            elif key.startswith("cells:"):
                for src, s in value:
                    store.add([CellStats.from_json(s)], int(src))
            else:
                raise ValueError(f"unknown cell store state key {key!r}")
        store._dirty.clear()
        return store


def cells_geojson(stats: Iterable[CellStats]) -> dict[str, Any]:
    """A GeoJSON FeatureCollection of cell polygons with the ``fleet.cells`` record as properties (heatmaps). A cell
    crossing the antimeridian keeps a continuous ring, with longitudes past 180 (what map libraries draw right)."""
    features = []
    for s in stats:
        ring = [[lon, lat] for lat, lon in h3.cell_to_boundary(s.h3)]
        if max(p[0] for p in ring) - min(p[0] for p in ring) > 180:
            ring = [[lon + 360 if lon < 0 else lon, lat] for lon, lat in ring]
        ring.append(ring[0])
        features.append({"type": "Feature", "id": s.h3, "geometry": {"type": "Polygon", "coordinates": [ring]},
                         "properties": s.to_dict()})
    return {"type": "FeatureCollection", "features": features}


def _in_bbox(lat: float, lon: float, bbox: tuple[float, float, float, float]) -> bool:
    min_lat, min_lon, max_lat, max_lon = bbox
    if not min_lat <= lat <= max_lat:
        return False
    return min_lon <= lon <= max_lon if min_lon <= max_lon else (lon >= min_lon or lon <= max_lon)


# --- small keyed windows: geofences and fleet distance ------------------------------------------------------------

class _KeyedWindows:
    """Windows of small per-key accumulators kept as dicts (a few per event; for low-volume streams).

    Each (window start, key) value is rewritten whole when it changes; ``through`` on it makes replays idempotent
    like the cells' chunks do."""

    kind = "keyed"

    def __init__(self, spec: WindowSpec | None, checkpoints: bool = True) -> None:
        self._c = _Closing(spec or WindowSpec())
        self.spec = self._c.spec
        self.checkpoints = checkpoints  # False: not persisted with checkpoint(), closed values are dropped at once
        self._acc: dict[int, dict[str, dict[str, Any]]] = {}  # start -> key -> accumulator
        self._dirty: set[tuple[int, str]] = set()
        self._retired: list[tuple[int, str, dict[str, Any]]] = []

    @property
    def watermark(self) -> int | None:
        return self._c.watermark

    @property
    def late_total(self) -> int:
        return self._c.late_total

    def _targets(self, ts_ms: int) -> tuple[list[int], bool]:
        """The open windows a value at ``ts_ms`` goes to, and whether it missed a closed one (late)."""
        starts = self.spec.starts(ts_ms)
        wm = self._c._wm
        open_ = [s for s in starts if self.spec.closes_at(s) > wm]
        return open_, len(open_) < len(starts)

    def _slot(self, start: int, key: str, offset: int | None) -> dict[str, Any] | None:
        window = self._acc.setdefault(start, {})
        acc = window.get(key)
        if acc is None:
            acc = window[key] = self._empty()
        elif offset is not None and acc["through"] is not None and offset <= acc["through"]:
            return None  # a replay of what the state already holds
        self._dirty.add((start, key))
        return acc

    def _empty(self) -> dict[str, Any]:
        raise NotImplementedError

    def _close(self, watermark_ms: int) -> list[tuple[int, str, dict[str, Any]]]:
        frontier, wm = self._c._raise_watermark(watermark_ms)
        out = []
        if wm > frontier:
            for start in sorted(s for s in self._acc if frontier < self.spec.closes_at(s) <= wm):
                window = self._acc.pop(start)
                for key in sorted(window):
                    out.append((start, key, window[key]))
                    if self.checkpoints:
                        self._retired.append((start, key, window[key]))
            self._c._frontier = wm
        return out

    def _state_key(self, start: int, key: str) -> str:
        return f"{self.kind}:{start}:{key}"

    def _checkpoint(self, extra: list[StateWrite]) -> Checkpoint:
        if not self.checkpoints:
            raise RuntimeError("this aggregator was made with checkpoints=False")
        c = self._c
        seq = c._next_seq()
        writes: list[StateWrite] = []
        retired = {(s, k): acc for s, k, acc in self._retired}
        for start, key in sorted(self._dirty):
            acc = self._acc.get(start, {}).get(key) or retired.get((start, key))
            if acc is None:
                continue
            acc["through"] = c._max_offset
            writes.append((self._state_key(start, key), _acc_json(acc)))
        self._dirty.clear()
        for start, key, _ in self._retired:
            c._freed.append((self.spec.closes_at(start), [self._state_key(start, key)]))
        self._retired = []
        writes.extend(extra)
        writes.append(("meta", c._meta(c._acked)))
        writes.extend(c._tombstones())
        return Checkpoint(seq, writes)

    def acknowledge(self, seq: int) -> None:
        self._c.acknowledge(seq)

    def _restore(self, entries: Iterable[tuple[str, Any]], other: Any) -> None:
        c = self._c
        meta = None
        accs = []
        for key, value in entries:
            if value is None:
                continue
            if key == "meta":
                meta = value
            elif key.startswith(f"{self.kind}:"):
                _, start, name = key.split(":", 2)
                accs.append((int(start), name, value))
            else:
                other(key, value)
        c._restore_meta(meta)
        for start, name, value in accs:
            if self.spec.closes_at(start) <= c._frontier:
                c._ready.append(self._state_key(start, name))
            else:
                self._acc.setdefault(start, {})[name] = _acc_from_json(value)

    def _to_state(self) -> dict[str, Any]:
        state = {self._state_key(s, k): _acc_json(acc) for s, window in sorted(self._acc.items())
                 for k, acc in sorted(window.items())}
        for acc_key in state:
            state[acc_key]["through"] = self._c._max_offset
        state["meta"] = self._c._meta(self._c._frontier)
        return state


def _acc_json(acc: dict[str, Any]) -> dict[str, Any]:
    """An accumulator as JSON: its one set (``devices``, see ``_acc_from_json``) as a sorted list."""
    out = dict(acc)
    devices = out.get("devices")
    if devices is not None:
        out["devices"] = sorted(devices)
    return out


def _acc_from_json(value: Mapping[str, Any]) -> dict[str, Any]:
    return {k: set(v) if k == "devices" else v for k, v in value.items()}


class GeofenceEventLike(Protocol):
    """What :class:`GeofenceAggregator` reads from an event (``transitions.GeofenceEvent`` has it)."""

    @property
    def type(self) -> str: ...
    @property
    def device_id(self) -> str: ...
    @property
    def geofence_id(self) -> str: ...
    @property
    def ts_ms(self) -> int: ...
    @property
    def dwell_s(self) -> float | None: ...


class GeofenceStats(NamedTuple):
    """One geofence and window: transitions counted by their event time. ``entries`` counts enter and cross
    events, ``exits`` exit and cross events (a cross went in and out between two fixes). ``devices``: distinct
    devices with any event (enter, exit, dwell, cross) there. Dwell: over exit events that carry ``dwell_s``."""

    geofence_id: str
    window_start_ms: int
    window_end_ms: int
    entries: int
    exits: int
    devices: int
    dwell_samples: int
    dwell_sum_ms: int
    max_dwell_ms: int | None
    final: bool = True

    @property
    def avg_dwell_s(self) -> float | None:
        return self.dwell_sum_ms / self.dwell_samples / 1000 if self.dwell_samples else None

    @property
    def max_dwell_s(self) -> float | None:
        return None if self.max_dwell_ms is None else self.max_dwell_ms / 1000

    def to_dict(self) -> dict[str, Any]:
        """The record (schemas/geofence_stats.json)."""
        return {
            "geofence_id": self.geofence_id, "window_start": format_ts(self.window_start_ms),
            "window_end": format_ts(self.window_end_ms), "entries": self.entries, "exits": self.exits,
            "devices": self.devices, "dwell_samples": self.dwell_samples, "avg_dwell_s": self.avg_dwell_s,
            "max_dwell_s": self.max_dwell_s, "final": self.final,
        }


def merge_geofence_stats(parts: Iterable[GeofenceStats]) -> GeofenceStats:
    """One geofence and window from several partitions' parts (devices live in one partition: counts add)."""
    parts = list(parts)
    if not parts:
        raise ValueError("nothing to merge")
    first = parts[0]
    if any((p.geofence_id, p.window_start_ms) != (first.geofence_id, first.window_start_ms) for p in parts):
        raise ValueError("parts of different geofences or windows")
    maxima = [p.max_dwell_ms for p in parts if p.max_dwell_ms is not None]
    return first._replace(
        entries=sum(p.entries for p in parts), exits=sum(p.exits for p in parts),
        devices=sum(p.devices for p in parts), dwell_samples=sum(p.dwell_samples for p in parts),
        dwell_sum_ms=sum(p.dwell_sum_ms for p in parts), max_dwell_ms=max(maxima) if maxima else None,
        final=all(p.final for p in parts))


class GeofenceAggregator(_KeyedWindows):
    """Per geofence and window statistics from geofence events, plus current occupancy.

    Occupancy is the set of devices inside now, in arrival order, not windowed: enter and dwell add the device,
    exit removes it (a cross changes nothing). Sets are replay-safe: replaying the events after the committed offset
    ends in the same set. They can also be rebuilt from device states (``set_occupancy``)."""

    kind = "fence"

    def __init__(self, spec: WindowSpec | None = None, checkpoints: bool = True) -> None:
        super().__init__(spec, checkpoints)
        self._inside: dict[str, set[str]] = {}
        self._occ_dirty: set[str] = set()

    def _empty(self) -> dict[str, Any]:
        return {"entries": 0, "exits": 0, "devices": set(), "dwell_n": 0, "dwell_ms": 0, "dwell_max": None,
                "through": None}

    def add_events(self, events: Iterable[GeofenceEventLike], offsets: Sequence[int] | None = None) -> int:
        """Apply events (any order); returns how many were late for at least one of their windows.

        Per event, a few dict and set operations: the windows an event goes to are worked out once per pane of
        event time (a batch's events share a few), and ``_slot`` is inlined (a third of this loop's cost)."""
        late = 0
        offs = list(offsets) if offsets is not None else None
        inside_of, occ_dirty, accs, dirty = self._inside, self._occ_dirty, self._acc, self._dirty
        pane_ms = self.spec.pane_ms
        targets: dict[int, tuple[list[int], bool]] = {}  # pane -> (open window starts, late for one)
        for i, event in enumerate(events):
            kind = str(event.type)
            gid, device = event.geofence_id, event.device_id
            if kind == "enter" or kind == "dwell":
                inside = inside_of.get(gid)
                if inside is None:
                    inside = inside_of[gid] = set()
                inside.add(device)
                occ_dirty.add(gid)
            elif kind == "exit":
                inside = inside_of.get(gid)
                if inside is not None and device in inside:
                    inside.discard(device)
                    occ_dirty.add(gid)
            offset = offs[i] if offs is not None else None
            ts_ms = int(event.ts_ms)
            pane = ts_ms // pane_ms  # the same pane, the same windows (sizes and steps are whole panes)
            found = targets.get(pane)
            if found is None:
                found = targets[pane] = self._targets(ts_ms)
            starts, missed = found
            late += missed
            dwell = None if kind != "exit" or event.dwell_s is None else round(event.dwell_s * 1000)
            for start in starts:
                window = accs.get(start)
                if window is None:
                    window = accs[start] = {}
                acc = window.get(gid)
                if acc is None:
                    acc = window[gid] = self._empty()
                elif offset is not None and acc["through"] is not None and offset <= acc["through"]:
                    continue  # a replay of what the state already holds
                dirty.add((start, gid))
                acc["devices"].add(device)
                if kind == "enter":
                    acc["entries"] += 1
                elif kind == "exit":
                    acc["exits"] += 1
                elif kind == "cross":
                    acc["entries"] += 1
                    acc["exits"] += 1
                if dwell is not None:
                    acc["dwell_n"] += 1
                    acc["dwell_ms"] += dwell
                    acc["dwell_max"] = dwell if acc["dwell_max"] is None else max(acc["dwell_max"], dwell)
        if offs:
            self._c._note_offsets(np.asarray(offs, dtype=np.int64))
        self._c.late_total += late
        return late

    def advance(self, watermark_ms: int) -> list[GeofenceStats]:
        """Raise the watermark; the (geofence, window) values it closes, once each, by (start, geofence)."""
        return [self._stats(start, gid, acc, True) for start, gid, acc in self._close(watermark_ms)]

    def peek(self, geofence_id: str, window_start_ms: int) -> GeofenceStats | None:
        acc = self._acc.get(int(window_start_ms), {}).get(geofence_id)
        return None if acc is None else self._stats(int(window_start_ms), geofence_id, acc, False)

    def _stats(self, start: int, gid: str, acc: Mapping[str, Any], final: bool) -> GeofenceStats:
        return GeofenceStats(gid, start, start + self.spec.size_ms, acc["entries"], acc["exits"],
                             len(acc["devices"]), acc["dwell_n"], acc["dwell_ms"], acc["dwell_max"], final)

    def occupancy(self, geofence_id: str) -> int:
        return len(self._inside.get(geofence_id, ()))

    def occupants(self, geofence_id: str) -> list[str]:
        return sorted(self._inside.get(geofence_id, ()))

    def set_occupancy(self, memberships: Iterable[tuple[str, Iterable[str]]]) -> None:
        """Replace occupancy with (device_id, geofence ids it is inside) pairs, e.g. from device states."""
        old = set(self._inside)
        self._inside = {}
        for device, fences in memberships:
            for gid in fences:
                self._inside.setdefault(gid, set()).add(device)
        self._occ_dirty |= old | set(self._inside)

    def checkpoint(self) -> Checkpoint:
        """Changed window values (``fence:<start>:<geofence>``), changed occupancy (``occ:<geofence>``), meta,
        then deletions of closed windows' keys once acknowledged."""
        occ: list[StateWrite] = [(f"occ:{g}", sorted(self._inside[g]) if self._inside.get(g) else None)
                                 for g in sorted(self._occ_dirty)]
        self._occ_dirty.clear()
        return self._checkpoint(occ)

    def to_state(self) -> dict[str, Any]:
        state = self._to_state()
        state.update({f"occ:{g}": sorted(s) for g, s in sorted(self._inside.items()) if s})
        return state

    @classmethod
    def restore(cls, entries: Iterable[tuple[str, Any]], spec: WindowSpec | None = None) -> GeofenceAggregator:
        agg = cls(spec)

        def other(key: str, value: Any) -> None:
            if not key.startswith("occ:"):
                raise ValueError(f"unknown geofence aggregation state key {key!r}")
            agg._inside[key[4:]] = set(value)

        agg._restore(entries, other)
        return agg

    @classmethod
    def from_state(cls, state: Mapping[str, Any], spec: WindowSpec | None = None) -> GeofenceAggregator:
        return cls.restore(state.items(), spec)


class DistanceWindow(NamedTuple):
    """Distance driven by the fleet (this partition's part of it) in one window; parts add."""

    window_start_ms: int
    window_end_ms: int
    distance_m: float
    fixes: int
    final: bool = True


class DistanceAggregator(_KeyedWindows):
    """Sum of ``distance_m`` over accepted fixes per window (each fix's distance from the device's previous fix,
    attributed to the fix's event time). Kept in integer millimetres so sums are exact and order-free."""

    kind = "dist"

    def __init__(self, spec: WindowSpec | None = None, checkpoints: bool = True) -> None:
        super().__init__(spec, checkpoints)

    def _empty(self) -> dict[str, Any]:
        return {"mm": 0, "fixes": 0, "through": None}

    def add_batch(self, ts_ms: np.ndarray | Sequence[int], distance_m: np.ndarray | Sequence[float],
                  offsets: np.ndarray | Sequence[int] | None = None) -> int:
        """Vectorized over the batch; returns how many fixes were late for at least one window."""
        ts = np.asarray(ts_ms, dtype=np.int64)
        mm = np.rint(np.asarray(distance_m, dtype=np.float64) * 1000).astype(np.int64)
        if len(ts) != len(mm):
            raise ValueError("ts_ms and distance_m must have the same length")
        if not len(ts):
            return 0
        spec, c = self.spec, self._c
        step, size = spec.step_ms, spec.size_ms
        first = ((ts - size) // step + 1) * step
        last = ts // step * step
        late = int(np.count_nonzero(first + size + spec.grace_ms <= c._wm))
        off = None if offsets is None else np.asarray(offsets, dtype=np.int64)
        for j in range(-(-size // step)):
            starts = first + j * step
            ok = (starts <= last) & (starts + size + spec.grace_ms > c._wm)
            if not ok.any():
                continue
            for start in np.unique(starts[ok]).tolist():
                rows = ok & (starts == start)
                acc = self._acc.get(start, {}).get("fleet")
                if off is not None and acc is not None and acc["through"] is not None:
                    rows &= off > acc["through"]
                if not rows.any():
                    continue
                acc = self._slot(start, "fleet", None)
                assert acc is not None
                acc["mm"] += int(mm[rows].sum())
                acc["fixes"] += int(np.count_nonzero(rows))
        c._note_offsets(off)
        c.late_total += late
        return late

    def advance(self, watermark_ms: int) -> list[DistanceWindow]:
        return [DistanceWindow(start, start + self.spec.size_ms, acc["mm"] / 1000, acc["fixes"])
                for start, _, acc in self._close(watermark_ms)]

    def checkpoint(self) -> Checkpoint:
        return self._checkpoint([])

    def to_state(self) -> dict[str, Any]:
        return self._to_state()

    @classmethod
    def restore(cls, entries: Iterable[tuple[str, Any]], spec: WindowSpec | None = None) -> DistanceAggregator:
        agg = cls(spec)

        def other(key: str, value: Any) -> None:
            raise ValueError(f"unknown distance aggregation state key {key!r}")

        agg._restore(entries, other)
        return agg

    @classmethod
    def from_state(cls, state: Mapping[str, Any], spec: WindowSpec | None = None) -> DistanceAggregator:
        return cls.restore(state.items(), spec)


# --- fleet summary ---------------------------------------------------------------------------------------------

class FleetCounts(NamedTuple):
    """Devices by status. Online: last accepted fix within ``offline_after`` of now (future fixes count as
    online). Moving/stopped/unknown split the online devices by their last motion (an offline device's motion is
    stale). Parts from several workers add (:func:`merge_fleet_counts`)."""

    devices: int
    online: int
    offline: int
    moving: int
    stopped: int
    unknown: int
    alerts_by_severity: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {**self._asdict(), "alerts_by_severity": dict(sorted(self.alerts_by_severity.items()))}


def fleet_counts(states: Iterable[DeviceState], now_ms: int, offline_after_s: float,
                 alert_severities: Iterable[str] = ()) -> FleetCounts:
    """Count devices by status from their latest states; ``alert_severities``: one entry per active alert."""
    horizon = now_ms - round(offline_after_s * 1000)
    devices = online = moving = stopped = 0
    for state in states:
        devices += 1
        if state.ts_ms >= horizon:
            online += 1
            if state.motion == Motion.MOVING:
                moving += 1
            elif state.motion == Motion.STOPPED:
                stopped += 1
    alerts: dict[str, int] = {}
    for severity in alert_severities:
        alerts[severity] = alerts.get(severity, 0) + 1
    return FleetCounts(devices, online, devices - online, moving, stopped, online - moving - stopped, alerts)


def merge_fleet_counts(parts: Iterable[FleetCounts]) -> FleetCounts:
    parts = list(parts)
    alerts: dict[str, int] = {}
    for p in parts:
        for severity, n in p.alerts_by_severity.items():
            alerts[severity] = alerts.get(severity, 0) + n
    return FleetCounts(*(sum(getattr(p, f) for p in parts) for f in FleetCounts._fields[:-1]), alerts)
