"""The one-query fast paths answer exactly as the batch code they shortcut.

A query at a time is the engine's usual call (one photo), and at a tenth of a millisecond the
numpy calls around FAISS are most of its cost, so the index keeps Python-list paths for a batch
of one (``PrototypeCells.top_cells``, ``exact_scores``, ``ring_lists``, ``search_fused``,
``CellIndex._list_scores``). Each is checked bit for bit against the batch path: the same rows
in a batch of two take the vectorised code.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_index import MultiProto, Synthetic

from geoloc.index import lists as L
from geoloc.index.scorers import PrototypeCells


@pytest.fixture(scope="module")
def data() -> Synthetic:
    return Synthetic()


@pytest.fixture(scope="module")
def multi(data: Synthetic) -> MultiProto:
    return MultiProto(data)


def _twice(a: np.ndarray) -> np.ndarray:
    """A batch of two copies of a one-row array: the vectorised path, same rows."""
    return np.concatenate([a, a])


def test_top_cells_of_one_query_equal_the_vectorised_path(multi: MultiProto):
    pc = PrototypeCells(multi.prototype_cells, len(multi.prototypes))
    rng = np.random.default_rng(0)
    for trial in range(200):
        m = int(rng.integers(1, len(multi.prototypes) + 1))
        ids = rng.permutation(len(multi.prototypes))[:m].astype(np.int64)[None]
        if trial % 3 == 0:
            ids[0, int(rng.integers(0, m)):] = -1  # a shortlist with padding
        scores = np.sort(rng.normal(size=(1, m)).astype(np.float32))[:, ::-1].copy()
        scores[ids < 0] = -np.inf
        for k in (1, 3, pc.n_cells + 2):
            one = pc.top_cells(scores, ids, k)
            ref = pc._top_cells_vectorised(_twice(scores), _twice(ids), k)
            assert np.array_equal(one[1], ref[1][:1]), (trial, k)
            assert np.array_equal(one[0], ref[0][:1]), (trial, k)


def test_exact_scores_of_one_query_equal_the_batch(multi: MultiProto, data: Synthetic):
    pc = PrototypeCells(multi.prototype_cells, len(multi.prototypes))
    rng = np.random.default_rng(1)
    for i in range(len(data.xq)):
        cells = rng.integers(-1, pc.n_cells, size=(1, 12))
        one = pc.exact_scores(data.xq[i:i + 1], cells, multi.prototypes)
        ref = pc.exact_scores(_twice(data.xq[i:i + 1]), _twice(cells), multi.prototypes)
        assert np.array_equal(one, ref[:1])
        assert np.isneginf(one[cells < 0]).all()
    want = multi.cell_scores(data.xq[:1])[0, 5]
    np.testing.assert_allclose(pc.exact_scores(data.xq[:1], np.array([[5]]), multi.prototypes)[0, 0], want, rtol=1e-6)


def test_ring_lists_of_one_query_equal_the_batch(data: Synthetic):
    rng = np.random.default_rng(2)
    c = len(data.prototypes)
    for trial in range(100):
        top = rng.permutation(c)[: int(rng.integers(1, 6))][None].astype(np.int64)
        if trial % 4 == 0:
            top[0, -1] = -1
        for width in (c, 7):
            one = L.ring_lists(top, data.neighbours, width)
            ref = L.ring_lists(_twice(top), data.neighbours, width)
            assert np.array_equal(one, ref[:1]), (trial, width)


def test_fused_search_of_one_query_equals_the_batch(data: Synthetic):
    idx = data.build(quantizer="flat")
    rng = np.random.default_rng(3)
    for i in range(len(data.xq)):
        lists = rng.permutation(len(data.prototypes))[:9][None].astype(np.int64)
        lists[0, 7:] = -1
        bonus = rng.uniform(0, 0.5, size=(1, 9)).astype(np.float32)
        s1, i1 = L.search_fused(idx._ivf, data.xq[i:i + 1], lists, bonus, 10)
        s2, i2 = L.search_fused(idx._ivf, _twice(data.xq[i:i + 1]), _twice(lists), _twice(bonus), 10)
        assert np.array_equal(i1, i2[:1]) and np.array_equal(s1, s2[:1])


@pytest.mark.parametrize("quantizer", ["flat", "pqfs"])
def test_engine_queries_one_at_a_time_equal_the_batch(multi: MultiProto, quantizer: str):
    """A whole search, query by query vs the batch, in every hybrid flavour (rings and fusion use
    every one-query path), with several prototypes per cell."""
    idx = multi.build(quantizer=quantizer)
    xq = multi.base.xq
    for kw in ({"mode": "classify", "top_cells": 4}, {"mode": "hybrid", "top_cells": 3},
               {"mode": "hybrid", "top_cells": 3, "neighbours": True},
               {"mode": "hybrid", "top_cells": 2, "neighbours": True, "fusion_weight": 0.5}):
        batch = idx.search(xq, k=7, **kw)
        for i in range(len(xq)):
            one = idx.search(xq[i:i + 1], k=7, **kw)
            assert np.array_equal(one.cell_ids, batch.cell_ids[i:i + 1]), (kw, i)
            assert np.array_equal(one.cell_scores, batch.cell_scores[i:i + 1]), (kw, i)
            assert np.array_equal(one.ids, batch.ids[i:i + 1]), (kw, i)
            assert np.array_equal(one.scores, batch.scores[i:i + 1]), (kw, i)
            assert np.array_equal(one.lists, batch.lists[i:i + 1, : one.lists.shape[1]]), (kw, i)


def test_dense_cell_scoring_answers_as_the_shortlist_path(multi: MultiProto):
    """A small flat index scores every cell at once (:class:`geoloc.index.scorers.DenseCells`):
    the same index sent down the shortlist path (IndexFlatIP's best prototypes -> distinct cells
    -> exact scores of the ring's cells) answers identically, bit for bit, in every mode, one
    query at a time and in a batch; the cell scores are the brute-force ones."""
    dense = multi.build(quantizer="flat")
    assert dense._dense is not None
    ref = multi.build(quantizer="flat")
    ref._dense = None  # the same index, sent down the shortlist path
    xq = multi.base.xq
    want = multi.cell_scores(xq)
    for kw in ({"mode": "classify", "top_cells": 5}, {"mode": "classify", "top_cells": 100},
               {"mode": "hybrid", "top_cells": 3}, {"mode": "hybrid", "top_cells": 2, "neighbours": True, "fusion_weight": 0.5}):
        for x in (xq, xq[:1], xq[7:8], xq[3:8]):  # 40 queries: the shortlist path here too (BLAS); up to 19: dense
            a, b = dense.search(x, k=7, **kw), ref.search(x, k=7, **kw)
            for field in ("cell_ids", "cell_scores", "ids", "scores", "lists"):
                assert np.array_equal(getattr(a, field), getattr(b, field)), (kw, field, len(x))
        a = dense.search(xq, k=7, **kw)
        ok = a.cell_ids >= 0
        np.testing.assert_allclose(a.cell_scores[ok], np.take_along_axis(want, np.maximum(a.cell_ids, 0), 1)[ok], atol=1e-6)
        assert np.isneginf(a.cell_scores[~ok]).all()


def test_ring_cell_scores_are_the_flat_scorers_values(multi: MultiProto, data: Synthetic):
    """``exact_scores`` (the fusion score of a ring cell nobody scored) uses FAISS's inner-product
    kernel: a cell gets the same score, bit for bit, whether it was scored in the top or as a ring cell."""
    pc = PrototypeCells(multi.prototype_cells, len(multi.prototypes))
    idx = multi.build(quantizer="flat")
    cs, ci = idx.score_cells(data.xq, top_cells=pc.n_cells)
    again = pc.exact_scores(data.xq, ci, multi.prototypes)
    assert np.array_equal(again, cs)
