"""Augmented views: deterministic per (seed, view, image), cached under their own key, rows aligned."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from PIL import Image

from geoloc.augment import AugmentedTransform, augment_image, augmented_backbone, extract_augmented_views
from geoloc.backbones import create_backbone
from geoloc.config import BackboneConfig
from geoloc.extract import extract_features


def _image(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_views_are_deterministic_and_differ():
    img = _image(0)
    a, b = augment_image(img, view=0), augment_image(img.copy(), view=0)
    assert a.size == img.size and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(augment_image(img, view=1)))
    assert not np.array_equal(np.asarray(a), np.asarray(augment_image(img, view=0, seed=1)))
    assert not np.array_equal(np.asarray(a), np.asarray(img))


def test_transform_pickles_for_workers():
    t = AugmentedTransform(lambda im: np.asarray(im).mean(), view=2)  # lambda: only the wrapper must be plain
    t2 = pickle.loads(pickle.dumps(AugmentedTransform(np.asarray, view=2, seed=3)))
    assert (t2.view, t2.seed) == (2, 3)
    assert t(_image(1)) == pytest.approx(np.asarray(augment_image(_image(1), view=2)).mean())


def test_augmented_features_cache_apart_and_align(tmp_path):
    tiny = create_backbone(BackboneConfig(name="test_tiny"), device="cpu")
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        _image(i).save(p)
        paths.append(p)
    aug = augmented_backbone(tiny, view=0)
    assert aug.name != tiny.name and aug.fingerprint == tiny.fingerprint
    views = extract_augmented_views(paths, backbone=tiny, views=2, work=tmp_path / "work", num_workers=0,
                                    batch_size=2, chunk_size=2, progress=False)
    plain = extract_features(paths, backbone=tiny, num_workers=0, progress=False).features
    assert len(views) == 2 and all(v.shape == plain.shape for v in views)
    assert not np.allclose(views[0], plain) and not np.allclose(views[0], views[1])
    again = extract_augmented_views(paths, backbone=tiny, views=2, work=tmp_path / "work", num_workers=0,
                                    batch_size=2, chunk_size=2, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(views, again))  # from the cache, same rows
    fresh = extract_features(paths, backbone=augmented_backbone(tiny, view=1), num_workers=0, progress=False).features
    assert np.allclose(fresh, views[1], atol=1e-6)
