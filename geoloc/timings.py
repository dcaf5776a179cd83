"""Per-stage wall times of a query, as one small typed object.

The stages of a query (docs/architecture.md, "Query path")::

    decode    image file -> RGB -> backbone input tensor
    backbone  input tensor -> pooled feature [F]
    heads     projection -> descriptor [D]; cell scores -> top-k cells
    search    database search (all vectors for retrieve, the top-k cells' lists for hybrid)

JSON keeps the flat form ``{"decode": ms, "backbone": ms, "heads": ms, "search": ms, "total": ms}``
(the ``timings_ms`` of ``geoloc query --json``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

STAGES = ("decode", "backbone", "heads", "search")


@dataclass(frozen=True)
class StageTimes:
    """Milliseconds spent in each stage (for one query, or summed over a batch)."""

    decode: float = 0.0
    backbone: float = 0.0
    heads: float = 0.0
    search: float = 0.0

    @property
    def total(self) -> float:
        return self.decode + self.backbone + self.heads + self.search

    def __add__(self, other: "StageTimes") -> "StageTimes":
        return StageTimes(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def scaled(self, factor: float) -> "StageTimes":
        """Every stage multiplied by ``factor`` (e.g. ``1 / B`` for the per-query share of a batch)."""
        return StageTimes(*(getattr(self, f.name) * factor for f in fields(self)))

    def to_dict(self) -> dict[str, float]:
        """``{"decode", "backbone", "heads", "search", "total"}`` in milliseconds."""
        out = {s: float(getattr(self, s)) for s in STAGES}
        out["total"] = float(self.total)
        return out
