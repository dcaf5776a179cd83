"""Search-stage latency of classify / retrieve / hybrid against the usual ANN baselines.

    python benchmarks/latency.py [--sizes 10000 100000 1000000] [--dim 384] [--batch 1 256]
                                 [--data hard realistic] [--out FILE.json] [--bundle indexes/NAME] [--quick]

What is timed: the *search stage*, everything after the query descriptor exists (scoring the
cells, choosing the top-k, searching the database; for classify the cell scoring alone),
through the engine's own ``CellIndex.search``. Warm-up calls first, then the median over many
queries (batch 1: per call; batch B: per call / B). Batch-1 rows run FAISS with 1 OpenMP
thread, batched rows all cores. Rows, recall and bytes: :mod:`geoloc.bench.rows`.

Data (``--data``): ``hard`` = isotropic noise plus a few structured directions matching two mean
cosines (:func:`geoloc.bench.synthetic.make_cell_data`); ``realistic`` = the eigen-spectra of cell
centres and within-cell offsets, heading clusters and cell sizes of a real set
(:mod:`geoloc.bench.realistic`). Both are calibrated on a real bundle with ``--bundle``, whose own
vectors are benchmarked too with its real queries (side by side with a realistic synthetic set of
the same size: ``side_by_side`` in the JSON; :mod:`geoloc.bench.calibration`, and
``benchmarks/calibration.py`` for the full comparison), and whole engine queries on its images timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import faiss
import numpy as np

from geoloc.bench import report
from geoloc.bench.calibration import bundle_twin_data
from geoloc.bench.endtoend import backbone_ms_per_query, end_to_end, gpu_rows
from geoloc.bench.realistic import default_calibration, make_realistic_data
from geoloc.bench.realistic import summary as realistic_summary
from geoloc.bench.report import default_scorer
from geoloc.bench.rows import NCPU, RowLog, engine_rows, hnsw_rows, ivf_rows, log
from geoloc.bench.synthetic import (
    DEFAULT_INTER_COS,
    DEFAULT_INTRA_COS,
    DEFAULT_MEAN_CELL_SIZE,
    CellData,
    make_cell_data,
    measure_cosines,
)
from geoloc.bench.timing import cpu_model, measure_bandwidth


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--queries", type=int, default=1024, help="query set size (timing and recall)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/latency.json"))
    ap.add_argument("--bundle", type=Path, default=None, help="real bundle folder (index.faiss at its root): calibrate and benchmark it")
    ap.add_argument("--quick", action="store_true", help="sizes 10^4 and 10^5 only (smoke run, < 1 min)")
    ap.add_argument("--with-backbone", default=None, metavar="NAME", help="add end-to-end ms (decode + backbone) via geoloc.backbones")
    ap.add_argument("--no-gpu", action="store_true")
    ap.add_argument("--targets-only", action="store_true",
                    help="only the rows the targets need: retrieve, the flat and default cell scorers, HNSW32 (no IVF, LSH, HNSW scorer)")
    ap.add_argument("--data", nargs="+", choices=("hard", "realistic"), default=["hard"],
                    help="synthetic generators to run at every size (default: hard)")
    return ap.parse_args(argv)


def rows_for(data: CellData, source: str, args: argparse.Namespace, *, bandwidth: float, backbone_ms: float | None,
             kind: str = "hard") -> list[dict]:
    """Every latency row of one database: the engine's modes, then IVF-Flat and HNSW32."""
    rl = RowLog(data, source, bandwidth, backbone_ms, budget_s=0.5 if args.quick else 2.0, data_kind=kind)
    only = (default_scorer(len(data.prototypes)),) if args.targets_only else None
    gt1 = engine_rows(rl, batches=args.batch, quick=args.quick, scorers=only)
    if not args.targets_only:
        ivf_rows(rl, gt1, batches=args.batch)
    hnsw_rows(rl, gt1, batches=args.batch, quick=args.quick)
    return rl.rows


def gpu_note_and_rows(args: argparse.Namespace, sizes: list[int], gen: dict) -> tuple[str, list[dict]]:
    if args.no_gpu:
        return "no GPU", []
    try:
        import torch
    except ImportError:
        return "torch not installed", []
    if not torch.cuda.is_available():
        return "no GPU", []
    rows = []  # pragma: no cover - needs a GPU
    for n in sizes:
        rows += gpu_rows(make_cell_data(n, args.dim, seed=n, **gen), batches=args.batch)
    return torch.cuda.get_device_name(0), rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [10_000, 100_000] if args.quick else args.sizes
    if args.quick:
        args.queries = min(args.queries, 512)
    nq = max(args.queries, 2 * max(args.batch))
    log("measuring streaming read bandwidth (1 GiB)")
    bwinfo = measure_bandwidth(0.25 if args.quick else 1.0)
    bw = bwinfo["best_Bps"]
    log(f"  {bw / 1e9:.1f} GB/s")
    backbone_ms, backbone_note = (None, "not requested")
    if args.with_backbone:
        backbone_ms, backbone_note = backbone_ms_per_query(args.with_backbone)
        log(f"backbone: {backbone_note}: {backbone_ms:.1f} ms")

    intra, inter, mean_cell = DEFAULT_INTRA_COS, DEFAULT_INTER_COS, DEFAULT_MEAN_CELL_SIZE
    calibration, bundle = "defaults (no --bundle)", None
    twin = None
    if args.bundle:  # real queries (the bundle's query photos, else a held-out tenth), calibration, twin
        bundle, twin, calib, qinfo = bundle_twin_data(args.bundle, cache=args.out.with_suffix(".queries.npz"))
        intra, inter = measure_cosines(bundle.xb, bundle.cells)
        mean_cell = len(bundle.xb) / bundle.n_cells
        calibration = f"measured on {args.bundle}; queries: {qinfo['query_source']}"
    log(f"generator: intra-cell cos {intra:.3f}, inter-cell cos {inter:.3f}, mean cell {mean_cell:.1f} ({calibration})")
    gen = {"nq": nq, "intra": intra, "inter": inter, "mean_cell": mean_cell}

    if bundle is None:
        calib = default_calibration(args.dim)
    query_noise = float(calib.get("query_noise", 1.5))
    if "realistic" in args.data or bundle is not None:
        log(f"realistic generator: {json.dumps(realistic_summary(calib))}")

    def generate(kind: str, n: int) -> CellData:
        if kind == "realistic":
            return make_realistic_data(n, calib, nq=nq, query_noise=query_noise, seed=n)
        return make_cell_data(n, args.dim, seed=n, **gen)

    t0 = time.perf_counter()
    rows: list[dict] = []
    for n in sizes:
        for kind in args.data:
            t = time.perf_counter()
            data = generate(kind, n)
            log(f"generated {kind} N={n} in {time.perf_counter() - t:.1f}s")
            rows += rows_for(data, "synthetic", args, bandwidth=bw, backbone_ms=backbone_ms, kind=kind)
            del data
    e2e, side = None, None
    if bundle is not None:
        rows += rows_for(bundle, "bundle", args, bandwidth=bw, backbone_ms=backbone_ms, kind="bundle")
        log("side by side: a realistic synthetic set of the bundle's size, calibrated on it (its own query model)")
        twin_rows = rows_for(twin, "synthetic", args, bandwidth=bw, backbone_ms=backbone_ms, kind="realistic-twin")
        rows += twin_rows
        side = report.side_by_side([r for r in rows if r["source"] == "bundle"], twin_rows)
        del twin
        log("end to end: whole hybrid queries through the engine on the bundle's own images")
        e2e = end_to_end(args.bundle)
    gpu_note, g_rows = gpu_note_and_rows(args, sizes, gen)
    rows += g_rows

    tg = [t for t in (report.targets(rows, n, kind) for n in sizes for kind in args.data) if t]
    info = {
        "cpu_model": cpu_model(), "cpu_threads": NCPU, "batch1_faiss_threads": 1, "machine": platform.machine(),
        "python": platform.python_version(), "faiss": faiss.__version__, "numpy": np.__version__,
        "faiss_compile": faiss.get_compile_options(), "gpu": gpu_note,
        "bandwidth": bwinfo, "calibration": calibration, "intra_cos": intra, "inter_cos": inter, "mean_cell_size": mean_cell,
        "data": args.data, "realistic_calibration": realistic_summary(calib), "realistic_query_noise": query_noise,
        "recall_definition": "share of queries whose exact (flat inner-product) top-1 is among the row's top-10; "
                             "classify: exact top-1's cell is the predicted top cell",
        "timing": "median over queries after 3 warm-up calls; perf_counter (CPU) / CUDA events (GPU); "
                  "ms per query = per-call time / batch size",
        "backbone": backbone_note, "wall_s": time.perf_counter() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "results": rows, "targets": tg, "end_to_end": e2e,
                                         "side_by_side": side}, indent=1))
    png = args.out.with_suffix(".png")
    report.plot(rows, png)
    print(report.markdown(rows))
    print()
    print(f"machine: {info['cpu_model']}, {NCPU} threads (batch-1 rows: 1 FAISS thread), faiss {faiss.__version__}, "
          f"numpy {np.__version__}, read bandwidth {bw / 1e9:.1f} GB/s, GPU: {gpu_note}")
    print("\n".join(report.summary_lines(tg)))
    if side:
        print(report.side_by_side_markdown(side))
    if e2e:
        st = ", ".join(f"{k} {v:.2f}" for k, v in e2e["stage_ms_median"].items())
        print(f"end to end on {e2e['bundle']} ({e2e['backbone']} at {e2e['input_size']} px, hybrid k={e2e['top_cells']}"
              f"{' + neighbours' if e2e['neighbours'] else ''}, batch 1, medians over {e2e['images']} images): {st} ms; "
              f"separate backbone-only forward {e2e['backbone_alone_ms_median']:.2f} ms; "
              f"whole/backbone (paired sums) = {e2e['whole_over_backbone']:.3f} "
              f"(target <= 1.10: {'MET' if e2e['met'] else 'MISSED'}); index share (heads + search) / backbone = "
              f"{e2e['index_share_of_backbone']:.3f} (target <= 0.03: {'MET' if e2e['index_share_met'] else 'MISSED'}); "
              f"after a forward: projection {e2e['projection_ms_median']:.3f} ms, index search {e2e['index_search_ms_median']:.3f} ms")
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
