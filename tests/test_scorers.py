"""Equivalence tests of the compressed-code and two-level cell scorers against exact (flat) scoring."""

from __future__ import annotations

import numpy as np
import pytest

from geoloc.config import IndexConfig
from geoloc.index import SCORERS, CellIndex
from geoloc.index.scorers import resolve_scorer_name
from test_index import MultiProto, Synthetic

NEW = ("sq8", "pqfs", "twolevel")
EXHAUSTIVE = {"sq8": {"scorer_k_factor": 1000}, "pqfs": {"scorer_k_factor": 1000}, "twolevel": {"twolevel_probe": 1_000_000}}
"""Settings under which each scorer must equal exact scoring: the shortlist / the regions cover every prototype."""


@pytest.fixture(scope="module")
def big() -> Synthetic:
    return Synthetic(n_cells=400, dim=32, per_cell=2, nq=120, noise=0.4, seed=11)


@pytest.mark.parametrize("kind", NEW)
def test_registered_and_known_to_the_config(kind: str):
    assert kind in SCORERS
    assert kind in IndexConfig.__dataclass_fields__["quantizer"].metadata["check"].options


@pytest.mark.parametrize("kind", NEW)
def test_exhaustive_setting_equals_flat(big: Synthetic, kind: str):
    flat = big.build(quantizer="flat").search(big.xq, mode="classify", top_cells=5)
    idx = big.build(quantizer=kind, **EXHAUSTIVE[kind])
    assert idx.quantizer_kind == kind
    res = idx.search(big.xq, mode="classify", top_cells=5)
    assert np.array_equal(res.cell_ids, flat.cell_ids)
    np.testing.assert_allclose(res.cell_scores, flat.cell_scores, atol=1e-6)


@pytest.mark.parametrize("kind", NEW)
def test_default_setting_scores_are_exact_cosines(big: Synthetic, kind: str):
    idx = big.build(quantizer=kind)
    res = idx.search(big.xq, mode="classify", top_cells=5)
    exact = big.xq @ big.prototypes.T
    np.testing.assert_allclose(res.cell_scores, np.take_along_axis(exact, res.cell_ids, 1), atol=1e-5)
    assert (np.diff(res.cell_scores, axis=1) <= 1e-6).all()
    assert (res.cell_ids[:, 0] == exact.argmax(1)).mean() >= (0.9 if kind != "twolevel" else 0.6)
    np.testing.assert_allclose(idx.prototypes(), big.prototypes, atol=1e-6)
    # hybrid over the scorer's cells is exact over those cells' members
    hyb = idx.search(big.xq, mode="hybrid", top_cells=3, k=10)
    allowed = [np.flatnonzero(np.isin(big.cells, row)) for row in hyb.cell_ids]
    for q in range(0, len(big.xq), 17):
        sims = big.xb[allowed[q]] @ big.xq[q]
        want = np.full(10, -np.inf, np.float32)
        want[:min(10, len(sims))] = -np.sort(-sims)[:10]
        np.testing.assert_allclose(hyb.scores[q], want, atol=1e-5)


@pytest.mark.parametrize("kind", NEW)
def test_several_prototypes_per_cell(kind: str):
    multi = MultiProto(Synthetic(n_cells=120, dim=32, per_cell=4, nq=60, noise=0.4, seed=12))
    res = multi.build(quantizer=kind, **EXHAUSTIVE[kind]).search(multi.base.xq, mode="classify", top_cells=4)
    ref = multi.cell_scores(multi.base.xq)
    assert np.array_equal(res.cell_ids, np.argsort(-ref, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(res.cell_scores, -np.sort(-ref, axis=1)[:, :4], atol=1e-5)


@pytest.mark.parametrize("kind", NEW)
def test_save_load_and_switch(big: Synthetic, kind: str, tmp_path):
    idx = big.build(quantizer=kind)
    a = idx.search(big.xq, mode="hybrid", top_cells=3, k=10)
    idx.save(tmp_path)
    same = CellIndex.load(tmp_path, config=IndexConfig(use_gpu=False, quantizer=kind))
    b = same.search(big.xq, mode="hybrid", top_cells=3, k=10)
    assert same.quantizer_kind == kind and np.array_equal(a.cell_ids, b.cell_ids) and np.array_equal(a.ids, b.ids)
    flat = CellIndex.load(tmp_path, config=IndexConfig(use_gpu=False, quantizer="flat"))
    np.testing.assert_allclose(flat.prototypes(), big.prototypes, atol=1e-6)
    back = CellIndex.load(tmp_path, config=IndexConfig(use_gpu=False, quantizer="sq8" if kind != "sq8" else "twolevel"))
    np.testing.assert_allclose(back.prototypes(), big.prototypes, atol=1e-6)


@pytest.mark.parametrize("kind,key,lo,hi", [("pqfs", "scorer_k_factor", 1, 64), ("twolevel", "twolevel_probe", 1, 64)])
def test_per_call_setting_trades_recall(big: Synthetic, kind: str, key: str, lo: float, hi: float):
    idx = big.build(quantizer=kind)
    exact = (big.xq @ big.prototypes.T).argmax(1)
    r_lo = (idx.tuned(**{key: lo}).score_cells(big.xq, 1)[1][:, 0] == exact).mean()
    r_hi = (idx.tuned(**{key: hi}).score_cells(big.xq, 1)[1][:, 0] == exact).mean()
    assert r_hi >= r_lo and r_hi >= 0.95


def test_auto_rule_counts_prototypes():
    cfg = IndexConfig(approx_min_cells=1000)
    assert resolve_scorer_name(cfg, 999) == "flat" and resolve_scorer_name(cfg, 1000) == "pqfs"
    multi = MultiProto(Synthetic(n_cells=150, dim=32, per_cell=2, nq=10, seed=13))
    p = len(multi.prototypes)  # 150 cells, about 300 prototypes
    assert multi.build(quantizer="auto", approx_min_cells=p).quantizer_kind == "pqfs"
    assert multi.build(quantizer="auto", approx_min_cells=p + 1).quantizer_kind == "flat"
