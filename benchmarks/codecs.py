"""Storage codecs of the cell lists: bytes per vector, recall against exact, and search time.

    python benchmarks/codecs.py [--size 100000] [--dim 384] [--queries 512] [--out runs/bench/codecs.json]

For each ``index.codec`` (flat, sq8, pq at two code sizes) and ``index.refine`` (none, sq8, flat)
the same synthetic database (:func:`geoloc.bench.synthetic.make_cell_data`) is built, then
hybrid (top_cells 5) and retrieve are run. Recall is against the flat codec's own answers
(exact inner products over the same cells, resp. over all rows): ``recall@1`` = share of queries
whose exact best row is returned first, ``recall@10`` = mean share of the exact top-10 among the
returned top-10. Time: median ms per query at batch 1 (1 FAISS thread). Bytes per vector: list
codes + 8-byte ids + the re-ranking store.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np

from geoloc.bench.synthetic import make_cell_data
from geoloc.bench.timing import time_search
from geoloc.config import IndexConfig
from geoloc.index import CellIndex

VARIANTS = [
    {"codec": "flat"},
    {"codec": "sq8"},
    {"codec": "pq", "pq_m": 96},
    {"codec": "pq", "pq_m": 96, "refine": "sq8"},
    {"codec": "pq", "pq_m": 96, "refine": "flat"},
    {"codec": "pq", "pq_m": 48, "refine": "sq8"},
    {"codec": "sq8", "refine": "flat"},
]


def recalls(ids: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """(recall@1, recall@10) of ``ids`` ``[Q, 10]`` against exact ``[Q, 10]``."""
    r1 = float((ids[:, 0] == exact[:, 0]).mean())
    r10 = float(np.mean([len(np.intersect1d(a[a >= 0], b)) / len(b) for a, b in zip(ids, exact, strict=True)]))
    return r1, r10


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/codecs.json"))
    args = ap.parse_args(argv)
    data = make_cell_data(args.size, args.dim, nq=args.queries, seed=args.size)
    rows, exact = [], {}
    print("| codec | refine | B/vector | hybrid k=5 recall@1 | recall@10 | ms/q b1 | retrieve recall@1 | recall@10 | ms/q b1 | build s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for v in VARIANTS:
        t = time.perf_counter()
        faiss.omp_set_num_threads(2)
        idx = CellIndex.build(descriptors=data.xb, cells=data.cells, prototypes=data.prototypes,
                              config=IndexConfig(quantizer="flat", use_gpu=False, **v))
        build_s = time.perf_counter() - t
        row = dict(v, refine=v.get("refine", "none"), db_size=args.size, dim=args.dim,
                   bytes_per_vector=idx.bytes_per_vector(), build_s=build_s)
        faiss.omp_set_num_threads(1)
        for mode, kw in (("hybrid", {"top_cells": 5}), ("retrieve", {})):
            ids = idx.search(data.xq, mode=mode, k=10, **kw).ids
            if v == VARIANTS[0]:
                exact[mode] = ids
            row[f"{mode}_recall_at_1"], row[f"{mode}_recall_at_10"] = recalls(ids, exact[mode])
            row[f"{mode}_ms_b1"] = time_search(lambda x, m=mode, kw=kw: idx.search(x, mode=m, k=10, **kw), data.xq, 1,
                                               budget_s=1.0 if mode == "hybrid" else 3.0, max_calls=300 if mode == "hybrid" else 30)
        rows.append(row)
        print(f"| {v['codec']}{'' if 'pq_m' not in v else ' m=' + str(v['pq_m'])} | {row['refine']} | {row['bytes_per_vector']:.0f} | "
              f"{row['hybrid_recall_at_1']:.3f} | {row['hybrid_recall_at_10']:.3f} | {row['hybrid_ms_b1']:.3f} | "
              f"{row['retrieve_recall_at_1']:.3f} | {row['retrieve_recall_at_10']:.3f} | {row['retrieve_ms_b1']:.2f} | {build_s:.1f} |",
              flush=True)
        del idx
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"size": args.size, "dim": args.dim, "results": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
