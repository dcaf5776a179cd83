"""VPR file names: the label is the name (SF-XL, Pitts30k, Tokyo 24/7, the gmberton downloaders)::

    @UTM_east@UTM_north@UTM_zone_number@UTM_zone_letter@lat@lon@pano_id@tile_num@heading@pitch@roll@height@timestamp@note@.jpg

Only east and north are required (all that VPR-methods-evaluation reads). The zone number
and zone letter (an MGRS latitude band: C..M south, N..X north) come from the name, or, for
names that carry none (``@east@north@.jpg``), from ``utm_zone`` (``--utm-zone 10S``). lat/lon
may be empty (they are then derived from UTM); when given they must agree with the UTM
position (see :data:`geoloc.data.fields.LATLON_UTM_TOLERANCE_M`), which catches a wrong zone
or hemisphere. heading is optional.
"""

from __future__ import annotations

from geoloc.data.fields import Positions, UtmZone, Where, parse_text_columns, parse_utm_zone, positions_from_text
from geoloc.errors import DatasetError

VPR_FORMAT = "'@east@north@zone_number@zone_letter@lat@lon@...@.jpg'"


def is_vpr_name(name: str) -> bool:
    """A file name (no folder) in the VPR convention starts with ``@``."""
    return name.startswith("@")


def parse_vpr_name(name: str, *, utm_zone: str | UtmZone | None = None) -> dict:
    """Parse one VPR file name (no folder). Returns east, north (float), zone (int), south (bool),
    lat, lon, heading (float, NaN when empty). Raises ValueError saying what is wrong."""
    zone = parse_utm_zone(utm_zone) if utm_zone is not None else None
    cols = parse_text_columns(1, **vpr_text_columns([name], where=lambda i: name, exc=ValueError), utm_zone=zone)
    return {k: float(v[0]) if v.dtype.kind == "f" else v[0].item() for k, v in cols.items()}


def vpr_positions(names: list[str], *, where: Where, has_ext: bool = False, utm_zone: UtmZone | None = None) -> Positions:
    """Vectorised parse of ``[N]`` VPR names into validated :class:`Positions` (``[N]`` columns).

    ``has_ext``: every name ends in a file extension (as listed from a folder).
    """
    return positions_from_text(len(names), **vpr_text_columns(names, where=where, has_ext=has_ext), utm_zone=utm_zone)


def vpr_text_columns(names: list[str], *, where: Where, exc: type[Exception] = DatasetError,
                     has_ext: bool = False) -> dict:
    """``[N]`` names -> keyword arguments of :func:`~geoloc.data.fields.parse_text_columns` (text
    columns, ``where``, ``exc``). The per-name Python work is one slice and one ``str.split``."""
    if has_ext:
        parts = [name[: name.rfind(".")].split("@", 10) for name in names]
    else:
        parts = [(name[: name.rfind(".")] if name.rfind(".") > name.rfind("@") else name).split("@", 10)
                 for name in names]
    bad = next((i for i, p in enumerate(parts) if p[0] or len(p) < 3), None)
    if bad is not None:
        raise exc(f"{where(bad)}: not a VPR name; expected {VPR_FORMAT} with at least east and north")

    def field(k: int) -> list[str]:
        return [p[k] if len(p) > k else "" for p in parts]

    return {"east": field(1), "north": field(2), "zone": field(3), "band": field(4), "lat": field(5),
            "lon": field(6), "heading": field(9), "where": where, "exc": exc}
