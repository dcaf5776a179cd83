"""Square UTM cells and their N x N groups (Divide&Classify).

A cell is ``(zone, hemisphere, p, q)`` with ``p = floor(east / M)``, ``q = floor(north / M)``;
its group is ``(p mod N, q mod N)`` so that neighbouring cells always fall in different
groups. Cells with fewer than ``min_images`` training images are dropped from the classifier;
their images are filed in the nearest kept cell of the same zone, so the retrieval index
still holds every database image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geoloc.errors import DatasetError
from geoloc.geo import cell_key, cell_pq, geodesic_m, split_cell_key, utm_to_latlon
from geoloc.records import Records

_NEIGHBOUR_OFFSETS = [(dp, dq) for dp in (-1, 0, 1) for dq in (-1, 0, 1) if (dp, dq) != (0, 0)]


@dataclass
class CellTable:
    """C kept cells; row ``c`` is cell id ``c`` (the FAISS inverted-list number).

    Attributes:
        key: ``[C]`` int64 packed cell keys (:func:`geoloc.geo.cell_key`), sorted.
        zone: ``[C]`` int16; south: ``[C]`` bool; p, q: ``[C]`` int64.
        east, north: ``[C]`` float64 UTM centre; lat, lon: ``[C]`` float64 centre degrees.
        group: ``[C]`` int64 group id ``(p mod N) * N + (q mod N)``.
        column: ``[C]`` int64 position of the cell among its group's classes.
        n_images: ``[C]`` int64 database images filed in the cell.
        size_m, groups, min_images: the scheme (M, N, minimum images per cell).
    """

    key: np.ndarray
    zone: np.ndarray
    south: np.ndarray
    p: np.ndarray
    q: np.ndarray
    east: np.ndarray
    north: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    group: np.ndarray
    column: np.ndarray
    n_images: np.ndarray
    size_m: float
    groups: int
    min_images: int

    def __len__(self) -> int:
        return len(self.key)

    @property
    def n_groups(self) -> int:
        return self.groups * self.groups

    def group_cells(self, g: int) -> np.ndarray:
        """Cell ids of group ``g`` ordered by column; ``[C_g]`` int64."""
        ids = np.flatnonzero(self.group == g)
        return ids[np.argsort(self.column[ids])]

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Cell ids for packed keys ``[K]``; -1 where the cell is not in the table."""
        keys = np.asarray(keys, dtype=np.int64)
        pos = np.searchsorted(self.key, keys)
        pos_c = np.minimum(pos, len(self.key) - 1)
        return np.where((len(self.key) > 0) & (self.key[pos_c] == keys), pos_c, -1)

    def neighbours(self) -> np.ndarray:
        """``[C, 8]`` int64 ids of the 8 surrounding cells (same zone), -1 where not kept."""
        return neighbour_table(self.zone, self.south, self.p, self.q)

    def to_arrays(self) -> dict[str, np.ndarray]:
        names = ("key", "zone", "south", "p", "q", "east", "north", "lat", "lon", "group", "column", "n_images")
        return {n: getattr(self, n) for n in names}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], *, size_m: float, groups: int, min_images: int) -> "CellTable":
        return cls(**{k: np.asarray(v) for k, v in arrays.items()}, size_m=size_m, groups=groups, min_images=min_images)


def neighbour_table(zone: np.ndarray, south: np.ndarray, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Ids of the 8 cells around each of C cells; ``[C, 8]`` int64, -1 where a neighbour is absent.

    The cells (``[C]`` arrays) must be in ascending :func:`geoloc.geo.cell_key` order, as in a
    :class:`CellTable`; cell ``c``'s id is its row. Neighbours stay in the same zone.
    """
    key = cell_key(zone, south, p, q)
    if np.any(np.diff(key) <= 0):
        raise ValueError("cells must be unique and sorted by cell key")
    out = np.empty((len(key), 8), dtype=np.int64)
    for j, (dp, dq) in enumerate(_NEIGHBOUR_OFFSETS):
        pp, qq = np.asarray(p) + dp, np.asarray(q) + dq
        ok = (pp >= 0) & (qq >= 0)
        want = cell_key(zone, south, np.maximum(pp, 0), np.maximum(qq, 0))
        pos = np.minimum(np.searchsorted(key, want), max(len(key) - 1, 0))
        out[:, j] = np.where(ok & (len(key) > 0) & (key[pos] == want), pos, -1)
    return out


def record_cell_keys(records: Records, size_m: float) -> np.ndarray:
    """Packed cell key of every record; ``[N]`` int64."""
    p, q = cell_pq(records.east, records.north, size_m)
    return cell_key(records.zone, records.south, p, q)


def build_cells(records: Records, *, size_m: float, groups: int, min_images: int) -> tuple[CellTable, np.ndarray, np.ndarray]:
    """Cut the map into cells and file every record.

    Returns:
        table: the kept cells.
        label: ``[N]`` int64 cell id of each record's own cell, -1 when that cell was dropped
            (such records are not used to train the classifier).
        filed: ``[N]`` int64 cell id each record is filed under in the index: its own cell,
            or the nearest kept cell in the same zone when its own was dropped.
    """
    if size_m < 1:
        raise DatasetError(f"cell size {size_m} m is too small; use at least 1 m (cells.size_m)")
    if groups < 1 or min_images < 1:
        raise DatasetError("cells.groups and cells.min_images_per_cell must be at least 1")
    keys = record_cell_keys(records, size_m)
    uniq, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    kept = counts >= min_images
    if not kept.any():
        raise DatasetError(
            f"{records.source or 'database'}: no cell of {size_m:g} m holds {min_images} images "
            f"(largest holds {counts.max() if counts.size else 0}); lower --min-images-per-cell or raise --cell-size"
        )
    key = uniq[kept]
    zone, south, p, q = split_cell_key(key)
    east, north = (p + 0.5) * size_m, (q + 0.5) * size_m
    lat, lon = utm_to_latlon(east, north, zone, south)
    group = (p % groups) * groups + (q % groups)
    column = np.zeros(len(key), dtype=np.int64)
    for g in np.unique(group):
        ids = np.flatnonzero(group == g)
        column[ids] = np.arange(len(ids))
    new_id = np.cumsum(kept) - 1
    label = np.where(kept[inverse], new_id[inverse], -1).astype(np.int64)

    filed = label.copy()
    orphans = np.flatnonzero(label < 0)
    # nearest kept cell centre (geodesic), per zone and hemisphere, a chunk of orphans at a time
    for z, s in {(int(a), bool(b)) for a, b in zip(records.zone[orphans], records.south[orphans])}:
        here = orphans[(records.zone[orphans] == z) & (records.south[orphans] == s)]
        pool = np.flatnonzero((zone == z) & (south == s))
        pool = pool if pool.size else np.arange(len(key))
        for start in range(0, len(here), 1024):
            rows = here[start : start + 1024]
            d = geodesic_m(records.lat[rows, None], records.lon[rows, None], lat[None, pool], lon[None, pool])
            filed[rows] = pool[np.argmin(d, axis=1)]
    n_images = np.bincount(filed, minlength=len(key)).astype(np.int64)
    table = CellTable(key, zone, south, p, q, east, north, lat, lon, group.astype(np.int64), column, n_images,
                      float(size_m), int(groups), int(min_images))
    return table, label, filed
