"""EXIF GPS: WGS84 degrees/minutes/seconds from a photo's header, without decoding pixels.

Only regular files are opened (:func:`geoloc.data.files.open_regular`), and only the header
is parsed, so a read is bounded by the file and never blocks.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from geoloc.data.fields import check_latlon_rows
from geoloc.data.files import one_line, one_line_errors, open_regular
from geoloc.errors import DatasetError

_GPS_IFD = 0x8825
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON, _GPS_DIR = 1, 2, 3, 4, 17


def dms_to_deg(value: object, ref: object, *, axis: str, path: object) -> float:
    """EXIF ``(degrees, minutes, seconds)`` and its N/S or E/W reference -> signed degrees.

    Minutes and seconds must lie in ``[0, 60)``; every part finite and non-negative.

    Raises:
        DatasetError: one line naming ``path``.
    """
    refs = ("N", "S") if axis == "latitude" else ("E", "W")
    if isinstance(ref, bytes):
        ref = ref.decode("ascii", "replace")
    ref = str(ref).strip("\x00 ").upper() if ref is not None else ""
    if ref not in refs:
        raise DatasetError(f"{path}: EXIF GPS {axis} reference is {ref!r}, expected {refs[0]!r} or {refs[1]!r}")
    try:
        parts = [float(v) for v in (value if isinstance(value, (tuple, list)) else (value,))]
    except (TypeError, ValueError, ZeroDivisionError, OverflowError):
        raise DatasetError(f"{path}: EXIF GPS {axis} {value!r} is not degrees/minutes/seconds numbers") from None
    if not 1 <= len(parts) <= 3 or not all(math.isfinite(p) and p >= 0 for p in parts):
        raise DatasetError(f"{path}: EXIF GPS {axis} {value!r} is not valid degrees/minutes/seconds "
                           "(finite, non-negative numbers expected)")
    if any(p >= 60 for p in parts[1:]):
        raise DatasetError(f"{path}: EXIF GPS {axis} {value!r} has minutes or seconds >= 60; "
                           "the tag is corrupt (fix or remove the photo's GPS data)")
    deg = sum(p / 60.0**k for k, p in enumerate(parts))
    return -deg if ref in ("S", "W") else deg


@one_line_errors
def read_exif_gps(path: str | Path) -> tuple[float, float] | None:
    """WGS84 ``(lat, lon)`` degrees from a photo's EXIF GPS tags, or None when it has none.

    Only the file header is read (no pixel decoding); only a regular file is opened.

    Raises:
        DatasetError: the file is not a readable image, or its GPS tags are malformed or out of range.
    """
    return read_exif(path)[0]


def read_exif(path: str | Path) -> tuple[tuple[float, float] | None, float]:
    """``((lat, lon) or None, heading degrees or NaN)`` from EXIF GPS."""
    with open_regular(path, what="image") as f:
        gps = _gps_ifd(f, path)
    if _GPS_LAT not in gps and _GPS_LON not in gps:
        return None, float("nan")
    if _GPS_LAT not in gps or _GPS_LON not in gps:
        raise DatasetError(f"{path}: EXIF GPS has only one of latitude/longitude")
    lat = dms_to_deg(gps[_GPS_LAT], gps.get(_GPS_LAT_REF), axis="latitude", path=path)
    lon = dms_to_deg(gps[_GPS_LON], gps.get(_GPS_LON_REF), axis="longitude", path=path)
    check_latlon_rows(np.array([lat]), np.array([lon]), where=lambda i: f"{path}: EXIF GPS")
    heading = float("nan")
    if _GPS_DIR in gps:
        try:
            h = float(gps[_GPS_DIR])
            heading = h % 360.0 if math.isfinite(h) else float("nan")
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            pass  # an unreadable direction is just an unknown heading
    return (lat, lon), heading


def _gps_ifd(f, path: str | Path) -> dict:
    try:
        with Image.open(f) as im:
            return dict(im.getexif().get_ifd(_GPS_IFD))
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: not a recognised image format, so no EXIF GPS can be read") from None
    except (OSError, SyntaxError, ValueError) as err:
        msg = one_line(" ".join(str(err).split()))
        raise DatasetError(f"{path}: cannot read the image header to get its EXIF GPS ({msg})") from None
    except Exception as err:  # noqa: BLE001 - a broken EXIF block in any form
        raise DatasetError(f"{path}: unreadable EXIF data ({type(err).__name__})") from None
