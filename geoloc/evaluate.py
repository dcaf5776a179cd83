"""Localisation recall and latency of each mode on a set of geotagged queries.

LR@N: share of queries with at least one of the top-N answers within ``threshold_m`` metres
(geodesic) of the true position; N ranges over ``recall_values`` (default 1, 5, 10, 20, as
VPR-methods-evaluation reports) and several thresholds may be asked at once. Answers are cell
centres for ``classify`` and database images' positions for ``retrieve`` and ``hybrid``.

Positives: the database images within the (first) threshold of each query, found by an exact
radius search on UTM positions per zone; queries with none cannot be answered correctly by
retrieval and are counted.

Each query is decoded and embedded once; each mode then answers every query one at a time
(batch 1), so ``ms_per_query`` is the latency a single user sees, per stage. The predictions
file (JSON lines, one per query and mode) holds the truth, the top-N answers (path, lat/lon,
score, error, correct) and the positives count, so every recall can be recomputed from it.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from geoloc.config import MODES
from geoloc.engine import Localizer, QueryOptions
from geoloc.errors import ConfigError, DatasetError
from geoloc.geo import geodesic_m
from geoloc.records import Records

RECALL_VALUES = (1, 5, 10, 20)
RECALL_AT = RECALL_VALUES
MAX_RECALL_VALUE = 1000


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
    """LR@N at the first threshold, N in ``recall_values``."""
    median_error_m: float
    ms_per_query: dict[str, float]
    vectors_scanned: float
    """Mean database vectors compared per query (cell prototypes not counted)."""
    recall_by_threshold: dict[float, dict[int, float]] = field(default_factory=dict)
    """LR@N for every threshold asked."""

    def to_json(self) -> dict:
        out = {f"lr@{n}": v for n, v in self.recall.items()}
        by_t = {f"{t:g}": {str(n): v for n, v in r.items()} for t, r in self.recall_by_threshold.items()}
        return {**out, "recall_by_threshold_m": by_t, "median_error_m": self.median_error_m, "queries": self.queries,
                "vectors_scanned": self.vectors_scanned, "ms_per_query": self.ms_per_query}


@dataclass
class EvalReport:
    modes: dict[str, ModeResult]
    threshold_m: float
    top_cells: int
    queries: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    thresholds_m: tuple[float, ...] = ()
    recall_values: tuple[int, ...] = RECALL_VALUES
    queries_without_positive: int = 0
    """Queries with no database image within ``threshold_m``."""
    mean_positives: float = 0.0
    provenance: dict = field(default_factory=dict)
    """Bundle fingerprint, config, library versions and command line that made these results."""

    def to_json(self) -> dict:
        return {"modes": {m: r.to_json() for m, r in self.modes.items()}, "threshold_m": self.threshold_m,
                "thresholds_m": list(self.thresholds_m), "recall_values": list(self.recall_values),
                "top_cells": self.top_cells, "queries": self.queries,
                "queries_without_positive": self.queries_without_positive, "mean_positives": self.mean_positives,
                "skipped": [{"path": p, "reason": r} for p, r in self.skipped], "provenance": self.provenance}

    def table(self) -> str:
        """A markdown table: one row per mode (recalls at the first threshold)."""
        stages = ["decode", "backbone", "heads", "search", "total"]
        ns = list(self.recall_values)
        head = ("| mode | " + " | ".join(f"LR@{n}" for n in ns) + " | median error (m) | "
                + " | ".join(f"{s} ms" for s in stages) + " |")
        rows = [head, "|" + "---|" * (2 + len(ns) + len(stages))]
        for m, r in self.modes.items():
            rec = " | ".join(f"{r.recall[n]:.3f}" for n in ns)
            ms = " | ".join(f"{r.ms_per_query.get(s, 0.0):.2f}" for s in stages)
            rows.append(f"| {m} | {rec} | {r.median_error_m:.1f} | {ms} |")
        return "\n".join(rows)


def check_eval_settings(thresholds_m: Sequence[float], recall_values: Sequence[int]) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Validate thresholds (finite, > 0) and recall values (integers 1..1000); sorted, de-duplicated."""
    ts = []
    for t in thresholds_m:
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ConfigError(f"threshold {t!r} m is not a positive finite distance; pass e.g. --threshold-m 25")
        ts.append(float(t))
    ns = []
    for n in recall_values:
        if isinstance(n, bool) or int(n) != n or not 1 <= int(n) <= MAX_RECALL_VALUE:
            raise ConfigError(f"recall value {n!r} must be an integer in 1..{MAX_RECALL_VALUE}; pass e.g. --recall-values 1 5 10 20")
        ns.append(int(n))
    if not ts or not ns:
        raise ConfigError("at least one threshold and one recall value are needed")
    return tuple(dict.fromkeys(ts)), tuple(sorted(set(ns)))


def count_positives(database: Records, queries: Records, *, radius_m: float) -> np.ndarray:
    """Database images within ``radius_m`` of each query: ``[Q]`` int64.

    A radius search (FAISS ``range_search``) on UTM positions per zone and hemisphere (relative
    to the zone's first point, so float32 keeps centimetres) with a margin for the UTM scale
    factor (within 0.1 %) finds the candidates; the geodesic distance, the one LR@N uses,
    decides. Positives across a zone border are not counted.
    """
    import faiss

    out = np.zeros(len(queries), dtype=np.int64)
    for zone, south in {(int(z), bool(s)) for z, s in zip(queries.zone, queries.south)}:
        qm = np.flatnonzero((queries.zone == zone) & (queries.south == south))
        dm = np.flatnonzero((database.zone == zone) & (database.south == south))
        if not len(dm):
            continue
        origin = np.array([database.east[dm[0]], database.north[dm[0]]])
        db = np.ascontiguousarray(np.stack([database.east[dm], database.north[dm]], 1) - origin, dtype=np.float32)
        q = np.ascontiguousarray(np.stack([queries.east[qm], queries.north[qm]], 1) - origin, dtype=np.float32)
        index = faiss.IndexFlatL2(2)
        index.add(db)
        lims, _, ids = index.range_search(q, (1.001 * float(radius_m) + 0.01) ** 2)
        lims = lims.astype(np.int64)
        owner = np.repeat(np.arange(len(qm)), np.diff(lims))
        cand = dm[ids]
        near = geodesic_m(queries.lat[qm[owner]], queries.lon[qm[owner]], database.lat[cand], database.lon[cand]) <= radius_m
        out[qm] = np.bincount(owner[near], minlength=len(qm))
    return out


def evaluate(loc: Localizer, queries: Records | QueryFeatures, *, modes: Sequence[str] = MODES,
             top_cells: int | None = None, neighbours: bool | None = None, threshold_m: float = 25.0,
             thresholds_m: Sequence[float] = (), recall_values: Sequence[int] = RECALL_VALUES,
             batch_size: int = 16, predictions: Path | None = None,
             progress: Callable[[int, int], None] | None = None) -> EvalReport:
    """Evaluate ``modes`` on ``queries`` (records with true positions, or their :func:`embed_queries`).

    Args:
        threshold_m: the distance under which an answer is correct (the table's recalls).
        thresholds_m: further thresholds reported in ``recall_by_threshold``.
        recall_values: the N of LR@N.
        predictions: a JSON-lines file to write, one line per query and mode (streamed).
    Raises:
        ConfigError: a threshold or recall value out of range.
        DatasetError: no query could be decoded.
    """
    ts, ns = check_eval_settings([threshold_m, *thresholds_m], recall_values)
    qf = queries if isinstance(queries, QueryFeatures) else embed_queries(loc, queries, batch_size=batch_size,
                                                                          progress=progress)
    q = qf.records
    if len(q) == 0:
        first = f" (first: {qf.skipped[0][0]}: {qf.skipped[0][1]})" if qf.skipped else ""
        raise DatasetError(f"none of the {len(qf.skipped)} queries could be decoded{first}; check the query images")
    positives = count_positives(loc.bundle.records, q, radius_m=ts[0])
    results: dict[str, ModeResult] = {}
    k_eval = max(ns)
    sink = _open_predictions(predictions)
    try:
        for mode in modes:
            results[mode] = _evaluate_mode(loc, qf, mode, top_cells, neighbours, ts, ns, k_eval, positives, sink)
    finally:
        if sink is not None:
            sink.close()
    return EvalReport(results, ts[0], top_cells or loc.config.query.top_cells, len(q), qf.skipped, ts, ns,
                      int((positives == 0).sum()), float(positives.mean()), provenance(loc))


def _open_predictions(path: Path | None):
    if path is None:
        return None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w", encoding="utf-8")


def _evaluate_mode(loc: Localizer, qf: QueryFeatures, mode: str, top_cells, neighbours, ts, ns, k_eval: int,
                   positives: np.ndarray, sink) -> ModeResult:
    q, feats = qf.records, qf.features
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
        if sink is not None:
            sink.write(json.dumps(_prediction_line(loc, q, i, pred, errors[i, : len(cand)], ts[0], int(positives[i])))
                       + "\n")
    n = len(q)
    ms = {"decode": qf.decode_ms / n, "backbone": qf.backbone_ms / n, "heads": heads_ms / n, "search": search_ms / n}
    ms["total"] = sum(ms.values())
    by_t = {t: {r: float((errors[:, :r] <= t).any(1).mean()) for r in ns} for t in ts}
    return ModeResult(mode, n, by_t[ts[0]], float(np.median(errors[:, 0])), {k: round(v, 3) for k, v in ms.items()},
                      float(scanned / n), by_t)


def _prediction_line(loc: Localizer, q: Records, i: int, pred, errors: np.ndarray, threshold: float,
                     positives: int) -> dict:
    """One predictions-file row: the truth, the top-N answers and whether each is correct."""
    top = []
    for r, ((lat, lon), err) in enumerate(zip(pred.candidates, errors)):
        ident = pred.candidate_ids[r]
        top.append({"rank": r + 1, "path": None if pred.mode == "classify" else loc.match_path(ident),
                    "cell": ident if pred.mode == "classify" else int(loc.bundle.filed[ident]),
                    "lat": lat, "lon": lon, "score": pred.candidate_scores[r], "error_m": float(err),
                    "correct": bool(err <= threshold)})
    return {"query": q.paths[i], "query_path": str(q.abspath(i)), "mode": pred.mode, "truth": {"lat": float(q.lat[i]), "lon": float(q.lon[i])},
            "positives": positives, "lat": pred.lat, "lon": pred.lon, "cell": pred.cell, "match": pred.match,
            "error_m": float(errors[0]) if len(errors) else None, "correct": bool(len(errors) and errors[0] <= threshold),
            "top": top}


def provenance(loc: Localizer) -> dict:
    """What made a result: the bundle (path, manifest checksum, backbone fingerprint), the config,
    library versions and the command line."""
    from geoloc.bundle import library_versions

    m = loc.bundle.manifest
    return {"bundle": str(loc.bundle.path), "bundle_manifest_sha256": m.get("manifest_sha256"),
            "backbone_fingerprint": m.get("backbone", {}).get("fingerprint"), "config": loc.config.to_dict(),
            "versions": library_versions(), "command": list(sys.argv)}


def query_descriptors(loc: Localizer, queries: Records, path: str | Path) -> QueryFeatures:
    """Queries given as descriptors computed elsewhere (a file keyed by path, as ``build --descriptors``)."""
    from geoloc.export import descriptors_for

    feats = descriptors_for(queries, path)
    if feats.shape[1] != loc.encoder.feature_dim:
        raise DatasetError(f"{path}: descriptors have {feats.shape[1]} dimensions, the bundle expects "
                           f"{loc.encoder.feature_dim}")
    return QueryFeatures(queries, feats, [], 0.0, 0.0)


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
    dim = loc.encoder.feature_dim
    features = np.concatenate(feats) if feats else np.zeros((0, dim), np.float32)
    return QueryFeatures(queries.subset(ok), features, skipped, decode_ms, backbone_ms)
