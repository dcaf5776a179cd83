"""Equivalence tests of the cell-partitioned index against reference paths (numpy brute force)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np
import pytest

from geoloc.cells import neighbour_table
from geoloc.config import QUANTIZERS, IndexConfig
from geoloc.errors import BundleError
from geoloc.index import (
    INDEX_FILE,
    NEIGHBOURS_FILE,
    PROTOTYPE_CELLS_FILE,
    SCORERS,
    CellIndex,
    CellScorer,
    SearchTimes,
    register_scorer,
    scorer_names,
)


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class Synthetic:
    """faiss-SyntheticDataset-like clustered data: C cells on a grid, descriptors = centre + noise.

    Attributes: xb ``[N, D]``, cells ``[N]``, prototypes ``[C, D]``, neighbours ``[C, 8]``, xq ``[Q, D]``.
    """

    def __init__(self, *, n_cells: int = 36, dim: int = 32, per_cell: int = 20, nq: int = 40, noise: float = 0.5, seed: int = 0):
        rng = np.random.default_rng(seed)
        side = int(np.ceil(np.sqrt(n_cells)))
        centres = _normalise(rng.normal(size=(n_cells, dim)))
        sizes = rng.integers(per_cell // 2, per_cell * 2, size=n_cells)
        self.cells = np.repeat(np.arange(n_cells, dtype=np.int64), sizes)
        rng.shuffle(self.cells)
        self.xb = _normalise(centres[self.cells] + noise * rng.normal(size=(len(self.cells), dim)) / np.sqrt(dim) * 3)
        self.prototypes = _normalise(np.stack([self.xb[self.cells == c].mean(0) for c in range(n_cells)]))
        qc = rng.integers(0, n_cells, size=nq)
        self.query_cells = qc
        self.xq = _normalise(centres[qc] + noise * rng.normal(size=(nq, dim)) / np.sqrt(dim) * 3)
        p, q = np.arange(n_cells) // side, np.arange(n_cells) % side
        self.neighbours = neighbour_table(np.full(n_cells, 33), np.zeros(n_cells, bool), p, q)

    def build(self, **cfg) -> CellIndex:
        return CellIndex.build(descriptors=self.xb, cells=self.cells, prototypes=self.prototypes,
                               neighbours=self.neighbours, config=IndexConfig(use_gpu=False, **cfg))


@pytest.fixture(scope="module")
def data() -> Synthetic:
    return Synthetic()


@pytest.fixture(scope="module")
def index(data: Synthetic) -> CellIndex:
    return data.build(quantizer="flat")


def brute_force(xq: np.ndarray, xb: np.ndarray, k: int, allowed: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reference top-k by inner product; ``allowed[i]`` restricts query i to those row ids."""
    sims = xq @ xb.T
    if allowed is not None:
        mask = np.full(sims.shape, -np.inf, dtype=np.float32)
        for i, rows in enumerate(allowed):
            mask[i, rows] = 0
        sims = sims + mask
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, axis=1), ids


def assert_same_topk(scores, ids, ref_scores, ref_ids, atol=1e-5):
    """Scores equal within float tolerance; ids equal except where tied scores may swap."""
    valid = ref_ids >= 0
    np.testing.assert_allclose(scores[valid], ref_scores[valid], atol=atol)
    assert np.array_equal(ids < 0, ~valid) if valid.shape == ids.shape else True
    mism = ids != ref_ids
    if mism.any():  # only allowed inside ties
        gaps = np.abs(np.diff(ref_scores, axis=1))
        tied = np.zeros_like(mism)
        tied[:, 1:] |= gaps < atol
        tied[:, :-1] |= gaps < atol
        assert not (mism & ~tied).any(), "ids differ outside tied scores"


def test_basic_properties(index: CellIndex, data: Synthetic):
    assert index.ntotal == len(data.xb) and index.nlist == len(data.prototypes) and index.dim == data.xb.shape[1]
    vecs, cells = index.vectors()
    assert np.array_equal(vecs, data.xb) and np.array_equal(cells, data.cells)
    for c in (0, 5, 35):
        assert np.array_equal(np.sort(index.cell_members(c)), np.flatnonzero(data.cells == c))
    assert index.faiss_index.nprobe == 1  # never touched by searches


def test_retrieve_equals_brute_force(index: CellIndex, data: Synthetic):
    res = index.search(data.xq, mode="retrieve", k=10)
    assert res.cell_ids.shape == (len(data.xq), 0)
    assert res.ids.shape == (len(data.xq), 10)
    assert_same_topk(res.scores, res.ids, *brute_force(data.xq, data.xb, 10))
    assert (np.diff(res.scores, axis=1) <= 0).all()


def test_hybrid_all_cells_equals_retrieve(index: CellIndex, data: Synthetic):
    scan = data.build(quantizer="flat", retrieve_blas_min_batch=10**6)  # retrieve by the hybrid kernel
    full = scan.search(data.xq, mode="retrieve", k=10)
    hyb = index.search(data.xq, mode="hybrid", top_cells=index.nlist, k=10)
    assert np.array_equal(hyb.scores, full.scores)  # same kernel, bit-identical
    assert_same_topk(hyb.scores, hyb.ids, full.scores, full.ids, atol=0)
    blas = index.search(data.xq, mode="retrieve", k=10)  # 40 queries: BLAS over list blocks
    assert_same_topk(blas.scores, blas.ids, full.scores, full.ids, atol=1e-5)


@pytest.mark.parametrize("top_cells", [1, 3, 7])
def test_restricted_search_equals_brute_force_over_cells(index: CellIndex, data: Synthetic, top_cells: int):
    res = index.search(data.xq, mode="hybrid", top_cells=top_cells, k=10)
    allowed = [np.flatnonzero(np.isin(data.cells, row)) for row in res.cell_ids]
    assert_same_topk(res.scores, res.ids, *brute_force(data.xq, data.xb, 10, allowed))
    assert np.isin(res.ids, np.concatenate(allowed)).all()


def test_classify_equals_argmax_over_prototypes(index: CellIndex, data: Synthetic):
    res = index.search(data.xq, mode="classify", top_cells=5)
    sims = data.xq @ data.prototypes.T
    assert np.array_equal(res.cell_ids[:, 0], sims.argmax(1))
    np.testing.assert_allclose(res.cell_scores, -np.sort(-sims, axis=1)[:, :5], atol=1e-5)
    assert res.ids.shape == (len(data.xq), 0)
    s, i = index.score_cells(data.xq, 5)
    assert np.array_equal(i, res.cell_ids)


def test_neighbour_ring_searches_exactly_the_ring(index: CellIndex, data: Synthetic):
    k = 2000  # more than any ring holds: returns every searched row
    res = index.search(data.xq, mode="hybrid", top_cells=2, k=k, neighbours=True)
    for i, top in enumerate(res.cell_ids):
        want_cells = set(top.tolist()) | set(data.neighbours[top].ravel().tolist())
        want_cells.discard(-1)
        want_rows = np.flatnonzero(np.isin(data.cells, list(want_cells)))
        got = res.ids[i][res.ids[i] >= 0]
        assert np.array_equal(np.sort(got), want_rows)
        assert len(got) == len(set(got.tolist()))  # each list scanned once
    sc, ids = brute_force(data.xq, data.xb, 10, [np.flatnonzero(np.isin(data.cells, list(
        (set(t.tolist()) | set(data.neighbours[t].ravel().tolist())) - {-1}))) for t in res.cell_ids])
    res10 = index.search(data.xq, mode="hybrid", top_cells=2, k=10, neighbours=True)
    assert_same_topk(res10.scores, res10.ids, sc, ids)


def test_neighbours_required(data: Synthetic):
    idx = CellIndex.build(descriptors=data.xb, cells=data.cells, prototypes=data.prototypes,
                          config=IndexConfig(use_gpu=False, quantizer="flat"))
    with pytest.raises(ValueError, match="neighbour"):
        idx.search(data.xq, mode="hybrid", neighbours=True)


def test_padding_when_fewer_results(index: CellIndex, data: Synthetic):
    res = index.search(data.xq[:3], mode="hybrid", top_cells=1, k=500)
    assert (res.ids[:, -1] == -1).all() and np.isneginf(res.scores[:, -1]).all()
    res = index.search(data.xq[:3], mode="classify", top_cells=index.nlist + 4)
    assert (res.cell_ids[:, -4:] == -1).all()
    res = index.search(data.xq[:3], mode="hybrid", top_cells=index.nlist + 4, k=5)
    assert (res.ids >= 0).all()


def test_save_load_identical(index: CellIndex, data: Synthetic, tmp_path):
    paths = index.save(tmp_path)
    assert {p.name for p in paths} == {INDEX_FILE, "cell_neighbours.npy"}
    loaded = CellIndex.load(tmp_path, config=IndexConfig(use_gpu=False, quantizer="flat"))
    assert np.array_equal(loaded.neighbours, data.neighbours)
    for mode, kw in [("retrieve", {}), ("hybrid", {"top_cells": 3}), ("hybrid", {"top_cells": 2, "neighbours": True}),
                     ("classify", {"top_cells": 4})]:
        a, b = index.search(data.xq, mode=mode, **kw), loaded.search(data.xq, mode=mode, **kw)
        for f in ("cell_ids", "cell_scores", "ids", "scores"):
            assert np.array_equal(getattr(a, f), getattr(b, f)), (mode, f)


def test_load_switches_quantizer(index: CellIndex, data: Synthetic, tmp_path):
    index.save(tmp_path)
    h = CellIndex.load(tmp_path, config=IndexConfig(use_gpu=False, quantizer="hnsw"))
    assert h.quantizer_kind == "hnsw"
    np.testing.assert_allclose(h.prototypes(), data.prototypes, atol=1e-6)


def test_hnsw_quantizer_recall(data: Synthetic):
    big = Synthetic(n_cells=2000, dim=32, per_cell=4, nq=300, noise=0.4, seed=1)
    idx = big.build(quantizer="hnsw", hnsw_ef_search=64)
    assert idx.quantizer_kind == "hnsw"
    res = idx.search(big.xq, mode="classify", top_cells=5)
    true_top = (big.xq @ big.prototypes.T).argmax(1)
    assert (res.cell_ids[:, 0] == true_top).mean() >= 0.95
    # scores are cosines (positive inner products), not negated distances
    np.testing.assert_allclose(res.cell_scores[:, 0], (big.xq * big.prototypes[res.cell_ids[:, 0]]).sum(1), atol=1e-5)
    auto = big.build(quantizer="auto", approx_min_cells=1000)
    assert auto.quantizer_kind == "pqfs"  # the auto rule: pqfs from approx_min_cells prototypes on
    assert big.build(quantizer="auto").quantizer_kind == "flat"


def test_lsh_quantizer_shortlist_is_reranked_exactly(tmp_path):
    big = Synthetic(n_cells=3000, dim=64, per_cell=3, nq=300, noise=0.4, seed=2)
    idx = big.build(quantizer="lsh", lsh_k_factor=16)
    assert idx.quantizer_kind == "lsh"
    exact_scores = big.xq @ big.prototypes.T
    res = idx.search(big.xq, mode="classify", top_cells=5)
    assert (res.cell_ids[:, 0] == exact_scores.argmax(1)).mean() >= 0.95
    # every returned score is the exact cosine of that cell, in descending order
    np.testing.assert_allclose(res.cell_scores, np.take_along_axis(exact_scores, res.cell_ids, 1), atol=1e-5)
    assert (np.diff(res.cell_scores, axis=1) <= 1e-6).all()
    np.testing.assert_allclose(idx.prototypes(), big.prototypes, atol=1e-6)
    hyb = idx.search(big.xq, mode="hybrid", top_cells=3)
    idx.save(tmp_path)
    again = CellIndex.load(tmp_path, config=IndexConfig(use_gpu=False, quantizer="lsh"))
    assert again.quantizer_kind == "lsh"
    hyb2 = again.search(big.xq, mode="hybrid", top_cells=3)
    assert np.array_equal(hyb.ids, hyb2.ids) and np.array_equal(hyb.cell_ids, hyb2.cell_ids)


def test_concurrent_searches_equal_serial(data: Synthetic):
    idx = data.build(quantizer="flat")
    jobs = [(t % 8 + 1, bool(t % 2)) for t in range(32)]
    serial = [idx.search(data.xq, mode="hybrid", top_cells=tc, k=10, neighbours=nb) for tc, nb in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        par = list(pool.map(lambda j: idx.search(data.xq, mode="hybrid", top_cells=j[0], k=10, neighbours=j[1]), jobs))
    for s, p in zip(serial, par):
        assert np.array_equal(s.ids, p.ids) and np.array_equal(s.scores, p.scores)
    # and the HNSW (per-call efSearch) and LSH scorers
    for kind in ("hnsw", "lsh"):
        h = data.build(quantizer=kind)
        serial = [h.search(data.xq, mode="hybrid", top_cells=tc, k=10) for tc, _ in jobs]
        with ThreadPoolExecutor(max_workers=8) as pool:
            par = list(pool.map(lambda j: h.search(data.xq, mode="hybrid", top_cells=j[0], k=10), jobs))
        for s, p in zip(serial, par):
            assert np.array_equal(s.ids, p.ids) and np.array_equal(s.cell_ids, p.cell_ids)


@pytest.mark.parametrize("damage", ["missing", "truncated", "garbage", "empty"])
def test_corrupt_index_file_raises_bundle_error(index: CellIndex, tmp_path, damage: str):
    index.save(tmp_path)
    path = tmp_path / INDEX_FILE
    raw = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a faiss index" * 10)
    else:
        path.write_bytes(b"")
    with pytest.raises(BundleError) as err:
        CellIndex.load(tmp_path, config=IndexConfig(use_gpu=False))
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg


def test_wrong_index_type_raises_bundle_error(tmp_path):
    flat = faiss.IndexFlatIP(8)
    faiss.write_index(flat, str(tmp_path / INDEX_FILE))
    with pytest.raises(BundleError, match="not a geoloc cell index"):
        CellIndex.load(tmp_path, config=IndexConfig(use_gpu=False))


def test_input_validation(data: Synthetic, index: CellIndex):
    cfg = IndexConfig(use_gpu=False)
    with pytest.raises(ValueError, match="out of range"):
        CellIndex.build(descriptors=data.xb, cells=data.cells + 1, prototypes=data.prototypes, config=cfg)
    with pytest.raises(ValueError, match="dimension"):
        CellIndex.build(descriptors=data.xb[:, :16], cells=data.cells, prototypes=data.prototypes, config=cfg)
    with pytest.raises(ValueError, match="shape"):
        CellIndex.build(descriptors=data.xb, cells=data.cells[:-1], prototypes=data.prototypes, config=cfg)
    with pytest.raises(ValueError, match="L2-normalised"):
        CellIndex.build(descriptors=data.xb * 2, cells=data.cells, prototypes=data.prototypes, config=cfg)
    with pytest.raises(ValueError, match="float32"):
        CellIndex.build(descriptors=data.xb.astype(int), cells=data.cells, prototypes=data.prototypes, config=cfg)
    with pytest.raises(ValueError, match="neighbours"):
        CellIndex.build(descriptors=data.xb, cells=data.cells, prototypes=data.prototypes, neighbours=np.zeros((3, 8), int), config=cfg)
    with pytest.raises(ValueError, match="mode"):
        index.search(data.xq, mode="nearest")
    with pytest.raises(ValueError, match="dimension"):
        index.search(data.xq[:, :10], mode="hybrid")
    with pytest.raises(ValueError, match="2-D"):
        index.search(data.xq[0], mode="hybrid")
    with pytest.raises(ValueError, match="top_cells"):
        index.search(data.xq, mode="hybrid", top_cells=0)
    res = index.search(data.xq[:0], mode="hybrid", k=3)
    assert res.ids.shape == (0, 3)


def _has_gpu() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs faiss with GPU support and a CUDA GPU")
def test_gpu_equals_cpu(data: Synthetic):  # pragma: no cover - no GPU here
    cpu = data.build(quantizer="flat")
    gpu = CellIndex.build(descriptors=data.xb, cells=data.cells, prototypes=data.prototypes,
                          neighbours=data.neighbours, config=IndexConfig(use_gpu=True, quantizer="flat"))
    assert gpu.on_gpu
    for mode, kw in [("retrieve", {}), ("hybrid", {"top_cells": 3}), ("hybrid", {"top_cells": 2, "neighbours": True}),
                     ("classify", {"top_cells": 4})]:
        a, b = cpu.search(data.xq, mode=mode, **kw), gpu.search(data.xq, mode=mode, **kw)
        assert np.array_equal(a.cell_ids, b.cell_ids), mode
        assert_same_topk(b.scores, b.ids, a.scores, a.ids, atol=1e-4)


# --- several prototypes per cell, fused ranking, result fields, scorer registry -------------

class MultiProto:
    """Synthetic data with 1-3 prototypes per cell (shuffled rows) on top of :class:`Synthetic`.

    Attributes: base (Synthetic), prototypes ``[P, D]``, prototype_cells ``[P]``.
    """

    def __init__(self, base: Synthetic, seed: int = 3):
        rng = np.random.default_rng(seed)
        c, d = base.prototypes.shape
        per = rng.integers(1, 4, size=c)
        pc = np.repeat(np.arange(c, dtype=np.int64), per)
        protos = _normalise(base.prototypes[pc] + 0.6 * rng.normal(size=(len(pc), d)) / np.sqrt(d) * 3)
        order = rng.permutation(len(pc))
        self.base, self.prototypes, self.prototype_cells = base, protos[order], pc[order]

    def build(self, **cfg) -> CellIndex:
        b = self.base
        return CellIndex.build(descriptors=b.xb, cells=b.cells, prototypes=self.prototypes, prototype_cells=self.prototype_cells,
                               neighbours=b.neighbours, config=IndexConfig(use_gpu=False, **cfg))

    def cell_scores(self, xq: np.ndarray) -> np.ndarray:
        """Reference ``[Q, C]``: max over each cell's prototypes of the cosine."""
        sims = xq @ self.prototypes.T
        out = np.full((len(xq), self.prototype_cells.max() + 1), -np.inf, dtype=np.float32)
        for j, c in enumerate(self.prototype_cells):
            out[:, c] = np.maximum(out[:, c], sims[:, j])
        return out


@pytest.fixture(scope="module")
def multi(data: Synthetic) -> MultiProto:
    return MultiProto(data)


def test_multi_prototype_flat_scores_equal_brute_force(multi: MultiProto):
    idx = multi.build(quantizer="flat")
    assert idx.nlist == multi.base.prototypes.shape[0] and len(idx.prototypes()) == len(multi.prototypes)
    ref = multi.cell_scores(multi.base.xq)
    for k in (1, 5, idx.nlist, idx.nlist + 3):
        s, c = idx.score_cells(multi.base.xq, k)
        ref_ids = np.argsort(-ref, axis=1, kind="stable")[:, :k]
        ref_s = np.take_along_axis(ref, ref_ids, 1)
        if k > idx.nlist:
            ref_ids = np.pad(ref_ids, ((0, 0), (0, k - idx.nlist)), constant_values=-1)
            ref_s = np.pad(ref_s, ((0, 0), (0, k - idx.nlist)), constant_values=-np.inf)
        assert_same_topk(s, c, ref_s, ref_ids)
        assert all(len(set(r[r >= 0].tolist())) == (r >= 0).sum() for r in c)  # distinct cells


@pytest.mark.parametrize("kind", ["lsh", "hnsw"])
def test_multi_prototype_approximate_scorers(kind: str):
    big = Synthetic(n_cells=1500, dim=64, per_cell=3, nq=200, noise=0.4, seed=4)
    mp = MultiProto(big)
    idx = mp.build(quantizer=kind, lsh_k_factor=16, hnsw_ef_search=64)
    ref = mp.cell_scores(big.xq)
    s, c = idx.score_cells(big.xq, 5)
    assert (c[:, 0] == ref.argmax(1)).mean() >= 0.95
    np.testing.assert_allclose(s, np.take_along_axis(ref, c, 1), atol=1e-5)  # exact cell scores
    assert (np.diff(s, axis=1) <= 1e-6).all()


def test_multi_prototype_save_load_identical(multi: MultiProto, tmp_path):
    idx = multi.build(quantizer="flat")
    names = {p.name for p in idx.save(tmp_path)}
    assert names == {INDEX_FILE, NEIGHBOURS_FILE, PROTOTYPE_CELLS_FILE}
    xq = multi.base.xq
    for kind in ("flat", "lsh", "hnsw"):
        again = CellIndex.load(tmp_path, config=IndexConfig(use_gpu=False, quantizer=kind))
        assert again.quantizer_kind == kind and np.array_equal(again.prototype_cells, multi.prototype_cells)
        if kind == "flat":
            for kw in ({"mode": "hybrid", "top_cells": 3, "neighbours": True, "fusion_weight": 0.3}, {"mode": "classify"}):
                a, b = idx.search(xq, **kw), again.search(xq, **kw)
                for f in ("cell_ids", "cell_scores", "ids", "scores", "lists", "scanned"):
                    assert np.array_equal(getattr(a, f), getattr(b, f)), (kw, f)
    # back to one prototype per cell: the stale table is removed
    multi.base.build(quantizer="flat").save(tmp_path)
    assert not (tmp_path / PROTOTYPE_CELLS_FILE).exists()


def test_damaged_prototype_cells_file_raises_bundle_error(multi: MultiProto, tmp_path):
    multi.build(quantizer="flat").save(tmp_path)
    np.save(tmp_path / PROTOTYPE_CELLS_FILE, multi.prototype_cells[:-1])
    with pytest.raises(BundleError, match=PROTOTYPE_CELLS_FILE):
        CellIndex.load(tmp_path, config=IndexConfig(use_gpu=False))
    (tmp_path / PROTOTYPE_CELLS_FILE).unlink()
    with pytest.raises(BundleError, match="prototypes for"):
        CellIndex.load(tmp_path, config=IndexConfig(use_gpu=False))


def test_prototype_cells_validation(data: Synthetic):
    cfg = IndexConfig(use_gpu=False)
    pc = np.arange(len(data.prototypes))
    pc[3] = 4  # cell 3 has no prototype
    with pytest.raises(ValueError, match="no prototype"):
        CellIndex.build(descriptors=data.xb, cells=data.cells, prototypes=data.prototypes, prototype_cells=pc, config=cfg)
    with pytest.raises(ValueError, match="shape"):
        CellIndex.build(descriptors=data.xb, cells=data.cells, prototypes=data.prototypes, prototype_cells=pc[:-1], config=cfg)


def fused_brute_force(mp: MultiProto, lists: np.ndarray, weight: float, k: int):
    """Reference fused top-k: over the rows of each query's lists, ip + weight * exact cell score."""
    b = mp.base
    score = b.xq @ b.xb.T + weight * mp.cell_scores(b.xq)[:, b.cells]
    allowed = np.zeros(score.shape, bool)
    for i, row in enumerate(lists):
        allowed[i] = np.isin(b.cells, row[row >= 0])
    score = np.where(allowed, score, -np.inf).astype(np.float32)
    ids = np.argsort(-score, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(score, ids, 1), np.where(np.isfinite(np.take_along_axis(score, ids, 1)), ids, -1)


@pytest.mark.parametrize("neighbours", [False, True])
@pytest.mark.parametrize("weight", [0.3, 2.0])
def test_fused_hybrid_equals_brute_force(multi: MultiProto, neighbours: bool, weight: float):
    idx = multi.build(quantizer="flat")
    res = idx.search(multi.base.xq, mode="hybrid", top_cells=3, k=15, neighbours=neighbours, fusion_weight=weight)
    assert_same_topk(res.scores, res.ids, *fused_brute_force(multi, res.lists, weight, 15))
    plain = idx.search(multi.base.xq, mode="hybrid", top_cells=3, k=15, neighbours=neighbours)
    assert np.array_equal(res.lists, plain.lists) and np.array_equal(res.cell_ids, plain.cell_ids)
    assert not np.array_equal(res.ids, plain.ids)  # the weight changes the ranking on this data


def test_fusion_weight_zero_is_plain_hybrid_and_all_cells_is_retrieve(index: CellIndex, data: Synthetic):
    for nb in (False, True):
        a = index.search(data.xq, mode="hybrid", top_cells=3, k=10, neighbours=nb)
        b = index.search(data.xq, mode="hybrid", top_cells=3, k=10, neighbours=nb, fusion_weight=0.0)
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.scores, b.scores)
    full = index.search(data.xq, mode="retrieve", k=10)
    hyb = index.search(data.xq, mode="hybrid", top_cells=index.nlist, k=10, fusion_weight=0.0)
    assert np.array_equal(hyb.ids, full.ids) and np.array_equal(hyb.scores, full.scores)
    with pytest.raises(ValueError, match="fusion_weight"):
        index.search(data.xq, mode="hybrid", fusion_weight=float("nan"))


def test_result_lists_scanned_and_times(index: CellIndex, data: Synthetic):
    res = index.search(data.xq, mode="hybrid", top_cells=2, k=5, neighbours=True)
    sizes = np.bincount(data.cells, minlength=index.nlist)
    for i, row in enumerate(res.lists):
        want = (set(res.cell_ids[i].tolist()) | set(data.neighbours[res.cell_ids[i]].ravel().tolist())) - {-1}
        assert set(row[row >= 0].tolist()) == want
        assert res.scanned[i] == sizes[list(want)].sum()
    assert isinstance(res.times, SearchTimes) and res.times.search_ms >= 0
    assert set(res.timings_ms) >= {"cells", "search"} and res.timings_ms["cells"] == res.times.cells_ms
    ret = index.search(data.xq, mode="retrieve", k=5)
    assert (ret.scanned == index.ntotal).all() and ret.lists.shape == (len(data.xq), 0)
    cls = index.search(data.xq, mode="classify")
    assert (cls.scanned == 0).all() and cls.times.search_ms == 0.0


def test_registering_a_scorer_is_one_class(data: Synthetic, tmp_path):
    """A new scorer (fp16 codes, exact enough) works through build, search and save/load untouched."""

    @register_scorer("fp16_test")
    class Fp16Scorer(CellScorer):
        @classmethod
        def empty(cls, d, config):
            return faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)

        @classmethod
        def owns(cls, index):
            return isinstance(index, faiss.IndexScalarQuantizer)

        def flat_storage(self):
            return None

    # geoloc.config checks index.quantizer against its own closed list when a config is made;
    # a scorer that ships in geoloc.index.scorers is added there too (test_config_knows_every_scorer)
    cfg = IndexConfig(use_gpu=False)
    cfg.quantizer = "fp16_test"
    try:
        assert "fp16_test" in scorer_names()
        idx = CellIndex.build(descriptors=data.xb, cells=data.cells, prototypes=data.prototypes, neighbours=data.neighbours,
                              config=cfg)
        assert idx.quantizer_kind == "fp16_test"
        res = idx.search(data.xq, mode="classify", top_cells=3)
        ref = data.xq @ data.prototypes.T
        assert (res.cell_ids[:, 0] == ref.argmax(1)).mean() >= 0.95
        np.testing.assert_allclose(res.cell_scores, np.take_along_axis(ref, res.cell_ids, 1), atol=2e-3)
        idx.save(tmp_path)
        again = CellIndex.load(tmp_path, config=cfg)
        assert np.array_equal(again.search(data.xq, mode="hybrid", top_cells=3).ids, idx.search(data.xq, mode="hybrid", top_cells=3).ids)
    finally:
        SCORERS.pop("fp16_test")
    with pytest.raises(ValueError, match="index.quantizer must be one of"):
        CellIndex.build(descriptors=data.xb, cells=data.cells, prototypes=data.prototypes, config=cfg)


def test_config_knows_every_scorer():
    assert set(QUANTIZERS) == set(scorer_names())


def test_tuned_shares_lists_and_changes_only_search_parameters(data: Synthetic):
    h = data.build(quantizer="hnsw", hnsw_ef_search=16)
    wide = h.tuned(hnsw_ef_search=256)
    assert wide.faiss_index is h.faiss_index and wide.quantizer_kind == "hnsw"
    exact = data.build(quantizer="flat").search(data.xq, mode="classify", top_cells=5)
    assert np.array_equal(wide.search(data.xq, mode="classify", top_cells=5).cell_ids, exact.cell_ids)
    with pytest.raises(ValueError, match="lsh_k_factor: not a per-call parameter of the hnsw"):
        h.tuned(lsh_k_factor=4)


def test_concurrent_fused_multi_prototype_searches_equal_serial(multi: MultiProto):
    idx = multi.build(quantizer="flat")
    xq = multi.base.xq
    jobs = [(t % 5 + 1, bool(t % 2), 0.25 * (t % 3)) for t in range(24)]

    def run(job):
        tc, nb, w = job
        return idx.search(xq, mode="hybrid", top_cells=tc, k=10, neighbours=nb, fusion_weight=w)

    serial = [run(j) for j in jobs]
    with ThreadPoolExecutor(max_workers=8) as pool:
        par = list(pool.map(run, jobs))
    for s, p in zip(serial, par, strict=True):
        assert np.array_equal(s.ids, p.ids) and np.array_equal(s.scores, p.scores) and np.array_equal(s.scanned, p.scanned)
