"""Training the cell classifier on cached descriptors, one group at a time.

With a frozen backbone the pooled features are extracted once (and cached), so training
the projection and the group heads costs seconds to minutes on a CPU. Groups are visited
in turn (``train.group_schedule``: one group per step, or per epoch). After every epoch the
loss and the localisation recall LR@1 of a held-out split are logged and a checkpoint is
written atomically; a restarted run with the same inputs resumes from it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from geoloc.cells import CellTable
from geoloc.config import Config
from geoloc.fileio import atomic_write_json, sha256_json
from geoloc.geo import geodesic_m
from geoloc.heads import CellClassifier, build_classifier


@dataclass
class TrainReport:
    epochs: int
    resumed_from_epoch: int
    n_train: int
    n_val: int
    history: list[dict] = field(default_factory=list)
    """One entry per epoch: epoch, loss, val_lr@1, seconds."""
    seconds: float = 0.0


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

    features ``[V, F]``; lat, lon ``[V]`` degrees.
    """
    if len(features) == 0:
        return float("nan")
    scores = model.embed(features) @ model.prototypes(table).T
    top = scores.argmax(1).numpy()
    return float((geodesic_m(lat, lon, table.lat[top], table.lon[top]) <= threshold_m).mean())


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
) -> tuple[CellClassifier, TrainReport]:
    """Train projection + group heads on cached features.

    Args:
        features: ``[N, F]`` float32 L2-normalised pooled backbone features.
        labels: ``[N]`` int64 cell id per row, -1 for rows of dropped cells (not trained on).
        lat, lon: ``[N]`` degrees, for the held-out LR@1.
        table: the cell table the labels index.
        checkpoint_dir: where checkpoints go; a checkpoint with the same inputs is resumed.
        inputs_key: identifies the features (e.g. the extraction cache key) for resuming.
    Returns:
        The trained classifier and a report with the per-epoch history.
    """
    tc, hc = config.train, config.head
    t0 = time.perf_counter()
    torch.manual_seed(tc.seed)
    feats = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    train_rows, val_rows = split_holdout(labels, fraction=tc.val_fraction, seed=tc.seed)
    model = build_classifier(in_dim=feats.shape[1], table=table, dim=hc.dim, scale=hc.scale, margin=hc.margin)
    lab = torch.from_numpy(labels.astype(np.int64))
    model.init_from_data(feats[train_rows], lab[train_rows], table, seed=tc.seed)
    model.projection.weight.requires_grad_(tc.train_projection)

    params = [{"params": [h.weight for h in model.heads], "lr": tc.lr}]
    if tc.train_projection:
        params.append({"params": [model.projection.weight], "lr": tc.lr_projection})
    opt = torch.optim.Adam(params)

    key = sha256_json({"inputs": inputs_key, "cells": sha256_json(table.key.tolist()), "labels": sha256_json(labels.tolist()),
                       "train": {k: v for k, v in vars(tc).items() if k != "epochs"}, "head": vars(hc)})
    start_epoch, history = 0, []
    if checkpoint_dir is not None:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        start_epoch, history = _try_resume(checkpoint_dir, key, model, opt, log)

    column = torch.from_numpy(table.column)
    group_rows = [train_rows[table.group[labels[train_rows]] == g] for g in range(table.n_groups)]
    active = [g for g in range(table.n_groups) if len(group_rows[g])]
    steps_per_epoch = max(1, math.ceil(len(train_rows) / tc.batch_size))
    val_feats = feats[val_rows]

    for epoch in range(start_epoch, tc.epochs):
        te = time.perf_counter()
        rng = np.random.default_rng([tc.seed, epoch])  # per epoch: a resumed run samples like an uninterrupted one
        model.train()
        losses = []
        for step in range(steps_per_epoch):
            g = active[(step if tc.group_schedule == "step" else epoch) % len(active)]
            rows = rng.choice(group_rows[g], size=min(tc.batch_size, len(group_rows[g])), replace=False)
            emb = model.embed(feats[rows])
            logits = model.heads[g](emb, column[lab[rows]])
            loss = F.cross_entropy(logits, column[lab[rows]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        model.eval()
        lr1 = holdout_lr1(model, table, val_feats, lat[val_rows], lon[val_rows], threshold_m=config.query.threshold_m)
        entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "val_lr@1": lr1, "seconds": time.perf_counter() - te}
        history.append(entry)
        log(f"epoch {epoch + 1}/{tc.epochs}  loss {entry['loss']:.4f}  held-out LR@1 {lr1:.3f}")
        if checkpoint_dir is not None:
            _save_checkpoint(checkpoint_dir, key, epoch + 1, history, model, opt)

    model.eval()
    report = TrainReport(tc.epochs, start_epoch, len(train_rows), len(val_rows), history, time.perf_counter() - t0)
    return model, report


def _save_checkpoint(folder: Path, key: str, epoch: int, history: list[dict], model: CellClassifier, opt) -> None:
    # Weights first, then the state file that points at them: a crash in between leaves the
    # previous state file, whose epoch number no longer matches the weights, so it is ignored.
    tag = f"{epoch:04d}"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, folder / f"classifier-{tag}.safetensors")
    torch.save(opt.state_dict(), folder / f"optimizer-{tag}.pt")
    atomic_write_json(folder / "train_state.json", {"key": key, "epoch": epoch, "history": history})
    for old in folder.iterdir():
        if old.name.startswith(("classifier-", "optimizer-")) and f"-{tag}." not in old.name:
            old.unlink(missing_ok=True)


def _try_resume(folder: Path, key: str, model: CellClassifier, opt, log) -> tuple[int, list[dict]]:
    state_file = folder / "train_state.json"
    try:
        state = json.loads(state_file.read_text())
        if state.get("key") != key:
            return 0, []
        tag = f"{int(state['epoch']):04d}"
        model.load_state_dict(load_file(folder / f"classifier-{tag}.safetensors"))
        opt.load_state_dict(torch.load(folder / f"optimizer-{tag}.pt", weights_only=True))
    except (OSError, ValueError, KeyError, RuntimeError):
        return 0, []
    log(f"resuming classifier training after epoch {state['epoch']}")
    return int(state["epoch"]), list(state.get("history", []))
