"""Batched, resumable descriptor extraction.

``extract_features(paths, backbone=...)`` decodes images in DataLoader workers, runs the backbone
in batches and returns L2-normalised float32 features, skipping (and reporting) images that
cannot be decoded -- they never become zero rows.

With ``cache_dir`` the work is split into chunks of ``chunk_size`` images; each finished chunk
is written atomically (:func:`geoloc.fileio.atomic_write_bytes`: a temporary file, then ``os.replace``), next to a
``cache.json`` naming the cache key: sha256 over the backbone (fingerprint, input size,
preprocessing), the decode size and the chunk size. A cache with another key is cleared, never
mixed. Each chunk carries its own key in its metadata, checked on load: the cache key, the
chunk's absolute paths and each file's identity (size, mtime, ctime, inode), so a chunk whose
images were replaced under the same names is extracted again, never reused. A run killed at
any moment leaves only whole chunk files; the next run loads them and extracts only the rest.
No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from geoloc.fileio import atomic_write_bytes
from geoloc.backbones import Backbone
from geoloc.encoder import decode_with, pooled, short_side
from geoloc.errors import GeolocError, ImageError

__all__ = ["Extraction", "extract_features", "image_batches", "CACHE_FORMAT"]

CACHE_FORMAT = 2
DEFAULT_CHUNK_SIZE = 1024
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


# -- loading --------------------------------------------------------------------------------------
class _ImageDataset(Dataset):
    """Item i -> ``(i, x [3,S,S] float32 | None, reason)``; failures are flagged, never zero-filled."""

    def __init__(self, paths: Sequence[str], transform: Callable[[Image.Image], torch.Tensor], short_side: int) -> None:
        self.paths = paths
        self.transform = transform
        self.short_side = short_side

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        try:
            return i, decode_with(self.paths[i], transform=self.transform, side=self.short_side), ""
        except ImageError as err:
            return i, None, err.problem


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
        _ImageDataset([str(p) for p in paths], backbone.transform_fn, short_side(backbone)),
        batch_sampler=[list(b) for b in batches],
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=backbone.device.startswith("cuda"),
        worker_init_fn=_worker_init if num_workers > 0 else None,
        prefetch_factor=4 if num_workers > 0 else None,
    )


# -- cache ------------------------------------------------------------------------------------------
def _cache_key(backbone: Backbone, chunk_size: int, side: int) -> str:
    """What every chunk of a cache shares: the backbone (weights hash, input size, preprocessing),
    the decode size and the chunk size."""
    head = {"format": CACHE_FORMAT, "backbone": backbone.describe(), "chunk_size": chunk_size, "short_side": side}
    head["backbone"].pop("weights_source", None)  # where the weights came from does not matter, their hash does
    return hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()


def _file_identity(path: str) -> str:
    """What changes when a file's content may have changed: size, mtime, ctime and inode.

    Replacing an image under the same name (copy, move, rewrite, even ``cp -p`` which keeps the
    mtime) changes its ctime or inode, so its chunk is extracted again.
    """
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def _chunk_key(key: str, c: int, paths: Sequence[str]) -> str:
    """Key of chunk ``c``: the cache key, the chunk's absolute paths and each file's identity."""
    h = hashlib.sha256(f"{key}\0{c}".encode())
    for p in paths:
        a = os.path.abspath(p)
        h.update(b"\0" + a.encode("utf-8", "surrogateescape") + b"\0" + _file_identity(a).encode())
    return h.hexdigest()


def _chunk_name(c: int) -> str:
    return f"chunk_{c:06d}.safetensors"


def _clear_cache(cache_dir: Path) -> None:
    for f in cache_dir.iterdir():
        if f.name.startswith("chunk_") and f.name.endswith(".safetensors") or ".tmp-" in f.name:
            f.unlink(missing_ok=True)


def _open_cache(cache_dir: Path, key: str, n: int, chunk_size: int, feature_dim: int) -> None:
    """Make ``cache_dir`` hold a cache for ``key``: keep it when it matches, clear it otherwise.

    A kept cache may still hold chunks made from other files: each chunk is checked against its
    own :func:`_chunk_key` when loaded.
    """
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
    side = short_side(backbone)
    chunk_len = [min(chunk_size, n - c * chunk_size) for c in range(n_chunks)]

    feats_c: list[np.ndarray | None] = [None] * n_chunks
    ok_c: list[np.ndarray | None] = [None] * n_chunks
    err_c: list[list[tuple[str, str]]] = [[] for _ in range(n_chunks)]
    key = ""
    cdir = Path(cache_dir) if cache_dir is not None else None
    reused = 0
    if cdir is not None and n:
        # absolute paths: the same images named relatively or absolutely share one cache
        key = _cache_key(backbone, chunk_size, side)
        _open_cache(cdir, key, n, chunk_size, fdim)
        chunk_keys = [_chunk_key(key, c, spaths[c * chunk_size : c * chunk_size + chunk_len[c]]) for c in range(n_chunks)]
        for c in range(n_chunks):
            got = _load_chunk(cdir, c, chunk_keys[c], chunk_len[c], fdim)
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
                    f = pooled(backbone, x).numpy()
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
                        _save_chunk(cdir, c, chunk_keys[c], feats, ok, errs)
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
