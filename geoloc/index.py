"""The cell-partitioned index: one FAISS ``IndexIVFFlat`` whose inverted lists *are* the cells.

Layout (DESIGN.md §2, "Restricted retrieval"):

* **Coarse quantizer = cell prototypes.** The quantizer holds the ``C`` L2-normalised cell
  prototypes (row ``c`` = cell ``c`` = inverted list ``c``), so scoring the cells of a query
  (``classify``) is one quantizer search: exact ``IndexFlatIP`` by default; for many cells
  (``config.quantizer == "auto"`` and ``C >= config.approx_min_cells``, or ``"lsh"``) binary
  codes of the prototypes (``IndexLSH``, random rotation + sign bits) shortlist
  ``lsh_k_factor * k`` cells by Hamming distance and ``IndexRefineFlat`` re-ranks the
  shortlist by exact cosine, so returned scores are exact. ``"hnsw"`` (``IndexHNSWFlat``,
  inner product) is the alternative; on prototypes calibrated on a real bundle it needs more
  time than LSH for the same cell recall (benchmarks/latency.py, README).
* **Inverted lists = cells.** Every database row is filed under its own cell with
  ``add_preassigned``; the stored id of a vector is its database row id.
* **Hybrid** scores the cells, keeps the top ``top_cells`` (optionally with each top cell's
  ring of 8 neighbours, de-duplicated) and scans exactly those lists with
  ``IndexIVF.search_preassigned``. The list count travels in a per-call
  ``SearchParametersIVF``: ``nprobe`` of the index is never written after build, so one
  ``CellIndex`` may be searched from many threads at once.
* **Retrieve** is exact search over the whole database. It uses a flat ``IndexFlatIP`` *view*
  of the database, built lazily at the first retrieve call (under a lock) from the IVF lists.
  Memory cost: the IVF already stores ``N * D * 4`` bytes of vectors (plus ``8 N`` bytes of
  ids); the flat view adds another ``N * D * 4`` bytes (1.5 GiB for 10^6 x 384) for as long
  as it is held. Indexes that only serve classify/hybrid never pay it;
  :meth:`CellIndex.drop_flat_view` frees it. The flat view (BLAS for batches) is much faster
  than scanning all lists one query at a time, which is why it is worth its memory.
* **GPU.** When faiss has GPU support, a GPU is present and ``config.use_gpu`` is set, the
  cell scoring (exact flat over prototypes), the restricted search (``GpuIndexIVFFlat``
  ``search_preassigned``) and the exact retrieve run on GPU 0. The answers are those of the
  CPU path (exact inner products; HNSW cell scoring is replaced by exact scoring there).

Files: :meth:`CellIndex.save` writes ``index.faiss`` (``faiss.write_index``, no pickle) and
``cell_neighbours.npy`` (``np.save``, ``allow_pickle=False``) when a neighbour table exists.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib import inspect_tools, ivf_tools

from geoloc.config import IndexConfig
from geoloc.errors import BundleError

__all__ = ["SearchResult", "CellIndex", "INDEX_FILE", "NEIGHBOURS_FILE", "MODES"]

INDEX_FILE = "index.faiss"
NEIGHBOURS_FILE = "cell_neighbours.npy"
MODES = ("classify", "retrieve", "hybrid")
_NORM_TOL = 1e-3


@dataclass
class SearchResult:
    """Answer of :meth:`CellIndex.search` for a batch of ``B`` queries.

    Attributes:
        cell_ids: ``[B, Kc]`` int64 top cells, best first (classify/hybrid; ``[B, 0]`` for
            retrieve); -1 where fewer than ``Kc`` cells exist.
        cell_scores: ``[B, Kc]`` float32 cosine of the query to the cell prototype; -inf on padding.
        ids: ``[B, K]`` int64 database row ids, best first (retrieve/hybrid; ``[B, 0]`` for
            classify); -1 where fewer than ``K`` vectors were searched.
        scores: ``[B, K]`` float32 inner products, descending; -inf on padding.
        timings_ms: wall time per stage for the whole batch: ``"cells"`` (scoring the cells and
            choosing the lists) and ``"search"`` (searching the database).
    """

    cell_ids: np.ndarray
    cell_scores: np.ndarray
    ids: np.ndarray
    scores: np.ndarray
    timings_ms: dict[str, float] = field(default_factory=dict)


def _gpu_available(config: IndexConfig) -> bool:
    return bool(config.use_gpu) and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _check_matrix(name: str, x: np.ndarray, dim: int | None = None, *, normalised: bool = False) -> np.ndarray:
    """Validate a ``[n, D]`` float matrix and return it as C-contiguous float32."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, D]; got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be float32 (L2-normalised descriptors); got dtype {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]} but the index holds {dim}-D vectors")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if normalised and x.size:
        if not np.isfinite(x).all():
            raise ValueError(f"{name} holds NaN or infinite values")
        norms = np.linalg.norm(x, axis=1)
        bad = np.flatnonzero(np.abs(norms - 1.0) > _NORM_TOL)
        if bad.size:
            raise ValueError(
                f"{name} must be L2-normalised; row {bad[0]} has norm {norms[bad[0]]:.4f} "
                f"({bad.size} rows off by more than {_NORM_TOL}); divide each row by its norm first"
            )
    return x


def _dedup_rows(lists: np.ndarray, max_width: int) -> np.ndarray:
    """Drop repeated and negative entries of each row, keep first-seen order, left-compact.

    Args:
        lists: ``[B, W]`` int64 list numbers, -1 = none.
        max_width: upper bound on the output width (the number of lists).
    Returns:
        ``[B, W']`` int64, ``1 <= W' <= min(W, max_width)``; each row's distinct lists first,
        -1 padded.
    """
    b, w = lists.shape
    order = np.argsort(lists, axis=1, kind="stable")
    srt = np.take_along_axis(lists, order, axis=1)
    dup = np.zeros_like(srt, dtype=bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    dup |= srt < 0
    drop = np.empty_like(dup)
    np.put_along_axis(drop, order, dup, axis=1)
    keep = ~drop
    # left-compact: stable sort by "dropped" keeps the original order of the kept entries
    pos = np.argsort(drop, axis=1, kind="stable")
    out = np.take_along_axis(np.where(keep, lists, -1), pos, axis=1)
    width = max(1, min(int(keep.sum(axis=1).max(initial=0)), max_width))
    return np.ascontiguousarray(out[:, :width])


_QUANTIZERS = ("flat", "hnsw", "lsh", "auto")


def _wanted_kind(config: IndexConfig, c: int) -> str:
    """The cell scorer ``config`` asks for over ``c`` cells: 'flat', 'hnsw' or 'lsh'."""
    kind = config.quantizer
    if kind not in _QUANTIZERS:
        raise ValueError(f"index.quantizer must be one of {', '.join(_QUANTIZERS)}; got {kind!r}")
    if kind == "auto":
        return "lsh" if c >= config.approx_min_cells else "flat"
    return kind


def _lsh_bits(config: IndexConfig, d: int) -> int:
    return int(config.lsh_bits) or max(256, d)


def _quantizer_kind(quantizer: faiss.Index) -> str:
    q = faiss.downcast_index(quantizer)
    if isinstance(q, faiss.IndexHNSW):
        return "hnsw"
    return "lsh" if isinstance(q, faiss.IndexRefine) else "flat"


class CellIndex:
    """Cell-partitioned database index (see the module docstring for the layout).

    Build with :meth:`build` or :meth:`load`; query with :meth:`search`. Thread-safe for
    concurrent :meth:`search` calls.
    """

    def __init__(self, ivf: faiss.IndexIVFFlat, *, neighbours: np.ndarray | None, config: IndexConfig) -> None:
        self._ivf = ivf
        self._config = config
        self._neighbours = neighbours
        self._flat: faiss.Index | None = None
        self._flat_lock = threading.Lock()
        self._kind = _quantizer_kind(ivf.quantizer)
        self._params_cache: dict[tuple[str, int], faiss.SearchParameters] = {}
        self._gpu = None  # (resources, gpu_ivf, gpu_prototypes) once moved
        if _gpu_available(config):
            self._to_gpu()

    # -- construction ---------------------------------------------------------------------
    @staticmethod
    def _make_quantizer(prototypes: np.ndarray, config: IndexConfig) -> faiss.Index:
        """Coarse quantizer over ``prototypes`` ``[C, D]`` float32 (see the module docstring)."""
        c, d = prototypes.shape
        kind = _wanted_kind(config, c)
        if kind == "hnsw":
            q = faiss.IndexHNSWFlat(d, int(config.hnsw_m), faiss.METRIC_INNER_PRODUCT)
            q.hnsw.efSearch = int(config.hnsw_ef_search)
        elif kind == "lsh":
            # L2 on unit vectors ranks like inner product; scores are converted back in _score_cells.
            lsh = faiss.IndexLSH(d, _lsh_bits(config, d), True, True)
            lsh.train(prototypes)
            q = faiss.IndexRefineFlat(lsh)
            q.k_factor = float(config.lsh_k_factor)
            lsh.this.disown()
            q.own_fields = True
        else:
            q = faiss.IndexFlatIP(d)
        q.add(prototypes)
        return q

    @classmethod
    def build(
        cls,
        *,
        descriptors: np.ndarray,
        cells: np.ndarray,
        prototypes: np.ndarray,
        neighbours: np.ndarray | None = None,
        config: IndexConfig,
    ) -> "CellIndex":
        """File every database descriptor under its cell.

        Args:
            descriptors: ``[N, D]`` float32, L2-normalised; row ``i`` gets id ``i``.
            cells: ``[N]`` int64 cell id (``0..C-1``) each row is filed under.
            prototypes: ``[C, D]`` float32, L2-normalised; row ``c`` is cell ``c``'s prototype.
            neighbours: ``[C, 8]`` int64 ids of each cell's 8 surrounding cells (-1 = none), e.g.
                :meth:`geoloc.cells.CellTable.neighbours`; needed for ``neighbours=True`` searches.
            config: quantizer choice, HNSW parameters, GPU use.
        Raises:
            ValueError: on wrong shapes, dtypes, un-normalised rows or cell ids out of range.
        """
        prototypes = _check_matrix("prototypes", prototypes, normalised=True)
        c, d = prototypes.shape
        if c == 0:
            raise ValueError("prototypes is empty: the index needs at least one cell")
        descriptors = _check_matrix("descriptors", descriptors, d, normalised=True)
        n = descriptors.shape[0]
        cells = np.asarray(cells)
        if cells.shape != (n,):
            raise ValueError(f"cells must have shape [N] = [{n}] (one cell id per descriptor); got {cells.shape}")
        if n and not np.issubdtype(cells.dtype, np.integer):
            raise ValueError(f"cells must hold integer cell ids; got dtype {cells.dtype}")
        cells = np.ascontiguousarray(cells, dtype=np.int64)
        if n and (cells.min() < 0 or cells.max() >= c):
            bad = int(np.flatnonzero((cells < 0) | (cells >= c))[0])
            raise ValueError(
                f"cells[{bad}] = {cells[bad]} is out of range: there are {c} prototypes, so cell ids must lie in 0..{c - 1}"
            )
        neighbours = cls._check_neighbours(neighbours, c)

        quantizer = cls._make_quantizer(prototypes, config)
        ivf = faiss.IndexIVFFlat(quantizer, d, c, faiss.METRIC_INNER_PRODUCT)
        ivf.own_fields = True
        quantizer.this.disown()  # the IVF owns (and frees) the quantizer from now on
        ivf.is_trained = True
        # Keep ids in a named variable: add_preassigned passes a raw pointer, and a temporary
        # would be freed before FAISS copies it (the stored ids would be garbage).
        row_ids = np.arange(n, dtype=np.int64)
        if n:
            ivf_tools.add_preassigned(ivf, descriptors, cells, row_ids)
        return cls(ivf, neighbours=neighbours, config=config)

    @staticmethod
    def _check_neighbours(neighbours: np.ndarray | None, c: int) -> np.ndarray | None:
        """Validate ``[C, 8]`` int64 neighbour table (-1 = none)."""
        if neighbours is None:
            return None
        nb = np.asarray(neighbours)
        if nb.ndim != 2 or nb.shape[0] != c or not np.issubdtype(nb.dtype, np.integer):
            raise ValueError(f"neighbours must be an integer array [C, 8] with C = {c}; got {nb.dtype} {nb.shape}")
        if nb.size and (nb.min() < -1 or nb.max() >= c):
            raise ValueError(f"neighbours holds cell ids outside -1..{c - 1}")
        return np.ascontiguousarray(nb, dtype=np.int64)

    # -- GPU ------------------------------------------------------------------------------
    def _to_gpu(self) -> None:  # pragma: no cover - needs a CUDA build of faiss and a GPU
        res = faiss.StandardGpuResources()
        gpu_ivf = faiss.index_cpu_to_gpu(res, 0, self._ivf)
        protos = self.prototypes()
        gpu_q = faiss.GpuIndexFlatIP(res, protos.shape[1])
        gpu_q.add(protos)
        self._gpu = (res, gpu_ivf, gpu_q)

    @property
    def on_gpu(self) -> bool:
        """True when searches run on a GPU."""
        return self._gpu is not None

    # -- properties -----------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Number of database vectors N."""
        return int(self._ivf.ntotal)

    @property
    def nlist(self) -> int:
        """Number of cells C (inverted lists)."""
        return int(self._ivf.nlist)

    @property
    def dim(self) -> int:
        """Descriptor dimension D."""
        return int(self._ivf.d)

    @property
    def quantizer_kind(self) -> str:
        """'hnsw' or 'flat': how cells are scored on CPU."""
        return self._kind

    @property
    def neighbours(self) -> np.ndarray | None:
        """``[C, 8]`` int64 neighbour table or None."""
        return self._neighbours

    @property
    def faiss_index(self) -> faiss.IndexIVFFlat:
        """The underlying CPU ``IndexIVFFlat`` (read-only use, please: do not set ``nprobe``)."""
        return self._ivf

    def memory_bytes(self) -> dict[str, int]:
        """Bytes held: ``lists`` (vectors + ids), ``quantizer``, ``flat_view`` (0 unless built)."""
        n, d, c = self.ntotal, self.dim, self.nlist
        q = c * d * 4
        if self._kind == "hnsw":
            q += c * (int(self._config.hnsw_m) * 2 * 4 + 16)  # level-0 links dominate
        elif self._kind == "lsh":
            q += c * (_lsh_bits(self._config, d) // 8)
        return {"lists": n * (d * 4 + 8), "quantizer": q, "flat_view": n * d * 4 if self._flat is not None else 0}

    # -- contents -------------------------------------------------------------------------
    def cell_members(self, c: int) -> np.ndarray:
        """Row ids filed in cell ``c``; ``[n_c]`` int64."""
        c = int(c)
        if not 0 <= c < self.nlist:
            raise ValueError(f"cell {c} is out of range 0..{self.nlist - 1}")
        ids, _ = inspect_tools.get_invlist(self._ivf.invlists, c)
        return ids

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """All database vectors in row-id order.

        Returns:
            vectors: ``[N, D]`` float32, row ``i`` = database row ``i``.
            cells: ``[N]`` int64 cell id each row is filed under.
        """
        n, d = self.ntotal, self.dim
        out = np.empty((n, d), dtype=np.float32)
        cell = np.full(n, -1, dtype=np.int64)
        inv = self._ivf.invlists
        for c in range(self.nlist):
            if inv.list_size(c) == 0:
                continue
            ids, codes = inspect_tools.get_invlist(inv, c)
            out[ids] = codes.view(np.float32).reshape(-1, d)
            cell[ids] = c
        return out, cell

    def prototypes(self) -> np.ndarray:
        """Cell prototypes held by the quantizer; ``[C, D]`` float32."""
        q = faiss.downcast_index(self._ivf.quantizer)
        return q.reconstruct_n(0, q.ntotal)

    # -- search ---------------------------------------------------------------------------
    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        return _check_matrix("queries", queries, self.dim)

    def score_cells(self, queries: np.ndarray, top_cells: int) -> tuple[np.ndarray, np.ndarray]:
        """Best cells of each query by cosine to the prototypes.

        Args:
            queries: ``[B, D]`` float32, L2-normalised.
            top_cells: how many cells to return (k); more than C gives -1 padding.
        Returns:
            scores: ``[B, k]`` float32 cosine, descending (-inf on padding).
            ids: ``[B, k]`` int64 cell ids (-1 on padding).
        """
        queries = self._check_queries(queries)
        return self._score_cells(queries, self._check_k("top_cells", top_cells))

    def _score_cells(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._gpu is not None:  # pragma: no cover
            scores, ids = self._gpu[2].search(queries, min(k, 2048))
        elif self._kind == "hnsw":
            scores, ids = self._ivf.quantizer.search(queries, k, params=self._hnsw_params(k))
        elif self._kind == "lsh":
            dist, ids = self._ivf.quantizer.search(queries, k)
            scores = 1.0 - 0.5 * dist  # |a - b|^2 = 2 - 2 cos for unit vectors
        else:
            scores, ids = self._ivf.quantizer.search(queries, k)
        scores[ids < 0] = -np.inf
        return scores, ids

    @staticmethod
    def _check_k(name: str, k: int) -> int:
        if isinstance(k, bool) or int(k) != k or k < 1:
            raise ValueError(f"{name} must be a positive integer; got {k!r}")
        return int(k)

    def _lists_for(self, cell_ids: np.ndarray, neighbours: bool) -> np.ndarray:
        """Inverted lists to scan: ``[B, Kc]`` top cells (+ ``[B, 8 Kc]`` ring) -> ``[B, W]`` int64."""
        if neighbours:
            if self._neighbours is None:
                raise ValueError("neighbours=True needs a neighbour table: build the index with neighbours=CellTable.neighbours()")
            ring = np.where(cell_ids[:, :, None] >= 0, self._neighbours[np.maximum(cell_ids, 0)], -1)
            lists = np.concatenate([cell_ids, ring.reshape(len(cell_ids), -1)], axis=1)
            return _dedup_rows(lists, self.nlist)
        # a top-k quantizer search returns distinct cells, -1 only as tail padding (k > C)
        return cell_ids if cell_ids.shape[1] <= self.nlist else cell_ids[:, : self.nlist]

    def search_lists(self, queries: np.ndarray, lists: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact search restricted to the given inverted lists (cells).

        Args:
            queries: ``[B, D]`` float32.
            lists: ``[B, W]`` int64 cell ids per query, -1 = skip; no repeats within a row,
                ``W <= C``.
            k: matches per query.
        Returns:
            scores: ``[B, k]`` float32 inner products, descending (-inf on padding).
            ids: ``[B, k]`` int64 row ids (-1 on padding).
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        lists = np.ascontiguousarray(lists, dtype=np.int64)
        b, w = lists.shape
        if w > self.nlist:
            raise ValueError(f"lists has {w} columns but the index holds only {self.nlist} cells")
        scores = np.empty((b, k), dtype=np.float32)
        ids = np.empty((b, k), dtype=np.int64)
        if b == 0:
            return scores, ids
        coarse = np.zeros((b, w), dtype=np.float32)
        params = self._ivf_params(w)  # per call: index.nprobe is never touched
        index = self._gpu[1] if self._gpu is not None else self._ivf
        sp = faiss.swig_ptr
        index.search_preassigned_c(b, sp(queries), k, sp(lists), sp(coarse), sp(scores), sp(ids), False, params)
        scores[ids < 0] = -np.inf
        return scores, ids

    def _ivf_params(self, nprobe: int) -> faiss.SearchParametersIVF:
        """Immutable per-nprobe search parameters, cached (shared read-only between threads)."""
        params = self._params_cache.get(("ivf", nprobe))
        if params is None:
            params = self._params_cache[("ivf", nprobe)] = faiss.SearchParametersIVF(nprobe=nprobe)
        return params

    def _hnsw_params(self, k: int) -> faiss.SearchParametersHNSW:
        ef = max(int(self._config.hnsw_ef_search), k)
        params = self._params_cache.get(("hnsw", ef))
        if params is None:
            params = self._params_cache[("hnsw", ef)] = faiss.SearchParametersHNSW(efSearch=ef)
        return params

    def _flat_view(self) -> faiss.Index:
        """Lazily built exact index over all vectors (``N * D * 4`` extra bytes)."""
        if self._flat is None:
            with self._flat_lock:
                if self._flat is None:
                    vecs, _ = self.vectors()
                    if self._gpu is not None:  # pragma: no cover
                        flat = faiss.GpuIndexFlatIP(self._gpu[0], self.dim)
                    else:
                        flat = faiss.IndexFlatIP(self.dim)
                    flat.add(vecs)
                    self._flat = flat
        return self._flat

    def drop_flat_view(self) -> None:
        """Free the exact-retrieve view (it is rebuilt at the next retrieve)."""
        with self._flat_lock:
            self._flat = None

    def search(
        self, queries: np.ndarray, *, mode: str, top_cells: int = 5, k: int = 10, neighbours: bool = False
    ) -> SearchResult:
        """Answer a batch of queries.

        Args:
            queries: ``[B, D]`` float32, L2-normalised.
            mode: ``"classify"`` (cells only), ``"retrieve"`` (exact over all N) or ``"hybrid"``
                (exact over the members of the top ``top_cells`` cells).
            top_cells: cells returned (classify) or searched (hybrid).
            k: database matches returned (retrieve/hybrid).
            neighbours: hybrid only: also search each top cell's ring of 8 neighbours.
        Returns:
            :class:`SearchResult` with ``cell_ids``/``cell_scores`` ``[B, top_cells]`` (``[B, 0]``
            for retrieve) and ``ids``/``scores`` ``[B, k]`` (``[B, 0]`` for classify).
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        queries = self._check_queries(queries)
        b = queries.shape[0]
        k = self._check_k("k", k)
        top_cells = self._check_k("top_cells", top_cells)
        empty_i = np.empty((b, 0), dtype=np.int64)
        empty_f = np.empty((b, 0), dtype=np.float32)
        t0 = time.perf_counter()
        if mode == "retrieve":
            flat = self._flat_view()
            t1 = time.perf_counter()
            scores, ids = flat.search(queries, k) if b else (np.empty((0, k), np.float32), np.empty((0, k), np.int64))
            scores[ids < 0] = -np.inf
            t2 = time.perf_counter()
            return SearchResult(empty_i, empty_f, ids, scores, {"cells": 0.0, "search": (t2 - t1) * 1e3, "prepare": (t1 - t0) * 1e3})
        if b == 0:
            cs, ci = np.empty((0, top_cells), np.float32), np.empty((0, top_cells), np.int64)
        else:
            cs, ci = self._score_cells(queries, top_cells)
        if mode == "classify":
            t1 = time.perf_counter()
            return SearchResult(ci, cs, empty_i, empty_f, {"cells": (t1 - t0) * 1e3, "search": 0.0})
        lists = self._lists_for(ci, neighbours)
        t1 = time.perf_counter()
        scores, ids = self.search_lists(queries, lists, k)
        t2 = time.perf_counter()
        return SearchResult(ci, cs, ids, scores, {"cells": (t1 - t0) * 1e3, "search": (t2 - t1) * 1e3})

    # -- persistence ----------------------------------------------------------------------
    def save(self, folder: Path) -> list[Path]:
        """Write ``index.faiss`` (and ``cell_neighbours.npy`` when there is a neighbour table).

        Returns the paths written. No pickle: ``faiss.write_index`` and ``np.save(allow_pickle=False)``.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / INDEX_FILE
        faiss.write_index(self._ivf, str(path))  # always the CPU index
        written = [path]
        nb_path = folder / NEIGHBOURS_FILE
        if self._neighbours is not None:
            np.save(nb_path, self._neighbours, allow_pickle=False)
            written.append(nb_path)
        elif nb_path.exists():
            nb_path.unlink()
        return written

    @classmethod
    def load(cls, folder: Path, *, config: IndexConfig) -> "CellIndex":
        """Read a folder written by :meth:`save`.

        The cell scorer follows ``config``: when it asks for another quantizer kind than the
        stored one, the quantizer is rebuilt from the stored prototypes (cheap).

        Raises:
            BundleError: one line naming the file when it is missing, truncated or not a
                cell index.
        """
        folder = Path(folder)
        path = folder / INDEX_FILE
        if not path.is_file():
            raise BundleError(f"{path}: index file not found; rebuild the bundle with `geoloc build-index`")
        try:
            index = faiss.read_index(str(path))
        except (RuntimeError, MemoryError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BundleError(f"{path}: index file is truncated or corrupt ({first[:120]}); rebuild the bundle") from None
        if not isinstance(index, faiss.IndexIVFFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise BundleError(f"{path}: not a geoloc cell index (found {type(index).__name__}); rebuild the bundle")
        if index.quantizer.ntotal != index.nlist:
            raise BundleError(f"{path}: quantizer holds {index.quantizer.ntotal} prototypes for {index.nlist} cells; rebuild the bundle")
        neighbours = None
        nb_path = folder / NEIGHBOURS_FILE
        if nb_path.exists():
            try:
                neighbours = np.load(nb_path, allow_pickle=False)
                neighbours = cls._check_neighbours(neighbours, int(index.nlist))
            except (ValueError, OSError, EOFError) as err:
                raise BundleError(f"{nb_path}: neighbour table is unreadable ({str(err)[:120]}); rebuild the bundle") from None
        if _quantizer_kind(index.quantizer) != _wanted_kind(config, int(index.nlist)):
            q_old = faiss.downcast_index(index.quantizer)
            protos = q_old.reconstruct_n(0, q_old.ntotal)
            q_new = cls._make_quantizer(protos, config)
            index.quantizer = q_new
            q_new.this.disown()
            index.own_fields = True
        return cls(index, neighbours=neighbours, config=config)
