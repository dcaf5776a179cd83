"""Divide&Classify classifier: a linear projection plus one AAMC head per cell group.

The projection maps pooled backbone features to the descriptor space; each group's head
holds one L2-normalised prototype per cell of that group. At inference every group's
prototypes are stacked into one ``[C, D]`` matrix in cell-id order and the query descriptor
is scored against all of them by cosine, so scores from different groups are on one scale
(docs/architecture.md). The same descriptor is what the database index stores, so the prototypes
double as the IVF coarse quantizer (hybrid mode is one restricted IVF search).

Decision: inference always uses cosine to normalised prototypes. The Divide&Classify
reference multiplies by the raw weights at test time; since each group's head is trained on
its own, the weight norms differ between groups and raw scores would favour whichever group
happens to have the larger norms. No option keeps the raw variant.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from geoloc.cells import CellTable
from geoloc.encoder import project


class AAMCHead(nn.Module):
    """Additive angular margin classifier (ArcFace-style) over the cells of one group.

    Training logits: ``s * cos(theta_y + m)`` for the true class, ``s * cos(theta_k)`` for
    the others, with ``theta`` the angle between the L2-normalised descriptor and the
    L2-normalised class weight.
    """

    def __init__(self, *, dim: int, n_classes: int, scale: float, margin: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) / math.sqrt(dim))
        self.scale = scale
        self.margin = margin

    def cosine(self, emb: torch.Tensor, *, normalized: bool = True) -> torch.Tensor:
        """emb ``[B, D]`` L2-normalised -> ``[B, n_classes]`` cosine (or raw dot when not normalized)."""
        w = F.normalize(self.weight, dim=1) if normalized else self.weight
        return emb @ w.T

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """emb ``[B, D]`` L2-normalised, labels ``[B]`` int64 column ids -> logits ``[B, n_classes]``.

        Without labels the logits are ``s * cos`` (no margin), as at inference.
        """
        cos = self.cosine(emb)
        if labels is None:
            return self.scale * cos
        eps = 1e-7
        theta_y = torch.acos(cos.gather(1, labels[:, None]).clamp(-1 + eps, 1 - eps))
        target = torch.cos(torch.clamp(theta_y + self.margin, max=math.pi))
        return self.scale * cos.scatter(1, labels[:, None], target)


class CellClassifier(nn.Module):
    """Projection ``[F] -> [D]`` and one :class:`AAMCHead` per group of the cell table."""

    def __init__(self, *, in_dim: int, dim: int, group_sizes: list[int], scale: float, margin: float) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.dim = dim or in_dim
        self.projection = nn.Linear(in_dim, self.dim, bias=False)
        self.heads = nn.ModuleList(
            AAMCHead(dim=self.dim, n_classes=n, scale=scale, margin=margin) for n in group_sizes
        )

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """features ``[B, F]`` -> descriptors ``[B, D]`` L2-normalised (:func:`geoloc.encoder.project`)."""
        return project(features, self.projection.weight)

    def prototypes(self, table: CellTable, *, normalized: bool = True) -> torch.Tensor:
        """All heads' class weights stacked in cell-id order: ``[C, D]`` (L2-normalised by default)."""
        out = torch.empty(len(table), self.dim, dtype=self.projection.weight.dtype)
        for g, head in enumerate(self.heads):
            ids = torch.as_tensor(table.group_cells(g))
            w = head.weight.detach()
            out[ids] = F.normalize(w, dim=1) if normalized else w
        return out

    @torch.no_grad()
    def init_from_data(self, features: torch.Tensor, labels: torch.Tensor, table: CellTable, *, seed: int = 0) -> None:
        """Start from PCA of the training features and class-mean prototypes.

        features ``[N, F]``, labels ``[N]`` cell ids (>= 0). PCA keeps the descriptor close to
        the backbone's own geometry (good retrieval before any training); with fewer samples
        than dimensions the basis is completed with random orthonormal directions. Class means
        make the untrained classifier a nearest-class-mean classifier.
        """
        if self.dim < self.in_dim:
            centred = features - features.mean(0, keepdim=True)
            basis = torch.linalg.svd(centred, full_matrices=False)[2][: self.dim]
            if basis.shape[0] < self.dim:
                gen = torch.Generator().manual_seed(seed)
                extra = torch.randn(self.dim - basis.shape[0], self.in_dim, generator=gen)
                extra -= (extra @ basis.T) @ basis
                basis = torch.cat([basis, torch.linalg.qr(extra.T)[0].T])
            self.projection.weight.copy_(basis)
        else:
            self.projection.weight.copy_(torch.eye(self.dim, self.in_dim))
        sums = torch.zeros(len(table), self.dim).index_add_(0, labels, self.embed(features))
        for g, head in enumerate(self.heads):
            ids = torch.as_tensor(table.group_cells(g))
            head.weight.copy_(F.normalize(sums[ids], dim=1))


def build_classifier(*, in_dim: int, table: CellTable, dim: int, scale: float, margin: float) -> CellClassifier:
    """A classifier with one head per group of ``table`` (group ``g`` has ``len(table.group_cells(g))`` classes)."""
    sizes = [len(table.group_cells(g)) for g in range(table.n_groups)]
    return CellClassifier(in_dim=in_dim, dim=dim, group_sizes=sizes, scale=scale, margin=margin)


def classifier_state(model: CellClassifier, table: CellTable) -> dict[str, np.ndarray]:
    """What the bundle stores: ``projection`` ``[D, F]`` and raw ``prototypes`` ``[C, D]`` in cell-id order."""
    return {
        "projection": model.projection.weight.detach().float().numpy().copy(),
        "prototypes": model.prototypes(table, normalized=False).float().numpy().copy(),
    }
