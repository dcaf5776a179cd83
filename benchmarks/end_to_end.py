"""Whole hybrid queries on a bundle's own images, batch 1: per-stage times and the index's share.

    python benchmarks/end_to_end.py [--bundle indexes/demo] [--images 200] [--rounds 3]
                                    [--out runs/bench/end_to_end.json]

Each round is :func:`geoloc.bench.endtoend.end_to_end` (decode, backbone, heads = projection +
cell scoring, search; the bundle's own query settings): the index's share is (heads + search) /
backbone summed over the same queries, so machine noise in one stage does not leak into the
ratio. The backbone's own time moves by 20 % or more between processes on a shared VM, so run a
few rounds, and compare two commits by alternating them (``latency.py --bundle`` runs one round).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from geoloc.bench.endtoend import end_to_end
from geoloc.bench.report import emit


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=Path("indexes/demo"))
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/end_to_end.json"))
    args = ap.parse_args(argv)
    rounds = []
    for r in range(args.rounds):
        e = end_to_end(args.bundle, n_images=args.images)
        st = ", ".join(f"{k} {v:.3f}" for k, v in e["stage_ms_median"].items())
        print(f"round {r + 1}: {st} ms; index share {e['index_share_of_backbone']:.4f}", flush=True)
        rounds.append(e)
    share = [e["index_share_of_backbone"] for e in rounds]
    out = {"bundle": str(args.bundle), "images": args.images, "rounds": rounds,
           "index_share_median": float(np.median(share)), "index_share_target": 0.03,
           "heads_plus_search_ms_median": float(np.median([e["stage_ms_median"]["heads"] + e["stage_ms_median"]["search"]
                                                           for e in rounds]))}
    emit(out, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
