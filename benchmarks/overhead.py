"""Per-call overhead of the index's Python around FAISS, at batch 1, and throughput at batch 256.

    python benchmarks/overhead.py [--size 100000] [--dim 384] [--queries 512] [--out runs/bench/overhead.json]

Same data, same cells, one FAISS thread at batch 1:

* ``bare``: the FAISS calls alone (scorer ``search`` for 5 prototypes, then
  ``search_preassigned_c`` over those 5 lists, every buffer and parameter made beforehand);
* ``index``: ``CellIndex.search(mode="hybrid", top_cells=5, k=10)`` (input checks, cell
  shortlist, list search, result object, stage timers);
* the difference is the Python per call. Then queries per second at batch 256 (all threads)
  for every mode. With ``--bundle`` the engine path (``Localizer.localize_descriptors``) is
  timed on the bundle's own vectors too.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import faiss
import numpy as np

from geoloc.bench.report import emit
from geoloc.bench.rows import NCPU
from geoloc.bench.synthetic import make_cell_data
from geoloc.bench.timing import time_search
from geoloc.config import IndexConfig
from geoloc.index import CellIndex


def bare_hybrid(idx: CellIndex, k: int = 10, top: int = 5):
    """The FAISS calls of a hybrid query with nothing around them (batch 1, flat scorer)."""
    ivf = idx.faiss_index
    quant = faiss.downcast_index(ivf.quantizer)
    d = idx.dim
    cs = np.empty((1, top), np.float32)
    ci = np.empty((1, top), np.int64)
    coarse = np.zeros((1, top), np.float32)
    scores = np.empty((1, k), np.float32)
    ids = np.empty((1, k), np.int64)
    params = faiss.SearchParametersIVF(nprobe=top)
    sp = faiss.swig_ptr
    p_cs, p_ci, p_co, p_s, p_i = sp(cs), sp(ci), sp(coarse), sp(scores), sp(ids)

    def run(x: np.ndarray):
        px = sp(x)
        quant.search_c(1, px, top, p_cs, p_ci)
        ivf.search_preassigned_c(1, px, k, p_ci, p_co, p_s, p_i, False, params)
        return ids

    assert d == ivf.d
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--bundle", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/overhead.json"))
    args = ap.parse_args(argv)
    data = make_cell_data(args.size, args.dim, nq=max(args.queries, 512), seed=args.size)
    idx = CellIndex.build(descriptors=data.xb, cells=data.cells, prototypes=data.prototypes,
                          config=IndexConfig(quantizer="flat", use_gpu=False))
    xq = data.xq
    bare = bare_hybrid(idx)
    # same answers
    ref = idx.search(xq[:64], mode="hybrid", top_cells=5, k=10).ids
    got = np.concatenate([bare(np.ascontiguousarray(q[None])).copy() for q in xq[:64]])
    assert np.array_equal(ref, got), "bare FAISS calls and CellIndex.search disagree"
    out = {"size": args.size, "dim": args.dim, "n_cells": idx.nlist}
    faiss.omp_set_num_threads(1)
    rows = [np.ascontiguousarray(q[None]) for q in xq]
    for rnd in range(3):  # interleaved rounds
        out.setdefault("bare_us", []).append(1e3 * time_search(lambda x: bare(x), xq, 1, budget_s=1.0))
        out.setdefault("index_us", []).append(
            1e3 * time_search(lambda x: idx.search(x, mode="hybrid", top_cells=5, k=10), xq, 1, budget_s=1.0))
        out.setdefault("classify_us", []).append(
            1e3 * time_search(lambda x: idx.search(x, mode="classify", top_cells=5), xq, 1, budget_s=1.0))
    del rows
    out["overhead_us"] = float(np.median(out["index_us"]) - np.median(out["bare_us"]))
    faiss.omp_set_num_threads(NCPU)
    for mode, kw in (("classify", {"top_cells": 5}), ("hybrid", {"top_cells": 5, "k": 10}), ("retrieve", {"k": 10})):
        ms = time_search(lambda x, m=mode, kw=kw: idx.search(x, mode=m, **kw), xq, 256, budget_s=3.0, max_calls=5)
        out[f"qps_b256_{mode}"] = 1e3 / ms
    if args.bundle is not None:  # the engine path on a real bundle's own vectors
        from geoloc.engine import Localizer
        loc = Localizer.load(args.bundle)
        bx = loc.bundle.index.vectors()[0][:512]
        bidx = loc.bundle.index
        bb = bare_hybrid(bidx)
        faiss.omp_set_num_threads(1)
        out["bundle_bare_us"] = 1e3 * time_search(lambda x: bb(np.ascontiguousarray(x)), bx, 1, budget_s=1.0)
        out["bundle_index_us"] = 1e3 * time_search(lambda x: bidx.search(x, mode="hybrid", top_cells=5, k=10), bx, 1, budget_s=1.0)
        out["bundle_engine_us"] = 1e3 * time_search(lambda x: loc.localize_descriptors(x, mode="hybrid"), bx, 1, budget_s=1.0)
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
