"""``build-index`` as a library function: from a geotagged dataset to a bundle on disk.

Stages (each timed in the report): load records -> extract features (cached, resumable)
-> cells and groups -> train the classifier -> project and index -> write the bundle.

Work that is expensive to redo lives in a work folder beside the bundle,
``<out parent>/.<name>.work/``: the feature cache (chunked, written atomically) and the
classifier checkpoints. A build killed at any moment restarts from there; the bundle itself
is only ever renamed into place complete (geoloc.bundle).
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from geoloc.augment import extract_augmented_views
from geoloc.backbones import create_backbone
from geoloc.bundle import build_lock, check_output, write_bundle
from geoloc.cells import build_cells
from geoloc.config import Config
from geoloc.data import load_records
from geoloc.errors import ConfigError, DatasetError
from geoloc.encoder import EXTERNAL, DescriptorLayout, second_backbone_config
from geoloc.export import descriptors_for
from geoloc.extract import Extraction, extract_features
from geoloc.fileio import sha256_file
from geoloc.finetune import finetune_backbone
from geoloc.heads import classifier_state
from geoloc.index import CellIndex
from geoloc.train import (TrainReport, Validation, select_fusion_weight, subcenter_candidates, train_classifier,
                          train_selecting_subcenters)


@dataclass
class BuildReport:
    out: Path
    images_used: int
    images_skipped: int
    cells: int
    groups: int
    images_in_dropped_cells: int
    descriptor_dim: int
    feature_dim: int
    reused_feature_chunks: int
    timings_s: dict[str, float] = field(default_factory=dict)
    train: TrainReport | None = None
    descriptor: str = "projected"
    """What the index retrieves by (``index.descriptor``)."""


def work_dir(out: Path) -> Path:
    """Where the resumable intermediate state of a build of ``out`` lives."""
    out = Path(out)
    return out.parent / f".{out.name}.work"


def build_index(*, database: str | Path, out: str | Path, config: Config, progress: bool = True,
                log: Callable[[str], None] = lambda _m: None, descriptors: str | Path | None = None,
                val_queries: str | Path | None = None) -> BuildReport:
    """Build a bundle at ``out`` from the images and positions of ``database``.

    ``out`` is checked before any work (:func:`geoloc.bundle.check_output`: only a missing
    path, an empty folder or a bundle geoloc wrote may be replaced) and locked for the whole
    build (:func:`geoloc.bundle.build_lock`: a second build of the same ``out`` is refused).

    ``descriptors``: a file of descriptors computed elsewhere (``.npz`` with ``paths [N]`` and
    ``descriptors [N, F]``, see :func:`geoloc.export.read_descriptors`), keyed by the database
    paths (relative to the dataset root, or absolute). The classifier and the index are built on
    them instead of on a backbone's features; such a bundle answers descriptors, not images.

    ``val_queries``: geotagged queries (any folder or CSV ``load_records`` reads) that select the
    training epoch, with ``train.select_subcenters`` the number of sub-centres K, and with
    ``train.select_fusion`` the hybrid fusion weight stored in the bundle; without them the
    held-out database split selects epoch and K.

    ``index.descriptor`` picks what the lists hold for retrieval: the classifier's projected
    descriptor, the backbone's pooled feature or a second backbone's (extracted once, cached in the
    work folder); the manifest's ``stats.descriptor`` records it (:class:`geoloc.encoder.DescriptorLayout`).
    """
    out = Path(out)
    check_output(out)
    if descriptors is not None and config.train.finetune_blocks > 0:
        raise ConfigError("train.finetune_blocks needs images and a backbone; it cannot be used with --descriptors")
    if config.index.descriptor == "second":
        if descriptors is not None:
            raise ConfigError("index.descriptor second runs a second backbone on the images; it cannot be used with "
                              "--descriptors (use projected or pooled)")
        second_backbone_config(config.backbone, config.index)  # an empty index.second_backbone fails here, before any work
    if descriptors is not None and val_queries is not None:
        raise ConfigError("--val-queries are images, but a --descriptors bundle has no backbone to embed them")
    if val_queries is None and subcenter_candidates(config) and config.train.val_fraction <= 0:
        raise ConfigError("train.select_subcenters needs validation: pass --val-queries DIR or set train.val_fraction "
                          "above 0 (the held-out database split)")
    config = copy.deepcopy(config)  # the build may choose query.fusion_weight and K; the caller's config is left as it was
    with build_lock(out):
        return _build(database=database, out=out, config=config, progress=progress, log=log, descriptors=descriptors,
                      val_queries=val_queries)


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows ``[N, R]`` L2-normalised, float32."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _all_decoded(ext: Extraction, source: str | Path, name: str) -> np.ndarray:
    """Features ``[N, R]`` of an extraction that must cover every image (the second backbone reads the
    images the first one read)."""
    if not ext.ok.all():
        raise DatasetError(f"{source}: {int((~ext.ok).sum())} images the backbone read cannot be read for the second "
                           f"backbone {name} (first: {ext.errors[0][1]}); remove them or use another index.descriptor")
    return ext.features


def external_backbone(path: Path, feature_dim: int) -> dict:
    """The manifest's backbone description of a bundle built from a descriptor file."""
    return {"name": EXTERNAL, "timm_name": "", "input_size": 0, "mean": [], "std": [], "interpolation": "",
            "crop_pct": 1.0, "weights_source": f"descriptors:{path.name}", "fingerprint": sha256_file(path),
            "feature_dim": int(feature_dim)}


def _build(*, database: str | Path, out: Path, config: Config, progress: bool,
           log: Callable[[str], None], descriptors: str | Path | None, val_queries: str | Path | None) -> BuildReport:
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 3)
        clock = now

    records = load_records(database, split="database", utm_zone=config.data.utm_zone or None)
    if len(records) == 0:
        raise DatasetError(f"{database}: no images found")
    lap("records")

    work = work_dir(out)
    backbone = None
    if descriptors is not None:
        feats = descriptors_for(records, Path(descriptors))
        ext = Extraction(features=feats, ok=np.ones(len(records), bool), errors=[], seconds=0.0)
        backbone_info = external_backbone(Path(descriptors), ext.features.shape[1])
        lap("descriptors")
    else:
        backbone = create_backbone(config.backbone)
        backbone_info = backbone.describe()
        lap("backbone")
        log(f"extracting {backbone.name} features of {len(records)} images (cache: {work / 'features'})")
        bc = config.backbone

        def extract(paths: list[Path], cache: str, model=None):
            return extract_features(paths, backbone=model or backbone, batch_size=bc.batch_size, num_workers=bc.num_workers,
                                    cache_dir=work / cache, progress=progress, chunk_size=bc.cache_chunk,
                                    engine=bc.engine, ray_address=bc.ray_address or None, workers=bc.workers or None,
                                    threads_per_worker=bc.threads_per_worker or None, backbone_config=bc)

        ext = extract(records.abspaths(), "features")
        lap("extract")
    if not ext.ok.any():
        raise DatasetError(f"{database}: none of the {len(records)} images could be decoded (first: {ext.errors[0][1]})")
    good = records.subset(ext.ok)
    # Skipped images are reported relative to the dataset root, like the records themselves.
    skipped = [(records.paths[i], reason) for i, (_, reason) in zip(np.flatnonzero(~ext.ok), ext.errors)]

    cc = config.cells
    table, labels, filed = build_cells(good, size_m=cc.size_m, groups=cc.groups, min_images=cc.min_images_per_cell)
    lap("cells")
    log(f"{len(table)} cells of {cc.size_m:g} m in {table.n_groups} groups; "
        f"{int((labels < 0).sum())} images in cells under {cc.min_images_per_cell} images")

    augmented: list[np.ndarray] = []
    if config.train.augment_views and backbone is not None:
        log(f"extracting {config.train.augment_views} augmented view(s) of each database image (cached)")
        augmented = extract_augmented_views(good.abspaths(), backbone=backbone, views=config.train.augment_views,
                                            work=work, batch_size=bc.batch_size, num_workers=bc.num_workers,
                                            chunk_size=bc.cache_chunk, progress=progress)
        lap("extract-augmented")
    validation = None
    if val_queries is not None:
        vq = load_records(val_queries, split="queries", utm_zone=config.data.utm_zone or None)
        vext = extract(vq.abspaths(), "val-features")
        if not vext.ok.any():
            raise DatasetError(f"{val_queries}: none of the {len(vq)} validation queries could be decoded")
        vq = vq.subset(vext.ok)
        validation = Validation(features=vext.features, lat=vq.lat, lon=vq.lon)
        lap("extract-val")

    second, db_retrieval, val_retrieval = None, None, None
    if config.index.descriptor == "second":
        second = create_backbone(second_backbone_config(config.backbone, config.index))
        log(f"extracting {second.name} features of {len(good)} images for retrieval (cache: {work / 'features-second'})")
        db_retrieval = _all_decoded(extract(good.abspaths(), "features-second", second), database, second.name)
        if validation is not None:
            val_retrieval = _all_decoded(extract(vq.abspaths(), "val-features-second", second), val_queries, second.name)
        lap("extract-second")
    elif config.index.descriptor == "pooled":
        db_retrieval = _unit(ext.features)
        val_retrieval = None if validation is None else _unit(validation.features)

    train_args = dict(features=ext.features, labels=labels, lat=good.lat, lon=good.lon, table=table, log=log,
                      inputs_key=hashlib.sha256(ext.features.tobytes()).hexdigest(), headings=good.heading,
                      augmented=augmented, validation=validation)
    stats: dict = {}
    candidates = subcenter_candidates(config)
    if candidates:
        model, train_report = train_selecting_subcenters(candidates=candidates, config=config,
                                                         checkpoint_dir=work / "train", **train_args)
        config.set("head.subcenters", train_report.subcenters, source="train.select_subcenters")  # stored with the bundle
        stats["subcenters_selected"] = train_report.subcenters
        stats["subcenters_val_lr@1"] = {str(k): v for k, v in train_report.subcenter_val_lr1.items()}
        stats["subcenters_train_s"] = {str(k): round(v, 3) for k, v in train_report.subcenter_seconds.items()}
        stats["subcenters_validation"] = train_report.validation
    else:
        model, train_report = train_classifier(config=config, checkpoint_dir=work / "train", **train_args)
    lap("train")
    if validation is not None and config.train.select_fusion:
        q = config.query
        w, by_w = select_fusion_weight(model, table, db_features=ext.features, filed=filed, db_lat=good.lat,
                                       db_lon=good.lon, validation=validation, top_cells=q.top_cells,
                                       neighbours=q.neighbours, threshold_m=q.threshold_m,
                                       db_retrieval=db_retrieval, val_retrieval=val_retrieval)
        config.set("query.fusion_weight", w, source="--val-queries")  # stored with the bundle's config
        stats["fusion_weight_val_lr@1"] = {f"{k:g}": v for k, v in by_w.items()}
        log(f"fusion weight {w:g} chosen on {len(validation.features)} validation queries "
            f"(LR@1 by weight: {', '.join(f'{k:g}: {v:.3f}' for k, v in by_w.items())})")
        lap("select-fusion")

    features, backbone_state = ext.features, None
    if config.train.finetune_blocks > 0:
        finetune_backbone(backbone=backbone, classifier=model, table=table, paths=good.abspaths(), labels=labels,
                          config=config, log=log)
        lap("finetune")
        log("extracting features again with the tuned backbone")
        features = extract(good.abspaths(), "features-tuned").features
        if config.index.descriptor == "pooled":
            db_retrieval = _unit(features)
        backbone_state = {k: v.detach().cpu().numpy() for k, v in backbone.model.state_dict().items()}
        backbone_info = backbone.describe()
        lap("extract-tuned")

    with torch.inference_mode():
        desc = model.embed(torch.from_numpy(features)).numpy()
        prototypes = model.prototypes(table).numpy()
    state = classifier_state(model, table)
    layout = DescriptorLayout(str(config.index.descriptor), desc.shape[1], 0 if db_retrieval is None else db_retrieval.shape[1])
    stats["descriptor"] = {**layout.to_json(), "second_backbone": None if second is None else second.describe()}
    if layout.split:  # [0, r] rows and [p, 0] prototypes: cells by the classifier, retrieval by the chosen descriptor
        desc, prototypes = layout.database(db_retrieval), layout.prototypes(prototypes)
    index = CellIndex.build(descriptors=desc, cells=filed, prototypes=prototypes,
                            prototype_cells=model.prototype_cells(table), neighbours=table.neighbours(),
                            config=config.index)
    lap("index")

    stats.update({"images_used": len(good), "images_skipped": len(skipped), "train_history": train_report.history,
                  "best_epoch": train_report.best_epoch, "timings_s": timings})
    write_bundle(out, config=config, backbone_info=backbone_info, table=table, records=good, filed=filed,
                 projection=layout.projection(state["projection"]), prototypes=layout.prototypes(state["prototypes"]),
                 index=index, skipped=skipped,
                 stats=stats, backbone_state=backbone_state)
    lap("write")
    return BuildReport(out=out, images_used=len(good), images_skipped=len(skipped), cells=len(table),
                       groups=table.n_groups, images_in_dropped_cells=int((labels < 0).sum()),
                       descriptor_dim=int(desc.shape[1]), feature_dim=int(features.shape[1]),
                       reused_feature_chunks=ext.reused_chunks, timings_s=timings, train=train_report,
                       descriptor=layout.kind)
