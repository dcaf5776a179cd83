"""Realistic synthetic descriptors: a generator calibrated on a real set's second-order structure.

:func:`calibrate` measures, on descriptors ``[N, D]`` filed in cells ``[N]`` (e.g. a bundle's
index): the global mean (mean cosine of unrelated images), the eigen-spectrum of the cell centres
around it and its eigenvectors, the eigen-spectrum of the within-cell offsets and its
eigenvectors, the share of within-cell variance explained by heading clusters (k-means with
``HEADINGS`` clusters inside each cell), and the cell-size distribution (log-normal fit and range).

:func:`make_realistic_data` draws a database with those statistics (a :class:`CellData`, like
:func:`geoloc.bench.synthetic.make_cell_data`, the ``hard`` generator): centre = global mean +
Gaussian with the centre spectrum; each cell has ``HEADINGS`` heading offsets and every member
adds a residual offset, both Gaussian with the offset spectrum split by the heading share;
rows are L2-normalised. Cell centres of grid neighbours are correlated (``centre_adjacent_cos``,
the mean cosine of adjacent real cells' centred centres: a street looks alike over a few cells).
Optionally (``view_share`` > 0) part of every offset is a look-alike *scene* shared with about
``view_group - 1`` rows of random other cells (perceptual aliasing: real descriptors have
near-duplicates far apart; :func:`fit_views` fits both on a real set's nearest-neighbour statistics).
Queries are new members of random cells/headings (and their source row's scene) with ``query_noise``
times the residual variance; :func:`fit_query_noise` measures it on real queries whose true cells are known (the
demo bundle's 500 query photos give 1.33; ``benchmarks/calibration.py``). Without a real set, :data:`DEFAULT_CALIBRATION`-style power-law spectra
("far fewer effective dimensions" than isotropic noise) are used.

Prototypes: with ``prototypes_per_cell`` K > 1 (a bundle's sub-centres per cell; 1 without) each
cell gets K sub-centres by spherical k-means over its own rows (:func:`subcentre_prototypes`), the
stand-in for a trained K-sub-centre head: on the demo bundle's real database they keep the exact
nearest row's cell among the top 1 / 5 / 20 about as often as the trained prototypes do
(``benchmarks/calibration.py``, ``real_kmeans_prototypes``). With K = 1 a prototype is the
normalised cell mean.
"""

from __future__ import annotations

import numpy as np

from geoloc.bench.synthetic import (
    DEFAULT_MEAN_CELL_SIZE,
    HEADINGS,
    CellData,
    cells_of_sizes,
    normalise,
)
from geoloc.cells import neighbour_table

__all__ = ["calibrate", "default_calibration", "effective_dims", "fit_query_centre_fidelity", "fit_query_noise",
           "fit_query_view_fidelity", "fit_views", "make_realistic_data", "nn_stats", "subcentre_prototypes", "summary"]


def effective_dims(spectrum: np.ndarray) -> float:
    """Participation ratio ``(sum l)^2 / sum l^2`` of an eigen-spectrum ``[D]``."""
    s = np.asarray(spectrum, dtype=np.float64)
    return float(s.sum() ** 2 / max(1e-30, (s ** 2).sum()))


def default_calibration(dim: int, *, seed: int = 0) -> dict:
    """Power-law spectra (centres ~ i^-1.2, offsets ~ i^-0.9) with real-looking totals, random bases."""
    rng = np.random.default_rng(seed)
    i = np.arange(1, dim + 1, dtype=np.float64)

    def basis() -> np.ndarray:
        q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        return q.astype(np.float32)

    mean_dir = normalise(rng.standard_normal((1, dim)))[0]
    return {
        "dim": dim, "mean": (np.sqrt(0.15) * mean_dir).astype(np.float32),
        "centre_spectrum": (0.30 * i ** -1.2 / (i ** -1.2).sum()).astype(np.float32), "centre_basis": basis(),
        "offset_spectrum": (0.55 * i ** -0.9 / (i ** -0.9).sum()).astype(np.float32), "offset_basis": basis(),
        "heading_share": 0.35, "size_log_mu": float(np.log(DEFAULT_MEAN_CELL_SIZE) - 0.9 ** 2 / 2), "size_log_sigma": 0.9,
        "size_min": 10, "size_max": 400, "source": "defaults (power-law spectra)",
    }


def _eig(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) ``[D]`` and eigenvectors ``[D, D]`` (columns) of ``x^T x / n``."""
    cov = (x.T.astype(np.float64) @ x.astype(np.float64)) / max(1, len(x))
    w, v = np.linalg.eigh(cov)
    order = np.argsort(-w)
    return np.maximum(w[order], 0).astype(np.float32), v[:, order].astype(np.float32)


def calibrate(xb: np.ndarray, cells: np.ndarray, *, headings: np.ndarray | None = None,
              neighbours: np.ndarray | None = None, seed: int = 0, max_rows: int = 200_000) -> dict:
    """Second-order statistics of descriptors ``xb`` ``[N, D]`` (L2-normalised) filed in ``cells`` ``[N]``.

    ``headings`` ``[N]`` (degrees; None: unknown): the heading share is then measured on the
    4 heading quadrants themselves instead of by k-means. ``neighbours`` ``[C, 8]`` (cell ids,
    -1 = none): the mean cosine of adjacent cells' centred centres is measured
    (``centre_adjacent_cos``; 0 without).

    Returns the dict :func:`make_realistic_data` takes (arrays: ``mean`` ``[D]``, spectra ``[D]``,
    bases ``[D, D]``), plus ``effective_dims_centres`` / ``effective_dims_offsets``.
    """
    rng = np.random.default_rng(seed)
    xb = np.asarray(xb, dtype=np.float32)
    cells = np.asarray(cells, dtype=np.int64)
    if len(xb) > max_rows:
        keep = np.sort(rng.choice(len(xb), max_rows, replace=False))
        xb, cells = xb[keep], cells[keep]
        headings = None if headings is None else np.asarray(headings)[keep]
    d = xb.shape[1]
    uniq, inv, sizes = np.unique(cells, return_inverse=True, return_counts=True)
    sums = np.zeros((len(uniq), d), np.float64)
    np.add.at(sums, inv, xb)
    centres = (sums / sizes[:, None]).astype(np.float32)
    mean = centres.mean(0)
    c_spec, c_basis = _eig(centres - mean)
    offsets = xb - centres[inv]
    o_spec, o_basis = _eig(offsets)
    # heading clusters: 2..HEADINGS-means inside cells with enough members (few Lloyd steps, projected)
    big = np.flatnonzero(sizes >= 2 * HEADINGS)[:2000]
    between = total = 0.0
    for c in big:
        off = offsets[inv == c]
        cent = off[rng.choice(len(off), HEADINGS, replace=False)]
        for _ in range(8):
            lab = np.argmax(off @ cent.T - 0.5 * (cent ** 2).sum(1), axis=1)
            cent = np.stack([off[lab == h].mean(0) if (lab == h).any() else cent[h] for h in range(HEADINGS)])
        between += float(((cent[lab]) ** 2).sum())
        total += float((off ** 2).sum())
    share = between / total if total > 0 else 0.0
    # k-means on pure noise also "explains" some variance: that of HEADINGS random groups of n
    mean_n = float(sizes[big].mean()) if big.size else 1.0
    noise_share = min(0.9, HEADINGS / mean_n * 1.5)
    share = float(np.clip((share - noise_share) / max(1e-6, 1 - noise_share), 0.0, 0.9))
    if headings is not None:  # the quadrant each photo looks along: groups (cell, quadrant)
        quad = np.rint(np.asarray(headings, np.float64) / (360 / HEADINGS)).astype(np.int64) % HEADINGS
        g = inv * HEADINGS + quad
        gm = np.zeros((len(uniq) * HEADINGS, d), np.float64)
        np.add.at(gm, g, offsets)
        gc = np.bincount(g, minlength=len(gm))
        gm[gc > 0] /= gc[gc > 0, None]
        raw = float((gm[g] ** 2).sum() / max(1e-30, float((offsets.astype(np.float64) ** 2).sum())))
        n_g = float(gc[g].mean())  # a group mean of n noise rows keeps 1/n of their variance
        share = float(np.clip((raw - 1 / n_g) / max(1e-6, 1 - 1 / n_g), 0.0, 0.9))
    adj = 0.0
    if neighbours is not None:
        pos = np.full(int(max(cells.max(), np.max(neighbours))) + 1, -1, np.int64)
        pos[uniq] = np.arange(len(uniq))
        cc = centres - mean
        cc /= np.maximum(np.linalg.norm(cc, axis=1, keepdims=True), 1e-12)
        nb = np.asarray(neighbours)[uniq]
        a = np.repeat(np.arange(len(uniq)), nb.shape[1])
        b = np.where(nb.reshape(-1) >= 0, pos[np.maximum(nb.reshape(-1), 0)], -1)
        ok = b >= 0
        if ok.any():
            adj = float(np.clip(np.einsum("ij,ij->i", cc[a[ok]], cc[b[ok]]).mean(), 0.0, 0.37))
    ls = np.log(sizes.astype(np.float64))
    return {
        "dim": d, "mean": mean.astype(np.float32), "centre_spectrum": c_spec, "centre_basis": c_basis,
        "offset_spectrum": o_spec, "offset_basis": o_basis, "heading_share": share,
        "size_log_mu": float(ls.mean()), "size_log_sigma": float(ls.std()), "size_min": int(sizes.min()),
        "size_max": int(sizes.max()), "source": f"calibrated on {len(xb)} rows in {len(uniq)} cells",
        "centre_adjacent_cos": adj,
        "effective_dims_centres": effective_dims(c_spec), "effective_dims_offsets": effective_dims(o_spec),
    }


def summary(calib: dict) -> dict:
    """The scalars of a calibration (for logs and JSON): effective dims, variances, shares, sizes."""
    return {"source": calib["source"], "mean_norm2": float((calib["mean"] ** 2).sum()),
            "centre_variance": float(calib["centre_spectrum"].sum()), "offset_variance": float(calib["offset_spectrum"].sum()),
            "effective_dims_centres": effective_dims(calib["centre_spectrum"]),
            "effective_dims_offsets": effective_dims(calib["offset_spectrum"]), "heading_share": calib["heading_share"],
            "size_log_mu": calib["size_log_mu"], "size_log_sigma": calib["size_log_sigma"],
            "size_min": calib["size_min"], "size_max": calib["size_max"],
            "centre_adjacent_cos": float(calib.get("centre_adjacent_cos", 0.0)),
            "view_share": float(calib.get("view_share", 0.0)), "view_group": float(calib.get("view_group", 0.0)),
            "query_view_fidelity": float(calib.get("query_view_fidelity", 1.0)),
            "query_centre_fidelity": float(calib.get("query_centre_fidelity", 1.0)),
            "prototypes_per_cell": int(calib.get("prototypes_per_cell", 1))}


def fit_query_noise(calib: dict, xb: np.ndarray, cells: np.ndarray, xq: np.ndarray, query_cells: np.ndarray) -> float:
    """The ``query_noise`` of :func:`make_realistic_data` that real queries show.

    Args:
        calib: :func:`calibrate` of ``xb``/``cells`` (its heading share is used).
        xb: ``[N, D]`` float32 database rows; cells: ``[N]`` int64 their cells.
        xq: ``[Q, D]`` float32 real query descriptors; query_cells: ``[Q]`` int64 the cell each
            query was really taken in (e.g. that of its geographically nearest database photo).
    Returns:
        ``qn`` such that a query's offset from its cell's centre has ``h + qn (1 - h)`` times the
        variance of a database row's offset (``h``: heading share + view share): queries are new
        photos of a database place (and scene), with their own residual.
    """
    xb, xq = np.asarray(xb, np.float32), np.asarray(xq, np.float32)
    cells, query_cells = np.asarray(cells, np.int64), np.asarray(query_cells, np.int64)
    c = int(max(cells.max(), query_cells.max())) + 1
    sums = np.zeros((c, xb.shape[1]), np.float64)
    np.add.at(sums, cells, xb)
    cnt = np.bincount(cells, minlength=c)
    centres = sums / np.maximum(cnt, 1)[:, None]
    ratio = float(((xq - centres[query_cells]) ** 2).sum(1).mean() / max(1e-30, ((xb - centres[cells]) ** 2).sum(1).mean()))
    h = float(calib.get("heading_share", 0.0)) + float(calib.get("view_share", 0.0))
    return max(0.0, (ratio - h) / max(1e-6, 1 - h))


def nn_stats(xb: np.ndarray, cells: np.ndarray, *, rows: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Nearest other row of ``rows`` random rows of ``xb`` ``[N, D]`` (cells ``[N]``): mean cosine,
    and share in the same cell."""
    m = min(rows, len(xb))
    pick = np.random.default_rng(seed).choice(len(xb), size=m, replace=False)
    s = xb[pick] @ xb.T
    s[np.arange(m), pick] = -np.inf
    return float(s.max(1).mean()), float((cells[s.argmax(1)] == cells[pick]).mean())


def fit_views(calib: dict, xb: np.ndarray, cells: np.ndarray, *, seed: int = 0) -> tuple[float, float, dict]:
    """``view_share`` and ``view_group`` whose generated set of ``len(xb)`` rows has the nearest-
    neighbour statistics (:func:`nn_stats`) of the real rows ``xb`` ``[N, D]`` / ``cells`` ``[N]``
    (a grid search; database rows only, no query enters the fit).

    Returns ``(view_share, view_group, {"real": (cos, same_cell), "fit": (cos, same_cell)})``.
    """
    real = nn_stats(xb, cells, seed=seed)
    best = (float("inf"), 0.0, 2.0, real)
    room = max(0.0, 0.9 - float(calib.get("heading_share", 0.0)))
    for a in [x for x in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7) if x <= room]:
        for g in ((2.0,) if a == 0 else (2.0, 3.0, 5.0, 8.0)):
            tw = make_realistic_data(len(xb), dict(calib, view_share=a, view_group=g), nq=1, seed=seed + 1)
            got = nn_stats(tw.xb, tw.cells, seed=seed)
            err = (got[0] - real[0]) ** 2 + (got[1] - real[1]) ** 2
            if err < best[0]:
                best = (err, a, g, got)
    return best[1], best[2], {"real": real, "fit": best[3]}


def fit_query_centre_fidelity(calib: dict, n: int, true_cell_top1: float, *, nq: int = 500, seed: int = 0) -> float:
    """The share ``psi`` of a query's cell-centre component that is the database's centre of its
    cell (the rest a fresh draw of the centre spectrum: the place as another season or light shows
    it) whose generated queries find their own cell first (by the normalised cell means) as often as
    real queries do, ``true_cell_top1`` (grid search over a set of ``n`` rows; needs
    ``calib["query_noise"]``)."""
    best = (float("inf"), 1.0)
    for psi in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        tw = make_realistic_data(n, dict(calib, query_centre_fidelity=psi, prototypes_per_cell=1), nq=nq,
                                 query_noise=float(calib.get("query_noise", 1.5)), seed=seed + 1)
        got = float((np.argmax(tw.xq @ tw.prototypes.T, axis=1) == tw.params["query_cells"]).mean())
        if abs(got - true_cell_top1) < best[0]:
            best = (abs(got - true_cell_top1), psi)
    return best[1]


def fit_query_view_fidelity(calib: dict, n: int, query_nn_cos: float, *, nq: int = 500, seed: int = 0) -> float:
    """The share ``phi`` of a query's scene component that is its source row's scene (the rest a
    fresh one of the same variance) whose generated queries have the real queries' mean cosine to
    their nearest database row, ``query_nn_cos`` (grid search over a set of ``n`` rows; needs
    ``calib["query_noise"]``). 1.0 without look-alike scenes."""
    if float(calib.get("view_share", 0.0)) <= 0:
        return 1.0
    best = (float("inf"), 1.0)
    for phi in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0):
        tw = make_realistic_data(n, dict(calib, query_view_fidelity=phi), nq=nq,
                                 query_noise=float(calib.get("query_noise", 1.5)), seed=seed + 1)
        got = float(np.max(tw.xq @ tw.xb.T, axis=1).mean())
        if abs(got - query_nn_cos) < best[0]:
            best = (abs(got - query_nn_cos), phi)
    return best[1]


def subcentre_prototypes(xb: np.ndarray, cells: np.ndarray, k: int, *, niter: int = 10, seed: int = 0,
                         chunk: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """``k`` sub-centres per cell: spherical k-means (``niter`` Lloyd steps) over each cell's rows.

    Args:
        xb: ``[N, D]`` float32 L2-normalised rows; cells: ``[N]`` int64, sorted, every cell in
            ``0..C-1`` non-empty.
    Returns:
        prototypes ``[C * k, D]`` float32 (unit norm) and prototype_cells ``[C * k]`` int64
        (``c * k + j``: cell c's j-th sub-centre). Starts from k of the cell's rows, evenly
        spaced through the cell from a random offset; a cell with fewer than k rows repeats them;
        a sub-centre left without rows keeps its place. All cells are updated at once (chunks of
        ``chunk`` rows). ``k = 1``: one step, the normalised cell means.
    """
    rng = np.random.default_rng(seed)
    n, d = xb.shape
    starts = np.flatnonzero(np.r_[True, cells[1:] != cells[:-1]])
    sizes = np.diff(np.r_[starts, n])
    c = len(starts)
    pick = starts[:, None] + (np.floor((np.arange(k)[None] + rng.random((c, 1))) * sizes[:, None] / k).astype(np.int64) % sizes[:, None])
    cen = xb[pick].copy()  # [C, k, D]
    lab = np.zeros(n, np.int64)
    for _ in range(niter if k > 1 else 1):
        for i in range(0, n if k > 1 else 0, chunk):  # k = 1: every row's label is 0
            lab[i:i + chunk] = np.einsum("nd,nkd->nk", xb[i:i + chunk], cen[cells[i:i + chunk]]).argmax(1)
        g = cells * k + lab
        order = np.argsort(g, kind="stable")
        gs = g[order]
        first = np.flatnonzero(np.r_[True, gs[1:] != gs[:-1]])
        sums = np.add.reduceat(xb[order], first, axis=0)
        flat = cen.reshape(c * k, d)
        flat[gs[first]] = normalise(sums)
    return cen.reshape(c * k, d), np.repeat(np.arange(c, dtype=np.int64), k)


def _grid_smoothing(rho: float) -> float:
    """Weight ``b`` of the 8 grid neighbours' latents in ``z_c + b sum z_n`` (then rescaled) whose
    mean correlation between adjacent cells is ``rho``: ``(2b + 3b^2) / (1 + 8b^2) = rho`` (< 3/8)."""
    rho = float(np.clip(rho, 0.0, 0.37))
    if rho <= 0:
        return 0.0
    a, b_, c = 3 - 8 * rho, 2.0, -rho  # 2b + 3b^2 = rho + 8 rho b^2
    return float((-b_ + np.sqrt(b_ * b_ - 4 * a * c)) / (2 * a))


def make_realistic_data(n: int, calib: dict, *, nq: int, query_noise: float = 1.5, seed: int = 0) -> CellData:
    """``n`` descriptors with the statistics of ``calib`` (:func:`calibrate`), in cells on a square grid.

    Returns a :class:`CellData`: xb ``[N, D]``, cells ``[N]`` (sorted), prototypes ``[C, D]``
    (normalised cell means; ``calib["prototypes_per_cell"]`` K > 1: ``[C * K, D]`` sub-centres,
    :func:`subcentre_prototypes`, with their ``prototype_cells``), neighbours ``[C, 8]``, xq ``[nq, D]``.
    """
    rng = np.random.default_rng(seed)
    d = int(calib["dim"])
    cells = cells_of_sizes(lambda: np.clip(np.rint(rng.lognormal(calib["size_log_mu"], calib["size_log_sigma"], 4096)),
                                           max(1, calib["size_min"]), max(1, calib["size_max"])).astype(np.int64), n)
    c = int(cells[-1]) + 1 if n else 0
    c_map = (np.sqrt(calib["centre_spectrum"])[:, None] * calib["centre_basis"].T).astype(np.float32)  # [D, D]
    o_std = np.sqrt(calib["offset_spectrum"])[:, None] * calib["offset_basis"].T
    h = float(calib["heading_share"])
    a = float(calib.get("view_share", 0.0))
    h_map = (np.sqrt(h) * o_std).astype(np.float32)
    r_map = (np.sqrt(max(0.0, 1 - h - a)) * o_std).astype(np.float32)
    mean = calib["mean"].astype(np.float32)

    def gauss(k: int, m: np.ndarray) -> np.ndarray:
        return rng.standard_normal((k, d), dtype=np.float32) @ m

    side = int(np.ceil(np.sqrt(c)))
    p, q = np.arange(c) // side, np.arange(c) % side
    nb = neighbour_table(np.full(c, 33), np.zeros(c, bool), p, q)
    latent = gauss(c, c_map)  # [C, D]
    beta = _grid_smoothing(calib.get("centre_adjacent_cos", 0.0))
    if beta > 0:  # neighbours share latents: adjacent centres correlate as measured (border cells: fewer)
        ring = np.where(nb >= 0, nb, c)
        padded = np.concatenate([latent, np.zeros((1, d), np.float32)])
        smooth = latent.copy()
        for j in range(nb.shape[1]):
            smooth += np.float32(beta) * padded[ring[:, j]]
        latent = smooth / np.float32(np.sqrt(1 + 8 * beta * beta))
    centre = mean + latent
    head_off = gauss(c * HEADINGS, h_map).reshape(c, HEADINGS, d)
    heads = rng.integers(0, HEADINGS, size=n)
    views = row_view = None
    if a > 0:  # look-alike scenes shared by rows anywhere (view_group rows per view on average)
        n_views = max(1, round(n / max(1.0, float(calib.get("view_group", 2.0)))))
        row_view = rng.integers(0, n_views, size=n)
        views = gauss(n_views, (np.sqrt(a) * o_std).astype(np.float32))
    xb = np.empty((n, d), np.float32)
    step = 65536
    for i in range(0, n, step):
        cc, hh = cells[i:i + step], heads[i:i + step]
        x = centre[cc] + head_off[cc, hh] + gauss(len(cc), r_map)
        if views is not None:
            x += views[row_view[i:i + step]]
        xb[i:i + step] = normalise(x)
    k = int(calib.get("prototypes_per_cell", 1))
    protos, proto_cells = subcentre_prototypes(xb, cells, k, seed=seed)
    proto_cells = proto_cells if k > 1 else None
    src = rng.integers(0, n, size=nq)
    qc, qh = cells[src], heads[src]
    psi = float(np.clip(calib.get("query_centre_fidelity", 1.0), 0.0, 1.0))
    xq = mean + np.float32(np.sqrt(psi)) * latent[qc] + head_off[qc, qh] + np.float32(np.sqrt(query_noise)) * gauss(nq, r_map)
    if psi < 1:  # the place as the query sees it (another season, light, ...): part of its centre is new
        xq += np.float32(np.sqrt(1 - psi)) * gauss(nq, c_map)
    if views is not None:  # a new photo of the scene its source row shows, seen with fidelity phi
        phi = float(np.clip(calib.get("query_view_fidelity", 1.0), 0.0, 1.0))
        xq += np.float32(np.sqrt(phi)) * views[row_view[src]]
        if phi < 1:
            xq += gauss(nq, (np.sqrt(a * (1 - phi)) * o_std).astype(np.float32))
    xq = normalise(xq)
    return CellData(xb, cells, protos, nb, xq, {"generator": "realistic", **summary(calib), "n_cells": c,
                                                "query_noise": query_noise, "query_cells": qc}, proto_cells)
