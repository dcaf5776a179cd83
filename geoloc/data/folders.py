"""Folders: which folder a source and split name (the layouts), which images it holds (a
recursive walk, or the VPR-methods-evaluation file list), and their labels (VPR name or EXIF).

**Layouts.** With ``split`` (``"database"`` or ``"queries"``) a folder is read as follows:

1. it holds a ``<split>/`` subfolder: that subfolder (a dataset root; paths start with ``<split>/``);
2. it holds the other split's subfolder only: refused (``eval --queries root`` on a root with
   ``database/`` but no ``queries/`` would silently evaluate on the database);
3. otherwise: the folder itself, whatever its name (SF-XL ``queries_v1``, SVOX ``gallery``,
   a plain folder of photos).

Without ``split`` the folder itself is read, unless it holds both ``database/`` and ``queries/``.

**File list.** As in VPR-methods-evaluation, ``<folder>_images_paths.txt`` next to a folder
lists its images, one path per line relative to the folder; when present it replaces the walk
(large trees), and every listed file must exist as a regular file.
"""

from __future__ import annotations

import logging
import os
import posixpath
from pathlib import Path
from typing import Literal

import numpy as np

from geoloc.data.exif import read_exif
from geoloc.data.fields import UtmZone
from geoloc.data.files import IMAGE_EXTENSIONS, MAX_LINE_CHARS, one_line, one_line_errors, read_text_lines
from geoloc.data.vpr import VPR_FORMAT, is_vpr_name, vpr_positions
from geoloc.errors import DatasetError
from geoloc.geo import latlon_to_utm
from geoloc.records import Records

log = logging.getLogger("geoloc.data")

SPLITS = ("database", "queries")

FILE_LIST_SUFFIX = "_images_paths.txt"

MAX_LIST_BYTES = 4 << 30
"""Largest accepted file list (about 40 million paths)."""

ACCEPTED_LAYOUTS = ("accepted: a dataset root holding database/ and queries/, any folder of VPR-named "
                    "(@east@north@...) or EXIF-GPS images (searched recursively), or a CSV with a path column "
                    "and lat,lon or UTM columns (optionally a split column)")


def resolve_layout(src: Path, split: str | None) -> tuple[Path, str]:
    """The folder to read for ``split`` (see the module docstring) and the prefix of its paths
    relative to ``src``."""
    has = {s: (src / s).is_dir() for s in SPLITS}
    if split is None:
        if all(has.values()):
            raise DatasetError(f"{src}: holds both database/ and queries/; pass split='database' or "
                               "split='queries' (or point at one of those folders)")
        return src, ""
    if has[split]:
        return src / split, split + "/"
    other = next(s for s in SPLITS if s != split)
    if has[other]:
        try:
            with os.scandir(src) as it:
                subs = sorted(e.name + "/" for e in it if not e.name.startswith(".") and e.is_dir())
        except OSError:
            subs = []
        raise DatasetError(f"{src}: holds {other}/ but no {split}/; point at the {split} folder itself "
                           f"(subfolders here: {', '.join(subs[:8])})")
    return src, ""


def file_list_path(folder: Path) -> Path:
    """``<folder>_images_paths.txt``, next to the folder (VPR-methods-evaluation's name)."""
    return Path(os.path.abspath(folder) + FILE_LIST_SUFFIX)


@one_line_errors
def list_images(folder: Path) -> list[str]:
    """Image files under ``folder`` (recursive, following links once), as sorted POSIX paths
    relative to it. Hidden files and folders (``.name``) are skipped, and so is anything with an
    image suffix that is not a regular file (a FIFO, a device: one warning)."""
    out: list[str] = []
    odd: list[str] = []
    seen: set[tuple[int, int]] = set()
    stack = [("", str(folder))]
    while stack:
        rel, d = stack.pop()
        try:
            st = os.stat(d)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            it = os.scandir(d)
        except OSError as err:
            raise DatasetError(f"{d}: cannot list folder ({err.strerror})") from None
        with it:
            for e in it:
                name = e.name
                if name.startswith("."):
                    continue
                try:
                    if e.is_dir():
                        stack.append((rel + name + "/", e.path))
                    elif name[name.rfind("."):].lower() in IMAGE_EXTENSIONS and "." in name:
                        (out if e.is_file() else odd).append(rel + name)
                except OSError:
                    continue
    if odd:
        log.warning("%s: skipped %d image-named entries that are not regular files, e.g. %s",
                    one_line(str(folder)), len(odd), one_line(", ".join(odd[:3])))
    out.sort()
    return out


def read_file_list(list_path: Path, folder: Path) -> list[str]:
    """Sorted POSIX paths relative to ``folder`` from a file list (one per line; blank lines
    ignored). Every entry must stay inside ``folder`` and be an existing regular file (checked
    with one ``scandir`` per listed folder, not one ``stat`` per image).

    Raises:
        DatasetError: one line naming the list file and line.
    """
    with read_text_lines(list_path, what="file list") as f:
        if os.fstat(f.fileno()).st_size > MAX_LIST_BYTES:
            raise DatasetError(f"{list_path}: larger than {MAX_LIST_BYTES >> 30} GiB; not a list of image paths")
        lines = f.read().split("\n")
    line_of: dict[str, int] = {}
    for lineno, entry in enumerate(lines, 1):
        entry = entry.rstrip("\r")
        if len(entry) > MAX_LINE_CHARS:
            raise DatasetError(f"{list_path}: line {lineno}: longer than {MAX_LINE_CHARS} characters; "
                               "not a list of image paths")
        if not entry.strip():
            continue
        rel = entry if _plain_relative(entry) else posixpath.normpath(entry.replace("\\", "/").lstrip("/"))
        if rel in (".", "..") or rel.startswith("../"):
            raise DatasetError(f"{list_path}: line {lineno}: {entry!r} is outside {folder}; "
                               "entries are paths relative to the folder")
        if rel in line_of:
            raise DatasetError(f"{list_path}: line {lineno}: {entry!r} is listed twice (also line {line_of[rel]})")
        line_of[rel] = lineno
    if not line_of:
        raise DatasetError(f"{list_path}: lists no images; regenerate or delete it")
    names: dict[str, frozenset[str]] = {}
    for rel, lineno in line_of.items():  # in line order: the first stale line is named
        sub, _, name = rel.rpartition("/")
        if sub not in names:
            names[sub] = _regular_names(os.path.join(folder, sub))
        if name not in names[sub]:
            raise DatasetError(f"{list_path}: line {lineno}: {rel!r} is not a file under {folder}; "
                               "the list is stale: regenerate or delete it")
    return sorted(line_of)


def _plain_relative(entry: str) -> bool:
    """True when ``entry`` needs no normalisation (the common case, checked without ``normpath``)."""
    return not (entry.startswith(("/", ".")) or entry.endswith("/") or "/." in entry or "//" in entry
                or "\\" in entry)


def _regular_names(path: str) -> frozenset[str]:
    """Names of the regular files (links followed) in one folder; empty when it cannot be listed."""
    try:
        with os.scandir(path) as it:
            return frozenset(e.name for e in it if e.is_file())
    except OSError:
        return frozenset()


def folder_images(folder: Path) -> list[str]:
    """:func:`read_file_list` when ``<folder>_images_paths.txt`` exists, else :func:`list_images`."""
    lst = file_list_path(folder)
    if lst.exists():
        log.info("%s: image paths read from %s", one_line(str(folder)), one_line(str(lst)))
        return read_file_list(lst, folder)
    return list_images(folder)


def folder_records(
    folder: Path, root: Path, prefix: str, *, on_missing_label: Literal["error", "skip"] = "error",
    utm_zone: UtmZone | None = None, source: str = "",
) -> Records:
    """Records of the images in ``folder`` (paths ``prefix + relative path``, rooted at ``root``).

    A name in the VPR convention (it starts with ``@``) is the label and must parse; any other
    image must carry EXIF GPS, or with ``on_missing_label="skip"`` is left out (one warning).
    """
    names = folder_images(folder)
    if not names:
        raise DatasetError(f"{folder}: no images found (looked recursively for "
                           f"{', '.join(sorted(IMAGE_EXTENSIONS))}); {ACCEPTED_LAYOUTS}")
    n = len(names)
    base = [p.rsplit("/", 1)[-1] for p in names]
    is_vpr = np.fromiter(map(is_vpr_name, base), dtype=bool, count=n)
    cols = {"lat": np.full(n, np.nan), "lon": np.full(n, np.nan), "east": np.zeros(n), "north": np.zeros(n),
            "zone": np.zeros(n, dtype=np.int16), "south": np.zeros(n, dtype=bool), "heading": np.full(n, np.nan)}
    vi = np.flatnonzero(is_vpr)
    if vi.size:
        pos = vpr_positions([base[i] for i in vi], where=lambda k: folder / names[vi[k]], has_ext=True,
                            utm_zone=utm_zone)
        for k, v in cols.items():
            v[vi] = getattr(pos, k)
    keep = np.ones(n, dtype=bool)
    _exif_labels(folder, names, np.flatnonzero(~is_vpr), cols, keep, on_missing_label=on_missing_label)
    idx = np.flatnonzero(keep)
    return Records([prefix + names[i] for i in idx], *(cols[k][idx] for k in ("lat", "lon", "east", "north", "zone",
                                                                              "south")),
                   cols["heading"][idx].astype(np.float32), root, source or str(folder))


def _exif_labels(folder: Path, names: list[str], rows: np.ndarray, cols: dict[str, np.ndarray], keep: np.ndarray,
                 *, on_missing_label: str) -> None:
    """Fill ``cols`` at ``rows`` from EXIF GPS; clear ``keep`` for unlabelled images when skipping."""
    missing: list[str] = []
    got: list[int] = []
    for i in rows:
        pos, heading = read_exif(folder / names[i])
        if pos is None:
            if on_missing_label != "skip":
                raise DatasetError(f"{folder / names[i]}: no location label: the name is not in the VPR convention "
                                   f"({VPR_FORMAT}) and the file has no EXIF GPS; rename it, add GPS, "
                                   "or pass on_missing_label='skip'")
            keep[i] = False
            missing.append(names[i])
            continue
        (cols["lat"][i], cols["lon"][i]), cols["heading"][i] = pos, heading
        got.append(int(i))
    if got:
        g = np.asarray(got)
        cols["east"][g], cols["north"][g], cols["zone"][g], cols["south"][g] = latlon_to_utm(cols["lat"][g],
                                                                                             cols["lon"][g])
    if missing:
        log.warning("%s: skipped %d image(s) with no location label (neither a VPR name nor EXIF GPS), e.g. %s",
                    one_line(str(folder)), len(missing), one_line(", ".join(missing[:3])))
    if not keep.any():
        raise DatasetError(f"{folder}: none of the {len(keep)} images has a location label (VPR name or EXIF GPS)")
