"""Localisation recall and latency of each mode on a set of geotagged queries.

LR@N: share of queries with at least one of the top-N answers within ``threshold_m`` metres
(geodesic) of the true position. Answers are cell centres for ``classify`` and database
images' positions for ``retrieve`` and ``hybrid``. Each query is decoded and embedded once;
each mode then answers every query one at a time (batch 1), so ``ms_per_query`` is the
latency a single user sees, per stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from geoloc.engine import MODES, Localizer, QueryOptions
from geoloc.geo import geodesic_m
from geoloc.records import Records

RECALL_AT = (1, 5, 10)


@dataclass
class QueryFeatures:
    """Queries decoded and embedded once, reusable across modes, k and bundles of one backbone."""

    records: Records
    """The decodable queries."""
    features: np.ndarray
    """``[Q, F]`` pooled backbone features, L2-normalised."""
    skipped: list[tuple[str, str]]
    decode_ms: float
    """Total decode time over all queries."""
    backbone_ms: float


@dataclass
class ModeResult:
    mode: str
    queries: int
    recall: dict[int, float]
    median_error_m: float
    ms_per_query: dict[str, float]
    vectors_scanned: float
    """Mean database vectors compared per query (cell prototypes not counted)."""

    def to_json(self) -> dict:
        out = {f"lr@{n}": v for n, v in self.recall.items()}
        return {**out, "median_error_m": self.median_error_m, "queries": self.queries,
                "vectors_scanned": self.vectors_scanned, "ms_per_query": self.ms_per_query}


@dataclass
class EvalReport:
    modes: dict[str, ModeResult]
    threshold_m: float
    top_cells: int
    queries: int
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"modes": {m: r.to_json() for m, r in self.modes.items()}, "threshold_m": self.threshold_m,
                "top_cells": self.top_cells, "queries": self.queries,
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped]}

    def table(self) -> str:
        """A markdown table: one row per mode."""
        stages = ["decode", "backbone", "heads", "search", "total"]
        head = "| mode | LR@1 | LR@5 | LR@10 | median error (m) | " + " | ".join(f"{s} ms" for s in stages) + " |"
        rows = [head, "|" + "---|" * (5 + len(stages))]
        for m, r in self.modes.items():
            ms = " | ".join(f"{r.ms_per_query.get(s, 0.0):.2f}" for s in stages)
            rows.append(f"| {m} | {r.recall[1]:.3f} | {r.recall[5]:.3f} | {r.recall[10]:.3f} | {r.median_error_m:.1f} | {ms} |")
        return "\n".join(rows)


def evaluate(loc: Localizer, queries: Records | QueryFeatures, *, modes: Sequence[str] = MODES,
             top_cells: int | None = None, neighbours: bool | None = None, threshold_m: float = 25.0,
             batch_size: int = 16, predictions: Path | None = None,
             progress: Callable[[int, int], None] | None = None) -> EvalReport:
    """Evaluate ``modes`` on ``queries`` (records with true positions, or their :func:`embed_queries`)."""
    qf = queries if isinstance(queries, QueryFeatures) else embed_queries(loc, queries, batch_size=batch_size,
                                                                          progress=progress)
    q, feats = qf.records, qf.features
    results: dict[str, ModeResult] = {}
    lines: list[str] = []
    k_eval = max(RECALL_AT)
    for mode in modes:
        opts = QueryOptions.from_config(loc.config, mode=mode, top_cells=top_cells, neighbours=neighbours)
        if mode == "classify":  # LR@N of classify ranks the top-N cells
            opts.top_cells = max(opts.top_cells, k_eval)
        opts.top_matches = max(opts.top_matches, k_eval)
        errors = np.full((len(q), k_eval), np.inf)
        heads_ms = search_ms = scanned = 0.0
        for i in range(len(q)):
            pred = loc.localize_features(feats[i : i + 1], images=[str(q.paths[i])], options=opts)[0]
            heads_ms += pred.times.heads
            search_ms += pred.times.search
            scanned += pred.scanned
            cand = np.asarray(pred.candidates[:k_eval], dtype=np.float64).reshape(-1, 2)
            errors[i, : len(cand)] = geodesic_m(q.lat[i], q.lon[i], cand[:, 0], cand[:, 1])
            lines.append(json.dumps({"query": q.paths[i], "mode": mode, "lat": pred.lat, "lon": pred.lon,
                                     "cell": pred.cell, "match": pred.match, "error_m": float(errors[i, 0])}))
        n = max(len(q), 1)
        hit = errors <= threshold_m
        ms = {"decode": qf.decode_ms / n, "backbone": qf.backbone_ms / n, "heads": heads_ms / n, "search": search_ms / n}
        ms["total"] = sum(ms.values())
        results[mode] = ModeResult(mode, len(q), {r: float(hit[:, :r].any(1).mean()) if len(q) else float("nan")
                                                  for r in RECALL_AT},
                                   float(np.median(errors[:, 0])) if len(q) else float("nan"),
                                   {k: round(v, 3) for k, v in ms.items()}, float(scanned / n))
    if predictions is not None:
        Path(predictions).write_text("\n".join(lines) + ("\n" if lines else ""), encoding="utf-8")
    return EvalReport(results, threshold_m, top_cells or loc.config.query.top_cells, len(q), qf.skipped)


def embed_queries(loc: Localizer, queries: Records, *, batch_size: int = 16,
                  progress: Callable[[int, int], None] | None = None) -> QueryFeatures:
    """Decode and embed every query once (batched, stages timed separately); unreadable ones are skipped."""
    feats, ok, skipped = [], np.zeros(len(queries), bool), []
    decode_ms = backbone_ms = 0.0
    for start in range(0, len(queries), batch_size):
        rows = range(start, min(start + batch_size, len(queries)))
        enc = loc.encoder.encode_files([queries.abspath(i) for i in rows])
        feats.append(enc.features)
        decode_ms += enc.times.decode
        backbone_ms += enc.times.backbone
        for i, err in zip(rows, enc.errors):
            ok[i] = err is None
            if err is not None:
                skipped.append((queries.paths[i], err.problem))
        if progress:
            progress(rows.stop, len(queries))
    dim = loc.backbone.feature_dim
    features = np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)
    return QueryFeatures(queries.subset(ok), features, skipped, decode_ms, backbone_ms)
