"""Divide&Classify classifier: a linear projection plus one margin head per cell group.

The projection maps pooled backbone features to the descriptor space; each group's head
holds K L2-normalised prototypes (sub-centres) per cell of that group. At inference every
group's prototypes are stacked into one ``[C*K, D]`` matrix in cell-id order (row
``c*K + k`` is sub-centre ``k`` of cell ``c``; :meth:`CellClassifier.prototype_cells` says
whose) and the query descriptor is scored against all of them by cosine; a cell's score is
the best cosine over its sub-centres. So scores from different groups and different K are on
one scale (docs/architecture.md). By default the same descriptor is what the database index
stores, so the prototypes double as the IVF coarse quantizer (hybrid mode is one restricted IVF
search); with ``index.descriptor`` pooled or second the index retrieves by another descriptor and
the prototypes score cells in their own block of the index vectors
(:class:`geoloc.encoder.DescriptorLayout`).

Heads: ``aamc`` (additive angular margin, ArcFace: ``s*cos(theta_y + m)``) or ``cosface``
(large margin cosine, LMCC: ``s*(cos(theta_y) - m)``), both as in Divide&Classify; with K > 1
they are the sub-centre variants (the true class's cosine is its best sub-centre's).

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

HEAD_KINDS = ("aamc", "cosface")


class MarginHead(nn.Module):
    """Margin classifier over the ``n_classes`` cells of one group, ``subcenters`` prototypes each.

    ``weight`` is ``[n_classes * K, D]``; row ``j*K + k`` is sub-centre ``k`` of class ``j``.
    Class cosine = max over its sub-centres of the cosine between the L2-normalised descriptor
    and the L2-normalised sub-centre. Training logits: the margin applied to the true class
    (``kind='aamc'``: ``s*cos(theta_y + m)``, ``'cosface'``: ``s*(cos theta_y - m)``), ``s*cos``
    for the others.
    """

    def __init__(self, *, dim: int, n_classes: int, scale: float, margin: float, subcenters: int = 1,
                 kind: str = "aamc") -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
        if subcenters < 1:
            raise ValueError(f"subcenters must be >= 1, got {subcenters}")
        self.weight = nn.Parameter(torch.randn(n_classes * subcenters, dim) / math.sqrt(dim))
        self.n_classes = n_classes
        self.subcenters = subcenters
        self.scale = scale
        self.margin = margin
        self.kind = kind

    def cosine(self, emb: torch.Tensor, *, normalized: bool = True) -> torch.Tensor:
        """emb ``[B, D]`` L2-normalised -> ``[B, n_classes]`` cosine, best sub-centre per class
        (raw dot products when not normalized)."""
        w = F.normalize(self.weight, dim=1) if normalized else self.weight
        s = emb @ w.T
        if self.subcenters == 1:
            return s
        return s.view(len(emb), self.n_classes, self.subcenters).amax(2)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """emb ``[B, D]`` L2-normalised, labels ``[B]`` int64 column ids -> logits ``[B, n_classes]``.

        Without labels the logits are ``s * cos`` (no margin), as at inference.
        """
        cos = self.cosine(emb)
        if labels is None:
            return self.scale * cos
        cy = cos.gather(1, labels[:, None])
        if self.kind == "aamc":
            eps = 1e-7
            theta_y = torch.acos(cy.clamp(-1 + eps, 1 - eps))
            target = torch.cos(torch.clamp(theta_y + self.margin, max=math.pi))
        else:
            target = cy - self.margin
        return self.scale * cos.scatter(1, labels[:, None], target)


class AAMCHead(MarginHead):
    """Additive angular margin classifier (ArcFace-style), one prototype per class: ``MarginHead(kind='aamc')``."""

    def __init__(self, *, dim: int, n_classes: int, scale: float, margin: float, subcenters: int = 1) -> None:
        super().__init__(dim=dim, n_classes=n_classes, scale=scale, margin=margin, subcenters=subcenters, kind="aamc")


def heading_bins(heading: np.ndarray, k: int) -> np.ndarray:
    """Heading bin of each image for ``k`` sub-centres: ``[N]`` float degrees (NaN = unknown) -> ``[N]`` int64.

    Bin ``b`` covers ``[b*360/k - 180/k, b*360/k + 180/k)`` (bin 0 is centred on north); -1 where
    the heading is unknown.
    """
    h = np.asarray(heading, dtype=np.float64)
    known = np.isfinite(h)
    b = np.floor(((np.where(known, h, 0.0) + 180.0 / k) % 360.0) / (360.0 / k)).astype(np.int64)
    return np.where(known, np.minimum(b, k - 1), -1)


class CellClassifier(nn.Module):
    """Projection ``[F] -> [D]`` and one :class:`MarginHead` per group of the cell table."""

    def __init__(self, *, in_dim: int, dim: int, group_sizes: list[int], scale: float, margin: float,
                 subcenters: int = 1, kind: str = "aamc") -> None:
        super().__init__()
        self.in_dim = in_dim
        self.dim = dim or in_dim
        self.subcenters = subcenters
        self.projection = nn.Linear(in_dim, self.dim, bias=False)
        self.heads = nn.ModuleList(
            MarginHead(dim=self.dim, n_classes=n, scale=scale, margin=margin, subcenters=subcenters, kind=kind)
            for n in group_sizes
        )

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """features ``[B, F]`` -> descriptors ``[B, D]`` L2-normalised (:func:`geoloc.encoder.project`)."""
        return project(features, self.projection.weight)

    def _rows(self, table: CellTable, g: int) -> torch.Tensor:
        """Prototype rows ``[C_g * K]`` int64 of group ``g``'s head weights in the stacked matrix."""
        ids = torch.as_tensor(table.group_cells(g))
        k = self.subcenters
        return (ids[:, None] * k + torch.arange(k)[None]).reshape(-1)

    def prototypes(self, table: CellTable, *, normalized: bool = True) -> torch.Tensor:
        """All heads' sub-centres stacked in cell-id order: ``[C*K, D]`` (L2-normalised by default);
        row ``c*K + k`` is sub-centre ``k`` of cell ``c``."""
        out = torch.empty(len(table) * self.subcenters, self.dim, dtype=self.projection.weight.dtype)
        for g, head in enumerate(self.heads):
            w = head.weight.detach()
            out[self._rows(table, g)] = F.normalize(w, dim=1) if normalized else w
        return out

    def prototype_cells(self, table: CellTable) -> np.ndarray:
        """``[C*K]`` int64: the cell id of each row of :meth:`prototypes`."""
        return np.repeat(np.arange(len(table), dtype=np.int64), self.subcenters)

    @torch.no_grad()
    def cell_scores(self, descriptors: torch.Tensor, table: CellTable) -> torch.Tensor:
        """descriptors ``[B, D]`` L2-normalised -> ``[B, C]`` cell scores (best cosine over each cell's sub-centres)."""
        s = descriptors @ self.prototypes(table).T
        return s.view(len(descriptors), len(table), self.subcenters).amax(2) if self.subcenters > 1 else s

    @torch.no_grad()
    def init_from_data(self, features: torch.Tensor, labels: torch.Tensor, table: CellTable, *, seed: int = 0,
                       headings: np.ndarray | None = None) -> None:
        """Start from PCA of the training features and class-mean prototypes.

        features ``[N, F]``, labels ``[N]`` cell ids (>= 0), headings ``[N]`` degrees (NaN =
        unknown) or None. PCA keeps the descriptor close to the backbone's own geometry (good
        retrieval before any training); with fewer samples than dimensions the basis is
        completed with random orthonormal directions. With K = 1 the prototypes are the class
        means (the untrained classifier is a nearest-class-mean classifier). With K > 1,
        sub-centre ``k`` of a cell is the mean of its images in heading bin ``k``
        (:func:`heading_bins`) when headings are known, else one of its images drawn at random;
        a sub-centre with no image starts at the class mean. A tiny seeded jitter keeps equal
        sub-centres apart.
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
        emb = self.embed(features)
        c, k = len(table), self.subcenters
        means = F.normalize(torch.zeros(c, self.dim).index_add_(0, labels, emb), dim=1)
        protos = means.repeat_interleave(k, 0)
        if k > 1:
            bins = heading_bins(headings, k) if headings is not None else np.full(len(labels), -1)
            lab = labels.numpy()
            if (bins >= 0).any():
                known = torch.from_numpy(bins >= 0)
                rows = torch.from_numpy(lab * k + np.maximum(bins, 0))[known]
                sums = torch.zeros(c * k, self.dim).index_add_(0, rows, emb[known])
                count = torch.zeros(c * k).index_add_(0, rows, torch.ones(len(rows)))
                protos = torch.where(count[:, None] > 0, F.normalize(sums, dim=1), protos)
            else:
                rng = np.random.default_rng(seed)
                order = np.argsort(lab, kind="stable")
                start = np.searchsorted(lab[order], np.arange(c))
                count = np.bincount(lab, minlength=c)
                for cell in np.flatnonzero(count):
                    pick = rng.permutation(count[cell])[:k]
                    for j in range(k):
                        protos[cell * k + j] = emb[order[start[cell] + pick[j % len(pick)]]]
            gen = torch.Generator().manual_seed(seed)
            protos = F.normalize(protos + 1e-3 * torch.randn(protos.shape, generator=gen), dim=1)
        for g, head in enumerate(self.heads):
            head.weight.copy_(protos[self._rows(table, g)])


def build_classifier(*, in_dim: int, table: CellTable, dim: int, scale: float, margin: float, subcenters: int = 1,
                     kind: str = "aamc") -> CellClassifier:
    """A classifier with one head per group of ``table`` (group ``g`` has ``len(table.group_cells(g))`` classes,
    ``subcenters`` prototypes each)."""
    sizes = [len(table.group_cells(g)) for g in range(table.n_groups)]
    return CellClassifier(in_dim=in_dim, dim=dim, group_sizes=sizes, scale=scale, margin=margin,
                          subcenters=subcenters, kind=kind)


def classifier_state(model: CellClassifier, table: CellTable) -> dict[str, np.ndarray]:
    """What the bundle stores: ``projection`` ``[D, F]``, raw ``prototypes`` ``[C*K, D]`` in cell-id order
    and ``prototype_cells`` ``[C*K]`` int64 (the cell of each prototype row)."""
    return {
        "projection": model.projection.weight.detach().float().numpy().copy(),
        "prototypes": model.prototypes(table, normalized=False).float().numpy().copy(),
        "prototype_cells": model.prototype_cells(table),
    }
