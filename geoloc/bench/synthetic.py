"""Synthetic descriptors with the structure of the real problem, and their calibration on a bundle.

``make_cell_data`` lays ``C`` cells of 10..400 images (log-normal, mean ~60) on a square grid;
a descriptor is a weighted sum of unit directions (global, 3x3 block per heading, cell, cell per
heading) plus noise, with weights chosen so that the mean same-cell and different-cell cosines
match ``intra`` / ``inter`` (defaults below, or measured on a real bundle with
:func:`measure_cosines`, as ``benchmarks/latency.py --bundle`` does). Prototypes are the
normalised cell means (one per cell).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from geoloc.cells import neighbour_table

__all__ = [
    "DEFAULT_INTRA_COS", "DEFAULT_INTER_COS", "DEFAULT_MEAN_CELL_SIZE", "HEADINGS", "CellData", "normalise",
    "ChunkedCellData", "generator_weights", "make_cell_data", "make_prototype_data", "segment_sum", "measure_cosines",
]

# --- synthetic data defaults (used when no --bundle calibrates them) -----------------------
# Mean cosine between two database descriptors of the same 20 m cell, and of two random
# different cells. Assumed values for pooled, L2-normalised DINOv2/EfficientNet street-view
# descriptors (same cell, mixed headings ~0.45; unrelated places ~0.15). --bundle measures them.
DEFAULT_INTRA_COS = 0.45
DEFAULT_INTER_COS = 0.15
DEFAULT_MEAN_CELL_SIZE = 60.0
"""Mean images per cell (log-normal sizes clipped to 10..400: 'tens to hundreds')."""
HEADINGS = 4
"""Views per cell: images of one cell share a cell direction, and one of 4 heading directions."""



def cells_of_sizes(draw, n: int) -> np.ndarray:
    """Cell ids ``[n]`` int64 (sorted) for cells whose sizes come from ``draw()`` (batches of
    positive int64 sizes), the last cell cut so the sizes sum to exactly ``n``."""
    sizes, total = [], 0
    while total < n:
        s = draw()
        sizes.append(s)
        total += int(s.sum())
    sizes = cut_sizes(np.concatenate(sizes), n)
    return np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)


def cut_sizes(sizes: np.ndarray, n: int) -> np.ndarray:
    """The leading cell sizes ``[c]`` of ``sizes`` (positive int64, summing to at least ``n``) with
    the last one cut so they sum to exactly ``n``."""
    cum = np.cumsum(sizes)
    c = int(np.searchsorted(cum, n) + 1)
    sizes = sizes[:c].copy()
    sizes[-1] -= int(cum[c - 1] - n)
    return sizes[:-1] if sizes[-1] <= 0 else sizes


def normalise(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation, in place when float32; ``[n, D]`` -> ``[n, D]`` float32."""
    x = np.asarray(x, dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


@dataclass
class CellData:
    """Synthetic database with the structure of the real problem.

    Attributes:
        xb: ``[N, D]`` float32 descriptors; cells: ``[N]`` int64 cell of each row.
        prototypes: ``[P, D]`` float32 (normalised mean of each cell's members; a real bundle's
            sub-centres, several per cell).
        neighbours: ``[C, 8]`` int64 grid neighbours (-1 = none).
        xq: ``[Q, D]`` float32 queries (new photos of random database places).
        params: the generator's weights.
        prototype_cells: ``[P]`` int64 cell of each prototype; None: one per cell (``P == C``).
    """

    xb: np.ndarray
    cells: np.ndarray
    prototypes: np.ndarray
    neighbours: np.ndarray
    xq: np.ndarray
    params: dict
    prototype_cells: np.ndarray | None = None

    @property
    def n_cells(self) -> int:
        """C, the number of cells (not of prototypes)."""
        return len(self.prototypes) if self.prototype_cells is None else int(self.prototype_cells.max()) + 1

    def index_arrays(self) -> dict[str, np.ndarray | None]:
        """The arrays :meth:`geoloc.index.CellIndex.build` takes, as keyword arguments."""
        return {"descriptors": self.xb, "cells": self.cells, "prototypes": self.prototypes,
                "prototype_cells": self.prototype_cells, "neighbours": self.neighbours}

    def cell_scores(self, xq: np.ndarray) -> np.ndarray:
        """Exact cell scores ``[Q, C]``: the best cosine of each query over each cell's prototypes."""
        sims = xq @ self.prototypes.T
        if self.prototype_cells is None:
            return sims
        order = np.argsort(self.prototype_cells, kind="stable")  # every cell has a prototype
        starts = np.searchsorted(self.prototype_cells[order], np.arange(self.n_cells))
        return np.maximum.reduceat(sims[:, order], starts, axis=1)


def generator_weights(intra: float, inter: float) -> dict[str, float]:
    """Squared weights of the descriptor components that give the wanted mean cosines.

    Model: ``x = a m + b u_block,h + g u_cell + d u_cell,h + s e`` with unit random
    directions: ``m`` global, ``u_block,h`` shared by a 3x3 block of cells looking the same
    way (heading h), ``u_cell``, ``u_cell,h``, and noise ``e``. Mean same-cell cosine =
    ``a2 + g2 + (b2 + d2) / H``; mean random-pair cosine ~ ``a2``.
    """
    if not 0 <= inter < intra < 1:
        raise ValueError(f"need 0 <= inter ({inter:.3f}) < intra ({intra:.3f}) < 1")
    spec = intra - inter
    x = spec / (0.3 + 0.7 / HEADINGS)
    a2, g2, b2, d2 = inter, 0.3 * x, 0.35 * x, 0.35 * x
    s2 = 1.0 - (a2 + g2 + b2 + d2)
    if s2 < 0.02:  # too tight for this split: shrink the heading parts
        scale = (1.0 - 0.02 - a2 - g2) / (b2 + d2)
        b2, d2, s2 = b2 * scale, d2 * scale, 0.02
    return {"a2": a2, "b2": b2, "g2": g2, "d2": d2, "s2": s2, "intra": intra, "inter": inter}


def make_cell_data(n: int, dim: int, *, nq: int, intra: float = DEFAULT_INTRA_COS, inter: float = DEFAULT_INTER_COS,
                   mean_cell: float = DEFAULT_MEAN_CELL_SIZE, query_noise: float = 1.5, seed: int = 0) -> CellData:
    """Generate ``n`` database descriptors in cells laid on a square grid, plus ``nq`` queries.

    Queries pick a random database row's cell and heading and add ``query_noise`` times the
    database noise variance (another photo of the place, other day, other camera).
    """
    rng = np.random.default_rng(seed)
    w = generator_weights(intra, inter)
    sigma = 0.9
    mu = np.log(mean_cell) - sigma**2 / 2
    cells = cells_of_sizes(lambda: np.clip(rng.lognormal(mu, sigma, size=4096), 10, 400).astype(np.int64), n)
    c = int(cells[-1]) + 1 if n else 0
    side = int(np.ceil(np.sqrt(c)))
    p, q = np.arange(c) // side, np.arange(c) % side
    block = (p // 3) * ((side + 2) // 3) + (q // 3)
    n_blocks = int(block.max()) + 1

    def units(k: int) -> np.ndarray:
        return normalise(rng.standard_normal((k, dim), dtype=np.float32))

    m = units(1)[0]
    u_block = units(n_blocks * HEADINGS).reshape(n_blocks, HEADINGS, dim)
    u_cell = units(c)
    u_cell_h = units(c * HEADINGS).reshape(c, HEADINGS, dim)
    coef = {k: np.float32(np.sqrt(v)) for k, v in w.items() if k.endswith("2")}

    def compose(cell_of: np.ndarray, head: np.ndarray, noise_var: float) -> np.ndarray:
        out = np.empty((len(cell_of), dim), dtype=np.float32)
        step = 65536
        for i in range(0, len(cell_of), step):
            cc, hh = cell_of[i:i + step], head[i:i + step]
            x = rng.standard_normal((len(cc), dim), dtype=np.float32)
            x *= np.float32(np.sqrt(noise_var / dim))
            x += coef["a2"] * m
            x += coef["b2"] * u_block[block[cc], hh]
            x += coef["g2"] * u_cell[cc]
            x += coef["d2"] * u_cell_h[cc, hh]
            out[i:i + step] = normalise(x)
        return out

    heads = rng.integers(0, HEADINGS, size=n)
    xb = compose(cells, heads, w["s2"])
    protos = np.zeros((c, dim), dtype=np.float32)
    segment_sum(protos, cells, xb)  # cells is sorted
    protos = normalise(protos)
    src = rng.integers(0, n, size=nq)
    xq = compose(cells[src], heads[src], w["s2"] * query_noise)
    nb = neighbour_table(np.full(c, 33), np.zeros(c, bool), p, q)  # cell id = p * side + q: key order
    return CellData(xb, cells, protos, nb, xq, dict(w, mean_cell=float(n / c), n_cells=c, query_noise=query_noise))


def make_prototype_data(n_cells: int, dim: int, *, per_cell: int = 1, nq: int = 1024, intra: float = DEFAULT_INTRA_COS,
                        inter: float = DEFAULT_INTER_COS, mean_cell: float = DEFAULT_MEAN_CELL_SIZE, query_noise: float = 1.5,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell prototypes and queries of :func:`make_cell_data`'s model, without the database (so
    that 10^6 cells fit): prototype ``j`` of a cell is the expected mean of its members that look
    along the headings ``h % per_cell == j`` (``per_cell`` 1..4), plus the noise of averaging
    ``mean_cell / per_cell`` photos. Generated in chunks of cells.

    Returns:
        prototypes ``[C * per_cell, D]`` float32 (normalised), prototype_cells ``[C * per_cell]``
        int64, queries ``[nq, D]`` float32 (a photo of a random cell along a random heading).
    """
    if not 1 <= per_cell <= HEADINGS:
        raise ValueError(f"per_cell must be 1..{HEADINGS}; got {per_cell}")
    rng = np.random.default_rng(seed)
    w = generator_weights(intra, inter)
    coef = {k: np.float32(np.sqrt(v)) for k, v in w.items() if k.endswith("2")}
    side = int(np.ceil(np.sqrt(n_cells)))
    nbw = (side + 2) // 3
    n_blocks = ((side + 2) // 3) ** 2

    def units(*shape: int) -> np.ndarray:
        x = rng.standard_normal((*shape, dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    m = units(1)[0]
    u_block = units(n_blocks, HEADINGS)
    q_cell = rng.integers(0, n_cells, size=nq)
    q_head = rng.integers(0, HEADINGS, size=nq)
    xq = np.empty((nq, dim), dtype=np.float32)
    protos = np.empty((n_cells * per_cell, dim), dtype=np.float32)
    groups = [np.flatnonzero(np.arange(HEADINGS) % per_cell == j) for j in range(per_cell)]
    n_avg = max(1.0, mean_cell / per_cell)
    step = 32768
    for c0 in range(0, n_cells, step):
        cc = np.arange(c0, min(c0 + step, n_cells))
        blk = (cc // side // 3) * nbw + (cc % side) // 3
        u_cell, u_cell_h = units(len(cc)), units(len(cc), HEADINGS)
        base = coef["a2"] * m + coef["g2"] * u_cell
        for j, hs in enumerate(groups):
            x = base + coef["b2"] * u_block[blk][:, hs].mean(1) + coef["d2"] * u_cell_h[:, hs].mean(1)
            x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(np.sqrt(w["s2"] / dim / n_avg))
            protos[cc * per_cell + j] = x / np.linalg.norm(x, axis=1, keepdims=True)
        sel = np.flatnonzero((q_cell >= c0) & (q_cell < c0 + len(cc)))
        if sel.size:
            li, hh = q_cell[sel] - c0, q_head[sel]
            x = base[li] + coef["b2"] * u_block[blk[li], hh] + coef["d2"] * u_cell_h[li, hh]
            x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(np.sqrt(w["s2"] * query_noise / dim))
            xq[sel] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return protos, np.repeat(np.arange(n_cells, dtype=np.int64), per_cell), xq


class ChunkedCellData:
    """:func:`make_cell_data`'s model generated chunk by chunk, for databases that do not fit in memory.

    Chunk ``j`` (cells ``j * chunk_cells ..``, rows of those cells) is regenerated identically on
    every call from its own seed, so a build can make two passes (prototypes, then the lists)
    holding one chunk at a time.

    Attributes:
        n_cells: C. sizes: ``[C]`` int64 rows per cell. neighbours: ``[C, 8]`` int64.
    """

    def __init__(self, n: int, dim: int, *, nq: int, chunk_cells: int = 8192, intra: float = DEFAULT_INTRA_COS,
                 inter: float = DEFAULT_INTER_COS, mean_cell: float = DEFAULT_MEAN_CELL_SIZE, query_noise: float = 1.5,
                 seed: int = 0) -> None:
        rng = np.random.default_rng([seed, 0])
        self.dim, self.nq, self.chunk_cells, self.seed, self.query_noise = dim, nq, chunk_cells, seed, query_noise
        self.w = generator_weights(intra, inter)
        self.coef = {k: np.float32(np.sqrt(v)) for k, v in self.w.items() if k.endswith("2")}
        sigma = 0.9
        mu = np.log(mean_cell) - sigma ** 2 / 2
        sizes = np.clip(rng.lognormal(mu, sigma, size=int(2 * n / mean_cell) + 4096), 10, 400).astype(np.int64)
        sizes = cut_sizes(sizes, n)
        c = len(sizes)
        self.sizes, self.n_cells, self.n = sizes, c, n
        self.starts = np.r_[0, np.cumsum(sizes)]
        side = int(np.ceil(np.sqrt(c)))
        p, q = np.arange(c) // side, np.arange(c) % side
        self.block = (p // 3) * ((side + 2) // 3) + (q // 3)
        self.m = normalise(rng.standard_normal((1, dim), dtype=np.float32))[0]
        nb = int(self.block.max()) + 1
        self.u_block = normalise(rng.standard_normal((nb * HEADINGS, dim), dtype=np.float32)).reshape(nb, HEADINGS, dim)
        self.neighbours = neighbour_table(np.full(c, 33), np.zeros(c, bool), p, q)
        src = rng.integers(0, n, size=nq)
        self._q_cell = np.searchsorted(self.starts, src, side="right") - 1
        self._q_head = rng.integers(0, HEADINGS, size=nq)

    @property
    def n_chunks(self) -> int:
        return -(-self.n_cells // self.chunk_cells)

    def _chunk(self, j: int, queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, 1, j])
        c0, c1 = j * self.chunk_cells, min((j + 1) * self.chunk_cells, self.n_cells)
        k, d, co = c1 - c0, self.dim, self.coef
        u_cell = normalise(rng.standard_normal((k, d), dtype=np.float32))
        u_cell_h = normalise(rng.standard_normal((k * HEADINGS, d), dtype=np.float32)).reshape(k, HEADINGS, d)
        cells = np.repeat(np.arange(c0, c1, dtype=np.int64), self.sizes[c0:c1])
        heads = rng.integers(0, HEADINGS, size=len(cells))

        def compose(cc: np.ndarray, hh: np.ndarray, var: float, r: np.random.Generator) -> np.ndarray:
            x = r.standard_normal((len(cc), d), dtype=np.float32) * np.float32(np.sqrt(var / d))
            x += co["a2"] * self.m + co["b2"] * self.u_block[self.block[cc], hh]
            x += co["g2"] * u_cell[cc - c0] + co["d2"] * u_cell_h[cc - c0, hh]
            return normalise(x)

        xb = compose(cells, heads, self.w["s2"], rng)
        if queries is not None:
            sel = np.flatnonzero((self._q_cell >= c0) & (self._q_cell < c1))
            if sel.size:
                queries[sel] = compose(self._q_cell[sel], self._q_head[sel], self.w["s2"] * self.query_noise,
                                       np.random.default_rng([self.seed, 2, j]))
        return xb, cells

    def chunks(self):
        """Yield ``(xb [n_j, D] float32, cells [n_j] int64)`` chunk by chunk, rows in id order."""
        for j in range(self.n_chunks):
            yield self._chunk(j)

    def prototypes_and_queries(self) -> tuple[np.ndarray, np.ndarray]:
        """One pass: ``[C, D]`` normalised cell means and ``[nq, D]`` queries."""
        protos = np.zeros((self.n_cells, self.dim), np.float32)
        xq = np.zeros((self.nq, self.dim), np.float32)
        for j in range(self.n_chunks):
            xb, cells = self._chunk(j, xq)
            segment_sum(protos, cells, xb)
        return normalise(protos), xq

    def sample(self, size: int) -> np.ndarray:
        """``[size, D]`` rows drawn from the first chunks (an encoder training sample)."""
        out, have = [], 0
        for xb, _ in self.chunks():
            out.append(xb[np.random.default_rng(self.seed).permutation(len(xb))[: size - have]])
            have += len(out[-1])
            if have >= size:
                break
        return np.concatenate(out)


def segment_sum(out: np.ndarray, cells: np.ndarray, x: np.ndarray) -> None:
    """``out[c] += sum of x[cells == c]`` for sorted ``cells`` ``[N]``; ``x`` ``[N, D]``."""
    starts = np.flatnonzero(np.r_[True, cells[1:] != cells[:-1]])
    out[cells[starts]] += np.add.reduceat(x, starts, axis=0)


def measure_cosines(xb: np.ndarray, cells: np.ndarray, *, pairs: int = 20000, seed: int = 0) -> tuple[float, float]:
    """Mean intra-cell and inter-cell cosine over random pairs; xb ``[N, D]``, cells ``[N]``."""
    rng = np.random.default_rng(seed)
    order = np.argsort(cells, kind="stable")
    sc = cells[order]
    starts = np.flatnonzero(np.r_[True, sc[1:] != sc[:-1]])
    counts = np.diff(np.r_[starts, len(sc)])
    ok = np.flatnonzero(counts >= 2)
    pick = rng.choice(ok, size=pairs)
    i = order[starts[pick] + (rng.random(pairs) * counts[pick]).astype(np.int64)]
    j = order[starts[pick] + (rng.random(pairs) * counts[pick]).astype(np.int64)]
    keep = i != j
    intra = float(np.einsum("ij,ij->i", xb[i[keep]], xb[j[keep]]).mean())
    a, b = rng.integers(0, len(xb), size=(2, pairs))
    keep = cells[a] != cells[b]
    inter = float(np.einsum("ij,ij->i", xb[a[keep]], xb[b[keep]]).mean())
    return intra, inter

