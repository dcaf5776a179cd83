"""The query encoder: image file -> backbone input -> pooled feature -> projected descriptor.

One implementation of each step, used everywhere a descriptor is made: the build's batched
extraction (:mod:`geoloc.extract` runs :func:`decode` in DataLoader workers and :func:`pooled`
on the batches), fine-tuning (:func:`pooled` with gradients), the localiser and evaluation
(:class:`Encoder`). So a database image and the same image sent as a query are decoded,
resized, normalised, pooled and projected by the same code (docs/architecture.md, "Query path").

Steps and shapes::

    decode(path)           file -> [3, S, S] float32 backbone input (S = backbone.input_size)
    pooled(backbone, x)    [B, 3, S, S] -> [B, F] float32, L2-normalised pooled features
    project(f, W)          [B, F] x [D, F] -> [B, D] float32, L2-normalised descriptors

**Retrieval descriptor** (``index.descriptor``, :class:`DescriptorLayout`). By default the index
stores the classifier's projected descriptor and one vector serves both the cell scoring and the
retrieval. With ``pooled`` (the backbone's pooled feature) or ``second`` (a second backbone's
pooled feature, ``index.second_backbone``) the index vectors live in the concatenated space
``[D | R]``: prototypes ``[p, 0]``, database rows ``[0, r]``, queries ``[u, v] / sqrt(2)``
(``u`` the projected descriptor, ``v`` the retrieval descriptor, both L2-normalised). So the
unchanged cell-partitioned index scores cells by the classifier (``u . p / sqrt(2)``), retrieves
by the chosen descriptor (``v . r / sqrt(2)``) and fuses them with the same weight; the engine
multiplies the scores back by ``sqrt(2)``. The bundle's projection is ``[D + R, F]`` (the
classifier's rows, then the identity for ``pooled`` or zeros for ``second``).
"""

from __future__ import annotations

import contextlib
import math
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from geoloc import images as _images
from geoloc.backbones import Backbone
from geoloc.errors import BundleError, ConfigError, ImageError
from geoloc.timings import StageTimes

EXTERNAL = "external"
"""Backbone name recorded by bundles built from descriptors computed elsewhere (no backbone)."""

__all__ = ["DESCRIPTORS", "EXTERNAL", "DescriptorLayout", "Encoded", "Encoder", "decode", "decode_with", "load_image_for",
           "pooled", "project", "second_backbone_config", "short_side"]

DESCRIPTORS = ("projected", "pooled", "second")
"""What a bundle's index holds for retrieval (``index.descriptor``)."""


def short_side(backbone: Backbone) -> int:
    """The short side timm's eval transform resizes to (``input_size / crop_pct``): JPEGs are
    decoded at the largest libjpeg reduction that keeps at least that many pixels."""
    return int(math.ceil(backbone.input_size / backbone.crop_pct))


def load_image_for(path: str | Path, *, backbone: Backbone) -> Image.Image:
    """Decode ``path`` to RGB as every geoloc path does (EXIF-rotated, JPEGs at reduced scale).

    Raises:
        ImageError: the file is missing, not an image, truncated, too large...
    """
    return _images.load_image(path, short_side=short_side(backbone))


def decode(path: str | Path, *, backbone: Backbone) -> torch.Tensor:
    """One image file -> backbone input ``[3, S, S]`` float32, normalised.

    Raises:
        ImageError: undecodable file, or preprocessing that fails or gives non-finite values.
    """
    return decode_with(path, transform=backbone.transform_fn, side=short_side(backbone))


def decode_with(path: str | Path, *, transform: Callable[[Image.Image], torch.Tensor], side: int) -> torch.Tensor:
    """:func:`decode` given the backbone's transform and :func:`short_side` (no model: for DataLoader workers)."""
    img = _images.load_image(path, short_side=side)
    try:
        x = transform(img)
    except Exception as err:  # noqa: BLE001 - a bad image must not stop a batch
        raise ImageError(path, f"cannot preprocess image ({type(err).__name__}: {err})") from None
    if not torch.isfinite(x).all():
        raise ImageError(path, "image preprocessing produced non-finite values")
    return x


def _autocast(device: str) -> contextlib.AbstractContextManager[Any]:
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def pooled(backbone: Backbone, x: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
    """Backbone inputs ``[B, 3, S, S]`` -> pooled features ``[B, F]`` float32 on the CPU, L2-normalised.

    ``grad=False`` (extraction, queries): inference mode, fp16 autocast on CUDA.
    ``grad=True`` (fine-tuning): gradients flow into the unfrozen blocks, full precision.
    """
    x = x.to(backbone.device, non_blocking=True).float()
    if backbone.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if grad:
        return F.normalize(backbone.model(x).float().cpu(), dim=-1)
    with torch.inference_mode(), _autocast(backbone.device):
        feats = backbone.model(x)
    return F.normalize(feats.float(), dim=-1).cpu()


def project(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The projection, the one implementation: ``[B, F]`` features, ``[D, F]`` weight -> ``[B, D]`` L2-normalised."""
    return F.normalize(features @ weight.T, dim=-1)


def second_backbone_config(backbone: Any, index: Any) -> Any:
    """The backbone section for ``index.descriptor: second``: ``backbone`` (a BackboneConfig) with
    name, weights and image size from ``index.second_backbone``, ``second_weights`` and
    ``second_image_size`` (device, batch size, workers and resize are shared).

    Raises:
        ConfigError: ``index.second_backbone`` is empty.
    """
    name = str(getattr(index, "second_backbone", "") or "").strip()
    if not name:
        raise ConfigError("index.descriptor is 'second' but index.second_backbone is empty; name the second backbone "
                          "(e.g. --set index.second_backbone=timm:resnet50) or choose index.descriptor projected or pooled")
    return dataclasses.replace(backbone, name=name, weights=str(getattr(index, "second_weights", "default")),
                               image_size=int(getattr(index, "second_image_size", 0)))


@dataclass(frozen=True)
class DescriptorLayout:
    """Where the classifier's and the retrieval descriptor sit in the index vectors (module docstring).

    ``projected``: one ``[D]`` vector serves both (``retrieval_dim`` 0). ``pooled`` / ``second``:
    ``[D + R]`` vectors, classifier block first.
    """

    kind: str = "projected"
    classifier_dim: int = 0
    """D, the projected descriptor's dimension."""
    retrieval_dim: int = 0
    """R, the retrieval descriptor's dimension (0 for 'projected')."""

    def __post_init__(self) -> None:
        if self.kind not in DESCRIPTORS:
            raise ValueError(f"descriptor must be one of {', '.join(DESCRIPTORS)}, got {self.kind!r}")
        if self.split and self.retrieval_dim < 1:
            raise ValueError(f"descriptor {self.kind!r} needs a retrieval dimension >= 1")

    @property
    def split(self) -> bool:
        """True when retrieval uses another descriptor than the classifier's."""
        return self.kind != "projected"

    @property
    def dim(self) -> int:
        """Dimension of the index vectors."""
        return self.classifier_dim + (self.retrieval_dim if self.split else 0)

    @property
    def score_scale(self) -> float:
        """Factor that turns index scores back into cosines (sqrt 2 for split layouts, else 1)."""
        return math.sqrt(2.0) if self.split else 1.0

    def queries(self, descriptors: np.ndarray | torch.Tensor, retrieval: np.ndarray | torch.Tensor | None) -> np.ndarray:
        """Query vectors: projected ``[B, D]`` and retrieval ``[B, R]`` descriptors (L2-normalised)
        -> ``[B, D + R]`` float32 ``[u, v] / sqrt(2)`` (``[B, D]`` unchanged for 'projected')."""
        u = np.asarray(descriptors, np.float32)
        if not self.split:
            return np.ascontiguousarray(u)
        v = np.asarray(retrieval, np.float32)
        return np.ascontiguousarray(np.concatenate([u, v], axis=1) * np.float32(1 / math.sqrt(2.0)))

    def database(self, retrieval: np.ndarray) -> np.ndarray:
        """Database rows: retrieval descriptors ``[N, R]`` -> ``[N, D + R]`` float32 ``[0, r]``."""
        r = np.asarray(retrieval, np.float32)
        out = np.zeros((len(r), self.dim), np.float32)
        out[:, self.classifier_dim:] = r
        return out

    def prototypes(self, prototypes: np.ndarray) -> np.ndarray:
        """Cell prototypes ``[P, D]`` -> ``[P, D + R]`` float32 ``[p, 0]`` (unchanged for 'projected')."""
        p = np.asarray(prototypes, np.float32)
        if not self.split:
            return p
        out = np.zeros((len(p), self.dim), np.float32)
        out[:, : self.classifier_dim] = p
        return out

    def projection(self, weight: np.ndarray) -> np.ndarray:
        """The bundle's projection: the classifier's ``[D, F]`` -> ``[D + R, F]`` (identity below it for
        'pooled', which requires R == F; zeros for 'second')."""
        w = np.asarray(weight, np.float32)
        if not self.split:
            return w
        f = w.shape[1]
        low = np.eye(f, dtype=np.float32) if self.kind == "pooled" else np.zeros((self.retrieval_dim, f), np.float32)
        if low.shape[0] != self.retrieval_dim:
            raise ValueError(f"pooled retrieval dim {self.retrieval_dim} differs from the feature dim {f}")
        return np.concatenate([w, low])

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "classifier_dim": int(self.classifier_dim), "retrieval_dim": int(self.retrieval_dim)}

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], *, where: Any = "") -> "DescriptorLayout":
        """The layout a bundle records (``stats.descriptor``); bundles without the record are 'projected'.

        Raises:
            BundleError: a record that does not fit the bundle's descriptor dimension.
        """
        rec = (manifest.get("stats") or {}).get("descriptor")
        d = int(manifest["descriptor_dim"])
        if rec is None:
            return cls("projected", d, 0)
        try:
            layout = cls(str(rec["kind"]), int(rec["classifier_dim"]), int(rec["retrieval_dim"]))
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"{where}: manifest stats.descriptor is unreadable ({err}); rebuild the bundle") from None
        if layout.dim != d:
            raise BundleError(f"{where}: manifest stats.descriptor says {layout.dim} dims but the bundle's descriptors "
                              f"have {d}; rebuild the bundle")
        return layout


@dataclass
class Encoded:
    """A batch of image files run through the encoder."""

    features: np.ndarray
    """``[B_ok, F]`` float32 pooled features of the decodable files, in input order (``[B_ok, F + F2]``:
    the second backbone's follow, for a 'second' descriptor layout)."""
    errors: list[ImageError | None]
    """Per input path: its ImageError, or None when it has a row in ``features``."""
    times: StageTimes
    """Decode and backbone milliseconds for the whole batch."""


class Encoder:
    """A backbone and (optionally) the bundle's projection, as one object.

    Args:
        backbone: the (frozen) backbone, or None for a bundle built from descriptors computed
            elsewhere (it projects given features but cannot read images).
        projection: ``[D, F]`` float32 projection weight (``[D + R, F]`` with a split ``layout``),
            or None for pooled features only.
        layout: where the classifier's and the retrieval descriptor sit (:class:`DescriptorLayout`);
            None: 'projected'.
        second: the second backbone of a ``layout.kind == 'second'`` bundle. Its pooled features
            follow the first backbone's in :attr:`Encoded.features` (``[B, F + F2]``).
    """

    def __init__(self, backbone: Backbone | None, projection: np.ndarray | torch.Tensor | None = None, *,
                 layout: DescriptorLayout | None = None, second: Backbone | None = None) -> None:
        if backbone is None and projection is None:
            raise ValueError("an Encoder needs a backbone or a projection")
        self.backbone = backbone
        self.layout = layout or DescriptorLayout("projected", 0, 0)
        weight = None if projection is None else torch.as_tensor(np.asarray(projection, np.float32)).clone()
        self._retrieval_weight = None
        if self.layout.split:
            if weight is None or weight.shape[0] != self.layout.dim:
                raise ValueError(f"a {self.layout.kind!r} layout needs a [{self.layout.dim}, F] projection")
            d = self.layout.classifier_dim
            weight, self._retrieval_weight = weight[:d].clone(), weight[d:].clone()
        if (self.layout.kind == "second") != (second is not None):
            raise ValueError("a second backbone goes with (and only with) a 'second' descriptor layout")
        self._weight = weight
        self.second = second

    @property
    def feature_dim(self) -> int:
        """Width of the features :meth:`descriptors` takes: F, or F + F2 with a second backbone."""
        f = self.backbone.feature_dim if self.backbone is not None else int(self._weight.shape[1])
        return f + (self.second.feature_dim if self.second is not None else 0)

    @property
    def dim(self) -> int:
        """Descriptor dimension (F when there is no projection; D + R with a split layout)."""
        if self.layout.split:
            return self.layout.dim
        return self.feature_dim if self._weight is None else int(self._weight.shape[0])

    def decode(self, path: str | Path) -> torch.Tensor:
        """One image file -> ``[3, S, S]`` for the (first) backbone; raises :class:`ImageError`."""
        return decode(path, backbone=self.backbone)

    def features(self, x: torch.Tensor) -> np.ndarray:
        """Backbone inputs ``[B, 3, S, S]`` (or one ``[3, S, S]``) -> pooled features ``[B, F]`` float32
        of the first backbone (:meth:`encode_files` adds the second backbone's)."""
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected backbone inputs [B, 3, H, W], got {tuple(x.shape)}")
        return pooled(self.backbone, x).numpy()

    def descriptors(self, features: np.ndarray) -> np.ndarray:
        """Pooled features ``[B, F]`` (``[B, F + F2]`` with a second backbone) -> the index's query
        vectors ``[B, dim]`` float32, L2-normalised (:meth:`DescriptorLayout.queries`)."""
        f = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        if self.second is not None and (f.dim() != 2 or f.shape[1] != self.feature_dim):
            raise ValueError(f"expected [B, {self.feature_dim}] features (this bundle's backbone, then its second "
                             f"backbone's), got {tuple(f.shape)}")
        if self._weight is None:
            return F.normalize(f, dim=-1).numpy()
        with torch.inference_mode():
            if not self.layout.split:
                return project(f, self._weight).numpy()
            first = f[:, : int(self._weight.shape[1])]
            u = project(first, self._weight)
            if self.second is not None:
                v = F.normalize(f[:, first.shape[1]:], dim=-1)
            else:
                v = project(first, self._retrieval_weight)
            return self.layout.queries(u.numpy(), v.numpy())

    def encode_files(self, paths: Sequence[str | Path]) -> Encoded:
        """Decode and embed image files in one batch, timing the two stages; bad files are reported, not raised."""
        t0 = time.perf_counter()
        tensors, tensors2, errors = [], [], []
        for p in paths:
            try:
                x = self.decode(p)
                x2 = decode(p, backbone=self.second) if self.second is not None else None
            except ImageError as err:
                errors.append(err)
                continue
            tensors.append(x)
            tensors2.append(x2)
            errors.append(None)
        t1 = time.perf_counter()
        if tensors:
            feats = self.features(torch.stack(tensors))
            if self.second is not None:
                feats = np.concatenate([feats, pooled(self.second, torch.stack(tensors2)).numpy()], axis=1)
        else:
            feats = np.zeros((0, self.feature_dim), np.float32)
        t2 = time.perf_counter()
        return Encoded(feats, errors, StageTimes(decode=1e3 * (t1 - t0), backbone=1e3 * (t2 - t1)))
