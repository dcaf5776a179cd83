"""A database too large for float32 in RAM: chunked build with compressed lists, peak memory, latency.

    python benchmarks/big_index.py [--size 10000000] [--dim 512] [--codec sq8] [--refine none]
        [--chunk-cells 8192] [--queries 256] [--out runs/bench/big_index.json]

Generates :func:`geoloc.bench.synthetic.make_cell_data`'s model chunk by chunk
(:class:`geoloc.bench.synthetic.ChunkedCellData`: one pass for the prototypes, one for the lists),
builds with :meth:`geoloc.index.CellIndex.build_chunked`, and reports build time, peak resident
memory (``ru_maxrss``), ``memory_bytes()``, and batch-1 latency (1 FAISS thread) of classify and
hybrid k=5 with the ``auto`` scorer, plus hybrid's recall@10 of the top-1 against retrieve over
the same lists (exact over the stored codes) on a few queries. At 10^7 x 512-d, float32 lists
would need 20 GB; sq8 needs 5.2 GB (+ 0.8 GB ids), pq (m = 128) 2.1 GB.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss

from geoloc.bench.report import emit
from geoloc.bench.synthetic import ChunkedCellData
from geoloc.bench.timing import current_rss_bytes, peak_rss_bytes, time_search
from geoloc.config import IndexConfig
from geoloc.index import CellIndex


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=10_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--codec", default="sq8", choices=("flat", "sq8", "pq"))
    ap.add_argument("--pq-m", type=int, default=0)
    ap.add_argument("--refine", default="none", choices=("none", "sq8", "flat"))
    ap.add_argument("--chunk-cells", type=int, default=8192)
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--recall-queries", type=int, default=16, help="queries checked against retrieve (a full scan each)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/big_index.json"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    gen = ChunkedCellData(args.size, args.dim, nq=args.queries, chunk_cells=args.chunk_cells, seed=1)
    protos, xq = gen.prototypes_and_queries()
    t1 = time.perf_counter()
    print(f"prototypes of {gen.n_cells} cells in {t1 - t0:.0f}s, RSS {current_rss_bytes() / 2**30:.2f} GiB", flush=True)
    cfg = IndexConfig(use_gpu=False, codec=args.codec, pq_m=args.pq_m, refine=args.refine)
    idx = CellIndex.build_chunked(chunks=gen.chunks(), train_sample=gen.sample(65536), prototypes=protos,
                                  neighbours=gen.neighbours, config=cfg)
    t2 = time.perf_counter()
    out = {"size": args.size, "dim": args.dim, "codec": args.codec, "refine": args.refine, "n_cells": gen.n_cells,
           "scorer": idx.quantizer_kind, "prototype_pass_s": t1 - t0, "build_s": t2 - t1,
           "memory_bytes": idx.memory_bytes(), "bytes_per_vector": idx.bytes_per_vector(),
           "rss_after_build_bytes": current_rss_bytes(), "peak_rss_bytes": peak_rss_bytes()}
    print(json.dumps(out), flush=True)
    faiss.omp_set_num_threads(1)
    out["classify_ms_b1"] = time_search(lambda x: idx.search(x, mode="classify", top_cells=5), xq, 1, budget_s=2.0)
    out["hybrid_ms_b1"] = time_search(lambda x: idx.search(x, mode="hybrid", top_cells=5, k=10), xq, 1, budget_s=2.0)
    faiss.omp_set_num_threads(faiss.omp_get_max_threads())
    nr = min(args.recall_queries, len(xq))
    t = time.perf_counter()
    full = idx.search(xq[:nr], mode="retrieve", k=10)
    out["retrieve_ms_per_query"] = (time.perf_counter() - t) / nr * 1e3
    hyb = idx.search(xq[:nr], mode="hybrid", top_cells=5, k=10)
    out["hybrid_recall_vs_retrieve"] = float((hyb.ids == full.ids[:, :1]).any(axis=1).mean())
    out["peak_rss_bytes"] = peak_rss_bytes()
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
