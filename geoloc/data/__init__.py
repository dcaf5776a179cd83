"""The data layer: read a geotagged image dataset into columnar :class:`~geoloc.records.Records`.

One entry point, :func:`load_records`, over three kinds of source, one module each:

- :mod:`~geoloc.data.vpr`: images named in the VPR convention (``@east@north@zone@letter@...``);
- :mod:`~geoloc.data.exif`: photos labelled by EXIF GPS only;
- :mod:`~geoloc.data.csv`: a CSV file with a path column and lat/lon or UTM columns.

:mod:`~geoloc.data.folders` decides which folder a source and split name (the layouts) and
which images it holds; :mod:`~geoloc.data.fields` is the one place where fields are parsed and
checked (zone, band letter, hemisphere, lat/lon and UTM ranges); :mod:`~geoloc.data.files`
opens only regular files and keeps messages on one line. See ``docs/architecture.md``.

Every problem raises :class:`~geoloc.errors.DatasetError` with one line naming the file (and
the CSV line) and what was expected. Paths are stored relative to ``Records.root``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from geoloc.data.csv import CSV_COLUMNS, csv_records
from geoloc.data.exif import read_exif_gps
from geoloc.data.fields import LATLON_UTM_TOLERANCE_M, UtmZone, parse_utm_zone
from geoloc.data.files import IMAGE_EXTENSIONS, one_line_errors
from geoloc.data.folders import ACCEPTED_LAYOUTS, SPLITS, folder_records, list_images, resolve_layout
from geoloc.data.vpr import parse_vpr_name
from geoloc.errors import DatasetError
from geoloc.records import Records

__all__ = [
    "ACCEPTED_LAYOUTS", "CSV_COLUMNS", "IMAGE_EXTENSIONS", "LATLON_UTM_TOLERANCE_M", "SPLITS", "UtmZone",
    "list_images", "load_records", "parse_utm_zone", "parse_vpr_name", "read_exif_gps",
]


@one_line_errors
def load_records(
    source: str | Path,
    *,
    split: str | None = None,
    utm_zone: str | UtmZone | None = None,
    on_missing_label: Literal["error", "skip"] = "error",
    check_files: bool = True,
) -> Records:
    """Read a dataset into :class:`Records` (paths relative to ``Records.root``).

    Args:
        source: a folder (a dataset root holding ``database/`` and ``queries/``, or any folder
            of VPR-named and/or EXIF-GPS images, searched recursively, sorted by relative path;
            ``<folder>_images_paths.txt`` next to it replaces the walk), or a CSV file (paths
            relative to its folder).
        split: ``"database"`` or ``"queries"``. A folder holding ``<split>/`` reads that
            subfolder (``Records.root`` stays ``source``; paths start with ``<split>/``); a
            folder holding only the other split's subfolder is refused; any other folder is
            read whole. A CSV with a ``split`` column keeps the rows of that split; one without
            is read whole. None reads everything, except a folder holding both subfolders.
        utm_zone: the zone of UTM positions that carry none (VPR names ``@east@north@.jpg``, a
            CSV with east/north only), e.g. ``"10S"`` (zone number + latitude band letter) or
            ``"32N"``/``"56south"`` (+ hemisphere). Positions that carry a zone must match it.
        on_missing_label: ``"error"`` (default): an image with neither a VPR name nor EXIF GPS
            raises; ``"skip"``: it is left out and one warning is logged (``geoloc.data``).
        check_files: CSV only: check every listed image is a regular file (one ``stat`` each).
    Returns:
        Records with ``[N]`` columns, each record in its own UTM zone and hemisphere.
    Raises:
        DatasetError: one line naming the file (and CSV line) and the problem.
    """
    if split is not None and split not in SPLITS:
        raise DatasetError(f"split must be one of {', '.join(SPLITS)} or None, got {split!r}")
    if on_missing_label not in ("error", "skip"):
        raise DatasetError(f"on_missing_label must be 'error' or 'skip', got {on_missing_label!r}")
    zone = parse_utm_zone(utm_zone) if utm_zone is not None else None
    src = Path(source)
    if src.is_dir():
        folder, prefix = resolve_layout(src, split)
        return folder_records(folder, src, prefix, on_missing_label=on_missing_label, utm_zone=zone,
                              source=str(folder))
    if not src.exists():
        raise DatasetError(f"{src}: dataset not found; {ACCEPTED_LAYOUTS}")
    if src.suffix.lower() in IMAGE_EXTENSIONS:
        raise DatasetError(f"{src}: is an image, not a dataset; give its folder or a CSV file")
    return csv_records(src, split=split, check_files=check_files, utm_zone=zone, source=str(src))
