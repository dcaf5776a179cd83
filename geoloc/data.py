"""The data layer: read a geotagged image dataset into columnar :class:`~geoloc.records.Records`.

Three kinds of source, one entry point, :func:`load_records`:

1. **A folder of VPR-named images** (SF-XL, Pitts30k, Tokyo 24/7, the gmberton downloaders)::

       @UTM_east@UTM_north@UTM_zone_number@UTM_zone_letter@lat@lon@pano_id@tile_num@heading@pitch@roll@height@timestamp@note@.jpg

   Only east, north, zone number and zone letter are required; lat/lon may be empty (they
   are then derived from UTM), heading is optional. The zone letter is an MGRS latitude band
   (C..M south, N..X north). When lat/lon are given they must agree with the UTM position
   within :data:`LATLON_UTM_TOLERANCE_M`, which catches a wrong zone or hemisphere. The UTM
   position is the one kept (it is the finer of the two); lat/lon are recomputed from it.
2. **A CSV file** with a path column and lat/lon or UTM columns (see :data:`CSV_COLUMNS`).
3. **A folder of photos labelled by EXIF GPS** only (WGS84 degrees/minutes/seconds).

A folder may mix 1 and 3: a name in the VPR convention (it starts with ``@``) is the label,
and must parse; any other image file must carry EXIF GPS. A file with neither is an error,
or with ``on_missing_label="skip"`` is left out and reported as one logged warning.

Every problem raises :class:`~geoloc.errors.DatasetError` with one line naming the file (and
the CSV line) and what was expected. Paths are stored relative to ``Records.root``.
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from geoloc.errors import DatasetError
from geoloc.geo import UTM_LAT_MAX, UTM_LAT_MIN, geodesic_m, latlon_to_utm, utm_to_latlon
from geoloc.records import Records

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp"})
"""File suffixes (case-insensitive) listed as images in a folder; other files are ignored."""

SPLITS = ("database", "queries")

LATLON_UTM_TOLERANCE_M = 50.0
"""Largest accepted distance between a record's lat/lon and its UTM position when both are given."""

CSV_COLUMNS = {
    "path": ("path", "image", "image_path", "img_path", "img", "filename", "file_name", "file", "name"),
    "lat": ("lat", "latitude"),
    "lon": ("lon", "lng", "long", "longitude"),
    "east": ("east", "utm_east", "easting", "utm_easting"),
    "north": ("north", "utm_north", "northing", "utm_northing"),
    "zone": ("zone", "utm_zone", "zone_number", "utm_zone_number"),
    "zone_letter": ("zone_letter", "utm_zone_letter", "band", "latitude_band"),
    "hemisphere": ("hemisphere", "hemi"),
    "heading": ("heading", "yaw", "bearing"),
    "split": ("split",),
}
"""Accepted CSV header names per field (case-insensitive, surrounding spaces ignored)."""

_BAND_LETTERS = "CDEFGHJKLMNPQRSTUVWX"
_GPS_IFD = 0x8825
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON, _GPS_DIR = 1, 2, 3, 4, 17


# -- EXIF GPS ------------------------------------------------------------------------------------


def _dms_to_deg(value: object, ref: object, *, axis: str, path: object) -> float:
    refs = ("N", "S") if axis == "latitude" else ("E", "W")
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "replace")
    ref = str(ref).strip("\x00 ").upper() if ref is not None else ""
    if ref not in refs:
        raise DatasetError(f"{path}: EXIF GPS {axis} reference is {ref!r}, expected {refs[0]!r} or {refs[1]!r}")
    try:
        parts = [float(v) for v in (value if isinstance(value, (tuple, list)) else (value,))]
    except (TypeError, ValueError, ZeroDivisionError):
        raise DatasetError(f"{path}: EXIF GPS {axis} {value!r} is not degrees/minutes/seconds numbers") from None
    if not 1 <= len(parts) <= 3 or not all(np.isfinite(parts)) or any(p < 0 for p in parts):
        raise DatasetError(f"{path}: EXIF GPS {axis} {value!r} is not valid degrees/minutes/seconds")
    deg = sum(p / 60.0**k for k, p in enumerate(parts))
    return -deg if ref in ("S", "W") else deg


def read_exif_gps(path: str | Path) -> tuple[float, float] | None:
    """WGS84 ``(lat, lon)`` degrees from a photo's EXIF GPS tags, or None when it has none.

    Only the file header is read (no pixel decoding).

    Raises:
        DatasetError: the file is not a readable image, or its GPS tags are malformed or out of range.
    """
    return _read_exif(path)[0]


def _read_exif(path: str | Path) -> tuple[tuple[float, float] | None, float]:
    """``((lat, lon) or None, heading degrees or NaN)`` from EXIF GPS."""
    try:
        with Image.open(path) as im:
            gps = dict(im.getexif().get_ifd(_GPS_IFD))
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        msg = " ".join(str(err).split())
        raise DatasetError(f"{path}: cannot read the image header to get its EXIF GPS ({msg})") from None
    except Exception as err:  # noqa: BLE001 - a broken EXIF block in any form
        raise DatasetError(f"{path}: unreadable EXIF data ({type(err).__name__})") from None
    if _GPS_LAT not in gps and _GPS_LON not in gps:
        return None, float("nan")
    if _GPS_LAT not in gps or _GPS_LON not in gps:
        raise DatasetError(f"{path}: EXIF GPS has only one of latitude/longitude")
    lat = _dms_to_deg(gps[_GPS_LAT], gps.get(_GPS_LAT_REF), axis="latitude", path=path)
    lon = _dms_to_deg(gps[_GPS_LON], gps.get(_GPS_LON_REF), axis="longitude", path=path)
    if not (UTM_LAT_MIN <= lat <= UTM_LAT_MAX and -180 <= lon <= 180):
        raise DatasetError(f"{path}: EXIF GPS position ({lat:.6f}, {lon:.6f}) is outside the UTM range "
                           f"(latitude {UTM_LAT_MIN}..{UTM_LAT_MAX}, longitude -180..180)")
    heading = float("nan")
    if _GPS_DIR in gps:
        try:
            h = float(gps[_GPS_DIR])
            heading = h % 360.0 if np.isfinite(h) else float("nan")
        except (TypeError, ValueError, ZeroDivisionError):
            pass  # an unreadable direction is just an unknown heading
    return (lat, lon), heading


# -- VPR names -----------------------------------------------------------------------------------


def parse_vpr_name(name: str) -> dict:
    """Parse one VPR file name (no folder). Returns east, north (float), zone (int), letter (str),
    lat, lon, heading (float, NaN when empty). Raises ValueError saying what is wrong."""
    cols = _parse_vpr_names([name], where=lambda i: name, exc=ValueError)
    return {k: (v[0].item() if hasattr(v[0], "item") else v[0]) for k, v in cols.items()}


def _float_column(values: list[str], *, field: str, where, exc, empty_ok: bool, finite: bool = True) -> np.ndarray:
    """Strings -> float64 array naming the first bad entry. ``''`` -> NaN (absent) when ``empty_ok``;
    with ``finite``, a written ``nan``/``inf`` is an error (only an empty field means absent)."""
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
        if bad.any():
            written = np.fromiter((bool(v) for v in values), dtype=bool, count=len(values)) if empty_ok else bad
            bad &= written
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise exc(f"{where(i)}: {field} {values[i]!r} is not a valid position "
                          "(a finite number is expected; leave the field empty when unknown)")
    return arr


def _parse_vpr_names(names: list[str], *, where, exc=DatasetError, has_ext: bool = False) -> dict[str, np.ndarray]:
    """Vectorised parse of VPR names: the per-name Python work is one slice and one ``str.split``.
    ``has_ext``: every name ends in a file extension (as listed by :func:`list_images`)."""
    n = len(names)
    if has_ext:
        parts = [name[: name.rfind(".")].split("@", 10) for name in names]
    else:
        parts = [(name[: name.rfind(".")] if name.rfind(".") > name.rfind("@") else name).split("@", 10)
                 for name in names]
    bad = [i for i, p in enumerate(parts) if p[0] or len(p) < 5]
    if bad:
        raise exc(f"{where(bad[0])}: not a VPR name; expected '@east@north@zone_number@zone_letter@lat@lon@...@.jpg' "
                  f"with at least east, north, zone number and zone letter")
    east_s = [p[1] for p in parts]
    north_s = [p[2] for p in parts]
    zone_s = [p[3] for p in parts]
    letter_s = [p[4] for p in parts]
    lat_s = [p[5] if len(p) > 5 else "" for p in parts]
    lon_s = [p[6] if len(p) > 6 else "" for p in parts]
    head_s = [p[9] if len(p) > 9 else "" for p in parts]
    del parts
    east = _float_column(east_s, field="UTM east", where=where, exc=exc, empty_ok=False)
    north = _float_column(north_s, field="UTM north", where=where, exc=exc, empty_ok=False)
    lat = _float_column(lat_s, field="latitude", where=where, exc=exc, empty_ok=True)
    lon = _float_column(lon_s, field="longitude", where=where, exc=exc, empty_ok=True)
    heading = _float_column(head_s, field="heading", where=where, exc=exc, empty_ok=True, finite=False)
    zone_of: dict[str, int] = {}
    for z in set(zone_s):
        try:
            zone_of[z] = int(z) if 1 <= int(z) <= 60 else -1
        except ValueError:
            zone_of[z] = -1
    zone = np.fromiter(map(zone_of.__getitem__, zone_s), dtype=np.int16, count=n)
    if (zone < 0).any():
        i = int(np.flatnonzero(zone < 0)[0])
        raise exc(f"{where(i)}: UTM zone number {zone_s[i]!r} is not an integer in 1..60")
    south_of = {c: (c.upper() < "N" if len(c) == 1 and c.upper() in _BAND_LETTERS else None) for c in set(letter_s)}
    bad = [i for i, c in enumerate(letter_s) if south_of[c] is None][:1]
    if bad:
        raise exc(f"{where(bad[0])}: UTM zone letter {letter_s[bad[0]]!r} is not a latitude band letter C..X "
                  f"(C..M south, N..X north)")
    south = np.fromiter(map(south_of.__getitem__, letter_s), dtype=bool, count=n)
    return {"east": east, "north": north, "zone": zone, "south": south, "lat": lat, "lon": lon, "heading": heading}


def _utm_positions(
    east: np.ndarray, north: np.ndarray, zone: np.ndarray, south: np.ndarray,
    lat_given: np.ndarray, lon_given: np.ndarray, *, where,
) -> tuple[np.ndarray, np.ndarray]:
    """Validate UTM positions (and given lat/lon, NaN = absent); return lat/lon derived from UTM."""
    bad = ~(np.isfinite(east) & np.isfinite(north)) | (east <= 0) | (east >= 1_000_000) | (north < 0) | (north > 10_000_000)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DatasetError(f"{where(i)}: UTM position ({east[i]}, {north[i]}) is out of range "
                           "(expected 0 < east < 1,000,000 m and 0 <= north <= 10,000,000 m)")
    lat, lon = utm_to_latlon(east, north, zone, south)
    bad = ~(np.isfinite(lat) & np.isfinite(lon)) | (lat < UTM_LAT_MIN) | (lat > UTM_LAT_MAX)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DatasetError(f"{where(i)}: UTM position falls at latitude {lat[i]:.4f}, outside the UTM range "
                           f"{UTM_LAT_MIN}..{UTM_LAT_MAX}")
    has = ~(np.isnan(lat_given) & np.isnan(lon_given))
    if has.any():
        part = has & (np.isnan(lat_given) | np.isnan(lon_given))
        if part.any():
            i = int(np.flatnonzero(part)[0])
            raise DatasetError(f"{where(i)}: only one of latitude/longitude is given; give both or neither")
        _check_latlon_rows(lat_given, lon_given, has, where=where)
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


def _check_latlon_rows(lat: np.ndarray, lon: np.ndarray, rows: np.ndarray | None = None, *, where) -> None:
    bad = ~(np.isfinite(lat) & np.isfinite(lon)) | (lat < UTM_LAT_MIN) | (lat > UTM_LAT_MAX) | (lon < -180) | (lon > 180)
    if rows is not None:
        bad &= rows
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DatasetError(f"{where(i)}: latitude/longitude ({lat[i]}, {lon[i]}) is not a valid position "
                           f"(latitude {UTM_LAT_MIN}..{UTM_LAT_MAX}, longitude -180..180, no NaN)")


# -- folders -------------------------------------------------------------------------------------


def list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursive, following links once), as sorted POSIX paths
    relative to it. Hidden files and folders (``.name``) are skipped."""
    out: list[str] = []
    seen: set[tuple[int, int]] = set()
    stack = [("", str(folder))]
    while stack:
        rel, d = stack.pop()
        try:
            st = os.stat(d)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            it = os.scandir(d)
        except OSError as err:
            raise DatasetError(f"{d}: cannot list folder ({err.strerror})") from None
        with it:
            for e in it:
                if e.name.startswith("."):
                    continue
                try:
                    is_dir = e.is_dir()
                except OSError:
                    continue
                name = e.name
                if name[name.rfind("."):].lower() in IMAGE_EXTENSIONS and "." in name:
                    if not is_dir:
                        out.append(rel + name)
                elif is_dir:
                    stack.append((rel + name + "/", e.path))
    out.sort()
    return out


def _folder_records(folder: Path, root: Path, prefix: str, *, on_missing_label: str, source: str) -> Records:
    names = list_images(folder)
    if not names:
        raise DatasetError(f"{folder}: no images found (looked recursively for "
                           f"{', '.join(sorted(IMAGE_EXTENSIONS))}); check the path")
    base = [n.rsplit("/", 1)[-1] for n in names]
    is_vpr = np.fromiter((b.startswith("@") for b in base), dtype=bool, count=len(base))
    n = len(names)
    lat = np.full(n, np.nan)
    lon = np.full(n, np.nan)
    heading = np.full(n, np.nan)
    east = np.zeros(n)
    north = np.zeros(n)
    zone = np.zeros(n, dtype=np.int16)
    south = np.zeros(n, dtype=bool)
    keep = np.ones(n, dtype=bool)

    vi = np.flatnonzero(is_vpr)
    if vi.size:
        where = lambda k: folder / names[vi[k]]  # noqa: E731
        cols = _parse_vpr_names([base[i] for i in vi], where=where, has_ext=True)
        la, lo = _utm_positions(cols["east"], cols["north"], cols["zone"], cols["south"], cols["lat"], cols["lon"],
                                where=where)
        east[vi], north[vi], zone[vi], south[vi] = cols["east"], cols["north"], cols["zone"], cols["south"]
        lat[vi], lon[vi], heading[vi] = la, lo, cols["heading"]

    ei = np.flatnonzero(~is_vpr)
    missing: list[str] = []
    exif_rows: list[int] = []
    for i in ei:
        pos, h = _read_exif(folder / names[i])
        if pos is None:
            if on_missing_label == "skip":
                keep[i] = False
                missing.append(names[i])
                continue
            raise DatasetError(f"{folder / names[i]}: no location label: the name is not in the VPR convention "
                               "('@east@north@zone@letter@...') and the file has no EXIF GPS; rename it, add GPS, "
                               "or pass on_missing_label='skip'")
        lat[i], lon[i] = pos
        heading[i] = h
        exif_rows.append(int(i))
    if exif_rows:
        rows = np.asarray(exif_rows)
        east[rows], north[rows], zone[rows], south[rows] = latlon_to_utm(lat[rows], lon[rows])
    if missing:
        log.warning("%s: skipped %d image(s) with no location label (neither a VPR name nor EXIF GPS), e.g. %s",
                    folder, len(missing), ", ".join(missing[:3]))
    if not keep.any():
        raise DatasetError(f"{folder}: none of the {n} images has a location label (VPR name or EXIF GPS)")
    idx = np.flatnonzero(keep)
    paths = [prefix + names[i] for i in idx]
    return Records(paths, lat[idx], lon[idx], east[idx], north[idx], zone[idx], south[idx],
                   heading[idx].astype(np.float32), root, source)


# -- CSV -----------------------------------------------------------------------------------------


def _find_columns(header: list[str], csv_path: Path) -> dict[str, int]:
    norm = [h.strip().lower().lstrip("\ufeff") for h in header]
    cols: dict[str, int] = {}
    for field, aliases in CSV_COLUMNS.items():
        hits = [j for j, h in enumerate(norm) if h in aliases]
        if len(hits) > 1:
            raise DatasetError(f"{csv_path}: line 1: several columns name the {field} "
                               f"({', '.join(header[j] for j in hits)}); keep one")
        if hits:
            cols[field] = hits[0]
    if "path" not in cols:
        raise DatasetError(f"{csv_path}: line 1: no image path column; expected one of "
                           f"{', '.join(CSV_COLUMNS['path'])} (header is {', '.join(header)})")
    has_ll = "lat" in cols and "lon" in cols
    has_utm = {"east", "north", "zone"} <= cols.keys() and ("zone_letter" in cols or "hemisphere" in cols)
    if not has_ll and not has_utm:
        raise DatasetError(f"{csv_path}: line 1: no position columns; expected lat,lon (or latitude,longitude) or "
                           f"east,north,zone with zone_letter or hemisphere (header is {', '.join(header)})")
    return cols


def _csv_records(csv_path: Path, *, split: str | None, check_files: bool, source: str) -> Records:
    root = csv_path.parent
    try:
        f = open(csv_path, newline="", encoding="utf-8-sig")
    except OSError as err:
        raise DatasetError(f"{csv_path}: cannot open ({err.strerror})") from None
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise DatasetError(f"{csv_path}: empty file; expected a header line and one row per image")
            cols = _find_columns(header, csv_path)
            need = max(cols.values()) + 1
            lines: list[int] = []
            rows: list[list[str]] = []
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) < need:
                    raise DatasetError(f"{csv_path}: line {reader.line_num}: {len(row)} fields, expected at least "
                                       f"{need} (header has {len(header)})")
                lines.append(reader.line_num)
                rows.append(row)
        except csv.Error as err:
            raise DatasetError(f"{csv_path}: line {reader.line_num}: malformed CSV ({err})") from None
        except UnicodeDecodeError:
            raise DatasetError(f"{csv_path}: not UTF-8 text; save the CSV as UTF-8") from None

    where = lambda i: f"{csv_path}: line {lines[i]}"  # noqa: E731
    if split is not None:
        if "split" not in cols:
            raise DatasetError(f"{csv_path}: split={split!r} was asked but the CSV has no 'split' column")
        j = cols["split"]
        sel = [k for k, r in enumerate(rows) if r[j].strip().lower() == split]
        rows, lines = [rows[k] for k in sel], [lines[k] for k in sel]
    if not rows:
        raise DatasetError(f"{csv_path}: no rows{f' with split {split!r}' if split else ''}; "
                           "expected one row per image after the header")

    col = lambda name: [r[cols[name]].strip() for r in rows]  # noqa: E731
    # paths: relative to the CSV's folder, must stay inside it
    root_abs = os.path.abspath(root)
    paths: list[str] = []
    first_line: dict[str, int] = {}
    for i, p in enumerate(col("path")):
        if not p:
            raise DatasetError(f"{where(i)}: empty image path")
        full = os.path.normpath(os.path.join(root_abs, p.replace("\\", "/") if os.sep == "/" else p))
        rel = os.path.relpath(full, root_abs)
        if rel == os.curdir or rel.startswith(os.pardir + os.sep) or rel == os.pardir or os.path.isabs(rel):
            raise DatasetError(f"{where(i)}: image path {p!r} is outside the dataset folder {root}; "
                               "paths must be relative to the CSV's folder and stay inside it")
        rel = rel.replace(os.sep, "/")
        if rel in first_line:
            raise DatasetError(f"{where(i)}: duplicate image path {p!r} (also on line {first_line[rel]})")
        first_line[rel] = lines[i]
        if check_files and not os.path.isfile(full):
            raise DatasetError(f"{where(i)}: image {p!r} not found under {root} "
                               "(or pass check_files=False to defer the check to loading)")
        paths.append(rel)

    n = len(rows)
    heading = (_float_column(col("heading"), field="heading", where=where, exc=DatasetError, empty_ok=True,
                             finite=False)
               if "heading" in cols else np.full(n, np.nan))
    lat_g = lon_g = None
    if "lat" in cols and "lon" in cols:
        lat_g = _float_column(col("lat"), field="latitude", where=where, exc=DatasetError, empty_ok=True)
        lon_g = _float_column(col("lon"), field="longitude", where=where, exc=DatasetError, empty_ok=True)
    if {"east", "north", "zone"} <= cols.keys() and ("zone_letter" in cols or "hemisphere" in cols):
        east = _float_column(col("east"), field="UTM east", where=where, exc=DatasetError, empty_ok=False)
        north = _float_column(col("north"), field="UTM north", where=where, exc=DatasetError, empty_ok=False)
        zone = np.zeros(n, dtype=np.int16)
        south = np.zeros(n, dtype=bool)
        for i, z in enumerate(col("zone")):
            z2, letter_in_zone = z, ""
            if z and z[-1].isalpha():  # "33U" in the zone column
                z2, letter_in_zone = z[:-1], z[-1]
            try:
                zone[i] = v = int(z2)
            except ValueError:
                v = -1
            if not 1 <= v <= 60:
                raise DatasetError(f"{where(i)}: UTM zone {z!r} is not an integer in 1..60")
            if "zone_letter" in cols:
                letter = rows[i][cols["zone_letter"]].strip().upper() or letter_in_zone.upper()
                if len(letter) != 1 or letter not in _BAND_LETTERS:
                    raise DatasetError(f"{where(i)}: UTM zone letter {letter!r} is not a latitude band letter C..X")
                south[i] = letter < "N"
            else:
                h = rows[i][cols["hemisphere"]].strip().upper()
                if h not in ("N", "S", "NORTH", "SOUTH"):
                    raise DatasetError(f"{where(i)}: hemisphere {h!r} must be N, S, north or south")
                south[i] = h.startswith("S")
        nan = np.full(n, np.nan)
        lat, lon = _utm_positions(east, north, zone, south, nan if lat_g is None else lat_g,
                                  nan if lon_g is None else lon_g, where=where)
        return Records(paths, lat, lon, east, north, zone, south, heading.astype(np.float32), root, source)
    _check_latlon_rows(lat_g, lon_g, where=where)
    east, north, zone, south = latlon_to_utm(lat_g, lon_g)
    return Records(paths, lat_g, lon_g, east, north, zone, south, heading.astype(np.float32), root, source)


# -- entry point ---------------------------------------------------------------------------------


def load_records(
    source: str | Path,
    *,
    split: str | None = None,
    on_missing_label: Literal["error", "skip"] = "error",
    check_files: bool = True,
) -> Records:
    """Read a dataset into :class:`Records` (paths relative to ``Records.root``).

    Args:
        source: a folder of images (VPR-named and/or EXIF-GPS photos, searched recursively,
            sorted by relative path), or a ``.csv`` file (paths relative to its folder).
        split: ``"database"`` or ``"queries"``. For a folder, reads ``source/<split>/``
            (``Records.root`` stays ``source``; paths start with ``<split>/``); if ``source``
            itself is named ``<split>`` it is read whole. For a CSV, keeps the rows whose
            ``split`` column equals it. None reads everything, except a folder holding both
            ``database/`` and ``queries/``, which is refused (mixing them is never intended).
        on_missing_label: ``"error"`` (default): an image with neither a VPR name nor EXIF GPS
            raises; ``"skip"``: it is left out and one warning is logged (``geoloc.data``).
        check_files: CSV only: check every listed image exists (one ``stat`` each).
    Returns:
        Records with ``[N]`` columns, each record in its own UTM zone and hemisphere.
    Raises:
        DatasetError: one line naming the file (and CSV line) and the problem.
    """
    if split is not None and split not in SPLITS:
        raise DatasetError(f"split must be one of {', '.join(SPLITS)} or None, got {split!r}")
    if on_missing_label not in ("error", "skip"):
        raise DatasetError(f"on_missing_label must be 'error' or 'skip', got {on_missing_label!r}")
    src = Path(source)
    if not src.exists():
        raise DatasetError(f"{src}: dataset not found; give a folder of images or a CSV file")
    if src.is_file():
        if src.suffix.lower() not in (".csv", ".txt", ".tsv") and src.suffix.lower() in IMAGE_EXTENSIONS:
            raise DatasetError(f"{src}: is an image, not a dataset; give its folder or a CSV file")
        return _csv_records(src, split=split, check_files=check_files, source=str(src))
    if not src.is_dir():
        raise DatasetError(f"{src}: neither a folder nor a CSV file")
    has = {s: (src / s).is_dir() for s in SPLITS}
    if split is None:
        if all(has.values()):
            raise DatasetError(f"{src}: holds both database/ and queries/; pass split='database' or split='queries' "
                               "(or point at one of those folders)")
        return _folder_records(src, src, "", on_missing_label=on_missing_label, source=str(src))
    if has[split]:
        return _folder_records(src / split, src, split + "/", on_missing_label=on_missing_label,
                               source=str(src / split))
    if src.name == split:
        return _folder_records(src, src, "", on_missing_label=on_missing_label, source=str(src))
    raise DatasetError(f"{src}: no {split}/ subfolder; point at the dataset folder that holds {split}/ "
                       "or pass split=None to read the folder as it is")
