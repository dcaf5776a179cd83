"""Batched, resumable descriptor extraction.

``extract_features(paths, backbone=...)`` decodes images in DataLoader workers, runs the backbone
in batches and returns L2-normalised float32 features, skipping (and reporting) images that
cannot be decoded -- they never become zero rows.

With ``cache_dir`` the work is split into chunks of ``chunk_size`` images; each finished chunk
is written atomically (:func:`geoloc.fileio.atomic_write_bytes`: a temporary file, then ``os.replace``), next to a
``cache.json`` naming the cache key: sha256 over the backbone (fingerprint, input size,
preprocessing), the loader settings, the chunk size and the list of paths. A run killed at any
moment leaves only whole chunk files; the next run with the same key loads them and extracts
only the rest. A cache with another key is cleared, never mixed. Every chunk also carries the
key in its metadata and is checked on load. No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from geoloc import images as _images
from geoloc.fileio import atomic_write_bytes
from geoloc.backbones import Backbone
from geoloc.errors import GeolocError, ImageError

__all__ = ["Extraction", "extract_features", "embed_images", "load_for_backbone", "CACHE_FORMAT"]

CACHE_FORMAT = 1
DEFAULT_CHUNK_SIZE = 1024
def _short_side(backbone: Backbone) -> int:
    """The short side timm's eval transform resizes to (``input_size / crop_pct``): JPEGs are
    decoded at the largest libjpeg reduction that keeps at least that many pixels."""
    return int(math.ceil(backbone.input_size / backbone.crop_pct))


@dataclass
class Extraction:
    """Result of :func:`extract_features` over N paths."""

    features: np.ndarray
    """``[N_ok, F]`` float32, L2-normalised, rows in path order (skipped images left out)."""
    ok: np.ndarray
    """``[N]`` bool: image i decoded and has a row in ``features`` (``features[ok.cumsum()[i]-1]``)."""
    errors: list[tuple[str, str]]
    """``(path, reason)`` for each skipped image, in path order."""
    seconds: float
    reused_chunks: int = 0
    """Chunks loaded from the cache instead of extracted."""
    extracted_chunks: int = 0
    """Chunks computed in this run."""

    def row_of(self) -> np.ndarray:
        """``[N]`` int64: the row of ``features`` for image i, or -1 where ``ok[i]`` is False."""
        rows = np.cumsum(self.ok) - 1
        return np.where(self.ok, rows, -1).astype(np.int64)


# -- loading ----------------------------------------------------------------------------------------
def load_for_backbone(path: str | Path, *, backbone: Backbone) -> Image.Image:
    """Decode ``path`` exactly as extraction does (RGB, EXIF-rotated, JPEGs at reduced scale).

    Use it for query images so they are preprocessed like the database. Raises ImageError.
    """
    return _images.load_image(path, short_side=_short_side(backbone))


class _ImageDataset(Dataset):
    """Item i -> ``(i, x [3,S,S] float32 | None, reason)``; failures are flagged, never zero-filled."""

    def __init__(self, paths: Sequence[str], transform: Callable[[Image.Image], torch.Tensor], short_side: int) -> None:
        self.paths = paths
        self.transform = transform
        self.short_side = short_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        path = self.paths[i]
        try:
            img = _images.load_image(path, short_side=self.short_side)
            x = self.transform(img)
        except ImageError as err:
            return i, None, err.problem
        except Exception as err:  # noqa: BLE001 - a bad image must not stop the run
            return i, None, f"cannot preprocess image ({type(err).__name__}: {err})"
        if not torch.isfinite(x).all():
            return i, None, "image preprocessing produced non-finite values"
        return i, x, ""


def _collate(items: list[tuple[int, torch.Tensor | None, str]]) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, str]]]:
    """-> ``(idx_ok [b] int64, x [b,3,S,S] | None when b = 0, [(idx, reason), ...])``."""
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, r) for i, x, r in items if x is None]
    idx = torch.tensor([i for i, _ in good], dtype=torch.int64)
    x = torch.stack([x for _, x in good]) if good else None
    return idx, x, bad


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def image_batches(paths: Sequence[str | Path], *, backbone: Backbone, batches: Sequence[Sequence[int]],
                  num_workers: int = 2) -> DataLoader:
    """A DataLoader decoding ``paths`` for ``backbone`` in the given batches of indices.

    Yields ``(idx [b] int64, x [b,3,S,S] | None, [(index, reason), ...])``: undecodable images
    are reported by index and reason, never zero-filled.
    """
    return DataLoader(
        _ImageDataset([str(p) for p in paths], backbone.transform_fn, _short_side(backbone)),
        batch_sampler=[list(b) for b in batches],
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=backbone.device.startswith("cuda"),
        worker_init_fn=_worker_init if num_workers > 0 else None,
        prefetch_factor=4 if num_workers > 0 else None,
    )


# -- inference --------------------------------------------------------------------------------------
def _autocast(device: str) -> contextlib.AbstractContextManager[Any]:
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def _forward(backbone: Backbone, x: torch.Tensor) -> np.ndarray:
    """``x [B,3,S,S]`` -> ``[B,F]`` float32 numpy, L2-normalised."""
    x = x.to(backbone.device, non_blocking=True)
    if backbone.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), _autocast(backbone.device):
        feats = backbone.model(x)
    feats = F.normalize(feats.float(), dim=-1)
    return feats.cpu().numpy().astype(np.float32, copy=False)


def embed_images(images: Sequence[Image.Image] | torch.Tensor, *, backbone: Backbone) -> np.ndarray:
    """Query-time embedding without a DataLoader.

    Args:
        images: B RGB PIL images (any sizes; transformed here), or an already transformed
            tensor ``[B,3,S,S]`` / ``[3,S,S]``.
    Returns:
        ``[B, F]`` float32, L2-normalised.
    """
    if isinstance(images, torch.Tensor):
        x = images.unsqueeze(0) if images.dim() == 3 else images
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images [B,3,H,W], got {tuple(images.shape)}")
    else:
        if len(images) == 0:
            return np.zeros((0, backbone.feature_dim), dtype=np.float32)
        x = torch.stack([backbone.transform(im.convert("RGB") if im.mode != "RGB" else im) for im in images])
    return _forward(backbone, x.float())


# -- cache ------------------------------------------------------------------------------------------
def _cache_key(paths: Sequence[str], backbone: Backbone, chunk_size: int, short_side: int) -> str:
    h = hashlib.sha256()
    head = {
        "format": CACHE_FORMAT,
        "backbone": backbone.describe(),
        "chunk_size": chunk_size,
        "short_side": short_side,
        "n": len(paths),
    }
    head["backbone"].pop("weights_source", None)  # where the weights came from does not matter, their hash does
    h.update(json.dumps(head, sort_keys=True).encode())
    for p in paths:
        h.update(b"\0")
        h.update(p.encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _chunk_name(c: int) -> str:
    return f"chunk_{c:06d}.safetensors"


def _clear_cache(cache_dir: Path) -> None:
    for f in cache_dir.iterdir():
        if f.name.startswith("chunk_") and f.name.endswith(".safetensors") or ".tmp-" in f.name:
            f.unlink(missing_ok=True)


def _open_cache(cache_dir: Path, key: str, n: int, chunk_size: int, feature_dim: int) -> None:
    """Make ``cache_dir`` hold a cache for ``key``: keep it when it matches, clear it otherwise."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    meta_path = cache_dir / "cache.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        same = isinstance(meta, dict) and meta.get("key") == key and meta.get("format") == CACHE_FORMAT
    except (OSError, ValueError):
        same = False
    for f in cache_dir.glob(".*.tmp-*"):  # leftovers of a killed write (geoloc.fileio): never read
        f.unlink(missing_ok=True)
    if same:
        return
    _clear_cache(cache_dir)  # old chunks go before the new key is written: never mixed
    meta = {"format": CACHE_FORMAT, "key": key, "n": n, "chunk_size": chunk_size, "feature_dim": feature_dim}
    atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())


def _save_chunk(cache_dir: Path, c: int, key: str, feats: np.ndarray, ok: np.ndarray, errors: list[tuple[str, str]]) -> None:
    """Write chunk c: ``features [n_ok,F]`` float32 + ``ok [n]`` uint8 + errors (JSON metadata)."""
    from safetensors.numpy import save

    data = save(
        {"features": np.ascontiguousarray(feats, dtype=np.float32), "ok": ok.astype(np.uint8)},
        metadata={"key": key, "chunk": str(c), "errors": json.dumps(errors)},
    )
    atomic_write_bytes(cache_dir / _chunk_name(c), data)


def _load_chunk(cache_dir: Path, c: int, key: str, n: int, feature_dim: int) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]] | None:
    """Chunk c if present, whole and made with ``key`` (else None; a damaged file is removed)."""
    from safetensors import safe_open

    path = cache_dir / _chunk_name(c)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            feats = f.get_tensor("features")
            ok = f.get_tensor("ok").astype(bool)
        errors = [(str(p), str(r)) for p, r in json.loads(meta.get("errors", "[]"))]
        valid = (meta.get("key") == key and meta.get("chunk") == str(c) and ok.shape == (n,)
                 and feats.dtype == np.float32 and feats.shape == (int(ok.sum()), feature_dim)
                 and len(errors) == n - int(ok.sum()))
    except Exception:  # noqa: BLE001 - unreadable: recompute
        valid = False
    if not valid:
        path.unlink(missing_ok=True)
        return None
    return feats, ok, errors


# -- extraction -------------------------------------------------------------------------------------
def _batches(start: int, stop: int, batch_size: int) -> Iterator[list[int]]:
    for b in range(start, stop, batch_size):
        yield list(range(b, min(b + batch_size, stop)))


def extract_features(
    paths: Sequence[str | Path],
    *,
    backbone: Backbone,
    batch_size: int = 32,
    num_workers: int = 2,
    cache_dir: Path | str | None = None,
    progress: bool = True,
    desc: str = "extract",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Extraction:
    """Descriptors of N images with ``backbone``.

    Args:
        paths: N image files. Order is kept; undecodable images are skipped and reported.
        batch_size: images per forward pass (batches never straddle chunks).
        num_workers: DataLoader decode workers (0 = decode in this process).
        cache_dir: folder of a resumable chunk cache (created if needed), or None for no cache.
        chunk_size: images per cache chunk; part of the cache key.
    Returns:
        :class:`Extraction` with ``features [N_ok, F]`` float32 L2-normalised, ``ok [N]`` bool,
        ``errors`` and the count of reused/extracted chunks.
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or chunk_size < 1 or num_workers < 0:
        raise GeolocError(f"batch_size and chunk_size must be >= 1 and num_workers >= 0 "
                          f"(got {batch_size}, {chunk_size}, {num_workers})")
    t0 = time.perf_counter()
    spaths = [str(p) for p in paths]
    n, fdim = len(spaths), backbone.feature_dim
    n_chunks = (n + chunk_size - 1) // chunk_size
    short_side = _short_side(backbone)
    chunk_len = [min(chunk_size, n - c * chunk_size) for c in range(n_chunks)]

    feats_c: list[np.ndarray | None] = [None] * n_chunks
    ok_c: list[np.ndarray | None] = [None] * n_chunks
    err_c: list[list[tuple[str, str]]] = [[] for _ in range(n_chunks)]
    key = ""
    cdir = Path(cache_dir) if cache_dir is not None else None
    reused = 0
    if cdir is not None and n:
        # absolute paths: the same images named relatively or absolutely share one cache
        key = _cache_key([os.path.abspath(p) for p in spaths], backbone, chunk_size, short_side)
        _open_cache(cdir, key, n, chunk_size, fdim)
        for c in range(n_chunks):
            got = _load_chunk(cdir, c, key, chunk_len[c], fdim)
            if got is not None:
                feats_c[c], ok_c[c], err_c[c] = got
                reused += 1

    todo = [c for c in range(n_chunks) if feats_c[c] is None]
    batch_list = [b for c in todo for b in _batches(c * chunk_size, c * chunk_size + chunk_len[c], batch_size)]
    if batch_list:
        loader = image_batches(spaths, backbone=backbone, batches=batch_list, num_workers=num_workers)
        # Per chunk in progress: rows by local index, errors, count of images seen.
        rows: dict[int, dict[int, np.ndarray]] = {c: {} for c in todo}
        bad: dict[int, list[tuple[int, str]]] = {c: [] for c in todo}
        seen = {c: 0 for c in todo}
        bar = tqdm(total=sum(chunk_len[c] for c in todo), desc=desc, unit="img", disable=not progress,
                   dynamic_ncols=True)
        try:
            for idx, x, failed in loader:
                size = len(idx) + len(failed)
                first = int(idx[0]) if len(idx) else failed[0][0]
                c = first // chunk_size
                if x is not None:
                    f = _forward(backbone, x)
                    for j, i in enumerate(idx.tolist()):
                        rows[c][i - c * chunk_size] = f[j]
                bad[c].extend(failed)
                seen[c] += size
                bar.update(size)
                if seen[c] == chunk_len[c]:
                    ok = np.zeros(chunk_len[c], dtype=bool)
                    ok[list(rows[c])] = True
                    order = sorted(rows[c])
                    feats = np.stack([rows[c][k] for k in order]).astype(np.float32) if order \
                        else np.zeros((0, fdim), dtype=np.float32)
                    errs = [(spaths[i], r) for i, r in sorted(bad[c])]
                    if cdir is not None:
                        _save_chunk(cdir, c, key, feats, ok, errs)
                    feats_c[c], ok_c[c], err_c[c] = feats, ok, errs
                    del rows[c], bad[c]
        finally:
            bar.close()

    features = np.concatenate([f for f in feats_c if f is not None], axis=0) if n_chunks else np.zeros((0, fdim), np.float32)
    ok_all = np.concatenate([o for o in ok_c if o is not None]) if n_chunks else np.zeros(0, dtype=bool)
    errors = [e for errs in err_c for e in errs]
    return Extraction(
        features=np.ascontiguousarray(features, dtype=np.float32),
        ok=ok_all,
        errors=errors,
        seconds=time.perf_counter() - t0,
        reused_chunks=reused,
        extracted_chunks=len(todo),
    )
