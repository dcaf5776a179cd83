"""The bundle: one self-describing folder that ``build-index`` leaves in ``indexes/<name>/``.

Layout (DESIGN.md §4)::

    manifest.json        format version, library versions, backbone + fingerprint, descriptor
                         dim, cell scheme, build config, counts, timings, sha256 of every file
    config.yaml          the build config, human-readable
    model.safetensors    projection [D, F] and raw prototypes [C, D] (cell-id order)
    cells.safetensors    the cell table (key, zone, south, p, q, centre, group, column, n_images)
    records.safetensors  database positions and the cell each row is filed under
    paths.json           database image paths, relative to the dataset root
    index.faiss ...      the cell-partitioned FAISS index (geoloc.index.CellIndex.save)
    skipped.json         images left out of the build, with the reason for each
    backbone.safetensors only when the backbone was fine-tuned (train.finetune_blocks > 0)

Writing goes to a hidden temporary folder beside the target that is renamed into place at
the end, so a crash never leaves half a bundle under the real name. Loading verifies the
format version and every checksum before anything is used. No pickle anywhere.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

import geoloc
from geoloc.cells import CellTable
from geoloc.config import Config
from geoloc.errors import BundleError, ConfigError, GeolocError
from geoloc.fileio import atomic_write_json, fsync_dir, sha256_file, sha256_json
from geoloc.index import CellIndex
from geoloc.records import Records

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_RECORD_FIELDS = ("lat", "lon", "east", "north", "zone", "south", "heading")


@dataclass
class Bundle:
    """A loaded, verified bundle."""

    path: Path
    manifest: dict[str, Any]
    config: Config
    table: CellTable
    records: Records
    filed: np.ndarray
    """``[N]`` int64 cell id each database row is filed under."""
    projection: np.ndarray
    """``[D, F]`` float32."""
    prototypes: np.ndarray
    """``[C, D]`` float32 raw (un-normalised) class weights in cell-id order."""
    index: CellIndex
    backbone_state: dict[str, np.ndarray] | None = None
    """Fine-tuned backbone weights, when the build tuned them."""


def library_versions() -> dict[str, str]:
    import faiss
    import timm
    import torch

    return {"geoloc": geoloc.__version__, "faiss": faiss.__version__, "torch": torch.__version__,
            "timm": timm.__version__, "numpy": np.__version__, "python": platform.python_version()}


def write_bundle(
    out: Path,
    *,
    config: Config,
    backbone_info: dict[str, Any],
    table: CellTable,
    records: Records,
    filed: np.ndarray,
    projection: np.ndarray,
    prototypes: np.ndarray,
    index: CellIndex,
    skipped: list[tuple[str, str]],
    stats: dict[str, Any],
    backbone_state: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write a bundle to ``out`` atomically; returns ``out``.

    Args:
        backbone_info: :meth:`geoloc.backbones.Backbone.describe` of the backbone used.
        records: the N database records in index row order; ``filed`` ``[N]`` their cell ids.
        projection: ``[D, F]``; prototypes: ``[C, D]``.
        skipped: (path, reason) of every image left out.
        stats: counts and timings for the manifest.
        backbone_state: fine-tuned backbone weights (None: the backbone is rebuilt from its name).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by a build that was killed
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    tmp.mkdir()
    try:
        save_file({"projection": np.ascontiguousarray(projection, np.float32),
                   "prototypes": np.ascontiguousarray(prototypes, np.float32)}, tmp / "model.safetensors")
        save_file({k: np.ascontiguousarray(v) for k, v in table.to_arrays().items()}, tmp / "cells.safetensors")
        rec = {k: np.ascontiguousarray(getattr(records, k)) for k in _RECORD_FIELDS}
        rec["filed"] = np.ascontiguousarray(filed, np.int64)
        save_file(rec, tmp / "records.safetensors")
        (tmp / "paths.json").write_text(json.dumps({"root": str(records.root.resolve()) if records.root else None,
                                                    "paths": records.paths}), encoding="utf-8")
        (tmp / "skipped.json").write_text(json.dumps([{"path": p, "reason": r} for p, r in skipped], indent=1),
                                          encoding="utf-8")
        config.save_yaml(tmp / "config.yaml")
        index.save(tmp)
        if backbone_state is not None:
            save_file({k: np.ascontiguousarray(v) for k, v in backbone_state.items()}, tmp / "backbone.safetensors")
        files = sorted(p.name for p in tmp.iterdir() if p.is_file())
        for name in files:
            with open(tmp / name, "rb+") as fh:
                os.fsync(fh.fileno())
        manifest = {
            "format": "geoloc-bundle",
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": library_versions(),
            "backbone": backbone_info,
            "descriptor_dim": int(projection.shape[0]),
            "feature_dim": int(projection.shape[1]),
            "cells": {"size_m": table.size_m, "groups": table.groups, "min_images_per_cell": table.min_images,
                      "count": len(table)},
            "database": {"images": len(records), "skipped": len(skipped), "source": records.source},
            "stats": stats,
            "config": config.to_dict(),
            "files": {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size} for name in files},
        }
        manifest["manifest_sha256"] = sha256_json(manifest)
        atomic_write_json(tmp / MANIFEST, manifest)
        fsync_dir(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _swap_into_place(tmp: Path, out: Path) -> None:
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        if not (out / MANIFEST).exists() and any(out.iterdir()):
            raise BundleError(f"{out}: exists and is not a geoloc bundle; choose another --out or remove it")
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and sanity-check ``path/manifest.json``; raises :class:`BundleError` naming what is wrong."""
    path = Path(path)
    mf = path / MANIFEST
    if not path.is_dir():
        raise BundleError(f"{path}: no such bundle folder; build one with `geoloc build-index --out {path}`")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{mf}: missing; {path} is not a complete geoloc bundle (rebuild it with geoloc build-index)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{mf}: damaged manifest ({err}); rebuild the bundle with geoloc build-index") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "geoloc-bundle":
        raise BundleError(f"{mf}: not a geoloc bundle manifest")
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if manifest.get("manifest_sha256") != sha256_json(body):
        raise BundleError(f"{mf}: checksum differs from its content (damaged or edited); rebuild the bundle")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise BundleError(f"{mf}: format_version missing or not an integer")
    if version > FORMAT_VERSION:
        raise BundleError(f"{mf}: bundle format version {version} is newer than this geoloc reads "
                          f"({FORMAT_VERSION}); upgrade geoloc")
    if version < FORMAT_VERSION:
        raise BundleError(f"{mf}: bundle format version {version} is older than this geoloc reads "
                          f"({FORMAT_VERSION}); rebuild the bundle with geoloc build-index")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int) for v in files.values()
    ):
        raise BundleError(f"{mf}: file list missing or malformed")
    for name in files:
        if PurePosixPath(name).name != name or name in (".", "..", MANIFEST):
            raise BundleError(f"{mf}: file entry {name!r} is not a plain file name inside the bundle")
    shapes = {"backbone": dict, "descriptor_dim": int, "feature_dim": int, "cells": dict, "config": dict, "database": dict}
    for key, kind in shapes.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise BundleError(f"{mf}: {key!r} missing or not a {kind.__name__}")
    cells = manifest["cells"]
    if not (isinstance(cells.get("size_m"), (int, float)) and all(
            isinstance(cells.get(k), int) and not isinstance(cells.get(k), bool) for k in ("groups", "min_images_per_cell"))):
        raise BundleError(f"{mf}: cell scheme (size_m, groups, min_images_per_cell) missing or malformed")
    if not all(isinstance(manifest["backbone"].get(k), t) for k, t in
               (("name", str), ("fingerprint", str), ("input_size", int), ("feature_dim", int))):
        raise BundleError(f"{mf}: backbone description (name, fingerprint, input_size, feature_dim) missing or malformed")
    return manifest


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Check every file listed in the manifest exists with the recorded size and sha256."""
    for name, meta in manifest["files"].items():
        f = Path(path) / name
        if not f.is_file():
            raise BundleError(f"{f}: missing from the bundle; rebuild it with geoloc build-index")
        if f.stat().st_size != meta["bytes"]:
            raise BundleError(f"{f}: size {f.stat().st_size} B differs from the manifest's {meta['bytes']} B "
                              "(truncated or modified); rebuild the bundle")
        if sha256_file(f) != meta["sha256"]:
            raise BundleError(f"{f}: checksum differs from the manifest (damaged or modified); rebuild the bundle")


def read_bundle(path: Path, *, config: Config | None = None) -> Bundle:
    """Load and verify a bundle. ``config`` (default: the bundle's own) sets query-time options."""
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    try:
        try:
            cfg = config or Config.from_dict(manifest["config"], source=str(path / MANIFEST))
        except ConfigError as err:  # the bundle's own build config, not the user's
            raise BundleError(f"{err}; the bundle was written by another geoloc version or edited, rebuild it") from None
        model = _load_tensors(path, "model.safetensors")
        cells = _load_tensors(path, "cells.safetensors")
        rec = _load_tensors(path, "records.safetensors")
        scheme = manifest["cells"]
        table = CellTable.from_arrays(cells, size_m=float(scheme["size_m"]), groups=int(scheme["groups"]),
                                      min_images=int(scheme["min_images_per_cell"]))
        listing = json.loads((path / "paths.json").read_text(encoding="utf-8"))
        paths = listing["paths"]
        root = Path(listing["root"]) if listing["root"] else None
        for p in paths:
            _check_relative(p, path / "paths.json")
        records = Records(paths, *(rec[k] for k in _RECORD_FIELDS), root=root, source=str(path))
        index = CellIndex.load(path, config=cfg.index)
        tuned = _load_tensors(path, "backbone.safetensors") if "backbone.safetensors" in manifest["files"] else None
    except GeolocError:
        raise
    except (KeyError, TypeError, ValueError, json.JSONDecodeError) as err:
        raise BundleError(f"{path}: bundle content is inconsistent ({type(err).__name__}: {err}); rebuild it") from None
    bundle = Bundle(path, manifest, cfg, table, records, rec["filed"].astype(np.int64), model["projection"],
                    model["prototypes"], index, tuned)
    _check_consistency(bundle)
    return bundle


def _load_tensors(path: Path, name: str) -> dict[str, np.ndarray]:
    try:
        return load_file(path / name)
    except (SafetensorError, OSError) as err:
        raise BundleError(f"{path / name}: cannot be read ({err}); rebuild the bundle") from None


def _check_relative(p: str, where: Path) -> None:
    pure = PurePosixPath(p.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts:
        raise BundleError(f"{where}: record path {p!r} escapes the dataset root; the bundle is not trustworthy, rebuild it")


def _check_consistency(b: Bundle) -> None:
    n, c = len(b.records), len(b.table)
    d = b.manifest["descriptor_dim"]
    problems = []
    if b.projection.shape[0] != d or b.prototypes.shape != (c, d):
        problems.append(f"model shapes {b.projection.shape}/{b.prototypes.shape} vs descriptor dim {d} and {c} cells")
    if b.index.ntotal != n or b.index.nlist != c or b.index.dim != d:
        problems.append(f"index holds {b.index.ntotal} vectors in {b.index.nlist} lists of dim {b.index.dim}, "
                        f"expected {n} in {c} of dim {d}")
    if len(b.filed) != n or (n and (b.filed.min() < 0 or b.filed.max() >= c)):
        problems.append("records are filed under cells that do not exist")
    if problems:
        raise BundleError(f"{b.path}: inconsistent bundle: {'; '.join(problems)}; rebuild it")


def check_backbone(manifest: dict[str, Any], backbone_info: dict[str, Any], *, where: Path) -> None:
    """Refuse a bundle whose backbone differs from the one in hand, naming what differs."""
    want = manifest["backbone"]
    diffs = [f"{k}: bundle {want.get(k)!r} vs requested {backbone_info.get(k)!r}"
             for k in ("name", "input_size", "feature_dim", "fingerprint") if want.get(k) != backbone_info.get(k)]
    if diffs:
        raise BundleError(f"{where}: built with another backbone ({'; '.join(diffs)}); "
                          "query with the bundle's own backbone or rebuild the bundle")
