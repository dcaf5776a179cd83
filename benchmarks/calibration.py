"""Side by side: a real bundle with its real queries, and the realistic synthetic twin of the same size.

    python benchmarks/calibration.py [--bundle indexes/demo] [--sizes 100000] [--out runs/bench/calibration.json]

The real side is the bundle's own database with its real query photos (``queries.csv`` beside the
database folder, encoded once with the bundle's backbone; cached as ``<out>.queries.npz``), or a
held-out tenth of the database where there are none. The twin is
:func:`geoloc.bench.realistic.make_realistic_data` calibrated on the bundle (spectra, cell sizes,
heading quadrants, adjacency of cell centres, and the query noise the real queries show), with as
many k-means sub-centres per cell as the bundle's heads have; the same k-means on the real rows
(``real_kmeans_prototypes`` in ``stats``) shows how well they stand in for trained heads. Both get
the same batch-1 rows as ``benchmarks/latency.py`` (classify / hybrid per cell scorer, IVF-Flat,
HNSW32; recall = exact top-1 within the row's top-10) plus hybrid with the flat scorer at k = 50
and 100, and :func:`geoloc.bench.calibration.query_stats` (where the exact nearest row lies).
``--sizes``: twins of larger sizes from the same calibration (statistics and hybrid k sweep only;
no real counterpart): what the calibration predicts at scale.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import faiss
import numpy as np

from geoloc.bench import report
from geoloc.bench.calibration import bundle_twin_data, query_stats
from geoloc.bench.realistic import make_realistic_data, subcentre_prototypes
from geoloc.bench.realistic import summary as realistic_summary
from geoloc.bench.rows import TOPK, RowLog, engine_rows, hnsw_rows, ivf_rows, log
from geoloc.bench.synthetic import CellData
from geoloc.bench.timing import measure_bandwidth, recall_at
from geoloc.config import IndexConfig
from geoloc.index import CellIndex

WIDE_K = (50, 100)


def wide_hybrid_rows(rl: RowLog, gt1: np.ndarray) -> None:
    """Hybrid with the exact (flat) scorer at the larger ``WIDE_K`` top cells (batch 1)."""
    d = rl.data
    idx = CellIndex.build(**d.index_arrays(), config=IndexConfig(quantizer="flat", use_gpu=False))
    for kc in WIDE_K:
        if kc > idx.nlist:
            continue
        res = idx.search(d.xq, mode="hybrid", top_cells=kc, k=TOPK)
        ms = rl.timed(lambda x, kc=kc: idx.search(x, mode="hybrid", top_cells=kc, k=TOPK), 1)
        dim = d.xb.shape[1]
        rl.add("hybrid", 1, ms, recall_at(res.ids, gt1), res.scanned.mean() * (dim * 4 + 8), dim * 4 + 8,
               cell_scoring="flat", top_cells=kc)


def geo_accuracy(real: CellData, info: dict, threshold_m: float = 25.0) -> dict:
    """Share of real queries whose top-1 answer lies within ``threshold_m`` of the true position:
    exact search, hybrid (flat scorer) at k = 1, 5, 20, 50 (with and without neighbour rings), HNSW32."""
    d = real
    idx = CellIndex.build(**d.index_arrays(), config=IndexConfig(quantizer="flat", use_gpu=False))
    pos, qpos = info["db_positions"], info["query_positions"]

    def ok(ids: np.ndarray) -> float:
        top = ids[:, 0]
        return float((np.linalg.norm(pos[np.maximum(top, 0)] - qpos, axis=1) <= threshold_m)[top >= 0].sum() / len(top))

    out = {"threshold_m": threshold_m, "exact": ok(idx.search(d.xq, mode="retrieve", k=1).ids)}
    for kc in (1, 5, 20, 50):
        for ring in (False, True):
            out[f"hybrid_k{kc}{'_ring' if ring else ''}"] = ok(idx.search(d.xq, mode="hybrid", top_cells=kc, k=1, neighbours=ring).ids)
    h = faiss.IndexHNSWFlat(d.xb.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    h.add(d.xb)
    for ef in (16, 64):
        out[f"hnsw32_ef{ef}"] = ok(h.search(d.xq, 1, params=faiss.SearchParametersHNSW(efSearch=ef))[1])
    return out


def all_rows(data: CellData, source: str, kind: str, bw: float) -> list[dict]:
    rl = RowLog(data, source, bw, budget_s=1.0, data_kind=kind)
    gt1 = engine_rows(rl, batches=[1], quick=False)
    wide_hybrid_rows(rl, gt1)
    ivf_rows(rl, gt1, batches=[1])
    hnsw_rows(rl, gt1, batches=[1], quick=False)
    return rl.rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=Path("indexes/demo"))
    ap.add_argument("--sizes", type=int, nargs="*", default=[], help="larger twins: statistics only")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/calibration.json"))
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cache = args.out.with_suffix(".queries.npz")
    real, twin, calib, info = bundle_twin_data(args.bundle, cache=cache)
    log(f"real: {len(real.xb)} rows, {real.n_cells} cells ({len(real.prototypes)} prototypes), {len(real.xq)} queries from {info['query_source']}")
    log(f"calibration: {json.dumps(realistic_summary(calib))}, query_noise {calib['query_noise']:.3f}")
    stats = {"real": query_stats(real, info["real_query_cells"]), "twin": query_stats(twin)}
    # the twin's k-means sub-centres stand in for trained heads: the same stand-in on the real rows
    k = int(calib.get("prototypes_per_cell", 1))
    if k > 1:
        protos, pcells = subcentre_prototypes(real.xb, real.cells, k)
        stand_in = CellData(real.xb, real.cells, protos, real.neighbours, real.xq, {}, pcells)
        stats["real_kmeans_prototypes"] = query_stats(stand_in, info["real_query_cells"])
    stats["real_geo_top1_within_25m"] = geo_accuracy(real, info)
    log(json.dumps(stats, indent=1))
    bw = measure_bandwidth(0.25)["best_Bps"]
    rows = all_rows(real, "bundle", "bundle", bw) + all_rows(twin, "synthetic", "realistic-twin", bw)
    side = report.side_by_side([r for r in rows if r["source"] == "bundle"], [r for r in rows if r["source"] == "synthetic"])
    scale = []
    for n in args.sizes:
        t = time.perf_counter()
        big = make_realistic_data(n, calib, nq=len(real.xq), query_noise=calib["query_noise"], seed=n)
        scale.append(query_stats(big, ks=(1, 5, 20, 50, 100)))
        log(f"twin N={n} ({time.perf_counter() - t:.0f}s): {json.dumps(scale[-1])}")
        del big
    faiss.omp_set_num_threads(faiss.omp_get_max_threads())
    out = {"bundle": str(args.bundle), "query_source": info["query_source"],
           "calibration": realistic_summary(calib) | {"query_noise": calib["query_noise"]},
           "stats": stats, "side_by_side": side, "scale_stats": scale, "results": rows,
           "recall_definition": "share of queries whose exact (flat inner-product) top-1 is among the row's top-10",
           "wall_s": time.perf_counter() - t0, "command": " ".join(["python", *sys.argv])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    keys = [k for k in stats["real"] if k in stats["twin"] and k != "real_geo_top1_within_25m"]
    km = stats.get("real_kmeans_prototypes", {})
    print("| statistic | real | real, k-means sub-centres | realistic twin |\n|---|---|---|---|")
    print("\n".join(f"| {k} | {stats['real'][k]:.3f} | {km[k] if k in km else float('nan'):.3f} | {stats['twin'][k]:.3f} |" for k in keys))
    print()
    print("real queries, top-1 within 25 m of the true position: " + ", ".join(
        f"{k} {v:.3f}" for k, v in stats["real_geo_top1_within_25m"].items() if k != "threshold_m"))
    print()
    print(report.side_by_side_markdown(side))
    for s in scale:
        print(f"twin N={s['db_size']}: " + ", ".join(f"{k} {v:.3f}" for k, v in s.items() if k.startswith("nn_cell")))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
