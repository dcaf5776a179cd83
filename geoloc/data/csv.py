"""CSV datasets: one row per image, a path column and lat/lon or UTM columns.

The README's own format is ``path,lat,lon``. Accepted header names per field are in
:data:`CSV_COLUMNS` (case-insensitive, surrounding spaces ignored). Paths are relative to the
CSV's folder and must stay inside it. An optional ``split`` column (``database``/``queries``)
lets one CSV hold both sets; a CSV without one is a single set, used whole whatever the split.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from geoloc.data.fields import UTM_ZONE_HELP, UtmZone, positions_from_text
from geoloc.data.files import is_regular, read_text_lines
from geoloc.errors import DatasetError
from geoloc.records import Records

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

_TEXT_FIELDS = {"east": "east", "north": "north", "zone": "zone", "zone_letter": "band", "hemisphere": "hemisphere",
                "lat": "lat", "lon": "lon", "heading": "heading"}
"""CSV field -> keyword of :func:`~geoloc.data.fields.parse_text_columns`."""


def find_columns(header: list[str], csv_path: Path, *, utm_zone: UtmZone | None = None) -> dict[str, int]:
    """Header -> column index per field of :data:`CSV_COLUMNS`; UTM fields are dropped when the
    CSV cannot give a zone (no zone column, no ``utm_zone``) but has lat/lon."""
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
    has_utm = {"east", "north"} <= cols.keys() and ("zone" in cols or utm_zone is not None)
    if not has_utm:
        for k in ("east", "north", "zone", "zone_letter", "hemisphere"):
            cols.pop(k, None)
    if not has_ll and not has_utm:
        raise DatasetError(f"{csv_path}: line 1: no position columns; expected lat,lon (or latitude,longitude) or "
                           f"east,north with zone and zone_letter or hemisphere, or east,north and {UTM_ZONE_HELP} "
                           f"(header is {', '.join(header)})")
    return cols


def _read_rows(csv_path: Path) -> tuple[list[str], list[int], list[list[str]]]:
    """Header, line numbers and non-blank rows of a regular UTF-8 CSV file."""
    with read_text_lines(csv_path, what="CSV file") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise DatasetError(f"{csv_path}: empty file; expected a header line and one row per image")
            lines: list[int] = []
            rows: list[list[str]] = []
            for row in reader:
                if row and any(c.strip() for c in row):
                    lines.append(reader.line_num)
                    rows.append(row)
        except csv.Error as err:
            raise DatasetError(f"{csv_path}: line {reader.line_num}: malformed CSV ({err})") from None
        except UnicodeDecodeError:
            raise DatasetError(f"{csv_path}: not UTF-8 text; save the CSV as UTF-8") from None
    return header, lines, rows


def _select_split(rows: list[list[str]], lines: list[int], cols: dict[str, int], split: str | None,
                  csv_path: Path) -> tuple[list[list[str]], list[int]]:
    """The rows of ``split`` when the CSV has a split column; all rows otherwise."""
    if split is not None and "split" in cols:
        j = cols["split"]
        sel = [k for k, r in enumerate(rows) if r[j].strip().lower() == split]
        if not sel and rows:
            seen = sorted({r[j].strip() for r in rows})
            raise DatasetError(f"{csv_path}: no rows with split {split!r} (the split column holds "
                               f"{', '.join(map(repr, seen[:5]))}); use database or queries")
        rows, lines = [rows[k] for k in sel], [lines[k] for k in sel]
    if not rows:
        raise DatasetError(f"{csv_path}: no rows; expected one row per image after the header")
    return rows, lines


def _relative_paths(values: list[str], root: Path, *, where, check_files: bool) -> list[str]:
    """``[N]`` path cells -> POSIX paths relative to ``root``, inside it, each once."""
    root_abs = os.path.abspath(root)
    paths: list[str] = []
    first: dict[str, int] = {}
    for i, p in enumerate(values):
        if not p:
            raise DatasetError(f"{where(i)}: empty image path")
        full = os.path.normpath(os.path.join(root_abs, p.replace("\\", "/") if os.sep == "/" else p))
        rel = os.path.relpath(full, root_abs)
        if rel in (os.curdir, os.pardir) or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
            raise DatasetError(f"{where(i)}: image path {p!r} is outside the dataset folder {root}; "
                               "paths must be relative to the CSV's folder and stay inside it")
        rel = rel.replace(os.sep, "/")
        if rel in first:
            raise DatasetError(f"{where(i)}: duplicate image path {p!r} (also on {where(first[rel])})")
        first[rel] = i
        if check_files and not is_regular(full):
            raise DatasetError(f"{where(i)}: image {p!r} not found under {root} or not a regular file "
                               "(or pass check_files=False to defer the check to loading)")
        paths.append(rel)
    return paths


def csv_records(csv_path: Path, *, split: str | None, check_files: bool = True, utm_zone: UtmZone | None = None,
                source: str = "") -> Records:
    """Read a CSV dataset (see the module docstring) into :class:`Records` rooted at its folder.

    Raises:
        DatasetError: one line naming the CSV file and line.
    """
    header, lines, rows = _read_rows(csv_path)
    cols = find_columns(header, csv_path, utm_zone=utm_zone)
    need = max(cols.values()) + 1
    short = next((k for k, r in enumerate(rows) if len(r) < need), None)
    if short is not None:
        raise DatasetError(f"{csv_path}: line {lines[short]}: {len(rows[short])} fields, expected at least "
                           f"{need} (header has {len(header)})")
    rows, lines = _select_split(rows, lines, cols, split, csv_path)

    def where(i: int) -> str:
        return f"{csv_path}: line {lines[i]}"

    def col(name: str) -> list[str]:
        return [r[cols[name]].strip() for r in rows]

    paths = _relative_paths(col("path"), csv_path.parent, where=where, check_files=check_files)
    text = {kw: col(field) for field, kw in _TEXT_FIELDS.items() if field in cols}
    pos = positions_from_text(len(rows), where=where, utm_zone=utm_zone, **text)
    return Records(paths, pos.lat, pos.lon, pos.east, pos.north, pos.zone, pos.south, pos.heading, csv_path.parent,
                   source or str(csv_path))
