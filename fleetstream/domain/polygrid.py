"""Point-in-polygon for many (point, polygon) pairs at once: crossing numbers over a few edges per pair.

Why: the index's boundary cells leave a few thousand (point, polygon) pairs per batch of 1,000 fixes to an exact
test; GEOS (``shapely.intersects_xy``) spends about a microsecond per pair, a compiled loop over each pair's few
edges a small fraction of that. The grids are built here with numpy; the test per pair is ``kernels.covers_one``.

Design. Each polygon (all rings of all parts, lon/lat planar per RFC 7946) gets a regular grid of buckets over
its bounding box (grown by a small margin, so no vertex lies on the grid's outer lines); a bucket lists the
edges that meet its closed box, and knows whether its lower-right corner A is inside. A point p in the bucket
is then decided by the crossing number rule (a horizontal ray to +x; an edge counts when its end points lie on
different sides of the ray, a vertex on the ray counting as below) along a path that stays in the box: from p
right to Q on the bucket's right side (edges crossing the horizontal leg), then down that side to A (edges
crossing the vertical leg). inside(p) = inside(A) xor (crossings on both legs mod 2). Only the bucket's edges can
cross the legs, so each pair costs its bucket's few edges. The corner statuses come from one sweep per grid
row at build time (the same rule: edges crossing the row's bottom line, to the right of each corner).

Layout: one int64 word per bucket (``_bucket_words``) holds the corner's status, its edge count and where its
edges are. Most buckets (85% of the non-empty ones in the benchmark) hold consecutive edges of one ring: the
word then names the first edge and the test reads the vertices straight from the vertex array, one cache
miss fewer per pair than an edge list in between (the grids of 100,000 geofences are far larger than the
caches). The other buckets list their edge ids in ``edges``.

Exact for points off the boundary: the rule is the standard even-odd rule (holes and multipolygon parts need
nothing special). Points on the boundary count as inside (covers) when their cross product with an edge of
their bucket is exactly 0, which holds for vertices and for points on axis-parallel edges (boxes drawn with
rounded coordinates meet fixes with rounded coordinates). Otherwise the answer can differ from GEOS's
``covers`` only for points within rounding distance (about 1e-15 degrees) of an edge, or when an edge passes
exactly through a bucket corner, far below the centimetre the index promises.
"""

from __future__ import annotations

import numpy as np
import shapely

from fleetstream.domain.kernels import covers_many

BUCKETS_PER_EDGE = 2.0  # grid buckets per polygon edge (more: fewer edges per bucket, more memory)
MAX_SIDE = 256  # buckets along one side of a grid at most


class PolygonGrids:
    """Bucket grids of many polygons (numbered 0..n-1 in the order given); ``covers`` tests pairs."""

    def __init__(self, geoms: np.ndarray) -> None:
        n = len(geoms)
        parts, part_of = shapely.get_parts(geoms, return_index=True)
        rings, ring_part = shapely.get_rings(parts, return_index=True)
        coords, ring_of = shapely.get_coordinates(rings, return_index=True)
        vx, vy = coords[:, 0], coords[:, 1]
        self.vertices = np.ascontiguousarray(coords[:, :2])  # x, y side by side: an edge's ends share a cache line
        # edge e runs from vertex e to vertex e + 1 of the same ring
        edges = np.flatnonzero(ring_of[1:] == ring_of[:-1])
        edge_fence = part_of[ring_part[ring_of[edges]]]
        n_edges = np.bincount(edge_fence, minlength=n)

        bounds = shapely.bounds(geoms) if n else np.zeros((0, 4))
        width, height = bounds[:, 2] - bounds[:, 0], bounds[:, 3] - bounds[:, 1]
        margin = np.maximum(width, height) * 1e-6 + 1e-9
        width, height = width + 2 * margin, height + 2 * margin
        target = np.maximum(n_edges * BUCKETS_PER_EDGE, 1.0)
        aspect = width / height
        self.nx = np.clip(np.round(np.sqrt(target * aspect)), 1, MAX_SIDE).astype(np.int64)
        self.ny = np.clip(np.round(np.sqrt(target / aspect)), 1, MAX_SIDE).astype(np.int64)
        self.x0, self.y0 = bounds[:, 0] - margin, bounds[:, 1] - margin
        self.dx, self.dy = width / self.nx, height / self.ny
        sizes = self.nx * self.ny
        self.base = (np.cumsum(sizes) - sizes).astype(np.int64)
        total = int(sizes.sum())

        # edges of each bucket (CSR): candidates from each edge's bounding box, kept when the edge meets the box
        x1, y1, x2, y2 = vx[edges], vy[edges], vx[edges + 1], vy[edges + 1]
        f = edge_fence
        tol = 1e-9
        i_lo = self._col(f, np.minimum(x1, x2), -tol)
        i_hi = self._col(f, np.maximum(x1, x2), tol)
        j_lo = self._row(f, np.minimum(y1, y2), -tol)
        j_hi = self._row(f, np.maximum(y1, y2), tol)
        span_i = i_hi - i_lo + 1
        counts = span_i * (j_hi - j_lo + 1)
        which = np.repeat(np.arange(len(edges)), counts)
        local = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        ci = i_lo[which] + local % span_i[which]
        cj = j_lo[which] + local // span_i[which]
        cf = f[which]
        # an edge spanning one row (or one column) of buckets meets every bucket of its span: no test needed
        keep = (span_i[which] == 1) | (j_lo[which] == j_hi[which])
        test = ~keep
        if test.any():  # the box's corners not all strictly on one side of the edge's line
            w = which[test]
            gf, gi, gj = cf[test], ci[test], cj[test]
            ex, ey = x2[w] - x1[w], y2[w] - y1[w]
            gx, gy = self.dx[gf] * tol, self.dy[gf] * tol
            left, right = self.x0[gf] + gi * self.dx[gf] - gx, self.x0[gf] + (gi + 1) * self.dx[gf] + gx
            bottom, top = self.y0[gf] + gj * self.dy[gf] - gy, self.y0[gf] + (gj + 1) * self.dy[gf] + gy
            sides = [ex * (cy - y1[w]) - ey * (cx - x1[w]) for cx in (left, right) for cy in (bottom, top)]
            lo = np.minimum(np.minimum(sides[0], sides[1]), np.minimum(sides[2], sides[3]))
            hi = np.maximum(np.maximum(sides[0], sides[1]), np.maximum(sides[2], sides[3]))
            keep[test] = (lo <= 0) & (hi >= 0)
        bucket = self.base[cf[keep]] + cj[keep] * self.nx[cf[keep]] + ci[keep]
        # inside status of each bucket's lower-right corner: per row, the edges crossing its bottom line
        corner = self._corner_status(f, x1, y1, x2, y2, total)
        self.words, self.edges = _bucket_words(bucket, edges[which[keep]], corner, total)
        self._params = np.column_stack((self.x0, self.y0, self.dx, self.dy, self.nx, self.ny, self.base, self.nx))

    def _col(self, f: np.ndarray, x: np.ndarray, slack: float) -> np.ndarray:
        return np.clip(np.floor((x - self.x0[f]) / self.dx[f] + slack), 0, self.nx[f] - 1).astype(np.int64)

    def _row(self, f: np.ndarray, y: np.ndarray, slack: float) -> np.ndarray:
        return np.clip(np.floor((y - self.y0[f]) / self.dy[f] + slack), 0, self.ny[f] - 1).astype(np.int64)

    def _corner_status(self, f: np.ndarray, x1: np.ndarray, y1: np.ndarray, x2: np.ndarray, y2: np.ndarray,
                       total: int) -> np.ndarray:
        """Crossing-number status of every corner (x0 + (i + 1) dx, y0 + j dy): the parity of edges crossing
        the row line y0 + j dy strictly right of it. Per crossing, the corners left of it flip: +1 at the row's
        start and -1 after the last such corner, summed along rows (rows laid out nx + 1 wide)."""
        j_lo = self._row(f, np.minimum(y1, y2), -1e-9) - 1
        j_hi = self._row(f, np.maximum(y1, y2), 1e-9) + 1
        j_lo = np.maximum(j_lo, 0)
        j_hi = np.minimum(j_hi, self.ny[f] - 1)
        counts = np.maximum(j_hi - j_lo + 1, 0)
        which = np.repeat(np.arange(len(f)), counts)
        j = j_lo[which] + np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        g = f[which]
        line = self.y0[g] + j * self.dy[g]
        a1, b1, a2, b2 = x1[which], y1[which], x2[which], y2[which]
        cross = (b1 > line) != (b2 > line)
        a1, b1, a2, b2, line, j, g = a1[cross], b1[cross], a2[cross], b2[cross], line[cross], j[cross], g[cross]
        xint = a1 + (line - b1) * (a2 - a1) / (b2 - b1)
        # k = how many corners x0 + (i + 1) dx (i < nx) lie strictly left of xint, by the same float formula
        nx = self.nx[g]
        k = np.clip(np.ceil((xint - self.x0[g]) / self.dx[g]) - 1, 0, nx).astype(np.int64)
        for _ in range(2):  # settle rounding exactly
            up = (k < nx) & (self.x0[g] + (k + 1) * self.dx[g] < xint)
            k = k + up
            down = (k > 0) & ~(self.x0[g] + k * self.dx[g] < xint)
            k = k - down
        wide = self.ny * (self.nx + 1)
        wide_base = (np.cumsum(wide) - wide).astype(np.int64)
        row = wide_base[g] + j * (nx + 1)
        wide_total = int((self.ny * (self.nx + 1)).sum())
        diff = np.bincount(row, minlength=wide_total + 1) - np.bincount(row + k, minlength=wide_total + 1)
        parity = (np.cumsum(diff[:wide_total]) & 1).astype(bool)
        # drop the extra column of each row
        keep = np.ones(wide_total, dtype=bool)
        keep[wide_base[np.repeat(np.arange(len(self.nx)), self.ny)] +
             _row_offsets(self.ny) * np.repeat(self.nx + 1, self.ny) + np.repeat(self.nx, self.ny)] = False
        status = parity[keep]
        assert len(status) == total
        return status

    def covers(self, fences: np.ndarray, lons: np.ndarray, lats: np.ndarray) -> np.ndarray:
        """Whether polygon ``fences[k]`` contains point k (lon/lat planar; boundary within rounding): per pair,
        the crossing numbers of its bucket's edges (``kernels.covers_one``, compiled)."""
        return covers_many(np.ascontiguousarray(fences, dtype=np.int64), np.ascontiguousarray(lons, dtype=np.float64),
                           np.ascontiguousarray(lats, dtype=np.float64), *self.kernel_arrays())

    def kernel_arrays(self) -> tuple[np.ndarray, ...]:
        """What the compiled tests read: per-grid parameters, bucket words, listed edges, vertex x and y."""
        return self._params, self.words, self.edges, self.vertices

    def memory_bytes(self) -> int:
        return sum(a.nbytes for a in (self.vertices, self.edges, self.words, self._params, self.x0, self.y0, self.dx,
                                      self.dy, self.nx, self.ny, self.base))


def _bucket_words(bucket: np.ndarray, edge: np.ndarray, corner: np.ndarray, total: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """One int64 per bucket, from its (bucket, edge) pairs: the corner's status (bit 0), whether its edges are
    listed (bit 1), how many (bits 2-21) and where they start (bits 22-): the first edge's id when they are
    consecutive edges of one ring (most buckets: their vertices are then read straight from the vertex array,
    no list in between), else the start of their list in the returned edge array."""
    order = np.lexsort((edge, bucket))
    bucket, edge = bucket[order], edge[order]
    counts = np.bincount(bucket, minlength=total)
    first = np.cumsum(counts) - counts
    run_start = np.ones(len(edge), dtype=bool)  # a pair that does not continue the one before
    run_start[1:] = (bucket[1:] != bucket[:-1]) | (edge[1:] != edge[:-1] + 1)
    listed = np.bincount(bucket[run_start], minlength=total) > 1  # consecutive edges share their vertex
    in_list = listed[bucket]
    listed_counts = np.where(listed, counts, 0)
    start = np.where(listed, np.cumsum(listed_counts) - listed_counts, 0)
    has = counts > 0
    start[has & ~listed] = edge[first[has & ~listed]]
    assert counts.max(initial=0) < 1 << 20
    words = (start.astype(np.int64) << 22) | (counts.astype(np.int64) << 2) | (listed.astype(np.int64) << 1)
    words |= corner.astype(np.int64)
    return words, edge[in_list].astype(np.int32)


def _row_offsets(ny: np.ndarray) -> np.ndarray:
    """0..ny[g]-1 for every grid g, concatenated."""
    return np.arange(int(ny.sum())) - np.repeat(np.cumsum(ny) - ny, ny)
