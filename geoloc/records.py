"""Columnar geotagged-image records: the data layer's output, every later stage's input.

Columnar (numpy arrays, one list of paths) rather than one object per image, so a
10^7-image database costs hundreds of megabytes, not gigabytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geoloc.geo import check_latlon, latlon_to_utm


@dataclass
class Records:
    """N geotagged images.

    Attributes:
        paths: ``[N]`` image paths, relative to ``root`` (or absolute when ``root`` is None).
        lat, lon: ``[N]`` float64 WGS84 degrees.
        east, north: ``[N]`` float64 UTM metres in the image's own zone.
        zone: ``[N]`` int16 UTM zone number 1..60.
        south: ``[N]`` bool, southern hemisphere.
        heading: ``[N]`` float32 degrees, NaN where unknown.
        root: folder the relative paths resolve against.
    """

    paths: list[str]
    lat: np.ndarray
    lon: np.ndarray
    east: np.ndarray
    north: np.ndarray
    zone: np.ndarray
    south: np.ndarray
    heading: np.ndarray
    root: Path | None = None
    source: str = field(default="", compare=False)
    """Where the records came from (a folder or CSV), for error messages."""

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def from_latlon(
        cls,
        paths: list[str],
        lat: np.ndarray,
        lon: np.ndarray,
        *,
        heading: np.ndarray | None = None,
        root: Path | None = None,
        source: str = "",
    ) -> "Records":
        """Build records from WGS84 positions; UTM zone and hemisphere are derived per point."""
        lat = np.asarray(lat, dtype=np.float64)
        lon = np.asarray(lon, dtype=np.float64)
        check_latlon(lat, lon, where=source or "records")
        east, north, zone, south = latlon_to_utm(lat, lon)
        if heading is None:
            heading = np.full(len(paths), np.nan, dtype=np.float32)
        return cls(list(paths), lat, lon, east, north, zone, south, np.asarray(heading, np.float32), root, source)

    def subset(self, index: np.ndarray | slice | list[int]) -> "Records":
        """Records at ``index`` (int array, bool mask or slice), same root."""
        idx = np.arange(len(self))[index]
        return Records(
            [self.paths[i] for i in idx],
            self.lat[idx], self.lon[idx], self.east[idx], self.north[idx],
            self.zone[idx], self.south[idx], self.heading[idx], self.root, self.source,
        )

    def abspath(self, i: int) -> Path:
        p = Path(self.paths[i])
        return p if self.root is None or p.is_absolute() else self.root / p

    def abspaths(self) -> list[Path]:
        return [self.abspath(i) for i in range(len(self))]
