"""H3 ``latLngToCell`` for whole arrays of points, compiled with numba.

Why: the worker needs the H3 cell of every position fix and of every geofence lookup point. h3ronpy's
``coordinates_to_cells`` costs about 0.5 µs a point and h3-py's scalar ``latlng_to_cell`` about 1 µs a call
from a Python loop. This is a port of the H3 C library's ``latLngToCell`` (v4.5.0, the version h3-py 4.5.0
bundles) as one compiled loop over numpy arrays.

Its floating-point arithmetic is the C library's, operation for operation and in the same order, in plain IEEE
double (no fast-math, no fused multiply-add) with the same libm ``sin``/``cos``/``acos``/``tan``/``atan2`` that
h3-py's extension calls, so the cell ids agree bit for bit: the unit vector of the point, the closest
icosahedron face centre by squared chord distance, the azimuth on the face centre's tangent plane, the gnomonic
hex2d position (``acos``, ``tan``, one multiply by ``M_SQRT7`` per resolution, the Class III rotation) and its
rounding into ijk. The integer part, the digits from the finest resolution up (``_upAp7``/``_upAp7r``,
``_downAp7``/``_downAp7r``, ``_ijkNormalize``, ``_unitIjkToDigit``) and the base cell with its ccw rotations
(pentagons rotated out of the deleted k-axis subsequence), is exact whatever the formulation; it is kept in
axial coordinates here, which saves the normalizations.

H3 4.5 finds the face and the azimuth on unit vectors (``_vec3ToClosestFace``, ``_vec3AzimuthRads``) where
earlier releases used lat/lng great-circle formulas (``_geoToClosestFace``, ``_geoAzimuthRads`` with
``faceCenterGeo``); the two can differ in the last bits, so this follows 4.5. tests/unit/test_h3cells.py
checks the result against ``h3.api.basic_int.latlng_to_cell`` bit for bit (random points at every resolution,
pentagons, poles, the antimeridian, face edges, cell edges, random floats).

Compiled on first use and cached on disk (``cache=True``: next to this file, or in ``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

import math
import operator

import numpy as np
from numba import njit

from fleetstream.domain._h3tables import (
    BASE_CELL_CW_OFFSET_PENT,
    BASE_CELL_IS_PENTAGON,
    FACE_AXES_AZ_RADS_CII,
    FACE_CENTER_POINT,
    FACE_IJK_BASE_CELLS,
)

__all__ = ["latlng_to_cells"]

# Constants from H3's constants.h and faceijk.c, as the same decimal literals (so they parse to the same doubles).
_M_PI_180 = 0.0174532925199432957692369076848861271111
_M_2PI = 6.28318530717958647692528676655900576839433
_EPSILON = 0.0000000000000001
_M_RSIN60 = 1.1547005383792515290182975610039149112953
_M_AP7_ROT_RADS = 0.333473172251832115336090755351601070065900389
_INV_RES0_U_GNOMONIC = 2.61803398874989588842
_M_SQRT7 = 2.6457513110645905905016157536392604257102
_MAX_FACE_COORD = 2
_K_AXES_DIGIT = 1
_H3_CELL_MODE = 1

# Digit rotations (``_rotate60ccw``/``_rotate60cw`` in coordijk.h): 0 (centre) and 7 (invalid) stay put.
_CCW = np.array([0, 5, 3, 1, 6, 4, 2, 7], dtype=np.int64)
_CW = np.array([0, 3, 6, 2, 5, 1, 4, 7], dtype=np.int64)
# _CCW applied n times, n = 0..5: a hexagon base cell's whole rotation in one lookup per digit.
_CCW_N = np.empty((6, 8), dtype=np.int64)
_CCW_N[0] = np.arange(8)
for _n in range(1, 6):
    _CCW_N[_n] = _CCW[_CCW_N[_n - 1]]

# Each resolution's fixed bits: cell mode, the resolution, and digit 7 (unused) below it (H3_INIT's ones).
_H3_HEAD = np.array(
    [(_H3_CELL_MODE << 59) | (r << 52) | ((1 << (3 * (15 - r))) - 1) for r in range(16)], dtype=np.int64
)
_FACE_AZ0 = np.ascontiguousarray(FACE_AXES_AZ_RADS_CII[:, 0])
_FACE_BASE_CELL = np.ascontiguousarray(FACE_IJK_BASE_CELLS[:, :, 0]).astype(np.int64)
_FACE_CCW_ROT = np.ascontiguousarray(FACE_IJK_BASE_CELLS[:, :, 1]).astype(np.int64)
_IS_PENTAGON = BASE_CELL_IS_PENTAGON.copy()
_CW_OFFSET_PENT = BASE_CELL_CW_OFFSET_PENT.astype(np.int64)


def _tangent_basis(face: int) -> tuple[list[float], list[float]]:
    """``_vec3TangentBasis`` of a face centre: local north and east unit vectors there.

    Depends only on the face, so it is computed once here, with the same double operations in the same order
    as vec3d.h (Python floats are IEEE doubles and ``math.sqrt`` is correctly rounded, as C's ``sqrt``)."""
    px, py, pz = (float(c) for c in FACE_CENTER_POINT[face])
    b = -(0.0 * px + 0.0 * py + 1.0 * pz)  # -vec3Dot(northPole, p)
    north = [1.0 * 0.0 + b * px, 1.0 * 0.0 + b * py, 1.0 * 1.0 + b * pz]
    norm = math.sqrt(north[0] * north[0] + north[1] * north[1] + north[2] * north[2])
    s = 1.0 / norm if norm > 0.0 else 0.0
    north = [c * s for c in north]
    east = [
        north[1] * pz - north[2] * py,
        north[2] * px - north[0] * pz,
        north[0] * py - north[1] * px,
    ]
    return north, east


_FACE_NORTH = np.empty((20, 3), dtype=np.float64)
_FACE_EAST = np.empty((20, 3), dtype=np.float64)
for _f in range(20):
    _FACE_NORTH[_f], _FACE_EAST[_f] = _tangent_basis(_f)


@njit(cache=True, nogil=True, inline="always")
def _round7(n: int) -> int:
    """``lround(n * M_ONESEVENTH)`` as _upAp7/_upAp7r compute it, in integers: n / 7 to the nearest integer.

    Why integers: the double version (int -> double, multiply, truncate, compare the remainder with ±0.5) is a
    ~30-cycle dependency chain per resolution; this is ~10. Equal because n / 7 is never a half-integer (its
    fraction is k/7) and lies at least 1/14 from one, while the double product is off from n / 7 by at most
    |n| * 2**-52, under 1/14 for |n| < 2**48; |n| stays below 2**25 here (hex2d coordinates at res 15 are
    under ~6e6). tests/unit/test_h3cells.py checks the equality for every |n| <= 2**26 against a C-style
    lround (round half away from zero; numba's ``round`` rounds halves to even)."""
    return (2 * n + 7) // 14


@njit(cache=True, nogil=True, inline="always")
def _pos_angle(rads: float) -> float:
    """``_posAngleRads``: an angle into [0, 2π), tested on the input as the C code does."""
    tmp = rads + _M_2PI if rads < 0.0 else rads
    if rads >= _M_2PI:
        tmp -= _M_2PI
    return tmp


@njit(cache=True, nogil=True, inline="always")
def _normalize(i: int, j: int, k: int) -> tuple[int, int, int]:
    """``_ijkNormalize``: no negative component, and the smallest one zero."""
    if i < 0:
        j -= i
        k -= i
        i = 0
    if j < 0:
        i -= j
        k -= j
        j = 0
    if k < 0:
        i -= k
        j -= k
        k = 0
    m = i
    if j < m:
        m = j
    if k < m:
        m = k
    if m > 0:
        i -= m
        j -= m
        k -= m
    return i, j, k


# _unitIjkToDigit by axial offset (i - k, j - k) from the parent's centre, index (da + 1) * 3 + (db + 1):
# k (-1,-1) 1, jk (-1,0) 3, j (0,1) 2, ik (0,-1) 5, centre 0, i (1,0) 4, ij (1,1) 6; (1,-1), (-1,1) and any offset
# beyond one step are not unit vectors (INVALID_DIGIT, 7).
_AXIAL_DIGIT = np.array([1, 3, 7, 5, 0, 2, 7, 4, 6], dtype=np.int64)


@njit(cache=True, nogil=True, inline="always")
def _axial_digit(da: int, db: int) -> int:
    """``_ijkNormalize`` + ``_unitIjkToDigit`` of a child's offset from its parent's centre."""
    if -1 <= da <= 1 and -1 <= db <= 1:
        return _AXIAL_DIGIT[(da + 1) * 3 + (db + 1)]
    return 7


@njit(cache=True, nogil=True, inline="always")
def _hex2d_to_axial(x: float, y: float) -> tuple[int, int]:
    """``_hex2dToCoordIJK``: the hex containing a hex2d point, quantized in the first quadrant, then folded.

    Returned as (i, j) with k = 0, before the C function's final _ijkNormalize (which keeps i - k and j - k)."""
    a1 = abs(x)
    a2 = abs(y)
    x2 = a2 * _M_RSIN60
    x1 = a1 + x2 / 2.0
    m1 = int(x1)
    m2 = int(x2)
    r1 = x1 - m1
    r2 = x2 - m2
    if r1 < 0.5:
        if r1 < 1.0 / 3.0:
            i = m1
            j = m2 if r2 < (1.0 + r1) / 2.0 else m2 + 1
        else:
            j = m2 if r2 < (1.0 - r1) else m2 + 1
            i = m1 + 1 if (1.0 - r1) <= r2 and r2 < (2.0 * r1) else m1
    elif r1 < 2.0 / 3.0:
        j = m2 if r2 < (1.0 - r1) else m2 + 1
        i = m1 if (2.0 * r1 - 1.0) < r2 and r2 < (1.0 - r1) else m1 + 1
    else:
        i = m1 + 1
        j = m2 if r2 < (r1 / 2.0) else m2 + 1
    # fold across the axes (j >= 0 here, so floor division is C's truncating division); C's even-j and odd-j
    # branches for x < 0, i - 2 * (i - j / 2) and i - (2 * (i - (j + 1) / 2) + 1), both come to j - i
    if x < 0.0:
        i = j - i
    if y < 0.0:
        i = i - (2 * j + 1) // 2
        j = -j
    return i, j


@njit(cache=True, nogil=True, inline="always")
def _cell(lat_deg: float, lng_deg: float, res: int, digits: np.ndarray) -> int:
    """``latLngToCell`` for one finite point; 0 (H3_NULL) where the C library fails (never seen).

    ``digits`` is scratch for the resolution 1..res digits (index = resolution), reused across points."""
    # latLngToVec3 (degsToRads is a multiply by the pi/180 constant, as h3-py calls it)
    lat = lat_deg * _M_PI_180
    lng = lng_deg * _M_PI_180
    rc = math.cos(lat)
    px = math.cos(lng) * rc
    py = math.sin(lng) * rc
    pz = math.sin(lat)

    # _vec3ToClosestFace: smallest squared chord distance, first face on ties
    face = 0
    sqd = 5.0
    for f in range(20):
        dx = FACE_CENTER_POINT[f, 0] - px
        dy = FACE_CENTER_POINT[f, 1] - py
        dz = FACE_CENTER_POINT[f, 2] - pz
        d = dx * dx + dy * dy + dz * dz
        if d < sqd:
            face = f
            sqd = d

    # _vec3ToHex2d
    r = math.acos(1 - sqd * 0.5)
    if r < _EPSILON:
        hx = 0.0
        hy = 0.0
    else:
        # _vec3AzimuthRads(face centre, p): p projected onto the face centre's tangent plane
        cx = FACE_CENTER_POINT[face, 0]
        cy = FACE_CENTER_POINT[face, 1]
        cz = FACE_CENTER_POINT[face, 2]
        b = -(px * cx + py * cy + pz * cz)
        qx = 1.0 * px + b * cx
        qy = 1.0 * py + b * cy
        qz = 1.0 * pz + b * cz
        norm = math.sqrt(qx * qx + qy * qy + qz * qz)
        s = 1.0 / norm if norm > 0.0 else 0.0
        qx *= s
        qy *= s
        qz *= s
        az = math.atan2(
            qx * _FACE_EAST[face, 0] + qy * _FACE_EAST[face, 1] + qz * _FACE_EAST[face, 2],
            qx * _FACE_NORTH[face, 0] + qy * _FACE_NORTH[face, 1] + qz * _FACE_NORTH[face, 2],
        )
        theta = _pos_angle(_FACE_AZ0[face] - _pos_angle(az))
        if res % 2 == 1:  # Class III
            theta = _pos_angle(theta - _M_AP7_ROT_RADS)
        r = math.tan(r)  # gnomonic
        r *= _INV_RES0_U_GNOMONIC
        for _ in range(res):  # one multiply per resolution, in order, as the C loop does
            r *= _M_SQRT7
        hx = r * math.cos(theta)
        hy = r * math.sin(theta)

    # _faceIjkToH3: digits from the finest resolution up, ending on the base cell's ijk. Tracked as axial
    # coordinates (i - k, j - k), which _ijkNormalize leaves unchanged: they are the (i, j) that _upAp7 and
    # _upAp7r compute from, so their arguments are the C library's exactly.
    a, b = _hex2d_to_axial(hx, hy)
    for rr in range(res, 0, -1):
        if rr % 2 == 1:  # Class III: _upAp7, then _downAp7 of the parent for its centre
            pa = _round7(3 * a - b)
            pb = _round7(a + 2 * b)
            da = a - (2 * pa + pb)
            db = b - (3 * pb - pa)
        else:  # Class II: _upAp7r, _downAp7r
            pa = _round7(2 * a + b)
            pb = _round7(3 * b - a)
            da = a - (3 * pa - pb)
            db = b - (pa + 2 * pb)
        digits[rr] = _axial_digit(da, db)
        a = pa
        b = pb
    i, j, k = _normalize(a, b, 0)

    if i > _MAX_FACE_COORD or j > _MAX_FACE_COORD or k > _MAX_FACE_COORD:
        return 0
    slot = i * 9 + j * 3 + k
    base_cell = _FACE_BASE_CELL[face, slot]
    rots = _FACE_CCW_ROT[face, slot]

    if _IS_PENTAGON[base_cell]:
        # force rotation out of the missing k-axes subsequence (leading non-zero digit 1)
        lead = 0
        for rr in range(1, res + 1):
            if digits[rr] != 0:
                lead = digits[rr]
                break
        if lead == _K_AXES_DIGIT:
            table = _CW if (_CW_OFFSET_PENT[base_cell, 0] == face or _CW_OFFSET_PENT[base_cell, 1] == face) else _CCW
            for rr in range(1, res + 1):
                digits[rr] = table[digits[rr]]
        for _ in range(rots):
            # _h3RotatePent60ccw: rotate each digit; when the first non-zero one lands on the k axis, rotate
            # the whole index once more (digits after it then turn twice, as in the C loop)
            found = False
            for rr in range(1, res + 1):
                digits[rr] = _CCW[digits[rr]]
                if not found and digits[rr] != 0:
                    found = True
                    if digits[rr] == _K_AXES_DIGIT:
                        for q in range(1, res + 1):
                            digits[q] = _CCW[digits[q]]
    elif rots:
        for rr in range(1, res + 1):
            digits[rr] = _CCW_N[rots, digits[rr]]

    h = _H3_HEAD[res] | (base_cell << 45)
    for rr in range(1, res + 1):
        h |= digits[rr] << (3 * (15 - rr))
    return h


@njit(cache=True, nogil=True)
def _cells(lats: np.ndarray, lons: np.ndarray, res: np.ndarray, out: np.ndarray) -> int:
    """Cells of every point into ``out``; ``res`` has one resolution per point or a single one for all.

    Returns -1 on success. The inputs are checked first, before any cell is written: the index of the first
    non-finite coordinate or out-of-range resolution is returned instead. Also returns -2 - k if point k came
    out as H3_NULL, where the C library reports failure (not expected for any finite input)."""
    n = len(lats)
    step = 1 if len(res) == n else 0
    for k in range(n):
        r = res[k * step]
        if not (math.isfinite(lats[k]) and math.isfinite(lons[k])) or r < 0 or r > 15:
            return k
    digits = np.zeros(16, dtype=np.int64)
    for k in range(n):
        h = _cell(lats[k], lons[k], np.int64(res[k * step]), digits)
        if h == 0:
            return -2 - k
        out[k] = np.uint64(h)
    return -1


def latlng_to_cells(lats: np.ndarray, lons: np.ndarray, res: int | np.ndarray) -> np.ndarray:
    """H3 cells (uint64) of points given in degrees, exactly as ``h3.api.basic_int.latlng_to_cell`` gives them.

    ``res`` is one resolution 0..15 for all points or an integer array with one per point. Raises ValueError
    for a non-finite coordinate or a resolution outside 0..15 (checked for all points before any work)."""
    lat = np.ascontiguousarray(lats, dtype=np.float64)
    lon = np.ascontiguousarray(lons, dtype=np.float64)
    if lat.shape != lon.shape:
        raise ValueError(f"lats and lons differ in shape: {lat.shape} != {lon.shape}")
    shape = lat.shape
    lat = lat.reshape(-1)
    lon = lon.reshape(-1)
    if isinstance(res, np.ndarray) and res.ndim > 0:
        if res.shape != shape:
            raise ValueError(f"res has shape {res.shape}, the points {shape}")
        if not np.issubdtype(res.dtype, np.integer):
            raise TypeError(f"res must be integers, not {res.dtype}")
        res_arr = np.ascontiguousarray(res.reshape(-1), dtype=np.int64)  # one compiled signature for all
    else:
        r = operator.index(res)
        if not 0 <= r <= 15:
            raise ValueError(f"resolution {r} is outside 0..15")
        res_arr = np.full(1, r, dtype=np.int64)
    out = np.empty(len(lat), dtype=np.uint64)
    if not len(lat):
        return out.reshape(shape)
    status = _cells(lat, lon, res_arr, out)
    if status >= 0:
        r = int(res_arr[status if len(res_arr) == len(lat) else 0])
        if not 0 <= r <= 15:
            raise ValueError(f"resolution {r} (point {status}) is outside 0..15")
        raise ValueError(f"non-finite coordinate at point {status}: lat {lat[status]}, lon {lon[status]}")
    if status <= -2:
        k = -2 - status
        raise ValueError(f"H3 found no cell for point {k}: lat {lat[k]}, lon {lon[k]}")
    return out.reshape(shape)
