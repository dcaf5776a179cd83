"""Throughput and latency of ``geoloc serve`` beside the in-process Localizer, on the same images.

    python benchmarks/serve.py --index indexes/NAME --images QUERY_FOLDER
        [--concurrency 1 8 32] [--requests 200] [--seconds 30] [--mode hybrid]
        [--max-batch 16] [--max-wait-ms 5] [--url http://127.0.0.1:PORT] [--out runs/bench/serve.json]

What is measured, per concurrency level C (C clients, each sending its next request as soon as
the previous one is answered; bounded by ``--requests`` per level and ``--seconds`` per level):

- ``http``: ``POST /v1/localize`` (multipart upload of one image) against the real server,
  started here as a subprocess on a free loopback port (``geoloc.serve.run_server``), or the
  already running one at ``--url`` (loopback addresses only). Latency is client-side wall time
  per request (upload, queueing, micro-batch, answer, JSON).
- ``in-process``: the same images through ``Localizer.localize([path])`` in this process, C
  threads at a time (the Localizer is thread-safe): the cost of the engine without HTTP and
  without micro-batching.

Both sides run the backbone on ``--threads`` torch threads (default: cores - 1, what
``run_server`` picks so that the event loop keeps a core).

Warm-up requests first (not timed). Reported: requests/s, p50 and p99 latency in ms, and, for
the server, the mean micro-batch size from its ``/metrics``. A table on stdout and JSON at
``--out``. Stops by itself; the server subprocess is terminated at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def list_images(sources: list[Path], limit: int) -> list[Path]:
    out: list[Path] = []
    for s in sources:
        if s.is_dir():
            out += sorted(p for p in s.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        else:
            out.append(s)
    if not out:
        sys.exit(f"error: no images found in {', '.join(map(str, sources))}; pass --images FOLDER or files")
    return out[:limit]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        sys.exit(f"error: --url {url} is not a loopback address; this benchmark only talks to 127.0.0.1 / ::1")


def start_server(args, port: int, logfile) -> subprocess.Popen:
    code = ("import sys; from pathlib import Path; from geoloc.serve import run_server; "
            f"run_server(index=Path({str(args.index)!r}), host='127.0.0.1', port={port}, max_batch={args.max_batch}, "
            f"max_wait_ms={args.max_wait_ms}, max_queue={args.max_queue}, threads={args.threads}, log_level='warning')")
    return subprocess.Popen([sys.executable, "-c", code], stdout=logfile, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen | None, timeout: float = 300.0) -> None:
    import httpx

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server at {url} was not ready after {timeout:.0f} s")


def batch_stats(url: str) -> tuple[float, float]:
    import httpx

    vals = {}
    for ln in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if ln.startswith(("geoloc_batch_size_sum", "geoloc_batch_size_count")):
            k, v = ln.split()
            vals[k] = float(v)
    return vals.get("geoloc_batch_size_count", 0.0), vals.get("geoloc_batch_size_sum", 0.0)


def summarise(lat_s: list[float], wall: float, errors: int) -> dict:
    a = np.asarray(lat_s) * 1e3
    return {"requests": int(a.size), "errors": errors, "seconds": round(wall, 3),
            "req_per_s": round(a.size / wall, 2) if wall > 0 else 0.0,
            "p50_ms": round(float(np.percentile(a, 50)), 2) if a.size else None,
            "p99_ms": round(float(np.percentile(a, 99)), 2) if a.size else None}


async def http_level(url: str, blobs: list[tuple[str, bytes]], *, conc: int, n: int, seconds: float,
                     mode: str) -> dict:
    import httpx

    lat: list[float] = []
    errors = 0
    counter = iter(range(n))
    deadline = time.perf_counter() + seconds

    async def worker(client) -> None:
        nonlocal errors
        for i in counter:
            if time.perf_counter() > deadline:
                return
            name, data = blobs[i % len(blobs)]
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/localize", params={"mode": mode}, files={"image": (name, data, "image/jpeg")})
            except httpx.TransportError:
                errors += 1
                continue
            dt = time.perf_counter() - t0
            if r.status_code == 200:
                lat.append(dt)
            else:
                errors += 1

    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=conc)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(conc)))
        wall = time.perf_counter() - t0
    return summarise(lat, wall, errors)


def inproc_level(loc, paths: list[Path], *, conc: int, n: int, seconds: float, mode: str) -> dict:
    lat: list[float] = []
    lock = threading.Lock()
    counter = iter(range(n))
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None or time.perf_counter() > deadline:
                return
            t0 = time.perf_counter()
            loc.localize([str(paths[i % len(paths)])], mode=mode)
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as ex:
        for f in [ex.submit(worker) for _ in range(conc)]:
            f.result()
    return summarise(lat, time.perf_counter() - t0, 0)


def table(rows: list[dict]) -> str:
    head = "| path | concurrency | requests | req/s | p50 ms | p99 ms | mean batch |\n|---|---:|---:|---:|---:|---:|---:|"
    lines = [head]
    for r in rows:
        mb = f"{r['mean_batch']:.1f}" if r.get("mean_batch") else "-"
        lines.append(f"| {r['path']} | {r['concurrency']} | {r['requests']} | {r['req_per_s']:.1f} | "
                     f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {mb} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--index", type=Path, required=True, help="bundle folder (indexes/NAME)")
    ap.add_argument("--images", type=Path, nargs="+", required=True, help="query images or folders")
    ap.add_argument("--max-images", type=int, default=64, help="distinct images cycled through")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--requests", type=int, default=200, help="timed requests per level and path")
    ap.add_argument("--seconds", type=float, default=30.0, help="time budget per level and path")
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--mode", default="hybrid", choices=("classify", "retrieve", "hybrid"))
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--max-queue", type=int, default=256)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                    help="torch threads, server and in-process alike (default: cores - 1, run_server's default)")
    ap.add_argument("--url", default=None, help="a running server on loopback (default: start one here)")
    ap.add_argument("--no-inprocess", action="store_true", help="skip the in-process rows")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/serve.json"))
    args = ap.parse_args()
    if args.requests < 1 or args.seconds <= 0 or min(args.concurrency) < 1:
        sys.exit("error: --requests, --seconds and --concurrency must be positive")

    import httpx  # noqa: F401  (fail early without the serve extra)
    import torch

    paths = list_images(args.images, args.max_images)
    blobs = [(p.name, p.read_bytes()) for p in paths]
    proc, logf = None, None
    url = args.url
    if url:
        require_loopback(url)
    else:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        logf = tempfile.TemporaryFile()
        log(f"starting the server on {url} ...")
        proc = start_server(args, port, logf)
    rows: list[dict] = []
    try:
        t0 = time.perf_counter()
        wait_ready(url, proc)
        log(f"server ready in {time.perf_counter() - t0:.1f} s")
        asyncio.run(http_level(url, blobs, conc=min(4, max(args.concurrency)), n=args.warmup, seconds=60, mode=args.mode))
        for c in args.concurrency:
            b0 = batch_stats(url)
            r = asyncio.run(http_level(url, blobs, conc=c, n=args.requests, seconds=args.seconds, mode=args.mode))
            b1 = batch_stats(url)
            mean_batch = (b1[1] - b0[1]) / (b1[0] - b0[0]) if b1[0] > b0[0] else None
            rows.append({"path": "http", "concurrency": c, **r, "mean_batch": mean_batch})
            log(f"http        c={c:<3d} {r['req_per_s']:8.1f} req/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms"
                + (f"  errors {r['errors']}" if r["errors"] else ""))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            if proc.returncode not in (0, -15) and logf is not None:
                logf.seek(0)
                log(logf.read().decode(errors="replace")[-3000:])
    if not args.no_inprocess:
        from geoloc.engine import Localizer

        torch.set_num_threads(args.threads)
        loc = Localizer.load(args.index)
        inproc_level(loc, paths, conc=1, n=args.warmup, seconds=60, mode=args.mode)
        for c in args.concurrency:
            r = inproc_level(loc, paths, conc=c, n=args.requests, seconds=args.seconds, mode=args.mode)
            rows.append({"path": "in-process", "concurrency": c, **r, "mean_batch": None})
            log(f"in-process  c={c:<3d} {r['req_per_s']:8.1f} req/s  p50 {r['p50_ms']} ms  p99 {r['p99_ms']} ms")
    manifest = json.loads((args.index / "manifest.json").read_text())
    result = {
        "benchmark": "serve",
        "index": str(args.index), "backbone": manifest.get("backbone"), "images": len(paths), "mode": args.mode,
        "server": {"url": url, "started_here": proc is not None, "max_batch": args.max_batch,
                   "max_wait_ms": args.max_wait_ms, "max_queue": args.max_queue, "threads": args.threads},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
                    "torch_threads": args.threads, "torch": torch.__version__, "load_average": os.getloadavg()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(table(rows))
    log(f"written to {args.out}")


if __name__ == "__main__":
    main()
