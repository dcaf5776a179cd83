"""The realistic generator checked against a real bundle: real queries, their statistics, the twin.

:func:`bundle_queries` gives a bundle's real query descriptors and the cell each was really taken
in: the photos of ``queries.csv`` beside the bundle's database folder, encoded once with the
bundle's own backbone and projection (cached to an ``.npz``), or, where the bundle has no query
photos, a held-out tenth of the database (removed from the database side). :func:`query_stats`
measures what decides hybrid's recall against exact search: where each query's exact nearest
database row lies (same cell, ring of neighbours, top-k scored cells), and how alike database rows
of different cells are. :func:`bundle_twin_data` calibrates :mod:`geoloc.bench.realistic` on the
bundle (heading quadrants, adjacency of cell centres, look-alike scenes from the database's
nearest-neighbour statistics; query noise, own-cell-first rate and nearest-row cosine of the real
queries; hybrid's recall is never a fit target), gives the twin as many
k-means sub-centres per cell as the bundle's heads have, and returns
both sets as :class:`geoloc.bench.synthetic.CellData` of the same size, for the same benchmark rows.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from geoloc.bench.realistic import (
    calibrate,
    fit_query_centre_fidelity,
    fit_query_noise,
    fit_query_view_fidelity,
    fit_views,
    make_realistic_data,
)
from geoloc.bench.synthetic import CellData

if TYPE_CHECKING:
    from geoloc.index import CellIndex

__all__ = ["bundle_queries", "bundle_twin_data", "query_stats"]


def _true_cells(east: np.ndarray, north: np.ndarray, rec_east: np.ndarray, rec_north: np.ndarray,
                cells: np.ndarray) -> np.ndarray:
    """``[Q]`` cell of the geographically nearest database photo of each query position ``[Q]``."""
    out = np.empty(len(east), np.int64)
    for i in range(0, len(east), 256):
        d = (east[i:i + 256, None] - rec_east[None]) ** 2 + (north[i:i + 256, None] - rec_north[None]) ** 2
        out[i:i + 256] = cells[d.argmin(1)]
    return out


def bundle_queries(folder: Path, *, cache: Path | None = None, limit: int = 1000) -> dict:
    """Real query descriptors of a bundle, with the cells they were taken in.

    Returns ``{"xq": [Q, D] float32, "query_cells": [Q] int64, "source": str, "holdout": [H] int64,
    "east": [Q], "north": [Q]}`` (metres, the queries' true positions);
    ``holdout`` are database rows used as queries (empty when query photos exist): drop them from
    the database before searching. ``cache`` keeps the encoded query photos with the bundle's
    manifest checksum; a cache written for another bundle (a rebuilt demo) is encoded anew.
    """
    from geoloc.bundle import read_bundle

    b = read_bundle(Path(folder))
    xb, cells = b.index.vectors()
    rec = b.records
    qcsv = Path(rec.root) / "queries.csv"
    key = str(b.manifest.get("manifest_sha256", ""))
    z = np.load(cache) if cache is not None and Path(cache).is_file() else None
    if z is not None and "bundle" in z and str(z["bundle"]) == key:
        qc = _true_cells(z["east"], z["north"], np.asarray(rec.east), np.asarray(rec.north), cells)
        return {"xq": z["desc"].astype(np.float32), "query_cells": qc, "source": f"{qcsv} (cached in {cache})",
                "holdout": np.empty(0, np.int64), "east": z["east"], "north": z["north"]}
    if qcsv.is_file():
        from geoloc.engine import Localizer

        with qcsv.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))[:limit]
        loc = Localizer.load(folder)
        paths = [Path(rec.root) / r["path"] for r in rows]
        feats = []
        for i in range(0, len(paths), 32):
            enc = loc.encoder.encode_files(paths[i:i + 32])
            feats.append(enc.features[[j for j, e in enumerate(enc.errors) if e is None]])
            rows_ok = [r for r, e in zip(rows[i:i + 32], enc.errors, strict=True) if e is None]
            rows[i:i + 32] = rows_ok + [None] * (len(rows[i:i + 32]) - len(rows_ok))
        rows = [r for r in rows if r is not None]
        desc = loc.encoder.descriptors(np.concatenate(feats))
        east = np.array([float(r["east"]) for r in rows])
        north = np.array([float(r["north"]) for r in rows])
        if cache is not None:
            Path(cache).parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, desc=desc, east=east, north=north, bundle=np.array(key))
        qc = _true_cells(east, north, np.asarray(rec.east), np.asarray(rec.north), cells)
        return {"xq": desc.astype(np.float32), "query_cells": qc, "source": str(qcsv), "holdout": np.empty(0, np.int64),
                "east": east, "north": north}
    rng = np.random.default_rng(0)
    hold = np.sort(rng.choice(len(xb), size=min(limit, max(1, len(xb) // 10)), replace=False))
    return {"xq": xb[hold], "query_cells": cells[hold], "source": f"held-out tenth of {folder}'s database",
            "holdout": hold, "east": np.asarray(rec.east)[hold], "north": np.asarray(rec.north)[hold]}


def query_stats(data: CellData, query_cells: np.ndarray | None = None, *, ks: tuple[int, ...] = (1, 5, 20, 50),
                db_rows: int = 2000) -> dict:
    """What decides hybrid's recall against exact search, on one database and its queries.

    Args:
        data: database ``xb [N, D]``, ``cells [N]``, ``prototypes [C, D]``, ``neighbours [C, 8]``, ``xq [Q, D]``.
        query_cells: ``[Q]`` the cells the queries were really taken in (None: not known).
    Returns:
        ``nn_cell_in_top_k`` (exact top-1's cell among the k best cells by exact prototype score,
        i.e. hybrid k's recall against exact search with a flat scorer), ``nn_cell_in_top_k_ring``
        (the same with the neighbour rings), ``query_nn_cos`` (mean cosine of a query to its exact
        nearest row), ``db_nn_cos`` / ``db_nn_same_cell`` / ``db_nn_in_ring`` (a database row's nearest
        other row), and with ``query_cells``: ``nn_in_true_cell``, ``true_cell_in_top_k``.
    """
    xb, cells, xq, nb = data.xb, data.cells, data.xq, data.neighbours
    nn = np.empty(len(xq), np.int64)
    qnn = np.empty(len(xq), np.float32)
    for i in range(0, len(xq), 256):
        s = xq[i:i + 256] @ xb.T
        nn[i:i + 256] = s.argmax(1)
        qnn[i:i + 256] = s.max(1)
    order = np.argsort(-data.cell_scores(xq), axis=1)[:, :max(ks)]
    nn_cell = cells[nn]
    ringed = np.concatenate([np.arange(len(nb))[:, None], nb], axis=1)  # [C, 9]
    out = {"queries": len(xq), "db_size": len(xb), "n_cells": data.n_cells, "query_nn_cos": float(qnn.mean())}
    for k in ks:
        top = order[:, :k]
        out[f"nn_cell_in_top_{k}"] = float((top == nn_cell[:, None]).any(1).mean())
        ring = ringed[top].reshape(len(xq), -1)
        out[f"nn_cell_in_top_{k}_ring"] = float((ring == nn_cell[:, None]).any(1).mean())
    m = min(db_rows, len(xb))
    pick = np.random.default_rng(0).choice(len(xb), size=m, replace=False)
    s = xb[pick] @ xb.T
    s[np.arange(m), pick] = -np.inf
    dn = s.argmax(1)
    out |= {"db_nn_cos": float(s.max(1).mean()), "db_nn_same_cell": float((cells[dn] == cells[pick]).mean()),
            "db_nn_in_ring": float((ringed[cells[pick]] == cells[dn][:, None]).any(1).mean())}
    if query_cells is not None:
        out["nn_in_true_cell"] = float((nn_cell == query_cells).mean())
        for k in ks:
            out[f"true_cell_in_top_{k}"] = float((order[:, :k] == query_cells[:, None]).any(1).mean())
    return out


def bundle_prototype_cells(idx: CellIndex) -> np.ndarray | None:
    """A bundle index's prototype -> cell table for :class:`CellData` (None with one prototype per cell)."""
    pc = idx.prototype_cells
    return None if len(pc) == idx.nlist else pc


def bundle_twin_data(folder: Path, *, cache: Path | None = None, seed: int = 7) -> tuple[CellData, CellData, dict, dict]:
    """A real bundle with its real queries, and its realistic synthetic twin of the same size.

    Returns:
        real (:class:`CellData`, rows sorted by cell, prototypes = the index's), twin (drawn by
        :func:`make_realistic_data` with the calibration and fitted query noise, as many queries),
        calib (:func:`geoloc.bench.realistic.calibrate` with headings and neighbours, plus
        ``query_noise``), info (query source, ``real_query_cells`` ``[Q]``, ``db_positions`` ``[N, 2]``
        and ``query_positions`` ``[Q, 2]`` east/north metres of the real rows and queries).
    """
    from geoloc.bundle import read_bundle

    b = read_bundle(Path(folder))
    idx = b.index
    q = bundle_queries(folder, cache=cache)
    xb, cells = idx.vectors()
    heads = np.asarray(b.records.heading, np.float64)
    pos = np.stack([np.asarray(b.records.east, np.float64), np.asarray(b.records.north, np.float64)], 1)
    keep = np.ones(len(xb), bool)
    keep[q["holdout"]] = False
    xb, cells, heads, pos = xb[keep], cells[keep], heads[keep], pos[keep]
    order = np.argsort(cells, kind="stable")
    xb, cells, heads, pos = xb[order], cells[order], heads[order], pos[order]
    nb = idx.neighbours if idx.neighbours is not None else np.full((idx.nlist, 8), -1, np.int64)
    calib = calibrate(xb, cells, headings=None if np.isnan(heads).all() else heads, neighbours=nb)
    # look-alike scenes from the database's own nearest-neighbour statistics, then the query model:
    # its noise (variance), how well it shows its cell (own-cell-first rate by cell means), how close
    # it comes to a database photo (mean top-1 cosine); hybrid's recall is never a fit target
    calib["view_share"], calib["view_group"], calib["view_fit"] = fit_views(calib, xb, cells)
    calib["query_noise"] = fit_query_noise(calib, xb, cells, q["xq"], q["query_cells"])
    means = np.zeros((int(cells.max()) + 1, xb.shape[1]), np.float32)
    np.add.at(means, cells, xb)
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    top1 = float((np.argmax(q["xq"] @ means.T, axis=1) == q["query_cells"]).mean())
    calib["query_centre_fidelity"] = fit_query_centre_fidelity(calib, len(xb), top1)
    qnn = sum(float(np.max(q["xq"][i:i + 256] @ xb.T, axis=1).sum()) for i in range(0, len(q["xq"]), 256)) / len(q["xq"])
    calib["query_view_fidelity"] = fit_query_view_fidelity(calib, len(xb), qnn)
    calib["fit_targets"] = {"real_true_cell_top1_by_means": top1, "real_query_nn_cos": qnn}
    # the twin's prototypes: as many sub-centres per cell as the bundle's heads have (k-means stand-ins)
    calib["prototypes_per_cell"] = max(1, round(len(idx.prototype_cells) / idx.nlist))
    real = CellData(xb, cells, idx.prototypes(), nb, q["xq"], {"bundle": str(folder), "queries": q["source"]},
                    bundle_prototype_cells(idx))
    twin = make_realistic_data(len(xb), calib, nq=len(q["xq"]), query_noise=calib["query_noise"], seed=seed)
    return real, twin, calib, {"query_source": q["source"], "real_query_cells": q["query_cells"], "db_positions": pos,
                               "query_positions": np.stack([q["east"], q["north"]], 1)}
