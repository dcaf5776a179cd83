"""Input checks of the index: shapes, dtypes, normalisation, id ranges (one ``ValueError`` line each)."""

from __future__ import annotations

import numpy as np

__all__ = ["NORM_TOL", "check_cells", "check_k", "check_matrix", "check_neighbours", "check_prototype_cells"]

NORM_TOL = 1e-3
"""Largest accepted deviation of a row norm from 1 for inputs that must be L2-normalised."""


def check_matrix(name: str, x: np.ndarray, dim: int | None = None, *, normalised: bool = False) -> np.ndarray:
    """Validate a ``[n, D]`` float matrix and return it as C-contiguous float32 ``[n, D]``."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [n, D]; got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name} must be float32 (L2-normalised descriptors); got dtype {x.dtype}")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name} has dimension {x.shape[1]} but the index holds {dim}-D vectors")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if normalised and x.size:
        if not np.isfinite(x).all():
            raise ValueError(f"{name} holds NaN or infinite values")
        norms = np.linalg.norm(x, axis=1)
        bad = np.flatnonzero(np.abs(norms - 1.0) > NORM_TOL)
        if bad.size:
            raise ValueError(
                f"{name} must be L2-normalised; row {bad[0]} has norm {norms[bad[0]]:.4f} "
                f"({bad.size} rows off by more than {NORM_TOL}); divide each row by its norm first"
            )
    return x


def check_k(name: str, k: int) -> int:
    """A positive integer count (``top_cells``, ``k``)."""
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"{name} must be a positive integer; got {k!r}")
    return int(k)


def check_cells(name: str, cells: np.ndarray, n: int, n_cells: int, what: str) -> np.ndarray:
    """``[n]`` integer ids in ``0..n_cells-1`` -> ``[n]`` int64; ``what`` names the rows ("descriptor")."""
    cells = np.asarray(cells)
    if cells.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}] (one cell id per {what}); got {cells.shape}")
    if n and not np.issubdtype(cells.dtype, np.integer):
        raise ValueError(f"{name} must hold integer cell ids; got dtype {cells.dtype}")
    cells = np.ascontiguousarray(cells, dtype=np.int64)
    if n and (cells.min() < 0 or cells.max() >= n_cells):
        bad = int(np.flatnonzero((cells < 0) | (cells >= n_cells))[0])
        raise ValueError(
            f"{name}[{bad}] = {cells[bad]} is out of range: there are {n_cells} cells, so cell ids must lie in 0..{n_cells - 1}"
        )
    return cells


def check_prototype_cells(prototype_cells: np.ndarray | None, p: int) -> tuple[np.ndarray | None, int]:
    """``[P]`` cell of each prototype (None: prototype ``c`` is cell ``c``) -> (``[P]`` int64 or None, C).

    ``C = max(prototype_cells) + 1``; every cell ``0..C-1`` must own at least one prototype.
    """
    if prototype_cells is None:
        return None, p
    pc = check_cells("prototype_cells", prototype_cells, p, np.iinfo(np.int64).max, "prototype")
    c = int(pc.max()) + 1
    missing = np.flatnonzero(np.bincount(pc, minlength=c) == 0)
    if missing.size:
        raise ValueError(f"prototype_cells gives cell {missing[0]} no prototype ({missing.size} cells of 0..{c - 1} have none); "
                         "every cell needs at least one prototype")
    return pc, c


def check_neighbours(neighbours: np.ndarray | None, c: int) -> np.ndarray | None:
    """Validate a ``[C, 8]`` integer neighbour table (-1 = none) -> ``[C, 8]`` int64 or None."""
    if neighbours is None:
        return None
    nb = np.asarray(neighbours)
    if nb.ndim != 2 or nb.shape[0] != c or not np.issubdtype(nb.dtype, np.integer):
        raise ValueError(f"neighbours must be an integer array [C, 8] with C = {c}; got {nb.dtype} {nb.shape}")
    if nb.size and (nb.min() < -1 or nb.max() >= c):
        raise ValueError(f"neighbours holds cell ids outside -1..{c - 1}")
    return np.ascontiguousarray(nb, dtype=np.int64)
