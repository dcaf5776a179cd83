"""Exact retrieve: a flat ``IndexFlatIP`` view of all ``N`` database vectors, built lazily.

The IVF lists already hold ``N * D * 4`` bytes of vectors (plus ``8 N`` bytes of ids); this view
is a second copy of the same ``N * D * 4`` bytes (1.5 GiB for 10^6 x 384), made at the first
retrieve call (under a lock) and held until :meth:`FlatView.drop`. Indexes that only serve
classify/hybrid never pay it. It exists because BLAS over one flat matrix answers batches much
faster than scanning every list one query at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import faiss
import numpy as np

__all__ = ["FlatView"]


class FlatView:
    """The lazily built exact-retrieve view.

    Args:
        vectors: returns ``[N, D]`` float32 rows in row-id order (called once per build).
        make_flat: returns an empty inner-product flat index (CPU or GPU).
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
