"""Files of a cell index; no pickle (``faiss.write_index``, ``np.save(allow_pickle=False)``).

* ``index.faiss``: the CPU ``IndexIVFFlat``; its quantizer is the cell scorer's FAISS index
  over the ``P`` prototypes (so the scorer is saved and loaded with it).
* ``cell_neighbours.npy``: ``[C, 8]`` int64 neighbour table, when the index has one.
* ``prototype_cells.npy``: ``[P]`` int64 cell of each prototype, only when a cell has several
  prototypes (absent: ``P == C`` and prototype ``c`` is cell ``c``, the format of older bundles).

Every read failure is a one-line :class:`geoloc.errors.BundleError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from geoloc.errors import BundleError
from geoloc.index.checks import check_neighbours, check_prototype_cells

__all__ = ["INDEX_FILE", "NEIGHBOURS_FILE", "PROTOTYPE_CELLS_FILE", "load_index", "save_index"]

INDEX_FILE = "index.faiss"
NEIGHBOURS_FILE = "cell_neighbours.npy"
PROTOTYPE_CELLS_FILE = "prototype_cells.npy"


def save_index(folder: Path, ivf: faiss.IndexIVFFlat, *, neighbours: np.ndarray | None,
               prototype_cells: np.ndarray | None) -> list[Path]:
    """Write the index files into ``folder`` (created); stale optional files are removed.

    Args:
        ivf: the CPU index. neighbours: ``[C, 8]`` int64 or None. prototype_cells: ``[P]`` int64 or None.
    Returns:
        The paths written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / INDEX_FILE
    faiss.write_index(ivf, str(path))
    written = [path]
    for name, arr in ((NEIGHBOURS_FILE, neighbours), (PROTOTYPE_CELLS_FILE, prototype_cells)):
        p = folder / name
        if arr is not None:
            np.save(p, arr, allow_pickle=False)
            written.append(p)
        elif p.exists():
            p.unlink()
    return written


def _read_array(path: Path, what: str) -> np.ndarray | None:
    if not path.exists():
        return None
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise BundleError(f"{path}: {what} is unreadable ({str(err)[:120]}); rebuild the bundle") from None


def load_index(folder: Path) -> tuple[faiss.IndexIVFFlat, np.ndarray | None, np.ndarray | None]:
    """Read what :func:`save_index` wrote.

    Returns:
        ivf: the CPU ``IndexIVFFlat`` (C lists, quantizer over P prototypes).
        neighbours: ``[C, 8]`` int64 or None. prototype_cells: ``[P]`` int64 or None (identity).
    Raises:
        BundleError: one line naming the file when it is missing, truncated or not a cell index.
    """
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not path.is_file():
        raise BundleError(f"{path}: index file not found; rebuild the bundle with `geoloc build-index`")
    try:
        ivf = faiss.read_index(str(path))
    except (RuntimeError, MemoryError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BundleError(f"{path}: index file is truncated or corrupt ({first[:120]}); rebuild the bundle") from None
    if not isinstance(ivf, (faiss.IndexIVFFlat, faiss.IndexIVFScalarQuantizer, faiss.IndexIVFPQ)) or ivf.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise BundleError(f"{path}: not a geoloc cell index (found {type(ivf).__name__}); rebuild the bundle")
    c, p = int(ivf.nlist), int(ivf.quantizer.ntotal)
    pc_path = folder / PROTOTYPE_CELLS_FILE
    prototype_cells = _read_array(pc_path, "prototype-to-cell table")
    if prototype_cells is None and p != c:
        raise BundleError(f"{path}: quantizer holds {p} prototypes for {c} cells and {pc_path.name} is missing; rebuild the bundle")
    if prototype_cells is not None:
        try:
            prototype_cells, c_pc = check_prototype_cells(prototype_cells, p)
        except ValueError as err:
            raise BundleError(f"{pc_path}: {err}; rebuild the bundle") from None
        if c_pc != c:
            raise BundleError(f"{pc_path}: maps prototypes to {c_pc} cells but {path.name} has {c} lists; rebuild the bundle")
    nb_path = folder / NEIGHBOURS_FILE
    neighbours = _read_array(nb_path, "neighbour table")
    try:
        neighbours = check_neighbours(neighbours, c)
    except ValueError as err:
        raise BundleError(f"{nb_path}: neighbour table is unreadable ({str(err)[:120]}); rebuild the bundle") from None
    return ivf, neighbours, prototype_cells
