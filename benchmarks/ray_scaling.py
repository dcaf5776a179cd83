"""Extraction throughput: the local path vs Ray with 1 and 2 workers, on the same images.

Every configuration runs torch with ONE thread per process (the local process, and each Ray
actor: ``threads_per_worker=1``), so "2 workers" means two single-threaded backbones and the
1 -> 2 ratio measures Ray's scaling, not torch's intra-op threading. With equal thread counts the
Ray features must equal the local ones bit for bit; the benchmark checks it (``identical``).

Rates, images per second:

* ``steady``: chunks that arrived after the first one, over the time from the first chunk to the
  last (actor start-up excluded: each Ray run starts fresh actors that import torch and timm);
* ``wall``: all images over the whole call, start-up included.

The images: ``--images DIR`` (all JPEG/PNG files below it); by default a synthetic city made
with ``python -m geoloc synth-city --out runs/bench/raycity --extent-m 150 --queries 10`` (about
250 images), generated when missing. Writes JSON (``--out``) and prints a table.

    python benchmarks/ray_scaling.py [--images DIR] [--backbone efficientnet_lite0] [--limit N]
        [--chunk-size 16] [--batch-size 16] [--out runs/bench/ray_scaling.json] [--verbose]

Target (issue 14): 2 workers >= 1.6x the steady rate of 1 worker, on a machine with at least two
free cores. Needs the ray extra: ``pip install -e ".[cpu,ray]"``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from geoloc.backbones import create_backbone
from geoloc.config import BackboneConfig
from geoloc.distributed import import_ray, ray_chunks
from geoloc.extract import extract_features, parse_chunk

DEFAULT_IMAGES = Path("runs/bench/raycity")


def _images(folder: Path, limit: int | None) -> list[str]:
    if not folder.exists() and folder == DEFAULT_IMAGES:
        subprocess.run([sys.executable, "-m", "geoloc", "synth-city", "--out", str(folder), "--extent-m", "150",
                        "--queries", "10", "-q"], check=True)
    paths = sorted(str(p) for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not paths:
        sys.exit(f"error: no images under {folder}")
    return paths[:limit] if limit else paths


def _ray_run(paths: list[str], *, backbone, cfg: BackboneConfig, workers: int, chunk: int,
             batch: int, verbose: bool = False) -> tuple[dict[str, float], np.ndarray]:
    """One Ray extraction; returns its rates and the features ``[N_ok, F]`` in path order."""
    jobs = [(c, "", paths[s : s + chunk]) for c, s in enumerate(range(0, len(paths), chunk))]
    got: dict[int, np.ndarray] = {}
    arrivals: list[tuple[float, int]] = []
    t0 = time.perf_counter()
    for c, data in ray_chunks(jobs, backbone=backbone, config=cfg, batch_size=batch, workers=workers, threads=1):
        n = len(jobs[c][2])
        parsed = parse_chunk(data, c, "", n, backbone.feature_dim)
        assert parsed is not None, f"damaged chunk {c}"
        got[c] = parsed[0]
        arrivals.append((time.perf_counter(), n))
    t_end = time.perf_counter()
    if verbose:
        print(f"{workers} worker(s): chunk arrivals (s): {[round(t - t0, 2) for t, _ in arrivals]}")
    first, last = arrivals[0][0], arrivals[-1][0]
    later = sum(n for _, n in arrivals[1:])
    rates = {"wall": len(paths) / (t_end - t0), "steady": later / (last - first) if last > first else float("nan"),
             "startup_s": first - t0, "seconds": t_end - t0}
    return rates, np.concatenate([got[c] for c in sorted(got)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default="default")
    ap.add_argument("--limit", type=int, default=None, help="use the first N images only")
    ap.add_argument("--chunk-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/ray_scaling.json"))
    ap.add_argument("--verbose", action="store_true", help="print when each chunk arrived")
    a = ap.parse_args()

    ray = import_ray()
    paths = _images(a.images, a.limit)
    torch.set_num_threads(1)  # one thread per process everywhere (see the module docstring)
    cfg = BackboneConfig(name=a.backbone, weights=a.weights, device="cpu")
    backbone = create_backbone(cfg)
    kw = dict(backbone=backbone, batch_size=a.batch_size, chunk_size=a.chunk_size, progress=False)

    extract_features(paths[: a.batch_size], num_workers=0, **kw)  # warm-up
    t0 = time.perf_counter()
    local = extract_features(paths, num_workers=0, **kw)
    local_s = time.perf_counter() - t0
    rows = [{"engine": "local", "workers": 1, "steady": len(paths) / local_s, "wall": len(paths) / local_s,
             "startup_s": 0.0, "seconds": local_s, "identical": True}]

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=300 * 2**20)
    try:
        for workers in (1, 2):
            rates, feats = _ray_run(paths, backbone=backbone, cfg=cfg, workers=workers, chunk=a.chunk_size,
                                    batch=a.batch_size, verbose=a.verbose)
            rows.append({"engine": "ray", "workers": workers, **rates,
                         "identical": bool(np.array_equal(feats, local.features))})
    finally:
        ray.shutdown()

    ratio = rows[2]["steady"] / rows[1]["steady"]
    print(f"\n{len(paths)} images, {a.backbone}, chunks of {a.chunk_size}, batches of {a.batch_size}, "
          f"1 torch thread per process, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    print(f"{'engine':<8}{'workers':>8}{'steady img/s':>14}{'wall img/s':>12}{'start-up s':>12}{'identical':>11}")
    for r in rows:
        print(f"{r['engine']:<8}{r['workers']:>8}{r['steady']:>14.1f}{r['wall']:>12.1f}{r['startup_s']:>12.1f}"
              f"{str(r['identical']):>11}")
    print(f"Ray 2 workers / 1 worker (steady): {ratio:.2f}x (target >= 1.6x)")
    result = {"images": len(paths), "backbone": a.backbone, "chunk_size": a.chunk_size, "batch_size": a.batch_size,
              "torch_threads_per_process": 1, "cpus": os.cpu_count(), "load_average_1m": os.getloadavg()[0],
              "machine": platform.platform(), "ray_version": ray.__version__, "rows": rows,
              "ray_2_over_1_steady": ratio}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
