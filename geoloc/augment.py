"""Augmented views of database images, for training the classifier with a frozen backbone.

With a frozen backbone, augmenting means extracting the features of a few augmented copies of
every database image once (cached and resumable like the plain feature cache, one cache per
view) and adding them to the classifier's training pool with their image's label
(:func:`geoloc.train.train_classifier`, ``augmented=``).

One view of an image is a seeded random draw of (in this order):

* geometric: random resized crop keeping 66-100 % of the area, aspect 3/4-4/3, resized back;
* photometric: brightness, contrast and colour saturation each x U(0.6, 1.4);
  haze (blend towards a light grey, 10-40 %, p = 0.3); Gaussian blur (radius 0.5-1.5 px,
  p = 0.3); Gaussian noise (sigma 3-10 levels, p = 0.3); JPEG re-encoding (quality 25-80, p = 0.5).

The draw depends only on ``(seed, view, image content)`` -- not on the order, the worker or
the batch -- so a view is reproducible and its cache is valid across runs. The augmentation
version, view and seed are part of the backbone name the feature cache is keyed by.
"""

from __future__ import annotations

import dataclasses
import io
import zlib
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from geoloc.backbones import Backbone

AUGMENT_VERSION = 1
"""Bumped whenever :func:`augment_image` changes, so old cached views are not reused."""


def augment_image(img: Image.Image, *, view: int, seed: int = 0) -> Image.Image:
    """One augmented view of ``img`` (RGB PIL, any size) -> RGB PIL of the same size."""
    img = img.convert("RGB")
    small = np.asarray(img.resize((32, 32), Image.BILINEAR))
    rng = np.random.default_rng([int(seed), int(view), zlib.crc32(small.tobytes())])
    w, h = img.size
    area = rng.uniform(0.66, 1.0) * w * h
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw = max(1, int(round(min(w, np.sqrt(area * aspect)))))
    ch = max(1, int(round(min(h, np.sqrt(area / aspect)))))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = img.crop((x0, y0, x0 + cw, y0 + ch)).resize((w, h), Image.BILINEAR)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.6, 1.4))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.6, 1.4))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.6, 1.4))
    if rng.random() < 0.3:
        grey = tuple(int(v) for v in rng.uniform(180, 240, 3))
        img = Image.blend(img, Image.new("RGB", img.size, grey), rng.uniform(0.1, 0.4))
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    if rng.random() < 0.3:
        arr = np.asarray(img, np.float32) + rng.normal(0.0, rng.uniform(3, 10), (h, w, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(25, 80)))
        buf.seek(0)
        img = Image.open(buf).convert("RGB")
    return img


class AugmentedTransform:
    """Picklable (DataLoader workers): PIL image -> :func:`augment_image` -> the backbone's transform."""

    def __init__(self, base: Callable[[Image.Image], torch.Tensor], *, view: int, seed: int = 0) -> None:
        self.base, self.view, self.seed = base, int(view), int(seed)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.base(augment_image(img, view=self.view, seed=self.seed))


def augmented_backbone(backbone: Backbone, *, view: int, seed: int = 0) -> Backbone:
    """The same model with a transform that augments first; its name (hence the feature-cache
    key) carries the augmentation version, view and seed."""
    transform = AugmentedTransform(backbone.transform_fn, view=view, seed=seed)
    return dataclasses.replace(backbone, name=f"{backbone.name}+aug{AUGMENT_VERSION}-v{view}-s{seed}",
                               _transform=transform)


def extract_augmented_views(paths: Sequence[str | Path], *, backbone: Backbone, views: int, work: Path, seed: int = 0,
                            batch_size: int = 32, num_workers: int = 2, chunk_size: int = 1024,
                            progress: bool = True) -> list[np.ndarray]:
    """Features of ``views`` augmented views of N images, each cached under ``work/augment-v{view}``.

    Args:
        paths: the N images (pass only images whose plain extraction succeeded, so rows align).
    Returns:
        ``views`` arrays ``[N, F]`` float32, L2-normalised; row i is a view of image i.
    Raises:
        GeolocError: an image that decoded before fails to decode now (the rows would not align).
    """
    from geoloc.errors import GeolocError
    from geoloc.extract import extract_features

    out = []
    for v in range(views):
        ext = extract_features(paths, backbone=augmented_backbone(backbone, view=v, seed=seed), batch_size=batch_size,
                               num_workers=num_workers, cache_dir=Path(work) / f"augment-v{v}", progress=progress,
                               desc=f"augment {v + 1}/{views}", chunk_size=chunk_size)
        if not ext.ok.all():
            raise GeolocError(f"augmented view {v}: {ext.errors[0][0]} could not be decoded ({ext.errors[0][1]}); "
                              "remove the image from the dataset and build again")
        out.append(ext.features)
    return out
