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

``engine="ray"`` hands the chunks still to extract to Ray Data actors (:mod:`geoloc.distributed`):
each runs :func:`extract_chunk` (the same decoding, pooling and batch boundaries as here) and
sends back the chunk's cache bytes, which this process checks and writes into the same cache. The
features are identical to the local path's (same device kind and torch thread count), and local
and Ray runs resume from each other's chunks.
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
from geoloc.config import BackboneConfig
from geoloc.errors import ConfigError, GeolocError, ImageError

__all__ = ["Extraction", "extract_features", "extract_chunk", "image_batches", "chunk_payload", "parse_chunk",
           "write_chunk", "CACHE_FORMAT", "ENGINES"]

CACHE_FORMAT = 2
DEFAULT_CHUNK_SIZE = 1024
ENGINES: tuple[str, ...] = ("local", "ray")
"""Where :func:`extract_features` runs: this process, or a Ray cluster (:mod:`geoloc.distributed`)."""

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


def chunk_payload(key: str, c: int, feats: np.ndarray, ok: np.ndarray, errors: list[tuple[str, str]]) -> bytes:
    """The bytes of cache chunk c (a safetensors file): ``features [n_ok, F]`` float32 + ``ok [n]``
    uint8, with the chunk key, the chunk number and the errors (JSON) as metadata.

    The local path and the Ray workers (:mod:`geoloc.distributed`) both make chunks with this.
    """
    from safetensors.numpy import save

    return save(
        {"features": np.ascontiguousarray(feats, dtype=np.float32), "ok": ok.astype(np.uint8)},
        metadata={"key": key, "chunk": str(c), "errors": json.dumps(errors)},
    )


def parse_chunk(data: bytes, c: int, key: str, n: int, feature_dim: int) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]] | None:
    """``(features [n_ok, F] float32, ok [n] bool, errors)`` from :func:`chunk_payload` bytes, or
    None when they are damaged or made for another key, chunk number, size or feature size."""
    from safetensors.numpy import load

    try:
        head_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + head_len]).get("__metadata__") or {}
        arrays = load(data)
        feats, ok = arrays["features"], arrays["ok"].astype(bool)
        errors = [(str(p), str(r)) for p, r in json.loads(meta.get("errors", "[]"))]
        valid = (meta.get("key") == key and meta.get("chunk") == str(c) and ok.shape == (n,)
                 and feats.dtype == np.float32 and feats.shape == (int(ok.sum()), feature_dim)
                 and len(errors) == n - int(ok.sum()))
    except Exception:  # noqa: BLE001 - unreadable: recompute
        return None
    return (feats, ok, errors) if valid else None


def write_chunk(cache_dir: Path, c: int, data: bytes) -> None:
    """Write chunk c's :func:`chunk_payload` bytes atomically into the cache."""
    atomic_write_bytes(cache_dir / _chunk_name(c), data)


def _save_chunk(cache_dir: Path, c: int, key: str, feats: np.ndarray, ok: np.ndarray, errors: list[tuple[str, str]]) -> None:
    """Write chunk c: ``features [n_ok,F]`` float32 + ``ok [n]`` uint8 + errors (JSON metadata)."""
    write_chunk(cache_dir, c, chunk_payload(key, c, feats, ok, errors))


def _load_chunk(cache_dir: Path, c: int, key: str, n: int, feature_dim: int) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]] | None:
    """Chunk c if present, whole and made with ``key`` (else None; a damaged file is removed)."""
    path = cache_dir / _chunk_name(c)
    if not path.is_file():
        return None
    try:
        got = parse_chunk(path.read_bytes(), c, key, n, feature_dim)
    except OSError:
        got = None
    if got is None:
        path.unlink(missing_ok=True)
    return got


# -- extraction -------------------------------------------------------------------------------------
def _batches(start: int, stop: int, batch_size: int) -> Iterator[list[int]]:
    for b in range(start, stop, batch_size):
        yield list(range(b, min(b + batch_size, stop)))


def extract_chunk(paths: Sequence[str], *, backbone: Backbone, batch_size: int,
                  root: str | None = None) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """One cache chunk in one process, with the batch boundaries of :func:`extract_features`.

    What a Ray worker runs (:mod:`geoloc.distributed`): the same :func:`~geoloc.encoder.decode_with`
    and :func:`~geoloc.encoder.pooled` as the local path, on the same batches (``batch_size``
    images from the chunk's start; undecodable images are left out of their batch), so the
    features are the local path's bit for bit on the same device and torch thread count.

    Args:
        paths: the chunk's n image files, as the caller named them (errors report these names).
        root: folder that relative ``paths`` are relative to (the caller's working directory).
    Returns:
        ``(features [n_ok, F] float32, ok [n] bool, [(path, reason), ...])``.
    """
    side, transform = short_side(backbone), backbone.transform_fn
    ok = np.zeros(len(paths), dtype=bool)
    rows: list[np.ndarray] = []
    errors: list[tuple[str, str]] = []
    for batch in _batches(0, len(paths), batch_size):
        xs = []
        for i in batch:
            try:
                xs.append(decode_with(os.path.join(root, paths[i]) if root else paths[i], transform=transform, side=side))
                ok[i] = True
            except ImageError as err:
                errors.append((paths[i], err.problem))
        if xs:
            rows.extend(pooled(backbone, torch.stack(xs)).numpy())
    feats = np.stack(rows).astype(np.float32) if rows else np.zeros((0, backbone.feature_dim), np.float32)
    return feats, ok, errors


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
    engine: str = "local",
    ray_address: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    backbone_config: BackboneConfig | None = None,
) -> Extraction:
    """Descriptors of N images with ``backbone``.

    Args:
        paths: N image files. Order is kept; undecodable images are skipped and reported.
        batch_size: images per forward pass (batches never straddle chunks).
        num_workers: DataLoader decode workers (0 = decode in this process).
        cache_dir: folder of a resumable chunk cache (created if needed), or None for no cache.
        chunk_size: images per cache chunk; part of the cache key.
        engine: ``"local"`` (this process and its DataLoader workers) or ``"ray"``: the chunks
            still to extract are embedded by Ray Data actors (:mod:`geoloc.distributed`), each
            with its own copy of the backbone; results are identical and share the cache.
        ray_address: ``engine="ray"`` only: the cluster to join (``"auto"``, ``"HOST:PORT"``), or
            None to start a local one (shut down when done). A Ray session this process already
            has is used as it is, whatever the address.
        workers: ``engine="ray"`` only: number of actors (default: one per CPU of the cluster,
            or one per GPU when ``backbone`` is on CUDA).
        threads_per_worker: ``engine="ray"`` only: torch threads in each actor (default: this
            process's ``torch.get_num_threads()``, so that CPU features equal the local path's
            bit for bit; conv nets' CPU results can change in the last bit with the thread count).
        backbone_config: ``engine="ray"`` only: the config ``backbone`` was created from (each
            actor creates its own with :func:`geoloc.backbones.create_backbone` and checks its
            fingerprint); None derives it from ``backbone``.
    Returns:
        :class:`Extraction` with ``features [N_ok, F]`` float32 L2-normalised, ``ok [N]`` bool,
        ``errors`` and the count of reused/extracted chunks.
    """
    from tqdm.auto import tqdm

    if batch_size < 1 or chunk_size < 1 or num_workers < 0:
        raise GeolocError(f"batch_size and chunk_size must be >= 1 and num_workers >= 0 "
                          f"(got {batch_size}, {chunk_size}, {num_workers})")
    if engine not in ENGINES:
        raise ConfigError(f"unknown extraction engine {engine!r}: use one of {', '.join(ENGINES)}")
    if engine == "ray":
        from geoloc.distributed import import_ray

        import_ray()  # a missing extra is reported at once, even when every chunk is cached
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
    chunk_keys = [""] * n_chunks
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
    if todo and engine == "ray":
        from geoloc.distributed import ray_chunks

        bar = tqdm(total=sum(chunk_len[c] for c in todo), desc=desc, unit="img", disable=not progress,
                   dynamic_ncols=True)
        try:
            jobs = [(c, chunk_keys[c], spaths[c * chunk_size : c * chunk_size + chunk_len[c]]) for c in todo]
            for c, data in ray_chunks(jobs, backbone=backbone, config=backbone_config, batch_size=batch_size,
                                      address=ray_address, workers=workers, threads=threads_per_worker):
                got = parse_chunk(data, c, chunk_keys[c], chunk_len[c], fdim)
                if got is None:
                    raise GeolocError(f"a Ray worker returned a damaged feature chunk {c}: check that every "
                                      f"node runs the same geoloc version")
                if cdir is not None:
                    write_chunk(cdir, c, data)
                feats_c[c], ok_c[c], err_c[c] = got
                bar.update(chunk_len[c])
        finally:
            bar.close()
        todo_local: list[int] = []
    else:
        todo_local = todo
    batch_list = [b for c in todo_local for b in _batches(c * chunk_size, c * chunk_size + chunk_len[c], batch_size)]
    if batch_list:
        loader = image_batches(spaths, backbone=backbone, batches=batch_list, num_workers=num_workers)
        # Per chunk in progress: rows by local index, errors, count of images seen.
        rows: dict[int, dict[int, np.ndarray]] = {c: {} for c in todo_local}
        bad: dict[int, list[tuple[int, str]]] = {c: [] for c in todo_local}
        seen = {c: 0 for c in todo_local}
        bar = tqdm(total=sum(chunk_len[c] for c in todo_local), desc=desc, unit="img", disable=not progress,
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
