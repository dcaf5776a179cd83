"""Field parsing shared by every reader: the one place each check is written.

VPR names and CSV rows both arrive as columns of strings (``[N]`` lists); this module turns
them into validated arrays: numbers, the UTM zone number, the latitude band letter or
hemisphere, the UTM and lat/lon ranges, and the agreement of lat/lon with UTM when both are
given. Conversions and ranges come from :mod:`geoloc.geo`. Checks are vectorised: the
per-row Python work is one dictionary look-up per distinct value.

``where(i)`` (a callable) names row ``i`` in messages (a file, or a CSV file and line).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from geoloc.errors import DatasetError
from geoloc.geo import (
    UTM_LAT_MAX,
    UTM_LAT_MIN,
    check_latlon,
    geodesic_m,
    latlon_to_utm,
    utm_to_latlon,
    zone_letter_is_south,
)

Where = Callable[[int], str]

LATLON_UTM_TOLERANCE_M = 50.0
"""Largest accepted distance between a record's lat/lon and its UTM position when both are given."""

BAND_SLACK_DEG = 8.0
"""How far (one band) a position read with a ``utm_zone`` band letter may fall outside that band.
Wide enough for a dataset straddling a band edge, narrow enough to catch the wrong hemisphere."""

UTM_ZONE_HELP = ("pass --utm-zone (config key data.utm_zone), e.g. 10S: the zone number and its latitude band "
                 "letter (C..M south, N..X north)")


@dataclass(frozen=True)
class UtmZone:
    """A zone given by the user for records whose UTM coordinates carry none (``--utm-zone``)."""

    number: int
    """1..60."""
    south: bool
    band: str | None = None
    """MGRS latitude band letter when one was given (``"S"`` in ``10S``), else None."""

    def __str__(self) -> str:
        return f"{self.number}{self.band or ('south' if self.south else 'north')}"


_ZONE_RE = re.compile(r"\s*(\d+)\s*([A-Za-z]*)\s*")


def parse_utm_zone(text: str | UtmZone) -> UtmZone:
    """``"10S"`` -> zone 10, band S (north). A single letter is a latitude band (C..M south,
    N..X north; so ``10S`` is San Francisco's band, not "south"); ``N`` reads the same either way.
    The hemisphere may also be a word: ``56south``, ``32 north``.

    Raises:
        DatasetError: one line saying the accepted forms.
    """
    if isinstance(text, UtmZone):
        return text
    m = _ZONE_RE.fullmatch(str(text))
    number = _zone_number(m.group(1)) if m else None
    if number is not None:
        suffix = m.group(2).upper()
        south = _hemisphere_south(suffix) if suffix != "S" else None
        if south is not None:
            return UtmZone(number, south)
        south = _band_south(suffix)
        if south is not None:
            return UtmZone(number, south, suffix)
    raise DatasetError(f"utm_zone {str(text)!r} is not a UTM zone; expected the zone number 1..60 with its latitude "
                       "band letter C..X (10S) or hemisphere (32N, 56south)")


def float_column(values: list[str], *, field: str, where: Where, empty_ok: bool, finite: bool = True,
                 exc: type[Exception] = DatasetError) -> np.ndarray:
    """``[N]`` strings -> ``[N]`` float64, naming the first bad entry.

    ``''`` -> NaN (absent) when ``empty_ok``; with ``finite``, a written ``nan``/``inf`` is an
    error (only an empty field means absent).
    """
    if not values:
        return np.empty(0)
    try:
        arr = np.array([v if v else "nan" for v in values] if empty_ok else values, dtype=np.float64)
    except ValueError:
        for i, v in enumerate(values):
            try:
                if v or not empty_ok:
                    float(v)
            except ValueError:
                raise exc(f"{where(i)}: {field} {v!r} is not a number") from None
        raise
    if finite:
        bad = ~np.isfinite(arr)
        if empty_ok and bad.any():
            bad &= np.fromiter((bool(v) for v in values), dtype=bool, count=len(values))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise exc(f"{where(i)}: {field} {values[i]!r} is not a valid position "
                      "(a finite number is expected; leave the field empty when unknown)")
    return arr


def _zone_number(text: str) -> int | None:
    try:
        z = int(text)
    except ValueError:
        return None
    return z if 1 <= z <= 60 else None


def _band_south(text: str) -> bool | None:
    try:
        return zone_letter_is_south(text)
    except ValueError:
        return None


def _hemisphere_south(text: str) -> bool | None:
    return {"N": False, "NORTH": False, "S": True, "SOUTH": True}.get(text.strip().upper())


def zone_column(values: list[str], *, where: Where, exc=DatasetError) -> np.ndarray:
    """``[N]`` zone numbers as text -> ``[N]`` int16 in 1..60."""
    table = {v: _zone_number(v) for v in set(values)}
    i = next((i for i, v in enumerate(values) if table[v] is None), None)
    if i is not None:
        raise exc(f"{where(i)}: UTM zone number {values[i]!r} is not an integer in 1..60")
    return np.fromiter(map(table.__getitem__, values), dtype=np.int16, count=len(values))


_BAND_MSG = "UTM zone letter {} is not a latitude band letter C..X (C..M south, N..X north)"
_HEMI_MSG = "hemisphere {} must be N, S, north or south"


def split_zone_letter(values: list[str]) -> tuple[list[str], list[str]]:
    """``"33U"`` -> (``"33"``, ``"U"``): a zone column may carry its band letter."""
    zones, letters = [], []
    for z in values:
        if z and z[-1].isalpha():
            zones.append(z[:-1].strip())
            letters.append(z[-1])
        else:
            zones.append(z)
            letters.append("")
    return zones, letters


def invalid_latlon(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """``[N]`` bool: lat/lon NaN, infinite, or outside the UTM range (:data:`geoloc.geo.UTM_LAT_MIN` ..
    :data:`~geoloc.geo.UTM_LAT_MAX`, longitude -180..180)."""
    return ~(np.isfinite(lat) & np.isfinite(lon)) | (lat < UTM_LAT_MIN) | (lat > UTM_LAT_MAX) | (lon < -180) | (lon > 180)


def check_latlon_rows(lat: np.ndarray, lon: np.ndarray, rows: np.ndarray | None = None, *, where: Where) -> None:
    """Raise naming the first of ``rows`` (``[N]`` bool, default all) whose ``[N]`` lat/lon is NaN or
    outside the UTM range; the message is :func:`geoloc.geo.check_latlon`'s."""
    bad = invalid_latlon(lat, lon)
    if rows is not None:
        bad &= rows
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        check_latlon(lat[i:i + 1], lon[i:i + 1], where=where(i))


def check_band(lat: np.ndarray, zone: UtmZone, *, where: Where) -> None:
    """Positions read with a ``utm_zone`` band letter must fall in (or near) that band: a
    southern dataset given ``56S`` (band S, 32..40 N) is caught here, not answered 6000 km off."""
    if zone.band is None:
        return
    k = "CDEFGHJKLMNPQRSTUVWX".index(zone.band)
    lo = UTM_LAT_MIN + 8 * k
    hi = 84.0 if zone.band == "X" else lo + 8
    bad = (lat < lo - BAND_SLACK_DEG) | (lat > hi + BAND_SLACK_DEG)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DatasetError(f"{where(i)}: with utm_zone {zone} this position falls at latitude {lat[i]:.3f}, far from "
                           f"band {zone.band} ({lo:g}..{hi:g}); for the southern hemisphere give {zone.number}south "
                           "or its band letter (C..M)")


def utm_positions(east: np.ndarray, north: np.ndarray, zone: np.ndarray, south: np.ndarray,
                  lat_given: np.ndarray, lon_given: np.ndarray, *, where: Where) -> tuple[np.ndarray, np.ndarray]:
    """Validate UTM positions and any given lat/lon; return the lat/lon derived from UTM.

    Args:
        east, north: ``[N]`` float64 metres; zone ``[N]`` int16; south ``[N]`` bool.
        lat_given, lon_given: ``[N]`` float64 degrees, NaN where absent.
    Returns:
        lat, lon: ``[N]`` float64 degrees from the UTM position (the finer of the two).
    """
    bad = ~(np.isfinite(east) & np.isfinite(north)) | (east <= 0) | (east >= 1_000_000) | (north < 0) | (north > 10_000_000)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DatasetError(f"{where(i)}: UTM position ({east[i]}, {north[i]}) is out of range "
                           "(expected 0 < east < 1,000,000 m and 0 <= north <= 10,000,000 m)")
    lat, lon = utm_to_latlon(east, north, zone, south)
    bad = invalid_latlon(lat, lon)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DatasetError(f"{where(i)}: UTM position falls at latitude {lat[i]:.4f}, outside the UTM range "
                           f"{UTM_LAT_MIN}..{UTM_LAT_MAX}")
    has = ~(np.isnan(lat_given) & np.isnan(lon_given))
    if not has.any():
        return lat, lon
    part = has & (np.isnan(lat_given) | np.isnan(lon_given))
    if part.any():
        i = int(np.flatnonzero(part)[0])
        raise DatasetError(f"{where(i)}: only one of latitude/longitude is given; give both or neither")
    check_latlon_rows(lat_given, lon_given, has, where=where)
    d = np.zeros(len(lat))
    d[has] = geodesic_m(lat_given[has], lon_given[has], lat[has], lon[has])
    far = d > LATLON_UTM_TOLERANCE_M
    if far.any():
        i = int(np.flatnonzero(far)[0])
        raise DatasetError(
            f"{where(i)}: latitude/longitude ({lat_given[i]}, {lon_given[i]}) is {d[i]:.0f} m from the UTM "
            f"position (zone {zone[i]}{'S' if south[i] else 'N'} -> {lat[i]:.6f}, {lon[i]:.6f}); "
            "the UTM zone, hemisphere letter or coordinates are wrong")
    return lat, lon


@dataclass
class Positions:
    """Validated positions of N records, every one in its own UTM zone and hemisphere.

    lat, lon, east, north: ``[N]`` float64; zone ``[N]`` int16; south ``[N]`` bool;
    heading ``[N]`` float32 degrees (NaN unknown).
    """

    lat: np.ndarray
    lon: np.ndarray
    east: np.ndarray
    north: np.ndarray
    zone: np.ndarray
    south: np.ndarray
    heading: np.ndarray


def parse_text_columns(
    n: int, *, where: Where, east: list[str] | None = None, north: list[str] | None = None,
    zone: list[str] | None = None, band: list[str] | None = None, hemisphere: list[str] | None = None,
    lat: list[str] | None = None, lon: list[str] | None = None, heading: list[str] | None = None,
    utm_zone: UtmZone | None = None, exc: type[Exception] = DatasetError,
) -> dict[str, np.ndarray | None]:
    """Per-field parsing of ``[N]`` text columns (``''`` = absent; None = no such column), no
    cross-checks. Returns ``[N]`` arrays: east, north (float64, None without UTM columns), zone
    (int16), south (bool), lat, lon (float64, NaN where absent), heading (float64, NaN unknown).

    With ``east``/``north`` each row needs a zone number and a band letter or hemisphere,
    from its own fields or else from ``utm_zone``; a row with its own zone must agree with it.
    """
    head = (float_column(heading, field="heading", where=where, empty_ok=True, finite=False, exc=exc)
            if heading is not None else np.full(n, np.nan))
    cols: dict[str, np.ndarray | None] = {"heading": head}
    for key, text, name in (("lat", lat, "latitude"), ("lon", lon, "longitude")):
        cols[key] = (float_column(text, field=name, where=where, empty_ok=True, exc=exc) if text is not None
                     else np.full(n, np.nan))
    if east is None or north is None:
        cols.update(east=None, north=None, zone=None, south=None)
        return cols
    cols["east"] = float_column(east, field="UTM east", where=where, empty_ok=False, exc=exc)
    cols["north"] = float_column(north, field="UTM north", where=where, empty_ok=False, exc=exc)
    cols["zone"], cols["south"] = _zone_and_hemisphere(n, zone, band, hemisphere, utm_zone, where=where, exc=exc)
    return cols


def positions_from_text(n: int, *, where: Where, utm_zone: UtmZone | None = None, **text: list[str] | None) -> Positions:
    """``[N]`` text columns (see :func:`parse_text_columns`) -> validated :class:`Positions`.

    With UTM columns the UTM position is the label (given lat/lon must agree with it, see
    :func:`utm_positions`); without them lat/lon are the label and the zone is derived.
    """
    c = parse_text_columns(n, where=where, utm_zone=utm_zone, **text)
    if c["east"] is None:
        check_latlon_rows(c["lat"], c["lon"], where=where)
        return Positions(c["lat"], c["lon"], *latlon_to_utm(c["lat"], c["lon"]), c["heading"].astype(np.float32))
    lat, lon = utm_positions(c["east"], c["north"], c["zone"], c["south"], c["lat"], c["lon"], where=where)
    if utm_zone is not None:
        check_band(lat, utm_zone, where=where)
    return Positions(lat, lon, c["east"], c["north"], c["zone"], c["south"], c["heading"].astype(np.float32))


def _zone_and_hemisphere(n: int, zone: list[str] | None, band: list[str] | None, hemisphere: list[str] | None,
                         utm_zone: UtmZone | None, *, where: Where, exc) -> tuple[np.ndarray, np.ndarray]:
    """``[N]`` int16 zone and ``[N]`` bool south from the rows' own fields (a band letter wins over a
    hemisphere), else from ``utm_zone``."""
    zone_s, band_in_zone = split_zone_letter(zone if zone is not None else [""] * n)
    band_s = band_in_zone if band is None else [b.strip() or bz for b, bz in zip(band, band_in_zone)]
    if utm_zone is None:
        i = next((i for i, v in enumerate(zone_s) if not v), None)
        if i is not None:
            raise exc(f"{where(i)}: no UTM zone in the record; {UTM_ZONE_HELP}")
        z = zone_column(zone_s, where=where, exc=exc)
    else:
        z = zone_column([v or str(utm_zone.number) for v in zone_s], where=where, exc=exc)
        if (z != utm_zone.number).any():
            i = int(np.flatnonzero(z != utm_zone.number)[0])
            raise exc(f"{where(i)}: UTM zone {z[i]} differs from utm_zone {utm_zone}; "
                      "give the zone of the data or leave utm_zone unset")
    default = "" if utm_zone is None else "S" if utm_zone.south else "N"
    hemi_s = [h.strip() or default for h in hemisphere] if hemisphere is not None else [default] * n
    blank = "hemisphere" if hemisphere is not None and band is None else "band"  # names the missing field
    keys = [("band", b) if b else ("hemisphere", h) if h else (blank, "") for b, h in zip(band_s, hemi_s)]
    table = {k: (_band_south(k[1]) if k[0] == "band" else _hemisphere_south(k[1])) for k in set(keys)}
    i = next((i for i, k in enumerate(keys) if table[k] is None), None)
    if i is not None:
        kind, text = keys[i]
        hint = f"; or {UTM_ZONE_HELP}" if not text else ""
        raise exc(f"{where(i)}: " + (_BAND_MSG if kind == "band" else _HEMI_MSG).format(repr(text)) + hint)
    return z, np.fromiter(map(table.__getitem__, keys), dtype=bool, count=n)
