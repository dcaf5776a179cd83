"""The benchmark helpers (geoloc.bench) on tiny inputs: the generator hits its calibration, and a
latency pass yields the rows, keys and targets benchmarks/latency.py writes."""

from __future__ import annotations

import numpy as np
import pytest

from geoloc.bench import report
from geoloc.bench.realistic import (
    calibrate,
    default_calibration,
    effective_dims,
    make_realistic_data,
)
from geoloc.bench.rows import HYBRID_TOP_CELLS, RowLog, engine_rows, hnsw_rows, ivf_rows
from geoloc.bench.synthetic import make_cell_data, make_prototype_data, measure_cosines
from geoloc.bench.timing import recall_at, time_search

ROW_KEYS = ["mode", "source", "db_size", "n_cells", "dim", "batch_size", "search_ms_per_query", "recall_vs_flat",
            "bytes_read_per_query", "floor_ms", "x_floor", "bytes_per_vector", "peak_rss_bytes", "threads"]


def test_generator_reproduces_the_requested_cosines():
    data = make_cell_data(6000, 64, nq=10, intra=0.5, inter=0.1, seed=3)
    intra, inter = measure_cosines(data.xb, data.cells)
    assert abs(intra - 0.5) < 0.04 and abs(inter - 0.1) < 0.04
    assert np.allclose(np.linalg.norm(data.prototypes, axis=1), 1, atol=1e-5)
    assert data.neighbours.shape == (len(data.prototypes), 8)


def test_timing_helpers():
    xq = np.zeros((8, 4), np.float32)
    calls = []
    ms = time_search(lambda x: calls.append(len(x)), xq, 2, budget_s=0.01, warmup=1)
    assert ms >= 0 and set(calls) == {2}
    assert recall_at(np.array([[1, 2], [3, 4]]), np.array([2, 5])) == 0.5


def test_curve_vs_hnsw_takes_the_fastest_hnsw_row_reaching_each_recall():
    def row(mode, ms, rec, **kw):
        return {"mode": mode, "search_ms_per_query": ms, "recall_vs_flat": rec, **kw}

    rows = [row("hybrid", 0.5, 0.8, cell_scoring="pqfs", top_cells=20), row("hybrid", 0.2, 0.5, cell_scoring="pqfs", top_cells=5),
            row("hybrid", 0.1, 0.9, cell_scoring="flat", top_cells=5),  # another scorer: not on this curve
            row("hybrid", 9.0, 0.99, cell_scoring="pqfs", top_cells=100),
            row("hnsw32", 0.4, 0.5, ef_search=16), row("hnsw32", 0.3, 0.6, ef_search=32), row("hnsw32", 2.0, 0.85, ef_search=64)]
    curve = report.curve_vs_hnsw(rows, "pqfs")
    assert [c["top_cells"] for c in curve] == [5, 20, 100]
    assert curve[0]["hnsw_ms_at_equal_recall"] == 0.3 and curve[0]["speedup_vs_hnsw32"] == pytest.approx(1.5)  # ef 32 is faster than ef 16
    assert curve[1]["hnsw_ms_at_equal_recall"] == 2.0 and curve[1]["speedup_vs_hnsw32"] == pytest.approx(4.0)
    assert curve[2]["hnsw_ms_at_equal_recall"] is None and curve[2]["speedup_vs_hnsw32"] is None  # HNSW never reaches 0.99


def test_latency_rows_keys_and_targets():
    data = make_cell_data(3000, 32, nq=64, seed=1)
    log = RowLog(data, "synthetic", bandwidth=1e10, budget_s=0.005)
    gt1 = engine_rows(log, batches=[1], quick=True)
    ivf_rows(log, gt1, batches=[1])
    hnsw_rows(log, gt1, batches=[1], quick=True)
    modes = {r["mode"] for r in log.rows}
    assert modes == {"retrieve", "classify", "hybrid", "ivf_flat", "hnsw32"}
    assert all(list(r)[:len(ROW_KEYS)] == ROW_KEYS for r in log.rows)
    retrieve = [r for r in log.rows if r["mode"] == "retrieve"]
    assert retrieve[0]["recall_vs_flat"] == 1.0
    hyb_all = [r for r in log.rows if r["mode"] == "hybrid" and r["top_cells"] == len(data.prototypes)]
    assert not hyb_all  # k = 1, 5, 20, 100 only
    hnsw_efs = {r.get("ef_search") for r in log.rows if r["mode"] == "hybrid" and r["cell_scoring"] == "hnsw"}
    assert hnsw_efs == {32, 128}
    t = report.targets(log.rows, len(data.xb))
    assert {"db_size", "hybrid_row", "flat_ms", "speedup_vs_flat", "hnsw_row", "speedup_vs_hnsw32", "default_row"} <= set(t)
    issue_keys = {"data", "db_size", "default_row", "default_ms", "default_recall", "flat_ms", "default_speedup_vs_flat",
                  "hnsw_ms_at_default_recall", "hnsw_best_recall", "hnsw_best_ms", "speedup_vs_hnsw32_at_equal_recall"}
    assert issue_keys <= set(t) and t["data"] == "hard"
    assert t["default_speedup_vs_flat"] == pytest.approx(t["flat_ms"] / t["default_ms"])
    if t["hnsw_ms_at_default_recall"] is None:
        assert t["speedup_vs_hnsw32_at_equal_recall"] is None and t["hnsw_best_recall"] < t["default_recall"]
    else:
        assert t["speedup_vs_hnsw32_at_equal_recall"] == pytest.approx(t["hnsw_ms_at_default_recall"] / t["default_ms"])
    curve = t["default_curve"]
    assert [c["top_cells"] for c in curve] == list(HYBRID_TOP_CELLS)
    assert all(c["speedup_vs_hnsw32"] is None if c["hnsw_ms_at_equal_recall"] is None
               else c["speedup_vs_hnsw32"] == pytest.approx(c["hnsw_ms_at_equal_recall"] / c["hybrid_ms"]) for c in curve)
    assert next(c for c in curve if c["top_cells"] == 5)["hybrid_ms"] == t["default_ms"]
    assert report.targets(log.rows, len(data.xb), "realistic") == {}  # no realistic rows here
    side = report.side_by_side(log.rows, log.rows)
    assert side and all(s["real_ms"] == s["twin_ms"] for s in side)
    assert report.markdown(log.rows).count("\n") == len(log.rows) + 1


def test_realistic_generator_reproduces_its_calibration():
    """Generate from a calibration, re-calibrate on the result: spectra, sizes and the global mean come back."""
    c0 = default_calibration(48, seed=1)
    data = make_realistic_data(20000, c0, nq=32, seed=2)
    assert data.xb.shape == (20000, 48) and np.allclose(np.linalg.norm(data.xb, axis=1), 1, atol=1e-5)
    assert (np.diff(data.cells) >= 0).all() and data.xq.shape == (32, 48)
    c1 = calibrate(data.xb, data.cells)
    assert abs(float((c1["mean"] ** 2).sum()) - float((c0["mean"] ** 2).sum())) < 0.03
    assert abs(c1["offset_spectrum"].sum() - c0["offset_spectrum"].sum()) < 0.1
    assert 0.5 < effective_dims(c1["offset_spectrum"]) / effective_dims(c0["offset_spectrum"]) < 1.6
    assert 0.5 < effective_dims(c1["centre_spectrum"]) / effective_dims(c0["centre_spectrum"]) < 2.0
    assert abs(c1["size_log_mu"] - c0["size_log_mu"]) < 0.2
    # far fewer effective dimensions than the hard generator's isotropic noise
    hard = make_cell_data(20000, 48, nq=4, seed=2)
    assert effective_dims(calibrate(hard.xb, hard.cells)["offset_spectrum"]) > 1.5 * effective_dims(c1["offset_spectrum"])


def test_prototype_generator_shapes():
    protos, pc, xq = make_prototype_data(500, 32, per_cell=3, nq=20, seed=1)
    assert protos.shape == (1500, 32) and np.array_equal(pc, np.repeat(np.arange(500), 3)) and xq.shape == (20, 32)
    assert np.allclose(np.linalg.norm(protos, axis=1), 1, atol=1e-5)
    sims = xq @ protos.T  # every query is a photo of some cell: its best prototype stands far out
    assert sims.max(1).mean() > sims.mean() + 0.3


def test_chunked_generator_is_deterministic_and_consistent():
    from geoloc.bench.synthetic import ChunkedCellData, normalise, segment_sum
    gen = ChunkedCellData(5000, 16, nq=8, chunk_cells=20, seed=3)
    a, b = list(gen.chunks()), list(gen.chunks())
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) for x, y in zip(a, b, strict=True))
    xb, cells = np.concatenate([x[0] for x in a]), np.concatenate([x[1] for x in a])
    assert len(xb) == 5000 and (np.diff(cells) >= 0).all() and cells.max() + 1 == gen.n_cells
    protos, xq = gen.prototypes_and_queries()
    ref = np.zeros_like(protos)
    segment_sum(ref, cells, xb)
    np.testing.assert_allclose(protos, normalise(ref), atol=1e-5)
    assert np.allclose(np.linalg.norm(xq, axis=1), 1, atol=1e-5)


def test_realistic_adjacency_and_query_noise_calibration():
    """Adjacent-cell centre correlation and the query noise are measured and reproduced."""
    from geoloc.bench.realistic import fit_query_noise
    c0 = default_calibration(32, seed=4)
    plain = make_realistic_data(12000, c0, nq=8, seed=5)
    c0["centre_adjacent_cos"] = 0.3
    corr = make_realistic_data(12000, c0, nq=8, seed=5)
    a_plain = calibrate(plain.xb, plain.cells, neighbours=plain.neighbours)["centre_adjacent_cos"]
    a_corr = calibrate(corr.xb, corr.cells, neighbours=corr.neighbours)["centre_adjacent_cos"]
    assert a_plain < 0.08 and a_corr > a_plain + 0.12
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 16)).astype(np.float32)
    cells = np.repeat(np.arange(50), 40)
    xb = centres[cells] + 0.3 * rng.standard_normal((2000, 16)).astype(np.float32)
    qc = rng.integers(0, 50, 400)
    xq = centres[qc] + 0.3 * np.sqrt(1.5) * rng.standard_normal((400, 16)).astype(np.float32)
    assert abs(fit_query_noise({"heading_share": 0.0}, xb, cells, xq, qc) - 1.5) < 0.15


def test_query_stats_on_a_generated_set():
    from geoloc.bench.calibration import query_stats
    data = make_realistic_data(3000, default_calibration(24, seed=1), nq=50, seed=3)
    s = query_stats(data, ks=(1, 5), db_rows=200)
    assert 0 <= s["nn_cell_in_top_1"] <= s["nn_cell_in_top_5"] <= s["nn_cell_in_top_5_ring"] <= 1
    assert 0 <= s["db_nn_same_cell"] <= s["db_nn_in_ring"] <= 1 and s["queries"] == 50


def test_look_alike_scenes_and_query_fidelity():
    """Shared scenes put database nearest neighbours in other cells; a query that keeps less of its
    cell's centre finds its own cell first less often; the defaults leave the generator unchanged."""
    from geoloc.bench.realistic import nn_stats
    c0 = default_calibration(32, seed=2)
    base = make_realistic_data(4000, c0, nq=200, seed=3)
    again = make_realistic_data(4000, dict(c0, view_share=0.0, query_centre_fidelity=1.0), nq=200, seed=3)
    assert np.array_equal(base.xb, again.xb) and np.array_equal(base.xq, again.xq)
    alike = make_realistic_data(4000, dict(c0, view_share=0.8, view_group=3.0), nq=200, seed=3)
    assert nn_stats(alike.xb, alike.cells)[1] < nn_stats(base.xb, base.cells)[1] - 0.05
    def own_first(d):
        return float((np.argmax(d.xq @ d.prototypes.T, axis=1) == d.params["query_cells"]).mean())
    shifted = make_realistic_data(4000, dict(c0, query_centre_fidelity=0.2), nq=200, seed=3)
    assert own_first(shifted) < own_first(base) - 0.1


def test_latency_rows_with_several_prototypes_per_cell():
    """A real bundle has K sub-centres per cell (the demo K = 4): the rows, the classify and hybrid
    recall and the calibration statistics count cells, not prototypes (this crashed on such a bundle)."""
    from dataclasses import replace

    from geoloc.bench.calibration import query_stats
    base = make_cell_data(3000, 32, nq=64, seed=1)
    rng = np.random.default_rng(0)
    pc = np.repeat(np.arange(len(base.prototypes)), 3)
    protos = base.prototypes[pc] + 0.05 * rng.standard_normal((len(pc), 32)).astype(np.float32)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    data = replace(base, prototypes=protos, prototype_cells=pc)
    assert data.n_cells == len(base.prototypes)
    scores = data.cell_scores(data.xq)
    assert scores.shape == (len(data.xq), data.n_cells)
    np.testing.assert_allclose(scores[:, 7], (data.xq @ protos[pc == 7].T).max(1), atol=1e-6)
    log = RowLog(data, "bundle", bandwidth=1e10, budget_s=0.005)
    engine_rows(log, batches=[1], quick=True, scorers=("flat",))
    assert {r["n_cells"] for r in log.rows} == {data.n_cells}
    classify = [r for r in log.rows if r["mode"] == "classify"]
    assert classify and all(r["recall_vs_flat"] > 0.5 for r in classify)
    s = query_stats(data, ks=(1, 5), db_rows=200)
    assert s["n_cells"] == data.n_cells and 0 < s["nn_cell_in_top_1"] <= s["nn_cell_in_top_5"] <= 1


def test_subcentre_prototypes_find_the_looks_of_a_cell():
    """Per-cell spherical k-means: one sub-centre is the normalised cell mean; two recover the two
    looks a cell was drawn from; a cell with fewer rows than k repeats them."""
    from geoloc.bench.realistic import subcentre_prototypes
    from geoloc.bench.synthetic import normalise
    rng = np.random.default_rng(0)
    looks = normalise(rng.standard_normal((6, 2, 32)).reshape(12, 32)).reshape(6, 2, 32)
    sizes = np.array([40, 25, 60, 1, 33, 18])
    cells = np.repeat(np.arange(6), sizes)
    which = rng.integers(0, 2, len(cells))
    which[cells == 3] = 0
    xb = normalise(looks[cells, which] + 0.05 * rng.standard_normal((len(cells), 32)).astype(np.float32))
    p1, c1 = subcentre_prototypes(xb, cells, 1)
    means = normalise(np.stack([xb[cells == c].mean(0) for c in range(6)]))
    np.testing.assert_allclose(p1, means, atol=1e-5)
    assert np.array_equal(c1, np.arange(6))
    p2, c2 = subcentre_prototypes(xb, cells, 2, chunk=17)  # chunks smaller than a cell
    assert p2.shape == (12, 32) and np.array_equal(c2, np.repeat(np.arange(6), 2))
    np.testing.assert_allclose(np.linalg.norm(p2, axis=1), 1, atol=1e-5)
    for c in (0, 1, 2, 4, 5):  # both looks present: each is some sub-centre's, one to one
        best = (looks[c] @ p2[c2 == c].T)
        assert best.max(1).min() > 0.99 and set(best.argmax(1)) == {0, 1}
    np.testing.assert_allclose(p2[c2 == 3], np.repeat(xb[cells == 3], 2, axis=0), atol=1e-6)


def test_realistic_twin_with_sub_centres():
    """``prototypes_per_cell`` K gives K sub-centres per cell that the index takes; rows and queries
    are the same as with K = 1 (the sub-centres draw from their own generator)."""
    from geoloc.config import IndexConfig
    from geoloc.index import CellIndex
    c0 = default_calibration(32, seed=2)
    one = make_realistic_data(3000, c0, nq=64, seed=3)
    four = make_realistic_data(3000, dict(c0, prototypes_per_cell=4), nq=64, seed=3)
    assert np.array_equal(one.xb, four.xb) and np.array_equal(one.xq, four.xq)
    assert one.prototype_cells is None and four.n_cells == one.n_cells == len(one.prototypes)
    assert len(four.prototypes) == 4 * four.n_cells and np.array_equal(np.bincount(four.prototype_cells), np.full(four.n_cells, 4))
    idx = CellIndex.build(**four.index_arrays(), config=IndexConfig(quantizer="flat", use_gpu=False))
    res = idx.search(four.xq, mode="classify", k=5)
    np.testing.assert_array_equal(res.cell_ids[:, 0], four.cell_scores(four.xq).argmax(1))
    # several looks per cell: a row's best sub-centre is closer to it than its cell's mean is
    best_sub = np.max(np.stack([(four.xb * four.prototypes[four.cells * 4 + j]).sum(1) for j in range(4)]), axis=0)
    mean_cos = (one.xb * one.prototypes[one.cells]).sum(1)
    assert best_sub.mean() > mean_cos.mean() + 0.02


def test_cell_scoring_benchmark_on_realistic_prototypes(tmp_path):
    import argparse
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import cell_scoring
    finally:
        sys.path.pop(0)
    out = tmp_path / "cs.json"
    assert cell_scoring.main(["--cells", "40", "--per-cell", "1", "3", "--dim", "32", "--queries", "48", "--k", "5",
                              "--data", "hard", "realistic", "--scorers", "flat", "pqfs", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {(r["data"], r["per_cell"], r["scorer"]) for r in rows} == {
        (d, k, s) for d in ("hard", "realistic") for k in (1, 3) for s in ("flat", "pqfs")}
    for r in rows:
        assert r["prototypes"] == r["cells"] * r["per_cell"]  # every realistic cell has its K sub-centres
        if r["scorer"] == "flat":
            assert r["cell_recall_at_1"] == 1.0  # flat is the reference
        if r["data"] == "hard":
            assert r["nn_cell_recall_at_k"] is None  # no database rows: no nearest row
        else:
            assert 0.0 < r["nn_cell_recall_at_k"] <= 1.0
    # hybrid's ceiling with exact scoring: the cell of each query's nearest row, checked by hand
    protos, pc, xq, nn_cell = cell_scoring.prototype_data("realistic", 40, 3, argparse.Namespace(dim=32, queries=48),
                                                          default_calibration(32))
    scores = xq @ protos.T
    cell_best = np.full((len(xq), int(pc.max()) + 1), -np.inf)
    np.maximum.at(cell_best.T, pc, scores.T)
    top5 = np.argsort(-cell_best, axis=1)[:, :5]
    flat3 = next(r for r in rows if r["data"] == "realistic" and r["per_cell"] == 3 and r["scorer"] == "flat")
    assert flat3["nn_cell_recall_at_k"] == pytest.approx(float((top5 == nn_cell[:, None]).any(axis=1).mean()))
