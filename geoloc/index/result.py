"""What a search answers: :class:`SearchResult` and its per-stage wall times :class:`SearchTimes`."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["SearchResult", "SearchTimes"]


@dataclass(frozen=True)
class SearchTimes:
    """Wall time of one batch's stages, in milliseconds (for the whole batch, not per query).

    Attributes:
        cells_ms: scoring the cells and choosing the lists (classify, hybrid).
        search_ms: searching the database vectors (retrieve, hybrid).
        prepare_ms: building the exact-retrieve view at the first retrieve (0 otherwise).
    """

    cells_ms: float = 0.0
    search_ms: float = 0.0
    prepare_ms: float = 0.0

    def to_dict(self) -> dict[str, float]:
        """``{"cells": ..., "search": ..., "prepare": ...}`` (the former ``timings_ms`` keys)."""
        return {"cells": self.cells_ms, "search": self.search_ms, "prepare": self.prepare_ms}


@dataclass
class SearchResult:
    """Answer of :meth:`geoloc.index.CellIndex.search` for a batch of ``B`` queries.

    Attributes:
        cell_ids: ``[B, Kc]`` int64 top cells, best first (classify/hybrid; ``[B, 0]`` for
            retrieve); -1 where fewer than ``Kc`` cells exist.
        cell_scores: ``[B, Kc]`` float32 cell score (best cosine over the cell's prototypes); -inf on padding.
        ids: ``[B, K]`` int64 database row ids, best first (retrieve/hybrid; ``[B, 0]`` for
            classify); -1 where fewer than ``K`` vectors were searched.
        scores: ``[B, K]`` float32 ranking scores, descending: inner products, plus
            ``fusion_weight`` x the cell score in a fused hybrid; -inf on padding.
        lists: ``[B, W]`` int64 inverted lists (cells) searched, -1 padded (hybrid; ``[B, 0]`` for
            classify and for retrieve, which scans every vector).
        scanned: ``[B]`` int64 database vectors scanned per query (0 classify, N retrieve).
        times: wall time per stage for the whole batch.
    """

    cell_ids: np.ndarray
    cell_scores: np.ndarray
    ids: np.ndarray
    scores: np.ndarray
    lists: np.ndarray
    scanned: np.ndarray
    times: SearchTimes = field(default_factory=SearchTimes)

    @property
    def timings_ms(self) -> dict[str, float]:
        """``times`` as a dict (``"cells"``, ``"search"``, ``"prepare"``); kept for older readers."""
        return self.times.to_dict()
