"""The benchmark helpers (geoloc.bench) on tiny inputs: the generator hits its calibration, and a
latency pass yields the rows, keys and targets benchmarks/latency.py writes."""

from __future__ import annotations

import numpy as np

from geoloc.bench import report
from geoloc.bench.rows import RowLog, engine_rows, hnsw_rows, ivf_rows
from geoloc.bench.synthetic import make_cell_data, measure_cosines
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
    assert not hyb_all  # k = 1, 5, 20 only
    hnsw_efs = {r.get("ef_search") for r in log.rows if r["mode"] == "hybrid" and r["cell_scoring"] == "hnsw"}
    assert hnsw_efs == {32, 128}
    t = report.targets(log.rows, len(data.xb))
    assert {"db_size", "hybrid_row", "flat_ms", "speedup_vs_flat", "hnsw_row", "speedup_vs_hnsw32", "default_row"} <= set(t)
    assert report.markdown(log.rows).count("\n") == len(log.rows) + 1
