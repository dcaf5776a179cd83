"""The inverted lists: one ``IndexIVFFlat`` list per cell, searched only where it is told.

Free functions over a FAISS ``IndexIVFFlat`` ``ivf`` whose list ``c`` holds the database rows
filed under cell ``c`` (stored id = database row id). Nothing here asks the IVF's quantizer to
assign anything: the lists to scan always come from the caller (``search_preassigned``).

FAISS traps kept in mind here:

* ``add_preassigned`` passes raw pointers: the ids array must live in a named variable until
  the call returns (a temporary would be freed before FAISS copies it).
* The number of lists to scan travels in a per-call ``SearchParametersIVF(nprobe=W)``; the
  index's own ``nprobe`` is never written, so concurrent searches cannot disturb each other.
  (That is also why ``faiss.contrib.ivf_tools.search_preassigned``, which reads
  ``index.nprobe``, is not used for the search itself.)
"""

from __future__ import annotations

import faiss
import numpy as np
from faiss.contrib import inspect_tools, ivf_tools

__all__ = [
    "all_vectors",
    "cell_members",
    "dedup_rows",
    "distinct_positions",
    "list_sizes",
    "make_ivf",
    "ring_lists",
    "search_fused",
    "search_preassigned",
]


def make_ivf(quantizer: faiss.Index, descriptors: np.ndarray, cells: np.ndarray, n_cells: int) -> faiss.IndexIVFFlat:
    """An inner-product ``IndexIVFFlat`` with ``n_cells`` lists; row ``i`` filed in list ``cells[i]``.

    Args:
        quantizer: the cell scorer's FAISS index; the IVF owns (and frees) it from now on.
        descriptors: ``[N, D]`` float32. cells: ``[N]`` int64 in ``0..n_cells-1``.
    """
    d = descriptors.shape[1]
    ivf = faiss.IndexIVFFlat(quantizer, d, n_cells, faiss.METRIC_INNER_PRODUCT)
    ivf.own_fields = True
    quantizer.this.disown()
    ivf.is_trained = True
    # Keep ids in a named variable: add_preassigned passes a raw pointer, and a temporary
    # would be freed before FAISS copies it (the stored ids would be garbage).
    row_ids = np.arange(len(descriptors), dtype=np.int64)
    if len(descriptors):
        ivf_tools.add_preassigned(ivf, descriptors, cells, row_ids)
    return ivf


def list_sizes(ivf: faiss.IndexIVF) -> np.ndarray:
    """``[C + 1]`` int64 number of vectors in each list, and a trailing 0 (so that list -1 counts 0)."""
    return np.append(np.asarray(inspect_tools.get_invlist_sizes(ivf.invlists), dtype=np.int64).reshape(-1), 0)


def cell_members(ivf: faiss.IndexIVF, c: int) -> np.ndarray:
    """Row ids filed in cell ``c``; ``[n_c]`` int64."""
    c = int(c)
    if not 0 <= c < ivf.nlist:
        raise ValueError(f"cell {c} is out of range 0..{ivf.nlist - 1}")
    ids, _ = inspect_tools.get_invlist(ivf.invlists, c)
    return ids


def all_vectors(ivf: faiss.IndexIVFFlat) -> tuple[np.ndarray, np.ndarray]:
    """All stored vectors in row-id order: ``[N, D]`` float32 and ``[N]`` int64 cell of each row."""
    n, d = int(ivf.ntotal), int(ivf.d)
    out = np.empty((n, d), dtype=np.float32)
    cell = np.full(n, -1, dtype=np.int64)
    inv = ivf.invlists
    for c in range(ivf.nlist):
        if inv.list_size(c) == 0:
            continue
        ids, codes = inspect_tools.get_invlist(inv, c)
        out[ids] = codes.view(np.float32).reshape(-1, d)
        cell[ids] = c
    return out, cell


def distinct_positions(keys: np.ndarray) -> np.ndarray:
    """Where each row's distinct non-negative keys first occur, in first-seen order.

    Args:
        keys: ``[B, W]`` int64, negative = none.
    Returns:
        ``[B, W]`` int64 column positions into ``keys``, -1 padded at the end of each row.
    """
    order = np.argsort(keys, axis=1, kind="stable")
    srt = np.take_along_axis(keys, order, axis=1)
    dup = np.zeros_like(srt, dtype=bool)
    dup[:, 1:] = srt[:, 1:] == srt[:, :-1]
    dup |= srt < 0
    drop = np.empty_like(dup)
    np.put_along_axis(drop, order, dup, axis=1)
    # left-compact: a stable sort by "dropped" keeps the original order of the kept entries
    pos = np.argsort(drop, axis=1, kind="stable")
    return np.where(np.take_along_axis(drop, pos, axis=1), -1, pos)


def dedup_rows(lists: np.ndarray, max_width: int) -> np.ndarray:
    """Drop repeated and negative entries of each row, keep first-seen order, left-compact.

    Args:
        lists: ``[B, W]`` int64 list numbers, -1 = none.
        max_width: upper bound on the output width (the number of lists).
    Returns:
        ``[B, W']`` int64, ``1 <= W' <= min(W, max_width)``; each row's distinct lists first, -1 padded.
    """
    pos = distinct_positions(lists)
    out = np.where(pos >= 0, np.take_along_axis(lists, np.maximum(pos, 0), axis=1), -1)
    width = max(1, min(int((pos >= 0).sum(axis=1).max(initial=0)), max_width))
    return np.ascontiguousarray(out[:, :width])


def ring_lists(cell_ids: np.ndarray, neighbours: np.ndarray, n_cells: int) -> np.ndarray:
    """Top cells ``[B, Kc]`` and their rings of 8 (``neighbours`` ``[C, 8]``) -> distinct lists ``[B, W]``."""
    ring = np.where(cell_ids[:, :, None] >= 0, neighbours[np.maximum(cell_ids, 0)], -1)
    return dedup_rows(np.concatenate([cell_ids, ring.reshape(len(cell_ids), -1)], axis=1), n_cells)


_IVF_PARAMS: dict[int, faiss.SearchParametersIVF] = {}
"""``SearchParametersIVF(nprobe=W)`` per W, made once and only read afterwards (shared by threads)."""


def search_preassigned(index: faiss.Index, queries: np.ndarray, lists: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact search of each query over its own lists (CPU ``IndexIVFFlat`` or its GPU copy).

    Args:
        queries: ``[B, D]`` float32. lists: ``[B, W]`` int64, -1 = skip; no repeats in a row.
        k: matches per query.
    Returns:
        scores: ``[B, k]`` float32 inner products, descending (-inf on padding);
        ids: ``[B, k]`` int64 row ids (-1 on padding).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    lists = np.ascontiguousarray(lists, dtype=np.int64)
    b, w = lists.shape
    scores = np.empty((b, k), dtype=np.float32)
    ids = np.empty((b, k), dtype=np.int64)
    if b == 0:
        return scores, ids
    coarse = np.zeros((b, w), dtype=np.float32)
    params = _IVF_PARAMS.get(w)  # per call: index.nprobe is never touched
    if params is None:
        params = _IVF_PARAMS[w] = faiss.SearchParametersIVF(nprobe=w)
    sp = faiss.swig_ptr
    index.search_preassigned_c(b, sp(queries), k, sp(lists), sp(coarse), sp(scores), sp(ids), False, params)
    scores[ids < 0] = -np.inf
    return scores, ids


def search_fused(index: faiss.Index, queries: np.ndarray, lists: np.ndarray, bonus: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by ``inner product + bonus of the list the row is filed in``.

    Each (query, list) pair is searched on its own (queries replicated once per list, one list
    each, in one ``search_preassigned`` call), the list's bonus is added to its ``k`` best, and
    the ``W * k`` candidates are merged. Exact: within one list the bonus is a constant, so the
    overall top-k lies within every list's own top-k.

    Args:
        queries: ``[B, D]`` float32. lists: ``[B, W]`` int64, -1 = skip; no repeats in a row.
        bonus: ``[B, W]`` float32 added to every match from that list (finite where the list is).
        k: matches per query.
    Returns:
        scores: ``[B, k]`` float32 fused scores, descending (-inf on padding);
        ids: ``[B, k]`` int64 row ids (-1 on padding).
    """
    b, w = lists.shape
    rep = np.repeat(np.ascontiguousarray(queries, dtype=np.float32), w, axis=0)
    s, i = search_preassigned(index, rep, lists.reshape(-1, 1), k)
    fused = (s.reshape(b, w, k) + bonus[:, :, None].astype(np.float32)).reshape(b, w * k)
    i = i.reshape(b, w * k)
    fused[i < 0] = -np.inf
    top = np.argsort(-fused, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(fused, top, axis=1), np.take_along_axis(i, top, axis=1)
