"""``make demo``: the whole job on the embedded default, a generated city.

1. generate the demo city (database walk + shifted queries), unless already there;
2. build the bundle with the offline efficientnet_lite0 backbone (reusing cached features);
3. evaluate classify, retrieve and hybrid on the queries and print the comparison table;
4. localise one query and say where it was and where the engine put it;
5. draw a contact sheet of database/query images and a map of cells, truths and answers.

Everything lands in ``runs/demo/`` (and the bundle in ``indexes/demo/``); a second run
reuses what the first built.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from geoloc.bundle import read_manifest
from geoloc.config import load_config
from geoloc.errors import GeolocError

REPO = Path(__file__).resolve().parents[1]


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


def _map(loc, queries, preds: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = loc.bundle.table
    e0, n0 = float(t.east.min()), float(t.north.min())
    fig, ax = plt.subplots(figsize=(9, 9), dpi=110)
    ax.scatter(t.east - e0, t.north - n0, s=4, c="#c8c8c8", marker="s", label=f"cells ({len(t)})")
    truth = np.array([[queries.east[i] - e0, queries.north[i] - n0] for i in range(len(queries))])
    guess = np.array([[p["east"] - e0, p["north"] - n0] for p in preds])
    ok = np.array([p["error_m"] <= 25 for p in preds])
    for (a, b), good in zip(zip(truth, guess), ok):
        ax.plot([a[0], b[0]], [a[1], b[1]], lw=0.5, c="#2a9d8f" if good else "#e76f51", alpha=0.6)
    ax.scatter(truth[:, 0], truth[:, 1], s=9, c="#264653", label="query: true position")
    ax.scatter(guess[:, 0], guess[:, 1], s=12, c=np.where(ok, "#2a9d8f", "#e76f51"), marker="x",
               label="hybrid answer (green: within 25 m)")
    ax.set_aspect("equal")
    ax.set_xlabel(f"UTM east - {e0:.0f} m (zone {int(t.zone[0])})")
    ax.set_ylabel(f"UTM north - {n0:.0f} m")
    ax.set_title(f"demo city: {len(t)} cells of {t.size_m:g} m, {len(queries)} queries, hybrid LR@1 {ok.mean():.2f}")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(*, workdir: Path, index: Path, config: Path, city_params: dict, log=print) -> dict:
    from geoloc.data import load_records
    from geoloc.engine import Localizer
    from geoloc.evaluate import evaluate
    from geoloc.synth import contact_sheet

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
    log(f"      ms      " + ", ".join(f"{k} {v:.1f}" for k, v in p.timings_ms.items()))

    log("[5/5] pictures")
    rows = [json.loads(x) for x in pred_file.read_text().splitlines()]
    hybrid = [r for r in rows if r["mode"] == "hybrid"]
    by_path = {queries.paths[j]: j for j in range(len(queries))}
    from geoloc.geo import latlon_to_utm

    east, north, _, _ = latlon_to_utm(np.array([r["lat"] for r in hybrid]), np.array([r["lon"] for r in hybrid]))
    for r, e, n in zip(hybrid, east, north):
        r["east"], r["north"] = float(e), float(n)
    qsub = queries.subset(np.array([by_path[r["query"]] for r in hybrid], dtype=np.int64))
    _map(loc, qsub, hybrid, workdir / "map.png")
    db = loc.bundle.records
    picks = [db.abspath(j) for j in np.linspace(0, len(db) - 1, 16).astype(int)]
    picks += [queries.abspath(j) for j in np.linspace(0, len(queries) - 1, 16).astype(int)]
    contact_sheet(picks, workdir / "contact_sheet.png", cols=8)
    log(f"      {workdir / 'map.png'}\n      {workdir / 'contact_sheet.png'}")
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
    ap.add_argument("--workdir", type=Path, default=REPO / "runs" / "demo")
    ap.add_argument("--index", type=Path, default=REPO / "indexes" / "demo")
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
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
        run(workdir=args.workdir, index=args.index, config=args.config, city_params=params)
    except GeolocError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
