"""The inverted lists: one IVF list per cell, searched only where it is told.

Free functions over a FAISS IVF ``ivf`` whose list ``c`` holds the database rows filed under
cell ``c`` (stored id = database row id). Nothing here asks the IVF's quantizer to assign
anything: the lists to scan always come from the caller (``search_preassigned``).

Storage codecs (``index.codec``; :func:`make_ivf`): ``flat`` (``IndexIVFFlat``, float32, exact),
``sq8`` (``IndexIVFScalarQuantizer`` 8-bit, 1 byte per dimension) and ``pq``
(``IndexIVFPQ``, ``pq_m`` bytes per vector). Codes are never residuals (``by_residual`` off): a
cell with several prototypes has no single centroid, and the codes stay independent of the scorer.
Exact retrieve over flat lists (:func:`scan_all_blas`) reads the lists in place, block by
block, so the database is held once.

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
    "CODECS",
    "add_rows",
    "add_rows_ids",
    "all_vectors",
    "empty_ivf",
    "train_codec",
    "training_sample",
    "codec_of",
    "list_view",
    "scan_all_blas",
    "cell_members",
    "dedup_rows",
    "distinct_positions",
    "list_sizes",
    "make_ivf",
    "ring_lists",
    "search_fused",
    "search_preassigned",
]


CODECS: tuple[str, ...] = ("flat", "sq8", "pq")
"""``index.codec`` values: how the lists store the database vectors."""


def pq_subquantizers(d: int, m: int) -> int:
    """PQ sub-quantizers for ``d`` dims: ``m`` when given (0 = ``d / 4``), lowered to a divisor of ``d``."""
    m = int(m) or max(1, d // 4)
    m = min(m, d)
    while d % m:
        m -= 1
    return m


def make_ivf(quantizer: faiss.Index, descriptors: np.ndarray, cells: np.ndarray, n_cells: int, *,
             codec: str = "flat", pq_m: int = 0, train_size: int = 65536) -> faiss.IndexIVF:
    """An inner-product IVF with ``n_cells`` lists; row ``i`` filed in list ``cells[i]``.

    Args:
        quantizer: the cell scorer's FAISS index; the IVF owns (and frees) it from now on.
        descriptors: ``[N, D]`` float32. cells: ``[N]`` int64 in ``0..n_cells-1``.
        codec: ``flat`` | ``sq8`` | ``pq`` (:data:`CODECS`). pq_m: PQ bytes per vector (0 = D/4).
        train_size: rows (a fixed-seed sample) the sq8/pq encoders are trained on.
    """
    ivf = empty_ivf(quantizer, descriptors.shape[1], n_cells, codec=codec, pq_m=pq_m)
    if codec != "flat":
        if not len(descriptors):
            raise ValueError(f"index.codec={codec} needs database descriptors to train its encoder; got none")
        train_codec(ivf, training_sample(descriptors, codec, train_size))
    add_rows(ivf, descriptors, cells, 0)
    return ivf


def empty_ivf(quantizer: faiss.Index, d: int, n_cells: int, *, codec: str = "flat", pq_m: int = 0) -> faiss.IndexIVF:
    """An empty inner-product IVF of ``codec`` with ``n_cells`` lists over ``quantizer`` (which it owns
    from now on); flat is ready to fill, sq8/pq need :func:`train_codec` first."""
    if codec == "flat":
        ivf = faiss.IndexIVFFlat(quantizer, d, n_cells, faiss.METRIC_INNER_PRODUCT)
    elif codec == "sq8":
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, d, n_cells, faiss.ScalarQuantizer.QT_8bit,
                                            faiss.METRIC_INNER_PRODUCT, False)
    elif codec == "pq":
        ivf = faiss.IndexIVFPQ(quantizer, d, n_cells, pq_subquantizers(d, pq_m), 8, faiss.METRIC_INNER_PRODUCT)
        ivf.by_residual = False
        ivf.pq.cp.min_points_per_centroid = 1  # small databases: no warning per sub-quantizer
    else:
        raise ValueError(f"index.codec must be one of {', '.join(CODECS)}; got {codec!r}")
    ivf.own_fields = True
    quantizer.this.disown()
    ivf.is_trained = codec == "flat"
    return ivf


def training_sample(descriptors: np.ndarray, codec: str, train_size: int = 65536) -> np.ndarray:
    """A fixed-seed sample ``[S, D]`` float32 of ``descriptors`` for the encoder of ``codec``."""
    if codec == "pq":  # k-means per sub-quantizer: 256 centroids need far fewer rows
        train_size = min(train_size, 256 * 64)
    rng = np.random.default_rng(0)
    sample = descriptors if len(descriptors) <= train_size else descriptors[np.sort(rng.choice(len(descriptors), train_size, replace=False))]
    return np.ascontiguousarray(sample, dtype=np.float32)


def train_codec(ivf: faiss.IndexIVF, sample: np.ndarray) -> None:
    """Train the list encoder of a sq8/pq IVF on ``sample`` ``[S, D]`` float32 (the quantizer is left alone)."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    ivf.train_encoder(len(sample), faiss.swig_ptr(sample), None)
    ivf.is_trained = True


def add_rows(ivf: faiss.IndexIVF, x: np.ndarray, cells: np.ndarray, first_id: int) -> None:
    """File rows ``x`` ``[n, D]`` under ``cells`` ``[n]`` with ids ``first_id .. first_id + n - 1``."""
    add_rows_ids(ivf, x, cells, np.arange(first_id, first_id + len(x), dtype=np.int64))


def add_rows_ids(ivf: faiss.IndexIVF, x: np.ndarray, cells: np.ndarray, ids: np.ndarray) -> None:
    """File rows ``x`` ``[n, D]`` float32 under lists ``cells`` ``[n]`` int64 with stored ids ``ids`` ``[n]`` int64."""
    step = 1 << 18  # chunks: the encoders' temporaries stay small
    for i in range(0, len(x), step):
        # Keep ids in a named variable: add_preassigned passes a raw pointer, and a temporary
        # would be freed before FAISS copies it (the stored ids would be garbage).
        row_ids = np.ascontiguousarray(ids[i:i + step], dtype=np.int64)
        ivf_tools.add_preassigned(ivf, np.ascontiguousarray(x[i:i + step], dtype=np.float32),
                                  np.ascontiguousarray(cells[i:i + step], dtype=np.int64), row_ids)


def codec_of(ivf: faiss.Index) -> str:
    """The :data:`CODECS` name of a (downcast) IVF's storage."""
    ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, faiss.IndexIVFFlat):
        return "flat"
    if isinstance(ivf, faiss.IndexIVFScalarQuantizer):
        return "sq8"
    if isinstance(ivf, faiss.IndexIVFPQ):
        return "pq"
    raise ValueError(f"unsupported inverted-list storage {type(ivf).__name__}")


def decode(ivf: faiss.Index, codes: np.ndarray) -> np.ndarray:
    """Codes of one list ``[n, code_size]`` uint8 -> ``[n, D]`` float32 (exact for flat)."""
    ivf = faiss.downcast_index(ivf)
    if isinstance(ivf, faiss.IndexIVFFlat):
        return codes.view(np.float32).reshape(-1, ivf.d)
    if isinstance(ivf, faiss.IndexIVFScalarQuantizer):
        return ivf.sq.decode(np.ascontiguousarray(codes.reshape(-1, ivf.code_size)))
    return ivf.pq.decode(np.ascontiguousarray(codes.reshape(-1, ivf.code_size)))


def list_view(ivf: faiss.IndexIVF, c: int) -> tuple[np.ndarray, np.ndarray]:
    """List ``c`` in place (no copy): ids ``[n_c]`` int64 and codes ``[n_c, code_size]`` uint8.

    The arrays alias FAISS's own storage: read-only use, valid while the IVF lives and is not
    changed (``ArrayInvertedLists`` returns its buffers; nothing to release).
    """
    inv = ivf.invlists
    n = inv.list_size(c)
    if n == 0:
        return np.empty(0, np.int64), np.empty((0, ivf.code_size), np.uint8)
    ids = faiss.rev_swig_ptr(inv.get_ids(c), n)
    codes = faiss.rev_swig_ptr(inv.get_codes(c), n * ivf.code_size).reshape(n, ivf.code_size)
    return ids, codes


def scan_all_blas(ivf: faiss.IndexIVFFlat, queries: np.ndarray, k: int, *,
                  block_rows: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over every vector of a flat IVF, BLAS over blocks of whole lists.

    Lists are read in place and gathered into one ``[block_rows, D]`` buffer at a time (the only
    extra memory: ``block_rows * D * 4`` bytes), scored with ``faiss.knn`` (sgemm) and merged
    in a ``faiss.ResultHeap``. Same answers as :func:`search_preassigned` over all lists, up to
    float rounding of the inner products (sgemm sums in another order).

    Args:
        queries: ``[B, D]`` float32. k: matches per query.
    Returns:
        scores: ``[B, k]`` float32 descending (-inf on padding); ids: ``[B, k]`` int64 (-1 padding).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    d = int(ivf.d)
    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    buf = np.empty((block_rows, d), dtype=np.float32)
    idbuf = np.empty(block_rows, dtype=np.int64)

    def flush(n: int) -> None:
        kk = min(k, n)
        s, i = faiss.knn(queries, buf[:n], kk, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(s, np.where(i >= 0, idbuf[np.maximum(i, 0)], -1))

    fill = 0
    for c in range(ivf.nlist):
        ids, codes = list_view(ivf, c)
        n = len(ids)
        if n == 0:
            continue
        vecs = codes.view(np.float32).reshape(n, d)
        if n >= block_rows:  # a huge list: score it in place
            if fill:
                flush(fill)
                fill = 0
            for j in range(0, n, block_rows):
                kk = min(k, len(vecs[j:j + block_rows]))
                s, i = faiss.knn(queries, vecs[j:j + block_rows], kk, metric=faiss.METRIC_INNER_PRODUCT)
                heap.add_result(s, np.where(i >= 0, ids[j:j + block_rows][np.maximum(i, 0)], -1))
            continue
        if fill + n > block_rows:
            flush(fill)
            fill = 0
        buf[fill:fill + n] = vecs
        idbuf[fill:fill + n] = ids
        fill += n
    if fill:
        flush(fill)
    heap.finalize()
    scores, out = heap.D, heap.I
    scores[out < 0] = -np.inf
    return scores, out


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


def all_vectors(ivf: faiss.IndexIVF) -> tuple[np.ndarray, np.ndarray]:
    """All stored vectors in row-id order: ``[N, D]`` float32 (decoded: approximate for sq8/pq)
    and ``[N]`` int64 cell of each row. A new ``N * D * 4``-byte array: for export and checks,
    never held by the index."""
    n, d = int(ivf.ntotal), int(ivf.d)
    out = np.empty((n, d), dtype=np.float32)
    cell = np.full(n, -1, dtype=np.int64)
    for c in range(ivf.nlist):
        ids, codes = list_view(ivf, c)
        if not len(ids):
            continue
        out[ids] = decode(ivf, codes)
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
    if len(lists) == 1:  # one query (the usual engine call): a dict keeps first-seen order, in microseconds
        keep = list(dict.fromkeys(v for v in lists[0].tolist() if v >= 0))[:max_width]
        return np.array([keep or [-1]], dtype=np.int64)
    return _dedup_rows_vectorised(lists, max_width)


def _dedup_rows_vectorised(lists: np.ndarray, max_width: int) -> np.ndarray:
    """:func:`dedup_rows` for any batch (the reference the one-query path is tested against)."""
    pos = distinct_positions(lists)
    out = np.where(pos >= 0, np.take_along_axis(lists, np.maximum(pos, 0), axis=1), -1)
    width = max(1, min(int((pos >= 0).sum(axis=1).max(initial=0)), max_width))
    return np.ascontiguousarray(out[:, :width])


def ring_lists(cell_ids: np.ndarray, neighbours: np.ndarray, n_cells: int) -> np.ndarray:
    """Top cells ``[B, Kc]`` and their rings of 8 (``neighbours`` ``[C, 8]``) -> distinct lists ``[B, W]``:
    each row's top cells first, then their rings in order, repeats and -1 dropped."""
    if len(cell_ids) == 1:  # one query: the same order from Python lists, without the [B, Kc, 8] arrays
        top = [c for c in cell_ids[0].tolist() if c >= 0]
        ring = neighbours[top].ravel().tolist() if top else []
        keep = list(dict.fromkeys(c for c in top + ring if c >= 0))[:n_cells]
        return np.array([keep or [-1]], dtype=np.int64)
    ring = np.where(cell_ids[:, :, None] >= 0, neighbours[np.maximum(cell_ids, 0)], -1)
    return dedup_rows(np.concatenate([cell_ids, ring.reshape(len(cell_ids), -1)], axis=1), n_cells)


_IVF_PARAMS: dict[int, faiss.SearchParametersIVF] = {}
"""``SearchParametersIVF(nprobe=W)`` per W, made once and only read afterwards (shared by threads)."""


def search_preassigned(index: faiss.Index, queries: np.ndarray, lists: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Search of each query over its own lists (CPU IVF or its GPU copy); exact for the flat codec,
    the codec's approximate inner products otherwise.

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
    fused = (s.reshape(b, w, k) + bonus.astype(np.float32, copy=False)[:, :, None]).reshape(b, w * k)
    i = i.reshape(b, w * k)
    fused[i < 0] = -np.inf
    top = np.argsort(-fused, axis=1, kind="stable")[:, :k]
    row = np.arange(b)[:, None]  # plain fancy indexing: take_along_axis costs microseconds of Python per call
    return fused[row, top], i[row, top]
