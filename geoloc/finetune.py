"""Optional second training stage: the last K backbone blocks, on images, with the heads.

``train.finetune_blocks = K > 0`` unfreezes the last K blocks of the backbone
(:meth:`geoloc.backbones.Backbone.blocks`; normalisation statistics stay frozen) and trains them
together with the projection and the group heads for ``train.finetune_epochs`` epochs on the
database images, with the AAMC loss of each image's group. The build then extracts the
features again with the tuned backbone and ships its weights in the bundle
(``backbone.safetensors``), whose fingerprint the manifest records.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from geoloc.backbones import Backbone
from geoloc.cells import CellTable
from geoloc.config import Config
from geoloc.errors import ConfigError
from geoloc.encoder import pooled
from geoloc.extract import image_batches
from geoloc.heads import CellClassifier


def finetune_backbone(*, backbone: Backbone, classifier: CellClassifier, table: CellTable, paths: Sequence[str],
                      labels: np.ndarray, config: Config, log: Callable[[str], None] = lambda _m: None) -> list[dict]:
    """Train the last ``config.train.finetune_blocks`` blocks and the classifier in place.

    Args:
        paths: ``[N]`` image files; labels: ``[N]`` int64 cell ids (-1: not trained on).
    Returns:
        One history entry (epoch, loss) per epoch. The backbone is left frozen, in eval mode,
        with its fingerprint updated to the tuned weights.
    """
    tc = config.train
    blocks = backbone.blocks()
    if not 0 < tc.finetune_blocks <= len(blocks):
        raise ConfigError(f"train.finetune_blocks must lie in 1..{len(blocks)} for {backbone.name}, got {tc.finetune_blocks}")
    tuned = [p for b in blocks[-tc.finetune_blocks:] for p in b.parameters()]
    for p in tuned:
        p.requires_grad_(True)
    opt = torch.optim.Adam([
        {"params": tuned, "lr": tc.lr_backbone},
        {"params": [h.weight for h in classifier.heads], "lr": tc.lr},
        {"params": [classifier.projection.weight], "lr": tc.lr_projection if tc.train_projection else 0.0},
    ])
    rows = np.flatnonzero(labels >= 0)
    column = torch.from_numpy(table.column)
    group = torch.from_numpy(table.group)
    lab = torch.from_numpy(labels.astype(np.int64))
    history = []
    # model.eval() throughout: BatchNorm statistics and dropout stay as pretrained; gradients still flow.
    backbone.model.eval()
    classifier.train()
    try:
        for epoch in range(tc.finetune_epochs):
            order = np.random.default_rng([tc.seed, 1_000 + epoch]).permutation(rows)
            bs = max(2, config.backbone.batch_size)
            batches = [order[i : i + bs] for i in range(0, len(order), bs)]
            losses = []
            for idx, x, _bad in image_batches(paths, backbone=backbone, batches=batches,
                                              num_workers=config.backbone.num_workers):
                if x is None:
                    continue
                cells = lab[idx]
                emb = classifier.embed(pooled(backbone, x, grad=True))
                loss = emb.new_zeros(())
                for g in torch.unique(group[cells]).tolist():
                    m = group[cells] == g
                    target = column[cells[m]]
                    loss = loss + F.cross_entropy(classifier.heads[g](emb[m], target), target, reduction="sum")
                loss = loss / len(idx)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(loss.item())
            entry = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else math.nan}
            history.append(entry)
            log(f"fine-tune epoch {epoch + 1}/{tc.finetune_epochs}: last {tc.finetune_blocks} blocks, loss {entry['loss']:.4f}")
    finally:
        for p in tuned:
            p.requires_grad_(False)
        classifier.eval()
    backbone.refresh_fingerprint()
    return history
