"""Synthetic city: geotagged street-level and aerial images of a procedural city (numpy + Pillow only).

The embedded default dataset for demos and benchmarks, since no street-image dataset can be
downloaded here. Same seed and :data:`SYNTH_VERSION` -> same bytes on any machine.

    >>> from geoloc.synth import generate_city
    >>> info = generate_city(out=Path("city"), seed=0, extent_m=400, n_queries=200)
    >>> val = generate_queries(city_dir=Path("city"), out=Path("val"), seed=1, n_queries=200)  # --val-queries val
"""

from geoloc.synth.aerial import render_aerial_tile
from geoloc.synth.city import SYNTH_VERSION, City, build_city, street_walk
from geoloc.synth.render import TIMES, Look, render_view
from geoloc.synth.writer import (
    SHIFTS, CityInfo, QueriesInfo, contact_sheet, generate_city, generate_queries, load_city, place_city, query_look,
)

__all__ = [
    "SHIFTS", "SYNTH_VERSION", "TIMES", "City", "CityInfo", "Look", "QueriesInfo", "build_city", "contact_sheet",
    "generate_city", "generate_queries", "load_city", "place_city", "query_look", "render_aerial_tile", "render_view", "street_walk",
]
