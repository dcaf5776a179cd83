"""Cell scorers: how a query's best cells are found among the ``P`` prototypes ``[P, D]``.

A scorer is one class registered under a name with :func:`register_scorer` (the way timm
registers models). It owns

* its construction from prototypes (:meth:`CellScorer.empty`: an untrained, empty FAISS index
  that ``train`` + ``add`` fill; the same path serves build and a scorer switch at load),
* its recognition in a stored index (:meth:`CellScorer.owns`; the scorer's FAISS index is the
  IVF's quantizer, so it is saved and loaded with ``index.faiss``),
* its per-call search parameters (never written into the shared index after build, so one
  scorer serves many threads),
* the conversion of its distances into cosines, and its GPU variant (:meth:`CellScorer.to_gpu`;
  the default is exact scoring over the prototypes on the GPU, see :class:`GpuExactScorer`).

``config.quantizer == "auto"`` resolves by :func:`resolve_scorer_name`: ``pqfs`` from
``config.approx_min_cells`` prototypes on, ``flat`` below. Adding a scorer = one subclass + its
``@register_scorer("name")``; nothing else in the package names scorer kinds.

Registered scorers: ``flat`` (exact), ``lsh`` (binary codes + exact re-rank), ``hnsw`` (graph),
``sq8`` (8-bit codes + exact re-rank), ``pqfs`` (4-bit PQ fast scan + exact re-rank),
``twolevel`` (k-means regions, then the prototypes of the best regions).

**The auto rule and its evidence.** ``python benchmarks/cell_scoring.py --cells 10000 100000
--per-cell 1 4 --queries 256`` (384-d, batch 1, one FAISS thread, 2-core VM shared with other
jobs; hard synthetic model; cell recall = exact top cell within the scorer's top 5), ms per query:

=========  ====  =======  =======  ===========  ==========  ==========  ===============
cells      K     flat     lsh x16  hnsw ef128   sq8 x8      pqfs x8     twolevel probe32
=========  ====  =======  =======  ===========  ==========  ==========  ===============
10^4       1     0.27     0.090    0.42 (.996)  0.39        **0.063**   0.13 (0.918)
10^4       4     8.79     0.41     1.30 (.996)  1.89        **0.27**    0.66 (0.988)
10^5       1     18.3     0.39     1.46 (.645)  13.3        **0.35**    0.90 (0.633)
10^5       4     61.3     5.79     (not built)  28.4        **2.76**    7.28 (0.934)
10^6       1     117      **3.34** (not built)  (not run)   4.28        7.40 (0.484)
=========  ====  =======  =======  ===========  ==========  ==========  ===============

(cell recall 1.000 where not given; HNSW not built above 2 x 10^5 prototypes: build time.)
``pqfs`` is the fastest scorer that keeps recall 1.0 at every size measured, 4x faster than
``flat`` at 10^4 prototypes, 50x at 10^5, 22x at 4 x 10^5 and 27x at 10^6 (``--cells 1000000
--per-cell 1 --queries 128 --scorers flat lsh pqfs twolevel``). It beats ``lsh`` by 1.1-2x up
to 4 x 10^5 prototypes; at 10^6 one run had ``lsh`` 1.3x faster, inside this shared machine's
noise, so the rule keeps one approximate scorer; ``flat`` stays
exact and costs little while the prototypes fit in cache (below ~10^4 x 384-d), so ``auto`` =
``flat`` below ``approx_min_cells`` (10^4) *prototypes* (cells x K), ``pqfs`` from there on.
HNSW loses recall on these near-isotropic prototypes, and the two-level scorer's regions do not
separate them (both may do better on real descriptors, which are far more clustered); ``sq8``
gains nothing over ``flat`` here (FAISS's 8-bit inner-product scan is not faster than the float
one on this CPU).

**Code size of ``pqfs`` (``pqfs_m`` default D/2), at 10^6 rows.** The computation of ``python
benchmarks/pqfs_params.py --size 1000000`` (run as a script before it was packaged there; hard
model with the demo bundle's cosines, 42,696 cells, 384-d, 1,024 queries; batch 1, one FAISS
thread; recall = the exact nearest row's cell among the scorer's 5 cells, i.e. hybrid k=5 against
exact search; exact scoring gives 0.978):

=============  =========  ===========  ===========  =========
pqfs           m=192 x8   m=96 x8      m=96 x16     m=48 x16
=============  =========  ===========  ===========  =========
ms per query   0.164      0.102        0.165        0.087
recall         0.977      0.969        0.974        0.912
=============  =========  ===========  ===========  =========

Halving the codes saves 40% of the scan but loses the exact neighbour's cell for 1% of the
queries, quartering them 7%: the default stays D/2. The scan of 42.7k x 96-byte codes is 0.15 ms
of FAISS time (about 0.03 ms of it per code, whatever m), so on this CPU no exhaustive scorer
brings a 10^6-row hybrid query under 0.094 ms (1000x exact flat search), and the sub-linear ones
lose the cell on this near-isotropic model (top cell among the 5 over 42,838 prototypes:
``twolevel`` probe 64 0.63 at 0.50 ms, ``hnsw`` ef 128 0.71 at 1.02 ms).

**On realistic prototypes** (``python benchmarks/cell_scoring.py --cells 10000 100000 --per-cell 1
4 --data realistic --bundle indexes/demo``, ``runs/bench/cell_scoring_realistic.json``: the
generator of :mod:`geoloc.bench.realistic` calibrated on the demo bundle, 512-d, about 23 rows a
cell, K k-means sub-centres per cell standing in for the heads; 512 queries, batch 1, one FAISS
thread). Each entry: ms per query / cell recall (exact top cell within the scorer's 5) / hybrid's
recall ceiling with those 5 cells (the exact nearest database row's cell among them):

=====  =  =====================  =====================  =====================  =====================  ======================  =====================
cells  K  flat                   lsh x16                hnsw ef128             sq8 x8                 pqfs x8                 twolevel probe32
=====  =  =====================  =====================  =====================  =====================  ======================  =====================
10^4   1  0.476 / 1.000 / 0.055  0.082 / 0.934 / 0.051  0.369 / 0.994 / 0.053  0.395 / 1.000 / 0.055  0.0708 / 0.986 / 0.057  0.143 / 0.906 / 0.043
10^4   4  3.11 / 1.000 / 0.355   0.306 / 0.990 / 0.357  0.954 / 0.900 / 0.242  1.79 / 1.000 / 0.355   0.264 / 1.000 / 0.355   0.442 / 0.777 / 0.203
10^5   1  9.31 / 1.000 / 0.021   0.244 / 0.809 / 0.016  1.11 / 0.934 / 0.018   5.15 / 1.000 / 0.021   0.447 / 0.912 / 0.020   0.657 / 0.779 / 0.016
10^5   4  32.9 / 1.000 / 0.248   1.23 / 0.918 / 0.236   (not built)            20.1 / 1.000 / 0.248   2.23 / 0.977 / 0.252    1.43 / 0.666 / 0.084
=====  =  =====================  =====================  =====================  =====================  ======================  =====================

The rule holds there too: ``pqfs`` is the fastest scorer that keeps hybrid's ceiling within 0.01
in every row (``lsh`` x16 is faster at 10^5 cells but loses up to 0.012 of the ceiling and
8-19 % of the exact top cells); ``hnsw`` and ``twolevel`` lose a third or more of the ceiling
with K = 4. With K = 4 at 10^5 cells the scan of 397k x 128-byte codes takes 2.2 ms (23 GB/s):
at this scale the scorer's time is its codes' bytes over the memory bandwidth.

:class:`PrototypeCells` maps prototypes to cells (several prototypes per cell: a cell's score is
the best cosine over its prototypes) and turns a prototype shortlist into distinct top cells.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import faiss
import numpy as np

from geoloc.config import IndexConfig
from geoloc.index.lists import distinct_positions

__all__ = [
    "DENSE_MAX_BATCH",
    "DENSE_MAX_PROTOTYPES",
    "GPU_MAX_K",
    "SCORERS",
    "CellScorer",
    "DenseCells",
    "FlatScorer",
    "GpuExactScorer",
    "HNSWScorer",
    "LSHScorer",
    "PQFastScanScorer",
    "PrototypeCells",
    "SQ8Scorer",
    "TwoLevelScorer",
    "register_scorer",
    "resolve_scorer_name",
    "scorer_for_index",
    "scorer_names",
]

SCORERS: dict[str, type[CellScorer]] = {}
"""Registered scorer classes by name (``config.quantizer`` values besides ``auto``)."""

GPU_MAX_K = 2048
"""Largest k a FAISS GPU flat search accepts; longer shortlists are cut there (and -1 padded)."""


def register_scorer(name: str) -> Callable[[type[CellScorer]], type[CellScorer]]:
    """Class decorator: register a :class:`CellScorer` subclass under ``name``."""

    def deco(cls: type[CellScorer]) -> type[CellScorer]:
        if name in SCORERS or name == "auto":
            raise ValueError(f"cell scorer name {name!r} is already taken")
        cls.name = name
        SCORERS[name] = cls
        return cls

    return deco


def scorer_names() -> tuple[str, ...]:
    """Valid ``index.quantizer`` values: the registered scorers and ``auto``."""
    return (*SCORERS, "auto")


def resolve_scorer_name(config: IndexConfig, n_prototypes: int) -> str:
    """The registered scorer ``config.quantizer`` asks for over ``n_prototypes`` prototypes (= cells
    with one prototype per cell); 'auto' resolved by the rule in this module's docstring."""
    name = config.quantizer
    if name == "auto":
        return "pqfs" if n_prototypes >= config.approx_min_cells else "flat"
    if name not in SCORERS:
        raise ValueError(f"index.quantizer must be one of {', '.join(scorer_names())}; got {name!r}")
    return name


def scorer_for_index(index: faiss.Index) -> type[CellScorer] | None:
    """The registered class whose structure ``index`` (a stored quantizer) has, or None."""
    index = faiss.downcast_index(index)
    return next((cls for cls in SCORERS.values() if cls.owns(index)), None)


class CellScorer:
    """Scores prototypes of a query; one instance wraps one FAISS index over ``[P, D]`` prototypes.

    Args:
        index: the FAISS index over the prototypes (the IVF's quantizer; not owned here).
        config: per-call search parameters are read from it.
    """

    name: ClassVar[str] = ""
    search_keys: ClassVar[tuple[str, ...]] = ()
    """``IndexConfig`` keys read per call (changeable on a built index with ``CellIndex.tuned``)."""

    def __init__(self, index: faiss.Index, config: IndexConfig) -> None:
        self.index = faiss.downcast_index(index)
        self.config = config
        self._params: dict[int, faiss.SearchParameters | None] = {}  # per shortlist length, read-only once made
        self._protos: np.ndarray | None = None

    def cached_params(self, m: int) -> faiss.SearchParameters | None:
        """:meth:`params` made once per ``m`` and shared read-only between threads."""
        p = self._params.get(m)
        if p is None:
            p = self._params[m] = self.params(m)
        return p

    # -- construction / recognition ------------------------------------------------------
    @classmethod
    def empty(cls, d: int, config: IndexConfig) -> faiss.Index:
        """An empty FAISS index for ``d``-D prototypes; ``train(P)`` then ``add(P)`` fill it."""
        raise NotImplementedError

    @classmethod
    def empty_for(cls, d: int, config: IndexConfig, n_prototypes: int) -> faiss.Index:
        """:meth:`empty` for ``n_prototypes`` prototypes (scorers whose structure depends on P override it)."""
        return cls.empty(d, config)

    @classmethod
    def make(cls, prototypes: np.ndarray, config: IndexConfig) -> faiss.Index:
        """The scorer's FAISS index over ``prototypes`` ``[P, D]`` float32 (L2-normalised)."""
        q = cls.empty_for(prototypes.shape[1], config, len(prototypes))
        q.train(prototypes)
        q.add(prototypes)
        return q

    @classmethod
    def owns(cls, index: faiss.Index) -> bool:
        """True when ``index`` (downcast) is this scorer's structure."""
        raise NotImplementedError

    # -- search ----------------------------------------------------------------------------
    def search(self, queries: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """Best ``m`` prototypes per query.

        Args:
            queries: ``[B, D]`` float32, L2-normalised.
            m: shortlist length.
        Returns:
            scores: ``[B, m]`` float32 cosines, descending (-inf on padding).
            ids: ``[B, m]`` int64 prototype rows (-1 on padding).
        """
        n = len(queries)
        dist = np.empty((n, m), dtype=np.float32)
        ids = np.empty((n, m), dtype=np.int64)
        sp = faiss.swig_ptr  # search_c: the numpy wrapper's checks and copies cost more than a small search
        self.index.search_c(n, sp(np.ascontiguousarray(queries, dtype=np.float32)), m, sp(dist), sp(ids), self.cached_params(m))
        scores = self.to_cosine(dist)
        scores[ids < 0] = -np.inf
        return scores, ids

    def params(self, m: int) -> faiss.SearchParameters | None:
        """Per-call search parameters for a shortlist of ``m`` (None: the index's own)."""
        return None

    def to_cosine(self, dist: np.ndarray) -> np.ndarray:
        """FAISS distances ``[B, m]`` -> cosines ``[B, m]`` float32 (identity for inner products)."""
        return dist

    # -- contents ----------------------------------------------------------------------------
    def flat_storage(self) -> faiss.IndexFlat | None:
        """The exact float32 copy of the prototypes inside the scorer's index (None: there is none)."""
        return self.index

    def prototypes(self) -> np.ndarray:
        """``[P, D]`` float32 prototypes, read-only use: a view of the flat storage (no copy), or
        one reconstructed copy kept for later calls when the index stores codes only."""
        if self._protos is None:
            flat = self.flat_storage()
            if flat is None:
                self._protos = self.index.reconstruct_n(0, self.index.ntotal)
            else:
                flat = faiss.downcast_index(flat)
                self._protos = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
        return self._protos

    def memory_bytes(self) -> int:
        """Bytes held: the float32 prototypes plus the scorer's own structure."""
        return int(self.index.ntotal) * int(self.index.d) * 4

    def to_gpu(self, resources) -> GpuExactScorer:  # pragma: no cover - needs a GPU
        """GPU variant; default: exact cosine over all prototypes (the answers of ``flat``)."""
        return GpuExactScorer(resources, self.prototypes())


class GpuExactScorer:  # pragma: no cover - needs a CUDA build of faiss and a GPU
    """Exact scoring on GPU 0 (``GpuIndexFlatIP``); same interface as :meth:`CellScorer.search`.

    Approximate CPU scorers (LSH, HNSW) fall back to this: exact, so at least as good a shortlist.
    """

    def __init__(self, resources, prototypes: np.ndarray) -> None:
        self.index = faiss.GpuIndexFlatIP(resources, prototypes.shape[1])
        self.index.add(np.ascontiguousarray(prototypes))

    def search(self, queries: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.index.search(queries, min(m, GPU_MAX_K))
        if scores.shape[1] < m:
            pad = m - scores.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        scores[ids < 0] = -np.inf
        return scores, ids


@register_scorer("flat")
class FlatScorer(CellScorer):
    """Exact: every prototype's inner product (``IndexFlatIP``). Time grows with ``P``."""

    @classmethod
    def empty(cls, d: int, config: IndexConfig) -> faiss.Index:
        return faiss.IndexFlatIP(d)

    @classmethod
    def owns(cls, index: faiss.Index) -> bool:
        return isinstance(index, faiss.IndexFlat) and index.metric_type == faiss.METRIC_INNER_PRODUCT


@register_scorer("lsh")
class LSHScorer(CellScorer):
    """Binary codes shortlist, exact re-rank: ``IndexRefineFlat(IndexLSH)``.

    ``IndexLSH`` (random rotation + sign bits, ``config.lsh_bits`` bits, 0 = max(256, D)) ranks
    prototypes by Hamming distance; the best ``config.lsh_k_factor * m`` are re-ranked by exact
    L2, which on unit vectors is ``2 - 2 cos``: the returned scores are exact cosines.
    """

    search_keys = ("lsh_k_factor",)

    @classmethod
    def empty(cls, d: int, config: IndexConfig) -> faiss.Index:
        bits = int(config.lsh_bits) or max(256, d)
        lsh = faiss.IndexLSH(d, bits, True, True)
        q = faiss.IndexRefineFlat(lsh)
        lsh.this.disown()  # the refine index owns (and frees) the LSH index from now on
        q.own_fields = True
        q.k_factor = float(config.lsh_k_factor)  # stored default; searches pass their own
        return q

    @classmethod
    def owns(cls, index: faiss.Index) -> bool:
        return isinstance(index, faiss.IndexRefine) and isinstance(faiss.downcast_index(index.base_index), faiss.IndexLSH)

    def params(self, m: int) -> faiss.SearchParameters:
        return faiss.IndexRefineSearchParameters(k_factor=_capped_k_factor(float(self.config.lsh_k_factor), m, self.index.ntotal))

    def to_cosine(self, dist: np.ndarray) -> np.ndarray:
        return 1.0 - 0.5 * dist  # |a - b|^2 = 2 - 2 cos for unit vectors

    def flat_storage(self) -> faiss.IndexFlat:
        return self.index.refine_index

    def memory_bytes(self) -> int:
        lsh = faiss.downcast_index(self.index.base_index)
        return super().memory_bytes() + int(self.index.ntotal) * int(lsh.code_size)


@register_scorer("hnsw")
class HNSWScorer(CellScorer):
    """Graph search over the prototypes (``IndexHNSWFlat``, inner product, ``config.hnsw_m`` links).

    Per call ``efSearch = max(config.hnsw_ef_search, m)``. Scores are exact cosines of the
    prototypes found; a prototype the graph misses is not returned.
    """

    search_keys = ("hnsw_ef_search",)

    @classmethod
    def empty(cls, d: int, config: IndexConfig) -> faiss.Index:
        q = faiss.IndexHNSWFlat(d, int(config.hnsw_m), faiss.METRIC_INNER_PRODUCT)
        q.hnsw.efSearch = int(config.hnsw_ef_search)  # stored default; searches pass their own
        return q

    @classmethod
    def owns(cls, index: faiss.Index) -> bool:
        return isinstance(index, faiss.IndexHNSW)

    def params(self, m: int) -> faiss.SearchParameters:
        return faiss.SearchParametersHNSW(efSearch=max(int(self.config.hnsw_ef_search), m))

    def flat_storage(self) -> faiss.IndexFlat:
        return self.index.storage

    def memory_bytes(self) -> int:
        m = int(self.index.hnsw.nb_neighbors(0)) // 2
        return super().memory_bytes() + int(self.index.ntotal) * (m * 2 * 4 + 16)  # level-0 links dominate


def _capped_k_factor(k_factor: float, m: int, p: int) -> float:
    """``k_factor`` lowered so that the shortlist ``k_factor * m`` holds at most all ``p`` prototypes
    (FAISS's refine step would read the padding of a longer one)."""
    return max(1.0, min(k_factor, p / max(1, m)))


def _refine_over(base: faiss.Index, k_factor: float) -> faiss.IndexRefineFlat:
    """``IndexRefineFlat(base)`` owning ``base``: codes shortlist, exact inner-product re-rank."""
    q = faiss.IndexRefineFlat(base)
    base.this.disown()  # the refine index owns (and frees) the base index from now on
    q.own_fields = True
    q.k_factor = float(k_factor)  # stored default; searches pass their own
    return q


class _CodesShortlist(CellScorer):
    """Compressed codes scanned with SIMD for a shortlist of ``scorer_k_factor * m`` prototypes,
    re-ranked exactly (``IndexRefineFlat``: the returned scores are exact cosines)."""

    search_keys = ("scorer_k_factor",)
    base_type: ClassVar[type] = faiss.Index

    @classmethod
    def owns(cls, index: faiss.Index) -> bool:
        return isinstance(index, faiss.IndexRefine) and isinstance(faiss.downcast_index(index.base_index), cls.base_type)

    def params(self, m: int) -> faiss.SearchParameters:
        return faiss.IndexRefineSearchParameters(k_factor=_capped_k_factor(float(self.config.scorer_k_factor), m, self.index.ntotal))

    def flat_storage(self) -> faiss.IndexFlat:
        return self.index.refine_index

    def memory_bytes(self) -> int:
        base = faiss.downcast_index(self.index.base_index)
        return super().memory_bytes() + int(self.index.ntotal) * int(base.code_size)


@register_scorer("sq8")
class SQ8Scorer(_CodesShortlist):
    """8-bit scalar-quantized prototypes (``IndexScalarQuantizer`` QT_8bit, D bytes each, SIMD
    scan) shortlist ``scorer_k_factor * m`` prototypes, re-ranked by exact cosine."""

    base_type = faiss.IndexScalarQuantizer

    @classmethod
    def empty(cls, d: int, config: IndexConfig) -> faiss.Index:
        sq = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        return _refine_over(sq, config.scorer_k_factor)


@register_scorer("pqfs")
class PQFastScanScorer(_CodesShortlist):
    """4-bit product-quantized prototypes scanned in SIMD registers (``IndexPQFastScan``,
    ``pqfs_m`` sub-quantizers, 0 = D/2: D/4 bytes each) shortlist ``scorer_k_factor * m``
    prototypes, re-ranked by exact cosine."""

    base_type = faiss.IndexPQFastScan

    @classmethod
    def empty(cls, d: int, config: IndexConfig) -> faiss.Index:
        m = int(config.pqfs_m) or max(2, d // 2)
        m = max(1, min(m, d))
        while d % m:
            m -= 1
        pq = faiss.IndexPQFastScan(d, m, 4, faiss.METRIC_INNER_PRODUCT)
        pq.pq.cp.niter = 10  # 16 centroids per sub-quantizer: short k-means on a sample is enough
        pq.pq.cp.max_points_per_centroid = 64
        return _refine_over(pq, config.scorer_k_factor)


@register_scorer("twolevel")
class TwoLevelScorer(CellScorer):
    """Two levels: the prototypes are grouped into coarse regions (k-means over the prototypes,
    ``twolevel_regions``, 0 = 2 sqrt(P)); a query scores the region centres first and then,
    exactly, only the prototypes inside its best ``twolevel_probe`` regions (``IndexIVFFlat`` over
    the prototypes, per-call ``nprobe``). Scores are exact cosines of the prototypes found.

    Regions are clusters in descriptor space, not geographic L x L blocks of cells: the scorer
    sees only the prototypes (the grid positions live in the cell table), and descriptor-space
    regions group what a query can confuse, which geographic blocks do not.
    """

    search_keys = ("twolevel_probe",)

    @classmethod
    def empty(cls, d: int, config: IndexConfig) -> faiss.Index:
        return cls.empty_for(d, config, 0)

    @classmethod
    def empty_for(cls, d: int, config: IndexConfig, n_prototypes: int) -> faiss.Index:
        regions = int(config.twolevel_regions) or max(1, int(2 * np.sqrt(max(1, n_prototypes))))
        regions = max(1, min(regions, max(1, n_prototypes)))
        centres = faiss.IndexFlatIP(d)
        q = faiss.IndexIVFFlat(centres, d, regions, faiss.METRIC_INNER_PRODUCT)
        centres.this.disown()  # the IVF owns (and frees) its region centres from now on
        q.own_fields = True
        q.cp.min_points_per_centroid = 1
        q.cp.max_points_per_centroid = 32  # k-means on a sample: cheap at 10^6 prototypes
        q.cp.niter = 10
        return q

    @classmethod
    def make(cls, prototypes: np.ndarray, config: IndexConfig) -> faiss.Index:
        q = super().make(prototypes, config)
        q.make_direct_map()  # prototypes() reconstructs rows
        return q

    @classmethod
    def owns(cls, index: faiss.Index) -> bool:
        return isinstance(index, faiss.IndexIVFFlat)

    def params(self, m: int) -> faiss.SearchParameters:
        return faiss.SearchParametersIVF(nprobe=min(int(self.config.twolevel_probe), int(self.index.nlist)))

    def flat_storage(self) -> None:
        return None

    def prototypes(self) -> np.ndarray:
        if self._protos is None:
            if self.index.direct_map.type == faiss.DirectMap.NoMap:
                self.index.make_direct_map()
            self._protos = self.index.reconstruct_n(0, self.index.ntotal)
        return self._protos

    def memory_bytes(self) -> int:
        return super().memory_bytes() + int(self.index.ntotal) * 8 + int(self.index.nlist) * int(self.index.d) * 4


def inner_products(x: np.ndarray, ix: np.ndarray, y: np.ndarray, iy: np.ndarray) -> np.ndarray:
    """``[n]`` float32 inner products ``x[ix[j]] . y[iy[j]]``, computed by FAISS's own SIMD kernel
    (``pairwise_indexed_inner_product``: the values ``IndexFlatIP`` gives, bit for bit, so a cell
    scored here and the same cell scored by the flat scorer agree exactly)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.float32)
    ix = np.ascontiguousarray(ix, dtype=np.int64)
    iy = np.ascontiguousarray(iy, dtype=np.int64)
    out = np.empty(len(ix), dtype=np.float32)
    sp = faiss.swig_ptr
    faiss.pairwise_indexed_inner_product(x.shape[1], len(ix), sp(x), sp(ix), sp(y), sp(iy), sp(out))
    return out


DENSE_MAX_PROTOTYPES = 4096
"""Up to this many prototypes, a flat scorer on CPU scores every cell at once (:class:`DenseCells`)..."""
DENSE_MAX_BATCH = 19
"""... for batches up to this size; from 20 queries on FAISS's flat search multiplies matrices
(BLAS), reading the prototypes once for the whole batch, which a per-query pass cannot match
(batch 256 on the demo bundle: 7.6 against 27 us per query, timed once inline when this limit was
set; ``benchmarks/overhead.py --bundle`` times the batch-1 path)."""


class DenseCells:
    """Every cell's exact score at once, for a flat scorer over at most :data:`DENSE_MAX_PROTOTYPES`
    prototypes with several per cell, on CPU (a city: the demo has 252 cells x 4 sub-centres; with
    one prototype per cell the shortlist path has no per-cell step to save and stays faster).

    One pass of FAISS's inner-product kernel over all prototypes per query (the values the flat
    scorer's ``IndexFlatIP`` gives, bit for bit), the cell maximum through the ``[C, K]``
    prototype table, the top cells by one sort; the neighbour ring's cell scores for fusion are
    then a lookup. At this size it replaces the shortlist search, its distinct-cell step and the
    re-scoring of the ring's cells, which cost more in numpy calls than in arithmetic
    (``benchmarks/overhead.py --bundle indexes/demo``: ``CellIndex.search`` 270-284 -> 167-181 us
    per query, with the one-query paths of the same change). Answers equal the
    shortlist path's bit for bit (tested); only cells whose scores tie exactly may come in another
    order (here the lower cell id first).
    """

    def __init__(self, prototypes: np.ndarray, cells: PrototypeCells) -> None:
        self.prototypes = np.ascontiguousarray(prototypes, dtype=np.float32)
        self.table = np.where(cells.table >= 0, cells.table, len(self.prototypes))  # padding -> a -inf column

    def all_scores(self, queries: np.ndarray) -> np.ndarray:
        """``[B, D]`` queries -> ``[B, C]`` float32 exact cell scores (best cosine over each cell's prototypes)."""
        p, d = self.prototypes.shape
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        out = np.empty((len(queries), p + 1), dtype=np.float32)
        out[:, p] = -np.inf
        sp = faiss.swig_ptr
        for i in range(len(queries)):  # one kernel call per query (at most DENSE_MAX_BATCH)
            faiss.fvec_inner_products_ny(sp(out[i]), sp(queries[i]), sp(self.prototypes), d, p)
        return out[:, self.table].max(axis=2)

    @staticmethod
    def top(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``[B, C]`` cell scores -> the best ``k``: ``[B, k]`` scores (descending; ties: lower cell
        id first) and cell ids, -inf / -1 padded when ``k > C``."""
        b, c = scores.shape
        ids = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # C <= 2,048 here: one sort beats select + sort
        top = scores[np.arange(b)[:, None], ids]
        if c < k:
            ids = np.pad(ids, ((0, 0), (0, k - c)), constant_values=-1)
            top = np.pad(top, ((0, 0), (0, k - c)), constant_values=-np.inf)
        return top, ids


class PrototypeCells:
    """Which cell each of the ``P`` prototypes belongs to, and cell scores from prototype scores.

    Args:
        prototype_cells: ``[P]`` int64 cell of each prototype, every cell ``0..C-1`` present; None
            means ``P == C`` and prototype ``c`` is cell ``c`` (one prototype per cell).
        p: number of prototypes P.
    Attributes:
        n_cells: C. per_cell: the most prototypes any cell has (1 for None).
        table: ``[C, per_cell]`` int64 prototype rows of each cell, -1 padded.
    """

    def __init__(self, prototype_cells: np.ndarray | None, p: int) -> None:
        self.identity = prototype_cells is None
        if prototype_cells is None:
            self.cells = np.arange(p, dtype=np.int64)
            self.n_cells, self.per_cell = p, 1
            self.table = self.cells[:, None]
            return
        self.cells = np.ascontiguousarray(prototype_cells, dtype=np.int64)
        self.n_cells = int(self.cells.max()) + 1
        counts = np.bincount(self.cells, minlength=self.n_cells)
        self.per_cell = int(counts.max())
        order = np.argsort(self.cells, kind="stable")
        starts = np.cumsum(counts) - counts
        rank = np.arange(p) - starts[self.cells[order]]
        self.table = np.full((self.n_cells, self.per_cell), -1, dtype=np.int64)
        self.table[self.cells[order], rank] = order

    def shortlist(self, k: int) -> int:
        """Prototypes to fetch so that the top ``k`` distinct cells are among them (exact for flat).

        The k-th best cell's best prototype ranks at most ``(k - 1) * per_cell + 1``.
        """
        return k if self.identity else min(len(self.cells), k * self.per_cell)

    def top_cells(self, scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Distinct best cells from a descending prototype shortlist.

        Args:
            scores: ``[B, m]`` float32 prototype cosines, descending; ids: ``[B, m]`` int64 rows (-1 pad).
            k: cells wanted.
        Returns:
            scores: ``[B, k]`` float32 cell score (best prototype), descending, -inf padded.
            ids: ``[B, k]`` int64 cell ids, -1 padded.
        """
        if self.identity:
            return scores, ids
        if len(ids) == 1:
            return self._top_cells_one(scores, ids, k)
        return self._top_cells_vectorised(scores, ids, k)

    def _top_cells_one(self, scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`top_cells` of one query (the usual engine call): a dict keeps each cell's first
        (best) shortlist position; a handful of numpy calls instead of two dozen."""
        first: dict[int, int] = {}
        for j, (row, cell) in enumerate(zip(ids[0].tolist(), self.cells[np.maximum(ids[0], 0)].tolist(), strict=True)):
            if row >= 0 and cell not in first:
                first[cell] = j
                if len(first) == k:
                    break
        out_ids = np.full((1, k), -1, dtype=np.int64)
        out_scores = np.full((1, k), -np.inf, dtype=np.float32)
        out_ids[0, : len(first)] = list(first)
        out_scores[0, : len(first)] = scores[0, list(first.values())]
        return out_scores, out_ids

    def _top_cells_vectorised(self, scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`top_cells` for any batch (the reference the one-query path is tested against)."""
        cells = np.where(ids >= 0, self.cells[np.maximum(ids, 0)], -1)
        pos = distinct_positions(cells)[:, :k]
        if pos.shape[1] < k:
            pos = np.pad(pos, ((0, 0), (0, k - pos.shape[1])), constant_values=-1)
        ok = pos >= 0
        safe = np.maximum(pos, 0)
        out_ids = np.where(ok, np.take_along_axis(cells, safe, 1), -1)
        out_scores = np.where(ok, np.take_along_axis(scores, safe, 1), -np.inf).astype(np.float32)
        return out_scores, out_ids

    def exact_scores(self, queries: np.ndarray, cells: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
        """Exact cell scores: for each query and cell, the best cosine over the cell's prototypes.

        Args:
            queries: ``[B, D]`` float32. cells: ``[B, W]`` int64, -1 = none. prototypes: ``[P, D]``.
        Returns:
            ``[B, W]`` float32, -inf where ``cells`` is -1.
        """
        b, w = cells.shape
        out = np.full((b, w), -np.inf, dtype=np.float32)
        qi, wi = np.nonzero(cells >= 0)  # only the (query, cell) pairs asked for
        if not len(qi):
            return out
        rows = self.table[cells[qi, wi]]  # [n, K]
        ok = rows >= 0
        sims = np.full(rows.shape, -np.inf, dtype=np.float32)
        sims[ok] = inner_products(queries, np.broadcast_to(qi[:, None], rows.shape)[ok], prototypes, rows[ok])
        out[qi, wi] = sims.max(axis=1)
        return out
