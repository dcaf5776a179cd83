"""Hand-offs to other tools: descriptors with their paths, and hloc-style retrieval pairs.

* :func:`export_descriptors` -- ``<name>.npz`` holding ``paths [N]`` (unicode) and
  ``descriptors [N, D]`` float32 (no pickle: ``np.load(..., allow_pickle=False)`` reads it), for
  the database of a bundle and/or a set of queries.
* :func:`write_pairs` -- the pairs file hloc's matching and localisation steps read
  (``pairs_from_retrieval``'s format): one ``query database`` line per retrieved match, the
  query's top-N in rank order, paths relative to their dataset roots.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from geoloc.errors import DatasetError
from geoloc.fileio import atomic_write_bytes
from geoloc.records import Records

if TYPE_CHECKING:
    from geoloc.engine import Localizer

__all__ = ["export_descriptors", "write_pairs", "read_descriptors", "descriptors_for"]


def _npz_bytes(paths: Sequence[str], desc: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, paths=np.asarray(list(paths), dtype=str), descriptors=np.ascontiguousarray(desc, np.float32))
    return buf.getvalue()


def export_descriptors(loc: "Localizer", out: str | Path, *, queries: Records | None = None,
                       database: bool = True, batch_size: int = 32) -> list[Path]:
    """Write ``database.npz`` (the bundle's stored descriptors) and/or ``queries.npz`` (embedded now).

    Returns the files written. Unreadable queries are left out (their paths are not listed).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if database:
        vectors, _ = loc.bundle.index.vectors()
        atomic_write_bytes(out / "database.npz", _npz_bytes(loc.bundle.records.paths, vectors))
        written.append(out / "database.npz")
    if queries is not None:
        paths, chunks = [], []
        for start in range(0, len(queries), batch_size):
            rows = list(range(start, min(start + batch_size, len(queries))))
            enc = loc.encoder.encode_files([queries.abspath(i) for i in rows])
            chunks.append(loc.encoder.descriptors(enc.features))
            paths += [queries.paths[i] for i, e in zip(rows, enc.errors) if e is None]
        desc = np.concatenate(chunks) if chunks else np.zeros((0, loc.encoder.dim), np.float32)
        atomic_write_bytes(out / "queries.npz", _npz_bytes(paths, desc))
        written.append(out / "queries.npz")
    return written


def read_descriptors(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read a file written by :func:`export_descriptors`: ``paths``, ``[N, D]`` float32."""
    try:
        with np.load(path, allow_pickle=False) as z:
            paths, desc = [str(p) for p in z["paths"]], np.asarray(z["descriptors"], np.float32)
    except (OSError, ValueError, KeyError) as err:
        raise DatasetError(f"{path}: not a descriptor file with 'paths' and 'descriptors' ({err}); "
                           "write one with `geoloc export`") from None
    if desc.ndim != 2 or len(paths) != len(desc):
        raise DatasetError(f"{path}: {len(paths)} paths for descriptors of shape {desc.shape}")
    return paths, desc


def descriptors_for(records: Records, path: str | Path) -> np.ndarray:
    """The rows of a descriptor file for each record, matched by path (relative to the dataset
    root, or absolute): ``[N, F]`` float32, L2-normalised.

    Raises:
        DatasetError: a record has no descriptor, or a row is NaN, infinite or all zero.
    """
    paths, feats = read_descriptors(path)
    row = {p: i for i, p in enumerate(paths)}
    take = [row.get(p, row.get(str(records.abspath(i)), -1)) for i, p in enumerate(records.paths)]
    missing = [records.paths[i] for i, t in enumerate(take) if t < 0]
    if missing:
        raise DatasetError(f"{path}: no descriptor for {len(missing)} of {len(records)} images "
                           f"(first: {missing[0]}); the file's paths must match the dataset's")
    x = feats[np.asarray(take, dtype=np.int64)] if take else np.zeros((0, feats.shape[1]), np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if not np.isfinite(x).all() or (norms == 0).any():
        raise DatasetError(f"{path}: descriptors hold NaN, infinite or all-zero rows")
    if np.abs(norms - 1).max(initial=0) > 1e-5:  # already unit rows are kept bit for bit
        x = x / norms
    return np.ascontiguousarray(x, dtype=np.float32)


def write_pairs(loc: "Localizer", queries: Records, out: str | Path, *, top: int = 20, mode: str = "hybrid",
                batch_size: int = 32, **options) -> Path:
    """hloc pairs file: for each query, its ``top`` database matches in rank order (``mode`` retrieve or hybrid)."""
    if mode not in ("retrieve", "hybrid"):
        raise DatasetError(f"pairs need database matches: mode must be retrieve or hybrid, not {mode!r}")
    lines = []
    for start in range(0, len(queries), batch_size):
        rows = list(range(start, min(start + batch_size, len(queries))))
        preds = loc.localize([queries.abspath(i) for i in rows], mode=mode, top_matches=top, batch_size=batch_size,
                             **options)
        for i, p in zip(rows, preds):
            if isinstance(p, Exception):
                continue
            lines += [f"{queries.paths[i]} {loc.bundle.records.paths[j]}" for j in p.candidate_ids[:top]]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))
    return out
