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
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from geoloc import images as _images
from geoloc.backbones import Backbone
from geoloc.errors import ImageError
from geoloc.timings import StageTimes

EXTERNAL = "external"
"""Backbone name recorded by bundles built from descriptors computed elsewhere (no backbone)."""

__all__ = ["EXTERNAL", "Encoded", "Encoder", "decode", "decode_with", "load_image_for", "pooled", "project", "short_side"]


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


@dataclass
class Encoded:
    """A batch of image files run through the encoder."""

    features: np.ndarray
    """``[B_ok, F]`` float32 pooled features of the decodable files, in input order."""
    errors: list[ImageError | None]
    """Per input path: its ImageError, or None when it has a row in ``features``."""
    times: StageTimes
    """Decode and backbone milliseconds for the whole batch."""


class Encoder:
    """A backbone and (optionally) the bundle's projection, as one object.

    Args:
        backbone: the (frozen) backbone, or None for a bundle built from descriptors computed
            elsewhere (it projects given features but cannot read images).
        projection: ``[D, F]`` float32 projection weight, or None for pooled features only.
    """

    def __init__(self, backbone: Backbone | None, projection: np.ndarray | torch.Tensor | None = None) -> None:
        if backbone is None and projection is None:
            raise ValueError("an Encoder needs a backbone or a projection")
        self.backbone = backbone
        self._weight = None if projection is None else torch.as_tensor(np.asarray(projection, np.float32)).clone()

    @property
    def feature_dim(self) -> int:
        return self.backbone.feature_dim if self.backbone is not None else int(self._weight.shape[1])

    @property
    def dim(self) -> int:
        """Descriptor dimension D (F when there is no projection)."""
        return self.feature_dim if self._weight is None else int(self._weight.shape[0])

    def decode(self, path: str | Path) -> torch.Tensor:
        """One image file -> ``[3, S, S]``; raises :class:`ImageError`."""
        return decode(path, backbone=self.backbone)

    def features(self, x: torch.Tensor) -> np.ndarray:
        """Backbone inputs ``[B, 3, S, S]`` (or one ``[3, S, S]``) -> pooled features ``[B, F]`` float32."""
        if x.dim() == 3:
            x = x.unsqueeze(0)
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected backbone inputs [B, 3, H, W], got {tuple(x.shape)}")
        return pooled(self.backbone, x).numpy()

    def descriptors(self, features: np.ndarray) -> np.ndarray:
        """Pooled features ``[B, F]`` -> descriptors ``[B, D]`` float32, L2-normalised."""
        f = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        if self._weight is None:
            return F.normalize(f, dim=-1).numpy()
        with torch.inference_mode():
            return project(f, self._weight).numpy()

    def encode_files(self, paths: Sequence[str | Path]) -> Encoded:
        """Decode and embed image files in one batch, timing the two stages; bad files are reported, not raised."""
        t0 = time.perf_counter()
        tensors, errors = [], []
        for p in paths:
            try:
                tensors.append(self.decode(p))
                errors.append(None)
            except ImageError as err:
                errors.append(err)
        t1 = time.perf_counter()
        if tensors:
            feats = self.features(torch.stack(tensors))
        else:
            feats = np.zeros((0, self.feature_dim), np.float32)
        t2 = time.perf_counter()
        return Encoded(feats, errors, StageTimes(decode=1e3 * (t1 - t0), backbone=1e3 * (t2 - t1)))
