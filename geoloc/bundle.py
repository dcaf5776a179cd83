"""The bundle: one self-describing folder that ``build-index`` leaves in ``indexes/<name>/``.

Layout (see ``docs/architecture.md``)::

    manifest.json        format version, library versions, backbone + fingerprint, descriptor
                         dim, cell scheme, build config, counts, timings, sha256 of every file
    config.yaml          the build config, human-readable
    model.safetensors    projection [D, F] and raw prototypes [P, D] (P = C x K sub-centres, cell-major order)
    cells.safetensors    the cell table (key, zone, south, p, q, centre, group, column, n_images)
    records.safetensors  database positions and the cell each row is filed under
    paths.json           database image paths, relative to the dataset root
    index.faiss ...      the cell-partitioned FAISS index (geoloc.index.CellIndex.save); with
                         index.shards > 1 also shard_cells.npy and shard-NNNN.faiss (one FAISS
                         file per geographic shard, opened memory-mapped), named again under the
                         manifest's "index_shards" and checksummed like every file
    skipped.json         images left out of the build, with the reason for each
    backbone.safetensors only when the backbone was fine-tuned (train.finetune_blocks > 0)

Writing (:func:`write_bundle`):

- :func:`check_output` refuses, before any work, an ``--out`` that is a file, a symbolic link, a
  folder that is neither empty nor a bundle whose manifest verifies (format, its own checksum, no
  file it does not list), or a place that cannot be written. The engine replaces only a folder it
  can prove it wrote.
- :func:`build_lock` holds an exclusive ``flock`` on ``.<name>.lock`` beside the bundle (the file
  holds the owner's pid); a second build of the same ``--out`` is refused at once, naming that pid.
- Files go to a hidden temporary folder beside the target, get the mode the umask allows, are
  fsynced, and the folder is swapped into place atomically (``renameat2(RENAME_EXCHANGE)`` on
  Linux, two renames elsewhere), so a crash never leaves half a bundle under the real name. A
  full disk, a read-only file system or a permission problem is one :class:`geoloc.fileio.OutputError`
  line.

Reading (:func:`read_bundle`) opens the bundle folder once and reads every file through that
descriptor, so a rebuild swapping the folder meanwhile cannot mix two bundles; if the folder was
replaced while it was read, the read starts again (a bounded number of times). Only regular
files are opened and every read is bounded. The bundle is checked for meaning, not only for
checksums: shapes, ids in range and each present once, finite positions inside their cells.
No pickle anywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import platform
import shutil
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensor_bytes
from safetensors.numpy import save_file

import geoloc
from geoloc.cells import CellTable
from geoloc.config import Config
from geoloc.errors import BundleError, ConfigError, GeolocError
from geoloc.fileio import (OutputError, apply_umask, atomic_write_json, fsync_dir, one_line, sha256_fileobj,
                           sha256_json, write_failure)
from geoloc.geo import cell_key, cell_pq, split_cell_key
from geoloc.index import CellIndex
from geoloc.index.shards import SHARD_CELLS_FILE
from geoloc.records import Records

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
"""A manifest larger than this is not one geoloc wrote (they are kilobytes)."""
READ_ATTEMPTS = 50
"""How many times :func:`read_bundle` starts again when a rebuild replaced the folder while it read
(a rebuild takes far longer than a read, so one retry is the rule; the bound matters only when
bundles are swapped in a tight loop)."""
READ_RETRY_SECONDS = 10.0
"""...and for at most this long in all."""
_RECORD_FIELDS = ("lat", "lon", "east", "north", "zone", "south", "heading")
_IN_MEMORY = {"model.safetensors", "cells.safetensors", "records.safetensors", "paths.json", "backbone.safetensors"}


class OutputRefusedError(BundleError, OutputError):
    """``--out`` exists and is not something geoloc may replace (a file, a link, a foreign folder)."""

    exit_code = 5


class BuildLockedError(OutputError):
    """Another build holds the lock on the same ``--out``."""

    exit_code = 5


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


INFO_KEYS = ("format_version", "created", "versions", "backbone", "descriptor_dim", "cells", "database")
"""Manifest keys in the summary of ``geoloc info`` and ``GET /v1/info``."""


def manifest_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest summary printed by ``geoloc info`` and served at ``/v1/info`` (keys :data:`INFO_KEYS`)."""
    return {k: manifest[k] for k in INFO_KEYS if k in manifest}


def library_versions() -> dict[str, str]:
    import faiss
    import timm
    import torch

    return {"geoloc": geoloc.__version__, "faiss": faiss.__version__, "torch": torch.__version__,
            "timm": timm.__version__, "numpy": np.__version__, "python": platform.python_version()}


# -- the output folder ----------------------------------------------------------------------------

def _nearest_existing(p: Path) -> Path:
    for cand in (p, *p.parents):
        if os.path.lexists(cand):
            return cand
    return Path(".")


def check_output(out: Path) -> None:
    """Refuse, in one line and before any work, an ``out`` that a build must not write.

    Accepted: a path that does not exist (its parent is created later), an empty folder, or a
    folder holding a geoloc bundle whose manifest verifies (format, its own checksum) and that
    holds no entry the manifest does not list. Refused: a regular file or anything not a folder,
    a symbolic link, any other folder (even one with a file named ``manifest.json``), and a
    place that cannot be written (read-only file system, no permission, a file in the way).

    Raises:
        OutputRefusedError: ``out`` exists and is not a bundle geoloc may replace.
        OutputError: the folder that would receive ``out`` cannot be written.
    """
    out = Path(out)
    where = one_line(out)
    if os.path.islink(out):
        raise OutputRefusedError(f"{where}: is a symbolic link; give the folder itself as --out")
    if os.path.lexists(out):
        try:
            st = os.stat(out)
        except OSError as err:
            raise OutputError(f"{where}: cannot be examined ({one_line(err.strerror or err)}); choose another --out") from None
        if not stat.S_ISDIR(st.st_mode):
            raise OutputRefusedError(f"{where}: exists and is not a folder; choose another --out or remove it")
        _check_replaceable(out)
    anc = _nearest_existing(out.parent)
    if not anc.is_dir():
        raise OutputError(f"{one_line(anc)}: is not a folder, so {where} cannot be created; choose another --out")
    try:
        fd, probe = tempfile.mkstemp(dir=anc, prefix=f".{out.name}.probe-")
    except OSError as err:
        mapped = write_failure(err, out)
        raise (mapped or OutputError(f"{where}: cannot write in {one_line(anc)} ({one_line(err.strerror or err)}); "
                                     "choose another --out")) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def _check_replaceable(out: Path) -> None:
    """``out`` is a folder: pass if it is empty or a bundle geoloc wrote, else refuse."""
    where = one_line(out)
    try:
        entries = sorted(os.listdir(out))
    except OSError as err:
        raise OutputError(f"{where}: cannot be listed ({one_line(err.strerror or err)}); choose another --out") from None
    if not entries:
        return
    refuse = f"{where}: exists and is not a geoloc bundle"
    if MANIFEST not in entries:
        raise OutputRefusedError(f"{refuse} (no {MANIFEST}); choose another --out or remove it yourself")
    try:
        manifest = _parse_manifest(out, _read_manifest_bytes(out, None), check_version=False)
    except BundleError as err:
        raise OutputRefusedError(f"{refuse} ({one_line(err)}); choose another --out or remove it yourself") from None
    extra = [e for e in entries if e != MANIFEST and e not in manifest["files"]]
    if extra:
        raise OutputRefusedError(f"{refuse} only: it also holds {extra[0]!r}, which the bundle did not write; "
                                 "move it away or choose another --out")


_HELD: dict[tuple[str, int], list] = {}
_HELD_GUARD = threading.Lock()


def lock_path(out: Path) -> Path:
    """The lock file of a build of ``out``: ``.<name>.lock`` beside it."""
    out = Path(os.path.abspath(out))
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[Path]:
    """Hold the exclusive build lock of ``out`` for the ``with`` body (re-entrant in one thread).

    A second build of the same ``out`` (another process, or another thread) is refused at once
    rather than waiting: it cannot know how long the first will take. The lock is an ``flock`` on
    ``.<name>.lock`` beside ``out`` holding the owner's pid; the kernel drops it when the owner
    dies, so a killed build never blocks the next. Creates ``out``'s parent folder.

    Raises:
        BuildLockedError: another build holds the lock (the message names its pid).
        OutputError: the parent folder cannot be created or written.
    """
    import fcntl

    out = Path(os.path.abspath(out))  # "." and ".." have no name to put a lock file beside
    lp = lock_path(out)
    key = (str(lp), threading.get_ident())
    with _HELD_GUARD:
        held = _HELD.get(key)
        if held is not None:
            held[1] += 1
    if held is not None:
        try:
            yield lp
        finally:
            with _HELD_GUARD:
                held[1] -= 1
        return
    try:
        lp.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise (write_failure(err, out) or OutputError(f"{one_line(lp.parent)}: cannot be created "
                                                      f"({one_line(err.strerror or err)}); choose another --out")) from None
    while True:
        try:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as err:
            raise (write_failure(err, lp) or OutputError(f"{one_line(lp)}: cannot create the build lock "
                                                         f"({one_line(err.strerror or err)}); choose another --out")) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            owner = ""
            with contextlib.suppress(OSError, ValueError):
                owner = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(f"{one_line(lp)}: cannot take the build lock ({one_line(err.strerror or err)})") from None
            who = f"pid {owner}" if owner.isdigit() else "another process"
            if owner.isdigit() and int(owner) == os.getpid():
                who += ", another thread of this process"
            raise BuildLockedError(f"{one_line(out)}: another build ({who}) is writing this bundle; "
                                   f"wait for it to finish or choose another --out") from None
        # the file may have been unlinked by the previous owner between our open and our lock
        try:
            same = os.fstat(fd).st_ino == os.stat(lp, follow_symlinks=False).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        with _HELD_GUARD:
            _HELD[key] = [fd, 1]
        yield lp
    finally:
        with _HELD_GUARD:
            _HELD.pop(key, None)
        with contextlib.suppress(OSError):
            os.unlink(lp)
        os.close(fd)


# -- writing --------------------------------------------------------------------------------------

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

    Takes :func:`build_lock` (re-entrant: a caller may already hold it) and checks ``out`` again
    with :func:`check_output` before writing and before swapping it into place.

    Args:
        backbone_info: :meth:`geoloc.backbones.Backbone.describe` of the backbone used.
        records: the N database records in index row order; ``filed`` ``[N]`` their cell ids.
        projection: ``[D, F]``; prototypes: ``[P, D]`` (K sub-centres per cell: row ``c * K + k``).
        skipped: (path, reason) of every image left out.
        stats: counts and timings for the manifest.
        backbone_state: fine-tuned backbone weights (None: the backbone is rebuilt from its name).
    Raises:
        OutputRefusedError, BuildLockedError, OutputError: one line; nothing is left under ``out``
            but the previous bundle, if any.
    """
    given = Path(out)
    out = Path(os.path.abspath(given))
    check_output(out)
    with build_lock(out):
        check_output(out)
        for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed build (we hold the lock: nobody else's)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        current = out
        try:
            tmp.mkdir()

            def target(name: str) -> Path:
                nonlocal current
                current = out / name
                return tmp / name

            save_file({"projection": np.ascontiguousarray(projection, np.float32),
                       "prototypes": np.ascontiguousarray(prototypes, np.float32)}, target("model.safetensors"))
            save_file({k: np.ascontiguousarray(v) for k, v in table.to_arrays().items()}, target("cells.safetensors"))
            rec = {k: np.ascontiguousarray(getattr(records, k)) for k in _RECORD_FIELDS}
            rec["filed"] = np.ascontiguousarray(filed, np.int64)
            save_file(rec, target("records.safetensors"))
            target("paths.json").write_text(json.dumps({"root": str(records.root.resolve()) if records.root else None,
                                                        "paths": records.paths}), encoding="utf-8")
            target("skipped.json").write_text(json.dumps([{"path": p, "reason": r} for p, r in skipped], indent=1),
                                              encoding="utf-8")
            config.save_yaml(target("config.yaml"))
            target("index.faiss")
            index.save(tmp)
            if backbone_state is not None:
                save_file({k: np.ascontiguousarray(v) for k, v in backbone_state.items()},
                          target("backbone.safetensors"))
            files = sorted(p.name for p in tmp.iterdir() if p.is_file())
            for name in files:
                current = out / name
                apply_umask(tmp / name)
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
                "files": {name: {"sha256": _sha256_path(tmp / name), "bytes": (tmp / name).stat().st_size}
                          for name in files},
            }
            if index.shards is not None:  # geographic shards: every file is in "files" (checksummed) too
                manifest["index_shards"] = {"count": index.n_shards,
                                            "files": sorted(n for n in files if n.startswith("shard-")),
                                            "table": SHARD_CELLS_FILE}
            manifest["manifest_sha256"] = sha256_json(manifest)
            current = out / MANIFEST
            atomic_write_json(tmp / MANIFEST, manifest)
            apply_umask(tmp, folder=True)
            fsync_dir(tmp)
            check_output(out)  # nothing foreign appeared under the real name meanwhile
            current = out
            _swap_into_place(tmp, out)
        except BaseException as err:
            mapped = write_failure(err, current) if isinstance(err, Exception) and not isinstance(err, GeolocError) else None
            shutil.rmtree(tmp, ignore_errors=True)
            if mapped is not None:
                raise mapped from None
            raise
    return given


def _sha256_path(path: Path) -> str:
    with open(path, "rb") as fh:
        return sha256_fileobj(fh)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Put the complete folder ``tmp`` at ``out``; a reader of ``out`` sees the old folder or the new one."""
    if not os.path.lexists(out):
        os.replace(tmp, out)
        fsync_dir(out.parent)
        return
    if _exchange(tmp, out):  # no moment without a bundle at `out`
        fsync_dir(out.parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now the old bundle
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


# -- reading --------------------------------------------------------------------------------------

def _open_dir(path: Path) -> int:
    where = one_line(path)
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NONBLOCK", 0)
                       | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise BundleError(f"{where}: no such bundle folder; build one with `geoloc build-index --out {where}`") from None
    except NotADirectoryError:
        raise BundleError(f"{where}: is not a folder; give a bundle folder written by `geoloc build-index`") from None
    except OSError as err:
        raise BundleError(f"{where}: cannot be opened ({one_line(err.strerror or err)})") from None


def _open_member(folder: Path, name: str, dfd: int | None, *, max_bytes: int | None):
    """Open bundle member ``name`` (a regular file, not a link) relative to the folder descriptor ``dfd``."""
    f = folder / name
    where = one_line(f)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(name if dfd is not None else f, flags, dir_fd=dfd)
    except FileNotFoundError:
        raise BundleError(f"{where}: missing; {one_line(folder)} is not a complete geoloc bundle "
                          "(rebuild it with geoloc build-index)") from None
    except OSError as err:
        what = {errno.ELOOP: "is a symbolic link", errno.EISDIR: "is a directory"}.get(
            err.errno, f"cannot be opened ({one_line(err.strerror or err)})")
        raise BundleError(f"{where}: {what}, expected a regular file; rebuild the bundle") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
            raise BundleError(f"{where}: is {kind}, expected a regular file; rebuild the bundle")
        if max_bytes is not None and st.st_size > max_bytes:
            raise BundleError(f"{where}: {st.st_size} B, more than the {max_bytes} B expected; rebuild the bundle")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _read_manifest_bytes(path: Path, dfd: int | None) -> bytes:
    with _open_member(Path(path), MANIFEST, dfd, max_bytes=MAX_MANIFEST_BYTES) as fh:
        data = fh.read(MAX_MANIFEST_BYTES + 1)
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{one_line(Path(path) / MANIFEST)}: larger than {MAX_MANIFEST_BYTES} B; rebuild the bundle")
    return data


def read_manifest(path: Path) -> dict[str, Any]:
    """Parse and sanity-check ``path/manifest.json``; raises :class:`BundleError` naming what is wrong.

    Only a regular file is read, and at most :data:`MAX_MANIFEST_BYTES` of it (a FIFO, a device
    such as ``/dev/zero`` or a directory named ``manifest.json`` is one line, never a hang).
    """
    path = Path(path)
    dfd = _open_dir(path)
    try:
        return _parse_manifest(path, _read_manifest_bytes(path, dfd))
    finally:
        os.close(dfd)


def _parse_manifest(path: Path, raw: bytes, *, check_version: bool = True) -> dict[str, Any]:
    mf = one_line(Path(path) / MANIFEST)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise BundleError(f"{mf}: damaged manifest ({one_line(err)[:200]}); rebuild the bundle with geoloc build-index") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "geoloc-bundle":
        raise BundleError(f"{mf}: not a geoloc bundle manifest")
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if manifest.get("manifest_sha256") != sha256_json(body):
        raise BundleError(f"{mf}: checksum differs from its content (damaged or edited); rebuild the bundle")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{mf}: format_version missing or not an integer")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("bytes"), int)
        and not isinstance(v.get("bytes"), bool) and v["bytes"] >= 0 for v in files.values()
    ):
        raise BundleError(f"{mf}: file list missing or malformed")
    for name in files:
        if PurePosixPath(name).name != name or name in (".", "..", MANIFEST) or "/" in name or "\\" in name:
            raise BundleError(f"{mf}: file entry {name!r} is not a plain file name inside the bundle")
    if not check_version:
        return manifest
    if version > FORMAT_VERSION:
        raise BundleError(f"{mf}: bundle format version {version} is newer than this geoloc reads "
                          f"({FORMAT_VERSION}); upgrade geoloc")
    if version < FORMAT_VERSION:
        raise BundleError(f"{mf}: bundle format version {version} is older than this geoloc reads "
                          f"({FORMAT_VERSION}); rebuild the bundle with geoloc build-index")
    shapes = {"backbone": dict, "descriptor_dim": int, "feature_dim": int, "cells": dict, "config": dict, "database": dict}
    for key, kind in shapes.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise BundleError(f"{mf}: {key!r} missing or not a {kind.__name__}")
    cells = manifest["cells"]
    size = cells.get("size_m")
    if not (isinstance(size, (int, float)) and not isinstance(size, bool) and math.isfinite(size) and size >= 1
            and all(isinstance(cells.get(k), int) and not isinstance(cells.get(k), bool) and cells.get(k) >= 1
                    for k in ("groups", "min_images_per_cell"))):
        raise BundleError(f"{mf}: cell scheme (size_m, groups, min_images_per_cell) missing or malformed")
    if not all(isinstance(manifest["backbone"].get(k), t) for k, t in
               (("name", str), ("fingerprint", str), ("input_size", int), ("feature_dim", int))):
        raise BundleError(f"{mf}: backbone description (name, fingerprint, input_size, feature_dim) missing or malformed")
    if manifest["descriptor_dim"] < 1 or manifest["feature_dim"] < 1:
        raise BundleError(f"{mf}: descriptor_dim and feature_dim must be positive")
    return manifest


def _verify_member(folder: Path, name: str, meta: dict, dfd: int | None, *, keep: bool) -> bytes | None:
    """Check one listed file's size and sha256 (read through ``dfd``); returns its bytes when ``keep``."""
    f = one_line(Path(folder) / name)
    with _open_member(Path(folder), name, dfd, max_bytes=None) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size != meta["bytes"]:
            raise BundleError(f"{f}: size {size} B differs from the manifest's {meta['bytes']} B "
                              "(truncated or modified); rebuild the bundle")
        if keep:
            data = fh.read(meta["bytes"] + 1)
            digest = hashlib.sha256(data).hexdigest()
        else:
            data = None
            digest = sha256_fileobj(fh, limit=meta["bytes"] + 1)
    if digest != meta["sha256"]:
        raise BundleError(f"{f}: checksum differs from the manifest (damaged or modified); rebuild the bundle")
    return data


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Check every file listed in the manifest is a regular file with the recorded size and sha256."""
    path = Path(path)
    dfd = _open_dir(path)
    try:
        for name, meta in manifest["files"].items():
            _verify_member(path, name, meta, dfd, keep=False)
    finally:
        os.close(dfd)


def read_verified_manifest(path: Path) -> dict[str, Any]:
    """:func:`read_manifest` and :func:`verify_files` in one pinned read of the folder (what ``geoloc info`` needs).

    Like :func:`read_bundle`, reads the manifest and every file through one descriptor of the
    folder and starts again when a rebuild replaced it meanwhile, so a rebuild never causes a
    false "checksum differs".
    """
    return _retrying(Path(path), lambda dfd: _verified_manifest(Path(path), dfd))


def _verified_manifest(path: Path, dfd: int) -> dict[str, Any]:
    manifest = _parse_manifest(path, _read_manifest_bytes(path, dfd))
    for name, meta in manifest["files"].items():
        _verify_member(path, name, meta, dfd, keep=False)
    return manifest


def _retrying(path: Path, read):
    deadline = time.monotonic() + READ_RETRY_SECONDS
    for attempt in range(READ_ATTEMPTS):
        dfd = None
        try:
            dfd = _open_dir(path)
            ident = os.fstat(dfd)
            return read(dfd)
        except BundleError:
            last = attempt == READ_ATTEMPTS - 1 or time.monotonic() > deadline
            if last or not _replaced(path, None if dfd is None else ident):
                raise
        finally:
            if dfd is not None:
                os.close(dfd)
        time.sleep(min(0.01 * (attempt + 1), 0.2))
    raise AssertionError("unreachable")  # pragma: no cover


def read_bundle(path: Path, *, config: Config | None = None) -> Bundle:
    """Load and verify a bundle. ``config`` (default: the bundle's own) sets query-time options.

    Every file is read through one descriptor of the folder, so the result comes from one
    bundle even while a rebuild swaps a new one into place; when the folder was replaced (or
    briefly absent) during the read, the read starts again, at most :data:`READ_ATTEMPTS` times.

    Raises:
        BundleError: one line naming the file or the inconsistency.
    """
    path = Path(path)
    return _retrying(path, lambda dfd: _read_pinned(path, dfd, config))


def _replaced(path: Path, ident: os.stat_result | None) -> bool:
    """Whether ``path`` now names another folder than the one read (or, when none was opened, exists now)."""
    try:
        now = os.stat(path)
    except OSError:
        return False if ident is None else True
    if ident is None:
        return stat.S_ISDIR(now.st_mode)
    return (now.st_dev, now.st_ino) != (ident.st_dev, ident.st_ino)


def _pinned_root(path: Path, dfd: int) -> Path:
    """A path that resolves through the open folder descriptor (Linux), else ``path`` itself."""
    p = Path(f"/proc/self/fd/{dfd}")
    try:
        if os.path.samestat(os.stat(p), os.fstat(dfd)):
            return p
    except OSError:
        pass
    return path


def _read_pinned(path: Path, dfd: int, config: Config | None) -> Bundle:
    manifest = _parse_manifest(path, _read_manifest_bytes(path, dfd))
    _check_shards_listed(path, manifest)
    held: dict[str, bytes] = {}
    for name, meta in manifest["files"].items():
        data = _verify_member(path, name, meta, dfd, keep=name in _IN_MEMORY)
        if data is not None:
            held[name] = data
    try:
        try:
            cfg = config or Config.from_dict(manifest["config"], source=str(path / MANIFEST))
        except ConfigError as err:  # the bundle's own build config, not the user's
            raise BundleError(f"{err}; the bundle was written by another geoloc version or edited, rebuild it") from None
        model = _tensors(path, "model.safetensors", held)
        cells = _tensors(path, "cells.safetensors", held)
        rec = _tensors(path, "records.safetensors", held)
        scheme = manifest["cells"]
        table = CellTable.from_arrays(cells, size_m=float(scheme["size_m"]), groups=int(scheme["groups"]),
                                      min_images=int(scheme["min_images_per_cell"]))
        if "paths.json" not in held:
            raise BundleError(f"{one_line(path / 'paths.json')}: missing from the bundle; rebuild it with geoloc build-index")
        listing = json.loads(held["paths.json"].decode("utf-8"))
        paths = listing["paths"]
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise TypeError("paths.json: 'paths' is not a list of strings")
        root = Path(listing["root"]) if listing["root"] else None
        for p in paths:
            _check_relative(p, path / "paths.json")
        records = Records(paths, *(rec[k] for k in _RECORD_FIELDS), root=root, source=str(path))
        index = CellIndex.load(_pinned_root(path, dfd), config=cfg.index)
        tuned = _tensors(path, "backbone.safetensors", held) if "backbone.safetensors" in manifest["files"] else None
        filed = rec["filed"]
    except GeolocError as err:
        raise BundleError(one_line(str(err).replace(str(_pinned_root(path, dfd)), str(path)))) from None
    except (KeyError, TypeError, ValueError, AttributeError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{one_line(path)}: bundle content is inconsistent ({type(err).__name__}: "
                          f"{one_line(err)[:200]}); rebuild it") from None
    bundle = Bundle(path, manifest, cfg, table, records, filed, model.get("projection"), model.get("prototypes"),
                    index, tuned)
    _check_consistency(bundle)
    bundle.filed = bundle.filed.astype(np.int64)
    return bundle


def _check_shards_listed(path: Path, manifest: dict[str, Any]) -> None:
    """A sharded bundle's manifest names its shard files; each must be a checksummed file of the bundle."""
    shards = manifest.get("index_shards")
    if shards is None:
        return
    names = shards.get("files") if isinstance(shards, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names) or len(names) != shards.get("count"):
        raise BundleError(f"{one_line(path / MANIFEST)}: index_shards is malformed; rebuild the bundle with geoloc build-index")
    for name in [*names, shards.get("table")]:
        if name not in manifest["files"]:
            raise BundleError(f"{one_line(path / str(name))}: shard file named by the manifest is not among its "
                              "checksummed files; rebuild the bundle with geoloc build-index")


def _tensors(path: Path, name: str, held: dict[str, bytes]) -> dict[str, np.ndarray]:
    if name not in held:
        raise BundleError(f"{one_line(path / name)}: missing from the bundle; rebuild it with geoloc build-index")
    try:
        return load_tensor_bytes(held[name])
    except (SafetensorError, OSError, ValueError) as err:
        raise BundleError(f"{one_line(path / name)}: cannot be read ({one_line(err)[:200]}); rebuild the bundle") from None


def _check_relative(p: str, where: Path) -> None:
    pure = PurePosixPath(p.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts:
        raise BundleError(f"{where}: record path {p!r} escapes the dataset root; the bundle is not trustworthy, rebuild it")


def _index_ids(index: CellIndex, c: int) -> list[np.ndarray]:
    """Row ids stored in each of the ``c`` inverted lists (ids only: no vector copies where faiss allows)."""
    shards = getattr(index, "shards", None)
    if shards is not None:  # geographic shards: each cell's list lives in its shard (memory-mapped)
        return [np.array(shards.list_view(cc)[0], np.int64) for cc in range(c)]
    ivf = getattr(index, "faiss_index", None)
    inv = getattr(ivf, "invlists", None)
    if inv is not None:
        import faiss

        out = []
        for cc in range(c):
            n = inv.list_size(cc)
            if n == 0:
                out.append(np.empty(0, np.int64))
                continue
            ptr = inv.get_ids(cc)
            out.append(faiss.rev_swig_ptr(ptr, n).astype(np.int64, copy=True))
            inv.release_ids(cc, ptr)
        return out
    return [np.asarray(index.cell_members(cc), np.int64) for cc in range(c)]  # pragma: no cover


def _check_consistency(b: Bundle) -> None:
    """Check the loaded bundle for meaning; raises one :class:`BundleError` line listing the problems.

    Shapes agree (records ``[N]``, cells ``[C]``, projection ``[D, F]``, prototypes ``[C, D]``,
    index N vectors in C lists of dim D); values are finite and in range (lat/lon, UTM, zones,
    cell centres); the cell table is sorted and its fields agree with its keys; every record is
    filed under its own cell when that cell was kept, else under a kept cell of its own zone
    (build_cells files images of dropped cells under the nearest kept cell), and a dropped cell holds
    fewer than ``min_images_per_cell`` records; the index holds
    each row id 0..N-1 exactly once, in the list of the cell the record is filed under.
    """
    m = b.manifest
    n, d, f = len(b.records.paths), int(m["descriptor_dim"]), int(m["feature_dim"])
    t, r = b.table, b.records
    problems: list[str] = []

    def fail() -> None:
        if problems:
            raise BundleError(f"{one_line(b.path)}: inconsistent bundle: {'; '.join(problems)}; rebuild it")

    # shapes first: everything below indexes with them
    c = int(np.shape(t.key)[0]) if np.ndim(t.key) == 1 else -1
    if c < 1:
        problems.append("the cell table holds no cells")
    for name, v in t.to_arrays().items():
        if np.shape(v) != (c,):
            problems.append(f"cell field {name!r} has shape {np.shape(v)}, expected ({c},)")
    for name in _RECORD_FIELDS:
        if np.shape(getattr(r, name)) != (n,):
            problems.append(f"record field {name!r} has shape {np.shape(getattr(r, name))}, expected ({n},)")
    if np.shape(b.filed) != (n,) or not np.issubdtype(np.asarray(b.filed).dtype, np.integer):
        problems.append(f"records.safetensors 'filed' is {np.asarray(b.filed).dtype} {np.shape(b.filed)}, expected ({n},) integers")
    if b.projection is None or np.shape(b.projection) != (d, f):
        problems.append(f"projection shape {np.shape(b.projection)} differs from ({d}, {f}) (descriptor dim, feature dim)")
    p_cells = np.asarray(b.index.prototype_cells)
    p = len(p_cells)
    if b.prototypes is None or np.shape(b.prototypes) != (p, d) or p < c:
        problems.append(f"prototypes shape {np.shape(b.prototypes)} differs from ({p}, {d}) (the index's prototypes, "
                        f"at least one per cell of {c}; descriptor dim)")
    if b.index.ntotal != n or b.index.nlist != c or b.index.dim != d:
        problems.append(f"index holds {b.index.ntotal} vectors in {b.index.nlist} lists of dim {b.index.dim}, "
                        f"expected {n} in {c} of dim {d}")
    if m["cells"].get("count", c) != c or m["database"].get("images", n) != n:
        problems.append(f"manifest counts ({m['cells'].get('count')} cells, {m['database'].get('images')} images) "
                        f"differ from the files ({c}, {n})")
    if m["backbone"]["feature_dim"] != f:
        problems.append(f"backbone feature dim {m['backbone']['feature_dim']} differs from feature_dim {f}")
    fail()

    # values
    if not (np.isfinite(b.projection).all() and np.isfinite(b.prototypes).all()):
        problems.append("model weights hold NaN or infinite values")
    lat, lon = np.asarray(r.lat, np.float64), np.asarray(r.lon, np.float64)
    bad = ~(np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90) & (np.abs(lon) <= 180)
            & np.isfinite(np.asarray(r.east, np.float64)) & np.isfinite(np.asarray(r.north, np.float64))
            & (np.asarray(r.east) >= 0) & (np.asarray(r.north) >= 0) & (np.asarray(r.zone) >= 1) & (np.asarray(r.zone) <= 60))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        problems.append(f"{int(bad.sum())} database positions are not finite or out of range "
                        f"(first: row {i}, lat {lat[i]}, lon {lon[i]}, east {r.east[i]}, north {r.north[i]}, zone {r.zone[i]})")
    cbad = ~(np.isfinite(t.lat) & np.isfinite(t.lon) & (np.abs(t.lat) <= 90) & (np.abs(t.lon) <= 180)
             & np.isfinite(t.east) & np.isfinite(t.north))
    if cbad.any():
        problems.append(f"{int(cbad.sum())} cell centres are not finite or out of range (first: cell {int(np.flatnonzero(cbad)[0])})")
    filed = np.asarray(b.filed, np.int64)
    if n and (filed.min() < 0 or filed.max() >= c):
        problems.append(f"records are filed under cells that do not exist (ids {filed.min()}..{filed.max()}, {c} cells)")
    fail()

    # the cell table agrees with its keys and the scheme
    key = np.asarray(t.key, np.int64)
    size, groups = float(m["cells"]["size_m"]), int(m["cells"]["groups"])
    if c > 1 and np.any(np.diff(key) <= 0):
        problems.append("cell keys are not unique and sorted")
    zone, south, p, q = split_cell_key(key)
    if not (np.array_equal(zone, t.zone) and np.array_equal(south, np.asarray(t.south, bool))
            and np.array_equal(p, t.p) and np.array_equal(q, t.q)):
        problems.append("cell zone/p/q differ from the cell keys")
    elif not (np.allclose(t.east, (p + 0.5) * size) and np.allclose(t.north, (q + 0.5) * size)):
        problems.append(f"cell centres are not the centres of {size:g} m cells")
    if not np.array_equal(t.group, (p % groups) * groups + (q % groups)):
        problems.append(f"cell groups differ from the {groups} x {groups} scheme")
    if not np.array_equal(t.n_images, np.bincount(filed, minlength=c)):
        problems.append("cell image counts differ from the records filed in them")
    fail()

    # every record inside its own cell, or (own cell dropped) under a kept cell of its zone
    try:
        rp, rq = cell_pq(np.asarray(r.east, np.float64), np.asarray(r.north, np.float64), size)
        own = t.lookup(cell_key(r.zone, r.south, rp, rq))
    except ValueError as err:
        problems.append(f"database positions do not fall in any cell ({one_line(err)})")
        fail()
    kept = own >= 0
    wrong = kept & (filed != own)
    if wrong.any():
        i = int(np.flatnonzero(wrong)[0])
        problems.append(f"{int(wrong.sum())} records are filed under another cell than the one holding their "
                        f"position (first: row {i} filed under cell {filed[i]}, lies in cell {own[i]})")
    orphans = np.flatnonzero(~kept)
    if orphans.size:  # a cell is dropped only when it holds fewer than min_images_per_cell records
        _, counts = np.unique(cell_key(r.zone[orphans], r.south[orphans], rp[orphans], rq[orphans]), return_counts=True)
        least = int(m["cells"]["min_images_per_cell"])
        if counts.max() >= least:
            problems.append(f"{int((counts >= least).sum())} dropped cells hold at least {least} records "
                            "(min_images_per_cell), so they would have been kept: the positions were changed")
        zones_kept = {(int(z), bool(s)) for z, s in zip(t.zone, t.south)}
        here = np.array([(int(z), bool(s)) in zones_kept for z, s in zip(r.zone[orphans], r.south[orphans])], bool)
        away = here & ((np.asarray(t.zone)[filed[orphans]] != np.asarray(r.zone)[orphans])
                       | (np.asarray(t.south, bool)[filed[orphans]] != np.asarray(r.south, bool)[orphans]))
        if away.any():
            problems.append(f"{int(away.sum())} records of dropped cells are filed under a cell of another UTM zone")
    fail()

    # the index: ids 0..N-1, each once, in the list of the cell its record is filed under
    lists = _index_ids(b.index, c)
    ids = np.concatenate(lists) if lists else np.empty(0, np.int64)
    where = np.repeat(np.arange(c, dtype=np.int64), [len(x) for x in lists])
    out_of_range = (ids < 0) | (ids >= n)
    if out_of_range.any():
        k = int(np.flatnonzero(out_of_range)[0])
        problems.append(f"index list {int(where[k])} holds row ids outside 0..{n - 1} (e.g. {int(ids[k])})")
        fail()
    seen = np.bincount(ids, minlength=n)
    if ids.size != n or np.any(seen != 1):
        problems.append(f"index row ids are not each present once ({int((seen > 1).sum())} repeated, "
                        f"{int((seen == 0).sum())} absent)")
    elif np.any(filed[ids] != where):
        problems.append(f"index list {int(where[np.flatnonzero(filed[ids] != where)[0]])} holds rows filed under another cell")
    fail()


def check_backbone(manifest: dict[str, Any], backbone_info: dict[str, Any], *, where: Path) -> None:
    """Refuse a bundle whose backbone differs from the one in hand, naming what differs."""
    want = manifest["backbone"]
    diffs = [f"{k}: bundle {want.get(k)!r} vs requested {backbone_info.get(k)!r}"
             for k in ("name", "input_size", "feature_dim", "fingerprint") if want.get(k) != backbone_info.get(k)]
    if diffs:
        raise BundleError(f"{where}: built with another backbone ({'; '.join(diffs)}); "
                          "query with the bundle's own backbone or rebuild the bundle")
