"""Training the cell classifier on cached descriptors, one group at a time.

With a frozen backbone the pooled features are extracted once (and cached), so training
the projection and the group heads costs seconds to minutes on a CPU. Groups are visited
in turn (``train.group_schedule``: one group per step, or per epoch).

The recipe (each part measured on and off on generated cities; see docs/architecture.md):

* **K sub-centres per cell** (``head.subcenters``), seeded by heading bin when the records
  carry headings (``head.subcenter_init``), trained with the margin loss of ``head.kind``
  (``aamc`` or ``cosface``; the true class's cosine is its best sub-centre's).
* **Class-balanced sampling** (``train.sampler='balanced'``): a batch draws a cell of the
  step's group uniformly, then one of that cell's images; ``'uniform'`` draws images.
* **Learning-rate schedule** (``train.schedule``): ``'cosine'`` is a linear warm-up over
  ``train.warmup_fraction`` of the steps then a cosine decay to 0; ``'constant'`` keeps it.
* **Augmented views** (``augmented``): features of augmented copies of the training images
  (:mod:`geoloc.augment`) join the training pool with their image's label.

After every epoch the loss and the validation LR@1 of the classifier (top cell centre within
``query.threshold_m``) are logged: on the validation queries when given
(``build-index --val-queries``), else on a held-out split of the database. With validation
queries (or ``train.select_epoch`` on the held-out split) the epoch with the best validation
LR@1 is kept (ties: the later one); otherwise the last epoch.

``train.select_subcenters`` (e.g. ``'1,2,4'``) selects K the same way
(:func:`train_selecting_subcenters`): one head set per candidate K on the same cached features,
the one whose returned weights score the best validation LR@1 kept (ties: the smaller K).

A checkpoint is written atomically after every epoch; a restarted run with the same inputs
resumes from it and ends bit for bit where an uninterrupted run ends. The checkpoint key
covers everything that changes the result: the features (and augmented features, headings,
validation set) by content hash, cells, labels, the head and train settings, and the number
of epochs whenever the schedule depends on it. A checkpoint past the requested epochs is never
resumed from (training starts over).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from geoloc.cells import CellTable
from geoloc.config import Config
from geoloc.errors import ConfigError
from geoloc.fileio import atomic_write_json, translate_write_errors, sha256_json
from geoloc.geo import geodesic_m
from geoloc.heads import HEAD_KINDS, CellClassifier, build_classifier

SAMPLERS = ("balanced", "uniform")
SCHEDULES = ("cosine", "constant")
FUSION_WEIGHTS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5)
"""Fusion weights :func:`select_fusion_weight` tries by default."""


@dataclass
class Recipe:
    """The training settings, read from the config with the fallbacks below where a key is absent.

    The fallbacks reproduce the recipe before sub-centres (one prototype per cell, uniform
    sampling, constant rate), so a config that does not name the new keys trains as before;
    the measured preset is K = 4 seeded by heading, balanced sampling and the cosine schedule.
    """

    subcenters: int = 1
    kind: str = "aamc"
    subcenter_init: str = "heading"
    sampler: str = "uniform"
    schedule: str = "constant"
    warmup_fraction: float = 0.05
    select_epoch: bool = False
    """Keep the best epoch on the held-out split too (validation queries always select)."""

    @classmethod
    def from_config(cls, config: Config) -> "Recipe":
        hc, tc = config.head, config.train
        r = cls(
            subcenters=int(getattr(hc, "subcenters", cls.subcenters)),
            kind=str(getattr(hc, "kind", cls.kind)),
            subcenter_init=str(getattr(hc, "subcenter_init", cls.subcenter_init)),
            sampler=str(getattr(tc, "sampler", cls.sampler)),
            schedule=str(getattr(tc, "schedule", cls.schedule)),
            warmup_fraction=float(getattr(tc, "warmup_fraction", cls.warmup_fraction)),
            select_epoch=bool(getattr(tc, "select_epoch", cls.select_epoch)),
        )
        checks = [
            (r.subcenters >= 1, f"head.subcenters must be >= 1 (got {r.subcenters})"),
            (r.kind in HEAD_KINDS, f"head.kind must be one of {', '.join(HEAD_KINDS)} (got {r.kind!r})"),
            (r.subcenter_init in ("heading", "random"), f"head.subcenter_init must be heading or random (got {r.subcenter_init!r})"),
            (r.sampler in SAMPLERS, f"train.sampler must be one of {', '.join(SAMPLERS)} (got {r.sampler!r})"),
            (r.schedule in SCHEDULES, f"train.schedule must be one of {', '.join(SCHEDULES)} (got {r.schedule!r})"),
            (0.0 <= r.warmup_fraction < 1.0, f"train.warmup_fraction must lie in [0, 1) (got {r.warmup_fraction})"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ConfigError(f"{msg}; fix the config file or the --set override")
        return r


@dataclass
class Validation:
    """Geotagged validation queries (e.g. ``build-index --val-queries``), already through the backbone."""

    features: np.ndarray
    """``[V, F]`` float32 pooled backbone features, L2-normalised."""
    lat: np.ndarray
    """``[V]`` degrees."""
    lon: np.ndarray
    """``[V]`` degrees."""


@dataclass
class TrainReport:
    epochs: int
    resumed_from_epoch: int
    n_train: int
    n_val: int
    history: list[dict] = field(default_factory=list)
    """One entry per epoch: epoch, loss, val_lr@1, lr, seconds."""
    seconds: float = 0.0
    best_epoch: int = 0
    """The epoch whose weights were returned (the last one unless ``train.select_epoch``)."""
    validation: str = "holdout"
    """What val_lr@1 was measured on: 'queries' (validation queries) or 'holdout' (database split)."""
    val_lr1: float = float("nan")
    """Validation LR@1 of the returned weights (NaN without validation rows)."""
    subcenters: int = 1
    """K of the returned classifier."""
    subcenter_val_lr1: dict[int, float] = field(default_factory=dict)
    """With ``train.select_subcenters``: validation LR@1 of each candidate K (empty otherwise)."""
    subcenter_seconds: dict[int, float] = field(default_factory=dict)
    """With ``train.select_subcenters``: training seconds of each candidate K."""


def split_holdout(labels: np.ndarray, *, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation row ids among labelled rows (``labels >= 0``), ``[N_train]``, ``[N_val]``.

    Validation images are drawn only from cells with at least two labelled images, and every
    cell keeps at least one training image, so no class goes unseen.
    """
    rng = np.random.default_rng(seed)
    rows = np.flatnonzero(labels >= 0)
    val: list[int] = []
    if fraction > 0:
        order = rng.permutation(rows)
        seen: dict[int, int] = {}
        budget = int(round(fraction * len(rows)))
        for r in order:
            c = int(labels[r])
            if c in seen and len(val) < budget:
                val.append(int(r))
            else:
                seen[c] = seen.get(c, 0) + 1
    val_arr = np.sort(np.asarray(val, dtype=np.int64))
    return np.setdiff1d(rows, val_arr), val_arr


@torch.no_grad()
def holdout_lr1(model: CellClassifier, table: CellTable, features: torch.Tensor, lat: np.ndarray, lon: np.ndarray,
                *, threshold_m: float) -> float:
    """Share of rows whose top-scoring cell centre lies within ``threshold_m`` of their position.

    features ``[V, F]``; lat, lon ``[V]`` degrees. A cell's score is its best sub-centre's cosine.
    """
    if len(features) == 0:
        return float("nan")
    top = model.cell_scores(model.embed(features), table).argmax(1).numpy()
    return float((geodesic_m(lat, lon, table.lat[top], table.lon[top]) <= threshold_m).mean())


def lr_factor(step: int, total: int, *, schedule: str, warmup_fraction: float) -> float:
    """Learning-rate multiplier at 0-based ``step`` of ``total``: 1 (constant), or linear warm-up then cosine to 0."""
    if schedule == "constant":
        return 1.0
    warm = warmup_fraction * total
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(total - warm, 1.0)))


def _content_key(*arrays: np.ndarray | None) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def train_classifier(
    *,
    features: np.ndarray,
    labels: np.ndarray,
    lat: np.ndarray,
    lon: np.ndarray,
    table: CellTable,
    config: Config,
    checkpoint_dir: Path | None = None,
    inputs_key: str = "",
    log: Callable[[str], None] = lambda _msg: None,
    headings: np.ndarray | None = None,
    augmented: Sequence[np.ndarray] = (),
    validation: Validation | None = None,
) -> tuple[CellClassifier, TrainReport]:
    """Train projection + group heads on cached features.

    Args:
        features: ``[N, F]`` float32 L2-normalised pooled backbone features.
        labels: ``[N]`` int64 cell id per row, -1 for rows of dropped cells (not trained on).
        lat, lon: ``[N]`` degrees, for the held-out LR@1.
        table: the cell table the labels index.
        checkpoint_dir: where checkpoints go; a checkpoint with the same inputs is resumed.
        inputs_key: identifies where the features came from (backbone, paths); the features'
            content is hashed into the checkpoint key as well.
        headings: ``[N]`` degrees (NaN = unknown) for seeding sub-centres by heading, or None.
        augmented: V arrays ``[N, F]``, features of augmented views of the same N images
            (row i is a view of image i); their training rows join the pool.
        validation: queries to select the epoch on; None uses the held-out database split.
    Returns:
        The trained classifier (the selected epoch's weights) and a report with the history.
    """
    tc, hc = config.train, config.head
    recipe = Recipe.from_config(config)
    t0 = time.perf_counter()
    torch.manual_seed(tc.seed)
    feats = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    for a in augmented:
        if np.shape(a) != tuple(feats.shape):
            raise ValueError(f"augmented features {np.shape(a)} must have the shape of the features {tuple(feats.shape)}")
    train_rows, val_rows = split_holdout(labels, fraction=tc.val_fraction, seed=tc.seed)
    model = build_classifier(in_dim=feats.shape[1], table=table, dim=hc.dim, scale=hc.scale, margin=hc.margin,
                             subcenters=recipe.subcenters, kind=recipe.kind)
    lab = torch.from_numpy(labels.astype(np.int64))
    use_headings = headings if recipe.subcenter_init == "heading" and headings is not None else None
    model.init_from_data(feats[train_rows], lab[train_rows], table, seed=tc.seed,
                         headings=None if use_headings is None else np.asarray(use_headings)[train_rows])
    model.projection.weight.requires_grad_(tc.train_projection)

    params = [{"params": [h.weight for h in model.heads], "lr": tc.lr}]
    if tc.train_projection:
        params.append({"params": [model.projection.weight], "lr": tc.lr_projection})
    base_lrs = [g["lr"] for g in params]
    opt = torch.optim.Adam(params)

    train_settings = {k: v for k, v in vars(tc).items() if k != "epochs" or recipe.schedule != "constant"}
    key = sha256_json({
        "inputs": inputs_key, "cells": sha256_json(table.key.tolist()), "labels": sha256_json(labels.tolist()),
        "train": train_settings, "head": vars(hc), "recipe": vars(recipe),
        "content": _content_key(features, *augmented, None if use_headings is None else np.asarray(use_headings, np.float64)),
        "validation": None if validation is None else _content_key(validation.features, validation.lat, validation.lon),
    })
    start_epoch, history, best = 0, [], None
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        start_epoch, history, best = _try_resume(checkpoint_dir, key, tc.epochs, model, opt, log)

    # the training pool: the original rows, then each augmented view's copy of them
    pool = torch.cat([feats[train_rows]] + [torch.from_numpy(np.asarray(a, np.float32))[train_rows] for a in augmented])
    pool_lab = np.tile(labels[train_rows], 1 + len(augmented))
    column = torch.from_numpy(table.column)
    samplers = [_GroupRows(pool_lab, table, g) for g in range(table.n_groups)]
    active = [g for g in range(table.n_groups) if len(samplers[g].rows)]
    steps_per_epoch = max(1, math.ceil(len(train_rows) / tc.batch_size))
    total_steps = steps_per_epoch * tc.epochs

    if validation is not None:
        v_feats, v_lat, v_lon, v_kind = torch.from_numpy(np.asarray(validation.features, np.float32)), validation.lat, validation.lon, "queries"
    else:
        v_feats, v_lat, v_lon, v_kind = feats[val_rows], lat[val_rows], lon[val_rows], "holdout"

    for epoch in range(start_epoch, tc.epochs):
        te = time.perf_counter()
        rng = np.random.default_rng([tc.seed, epoch])  # per epoch: a resumed run samples like an uninterrupted one
        model.train()
        losses = []
        for step in range(steps_per_epoch):
            g = active[(step if tc.group_schedule == "step" else epoch) % len(active)]
            rows = samplers[g].draw(rng, tc.batch_size, recipe.sampler)
            factor = lr_factor(epoch * steps_per_epoch + step, total_steps, schedule=recipe.schedule,
                               warmup_fraction=recipe.warmup_fraction)
            for group, base in zip(opt.param_groups, base_lrs):
                group["lr"] = base * factor
            y = column[torch.from_numpy(pool_lab[rows])]
            logits = model.heads[g](model.embed(pool[torch.from_numpy(rows)]), y)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        lr1 = holdout_lr1(model, table, v_feats, v_lat, v_lon, threshold_m=config.query.threshold_m)
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_lr@1": lr1,
                 "lr": base_lrs[0] * factor, "seconds": time.perf_counter() - te}
        history.append(entry)
        log(f"epoch {epoch + 1}/{tc.epochs}  loss {entry['loss']:.4f}  {v_kind} LR@1 {lr1:.3f}")
        if best is None or not (lr1 < best[1]) or math.isnan(lr1):  # ties and NaN: the later epoch
            best = (epoch + 1, lr1, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if checkpoint_dir is not None:
            _save_checkpoint(checkpoint_dir, key, epoch + 1, history, model, opt, best)

    best_epoch = tc.epochs
    if (recipe.select_epoch or validation is not None) and best is not None and best[0] != tc.epochs:
        model.load_state_dict(best[2])
        best_epoch = best[0]
        log(f"selected epoch {best_epoch} ({v_kind} LR@1 {best[1]:.3f})")
    model.eval()
    report = TrainReport(tc.epochs, start_epoch, len(train_rows), len(v_feats), history, time.perf_counter() - t0,
                         best_epoch=best_epoch, validation=v_kind,
                         val_lr1=holdout_lr1(model, table, v_feats, v_lat, v_lon, threshold_m=config.query.threshold_m),
                         subcenters=recipe.subcenters)
    return model, report


def subcenter_candidates(config: Config) -> list[int]:
    """The K values of ``train.select_subcenters`` (e.g. ``'1,2,4'`` -> ``[1, 2, 4]``, sorted, unique);
    ``[]`` when the key is empty or absent (train ``head.subcenters`` only).

    Raises:
        ConfigError: a K outside 1..64 (the range of head.subcenters).
    """
    text = str(getattr(config.train, "select_subcenters", "") or "").strip()
    if not text:
        return []
    try:
        ks = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise ConfigError(f"train.select_subcenters = {text!r}: expected comma-separated numbers of sub-centres, "
                          "e.g. 1,2,4; fix the config file or the --set override") from None
    bad = [k for k in ks if not 1 <= k <= 64]
    if bad:
        raise ConfigError(f"train.select_subcenters = {text!r}: every K must lie in 1..64 like head.subcenters "
                          f"(got {', '.join(map(str, bad))}); fix the config file or the --set override")
    return ks


def train_selecting_subcenters(*, candidates: Sequence[int], config: Config, checkpoint_dir: Path | None = None,
                               log: Callable[[str], None] = lambda _msg: None,
                               **train_args) -> tuple[CellClassifier, TrainReport]:
    """:func:`train_classifier` once per K of ``candidates`` (same features, labels, validation) and
    keep the classifier whose returned weights score the best validation LR@1 (the metric that
    selects the epoch: the validation queries when given, else the held-out split); ties keep the
    smaller K. Each K checkpoints in its own ``checkpoint_dir/subcenters-K`` folder, so a killed
    selection resumes K by K.

    ``train_args``: the other keyword arguments of :func:`train_classifier` (features, labels, lat,
    lon, table, headings, augmented, validation, inputs_key).
    Returns:
        The chosen classifier and its report, whose ``subcenter_val_lr1`` maps every candidate K to
        its validation LR@1 and ``subcenter_seconds`` to its training time; ``seconds`` is the total.

    Without validation queries and with too few images for a held-out split, K stays
    ``head.subcenters`` (one training, logged): a preset that selects K still builds tiny datasets.

    Raises:
        ConfigError: no candidates, or nothing to select on (``train.val_fraction`` 0 and no
            validation queries).
    """
    ks = sorted({int(k) for k in candidates})
    if not ks:
        raise ConfigError("train.select_subcenters names no K; give e.g. 1,2,4 or leave it empty")
    if train_args.get("validation") is None:
        if config.train.val_fraction <= 0:
            raise ConfigError("train.select_subcenters needs validation rows: pass build-index --val-queries DIR or "
                              "set train.val_fraction above 0")
        if not len(split_holdout(train_args["labels"], fraction=config.train.val_fraction, seed=config.train.seed)[1]):
            log(f"too few images for a held-out split to choose K on; keeping head.subcenters = {config.head.subcenters}")
            return train_classifier(config=config, log=log, checkpoint_dir=checkpoint_dir, **train_args)
    t0 = time.perf_counter()
    scores: dict[int, float] = {}
    seconds: dict[int, float] = {}
    chosen: tuple[CellClassifier, TrainReport] | None = None
    for k in ks:
        cfg = copy.deepcopy(config)
        cfg.set("head.subcenters", k, source="train.select_subcenters")
        log(f"sub-centres K = {k}: training")
        model, rep = train_classifier(config=cfg, log=log,
                                      checkpoint_dir=None if checkpoint_dir is None else checkpoint_dir / f"subcenters-{k}",
                                      **train_args)
        scores[k], seconds[k] = rep.val_lr1, rep.seconds
        log(f"sub-centres K = {k}: {rep.validation} LR@1 {rep.val_lr1:.3f} ({rep.seconds:.1f} s)")
        if chosen is None or rep.val_lr1 > chosen[1].val_lr1:  # ties keep the smaller K
            chosen = (model, rep)
    model, report = chosen
    report.subcenter_val_lr1, report.subcenter_seconds = scores, seconds
    report.seconds = time.perf_counter() - t0
    log(f"selected K = {report.subcenters} sub-centres ({report.validation} LR@1 by K: "
        f"{', '.join(f'{k}: {v:.3f}' for k, v in scores.items())})")
    return model, report


class _GroupRows:
    """The training-pool rows of one group, ordered by cell, for uniform or class-balanced draws."""

    def __init__(self, pool_labels: np.ndarray, table: CellTable, g: int) -> None:
        rows = np.flatnonzero(table.group[np.maximum(pool_labels, 0)] == g) if len(pool_labels) else np.zeros(0, np.int64)
        self.rows = rows
        order = rows[np.argsort(pool_labels[rows], kind="stable")]
        cells = np.unique(pool_labels[rows])
        self.order = order
        self.start = np.searchsorted(pool_labels[order], cells)
        self.count = np.searchsorted(pool_labels[order], cells, side="right") - self.start

    def draw(self, rng: np.random.Generator, batch: int, sampler: str) -> np.ndarray:
        """``[B]`` int64 pool rows: distinct images (uniform) or a cell then one of its images (balanced)."""
        if sampler == "uniform":
            return rng.choice(self.rows, size=min(batch, len(self.rows)), replace=False)
        c = rng.integers(0, len(self.start), batch)
        return self.order[self.start[c] + (rng.random(batch) * self.count[c]).astype(np.int64)]


@torch.no_grad()
def select_fusion_weight(model: CellClassifier, table: CellTable, *, db_features: np.ndarray, filed: np.ndarray,
                         db_lat: np.ndarray, db_lon: np.ndarray, validation: Validation, top_cells: int,
                         neighbours: bool, threshold_m: float,
                         weights: Sequence[float] = FUSION_WEIGHTS, db_retrieval: np.ndarray | None = None,
                         val_retrieval: np.ndarray | None = None) -> tuple[float, dict[float, float]]:
    """The hybrid fusion weight with the best LR@1 on the validation queries (ties: the smaller weight).

    Hybrid as the index does it: exact search among the database rows filed in the top
    ``top_cells`` cells (and their 8-neighbour rings), ranked by ``cosine + w * cell score``.

    Args:
        db_features: ``[N, F]`` pooled features of the database; filed ``[N]`` int64 cell of each row;
            db_lat, db_lon ``[N]`` degrees.
        db_retrieval, val_retrieval: ``[N, R]`` and ``[V, R]`` L2-normalised retrieval descriptors
            when the index retrieves by another descriptor than the classifier's (``index.descriptor``
            pooled or second); None: the projected descriptor.
    Returns:
        ``(weight, {weight: LR@1})``.
    """
    if len(validation.features) == 0:
        raise ValueError("no validation queries to select the fusion weight on")
    q = model.embed(torch.from_numpy(np.asarray(validation.features, np.float32)))
    db = model.embed(torch.from_numpy(np.asarray(db_features, np.float32)))
    cs = model.cell_scores(q, table)
    top = cs.topk(min(top_cells, len(table)), dim=1).indices.numpy()
    c = len(table)
    allowed = np.zeros((len(q), c + 1), dtype=bool)
    rows = np.arange(len(q))[:, None]
    allowed[rows, top] = True
    if neighbours:
        ring = table.neighbours()[top].reshape(len(q), -1)
        allowed[rows, np.where(ring >= 0, ring, c)] = True
    mask = torch.from_numpy(allowed[:, filed])
    if (db_retrieval is None) != (val_retrieval is None):
        raise ValueError("db_retrieval and val_retrieval go together")
    if db_retrieval is not None:
        sim = torch.from_numpy(np.asarray(val_retrieval, np.float32)) @ torch.from_numpy(np.asarray(db_retrieval, np.float32)).T
    else:
        sim = q @ db.T
    bonus = cs[:, torch.from_numpy(np.asarray(filed, np.int64))]
    recall = {}
    for w in weights:
        best = torch.where(mask, sim + float(w) * bonus, torch.tensor(-math.inf)).argmax(1).numpy()
        err = geodesic_m(validation.lat, validation.lon, db_lat[best], db_lon[best])
        recall[float(w)] = float((err <= threshold_m).mean())
    chosen = max(recall, key=lambda w: (recall[w], -w))
    return chosen, recall


def _save_checkpoint(folder: Path, key: str, epoch: int, history: list[dict], model: CellClassifier, opt,
                     best: tuple[int, float, dict] | None) -> None:
    # Weights first, then the state file that points at them: a crash in between leaves the
    # previous state file, whose epoch number no longer matches the weights, so it is ignored.
    # A full disk, a read-only folder or a missing permission is one OutputError line naming the file.
    tag = f"{epoch:04d}"
    with translate_write_errors(folder / f"classifier-{tag}.safetensors"):
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, folder / f"classifier-{tag}.safetensors")
    with translate_write_errors(folder / f"optimizer-{tag}.pt"):
        torch.save(opt.state_dict(), folder / f"optimizer-{tag}.pt")
    best_tag = f"{best[0]:04d}" if best is not None else ""
    if best is not None:
        with translate_write_errors(folder / f"best-{tag}.safetensors"):
            save_file({k: v.contiguous() for k, v in best[2].items()}, folder / f"best-{tag}.safetensors")
    atomic_write_json(folder / "train_state.json", {"key": key, "epoch": epoch, "history": history,
                                                    "best_epoch": best[0] if best else 0,
                                                    "best_lr1": best[1] if best else None, "best_tag": best_tag})
    for old in folder.iterdir():
        if old.name.startswith(("classifier-", "optimizer-", "best-")) and f"-{tag}." not in old.name:
            old.unlink(missing_ok=True)


def _try_resume(folder: Path, key: str, epochs: int, model: CellClassifier, opt,
                log) -> tuple[int, list[dict], tuple[int, float, dict] | None]:
    state_file = folder / "train_state.json"
    try:
        state = json.loads(state_file.read_text())
        if state.get("key") != key:
            return 0, [], None
        epoch = int(state["epoch"])
        if epoch > epochs:  # never resume from past the requested end: start over
            log(f"checkpoint after epoch {epoch} is past the requested {epochs} epochs; training from the start")
            return 0, [], None
        tag = f"{epoch:04d}"
        model.load_state_dict(load_file(folder / f"classifier-{tag}.safetensors"))
        opt.load_state_dict(torch.load(folder / f"optimizer-{tag}.pt", weights_only=True))
        best = None
        if state.get("best_epoch"):
            lr1 = state.get("best_lr1")
            best = (int(state["best_epoch"]), float("nan") if lr1 is None else float(lr1),
                    load_file(folder / f"best-{tag}.safetensors"))
    except (OSError, ValueError, KeyError, RuntimeError, TypeError):
        return 0, [], None
    log(f"resuming classifier training after epoch {epoch}")
    return epoch, list(state.get("history", [])), best
