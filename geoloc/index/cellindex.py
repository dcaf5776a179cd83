"""``CellIndex``: the lists, a cell scorer, exact retrieve over the lists and the GPU mirror behind one API.

The layout is explained in the package docstring (:mod:`geoloc.index`).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib import ivf_tools

from geoloc.config import MODES, IndexConfig
from geoloc.errors import BundleError
from geoloc.index import lists as L
from geoloc.index.checks import (
    check_cells,
    check_k,
    check_matrix,
    check_neighbours,
    check_prototype_cells,
)
from geoloc.index.gpu import GpuMirror, gpu_available
from geoloc.index.io import load_index, save_index
from geoloc.index.result import SearchResult, SearchTimes
from geoloc.index.retrieve import FlatView, ListScan, RefineStore
from geoloc.index.scorers import (
    DENSE_MAX_BATCH,
    DENSE_MAX_PROTOTYPES,
    SCORERS,
    DenseCells,
    FlatScorer,
    PrototypeCells,
    resolve_scorer_name,
    scorer_for_index,
)
from geoloc.index.shards import ShardSet, plan_shards

__all__ = ["MODES", "CellIndex"]


class CellIndex:
    """Cell-partitioned database index (layout: the :mod:`geoloc.index` docstring).

    Build with :meth:`build` or :meth:`load`; query with :meth:`search`. Thread-safe for
    concurrent :meth:`search` calls (no index-wide state is written after construction).
    """

    REFINE_FILE = "refine.faiss"
    """Re-ranking store of compressed lists (``index.refine``), written beside ``index.faiss``."""

    def __init__(self, ivf: faiss.IndexIVF, *, neighbours: np.ndarray | None, config: IndexConfig,
                 prototype_cells: np.ndarray | None = None, refine: RefineStore | None = None,
                 shards: ShardSet | None = None) -> None:
        self._ivf_owner = ivf  # the proxy that owns the C++ index (a downcast proxy does not)
        self._ivf = faiss.downcast_index(ivf)
        self._codec = L.codec_of(self._ivf)
        self._shards = shards  # sharded: the lists live in the shards (geoloc.index.shards), ivf's are empty
        # plain ints: a SWIG attribute read costs microseconds per call, and nothing changes after build
        n = shards.ntotal if shards is not None else int(self._ivf.ntotal)
        self._n, self._c, self._d = n, int(self._ivf.nlist), int(self._ivf.d)
        self._refine = refine if self._codec != "flat" else None
        self._config = config
        self._neighbours = neighbours
        scorer_cls = scorer_for_index(ivf.quantizer)
        if scorer_cls is None:
            raise ValueError(f"no registered cell scorer recognises a {type(faiss.downcast_index(ivf.quantizer)).__name__}")
        self._scorer = scorer_cls(ivf.quantizer, config)
        self._cells = PrototypeCells(prototype_cells, int(ivf.quantizer.ntotal))
        self._sizes: np.ndarray | None = None  # [C + 1] list sizes (+ a 0 for list -1), made at the first hybrid
        self._gpu: GpuMirror | None = None
        if self._codec == "flat" and shards is None and gpu_available(config):  # pragma: no cover - needs a GPU
            self._gpu = GpuMirror(self._ivf, self._scorer, self._scorer.prototypes()[self._cells.table[:, 0]])
        self._scan = ListScan(self._ivf, int(config.retrieve_blas_min_batch))
        # several sub-centres per cell, few prototypes, flat, CPU: every cell scored at once (DenseCells)
        dense = (not self._cells.identity and isinstance(self._scorer, FlatScorer) and self._gpu is None
                 and int(ivf.quantizer.ntotal) <= DENSE_MAX_PROTOTYPES)
        self._dense = DenseCells(self._scorer.prototypes(), self._cells) if dense else None
        # GPU only: an exact copy in GPU memory (host RAM keeps the lists once)
        self._flat = FlatView(lambda: self.vectors()[0], self._gpu.flat_index_factory(self.dim)) if self._gpu else None

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def build(cls, *, descriptors: np.ndarray, cells: np.ndarray, prototypes: np.ndarray,
              prototype_cells: np.ndarray | None = None, neighbours: np.ndarray | None = None,
              config: IndexConfig, cell_order: np.ndarray | None = None) -> CellIndex:
        """File every database descriptor under its cell and index the prototypes for scoring.

        Args:
            descriptors: ``[N, D]`` float32, L2-normalised; row ``i`` gets id ``i``.
            cells: ``[N]`` int64 cell id (``0..C-1``) each row is filed under.
            prototypes: ``[P, D]`` float32, L2-normalised cell prototypes (sub-centres).
            prototype_cells: ``[P]`` int64 cell of each prototype; ``C = max + 1`` and every cell
                needs one. None: ``P == C`` and row ``c`` is cell ``c``'s only prototype.
            neighbours: ``[C, 8]`` int64 ids of each cell's 8 surrounding cells (-1 = none), e.g.
                :meth:`geoloc.cells.CellTable.neighbours`; needed for ``neighbours=True`` searches.
            config: cell scorer choice and parameters, GPU use, ``shards``.
            cell_order: ``[C]`` int64 geographic order of the cells that ``index.shards > 1`` cuts into
                shards (:func:`geoloc.index.shards.plan_shards`); None = cell-id order (zone, easting, northing).
        Raises:
            ValueError: on wrong shapes, dtypes, un-normalised rows or cell ids out of range.
        """
        prototypes = check_matrix("prototypes", prototypes, normalised=True)
        p, d = prototypes.shape
        if p == 0:
            raise ValueError("prototypes is empty: the index needs at least one cell")
        prototype_cells, c = check_prototype_cells(prototype_cells, p)
        descriptors = check_matrix("descriptors", descriptors, d, normalised=True)
        cells = check_cells("cells", cells, descriptors.shape[0], c, "descriptor")
        neighbours = check_neighbours(neighbours, c)
        scorer_cls = SCORERS[resolve_scorer_name(config, p)]
        codec = str(config.codec)
        ivf = L.make_ivf(scorer_cls.make(prototypes, config), descriptors, cells, c, codec=codec, pq_m=int(config.pq_m))
        refine = None
        if codec != "flat" and config.refine != "none":
            refine = RefineStore.build(str(config.refine), descriptors)
        return cls(ivf, neighbours=neighbours, config=config, prototype_cells=prototype_cells, refine=refine,
                   shards=cls._split(ivf, config, cell_order))

    @classmethod
    def build_chunked(cls, *, chunks: Iterable[tuple[np.ndarray, np.ndarray]], train_sample: np.ndarray,
                      prototypes: np.ndarray, prototype_cells: np.ndarray | None = None,
                      neighbours: np.ndarray | None = None, config: IndexConfig,
                      cell_order: np.ndarray | None = None) -> CellIndex:
        """:meth:`build` from database chunks, so that the float32 database never has to be in memory
        at once (e.g. 10^7 rows with ``index.codec: sq8`` or ``pq``).

        Args:
            chunks: ``(descriptors [n_i, D] float32 L2-normalised, cells [n_i] int64)`` pairs; rows get
                ids in the order given (the first chunk's rows are 0..n_0-1, and so on).
            train_sample: ``[S, D]`` float32 rows the sq8/pq encoders (and a sq8 refine store) are trained
                on, e.g. a random sample of the database (ignored by the flat codec).
            prototypes, prototype_cells, neighbours, config, cell_order: as in :meth:`build`.
        Equals :meth:`build` over the concatenated chunks when ``train_sample`` is the sample
        :meth:`build` draws (``geoloc.index.lists.training_sample``).
        """
        prototypes = check_matrix("prototypes", prototypes, normalised=True)
        p, d = prototypes.shape
        if p == 0:
            raise ValueError("prototypes is empty: the index needs at least one cell")
        prototype_cells, c = check_prototype_cells(prototype_cells, p)
        neighbours = check_neighbours(neighbours, c)
        codec = str(config.codec)
        ivf = L.empty_ivf(SCORERS[resolve_scorer_name(config, p)].make(prototypes, config), d, c, codec=codec,
                          pq_m=int(config.pq_m))
        train_sample = check_matrix("train_sample", train_sample, d)
        if codec != "flat":
            L.train_codec(ivf, train_sample)
        store = None
        if codec != "flat" and config.refine != "none":
            store = RefineStore.empty_index(str(config.refine), d, train_sample)
        n = 0
        for x, cells in chunks:
            x = check_matrix("descriptors", x, d, normalised=True)
            cells = check_cells("cells", cells, len(x), c, "descriptor")
            L.add_rows(ivf, x, cells, n)
            if store is not None:
                store.add(x)
            n += len(x)
        return cls(ivf, neighbours=neighbours, config=config, prototype_cells=prototype_cells,
                   refine=None if store is None else RefineStore(store), shards=cls._split(ivf, config, cell_order))

    @staticmethod
    def _split(ivf: faiss.IndexIVF, config: IndexConfig, order: np.ndarray | None) -> ShardSet | None:
        """``index.shards > 1``: move the filled lists of ``ivf`` into geographic shards."""
        if int(getattr(config, "shards", 1)) <= 1:
            return None
        owner = plan_shards(L.list_sizes(ivf)[:-1], int(config.shards), order=order)
        return ShardSet.split(ivf, owner, blas_min_batch=int(config.retrieve_blas_min_batch))

    @classmethod
    def load(cls, folder: Path, *, config: IndexConfig) -> CellIndex:
        """Read a folder written by :meth:`save`.

        The cell scorer follows ``config``: when it asks for another scorer than the stored one,
        the scorer is rebuilt from the stored prototypes (``ivf_tools.replace_ivf_quantizer``; cheap).

        Raises:
            BundleError: one line naming the file when it is missing, truncated or not a cell index.
        """
        ivf, neighbours, prototype_cells = load_index(folder)
        stored = scorer_for_index(ivf.quantizer)
        if stored is None:
            q = faiss.downcast_index(ivf.quantizer)
            raise BundleError(f"{Path(folder) / 'index.faiss'}: unknown cell scorer {type(q).__name__}; rebuild the bundle")
        wanted = SCORERS[resolve_scorer_name(config, int(ivf.quantizer.ntotal))]
        if wanted is not stored:
            # an empty new quantizer is trained and filled with the stored prototypes
            ivf_tools.replace_ivf_quantizer(ivf, wanted.empty_for(int(ivf.d), config, int(ivf.quantizer.ntotal)))
        shards = ShardSet.load(folder, main=faiss.downcast_index(ivf), blas_min_batch=int(config.retrieve_blas_min_batch),
                               mmap=bool(getattr(config, "mmap", True)))
        rows = shards.ntotal if shards is not None else int(ivf.ntotal)
        refine = None
        rpath = Path(folder) / cls.REFINE_FILE
        if rpath.is_file():
            try:
                refine = RefineStore(faiss.read_index(str(rpath)))
            except (RuntimeError, MemoryError):
                raise BundleError(f"{rpath}: re-ranking store is truncated or corrupt; rebuild the bundle") from None
            if refine.index.ntotal != rows or refine.index.d != ivf.d:
                raise BundleError(f"{rpath}: holds {refine.index.ntotal} rows of {refine.index.d} dims but the lists hold "
                                  f"{rows} of {ivf.d}; rebuild the bundle")
        return cls(ivf, neighbours=neighbours, config=config, prototype_cells=prototype_cells, refine=refine,
                   shards=shards)

    def tuned(self, **search_params: float) -> CellIndex:
        """This index with other per-call search parameters of its cell scorer (e.g.
        ``hnsw_ef_search=64`` or ``lsh_k_factor=32``): the lists, the scorer's structure, the
        retrieve view and the GPU mirror are shared (nothing is copied), and both indexes may be
        searched at once.

        Raises:
            ValueError: a key that is not a per-call parameter of this index's scorer.
        """
        allowed = type(self._scorer).search_keys
        bad = sorted(set(search_params) - set(allowed))
        if bad:
            raise ValueError(f"{', '.join(bad)}: not a per-call parameter of the {self.quantizer_kind} cell scorer "
                             f"(it has: {', '.join(allowed) or 'none'})")
        twin = copy.copy(self)
        twin._config = dataclasses.replace(self._config, **search_params)
        twin._scorer = type(self._scorer)(self._ivf.quantizer, twin._config)
        return twin

    def save(self, folder: Path) -> list[Path]:
        """Write ``index.faiss`` (+ ``cell_neighbours.npy``, ``prototype_cells.npy`` when present; sharded:
        + ``shard_cells.npy`` and ``shard-NNNN.faiss``, :mod:`geoloc.index.shards`).

        Returns the paths written. No pickle: ``faiss.write_index`` and ``np.save(allow_pickle=False)``.
        """
        pc = None if self._cells.identity else self._cells.cells
        written = save_index(folder, self._ivf, neighbours=self._neighbours, prototype_cells=pc)
        rpath = Path(folder) / self.REFINE_FILE
        if self._refine is not None:
            faiss.write_index(self._refine.index, str(rpath))
            written.append(rpath)
        elif rpath.exists():
            rpath.unlink()
        if self._shards is not None:
            written += self._shards.save(folder)
        else:
            ShardSet.remove_files(folder)
        return written

    # -- properties -----------------------------------------------------------------------
    @property
    def on_gpu(self) -> bool:
        """True when searches run on a GPU."""
        return self._gpu is not None

    @property
    def ntotal(self) -> int:
        """Number of database vectors N."""
        return self._n

    @property
    def nlist(self) -> int:
        """Number of cells C (inverted lists)."""
        return self._c

    @property
    def dim(self) -> int:
        """Descriptor dimension D."""
        return self._d

    @property
    def quantizer_kind(self) -> str:
        """Registered name of the cell scorer used on CPU ('flat', 'lsh', 'hnsw', ...)."""
        return self._scorer.name

    @property
    def neighbours(self) -> np.ndarray | None:
        """``[C, 8]`` int64 neighbour table or None."""
        return self._neighbours

    @property
    def prototype_cells(self) -> np.ndarray:
        """``[P]`` int64 cell of each prototype (``arange(C)`` with one prototype per cell)."""
        return self._cells.cells

    @property
    def codec(self) -> str:
        """Storage of the lists: 'flat', 'sq8' or 'pq' (``index.codec`` at build)."""
        return self._codec

    @property
    def refine_kind(self) -> str:
        """Re-ranking store of compressed lists: 'none', 'sq8' or 'flat'."""
        return "none" if self._refine is None else self._refine.kind

    @property
    def faiss_index(self) -> faiss.IndexIVF:
        """The CPU ``IndexIVFFlat`` (read-only use: do not set ``nprobe``; its quantizer holds the
        P prototypes, so ``faiss_index.search`` is meaningless when P != C: use :meth:`search_lists`).
        Sharded: its lists are empty; the rows are in :attr:`shards`."""
        return self._ivf

    @property
    def shards(self) -> ShardSet | None:
        """The geographic shards holding the lists (``index.shards > 1``), or None for one index."""
        return self._shards

    @property
    def n_shards(self) -> int:
        """Shards of the lists (1 when unsharded)."""
        return 1 if self._shards is None else len(self._shards)

    def reopen_shards(self, *, drop_cache: bool = False) -> None:
        """Close the memory-mapped shard files and open them again (not while searches run).

        ``drop_cache``: between the two, ask the kernel to drop the files' cached pages
        (``POSIX_FADV_DONTNEED``; a page still mapped cannot be dropped, hence the close), so the
        next searches read from disk: a cold-cache measurement. No-op for an unsharded index.
        """
        if self._shards is None or not self._shards.paths:
            return
        folder = self._shards.paths[0].parent
        paths = list(self._shards.paths)
        self._shards = None  # the last reference: the old mappings are unmapped here
        if drop_cache:
            ShardSet.drop_pages(paths)
        self._shards = ShardSet.load(folder, main=self._ivf, blas_min_batch=int(self._config.retrieve_blas_min_batch),
                                     mmap=True)
        # list sizes now, not in the next search: one SWIG call per list (~0.1 s at 10^5 cells, no disk read)
        self._sizes = self._shards.list_sizes()

    def shards_touched(self, lists: np.ndarray) -> np.ndarray:
        """``[B]`` int64 shards searched for the lists ``[B, W]`` (a hybrid result's ``lists``); 1 per
        query unsharded (retrieve, whose ``lists`` are ``[B, 0]``: every shard)."""
        lists = np.asarray(lists, np.int64)
        if lists.shape[1] == 0:
            return np.full(len(lists), self.n_shards, np.int64)
        if self._shards is None:
            return (lists >= 0).any(axis=1).astype(np.int64)
        return self._shards.shards_touched(lists)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held in host RAM: ``lists`` (codes + 8-byte ids), ``quantizer`` (the cell scorer),
        ``refine`` (re-ranking store, 0 without), ``flat_view`` (always 0: retrieve reads the lists;
        the GPU path's exact copy lives in GPU memory). Memory-mapped shards' ``lists`` are file pages
        the kernel caches and evicts, not process memory."""
        return {"lists": self.ntotal * (int(self._ivf.code_size) + 8), "quantizer": self._scorer.memory_bytes(),
                "refine": 0 if self._refine is None else self._refine.nbytes(), "flat_view": 0}

    def bytes_per_vector(self) -> float:
        """Host bytes per database vector: list codes + ids + re-ranking store (scorer excluded)."""
        m = self.memory_bytes()
        return (m["lists"] + m["refine"]) / max(1, self.ntotal)

    # -- contents -------------------------------------------------------------------------
    def cell_members(self, c: int) -> np.ndarray:
        """Row ids filed in cell ``c``; ``[n_c]`` int64."""
        if self._shards is not None:
            return self._shards.cell_members(c)
        return L.cell_members(self._ivf, c)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All database vectors in row-id order: ``[N, D]`` float32 and ``[N]`` int64 cell of each row."""
        if self._shards is not None:
            return self._shards.all_vectors(self._d)
        return L.all_vectors(self._ivf)

    def prototypes(self) -> np.ndarray:
        """Cell prototypes held by the scorer; ``[P, D]`` float32 copy (``P == C`` with one per cell)."""
        return np.array(self._scorer.prototypes())

    # -- search ---------------------------------------------------------------------------
    def score_cells(self, queries: np.ndarray, top_cells: int) -> tuple[np.ndarray, np.ndarray]:
        """Best distinct cells of each query; a cell's score is its best prototype's cosine.

        Args:
            queries: ``[B, D]`` float32, L2-normalised.
            top_cells: how many cells to return (k); more than C gives -1 padding.
        Returns:
            scores: ``[B, k]`` float32 cosine, descending (-inf on padding).
            ids: ``[B, k]`` int64 cell ids (-1 on padding).
        """
        queries = self._queries(queries)
        return self._score_cells(queries, check_k("top_cells", top_cells))[:2]

    def _queries(self, queries: np.ndarray) -> np.ndarray:
        """``check_matrix`` with a fast path for what a caller usually passes: a C-contiguous
        ``[B, D]`` float32 array (no conversion needed, so only the shape is read)."""
        if (type(queries) is np.ndarray and queries.dtype == np.float32 and queries.ndim == 2
                and queries.shape[1] == self._d and queries.flags.c_contiguous):
            return queries
        return check_matrix("queries", queries, self._d)

    def _score_cells(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Top ``k`` cells ``[B, k]`` (scores, ids), and every cell's score ``[B, C]`` when the
        index scores them all at once (:class:`DenseCells`, small batches; else None)."""
        if not len(queries):
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64), None
        if self._dense is not None and len(queries) <= DENSE_MAX_BATCH:
            every = self._dense.all_scores(queries)
            return (*self._dense.top(every, k), every)
        scorer = self._gpu.scorer if self._gpu is not None else self._scorer
        scores, ids = scorer.search(queries, self._cells.shortlist(k))
        return (*self._cells.top_cells(scores, ids, k), None)

    def search_lists(self, queries: np.ndarray, lists: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact search restricted to the given inverted lists (cells).

        Args:
            queries: ``[B, D]`` float32.
            lists: ``[B, W]`` int64 cell ids per query, -1 = skip; no repeats within a row, ``W <= C``.
            k: matches per query.
        Returns:
            scores: ``[B, k]`` float32 inner products, descending (-inf on padding).
            ids: ``[B, k]`` int64 row ids (-1 on padding).
        """
        if lists.shape[1] > self.nlist:
            raise ValueError(f"lists has {lists.shape[1]} columns but the index holds only {self.nlist} cells")
        if self._shards is not None:
            return self._shards.search(np.ascontiguousarray(queries, dtype=np.float32), np.asarray(lists, np.int64), k)
        return L.search_preassigned(self._gpu.ivf if self._gpu is not None else self._ivf, queries, lists, k)

    def drop_flat_view(self) -> None:
        """Free the GPU exact-retrieve copy (rebuilt at the next retrieve); nothing to free on CPU."""
        if self._flat is not None:  # pragma: no cover - needs a GPU
            self._flat.drop()

    def search(self, queries: np.ndarray, *, mode: str, top_cells: int = 5, k: int = 10, neighbours: bool = False,
               fusion_weight: float = 0.0) -> SearchResult:
        """Answer a batch of queries.

        Args:
            queries: ``[B, D]`` float32, L2-normalised.
            mode: ``"classify"`` (cells only), ``"retrieve"`` (exact over all N) or ``"hybrid"``
                (exact over the members of the top ``top_cells`` cells).
            top_cells: cells returned (classify) or searched (hybrid).
            k: database matches returned (retrieve/hybrid).
            neighbours: hybrid only: also search each top cell's ring of 8 neighbours.
            fusion_weight: hybrid only: rank candidates by ``inner product + fusion_weight x
                score of their cell`` (exact, not a re-rank); 0 = by inner product alone.
        Returns:
            :class:`SearchResult` with ``cell_ids``/``cell_scores`` ``[B, top_cells]`` (``[B, 0]``
            for retrieve) and ``ids``/``scores`` ``[B, k]`` (``[B, 0]`` for classify).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        queries = self._queries(queries)
        k = check_k("k", k)
        top_cells = check_k("top_cells", top_cells)
        w = float(fusion_weight)
        if not (np.isfinite(w) and w >= 0):
            raise ValueError(f"fusion_weight must be a finite number >= 0; got {fusion_weight!r}")
        if mode == "retrieve":
            return self._retrieve(queries, k)
        t0 = time.perf_counter()
        cs, ci, every = self._score_cells(queries, top_cells)
        t1 = time.perf_counter()
        if mode == "classify":
            b = len(queries)
            return SearchResult(ci, cs, np.empty((b, 0), np.int64), np.empty((b, 0), np.float32),
                                np.empty((b, 0), np.int64), np.zeros(b, np.int64), SearchTimes(cells_ms=(t1 - t0) * 1e3))
        return self._hybrid(queries, cs, ci, k, neighbours, w, t0, every)

    def _retrieve(self, queries: np.ndarray, k: int) -> SearchResult:
        b = len(queries)
        t0 = time.perf_counter()
        if self._flat is not None:  # pragma: no cover - needs a GPU
            self._flat.get()
        t1 = time.perf_counter()
        if self._flat is not None:  # pragma: no cover - needs a GPU
            scores, ids = self._flat.search(queries, k)
        elif self._refine is not None:
            _, cand = self._scan_all(queries, self._refine_width(k))
            scores, ids = self._refine.rerank(queries, cand, k)
        else:
            scores, ids = self._scan_all(queries, k)
        t2 = time.perf_counter()
        empty_i, empty_f = np.empty((b, 0), np.int64), np.empty((b, 0), np.float32)
        return SearchResult(empty_i, empty_f, ids, scores, empty_i, np.full(b, self.ntotal, np.int64),
                            SearchTimes(search_ms=(t2 - t1) * 1e3, prepare_ms=(t1 - t0) * 1e3))

    def _scan_all(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over every row (the lists in place; every shard, merged): ``[B, k]`` scores and ids."""
        if self._shards is not None:
            return self._shards.retrieve(queries, k)
        return self._scan.search(queries, k)

    def _hybrid(self, queries: np.ndarray, cs: np.ndarray, ci: np.ndarray, k: int, neighbours: bool,
                weight: float, t0: float, every: np.ndarray | None = None) -> SearchResult:
        if neighbours:
            if self._neighbours is None:
                raise ValueError("neighbours=True needs a neighbour table: build the index with neighbours=CellTable.neighbours()")
            lists = L.ring_lists(ci, self._neighbours, self.nlist)
        else:  # a top-k cell search returns distinct cells, -1 only as tail padding (k > C)
            lists = ci if ci.shape[1] <= self.nlist else ci[:, : self.nlist]
        bonus = weight * self._list_scores(queries, lists, cs, ci, every) if weight else None
        t1 = time.perf_counter()
        index = self._gpu.ivf if self._gpu is not None else self._ivf
        kk = k if self._refine is None else self._refine_width(k)
        if self._shards is not None:
            scores, ids = self._shards.search(queries, lists, kk, bonus)
        elif bonus is None:
            scores, ids = L.search_preassigned(index, queries, lists, kk)
        else:
            scores, ids = L.search_fused(index, queries, lists, bonus, kk)
        if self._refine is not None:
            scores, ids = self._rerank_fused(queries, ids, k, lists, bonus)
        t2 = time.perf_counter()
        return SearchResult(ci, cs, ids, scores, lists, self._scanned(lists),
                            SearchTimes(cells_ms=(t1 - t0) * 1e3, search_ms=(t2 - t1) * 1e3))

    def _refine_width(self, k: int) -> int:
        return max(k, int(np.ceil(k * float(self._config.refine_k_factor))))

    def _rerank_fused(self, queries: np.ndarray, cand: np.ndarray, k: int, lists: np.ndarray,
                      bonus: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Re-rank codec candidates ``[B, M]`` with the refine store (+ their list's bonus when fused)."""
        if bonus is None:
            return self._refine.rerank(queries, cand, k)
        b, m = cand.shape
        ok = cand >= 0
        cell = self._row_cells()[np.maximum(cand, 0)]
        hit = (lists[:, None, :] == cell[:, :, None])  # [B, M, W]
        add = np.take_along_axis(bonus, hit.argmax(axis=2), axis=1)
        vec = self._refine.rows(np.maximum(cand, 0).reshape(-1)).reshape(b, m, -1)
        s = (np.einsum("bmd,bd->bm", vec, queries) + add).astype(np.float32)
        s[~ok] = -np.inf
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        out_s = np.take_along_axis(s, top, axis=1)
        return out_s, np.where(np.isfinite(out_s), np.take_along_axis(cand, top, axis=1), -1)

    def _row_cells(self) -> np.ndarray:
        """``[N]`` int64 cell of each row (made once; compressed lists with fused re-ranking only)."""
        rc = getattr(self, "_row_cell_table", None)
        if rc is None:
            rc = np.empty(self.ntotal, np.int64)
            view = self._shards.list_view if self._shards is not None else (lambda c: L.list_view(self._ivf, c))
            for c in range(self.nlist):
                rc[view(c)[0]] = c
            self._row_cell_table = rc
        return rc

    def _list_scores(self, queries: np.ndarray, lists: np.ndarray, cs: np.ndarray, ci: np.ndarray,
                     every: np.ndarray | None = None) -> np.ndarray:
        """Cell score of every searched list ``[B, W]``: the scored top cells' own scores, exact
        scores (best cosine over the cell's prototypes) for ring cells that were not scored; a
        lookup in ``every`` ``[B, C]`` when every cell was scored (-inf for list -1)."""
        if every is not None:
            got = every[np.arange(len(lists))[:, None], np.maximum(lists, 0)]
            return np.where(lists >= 0, got, np.float32(-np.inf)).astype(np.float32, copy=False)
        if len(lists) == 1:  # one query: the same values from a dict of the top cells' scores
            top = {c: s for c, s in zip(ci[0].tolist(), cs[0].tolist(), strict=True) if c >= 0}
            row = lists[0].tolist()
            ask = [-1 if c in top else c for c in row]
            rest = (self._cells.exact_scores(queries, np.array([ask], dtype=np.int64), self._scorer.prototypes())[0].tolist()
                    if max(ask) >= 0 else [-np.inf] * len(row))
            return np.array([[top[c] if c in top else rest[j] for j, c in enumerate(row)]], dtype=np.float32)
        hit = (lists[:, :, None] == ci[:, None, :]) & (lists[:, :, None] >= 0)  # [B, W, Kc]
        found = hit.any(axis=2)
        from_top = np.take_along_axis(cs, hit.argmax(axis=2), axis=1)
        rest = self._cells.exact_scores(queries, np.where(found, -1, lists), self._scorer.prototypes())
        return np.where(found, from_top, rest).astype(np.float32)

    def _scanned(self, lists: np.ndarray) -> np.ndarray:
        """``[B]`` int64 vectors in the searched lists ``[B, W]``."""
        if self._sizes is None:
            # idempotent: a race computes it twice
            self._sizes = self._shards.list_sizes() if self._shards is not None else L.list_sizes(self._ivf)
        return self._sizes[lists].sum(axis=1)  # list -1 picks the trailing 0
