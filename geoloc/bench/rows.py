"""Latency rows of one database: the engine's modes (per cell scorer) and the usual ANN baselines.

Every row is a dict (the ``results`` entries of ``benchmarks/latency.py``'s JSON): ``mode``,
``source``, ``db_size``, ``n_cells``, ``dim``, ``batch_size``, ``search_ms_per_query``,
``recall_vs_flat`` (share of queries whose exact top-1 is among the row's top-10; classify:
whose exact top-1's cell is the predicted cell), ``bytes_read_per_query``, ``floor_ms`` (those
bytes at the measured read bandwidth), ``x_floor``, ``bytes_per_vector``, ``peak_rss_bytes``,
``threads``, the row's settings, and ``end_to_end_ms_per_query`` when a backbone time is given.
Batch-1 rows run FAISS with 1 OpenMP thread (a single query is not worth splitting), batched rows
with all of them.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field

import faiss
import numpy as np

from geoloc.bench.synthetic import CellData
from geoloc.bench.timing import peak_rss_bytes, recall_at, time_search
from geoloc.config import IndexConfig
from geoloc.index import CellIndex

__all__ = ["HYBRID_TOP_CELLS", "NCPU", "TOPK", "RowLog", "engine_rows", "hnsw_rows", "ivf_rows"]

TOPK = 10
HYBRID_TOP_CELLS = (1, 5, 20, 100)
"""Hybrid's curve: the cells searched per row (k = 5 alone for a scorer's non-default settings)."""
NCPU = faiss.omp_get_max_threads()


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def set_threads(batch: int) -> None:
    """1 FAISS thread for batch 1, all for batches."""
    faiss.omp_set_num_threads(1 if batch == 1 else NCPU)


@dataclass
class RowLog:
    """Collects the rows of one database ``data`` (``source``: "synthetic" or "bundle")."""

    data: CellData
    source: str
    bandwidth: float
    backbone_ms: float | None = None
    budget_s: float = 2.0
    data_kind: str = "hard"
    """Generator of the data (``hard`` / ``realistic``; ``bundle`` for a real bundle's vectors)."""
    rows: list[dict] = field(default_factory=list)

    def add(self, mode: str, batch: int, ms: float, recall: float, bytes_q: float, bytes_vec: float, **extra) -> None:
        n, d = self.data.xb.shape
        floor_ms = bytes_q / self.bandwidth * 1e3
        row = dict(mode=mode, source=self.source, db_size=n, n_cells=self.data.n_cells, dim=d, batch_size=batch,
                   search_ms_per_query=ms, recall_vs_flat=recall, bytes_read_per_query=int(bytes_q),
                   floor_ms=floor_ms, x_floor=ms / floor_ms if floor_ms > 0 else None,
                   bytes_per_vector=bytes_vec, peak_rss_bytes=peak_rss_bytes(),
                   threads=1 if batch == 1 else NCPU, data=self.data_kind, **extra)
        if self.backbone_ms is not None:
            row["end_to_end_ms_per_query"] = self.backbone_ms + ms
        self.rows.append(row)
        log(f"  {mode:9s} {json.dumps(extra):48s} b={batch:<4d} {ms:9.4f} ms/q  recall={recall:.3f}  x_floor={row['x_floor']:.1f}")

    def timed(self, fn, batch: int, **kw) -> float:
        set_threads(batch)
        return time_search(fn, self.data.xq, batch, budget_s=self.budget_s, **kw)


def engine_rows(log_: RowLog, *, batches: list[int], quick: bool, scorers: tuple[str, ...] | None = None) -> np.ndarray:
    """Retrieve, then classify and hybrid (k = 1, 5, 20 cells) with each cell scorer; the HNSW
    scorer also at several ``ef_search`` (batch 1, k = 5). ``scorers``: only these (plus ``flat``,
    the exact reference; None: flat, hnsw, lsh and the default). Returns the exact top-1 ids ``[Q]``."""
    data = log_.data
    n, d = data.xb.shape
    log(f"[{log_.source}] N={n} C={data.n_cells} P={len(data.prototypes)} D={d}: building cell indexes")
    t = time.perf_counter()
    from geoloc.bench.report import default_scorer
    kinds = list(dict.fromkeys(("flat", *(scorers if scorers is not None else ("hnsw", "lsh", default_scorer(len(data.prototypes)))))))
    built = {kind: CellIndex.build(**data.index_arrays(), config=IndexConfig(quantizer=kind, use_gpu=False))
             for kind in kinds}
    log(f"  built in {time.perf_counter() - t:.1f}s")
    faiss.omp_set_num_threads(NCPU)
    flat = built["flat"]
    gt1 = flat.search(data.xq, mode="retrieve", k=TOPK).ids[:, 0]  # ground truth = exact flat search
    for b in batches:
        ms = log_.timed(lambda x: flat.search(x, mode="retrieve", k=TOPK), b, max_calls=300 if n <= 100_000 else 40)
        log_.add("retrieve", b, ms, 1.0, n * d * 4 / b, d * 4, index="IVF lists in place")
    flat.drop_flat_view()
    exact_cells: dict[int, np.ndarray] = {}
    default_ef = IndexConfig().hnsw_ef_search
    for scoring in [k for k in ("flat", "lsh", "hnsw") if k in built] + [k for k in built if k not in ("flat", "lsh", "hnsw")]:
        efs = [default_ef] if scoring != "hnsw" else sorted({32, default_ef} if quick else {16, 32, 64, default_ef})
        for ef in efs:
            idx = built[scoring].tuned(hnsw_ef_search=ef) if scoring == "hnsw" else built[scoring]
            extra = {"cell_scoring": scoring} | ({"ef_search": ef} if scoring == "hnsw" else {})
            scorer_rows(log_, idx, extra, gt1, exact_cells, batches=batches, all_rows=ef == default_ef)
    return gt1


def scorer_bytes(idx: CellIndex) -> float:
    """Bytes the cell scorer holds: the float32 prototypes plus its own structure (``memory_bytes``)."""
    return idx.memory_bytes()["quantizer"]


def cell_bytes(idx: CellIndex, xq: np.ndarray, batch: int) -> float:
    """Bytes the cell scorer reads per query: all prototypes (flat), all codes + the exact
    re-rank of a 20-cell shortlist (lsh), the distances the graph computes (hnsw)."""
    c, d = len(idx.prototype_cells), idx.dim  # prototypes: several per cell in a real bundle
    cfg = IndexConfig()
    if idx.quantizer_kind == "flat":
        return c * d * 4 / batch
    if idx.quantizer_kind == "lsh":
        return c * (cfg.lsh_bits or max(256, d)) / 8 / batch + cfg.lsh_k_factor * 20 * d * 4
    if idx.quantizer_kind in ("sq8", "pqfs"):  # all codes once per batch + the exact re-rank of the shortlist
        codes = idx.memory_bytes()["quantizer"] - c * d * 4
        return codes / batch + cfg.scorer_k_factor * 20 * d * 4
    if idx.quantizer_kind == "twolevel":  # region centres + the probed regions' prototypes
        regions = 2 * np.sqrt(c)
        return (regions + cfg.twolevel_probe * c / regions) * d * 4
    faiss.cvar.hnsw_stats.reset()
    idx.score_cells(xq, 20)
    return faiss.cvar.hnsw_stats.ndis / len(xq) * d * 4


def scorer_rows(log_: RowLog, idx: CellIndex, extra: dict, gt1: np.ndarray, exact_cells: dict[int, np.ndarray], *,
                batches: list[int], all_rows: bool) -> None:
    """Classify and hybrid rows of one cell scorer; ``all_rows`` False: batch 1 and k = 5 only.
    ``exact_cells`` holds the flat scorer's top cells per k (filled by the flat pass, which runs first)."""
    data = log_.data
    n, d = data.xb.shape
    q_bytes_vec = scorer_bytes(idx) / n
    cbytes = {b: cell_bytes(idx, data.xq, b) for b in batches}
    gt_cell = data.cells[gt1]
    res = idx.search(data.xq, mode="classify", top_cells=1)
    for b in batches if all_rows else [b for b in batches if b == 1]:
        ms = log_.timed(lambda x: idx.search(x, mode="classify", top_cells=1), b)
        log_.add("classify", b, ms, float((res.cell_ids[:, 0] == gt_cell).mean()), cbytes[b], q_bytes_vec, top_cells=1, **extra)
    for kc in HYBRID_TOP_CELLS if all_rows else (5,):
        res = idx.search(data.xq, mode="hybrid", top_cells=kc, k=TOPK)
        row_extra = dict(extra, top_cells=kc)
        if idx.quantizer_kind == "flat":
            exact_cells[kc] = res.cell_ids
        else:
            ex = exact_cells[kc]
            row_extra["cell_recall_vs_exact"] = float(np.mean([len(np.intersect1d(a, b)) / kc for a, b in zip(res.cell_ids, ex, strict=True)]))
        rec = recall_at(res.ids, gt1)
        for b in batches if all_rows else [b for b in batches if b == 1]:
            ms = log_.timed(lambda x, kc=kc: idx.search(x, mode="hybrid", top_cells=kc, k=TOPK), b)
            log_.add("hybrid", b, ms, rec, cbytes[b] + res.scanned.mean() * (d * 4 + 8), d * 4 + 8 + q_bytes_vec, **row_extra)


def ivf_rows(log_: RowLog, gt1: np.ndarray, *, batches: list[int]) -> None:
    """FAISS IVF-Flat with k-means, ``nlist ~ 4 sqrt(N)``; nprobe doubled until recall >= 0.999.

    From N = 5e5 on the coarse quantizer is HNSW32 (FAISS's own "IVF4096_HNSW32,Flat"): assigning
    10^6 vectors to 4000 flat centroids alone takes minutes on 2 cores."""
    data = log_.data
    n, d = data.xb.shape
    nlist = int(4 * math.sqrt(n))
    log(f"  IVF-Flat nlist={nlist}: training")
    t = time.perf_counter()
    faiss.omp_set_num_threads(NCPU)
    big = n >= 500_000
    q = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT) if big else faiss.IndexFlatIP(d)
    ivf = faiss.IndexIVFFlat(q, d, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.niter = 8 if big else 10
    ivf.cp.max_points_per_centroid = 32 if big else 256
    rng = np.random.default_rng(1)
    ivf.train(data.xb[rng.choice(n, size=min(n, nlist * ivf.cp.max_points_per_centroid), replace=False)])
    ivf.add(data.xb)
    log(f"  IVF built in {time.perf_counter() - t:.1f}s")
    for nprobe in (1, 2, 4, 8, 16, 32, 64, 128):
        qparams = faiss.SearchParametersHNSW(efSearch=max(64, 2 * nprobe)) if big else None
        params = faiss.SearchParametersIVF(nprobe=nprobe, quantizer_params=qparams) if big else faiss.SearchParametersIVF(nprobe=nprobe)
        faiss.cvar.indexIVF_stats.reset()
        _, ids = ivf.search(data.xq, TOPK, params=params)
        rec = recall_at(ids, gt1)
        scanned = faiss.cvar.indexIVF_stats.ndis / len(data.xq)
        for b in batches:
            ms = log_.timed(lambda x, p=params: ivf.search(x, TOPK, params=p), b)
            log_.add("ivf_flat", b, ms, rec, nlist * d * 4 / b + scanned * (d * 4 + 8), d * 4 + 8 + nlist * d * 4 / n,
                     nlist=nlist, nprobe=nprobe, quantizer="hnsw32" if big else "flat")
        if rec >= 0.999:
            break


def hnsw_rows(log_: RowLog, gt1: np.ndarray, *, batches: list[int], quick: bool) -> None:
    """FAISS HNSW32 (efConstruction 40) over all vectors; efSearch doubled until recall >= 0.999."""
    data = log_.data
    n, d = data.xb.shape
    log("  HNSW32: building")
    t = time.perf_counter()
    faiss.omp_set_num_threads(NCPU)
    h = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    h.add(data.xb)
    log(f"  HNSW32 built in {time.perf_counter() - t:.1f}s")
    bytes_vec = (n * d * 4 + h.hnsw.neighbors.size() * 4 + h.hnsw.offsets.size() * 8 + h.hnsw.levels.size() * 4) / n
    for ef in ((16, 64, 256) if quick else (16, 32, 64, 128, 256, 512)):
        params = faiss.SearchParametersHNSW(efSearch=ef)
        faiss.cvar.hnsw_stats.reset()
        _, ids = h.search(data.xq, TOPK, params=params)
        rec = recall_at(ids, gt1)
        ndis = faiss.cvar.hnsw_stats.ndis / len(data.xq)
        for b in batches:
            ms = log_.timed(lambda x, p=params: h.search(x, TOPK, params=p), b)
            log_.add("hnsw32", b, ms, rec, ndis * (d * 4 + 32 * 2 * 4 / 2), bytes_vec, ef_search=ef)
        if rec >= 0.999:
            break
    faiss.omp_set_num_threads(NCPU)
