"""Positions: WGS84 lat/lon <-> UTM (zone, hemisphere), geodesic distances, cell keys.

UTM coordinates are only comparable inside one zone and hemisphere, so every position
carries both, and every distance in metres is geodesic (Lambert's formula on the WGS84
ellipsoid, see :func:`geodesic_m`).
"""

from __future__ import annotations

import numpy as np
import utm

from geoloc.errors import DatasetError

EARTH_RADIUS_M = 6_371_008.8
UTM_LAT_MIN, UTM_LAT_MAX = -80.0, 84.0
"""UTM is defined between 80 S and 84 N; beyond that (UPS) is out of scope."""

_ZONE_BITS = 7  # zone 1..60 and a hemisphere bit
_AXIS_BITS = 28  # p, q < 2**28 cells (M >= 1 m covers northings up to 10,000 km)


def check_latlon(lat: np.ndarray, lon: np.ndarray, *, where: str) -> None:
    """Raise :class:`DatasetError` naming ``where`` if any coordinate is NaN or out of range."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    bad = ~(np.isfinite(lat) & np.isfinite(lon)) | (lat < UTM_LAT_MIN) | (lat > UTM_LAT_MAX) | (lon < -180) | (lon > 180)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DatasetError(
            f"{where}: latitude/longitude ({lat.flat[i]}, {lon.flat[i]}) is not a valid position "
            f"(latitude must lie in [{UTM_LAT_MIN}, {UTM_LAT_MAX}], longitude in [-180, 180], no NaN)"
        )


def latlon_to_utm(lat: np.ndarray, lon: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """WGS84 degrees -> UTM in each point's own standard zone.

    Args:
        lat, lon: ``[N]`` degrees (validate with :func:`check_latlon` first).
    Returns:
        east ``[N]`` float64 m, north ``[N]`` float64 m, zone ``[N]`` int16 (1..60),
        south ``[N]`` bool (southern hemisphere, false northing 10,000 km).
    """
    lat = np.atleast_1d(np.asarray(lat, dtype=np.float64))
    lon = np.atleast_1d(np.asarray(lon, dtype=np.float64))
    east = np.empty_like(lat)
    north = np.empty_like(lat)
    zone = np.empty(lat.shape, dtype=np.int16)
    # utm's vectorised form needs one zone per call: group points by their zone.
    zones = latlon_to_zone_number(lat, lon)
    south = lat < 0
    for z in np.unique(zones):
        for s in (False, True):
            m = (zones == z) & (south == s)
            if not m.any():
                continue
            e, n, _, _ = utm.from_latlon(lat[m], lon[m], force_zone_number=int(z), force_northern=not s)
            east[m], north[m], zone[m] = e, n, z
    return east, north, zone, south


def latlon_to_zone_number(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Standard UTM zone of each point, vectorised; ``[N]`` int16 in 1..60.

    Identical to ``utm.latlon_to_zone_number`` point by point (same float arithmetic),
    including its exceptions: zone 32 widened over south-west Norway (56..64 N, 3..12 E)
    and the Svalbard zones 31/33/35/37 (72..84 N, 0..42 E). Longitude 180 is zone 1.
    """
    lat = np.atleast_1d(np.asarray(lat, dtype=np.float64))
    lon = np.atleast_1d(np.asarray(lon, dtype=np.float64))
    lon = (lon % 360 + 540) % 360 - 180
    zone = (np.floor((lon + 180) / 6) + 1).astype(np.int16)
    zone[(lat >= 56) & (lat < 64) & (lon >= 3) & (lon < 12)] = 32
    sval = (lat >= 72) & (lat <= 84) & (lon >= 0)
    for lo, hi, z in ((0, 9, 31), (9, 21, 33), (21, 33, 35), (33, 42, 37)):
        zone[sval & (lon >= lo) & (lon < hi)] = z
    return zone


def utm_to_latlon(east: np.ndarray, north: np.ndarray, zone: np.ndarray, south: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """UTM -> WGS84 degrees. All inputs ``[N]``; returns lat ``[N]``, lon ``[N]`` float64."""
    east = np.atleast_1d(np.asarray(east, dtype=np.float64))
    north = np.atleast_1d(np.asarray(north, dtype=np.float64))
    zone = np.broadcast_to(np.atleast_1d(np.asarray(zone, dtype=np.int16)), east.shape)
    south = np.broadcast_to(np.atleast_1d(np.asarray(south, dtype=bool)), east.shape)
    lat = np.empty_like(east)
    lon = np.empty_like(east)
    for z in np.unique(zone):
        for s in (False, True):
            m = (zone == z) & (south == s)
            if m.any():
                lat[m], lon[m] = utm.to_latlon(east[m], north[m], int(z), northern=not s, strict=False)
    return lat, lon


def zone_letter_is_south(letter: str) -> bool:
    """MGRS latitude band letter (C..X, no I/O) -> True for the southern hemisphere (C..M)."""
    letter = letter.upper()
    if len(letter) != 1 or letter not in "CDEFGHJKLMNPQRSTUVWX":
        raise ValueError(f"invalid UTM latitude band letter {letter!r} (expected one of C..X)")
    return letter < "N"


WGS84_A = 6_378_137.0
WGS84_F = 1 / 298.257223563


def geodesic_m(lat1: np.ndarray, lon1: np.ndarray, lat2: np.ndarray, lon2: np.ndarray) -> np.ndarray:
    """Distance in metres on the WGS84 ellipsoid between broadcastable arrays of degrees.

    Lambert's formula: the great-circle angle between the reduced latitudes, corrected for
    the flattening. Relative error ~1e-5 for short lines (metres to kilometres), about 10 m
    over thousands of kilometres; exact along the equator. (A haversine on the mean radius
    is off by up to 0.56 %: north-south near the equator.)
    """
    lat1, lon1, lat2, lon2 = (np.asarray(x, dtype=np.float64) for x in (lat1, lon1, lat2, lon2))
    b1 = np.arctan((1 - WGS84_F) * np.tan(np.radians(lat1)))
    b2 = np.arctan((1 - WGS84_F) * np.tan(np.radians(lat2)))
    dl = np.radians(lon2 - lon1)
    h = np.sin((b2 - b1) / 2) ** 2 + np.cos(b1) * np.cos(b2) * np.sin(dl / 2) ** 2
    sigma = 2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))
    p, q = (b1 + b2) / 2, (b2 - b1) / 2
    s2, c2 = np.sin(sigma / 2) ** 2, np.cos(sigma / 2) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(c2 > 0, (sigma - np.sin(sigma)) * np.sin(p) ** 2 * np.cos(q) ** 2 / c2, 0.0)
        y = np.where(s2 > 0, (sigma + np.sin(sigma)) * np.cos(p) ** 2 * np.sin(q) ** 2 / s2, 0.0)
    return np.maximum(WGS84_A * (sigma - WGS84_F / 2 * (x + y)), 0.0)


# -- cell keys ---------------------------------------------------------------------------------


def cell_pq(east: np.ndarray, north: np.ndarray, size_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Cell indices ``p = floor(east / M)``, ``q = floor(north / M)``; ``[N]`` int64 each."""
    return np.floor(np.asarray(east) / size_m).astype(np.int64), np.floor(np.asarray(north) / size_m).astype(np.int64)


def cell_key(zone: np.ndarray, south: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Pack (zone, hemisphere, p, q) into one int64 key, unique across zones and hemispheres."""
    p = np.asarray(p, dtype=np.int64)
    q = np.asarray(q, dtype=np.int64)
    if (p < 0).any() or (q < 0).any() or (p >= 1 << _AXIS_BITS).any() or (q >= 1 << _AXIS_BITS).any():
        raise ValueError("cell index out of range: UTM coordinates must be non-negative and the cell side >= 1 m")
    zh = np.asarray(zone, dtype=np.int64) * 2 + np.asarray(south, dtype=np.int64)
    return (zh << (2 * _AXIS_BITS)) | (p << _AXIS_BITS) | q


def split_cell_key(key: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`cell_key`: returns zone int16, south bool, p int64, q int64."""
    key = np.asarray(key, dtype=np.int64)
    mask = (1 << _AXIS_BITS) - 1
    zh = key >> (2 * _AXIS_BITS)
    return (zh // 2).astype(np.int16), (zh % 2).astype(bool), (key >> _AXIS_BITS) & mask, key & mask
