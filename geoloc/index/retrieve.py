"""Exact retrieve without a second copy of the database, and the re-ranking store of compressed lists.

* :class:`ListScan` answers ``mode="retrieve"`` from the inverted lists themselves. Small batches
  (``B < index.retrieve_blas_min_batch``) run ``search_preassigned`` over every list: the very
  kernel of hybrid, so hybrid with all cells answers bit-identically. Larger batches read the
  flat lists in place, block by block, and score each block with BLAS
  (:func:`geoloc.index.lists.scan_all_blas`): same ids, inner products equal up to float rounding.
  The only extra memory is one block buffer (``16384 * D * 4`` bytes, 24 MiB at 384-d).
* Compressed lists (``index.codec`` sq8 / pq) scan the codes; with ``index.refine`` the best
  ``refine_k_factor * k`` candidates are re-ranked against a :class:`RefineStore` (float32 rows:
  exact; or SQ8 rows), held in row-id order.
* :class:`FlatView` (GPU only): an exact ``GpuIndexFlatIP`` copy in GPU memory, built lazily.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import faiss
import numpy as np

from geoloc.index import lists as L

__all__ = ["REFINES", "FlatView", "ListScan", "RefineStore"]

REFINES: tuple[str, ...] = ("none", "sq8", "flat")
"""``index.refine`` values: how compressed lists' candidates are re-ranked."""


class ListScan:
    """Exact retrieve over the IVF's own lists (no copy).

    Args:
        ivf: the CPU IVF (any codec; BLAS blocks only for flat lists).
        blas_min_batch: batches of at least this many queries use BLAS blocks (flat lists).
    """

    def __init__(self, ivf: faiss.IndexIVF, blas_min_batch: int) -> None:
        self.ivf = ivf
        self.blas_min_batch = int(blas_min_batch)
        self.flat = L.codec_of(ivf) == "flat"
        self._all = np.arange(ivf.nlist, dtype=np.int64)[None, :]

    def search(self, queries: np.ndarray, k: int, *, index: faiss.Index | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over all rows: queries ``[B, D]`` float32 -> scores ``[B, k]`` float32 (-inf pad), ids ``[B, k]`` int64.

        ``index``: search this copy of the lists instead (the GPU mirror) with the IVF kernel.
        """
        b = len(queries)
        if not b:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        if index is None and self.flat and b >= self.blas_min_batch:
            return L.scan_all_blas(self.ivf, queries, k)
        lists = np.broadcast_to(self._all, (b, self.ivf.nlist))
        return L.search_preassigned(self.ivf if index is None else index, queries, lists, k)


class RefineStore:
    """Row-id ordered re-ranking copy of the database: ``flat`` (float32, exact) or ``sq8``.

    Args:
        index: ``IndexFlatIP`` or inner-product ``IndexScalarQuantizer`` (QT_8bit) holding row i at i.
    """

    def __init__(self, index: faiss.Index) -> None:
        self._owner = index  # the proxy that owns the C++ index
        self.index = faiss.downcast_index(index)
        self.kind = "flat" if isinstance(self.index, faiss.IndexFlat) else "sq8"
        n, d = int(self.index.ntotal), int(self.index.d)
        if self.kind == "flat":
            self._rows = faiss.rev_swig_ptr(self.index.get_xb(), n * d).reshape(n, d) if n else np.empty((0, d), np.float32)
        else:
            cs = int(self.index.code_size)
            self._rows = faiss.rev_swig_ptr(self.index.codes.data(), n * cs).reshape(n, cs) if n else np.empty((0, cs), np.uint8)

    @classmethod
    def build(cls, kind: str, descriptors: np.ndarray) -> RefineStore:
        """A store of ``kind`` (``flat`` | ``sq8``) over ``descriptors`` ``[N, D]`` float32 (row i = id i)."""
        rng = np.random.default_rng(0)
        sample = descriptors if len(descriptors) <= 65536 else descriptors[np.sort(rng.choice(len(descriptors), 65536, replace=False))]
        idx = cls.empty_index(kind, descriptors.shape[1], sample)
        for i in range(0, len(descriptors), 1 << 18):
            idx.add(np.ascontiguousarray(descriptors[i:i + (1 << 18)], dtype=np.float32))
        return cls(idx)

    @staticmethod
    def empty_index(kind: str, d: int, sample: np.ndarray) -> faiss.Index:
        """An empty, trained store index of ``kind`` for ``d``-D rows (sq8 trained on ``sample`` ``[S, D]``);
        fill it with ``add`` in row order, then wrap it: ``RefineStore(index)``."""
        if kind == "flat":
            return faiss.IndexFlatIP(d)
        if kind == "sq8":
            idx = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
            idx.train(np.ascontiguousarray(sample, dtype=np.float32))
            return idx
        raise ValueError(f"index.refine must be one of {', '.join(REFINES)}; got {kind!r}")

    def nbytes(self) -> int:
        """Bytes held (the rows)."""
        return int(self._rows.nbytes)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Re-ranking vectors of ``ids`` ``[n]`` int64 (>= 0) -> ``[n, D]`` float32."""
        if self.kind == "flat":
            return self._rows[ids]
        return self.index.sa_decode(np.ascontiguousarray(self._rows[ids]))

    def rerank(self, queries: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Re-score candidates and keep the best ``k``.

        Args:
            queries: ``[B, D]`` float32. ids: ``[B, M]`` int64 candidates (-1 = none). k: kept, ``k <= M``.
        Returns:
            scores: ``[B, k]`` float32 store inner products, descending (-inf pad); ids: ``[B, k]`` int64.
        """
        b, m = ids.shape
        ok = ids >= 0
        vec = self.rows(np.maximum(ids, 0).reshape(-1)).reshape(b, m, -1)
        s = np.einsum("bmd,bd->bm", vec, queries).astype(np.float32)
        s[~ok] = -np.inf
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        out_s = np.take_along_axis(s, top, axis=1)
        out_i = np.where(np.isfinite(out_s), np.take_along_axis(ids, top, axis=1), -1)
        return out_s, out_i


class FlatView:
    """A lazily built exact index of all rows in GPU memory (GPU path only; host RAM holds the lists once).

    Args:
        vectors: returns ``[N, D]`` float32 rows in row-id order (called once per build; freed after).
        make_flat: returns an empty inner-product flat index (GPU).
    """

    def __init__(self, vectors: Callable[[], np.ndarray], make_flat: Callable[[], faiss.Index]) -> None:
        self._vectors = vectors
        self._make_flat = make_flat
        self._flat: faiss.Index | None = None
        self._lock = threading.Lock()

    def get(self) -> faiss.Index:
        """The view, built on first use."""
        flat = self._flat
        if flat is None:
            with self._lock:
                if self._flat is None:
                    new = self._make_flat()
                    new.add(self._vectors())
                    self._flat = new
                flat = self._flat
        return flat

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k over all rows: queries ``[B, D]`` -> scores ``[B, k]`` float32 (-inf pad), ids ``[B, k]`` int64."""
        flat = self.get()
        if not len(queries):
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        scores, ids = flat.search(queries, k)
        scores[ids < 0] = -np.inf
        return scores, ids

    def drop(self) -> None:
        """Free the view (rebuilt at the next retrieve)."""
        with self._lock:
            self._flat = None

    def nbytes(self) -> int:
        """Bytes held by the view (0 when not built)."""
        flat = self._flat
        return 0 if flat is None else int(flat.ntotal) * int(flat.d) * 4
