"""How small can the pqfs cell scorer's codes be? Hybrid recall against exact search, per code size.

    python benchmarks/pqfs_params.py [--size 1000000] [--dim 384] [--queries 1024]
        [--m 192 96 64 48] [--k-factor 8 16] [--out runs/bench/pqfs_params.json]

Draws the ``hard`` model (:class:`geoloc.bench.synthetic.ChunkedCellData`, demo-calibrated cosines
0.196 / 0.004 and 22.7 images per cell, as ``benchmarks/latency.py --bundle indexes/demo`` draws
it) chunk by chunk, finds every query's exact nearest row over all ``--size`` rows, and for each
``pqfs_m`` x ``scorer_k_factor`` reports the scorer's batch-1 time (1 FAISS thread) and hybrid
k = 5's recall against exact search (the exact nearest row's cell among the scorer's 5 cells);
``flat`` (exact scoring) and the ``twolevel`` / ``hnsw`` scorers beside them. The ``pqfs_m``
default (D / 2) rests on this run (:mod:`geoloc.index.scorers`).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np

from geoloc.bench.report import emit
from geoloc.bench.synthetic import ChunkedCellData
from geoloc.config import IndexConfig
from geoloc.index.scorers import SCORERS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1024)
    ap.add_argument("--m", type=int, nargs="+", default=[192, 96, 64, 48])
    ap.add_argument("--k-factor", type=float, nargs="+", default=[8.0, 16.0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench/pqfs_params.json"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    gen = ChunkedCellData(args.size, args.dim, nq=args.queries, intra=0.196, inter=0.004, mean_cell=22.7, seed=1)
    protos, xq = gen.prototypes_and_queries()
    faiss.omp_set_num_threads(faiss.omp_get_max_threads())
    best = np.full(len(xq), -np.inf, np.float32)
    nn_cell = np.zeros(len(xq), np.int64)
    for xb, cells in gen.chunks():  # exact nearest row over the whole database, chunk by chunk
        s = xq @ xb.T
        j = s.argmax(1)
        v = s[np.arange(len(xq)), j]
        up = v > best
        best[up], nn_cell[up] = v[up], cells[j[up]]
    out = {"size": args.size, "dim": args.dim, "n_cells": gen.n_cells, "queries": len(xq), "rows": [],
           "generate_s": time.perf_counter() - t0}
    faiss.omp_set_num_threads(1)

    def row(name: str, **kw) -> None:
        cfg = IndexConfig(quantizer=name, use_gpu=False, **kw)
        faiss.omp_set_num_threads(faiss.omp_get_max_threads())
        t = time.perf_counter()
        owner = SCORERS[name].make(protos, cfg)  # the scorer holds a downcast view: keep the owner alive
        sc = SCORERS[name](owner, cfg)
        build = time.perf_counter() - t
        faiss.omp_set_num_threads(1)
        _, ids = sc.search(xq, 5)
        for i in range(5):
            sc.search(xq[i:i + 1], 5)
        ts = []
        for i in range(min(300, len(xq))):
            t = time.perf_counter()
            sc.search(xq[i:i + 1], 5)
            ts.append(time.perf_counter() - t)
        r = {"scorer": name, **kw, "build_s": build, "ms_per_query": float(np.median(ts)) * 1e3,
             "hybrid_k5_recall_vs_exact": float((ids == nn_cell[:, None]).any(1).mean())}
        print(r, flush=True)
        out["rows"].append(r)

    row("flat")
    for m in args.m:
        for kf in args.k_factor:
            row("pqfs", pqfs_m=m, scorer_k_factor=kf)
    row("twolevel", twolevel_probe=64)
    row("hnsw", hnsw_ef_search=128)
    out["wall_s"] = time.perf_counter() - t0
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
