"""What each way of scoring the cells costs, at one database size.

    python benchmarks/cell_scoring.py [--size 1000000] [--dim 384] [--bundle indexes/demo] [--k 5]
        [--out runs/bench/cell_scoring.json]

With C cells, the hybrid mode first scores the query against C prototypes; at 10^6 images
(~43,000 cells) that scan, not the restricted database search, sets the cost. This compares
exact scanning, LSH codes with exact re-ranking (several code lengths and shortlists) and an
HNSW graph over the prototypes, at batch 1 with one thread: time per query, and the share of
queries whose *correct* cell (the cell of the exact best database match) is among the k
kept. The synthetic cells are calibrated like benchmarks/latency.py (on --bundle when given).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np

from geoloc.bench.synthetic import (DEFAULT_INTER_COS, DEFAULT_INTRA_COS, DEFAULT_MEAN_CELL_SIZE, bundle_cell_data,
                                    make_cell_data)
from geoloc.config import IndexConfig
from geoloc.index import CellIndex

VARIANTS = [("flat", {})]
VARIANTS += [("lsh", {"lsh_bits": bits, "lsh_k_factor": kf}) for bits in (384, 768, 1024) for kf in (16, 64)]
VARIANTS += [("hnsw", {"hnsw_ef_search": ef}) for ef in (64, 128, 256)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--queries", type=int, default=1024)
    ap.add_argument("--bundle", type=Path, default=None, help="calibrate the cells' spread on this bundle")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/cell_scoring.json"))
    args = ap.parse_args()

    intra, inter, mean_cell = DEFAULT_INTRA_COS, DEFAULT_INTER_COS, DEFAULT_MEAN_CELL_SIZE
    if args.bundle:
        b, intra, inter = bundle_cell_data(args.bundle, 16)
        mean_cell = len(b.xb) / len(b.prototypes)
    data = make_cell_data(args.size, args.dim, nq=args.queries, intra=intra, inter=inter, mean_cell=mean_cell,
                          seed=args.size)
    c = len(data.prototypes)
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(data.xb)
    true_cell = data.cells[exact.search(data.xq, 1)[1][:, 0]]  # the cell of the exact best match
    del exact
    print(f"N={args.size} C={c} D={args.dim}, intra {intra:.3f} / inter {inter:.3f} cosine, mean cell {mean_cell:.1f}")

    faiss.omp_set_num_threads(1)
    rows = []
    for kind, kw in VARIANTS:
        idx = CellIndex.build(descriptors=data.xb[:0], cells=data.cells[:0], prototypes=data.prototypes,
                              config=IndexConfig(quantizer=kind, use_gpu=False, **kw))
        for q in data.xq[:20]:
            idx.score_cells(q[None], args.k)
        t = time.perf_counter()
        for q in data.xq:
            idx.score_cells(q[None], args.k)
        ms = (time.perf_counter() - t) / len(data.xq) * 1e3
        _, ids = idx.score_cells(data.xq, args.k)
        kept = float(np.mean([tc in row for tc, row in zip(true_cell, ids, strict=True)]))
        rows.append({"scorer": kind, **kw, "cells": c, "k": args.k, "ms_per_query": ms, "correct_cell_kept": kept,
                     "bytes_per_cell": idx.memory_bytes()["quantizer"] / c})
        print(f"| {kind} {json.dumps(kw)} | {ms:.3f} ms | correct cell in top {args.k}: {kept:.3f} |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"size": args.size, "dim": args.dim, "intra_cos": intra, "inter_cos": inter,
                                    "mean_cell": mean_cell, "results": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
