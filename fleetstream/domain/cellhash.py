"""An open-addressing hash table of uint64 H3 cells: built with whole-array numpy, probed by compiled loops
(``kernels``: ``find`` here, and GeofenceIndex lookups).

Why: a sorted array searched with ``searchsorted`` costs about twenty cache-missing steps per key, growing with
the number of cells (so with the number of geofences); a hash table costs one or two probes per key whatever
its size. Linear probing, splitmix64 hashing, half full. Cell 0 is not a valid H3
index, so it marks an empty slot.
"""

from __future__ import annotations

import numpy as np

from fleetstream.domain.kernels import find_slots, home_slots

LOAD = 0.5  # cells per slot


class CellHash:
    """The slot of each of ``cells`` (distinct, non-zero) in an open-addressing table, -1 for any other cell.
    Each slot is a record of two uint64: the key, and a word the caller fills (``payload``; the index: where
    the slot's entries are, or the only one). A found key's word is then on the key's cache line."""

    def __init__(self, keys: np.ndarray, capacity: int, max_probe: int) -> None:
        self.records = np.zeros((len(keys), 2), dtype=np.uint64)
        self.records[:, 0] = keys
        self._capacity = np.uint64(capacity)
        self.max_probe = max_probe

    @property
    def keys(self) -> np.ndarray:
        return self.records[:, 0]

    @property
    def payload(self) -> np.ndarray:
        """Writable view of every slot's second word."""
        return self.records[:, 1]

    @classmethod
    def build(cls, cells: np.ndarray) -> tuple[CellHash, np.ndarray]:
        """The table of ``cells``, and the slot each of them went to."""
        cells = np.asarray(cells, dtype=np.uint64)
        table = cls(np.zeros(0, dtype=np.uint64), max(16, int(len(cells) / LOAD)), 0)
        keys = np.zeros(int(table._capacity) + 64, dtype=np.uint64)  # probes run on past the end
        slot_of = np.empty(len(cells), dtype=np.int64)
        pending = np.arange(len(cells))
        slot = home_slots(cells, table._capacity)
        probe = 0
        while len(pending):
            if slot.max(initial=0) >= len(keys):
                keys = np.concatenate((keys, np.zeros(len(keys) // 4, dtype=np.uint64)))
            # of the keys aiming at one free slot, the first takes it
            cand = np.flatnonzero(keys[slot] == 0)
            _, first = np.unique(slot[cand], return_index=True)
            won = cand[first]
            keys[slot[won]] = cells[pending[won]]
            slot_of[pending[won]] = slot[won]
            if len(won):
                table.max_probe = probe
            left = np.ones(len(pending), dtype=bool)
            left[won] = False
            pending, slot = pending[left], slot[left] + 1
            probe += 1
        table = cls(keys, int(table._capacity), table.max_probe)
        return table, slot_of

    def __len__(self) -> int:
        """Number of slots (the length of per-slot arrays)."""
        return len(self.keys)

    @property
    def capacity(self) -> np.uint64:
        return self._capacity

    def find(self, cells: np.ndarray) -> np.ndarray:
        """Slot of every cell (-1: absent): linear probing from its hash slot, compiled (``kernels.find_slots``,
        the probe loop GeofenceIndex lookups run)."""
        return find_slots(self.records, np.ascontiguousarray(cells, dtype=np.uint64), self._capacity,
                          self.max_probe)

    def memory_bytes(self) -> int:
        return self.records.nbytes
