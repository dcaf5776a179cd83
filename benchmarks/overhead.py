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


def bundle_overhead(folder: Path, n: int = 512, rounds: int = 3) -> dict:
    """The bundle's own query settings (its K sub-centres per cell, ring, fusion) on its own vectors,
    batch 1, one FAISS thread: the FAISS calls alone (the scorer's shortlist search, then the list
    search: one ``search_preassigned_c`` over the lists, or, fused, over the query repeated once
    per list, with the lists each query searches computed beforehand), ``CellIndex.search``, and
    the engine (``Localizer.localize_descriptors``); medians over ``rounds`` interleaved rounds (us)."""
    import time

    from geoloc.engine import Localizer

    loc = Localizer.load(folder)
    q = loc.config.query
    opts = {"mode": "hybrid", "top_cells": q.top_cells, "k": q.top_matches, "neighbours": q.neighbours,
            "fusion_weight": q.fusion_weight}
    idx = loc.bundle.index
    xq = [np.ascontiguousarray(x[None]) for x in idx.vectors()[0][:n]]
    lists = [idx.search(x, **opts).lists for x in xq]
    scorer, k = idx._scorer, opts["k"]  # the bare calls are the index's own FAISS calls
    ivf, quant, m = idx.faiss_index, scorer.index, idx._cells.shortlist(opts["top_cells"])
    sp = faiss.swig_ptr
    fused = bool(opts["fusion_weight"])
    work = []  # every buffer and parameter made beforehand
    for x, li in zip(xq, lists, strict=True):
        w = li.shape[1]
        qx = np.repeat(x, w, axis=0) if fused else x
        lx = np.ascontiguousarray(li.reshape(-1, 1) if fused else li)
        b = len(qx)
        bufs = (np.empty((1, m), np.float32), np.empty((1, m), np.int64), np.zeros(lx.shape, np.float32),
                np.empty((b, k), np.float32), np.empty((b, k), np.int64))
        work.append((x, qx, lx, bufs, faiss.SearchParametersIVF(nprobe=lx.shape[1]), scorer.cached_params(m)))

    def bare(i: int) -> None:
        x, qx, lx, (cs, ci, co, s, ids), params, qp = work[i]
        quant.search_c(1, sp(x), m, sp(cs), sp(ci), qp)
        ivf.search_preassigned_c(len(qx), sp(qx), k, sp(lx), sp(co), sp(s), sp(ids), False, params)

    calls = {"bare": bare, "index": lambda i: idx.search(xq[i], **opts),
             "engine": lambda i: loc.localize_descriptors(xq[i])}
    faiss.omp_set_num_threads(1)
    got: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            for i in range(8):
                fn(i)
            ts = []
            for i in range(len(xq)):
                t = time.perf_counter()
                fn(i)
                ts.append(time.perf_counter() - t)
            got[name].append(float(np.median(ts)) * 1e6)
    faiss.omp_set_num_threads(NCPU)
    med = {name: float(np.median(v)) for name, v in got.items()}
    return {"bundle": str(folder), "bundle_query": opts, "bundle_prototypes": int(quant.ntotal), "bundle_cells": idx.nlist,
            "bundle_bare_us": med["bare"], "bundle_index_us": med["index"], "bundle_engine_us": med["engine"],
            "bundle_overhead_us": med["index"] - med["bare"], "bundle_rounds_us": got}


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
    if args.bundle is not None:
        out |= bundle_overhead(args.bundle)
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
