"""An open-addressing hash table from uint64 H3 cells to row numbers, built and probed with whole-array numpy.

Why: a sorted array searched with ``searchsorted`` costs about twenty cache-missing steps per key, growing with
the number of cells (so with the number of geofences); a hash table costs one or two probes per key whatever
its size. Linear probing, splitmix64 hashing, half full. Cell 0 is not a valid H3
index, so it marks an empty slot.
"""

from __future__ import annotations

import numpy as np

_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
LOAD = 0.5  # cells per slot
_FEW = 64  # unresolved keys below which one wide round finishes the probing


class CellHash:
    """Maps each of ``cells`` (distinct, non-zero) to its position in that array; -1 for any other cell."""

    def __init__(self, cells: np.ndarray) -> None:
        cells = np.asarray(cells, dtype=np.uint64)
        self._capacity = np.uint64(max(16, int(len(cells) / LOAD)))
        self.keys = np.zeros(int(self._capacity) + 64, dtype=np.uint64)  # probes run on past the end
        self.rows = np.full(len(self.keys), -1, dtype=np.int32)
        pending = np.arange(len(cells))
        slot = self._slot(cells)
        self.max_probe = 0
        probe = 0
        while len(pending):
            if slot.max(initial=0) >= len(self.keys):
                self.keys = np.concatenate((self.keys, np.zeros(len(self.keys) // 4, dtype=np.uint64)))
                self.rows = np.concatenate((self.rows, np.full(len(self.keys) - len(self.rows), -1, np.int32)))
            free = self.keys[slot] == 0
            # of the keys aiming at one free slot, the first takes it
            cand = np.flatnonzero(free)
            _, first = np.unique(slot[cand], return_index=True)
            won = cand[first]
            self.keys[slot[won]] = cells[pending[won]]
            self.rows[slot[won]] = pending[won]
            if len(won):
                self.max_probe = max(self.max_probe, probe)
            left = np.ones(len(pending), dtype=bool)
            left[won] = False
            pending, slot = pending[left], slot[left] + 1
            probe += 1

    def _slot(self, cells: np.ndarray) -> np.ndarray:
        """splitmix64's finaliser, then modulo the capacity: H3 cells differ in few, structured bits, which a
        plain multiply clusters; the modulo lets the capacity be any size (memory: LOAD, not a power of 2)."""
        x = cells ^ (cells >> _S30)
        x *= _M1
        x ^= x >> _S27
        x *= _M2
        x ^= x >> _S31
        return (x % self._capacity).astype(np.int64)

    def find(self, cells: np.ndarray) -> np.ndarray:
        """Row of every cell (-1: absent). Rounds read one slot per unresolved key (found, or an empty slot:
        absent); once few keys are left, one last round reads all the slots up to the longest probe."""
        cells = np.asarray(cells, dtype=np.uint64)
        slot = self._slot(cells)
        found = self.keys[slot]
        out = np.where(found == cells, self.rows[slot], -1)
        pending = np.flatnonzero((found != cells) & (found != 0))
        probe = 1
        while len(pending) > _FEW and probe <= self.max_probe:
            slot_p = slot[pending] + probe
            found = self.keys[slot_p]
            hit = found == cells[pending]
            out[pending[hit]] = self.rows[slot_p[hit]]
            pending = pending[~hit & (found != 0)]
            probe += 1
        if len(pending) and probe <= self.max_probe:
            window = slot[pending][:, None] + np.arange(probe, self.max_probe + 1)
            found = self.keys[window]
            hit = found == cells[pending][:, None]
            # a hit counts only before the first empty slot (linear probing never skips one)
            empty = np.cumsum(found == 0, axis=1) > 0
            row, col = np.nonzero(hit & ~empty)
            out[pending[row]] = self.rows[window[row, col]]
        return out

    def cells_by_row(self) -> np.ndarray:
        """The cells in row order (the array the table was built from)."""
        used = self.rows >= 0
        out = np.empty(int(used.sum()), dtype=np.uint64)
        out[self.rows[used]] = self.keys[used]
        return out

    def memory_bytes(self) -> int:
        return self.keys.nbytes + self.rows.nbytes
