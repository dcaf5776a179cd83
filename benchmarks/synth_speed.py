"""Synthetic city generator speed: street-level images per second on ONE core.

Renders ``--n`` views (default 200) of a city at ``--size`` pixels, half database-style
(no shift) and half queries under ``--shift``, including JPEG encoding to a temporary folder,
after a warm-up. Reports wall-clock and process-CPU rates (the CPU rate is the one-core figure
that stays meaningful on a busy machine) as a table, and as JSON with ``--out``.

    python benchmarks/synth_speed.py [--n 200] [--size 256] [--extent 400] [--out synth_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from geoloc.synth import SYNTH_VERSION, Look, build_city, render_view, street_walk
from geoloc.synth import query_look


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--extent", type=float, default=400.0)
    ap.add_argument("--shift", default="mild", choices=["none", "mild", "strong"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    try:  # one core, as the requirement says
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    except (AttributeError, OSError):
        pass

    t0 = time.perf_counter()
    city = build_city(seed=a.seed, extent_m=a.extent)
    t_city = time.perf_counter() - t0
    pos = street_walk(city, 5.0)
    rng = np.random.default_rng(a.seed)
    pick = rng.integers(0, len(pos), a.n)
    heads = rng.integers(0, 4, a.n) * 90.0
    looks = [Look() if i % 2 == 0 else query_look(a.shift, rng, i)[0] for i in range(a.n)]

    stages = {"render": 0.0, "jpeg": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        def one(i: int) -> None:
            t = time.perf_counter()
            arr = render_view(city, x=pos[pick[i], 0], y=pos[pick[i], 1], heading_deg=heads[i], pitch_deg=6.0,
                              size=a.size, look=looks[i], seed=i)
            t2 = time.perf_counter()
            Image.fromarray(arr).save(Path(tmp) / f"{i}.jpg", format="JPEG", quality=90)
            stages["render"] += t2 - t
            stages["jpeg"] += time.perf_counter() - t2

        for i in range(min(10, a.n)):  # warm-up
            one(i)
        stages = {"render": 0.0, "jpeg": 0.0}
        w0, c0 = time.perf_counter(), time.process_time()
        for i in range(a.n):
            one(i)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0

    res = {
        "benchmark": "synth_speed", "synth_version": SYNTH_VERSION, "n_images": a.n, "image_size": a.size,
        "extent_m": a.extent, "shift": a.shift, "city_build_s": round(t_city, 3),
        "images_per_second_wall": round(a.n / wall, 1), "images_per_second_cpu": round(a.n / cpu, 1),
        "ms_per_image_render": round(1000 * stages["render"] / a.n, 2),
        "ms_per_image_jpeg": round(1000 * stages["jpeg"] / a.n, 2),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
    }
    print(f"{'stage':<22}{'value':>10}")
    for k in ("city_build_s", "ms_per_image_render", "ms_per_image_jpeg", "images_per_second_wall", "images_per_second_cpu"):
        print(f"{k:<22}{res[k]:>10}")
    if a.out:
        a.out.write_text(json.dumps(res, indent=2) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
