"""The localiser: a loaded bundle plus its backbone, answering in classify, retrieve or hybrid mode.

Query path, one stage per line (the names of ``Prediction.timings_ms``)::

    decode    image file -> RGB -> backbone input tensor
    backbone  tensor -> pooled feature [F]
    heads     projection -> descriptor [D]; cosine to every cell prototype -> top-k cells
    search    database search (whole database for retrieve, top-k cells for hybrid)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from geoloc.backbones import Backbone, create_backbone
from geoloc.bundle import Bundle, check_backbone, read_bundle
from geoloc.config import Config
from geoloc.errors import ConfigError, ImageError
from geoloc.extract import embed_images, load_for_backbone

MODES = ("classify", "retrieve", "hybrid")


@dataclass
class Prediction:
    """Where one image was taken, according to one mode."""

    image: str
    mode: str
    lat: float
    lon: float
    east: float
    north: float
    zone: int
    hemisphere: str
    cell: int
    """Cell id of the answer (the top cell for classify, the match's cell otherwise)."""
    cell_pq: tuple[int, int]
    score: float
    """Cosine of the query to the top cell's prototype (classify) or to the best match."""
    match: str | None
    """Path of the best database image (retrieve, hybrid)."""
    top_cells: list[int] = field(default_factory=list)
    candidates: list[tuple[float, float]] = field(default_factory=list)
    """The top answers' (lat, lon), best first: cell centres (classify) or matches' positions."""
    timings_ms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class QueryOptions:
    mode: str = "hybrid"
    top_cells: int = 5
    neighbours: bool = False
    top_matches: int = 10

    @classmethod
    def from_config(cls, config: Config, **overrides) -> "QueryOptions":
        q = config.query
        opts = cls(q.mode, q.top_cells, q.neighbours, q.top_matches)
        for key, value in overrides.items():
            if value is not None:
                setattr(opts, key, value)
        if opts.mode not in MODES:
            raise ConfigError(f"unknown mode {opts.mode!r}; choose one of {', '.join(MODES)}")
        if opts.top_cells < 1 or opts.top_matches < 1:
            raise ConfigError("--top-cells and query.top_matches must be at least 1")
        return opts


class Localizer:
    """A verified bundle and the backbone it was built with. Thread-safe for queries."""

    def __init__(self, bundle: Bundle, backbone: Backbone) -> None:
        check_backbone(bundle.manifest, backbone.describe(), where=bundle.path)
        self.bundle = bundle
        self.backbone = backbone
        self.config = bundle.config
        self._projection = torch.from_numpy(bundle.projection.copy())
        self._abspaths: list[str] | None = None

    @classmethod
    def load(cls, path: str | Path, *, config: Config | None = None, backbone: Backbone | None = None,
             device: str | None = None) -> "Localizer":
        """Load ``path`` (checksums and format verified), creating its backbone unless one is given.

        ``config`` overrides the bundle's own query-time options; a ``backbone`` (or a
        ``config.backbone``) other than the bundle's is refused, saying what differs.
        """
        bundle = read_bundle(Path(path), config=config)
        if backbone is None:
            backbone = create_backbone(bundle.config.backbone, device=device)
            if bundle.backbone_state is not None:
                backbone.load_tuned(bundle.backbone_state)
        return cls(bundle, backbone)

    # -- descriptors ----------------------------------------------------------------------------
    def project(self, features: np.ndarray) -> np.ndarray:
        """Pooled backbone features ``[B, F]`` -> L2-normalised descriptors ``[B, D]`` float32."""
        with torch.inference_mode():
            d = torch.nn.functional.normalize(torch.from_numpy(np.asarray(features, np.float32)) @ self._projection.T, dim=1)
        return d.numpy()

    def decode(self, path: str | Path) -> torch.Tensor:
        """One image file -> backbone input ``[3, H, W]``; raises :class:`ImageError`."""
        return self.backbone.transform(load_for_backbone(path, backbone=self.backbone))

    def features(self, batch: torch.Tensor) -> np.ndarray:
        """Backbone inputs ``[B, 3, H, W]`` -> pooled L2-normalised features ``[B, F]`` float32."""
        return embed_images(batch, backbone=self.backbone)

    def embed_files(self, paths: Sequence[str | Path]) -> tuple[np.ndarray, list[ImageError | None], float, float]:
        """Decode and embed image files, timing the two stages.

        Returns:
            features ``[B_ok, F]`` of the decodable files, in order; per path its ImageError or
            None; decode seconds; backbone seconds.
        """
        t0 = time.perf_counter()
        tensors, errors = [], []
        for p in paths:
            try:
                tensors.append(self.decode(p))
                errors.append(None)
            except ImageError as err:
                errors.append(err)
        t1 = time.perf_counter()
        feats = self.features(torch.stack(tensors)) if tensors else np.zeros((0, self.backbone.feature_dim), np.float32)
        return feats, errors, t1 - t0, time.perf_counter() - t1

    # -- queries --------------------------------------------------------------------------------
    def localize(self, images: Sequence[str | Path], **options) -> list[Prediction | ImageError]:
        """Localise image files; a bad image yields its :class:`ImageError` in its place.

        ``options``: mode, top_cells, neighbours, top_matches (defaults from the config).
        """
        opts = QueryOptions.from_config(self.config, **options)
        feats, out, t_decode, t_backbone = self.embed_files(images)
        ok = [i for i, o in enumerate(out) if o is None]
        if not ok:
            return out
        preds = self.localize_features(feats, images=[str(images[i]) for i in ok], options=opts)
        n = len(ok)
        for i, pred in zip(ok, preds):
            pred.timings_ms = {"decode": 1e3 * t_decode / len(images), "backbone": 1e3 * t_backbone / n, **pred.timings_ms}
            pred.timings_ms["total"] = sum(v for k, v in pred.timings_ms.items() if k != "total")
            out[i] = pred
        return out

    def localize_features(self, features: np.ndarray, *, images: Sequence[str] | None = None,
                          options: QueryOptions | None = None, **kw) -> list[Prediction]:
        """Localise pooled backbone features ``[B, F]`` (e.g. from a cache)."""
        opts = options or QueryOptions.from_config(self.config, **kw)
        t0 = time.perf_counter()
        desc = self.project(features)
        t_proj = time.perf_counter() - t0
        preds = self.localize_descriptors(desc, images=images, options=opts)
        for p in preds:
            p.timings_ms["heads"] += 1e3 * t_proj / len(preds)
        return preds

    def localize_descriptors(self, desc: np.ndarray, *, images: Sequence[str] | None = None,
                             options: QueryOptions | None = None, **kw) -> list[Prediction]:
        """Localise descriptors ``[B, D]`` (L2-normalised) in one mode; one Prediction per row."""
        opts = options or QueryOptions.from_config(self.config, **kw)
        res = self.bundle.index.search(desc, mode=opts.mode, top_cells=opts.top_cells, k=opts.top_matches,
                                       neighbours=opts.neighbours)
        b = len(desc)
        timings = {"heads": res.timings_ms.get("cells", 0.0) / b, "search": res.timings_ms.get("search", 0.0) / b}
        names = list(images) if images is not None else [f"#{i}" for i in range(b)]
        return [self._prediction(names[i], opts.mode, res, i, dict(timings)) for i in range(b)]

    def _prediction(self, image: str, mode: str, res, i: int, timings: dict[str, float]) -> Prediction:
        table, rec = self.bundle.table, self.bundle.records
        cells = [int(c) for c in res.cell_ids[i] if c >= 0]
        if mode == "classify":
            c = cells[0]
            lat, lon, east, north = table.lat[c], table.lon[c], table.east[c], table.north[c]
            zone, south, score, match = table.zone[c], table.south[c], res.cell_scores[i, 0], None
            candidates = [(float(table.lat[j]), float(table.lon[j])) for j in cells]
        else:
            ids = [int(j) for j in res.ids[i] if j >= 0]
            if not ids:  # hybrid over cells with no images cannot happen (every kept cell has one)
                raise RuntimeError("search returned no database match")
            j = ids[0]
            c = int(self.bundle.filed[j])
            lat, lon, east, north = rec.lat[j], rec.lon[j], rec.east[j], rec.north[j]
            zone, south, score, match = rec.zone[j], rec.south[j], res.scores[i, 0], self.match_path(j)
            candidates = [(float(rec.lat[k]), float(rec.lon[k])) for k in ids]
        return Prediction(image=image, mode=mode, lat=float(lat), lon=float(lon), east=float(east), north=float(north),
                          zone=int(zone), hemisphere="S" if south else "N", cell=c,
                          cell_pq=(int(table.p[c]), int(table.q[c])), score=float(score), match=match,
                          top_cells=cells, candidates=candidates, timings_ms=timings)

    def match_path(self, row: int) -> str:
        return str(self.bundle.records.abspath(row))
