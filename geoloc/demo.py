"""``make demo``: the whole job on the embedded default, a generated city.

1. generate the demo city (database walk + shifted queries), unless already there;
2. build the bundle with the offline efficientnet_lite0 backbone (reusing cached features);
3. evaluate classify, retrieve and hybrid on the queries and print the comparison table;
4. localise one query and say where it was and where the engine put it;
5. draw a contact sheet of query/answer pairs marked right or wrong, a map of the wrong
   answers' errors, and an error histogram per mode.

Everything lands in ``runs/demo/`` (and the bundle in ``indexes/demo/``) under the current
directory; a second run reuses what the first built.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from geoloc.config import load_config
from geoloc.errors import GeolocError, require_faiss


def _city(out: Path, params: dict, log) -> Path:
    from geoloc.synth import generate_city

    stamp = out / "demo_params.json"
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        log(f"[1/5] city: reusing {out}")
        return out
    log(f"[1/5] city: generating {out} ({params})")
    info = generate_city(out=out, **params)
    log(f"      {info.n_database} database images, {info.n_queries} queries, {info.n_aerial} aerial tiles "
        f"in {info.seconds:.0f} s ({info.images_per_second:.0f} images/s)")
    stamp.write_text(json.dumps(params))
    return out


def _bundle(city: Path, out: Path, config_path: Path, log) -> Path:
    from geoloc.build import build_index
    from geoloc.bundle import read_manifest

    cfg = load_config(config_path)
    try:
        m = read_manifest(out)
        if m["config"] == cfg.to_dict() and m["database"]["source"] == str(city):
            log(f"[2/5] bundle: reusing {out}")
            return out
    except GeolocError:
        pass
    log(f"[2/5] bundle: building {out} with {cfg.backbone.name}")
    rep = build_index(database=city, out=out, config=cfg, progress=True, log=lambda m: log(f"      {m}"))
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in rep.timings_s.items())
    log(f"      {rep.images_used} images, {rep.cells} cells in {rep.groups} groups, dim {rep.descriptor_dim}; {stages}")
    return out


def run(*, workdir: Path, index: Path, config: Path, city_params: dict, log=print) -> dict:
    from geoloc.data import load_records
    from geoloc.engine import Localizer
    from geoloc.evaluate import evaluate
    from geoloc.visualize import answer_sheet, error_histogram, error_map, read_predictions

    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    city = _city(workdir / "city", city_params, log)
    bundle = _bundle(city, index, config, log)

    log("[3/5] evaluating classify, retrieve and hybrid on the shifted queries")
    loc = Localizer.load(bundle)
    queries = load_records(city, split="queries")
    pred_file = workdir / "predictions.jsonl"
    rep = evaluate(loc, queries, threshold_m=loc.config.query.threshold_m, predictions=pred_file)
    results = rep.to_json()
    results["machine"] = _machine()
    results_file = workdir / "results.json"
    results_file.write_text(json.dumps(results, indent=2))
    ring = " and their 8 neighbours" if loc.config.query.neighbours else ""
    log(f"\n{rep.queries} queries, LR@N within {rep.threshold_m:g} m, hybrid searches the top {rep.top_cells} cells{ring} "
        f"({rep.modes['hybrid'].vectors_scanned:.0f} of {len(loc.bundle.records)} database images per query)\n")
    log(rep.table())

    log("\n[4/5] one query")
    i = len(queries) // 2
    p = loc.localize([queries.abspath(i)], mode="hybrid")[0]
    from geoloc.geo import geodesic_m

    err = float(geodesic_m(queries.lat[i], queries.lon[i], p.lat, p.lon))
    log(f"      image   {queries.paths[i]}")
    log(f"      truth   {queries.lat[i]:.6f}, {queries.lon[i]:.6f}")
    log(f"      answer  {p.lat:.6f}, {p.lon:.6f}  (hybrid, cell {p.cell}, score {p.score:.3f}) -> {err:.1f} m off")
    log(f"      match   {Path(p.match).name}")
    log("      ms      " + ", ".join(f"{k} {v:.1f}" for k, v in p.timings_ms.items()))

    log("[5/5] pictures")
    rows = read_predictions(pred_file)
    hybrid = [r for r in rows if r["mode"] == "hybrid"]
    t = loc.bundle.table
    pictures = [
        answer_sheet(hybrid, workdir / "contact_sheet.png"),
        error_map(hybrid, workdir / "map.png", cells_latlon=np.stack([t.lat, t.lon], 1), threshold_m=rep.threshold_m,
                  title=f"demo city, hybrid: {len(t)} cells of {t.size_m:g} m, {len(hybrid)} queries, "
                        f"LR@1 {rep.modes['hybrid'].recall[1]:.2f}; red: the wrong answers"),
        error_histogram(rows, workdir / "errors.png", threshold_m=rep.threshold_m),
    ]
    log("      " + "\n      ".join(str(p) for p in pictures))
    log(f"\ndone in {time.perf_counter() - t0:.0f} s. The table is in {results_file}")
    return results


def _machine() -> dict:
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": torch.cuda.is_available()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("runs") / "demo")
    ap.add_argument("--index", type=Path, default=Path("indexes") / "demo")
    ap.add_argument("--config", default="demo", help="preset name or YAML file")
    ap.add_argument("--extent-m", type=float, default=600.0)
    ap.add_argument("--spacing-m", type=float, default=5.0)
    ap.add_argument("--headings", type=int, default=4)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--shift", default="mild")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    params = {"seed": args.seed, "extent_m": args.extent_m, "spacing_m": args.spacing_m, "headings": args.headings,
              "n_queries": args.queries, "shift": args.shift, "workers": 2}
    try:
        require_faiss()
        run(workdir=args.workdir, index=args.index, config=args.config, city_params=params)
    except GeolocError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
