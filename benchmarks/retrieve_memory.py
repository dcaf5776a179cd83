"""Exact retrieve: latency at batch 1 and batch 256 and the memory it holds, at one database size.

    python benchmarks/retrieve_memory.py [--size 100000] [--dim 384] [--out runs/bench/retrieve_memory.json]

Builds a flat-codec cell index over synthetic cells (:func:`geoloc.bench.synthetic.make_cell_data`),
then times ``mode="retrieve"`` (median ms per query; batch 1 with 1 FAISS thread, batch 256 with
all) and reports the resident memory before and after the first retrieve (``/proc/self/statm``),
and, for comparison under the same load, the former path (a second copy in an ``IndexFlatIP``)
timed interleaved with the new one (two rounds each),
``CellIndex.memory_bytes()``, and whether retrieve's top-10 equals brute force.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import faiss
import numpy as np

from geoloc.bench.report import emit
from geoloc.bench.rows import NCPU
from geoloc.bench.synthetic import make_cell_data
from geoloc.bench.timing import current_rss_bytes, time_search
from geoloc.config import IndexConfig
from geoloc.index import CellIndex


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/retrieve_memory.json"))
    args = ap.parse_args(argv)
    data = make_cell_data(args.size, args.dim, nq=args.queries, seed=args.size)
    idx = CellIndex.build(descriptors=data.xb, cells=data.cells, prototypes=data.prototypes,
                          config=IndexConfig(quantizer="flat", use_gpu=False))
    gt = data.xq[:256] @ data.xb.T
    gt_ids = np.argsort(-gt, axis=1)[:, :10]
    del data.xb, gt
    rss0 = current_rss_bytes()
    res = idx.search(data.xq[:256], mode="retrieve", k=10)
    rss1 = current_rss_bytes()
    out = {"size": args.size, "dim": args.dim, "rss_before_first_retrieve": rss0, "rss_after_first_retrieve": rss1,
           "retrieve_extra_rss": rss1 - rss0, "memory_bytes": idx.memory_bytes(),
           "top1_equals_brute_force": float((res.ids[:, 0] == gt_ids[:, 0]).mean())}
    # the former path, for a fair before/after under the same load: a second flat copy (IndexFlatIP)
    vecs = idx.vectors()[0]
    old = faiss.IndexFlatIP(args.dim)
    old.add(vecs)
    del vecs
    for b in (1, 256):
        faiss.omp_set_num_threads(1 if b == 1 else NCPU)
        for rnd in range(2):  # interleaved: new, old, new, old
            out.setdefault(f"retrieve_ms_per_query_b{b}", []).append(
                time_search(lambda x: idx.search(x, mode="retrieve", k=10), data.xq, b, budget_s=2.0))
            out.setdefault(f"flat_copy_ms_per_query_b{b}", []).append(
                time_search(lambda x: old.search(x, 10), data.xq, b, budget_s=2.0))
    faiss.omp_set_num_threads(NCPU)
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
