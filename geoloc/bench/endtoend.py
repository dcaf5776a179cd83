"""Latency beyond the search stage: the backbone alone, whole engine queries on a bundle, the GPU path."""

from __future__ import annotations

import io
import time
from pathlib import Path

import faiss
import numpy as np

from geoloc.bench.rows import NCPU, TOPK
from geoloc.bench.synthetic import CellData
from geoloc.config import IndexConfig
from geoloc.index import CellIndex

__all__ = ["backbone_ms_per_query", "end_to_end", "gpu_rows"]


def backbone_ms_per_query(name: str) -> tuple[float, str]:
    """Decode + transform + backbone forward of one 640x480 JPEG, batch 1: (median ms, note).

    Uses the backbone's default weights, or random ones when those cannot be loaded here."""
    import torch
    from PIL import Image

    from geoloc.backbones import create_backbone
    from geoloc.config import BackboneConfig
    from geoloc.errors import GeolocError

    try:
        bb, note = create_backbone(BackboneConfig(name=name, device="cpu")), "pretrained"
    except GeolocError:
        bb, note = create_backbone(BackboneConfig(name=name, weights="random", device="cpu")), "random weights"
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, "JPEG")
    raw = buf.getvalue()
    torch.set_num_threads(NCPU)

    def once():
        x = bb.transform(Image.open(io.BytesIO(raw)).convert("RGB"))[None]
        with torch.inference_mode():
            bb.model(x)

    for _ in range(3):
        once()
    ts = []
    for _ in range(20):
        t = time.perf_counter()
        once()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3, f"backbone {name} ({note}), decode+transform+forward, batch 1"


def end_to_end(folder: Path, n_images: int = 200) -> dict:
    """Whole hybrid queries through the engine on a real bundle, batch 1: per-stage medians (ms).

    The target ratio is paired: the sum over queries of the whole query's time over the sum of
    its own backbone stage (both from the same calls, so machine noise cancels); so is the index's
    share, (heads + search) over backbone (target <= 3%). A separate backbone-only forward on the
    same decoded tensors is reported beside it, and the heads' two parts right after it: the
    projection, and ``CellIndex.search`` with the bundle's query settings (cells, ring, fusion, lists)."""
    import torch

    from geoloc.engine import Localizer

    loc = Localizer.load(folder)
    recs = loc.bundle.records
    paths = [recs.abspath(int(i)) for i in np.linspace(0, len(recs) - 1, n_images).astype(int)]
    torch.set_num_threads(NCPU)
    faiss.omp_set_num_threads(1)
    for p in paths[:3]:  # warm-up
        loc.localize([p], mode="hybrid")
    stages: dict[str, list[float]] = {}
    backbone_alone, projection, search_only = [], [], []
    opts = {"mode": "hybrid", "top_cells": loc.config.query.top_cells, "k": loc.config.query.top_matches,
            "neighbours": loc.config.query.neighbours, "fusion_weight": loc.config.query.fusion_weight}
    for p in paths:
        pred = loc.localize([p], mode="hybrid")[0]
        for k, v in pred.timings_ms.items():
            stages.setdefault(k, []).append(v)
        x = loc.encoder.decode(p)[None]
        t = time.perf_counter()
        feats = loc.encoder.features(x)
        backbone_alone.append((time.perf_counter() - t) * 1e3)
        t = time.perf_counter()  # the heads stage's two parts, right after a forward as in a query
        desc = loc.encoder.descriptors(feats)
        t1 = time.perf_counter()
        loc.bundle.index.search(desc, **opts)
        projection.append((t1 - t) * 1e3)
        search_only.append((time.perf_counter() - t1) * 1e3)
    med = {k: float(np.median(v)) for k, v in stages.items()}
    share = float((np.sum(stages["heads"]) + np.sum(stages["search"])) / np.sum(stages["backbone"]))
    alone = float(np.median(backbone_alone))
    ratio = float(np.sum(stages["total"]) / np.sum(stages["backbone"]))
    return {"bundle": str(folder), "backbone": loc.backbone.name, "input_size": loc.backbone.input_size,
            "images": len(paths), "mode": "hybrid", "top_cells": loc.config.query.top_cells,
            "neighbours": loc.config.query.neighbours, "stage_ms_median": med, "backbone_alone_ms_median": alone,
            "whole_over_backbone": ratio, "whole_over_separate_backbone": med["total"] / alone,
            "target": 1.10, "met": ratio <= 1.10,
            "index_share_of_backbone": share, "index_share_target": 0.03, "index_share_met": share <= 0.03,
            "projection_ms_median": float(np.median(projection)), "index_search_ms_median": float(np.median(search_only))}


def gpu_rows(data: CellData, *, batches: list[int]) -> list[dict]:  # pragma: no cover - needs a GPU
    """Exact retrieve in torch and hybrid through ``CellIndex`` on the GPU, timed with CUDA events."""
    import torch
    n = len(data.xb)
    dev = torch.device("cuda")
    xb = torch.from_numpy(data.xb).to(dev)
    xq = torch.from_numpy(data.xq).to(dev)
    rows = []

    def cuda_time(fn, batch):
        for _ in range(3):
            fn(batch)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for i in range(min(100, len(xq) // batch)):
            start.record()
            fn(batch, i)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return float(np.median(times)) / batch

    for b in batches:
        ms = cuda_time(lambda bb, i=0: torch.topk(xq[i * bb:(i + 1) * bb] @ xb.T, TOPK, dim=1), b)
        rows.append(dict(mode="retrieve", source="gpu-torch", db_size=n, batch_size=b, search_ms_per_query=ms, recall_vs_flat=1.0))
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        idx = CellIndex.build(**data.index_arrays(), config=IndexConfig(quantizer="flat", use_gpu=True))
        for b in batches:
            for kc in (1, 5, 20):
                def fn(bb, i=0, kc=kc):
                    idx.search(data.xq[i * bb:(i + 1) * bb], mode="hybrid", top_cells=kc, k=TOPK)
                rows.append(dict(mode="hybrid", source="gpu-faiss", db_size=n, batch_size=b, top_cells=kc,
                                 search_ms_per_query=cuda_time(fn, b), recall_vs_flat=None))
    return rows
