"""What each cell scorer costs and how often it keeps the right cell, at 10^4..10^6 cells.

    python benchmarks/cell_scoring.py [--cells 10000 100000] [--per-cell 1 4] [--dim 384] [--k 5]
        [--queries 512] [--scorers flat lsh hnsw sq8 pqfs twolevel] [--data hard realistic]
        [--bundle indexes/NAME] [--out runs/bench/cell_scoring.json]

Data (``--data``): ``hard`` = prototypes and queries of the synthetic model of
benchmarks/latency.py without the database (:func:`geoloc.bench.synthetic.make_prototype_data`;
``--per-cell K`` prototypes per cell, one per heading group), so 10^6 cells fit. ``realistic`` =
the generator of :mod:`geoloc.bench.realistic` (calibrated on ``--bundle``, else its power-law
defaults) with its database: about ``cells x`` the calibrated mean cell size rows, ``K``
spherical k-means sub-centres per cell as the prototypes (what the trained heads are stood in
by), and a third recall: the share of queries whose exact nearest database row lies in one of the
scorer's top ``k`` cells, i.e. hybrid's recall against exact search with ``k`` cells.

For every registered scorer (a few settings each) at batch 1 with one FAISS thread: median ms per
query of ``CellIndex.score_cells(q, k)``, and cell recall = share of queries whose exact top cell
(best cosine over the cell's prototypes, computed by the ``flat`` scorer) is among the scorer's
top ``k`` (also reported for top 1). The rule of ``index.quantizer: auto`` is derived from this
table (:func:`geoloc.index.scorers.resolve_scorer_name`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import faiss
import numpy as np

from geoloc.bench.realistic import default_calibration, make_realistic_data
from geoloc.bench.synthetic import make_prototype_data
from geoloc.bench.timing import current_rss_bytes, time_search
from geoloc.config import IndexConfig
from geoloc.index import CellIndex

SETTINGS = {
    "flat": [{}],
    "lsh": [{"lsh_k_factor": 16}, {"lsh_k_factor": 64}],
    "hnsw": [{"hnsw_ef_search": 64}, {"hnsw_ef_search": 128}],
    "sq8": [{"scorer_k_factor": 8}],
    "pqfs": [{"scorer_k_factor": 8}, {"scorer_k_factor": 32}],
    "twolevel": [{"twolevel_probe": 8}, {"twolevel_probe": 32}],
}
"""Per scorer: the first setting is built, the others reuse it via ``CellIndex.tuned``."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--per-cell", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--queries", type=int, default=512)
    ap.add_argument("--scorers", nargs="+", default=list(SETTINGS))
    ap.add_argument("--max-hnsw-prototypes", type=int, default=200_000, help="skip HNSW above this many prototypes (build time)")
    ap.add_argument("--data", nargs="+", choices=("hard", "realistic"), default=["hard"])
    ap.add_argument("--bundle", type=Path, default=None, help="calibrate the realistic generator on this bundle")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/cell_scoring.json"))
    args = ap.parse_args(argv)
    calib = realistic_calibration(args) if "realistic" in args.data else None
    rows = []
    print("| data | cells | K | P | scorer | setting | ms/query | cell recall@1 | cell recall@k | nn-cell recall@k | scorer MB | build s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for data, c, per in ((d, c, p) for d in args.data for c in args.cells for p in args.per_cell):
        protos, pc, xq, nn_cell = prototype_data(data, c, per, args, calib)
        pcs = None if per == 1 else pc
        n_cells = int(pc.max()) + 1  # realistic: the cells the generator drew
        truth = None
        for kind in args.scorers:
            if kind == "hnsw" and len(protos) > args.max_hnsw_prototypes:
                continue
            faiss.omp_set_num_threads(2)
            t = time.perf_counter()
            base = CellIndex.build(descriptors=np.empty((0, args.dim), np.float32), cells=np.empty(0, np.int64),
                                   prototypes=protos, prototype_cells=pcs,
                                   config=IndexConfig(quantizer=kind, use_gpu=False, **SETTINGS[kind][0]))
            build_s = time.perf_counter() - t
            faiss.omp_set_num_threads(1)
            for setting in SETTINGS[kind]:
                idx = base.tuned(**setting) if setting is not SETTINGS[kind][0] else base
                _, ids = idx.score_cells(xq, args.k)
                if kind == "flat":
                    truth = ids[:, 0]
                ms = time_search(lambda x, idx=idx: idx.score_cells(x, args.k), xq, 1, budget_s=1.5)
                r1 = float((ids[:, 0] == truth).mean())
                rk = float((ids == truth[:, None]).any(axis=1).mean())
                mb = idx.memory_bytes()["quantizer"] / 1e6
                rn = None if nn_cell is None else float((ids == nn_cell[:, None]).any(axis=1).mean())
                rows.append({"data": data, "cells": n_cells, "per_cell": per, "prototypes": len(protos), "scorer": kind, **setting,
                             "k": args.k, "ms_per_query": ms, "cell_recall_at_1": r1, "cell_recall_at_k": rk,
                             "nn_cell_recall_at_k": rn,
                             "scorer_bytes": mb * 1e6, "build_s": build_s, "rss_bytes": current_rss_bytes()})
                print(f"| {data} | {n_cells} | {per} | {len(protos)} | {kind} | {json.dumps(setting)} | {ms:.4f} | {r1:.3f} | {rk:.3f} | "
                      f"{'-' if rn is None else f'{rn:.3f}'} | "
                      f"{mb:.1f} | {build_s:.1f} |", flush=True)
            del base, idx
        del protos, pc, xq
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"dim": args.dim, "k": args.k, "queries": args.queries, "bundle": str(args.bundle),
                                        "results": rows}, indent=1))
    print(f"wrote {args.out}")
    return 0


def realistic_calibration(args: argparse.Namespace) -> dict:
    """The realistic generator's calibration: measured on ``--bundle`` (its dimension replaces
    ``--dim``), else the power-law defaults at ``--dim``."""
    if args.bundle is None:
        return default_calibration(args.dim)
    from geoloc.bench.calibration import bundle_twin_data

    calib = bundle_twin_data(args.bundle, cache=args.out.with_suffix(".queries.npz"))[2]
    args.dim = int(calib["dim"])
    return calib


def prototype_data(data: str, cells: int, per: int, args: argparse.Namespace,
                   calib: dict | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Prototypes ``[P, D]``, their cells ``[P]``, queries ``[Q, D]``, and for realistic data the cell
    of each query's exact nearest database row ``[Q]`` (None for hard: it has no database)."""
    if data == "hard":
        return (*make_prototype_data(cells, args.dim, per_cell=per, nq=args.queries, seed=cells + per), None)
    mean_size = float(np.exp(calib["size_log_mu"] + calib["size_log_sigma"] ** 2 / 2))  # lognormal mean, before clipping
    d = make_realistic_data(round(cells * mean_size), dict(calib, prototypes_per_cell=per), nq=args.queries,
                            query_noise=float(calib.get("query_noise", 1.5)), seed=cells + per)
    faiss.omp_set_num_threads(2)
    flat = faiss.IndexFlatIP(d.xb.shape[1])
    flat.add(d.xb)
    nn = flat.search(d.xq, 1)[1][:, 0]
    pc = np.arange(len(d.prototypes), dtype=np.int64) if d.prototype_cells is None else d.prototype_cells
    return d.prototypes, pc, d.xq, d.cells[nn]


if __name__ == "__main__":
    raise SystemExit(main())
