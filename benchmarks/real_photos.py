"""Accuracy on real photos: the Lund walk in ../shared/data (positions from EXIF GPS only).

Even-numbered frames form the database, odd-numbered frames the queries. Builds a bundle
with the offline efficientnet_lite0 backbone (the lund preset: 25 m cells, every cell
kept), evaluates the three modes, and runs the self-query check (database images queried
against their own index). Prints the tables; ``--out`` writes them as JSON.

    python benchmarks/real_photos.py [--data ../shared/data/lund/images] [--out runs/lund.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from geoloc.build import build_index
from geoloc.config import load_config
from geoloc.data import load_records
from geoloc.engine import Localizer
from geoloc.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]


def split_by_frame(images: Path, out: Path) -> Path:
    """Link even frames into ``out/database`` and odd frames into ``out/queries``."""
    for sub in ("database", "queries"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for p in sorted(images.iterdir()):
        m = re.search(r"(\d+)", p.stem)
        if not m:
            continue
        dest = out / ("database" if int(m.group(1)) % 2 == 0 else "queries") / p.name
        try:
            os.symlink(p.resolve(), dest)
        except OSError:
            shutil.copy2(p, dest)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "lund" / "images")
    ap.add_argument("--config", default="lund", help="preset name or YAML file")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not args.data.is_dir():
        print(f"error: {args.data}: folder of real photos not found; pass --data", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        ds = split_by_frame(args.data, Path(tmp) / "lund")
        t0 = time.perf_counter()
        rep = build_index(database=ds, out=Path(tmp) / "idx", config=load_config(args.config), progress=False)
        build_s = time.perf_counter() - t0
        loc = Localizer.load(rep.out)
        results = {"build": {"images": rep.images_used, "cells": rep.cells, "seconds": round(build_s, 2),
                             "stages_s": rep.timings_s}}
        for name, split in (("queries", "queries"), ("self_query", "database")):
            ev = evaluate(loc, load_records(ds, split=split), threshold_m=25.0)
            results[name] = ev.to_json()
            print(f"\n{name}: {ev.queries} images, LR@N within 25 m\n{ev.table()}")
        one = loc.localize([sorted((ds / "queries").iterdir())[0]], mode="hybrid")[0]
        results["one_query_ms"] = one.timings_ms
    print(f"\nbuild-index: {rep.images_used} images, {rep.cells} cells, {build_s:.1f} s "
          f"({', '.join(f'{k} {v:.2f} s' for k, v in rep.timings_s.items())})")
    print("one hybrid query (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in results["one_query_ms"].items()))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
