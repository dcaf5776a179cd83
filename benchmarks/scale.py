"""A continent on one machine, simulated: a sharded, memory-mapped index of up to 10^8 synthetic vectors.

    python benchmarks/scale.py --size 100000000 [--dim 384] [--codec pq] [--pq-m 8] [--shards 64]
        [--workers 1 2] [--slice-shards 4] [--queries 64] [--cold-queries 8] [--work DIR]
        [--out runs/bench/scale.json] [--no-ray] [--no-reference] [--extract-rate IMG_PER_S_PER_CORE]
    python benchmarks/scale.py --extrapolate-from runs/bench/scale.json [--cores-per-machine 16] ...

Data: :class:`geoloc.bench.synthetic.ChunkedCellData` (``--data hard``: the generator of
``make_cell_data``, chunk by chunk; chunk ``j`` is regenerated identically anywhere from its seed).
Cells are on a square grid in id order, so a shard = a contiguous run of chunks = a band of the
map (:mod:`geoloc.index.shards`).

Steps, each timed:

1. Train the list codec (``--codec``; pq with ``--pq-m`` bytes per vector keeps 10^8 rows on disk
   at ``pq_m + 8`` bytes each) on a sample of the first chunk.
2. Build the shards: one Ray task per shard (an actor per worker holds the generator), each
   generating its chunks, encoding them into its own IVF with the trained codec and writing
   ``shard-NNNN.faiss``; it returns its cells' prototype sums. Build throughput per worker is
   measured with each ``--workers`` count on the same ``--slice-shards`` shards (scratch copies),
   then the whole index is built with the largest count.
3. Assemble: prototypes -> cell scorer (``index.quantizer`` auto) -> ``index.faiss``,
   ``shard_cells.npy`` (:func:`geoloc.index.shards.save_sharded_main`); disk footprint.
4. Serve from the memory-mapped shards with 1 FAISS thread, batch 1: classify and hybrid
   (top 5 cells, and with their rings) with the page cache warm, hybrid cold
   (``POSIX_FADV_DONTNEED`` on every shard file after closing its mapping, before each query),
   shards touched per query, retrieve (a full scan) on a few queries; peak RSS.
5. Reference (unless ``--no-reference``): the same codes merged into one unsharded in-memory
   index; answers compared (all modes, fused hybrid) and hybrid latency side by side (the 1.1x
   target of the sharded, memory-mapped index with a warm cache).
6. EXTRAPOLATION (labelled as such): build time and serving cost of 10^8 images on N machines,
   from the measured rates: descriptor extraction at the per-core rate ``benchmarks/ray_scaling.py``
   measured (``runs/bench/ray_scaling.json``, or ``--extract-rate``), shard building, disk and RAM
   per machine, latency and queries/s. ``--extrapolate-from`` recomputes it from a saved report.

``--work`` must be new, empty or a folder an earlier run made (it holds a marker file): the script
deletes only what it wrote.

``--size 100000`` is a smoke test of seconds (``tests/test_shards.py``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import time
from pathlib import Path

import faiss
import numpy as np

from geoloc.bench.report import emit
from geoloc.bench.synthetic import ChunkedCellData, normalise, segment_sum
from geoloc.bench.timing import peak_rss_bytes, time_search
from geoloc.config import IndexConfig
from geoloc.index import CellIndex
from geoloc.index import lists as L
from geoloc.index.scorers import SCORERS, resolve_scorer_name
from geoloc.index.shards import empty_shard, save_sharded_main, shard_file, write_shard

THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def log(msg: str) -> None:
    print(f"[scale {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class ShardBuilder:
    """Builds whole shards: holds the generator (made once per worker) and one FAISS thread."""

    def __init__(self, gen_kw: dict) -> None:
        faiss.omp_set_num_threads(1)
        self.gen = ChunkedCellData(**gen_kw)

    def ready(self) -> int:
        """Called once before timing: the actor exists and holds its generator."""
        return self.gen.n_cells

    def build(self, s: int, chunks: tuple[int, int], template: np.ndarray, path: str) -> dict:
        """Shard ``s`` = chunks ``[lo, hi)``: encode, write ``path``; returns prototype sums
        ``[cells, D]`` float32, partial queries ``[nq, D]`` float32, rows, seconds, peak RSS."""
        t0 = time.perf_counter()
        g = self.gen
        lo, hi = chunks
        c0, c1 = lo * g.chunk_cells, min(hi * g.chunk_cells, g.n_cells)
        tmpl = faiss.deserialize_index(template)
        shard = empty_shard(tmpl, c1 - c0)
        sums = np.zeros((c1 - c0, g.dim), np.float32)
        xq = np.zeros((g.nq, g.dim), np.float32)
        rows = 0
        for j in range(lo, hi):
            xb, cells = g._chunk(j, xq)
            first = int(g.starts[j * g.chunk_cells])
            L.add_rows_ids(shard, xb, cells - c0, np.arange(first, first + len(xb), dtype=np.int64))
            segment_sum(sums, cells - c0, xb)
            rows += len(xb)
        write_shard(shard, Path(path))
        return {"shard": s, "sums": sums, "xq": xq, "rows": rows, "seconds": time.perf_counter() - t0,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_shards(jobs: list[tuple[int, tuple[int, int], str]], *, gen_kw: dict, template: np.ndarray, workers: int,
               use_ray: bool) -> tuple[list[dict], float]:
    """Build ``jobs`` (shard, chunk range, path) with ``workers`` Ray actors (or in this process);
    returns the results and the wall time of the builds (Ray start-up and the workers' generator
    set-up excluded: they are paid once per worker, not per row)."""
    if not use_ray:
        b = ShardBuilder(gen_kw)
        t0 = time.perf_counter()
        out = [b.build(s, ch, template, p) for s, ch, p in jobs]
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        return out, time.perf_counter() - t0
    import ray
    from ray.util import ActorPool

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, object_store_memory=1 << 30,
             runtime_env={"env_vars": THREAD_ENV})
    try:
        actor = ray.remote(num_cpus=1)(ShardBuilder)
        actors = [actor.remote(gen_kw) for _ in range(workers)]
        ray.get([a.ready.remote() for a in actors])
        pool = ActorPool(actors)
        tref = ray.put(template)
        t0 = time.perf_counter()
        out = list(pool.map_unordered(lambda a, job: a.build.remote(job[0], job[1], tref, job[2]), jobs))
    finally:
        ray.shutdown()
    return out, time.perf_counter() - t0


def folder_bytes(folder: Path) -> int:
    return int(sum(p.stat().st_size for p in folder.iterdir() if p.is_file()))


def merged_unsharded(idx: CellIndex, config: IndexConfig) -> CellIndex:
    """The same codes in one in-memory IVF with global lists (the unsharded reference)."""
    sh = idx.shards
    quantizer = faiss.deserialize_index(faiss.serialize_index(idx.faiss_index.quantizer))
    ivf = empty_shard(idx.faiss_index, 1)  # for its trained codec
    one = L.empty_ivf(quantizer, idx.dim, idx.nlist, codec=idx.codec,
                      pq_m=int(ivf.pq.M) if idx.codec == "pq" else 0)
    if idx.codec == "sq8":
        one.sq = ivf.sq
    elif idx.codec == "pq":
        one.pq = ivf.pq
    one.is_trained = True
    for c in range(idx.nlist):
        ids, codes = sh.list_view(c)
        if len(ids):
            ids, codes = np.ascontiguousarray(ids), np.ascontiguousarray(codes)
            one.invlists.add_entries(c, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
    one.ntotal = sh.ntotal
    return CellIndex(one, neighbours=idx.neighbours, config=config)


def same_answers(a: CellIndex, b: CellIndex, xq: np.ndarray, n_retrieve: int) -> dict:
    checks = {}
    for name, kw in {"classify": dict(mode="classify", top_cells=5),
                     "hybrid": dict(mode="hybrid", top_cells=5, k=10),
                     "hybrid_ring": dict(mode="hybrid", top_cells=5, k=10, neighbours=True),
                     "hybrid_fused": dict(mode="hybrid", top_cells=5, k=10, fusion_weight=0.5)}.items():
        ra, rb = a.search(xq, **kw), b.search(xq, **kw)
        checks[name] = bool(np.array_equal(ra.cell_ids, rb.cell_ids) and np.array_equal(ra.ids, rb.ids)
                            and np.allclose(ra.scores, rb.scores, atol=1e-5))
    if n_retrieve:
        ra, rb = a.search(xq[:n_retrieve], mode="retrieve", k=10), b.search(xq[:n_retrieve], mode="retrieve", k=10)
        checks["retrieve"] = bool(np.array_equal(ra.ids, rb.ids) and np.allclose(ra.scores, rb.scores, atol=1e-5))
    return checks


MARKER = ".geoloc-scale-work"


def work_folder(folder: Path) -> Path:
    """An empty work folder: created here, or one an earlier run of this script made (it holds
    :data:`MARKER`), emptied. Any other existing folder with files in it is refused (SystemExit,
    one line): the script deletes only what it wrote."""
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).is_file():
            raise SystemExit(f"scale.py: --work {folder} exists and was not made by this script; "
                             "give a new or empty folder")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("work folder of benchmarks/scale.py; removed at the end unless --keep\n")
    return folder


def measured_extraction_rate(path: Path = Path("runs/bench/ray_scaling.json")) -> float | None:
    """Images/s per worker (one CPU core each) of descriptor extraction, as measured by
    ``benchmarks/ray_scaling.py`` on this machine (its best steady rate per worker), or None."""
    try:
        rows = json.loads(path.read_text())["rows"]
        return max(r["steady"] / r["workers"] for r in rows if r.get("engine") == "ray")
    except (OSError, ValueError, KeyError, TypeError):
        return None


def extrapolate(rep: dict, *, target: int, cores: int, ram_gb: float, extract_rate: float | None = None) -> dict:
    """EXTRAPOLATION to ``target`` images from the measured rates (the formulas are in the output).

    ``extract_rate``: images/s per core of descriptor extraction (the backbone), or None to leave
    extraction out of the build time."""
    n = rep["size"]
    per_worker = rep["build"]["rows_per_s_per_worker"]
    w_max = max(per_worker, key=int)
    eff = per_worker[w_max] / per_worker["1"] if "1" in per_worker else 1.0
    disk_per_vec = rep["disk_bytes_shards"] / n
    scale_c = target / n
    lat = rep["latency_ms"]
    cells_ms = lat["warm"]["hybrid_cells_ms"] * scale_c  # the cell scorer's work grows with the cells
    search_ms = lat["warm"]["hybrid_search_ms"]  # constant: the top cells hold the same number of rows
    cold_extra = max(0.0, lat["cold"]["hybrid"] - lat["warm"]["hybrid"])
    shard_bytes = disk_per_vec * target
    scorer_bytes = rep["scorer_bytes"] * scale_c
    rows = []
    for m in (1, 2, 4, 8, 16, 32):
        build_s = target / (per_worker["1"] * eff * cores * m)
        extract_s = target / (extract_rate * cores * m) if extract_rate else None
        ram_per = (shard_bytes / m + scorer_bytes) / 2**30  # shards split across machines, scorer on each
        warm = ram_per <= ram_gb * 0.8
        ms = cells_ms + search_ms + (0.0 if warm else cold_extra)
        rows.append({"machines": m, "build_hours": build_s / 3600,
                     "extract_hours": None if extract_s is None else extract_s / 3600, "disk_gb_per_machine": shard_bytes / m / 2**30,
                     "ram_gb_per_machine_for_warm_cache": ram_per, "page_cache_warm": warm,
                     "hybrid_ms_per_query": ms, "qps_capacity": m * cores * 1000.0 / ms})
    return {
        "label": f"EXTRAPOLATION from measured rates at {n} vectors to {target} (not measured)",
        "assumptions": {"cores_per_machine": cores, "ram_gb_per_machine": ram_gb,
                        "build_scaling_efficiency_per_core": eff,
                        "build": "target / (rows/s of 1 worker x efficiency x cores x machines): encoding and "
                                 "writing the shards from descriptors",
                        "extract_images_per_s_per_core": extract_rate,
                        "extract": "target / (images/s per core x cores x machines): descriptor extraction on "
                                   "CPU cores at the rate benchmarks/ray_scaling.py measured (None: not given)",
                        "latency": "cell scoring time x (target / size) + list search time (constant: same rows per cell)"
                                   " + the measured cold-cache penalty when the shards exceed 80% of RAM",
                        "qps": "machines x cores x 1000 / latency (one query per core at a time)"},
        "disk_gb_total": shard_bytes / 2**30, "scorer_gb": scorer_bytes / 2**30, "rows": rows,
    }


def table(ex: dict) -> str:
    head = f"{ex['label']}\n{'machines':>8} {'extract h':>10} {'build h':>9} {'disk GB/m':>10} {'RAM GB/m':>9} {'warm':>5} {'ms/query':>9} {'QPS':>9}"
    lines = [head]
    for r in ex["rows"]:
        ext = "-" if r.get("extract_hours") is None else f"{r['extract_hours']:.0f}"
        lines.append(f"{r['machines']:>8} {ext:>10} {r['build_hours']:>9.2f} {r['disk_gb_per_machine']:>10.1f} "
                     f"{r['ram_gb_per_machine_for_warm_cache']:>9.1f} {str(r['page_cache_warm']):>5} "
                     f"{r['hybrid_ms_per_query']:>9.2f} {r['qps_capacity']:>9.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=100_000_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--data", default="hard", choices=("hard",), help="the chunked generator (realistic has no chunked form)")
    ap.add_argument("--codec", default="pq", choices=("flat", "sq8", "pq"))
    ap.add_argument("--pq-m", type=int, default=8)
    ap.add_argument("--shards", type=int, default=0, help="0 = one per 1.5M vectors (at least 2)")
    ap.add_argument("--chunk-cells", type=int, default=8192)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--slice-shards", type=int, default=4, help="shards built with every worker count (throughput)")
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--cold-queries", type=int, default=8)
    ap.add_argument("--retrieve-queries", type=int, default=2)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds per latency measurement")
    ap.add_argument("--no-ray", action="store_true", help="build in this process (one worker)")
    ap.add_argument("--no-reference", action="store_true", help="skip the unsharded in-memory reference")
    ap.add_argument("--cores-per-machine", type=int, default=16)
    ap.add_argument("--ram-gb-per-machine", type=float, default=64.0)
    ap.add_argument("--target", type=int, default=100_000_000)
    ap.add_argument("--work", type=Path, default=Path("runs/bench/scale_index"))
    ap.add_argument("--keep", action="store_true", help="keep the index folder")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/scale.json"))
    ap.add_argument("--extract-rate", type=float, default=None,
                    help="images/s per core of descriptor extraction for the extrapolation (default: the "
                         "per-worker rate in runs/bench/ray_scaling.json, if present)")
    ap.add_argument("--extrapolate-from", type=Path, default=None, metavar="JSON",
                    help="only recompute the extrapolation of an earlier run's JSON (written back to --out)")
    args = ap.parse_args(argv)
    extract_rate = args.extract_rate or measured_extraction_rate()
    if args.extrapolate_from is not None:
        rep = json.loads(args.extrapolate_from.read_text())
        rep["extrapolation"] = extrapolate(rep, target=args.target, cores=args.cores_per_machine,
                                           ram_gb=args.ram_gb_per_machine, extract_rate=extract_rate)
        emit(rep, args.out)
        print(table(rep["extrapolation"]))
        return 0
    use_ray = not args.no_ray
    workers = [1] if args.no_ray else sorted(set(args.workers))
    t_all = time.perf_counter()
    cfg = IndexConfig(use_gpu=False, codec=args.codec, pq_m=args.pq_m)
    s_want = args.shards or max(2, args.size // 1_500_000)
    probe = ChunkedCellData(args.size, args.dim, nq=args.queries, chunk_cells=args.chunk_cells, seed=1)
    chunk_cells = max(1, min(args.chunk_cells, -(-probe.n_cells // s_want)))
    gen_kw = dict(n=args.size, dim=args.dim, nq=args.queries, chunk_cells=chunk_cells, seed=1)
    gen = probe if chunk_cells == args.chunk_cells else ChunkedCellData(**gen_kw)
    del probe
    nc = gen.n_chunks
    s = min(s_want, nc)
    bounds = [(i * nc // s, (i + 1) * nc // s) for i in range(s)]
    owner = np.repeat(np.arange(s, dtype=np.int64),
                      [min(hi * chunk_cells, gen.n_cells) - lo * chunk_cells for lo, hi in bounds])
    log(f"{args.size} vectors x {args.dim}, {gen.n_cells} cells, {nc} chunks of {chunk_cells} cells, {s} shards, "
        f"codec {args.codec}" + (f" m={args.pq_m}" if args.codec == "pq" else ""))
    folder = work_folder(args.work)

    # 1. codec
    t0 = time.perf_counter()
    template = L.empty_ivf(faiss.IndexFlatIP(args.dim), args.dim, 1, codec=args.codec, pq_m=args.pq_m)
    if args.codec != "flat":
        L.train_codec(template, L.training_sample(gen.sample(65536), args.codec))
    tbytes = faiss.serialize_index(template)
    train_s = time.perf_counter() - t0

    # 2. throughput on a slice with each worker count, then the whole build with the most workers
    per_worker, slice_rows = {}, {}
    k = min(args.slice_shards, s)
    for w in workers:
        if k == s and w == workers[-1]:
            break  # the full build below measures it
        scratch = folder / f"slice-w{w}"
        scratch.mkdir()
        res, wall = run_shards([(i, bounds[i], str(scratch / shard_file(i))) for i in range(k)], gen_kw=gen_kw,
                               template=tbytes, workers=w, use_ray=use_ray)
        rows = sum(r["rows"] for r in res)
        per_worker[str(w)] = rows / wall / w
        slice_rows[str(w)] = {"rows": rows, "wall_s": wall, "shards": k}
        log(f"slice of {k} shards, {w} worker(s): {rows} rows in {wall:.1f}s = {rows / wall:.0f} rows/s")
        shutil.rmtree(scratch)
    wmax = workers[-1]
    res, wall = run_shards([(i, bounds[i], str(folder / shard_file(i))) for i in range(s)], gen_kw=gen_kw,
                           template=tbytes, workers=wmax, use_ray=use_ray)
    rows = sum(r["rows"] for r in res)
    worker_rss = max(r["peak_rss_bytes"] for r in res)
    per_worker[str(wmax)] = rows / wall / wmax
    log(f"full build: {rows} rows in {wall:.1f}s with {wmax} worker(s) = {rows / wall:.0f} rows/s")
    assert rows == args.size

    # 3. assemble
    t0 = time.perf_counter()
    sums = np.zeros((gen.n_cells, args.dim), np.float32)
    xq = np.zeros((args.queries, args.dim), np.float32)
    for r in res:
        lo, hi = bounds[r["shard"]]
        c0, c1 = lo * chunk_cells, min(hi * chunk_cells, gen.n_cells)
        sums[c0:c1] = r["sums"]
        xq += r["xq"]
    del res
    protos = normalise(sums)
    del sums
    quantizer = SCORERS[resolve_scorer_name(cfg, gen.n_cells)].make(protos, cfg)
    save_sharded_main(folder, quantizer=quantizer, template=template, owner=owner, neighbours=gen.neighbours)
    del protos
    assemble_s = time.perf_counter() - t0
    disk_shards = int(sum((folder / shard_file(i)).stat().st_size for i in range(s)))
    disk = folder_bytes(folder)
    log(f"assembled in {assemble_s:.1f}s; disk {disk / 2**30:.2f} GiB ({disk_shards / 2**30:.2f} GiB of shards)")

    # 4. serve from the memory-mapped shards
    gc.collect()
    idx = CellIndex.load(folder, config=cfg)
    assert idx.shards is not None and idx.shards.mapped and idx.ntotal == args.size
    faiss.omp_set_num_threads(1)
    for i in range(len(xq)):  # warm: every query's lists once
        idx.search(xq[i:i + 1], mode="hybrid", top_cells=5, k=10, neighbours=True)
    warm = {"classify": time_search(lambda x: idx.search(x, mode="classify", top_cells=5), xq, 1, budget_s=args.budget),
            "hybrid": time_search(lambda x: idx.search(x, mode="hybrid", top_cells=5, k=10), xq, 1, budget_s=args.budget),
            "hybrid_ring": time_search(lambda x: idx.search(x, mode="hybrid", top_cells=5, k=10, neighbours=True), xq, 1,
                                       budget_s=args.budget)}
    parts = [idx.search(xq[i:i + 1], mode="hybrid", top_cells=5, k=10).times for i in range(len(xq))]
    warm["hybrid_cells_ms"] = float(np.median([p.cells_ms for p in parts]))
    warm["hybrid_search_ms"] = float(np.median([p.search_ms for p in parts]))
    res5 = idx.search(xq, mode="hybrid", top_cells=5, k=10)
    ring = idx.search(xq, mode="hybrid", top_cells=5, k=10, neighbours=True)
    touched = {"hybrid": float(idx.shards_touched(res5.lists).mean()),
               "hybrid_ring": float(idx.shards_touched(ring.lists).mean()), "of": s}
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    nr = min(args.retrieve_queries, len(xq))
    retrieve_ms = None
    if nr:  # a full scan: the first call pages every shard in (when the cache can hold them), the second is timed
        idx.search(xq[:1], mode="retrieve", k=10)
        t = time.perf_counter()
        idx.search(xq[:nr], mode="retrieve", k=10)
        retrieve_ms = (time.perf_counter() - t) * 1e3 / nr
    faiss.omp_set_num_threads(1)
    cold = []
    for i in range(min(args.cold_queries, len(xq))):
        idx.reopen_shards(drop_cache=True)
        t = time.perf_counter()
        idx.search(xq[i:i + 1], mode="hybrid", top_cells=5, k=10)
        cold.append((time.perf_counter() - t) * 1e3)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    latency = {"warm": warm, "cold": {"hybrid": float(np.median(cold)) if cold else None, "samples": cold},
               "retrieve_ms_per_query_all_threads_warm": retrieve_ms}
    log(f"warm hybrid {warm['hybrid']:.2f} ms, cold {latency['cold']['hybrid']} ms, classify {warm['classify']:.2f} ms; "
        f"shards touched {touched}")

    rep = {"size": args.size, "dim": args.dim, "data": args.data, "codec": args.codec, "pq_m": args.pq_m,
           "n_cells": gen.n_cells, "shards": s, "scorer": idx.quantizer_kind, "disk_bytes": disk,
           "disk_bytes_shards": disk_shards, "bytes_per_vector_on_disk": disk_shards / args.size,
           "scorer_bytes": idx.memory_bytes()["quantizer"],
           "build": {"codec_train_s": train_s, "shards_wall_s": wall, "workers": wmax, "assemble_s": assemble_s,
                     "rows_per_s_per_worker": per_worker, "slices": slice_rows,
                     "ray": use_ray, "scaling_measured_on": f"{k} of {s} shards" if k < s else "all shards",
                     "worker_peak_rss_bytes": worker_rss},
           "latency_ms": latency, "shards_touched_per_query": touched}

    # 5. the unsharded in-memory reference
    if not args.no_reference:
        ref = merged_unsharded(idx, cfg)
        rep["equal_to_in_memory_checks"] = same_answers(ref, idx, xq, nr)
        rep["equal_to_in_memory"] = all(rep["equal_to_in_memory_checks"].values())
        faiss.omp_set_num_threads(1)
        for _ in range(2):  # interleaved rounds; the best median of each
            for name, x in (("in_memory_unsharded", ref), ("sharded_mmap_warm", idx)):
                ms = time_search(lambda q, x=x: x.search(q, mode="hybrid", top_cells=5, k=10), xq, 1, budget_s=args.budget)
                latency.setdefault("side_by_side_hybrid", {})[name] = min(
                    ms, latency.get("side_by_side_hybrid", {}).get(name, math.inf))
        faiss.omp_set_num_threads(os.cpu_count() or 1)
        sbs = latency["side_by_side_hybrid"]
        sbs["ratio"] = sbs["sharded_mmap_warm"] / sbs["in_memory_unsharded"]
        log(f"reference: equal {rep['equal_to_in_memory_checks']}; hybrid in memory {sbs['in_memory_unsharded']:.3f} ms, "
            f"sharded mmap warm {sbs['sharded_mmap_warm']:.3f} ms (x{sbs['ratio']:.3f})")
        del ref
    rep["peak_rss_bytes"] = peak_rss_bytes()
    rep["total_s"] = time.perf_counter() - t_all
    rep["extrapolation"] = extrapolate(rep, target=args.target, cores=args.cores_per_machine,
                                       ram_gb=args.ram_gb_per_machine, extract_rate=extract_rate)
    emit(rep, args.out)
    print(table(rep["extrapolation"]))
    del idx
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
