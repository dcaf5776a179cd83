"""The localiser: a loaded bundle plus its encoder, answering in classify, retrieve or hybrid mode.

Query path (docs/architecture.md, "Query path"); the stages are the fields of
:class:`geoloc.timings.StageTimes` and the keys of ``Prediction.timings_ms``::

    decode    image file -> backbone input tensor          geoloc.encoder.Encoder.decode
    backbone  tensor -> pooled feature [F]                 geoloc.encoder.Encoder.features
    heads     projection -> descriptor [D]; cell scores    geoloc.encoder.Encoder.descriptors,
              -> top-k cells                               geoloc.index.CellIndex.search
    search    database search (all of it for retrieve, the top-k cells' lists for hybrid)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from geoloc.backbones import Backbone, create_backbone
from geoloc.bundle import Bundle, check_backbone, read_bundle
from geoloc.config import MODES, Config
from geoloc.encoder import EXTERNAL, DescriptorLayout, Encoder, second_backbone_config
from geoloc.errors import BundleError, ConfigError, ImageError
from geoloc.timings import StageTimes

__all__ = ["MODES", "Localizer", "Prediction", "QueryOptions"]


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
    candidate_ids: list[int] = field(default_factory=list)
    """The top answers' ids: cell ids (classify) or database row ids (retrieve, hybrid)."""
    candidate_scores: list[float] = field(default_factory=list)
    """The top answers' scores (cosine to the cell, or to the database image)."""
    scanned: int = 0
    """Database vectors compared for this answer (0 for classify, N for retrieve)."""
    times: StageTimes = field(default_factory=StageTimes)

    @property
    def timings_ms(self) -> dict[str, float]:
        """Milliseconds per stage and their total (:meth:`StageTimes.to_dict`)."""
        return self.times.to_dict()

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("times")
        out["timings_ms"] = self.timings_ms
        return out


@dataclass
class QueryOptions:
    mode: str = "hybrid"
    top_cells: int = 5
    neighbours: bool = False
    top_matches: int = 10
    fusion_weight: float = 0.0
    """Hybrid: rank candidates by cosine + fusion_weight x their cell's score."""

    @classmethod
    def from_config(cls, config: Config, **overrides) -> "QueryOptions":
        q = config.query
        opts = cls(q.mode, q.top_cells, q.neighbours, q.top_matches, q.fusion_weight)
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

    def __init__(self, bundle: Bundle, backbone: Backbone | None, second_backbone: Backbone | None = None) -> None:
        """``backbone`` None only for a bundle built from descriptors computed elsewhere;
        ``second_backbone``: the retrieval backbone of a bundle built with ``index.descriptor: second``."""
        if backbone is not None:
            check_backbone(bundle.manifest, backbone.describe(), where=bundle.path)
        elif bundle.manifest["backbone"]["name"] != EXTERNAL:
            raise BundleError(f"{bundle.path}: a Localizer needs the bundle's backbone")
        self.layout = DescriptorLayout.from_manifest(bundle.manifest, where=bundle.path)
        if self.layout.kind == "second":
            if second_backbone is None:
                raise BundleError(f"{bundle.path}: retrieves with a second backbone's descriptor; a Localizer needs it")
            check_backbone({"backbone": bundle.manifest["stats"]["descriptor"].get("second_backbone", {})},
                           second_backbone.describe(), where=bundle.path)
        else:
            second_backbone = None
        self.bundle = bundle
        self.config = bundle.config
        self.encoder = Encoder(backbone, bundle.projection, layout=self.layout, second=second_backbone)

    @property
    def backbone(self) -> Backbone | None:
        return self.encoder.backbone

    @classmethod
    def load(cls, path: str | Path, *, config: Config | None = None, backbone: Backbone | None = None,
             device: str | None = None) -> "Localizer":
        """Load ``path`` (checksums and format verified), creating its backbone unless one is given.

        ``config`` replaces the bundle's stored config for this process (pass the bundle's own,
        ``read_bundle(path).config``, with query-time overrides applied: the CLI does so via
        :func:`geoloc.config.collect_overrides`); a ``backbone`` (or a ``config.backbone``)
        other than the bundle's is refused, saying what differs.
        """
        bundle = read_bundle(Path(path), config=config)
        if backbone is None and bundle.manifest["backbone"]["name"] != EXTERNAL:
            backbone = create_backbone(bundle.config.backbone, device=device)
            if bundle.backbone_state is not None:
                backbone.load_tuned(bundle.backbone_state)
        second = None
        if DescriptorLayout.from_manifest(bundle.manifest, where=path).kind == "second":
            stored = Config.from_dict(bundle.manifest["config"], source=str(path))  # the build's, not a query-time override
            second = create_backbone(second_backbone_config(bundle.config.backbone, stored.index), device=device)
        return cls(bundle, backbone, second)

    # -- queries --------------------------------------------------------------------------------
    def localize(self, images: Sequence[str | Path], *, batch_size: int | None = None,
                 **options) -> list[Prediction | ImageError]:
        """Localise image files; a bad image yields its :class:`ImageError` in its place.

        ``options``: mode, top_cells, neighbours, top_matches (defaults from the config). Images
        are embedded ``batch_size`` at a time (default ``backbone.batch_size`` of the config).
        """
        return list(self.iter_localize(images, batch_size=batch_size, **options))

    def iter_localize(self, images: Sequence[str | Path], *, batch_size: int | None = None,
                      **options) -> Iterator[Prediction | ImageError]:
        """:meth:`localize` as a stream: one answer per image, in order, batch by batch (memory
        bounded by the batch, whatever the number of images)."""
        opts = QueryOptions.from_config(self.config, **options)
        if self.backbone is None:
            raise BundleError(f"{self.bundle.path}: this bundle was built from descriptors computed elsewhere, so it "
                              "cannot read images; pass query descriptors (geoloc eval --query-descriptors FILE)")
        bs = max(1, int(batch_size or self.config.backbone.batch_size))
        for start in range(0, len(images), bs):
            paths = list(images[start : start + bs])
            enc = self.encoder.encode_files(paths)
            ok = [i for i, e in enumerate(enc.errors) if e is None]
            out: list[Prediction | ImageError] = list(enc.errors)  # type: ignore[arg-type]
            if ok:
                share = StageTimes(decode=enc.times.decode / len(paths), backbone=enc.times.backbone / len(ok))
                preds = self.localize_features(enc.features, images=[str(paths[i]) for i in ok], options=opts)
                for i, pred in zip(ok, preds):
                    pred.times = share + pred.times
                    out[i] = pred
            yield from out

    def localize_features(self, features: np.ndarray, *, images: Sequence[str] | None = None,
                          options: QueryOptions | None = None, **kw) -> list[Prediction]:
        """Localise pooled backbone features ``[B, F]`` (e.g. from a cache)."""
        opts = options or QueryOptions.from_config(self.config, **kw)
        t0 = time.perf_counter()
        desc = self.encoder.descriptors(features)
        proj = StageTimes(heads=1e3 * (time.perf_counter() - t0) / max(len(desc), 1))
        preds = self.localize_descriptors(desc, images=images, options=opts)
        for p in preds:
            p.times = p.times + proj
        return preds

    def localize_descriptors(self, desc: np.ndarray, *, images: Sequence[str] | None = None,
                             options: QueryOptions | None = None, **kw) -> list[Prediction]:
        """Localise descriptors ``[B, D]`` (L2-normalised) in one mode; one Prediction per row."""
        opts = options or QueryOptions.from_config(self.config, **kw)
        res = self.bundle.index.search(desc, mode=opts.mode, top_cells=opts.top_cells, k=opts.top_matches,
                                       neighbours=opts.neighbours, fusion_weight=opts.fusion_weight)
        if self.layout.split:  # index scores of [u, v] / sqrt(2) queries -> cosines (geoloc.encoder.DescriptorLayout)
            res.cell_scores = res.cell_scores * np.float32(self.layout.score_scale)
            res.scores = res.scores * np.float32(self.layout.score_scale)
        b = len(desc)
        times = StageTimes(heads=res.times.cells_ms, search=res.times.search_ms).scaled(1 / max(b, 1))
        names = list(images) if images is not None else [f"#{i}" for i in range(b)]
        return [self._prediction(names[i], opts.mode, res, i, times) for i in range(b)]

    def _prediction(self, image: str, mode: str, res, i: int, times: StageTimes) -> Prediction:
        table, rec = self.bundle.table, self.bundle.records
        cells = [int(c) for c in res.cell_ids[i] if c >= 0]
        if mode == "classify":
            c = cells[0]
            lat, lon, east, north = table.lat[c], table.lon[c], table.east[c], table.north[c]
            zone, south, score, match = table.zone[c], table.south[c], res.cell_scores[i, 0], None
            candidates = [(float(table.lat[j]), float(table.lon[j])) for j in cells]
            ids, scores = cells, [float(x) for x in res.cell_scores[i, : len(cells)]]
        else:
            ids = [int(j) for j in res.ids[i] if j >= 0]
            if not ids:  # hybrid over cells with no images cannot happen (every kept cell has one)
                raise BundleError(f"{self.bundle.path}: the search returned no database match; the bundle is damaged, rebuild it")
            j = ids[0]
            c = int(self.bundle.filed[j])
            lat, lon, east, north = rec.lat[j], rec.lon[j], rec.east[j], rec.north[j]
            zone, south, score, match = rec.zone[j], rec.south[j], res.scores[i, 0], self.match_path(j)
            candidates = [(float(rec.lat[k]), float(rec.lon[k])) for k in ids]
            scores = [float(x) for x in res.scores[i, : len(ids)]]
        if not (np.isfinite(lat) and np.isfinite(lon) and np.isfinite(score)):
            raise BundleError(f"{self.bundle.path}: the answer for {image} is not a number (lat {lat}, lon {lon}, "
                              f"score {score}); the bundle is damaged, rebuild it")
        return Prediction(image=image, mode=mode, lat=float(lat), lon=float(lon), east=float(east), north=float(north),
                          zone=int(zone), hemisphere="S" if south else "N", cell=c,
                          cell_pq=(int(table.p[c]), int(table.q[c])), score=float(score), match=match,
                          top_cells=cells, candidates=candidates, candidate_ids=ids,
                          candidate_scores=scores, scanned=int(res.scanned[i]), times=times)

    def match_path(self, row: int) -> str:
        return str(self.bundle.records.abspath(row))
