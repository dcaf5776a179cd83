"""Geographic shards of the inverted lists: each shard its own FAISS file, opened memory-mapped.

With ``index.shards = S > 1`` the C cell lists are split into S shards of whole cells
(:func:`plan_shards`: cells in key order, i.e. UTM zone and hemisphere, then easting strips,
then northing, cut into contiguous runs of about equal vector counts, so each shard is a compact
area). The files of a sharded index::

    index.faiss          the cell scorer (quantizer over the P prototypes) and the trained codec;
                         its C lists are empty
    shard_cells.npy      [C] int64 shard of each cell
    shard-0000.faiss ..  one IVF per shard: list j is the j-th cell of the shard in cell-id order
                         (local numbering), stored ids are database row ids; its own quantizer is
                         an empty placeholder

A query is scored once against the prototypes (one place, one scorer); its lists (top cells and
their rings) are mapped to the shards that own them, and only those lists are read. On one host
the shards' lists are chained into one searchable view without copying (FAISS's
``VStackInvertedLists``: shard 0's lists, then shard 1's, ...), so a query over lists of three
shards is still one ``search_preassigned`` call with the unsharded index's kernel, list order
and heap: the answers are the unsharded index's, bit for bit. :meth:`ShardSet.search_routed` is
the fan-out form a front would use with shards on other hosts (:meth:`ShardSet.route` splits the
lists by shard, each shard is searched alone, the per-shard top-k are merged; same answers up to
the order of exactly equal scores). Retrieve scans every list of the view.

Shards are read with ``faiss.IO_FLAG_MMAP_IFC`` (``index.mmap``, the default): the lists stay
``ArrayInvertedLists`` whose buffers point into a read-only mapping of the file, so the search
kernel is the in-memory one and pages are read on first touch; an index larger than memory
still answers. FAISS's older ``IO_FLAG_MMAP`` (``OnDiskInvertedLists`` over the same file)
works too and is the fallback.

Shards can be built independently (:func:`empty_shard` + :func:`geoloc.index.lists.add_rows_ids`
+ :func:`write_shard`, e.g. one Ray task per shard: ``benchmarks/scale.py``) and assembled with
:func:`save_sharded`. Design and multi-host form: ``docs/sharding.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np

from geoloc.errors import BundleError
from geoloc.index import lists as L
from geoloc.index.retrieve import ListScan

__all__ = [
    "SHARD_CELLS_FILE",
    "ShardSet",
    "empty_shard",
    "plan_shards",
    "read_shard",
    "save_sharded",
    "save_sharded_main",
    "shard_file",
    "write_shard",
]

SHARD_CELLS_FILE = "shard_cells.npy"
"""``[C]`` int64 shard of each cell; present only in a sharded index."""


def shard_file(s: int) -> str:
    """File name of shard ``s`` (``shard-0007.faiss``)."""
    return f"shard-{int(s):04d}.faiss"


def plan_shards(sizes: np.ndarray, n_shards: int, *, order: np.ndarray | None = None) -> np.ndarray:
    """Which shard owns each cell: the cells in ``order`` cut into contiguous runs of about equal vector counts.

    Args:
        sizes: ``[C]`` int64 vectors per cell.
        n_shards: shards wanted; fewer come back when there are fewer cells (every shard owns >= 1 cell).
        order: ``[C]`` int64 permutation of the cells, geographic (default: cell-id order, which
            is :class:`geoloc.cells.CellTable` key order: zone and hemisphere, then easting, northing).
    Returns:
        ``[C]`` int64 shard of each cell, ``0..S-1``, every shard non-empty in cells.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    c = len(sizes)
    if c == 0:
        return np.zeros(0, np.int64)
    order = np.arange(c, dtype=np.int64) if order is None else np.asarray(order, dtype=np.int64)
    if order.shape != (c,) or not np.array_equal(np.sort(order), np.arange(c)):
        raise ValueError("order must be a permutation of the cell ids")
    s = max(1, min(int(n_shards), c))
    w = sizes[order].astype(np.float64) + 1e-6  # empty cells still count a little
    mid = np.cumsum(w) - w / 2  # a cell goes to the shard its middle vector falls in
    pos = np.minimum((mid * s / w.sum()).astype(np.int64), s - 1)
    _, pos = np.unique(pos, return_inverse=True)  # a shard left without cells (a huge cell) is dropped
    owner = np.empty(c, np.int64)
    owner[order] = pos
    return owner


def empty_shard(template: faiss.IndexIVF, n_lists: int) -> faiss.IndexIVF:
    """An empty IVF with ``n_lists`` lists and the trained codec of ``template`` (same codes, bit for bit);
    its quantizer is an empty placeholder (shards are only searched with preassigned lists)."""
    template = faiss.downcast_index(template)
    codec = L.codec_of(template)
    d = int(template.d)
    pq_m = int(template.pq.M) if codec == "pq" else 0
    shard = L.empty_ivf(faiss.IndexFlatIP(d), d, max(1, int(n_lists)), codec=codec, pq_m=pq_m)
    if codec == "sq8":
        shard.sq = template.sq
    elif codec == "pq":
        shard.pq = template.pq
    shard.is_trained = True
    return shard


def write_shard(shard: faiss.IndexIVF, path: Path) -> Path:
    """Write one shard file (``faiss.write_index``; no pickle); returns ``path``."""
    faiss.write_index(shard, str(path))
    return Path(path)


def read_shard(path: Path, *, mmap: bool = True) -> faiss.IndexIVF:
    """Read one shard file, memory-mapped when ``mmap`` (``IO_FLAG_MMAP_IFC``, else ``IO_FLAG_MMAP``).

    Raises:
        BundleError: one line naming the file when it is missing, truncated or not an IVF.
    """
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"{path}: shard file not found; rebuild the bundle with `geoloc build-index`")
    flags = (faiss.IO_FLAG_MMAP_IFC, faiss.IO_FLAG_MMAP) if mmap else (0,)
    err: Exception | None = None
    for flag in flags:
        try:
            ivf = faiss.read_index(str(path), flag)
            break
        except (RuntimeError, MemoryError) as e:
            err = e
    else:
        first = str(err).strip().splitlines()[0] if err is not None and str(err).strip() else type(err).__name__
        raise BundleError(f"{path}: shard file is truncated or corrupt ({first[:120]}); rebuild the bundle") from None
    if not isinstance(ivf, faiss.IndexIVF):
        raise BundleError(f"{path}: not a geoloc shard (found {type(ivf).__name__}); rebuild the bundle")
    return ivf


def save_sharded(folder: Path, owner: np.ndarray) -> Path:
    """Write ``shard_cells.npy`` (``owner`` ``[C]`` int64) into ``folder``; returns its path."""
    path = Path(folder) / SHARD_CELLS_FILE
    np.save(path, np.ascontiguousarray(owner, dtype=np.int64), allow_pickle=False)
    return path


def save_sharded_main(folder: Path, *, quantizer: faiss.Index, template: faiss.IndexIVF, owner: np.ndarray,
                      neighbours: np.ndarray | None, prototype_cells: np.ndarray | None = None) -> list[Path]:
    """Write the non-shard files of a sharded index whose shards were built and written one by one
    (:func:`empty_shard`, :func:`write_shard` as ``shard_file(s)``, e.g. one task each).

    Args:
        quantizer: the cell scorer's FAISS index over the ``P`` prototypes (e.g.
            ``SCORERS[name].make(prototypes, config)``); the written IVF owns it from now on.
        template: an IVF with the trained codec the shards were encoded with.
        owner: ``[C]`` int64 shard of each cell. neighbours: ``[C, 8]`` int64 or None.
        prototype_cells: ``[P]`` int64 or None (``P == C``).
    Returns:
        The paths written (``index.faiss``, ``shard_cells.npy``, ...); load with
        :meth:`geoloc.index.CellIndex.load`.
    """
    from geoloc.index.io import save_index

    template = faiss.downcast_index(template)
    codec = L.codec_of(template)
    owner = np.asarray(owner, dtype=np.int64)
    main = L.empty_ivf(quantizer, int(template.d), len(owner), codec=codec,
                       pq_m=int(template.pq.M) if codec == "pq" else 0)
    if codec == "sq8":
        main.sq = template.sq
    elif codec == "pq":
        main.pq = template.pq
    main.is_trained = True
    written = save_index(folder, main, neighbours=neighbours, prototype_cells=prototype_cells)
    written.append(save_sharded(folder, owner))
    return written


def _remove_stale(folder: Path, keep: int) -> None:
    """Remove shard files numbered ``keep`` and up that an earlier save of an index left in
    ``folder``; only names of the exact form :func:`shard_file` writes are touched."""
    for p in Path(folder).glob("shard-*.faiss"):
        stem = p.name[len("shard-"):-len(".faiss")]
        if stem.isdigit() and len(stem) >= 4 and p.name == shard_file(int(stem)) and int(stem) >= keep:
            p.unlink()


class ShardSet:
    """The lists of a sharded index: S IVFs with local list numbers, routed by cell.

    Args:
        ivfs: S IVFs (any codec, all the same); shard ``s``'s list ``j`` is its ``j``-th cell in id order.
        owner: ``[C]`` int64 shard of each cell.
        blas_min_batch: retrieve over flat shards: BLAS blocks from this batch size on.
        paths: the shard files (memory-mapped ones), for :meth:`drop_cache` and reports.
    Raises:
        ValueError: a shard whose list count differs from the cells ``owner`` gives it.
    """

    def __init__(self, ivfs: list[faiss.IndexIVF], owner: np.ndarray, *, blas_min_batch: int,
                 paths: list[Path] | None = None) -> None:
        self._owners = list(ivfs)  # the proxies that own the C++ indexes
        self.ivfs = [faiss.downcast_index(i) for i in ivfs]
        self.owner = np.asarray(owner, dtype=np.int64)
        self.paths = list(paths or [])
        c = len(self.owner)
        s = len(self.ivfs)
        self.cells = [np.flatnonzero(self.owner == i) for i in range(s)]
        if c and (self.owner.min() < 0 or self.owner.max() >= s):
            raise ValueError(f"shard table names shards outside 0..{s - 1}")
        local = np.zeros(c, np.int64)
        for i, cells in enumerate(self.cells):
            if int(self.ivfs[i].nlist) != max(1, len(cells)):
                raise ValueError(f"shard {i} has {self.ivfs[i].nlist} lists but owns {len(cells)} cells")
            local[cells] = np.arange(len(cells))
        # a trailing -1 so that list -1 (padding) maps to shard -1 / local -1
        self._owner_x = np.append(self.owner, -1)
        self._local_x = np.append(local, -1)
        self.ntotal = int(sum(int(i.ntotal) for i in self.ivfs))
        self.code_size = int(self.ivfs[0].code_size) if s else 0
        self.mapped = bool(self.paths)
        # One searchable view over every shard: FAISS's VStackInvertedLists chains the shards'
        # lists (shard 0's, then shard 1's, ...) without copying, so a batch over lists of several
        # shards is one search_preassigned call; cell c is list _vpos[c] of the view.
        starts = np.cumsum([0] + [int(i.nlist) for i in self.ivfs])
        self._vpos_x = np.append(starts[self.owner] + local, -1)
        self._ptrs = faiss.InvertedListsPtrVector()
        for ivf in self.ivfs:
            self._ptrs.push_back(ivf.invlists)
        self._vstack = faiss.VStackInvertedLists(self._ptrs.size(), self._ptrs.data())
        self.view = empty_shard(self.ivfs[0], int(starts[-1]))
        self.view.replace_invlists(self._vstack, False)
        self.view.ntotal = self.ntotal
        self._scan = ListScan(self.view, blas_min_batch)

    def __len__(self) -> int:
        return len(self.ivfs)

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def split(cls, ivf: faiss.IndexIVF, owner: np.ndarray, *, blas_min_batch: int) -> ShardSet:
        """Move the lists of a filled IVF into shards (codes copied as they are, ids kept); ``ivf``'s
        own lists are emptied. owner: ``[C]`` int64 (:func:`plan_shards`)."""
        ivf = faiss.downcast_index(ivf)
        owner = np.asarray(owner, dtype=np.int64)
        s = int(owner.max()) + 1 if len(owner) else 1
        shards = []
        for i in range(s):
            cells = np.flatnonzero(owner == i)
            sh = empty_shard(ivf, len(cells))
            n = 0
            for j, c in enumerate(cells):
                ids, codes = L.list_view(ivf, int(c))
                if len(ids):
                    ids = np.ascontiguousarray(ids)
                    codes = np.ascontiguousarray(codes)
                    sh.invlists.add_entries(j, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
                    n += len(ids)
            sh.ntotal = n
            shards.append(sh)
        il = faiss.ArrayInvertedLists(int(ivf.nlist), int(ivf.code_size))
        ivf.replace_invlists(il, True)
        il.this.disown()
        ivf.ntotal = 0
        return cls(shards, owner, blas_min_batch=blas_min_batch)

    def save(self, folder: Path) -> list[Path]:
        """Write ``shard_cells.npy`` and every ``shard-NNNN.faiss`` into ``folder``; stale shard files go."""
        folder = Path(folder)
        _remove_stale(folder, len(self))
        written = [save_sharded(folder, self.owner)]
        for i, ivf in enumerate(self.ivfs):
            written.append(write_shard(ivf, folder / shard_file(i)))
        return written

    @staticmethod
    def remove_files(folder: Path) -> None:
        """Remove the shard files of ``folder`` (an unsharded index is being saved there)."""
        _remove_stale(folder, 0)
        p = Path(folder) / SHARD_CELLS_FILE
        if p.exists():
            p.unlink()

    @classmethod
    def load(cls, folder: Path, *, main: faiss.IndexIVF, blas_min_batch: int, mmap: bool = True) -> ShardSet | None:
        """The shards of ``folder`` (None when it holds an unsharded index); checked against ``main``
        (the ``index.faiss`` IVF: lists, dims, codec).

        Raises:
            BundleError: one line naming the file that is missing, corrupt or does not fit.
        """
        folder = Path(folder)
        table = folder / SHARD_CELLS_FILE
        if not table.exists():
            return None
        try:
            owner = np.load(table, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise BundleError(f"{table}: shard table is unreadable ({str(err)[:120]}); rebuild the bundle") from None
        if owner.dtype != np.int64 or owner.shape != (int(main.nlist),) or (len(owner) and owner.min() < 0):
            raise BundleError(f"{table}: shard table does not fit the {main.nlist} cells of index.faiss; rebuild the bundle")
        s = int(owner.max()) + 1 if len(owner) else 1
        codec = L.codec_of(main)
        ivfs, paths = [], []
        for i in range(s):
            path = folder / shard_file(i)
            ivf = read_shard(path, mmap=mmap)
            if int(ivf.d) != int(main.d) or L.codec_of(ivf) != codec or int(ivf.code_size) != int(faiss.downcast_index(main).code_size):
                raise BundleError(f"{path}: shard's dimension or codec differs from index.faiss; rebuild the bundle")
            ivfs.append(ivf)
            paths.append(path)
        try:
            return cls(ivfs, owner, blas_min_batch=blas_min_batch, paths=paths if mmap else None)
        except ValueError as err:
            raise BundleError(f"{folder}: {err}; rebuild the bundle") from None

    # -- contents -------------------------------------------------------------------------
    def list_sizes(self) -> np.ndarray:
        """``[C + 1]`` int64 vectors per cell and a trailing 0 (for list -1)."""
        out = np.zeros(len(self.owner) + 1, np.int64)
        for cells, ivf in zip(self.cells, self.ivfs):
            out[cells] = L.list_sizes(ivf)[: len(cells)]
        return out

    def list_view(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        """Cell ``c``'s list in place: ids ``[n_c]`` int64 and codes ``[n_c, code_size]`` uint8."""
        return L.list_view(self.ivfs[int(self.owner[c])], int(self._local_x[c]))

    def cell_members(self, c: int) -> np.ndarray:
        """Row ids filed in cell ``c``; ``[n_c]`` int64."""
        c = int(c)
        if not 0 <= c < len(self.owner):
            raise ValueError(f"cell {c} is out of range 0..{len(self.owner) - 1}")
        return L.cell_members(self.ivfs[int(self.owner[c])], int(self._local_x[c]))

    def all_vectors(self, d: int) -> tuple[np.ndarray, np.ndarray]:
        """All rows in row-id order: ``[N, D]`` float32 (decoded) and ``[N]`` int64 cell of each row."""
        out = np.empty((self.ntotal, d), np.float32)
        cell = np.full(self.ntotal, -1, np.int64)
        for cells, ivf in zip(self.cells, self.ivfs):
            for j, c in enumerate(cells):
                ids, codes = L.list_view(ivf, j)
                if len(ids):
                    out[ids] = L.decode(ivf, codes)
                    cell[ids] = c
        return out, cell

    def shards_touched(self, lists: np.ndarray) -> np.ndarray:
        """``[B]`` int64 distinct shards owning the lists ``[B, W]`` (-1 = none) of each query."""
        own = self._owner_x[lists]
        if own.size == 0:
            return np.zeros(len(lists), np.int64)
        srt = np.sort(own, axis=1)
        first = np.ones_like(srt, dtype=bool)
        first[:, 1:] = srt[:, 1:] != srt[:, :-1]
        return (first & (srt >= 0)).sum(axis=1).astype(np.int64)

    # -- search ---------------------------------------------------------------------------
    def route(self, lists: np.ndarray, extra: np.ndarray | None = None
              ) -> list[tuple[int, np.ndarray | None, np.ndarray, np.ndarray | None]]:
        """Split each query's lists by shard.

        Args:
            lists: ``[B, W]`` int64 cell ids, -1 = skip. extra: ``[B, W]`` values that travel with
                the lists (the fused bonus), or None.
        Returns:
            Per touched shard ``(s, rows, local, extra_s)``: ``rows`` ``[b_s]`` int64 queries that
            touch it (None: all ``B``), ``local`` ``[b_s, w_s]`` int64 its local list numbers
            (-1 padded, left-compacted), ``extra_s`` ``[b_s, w_s]`` (None when ``extra`` is None).
        """
        own = self._owner_x[lists]
        loc = self._local_x[lists]
        b = len(lists)
        touched = np.unique(own[own >= 0])
        out = []
        for s in touched.tolist():
            m = own == s
            if b == 1:  # the usual engine call: no row selection, a boolean pick keeps list order
                keep = m[0]
                out.append((s, None, loc[0, keep][None, :],
                            None if extra is None else extra[0, keep][None, :]))
                continue
            hit = m.any(axis=1)
            rows = None if hit.all() else np.flatnonzero(hit)
            ms = m if rows is None else m[rows]
            ls = loc if rows is None else loc[rows]
            perm = np.argsort(~ms, axis=1, kind="stable")  # this shard's lists first, in their order
            w = int(ms.sum(axis=1).max())
            mine = np.take_along_axis(ms, perm, axis=1)[:, :w]
            local = np.where(mine, np.take_along_axis(ls, perm, axis=1)[:, :w], -1)
            ex = None
            if extra is not None:
                es = extra if rows is None else extra[rows]
                ex = np.take_along_axis(es, perm, axis=1)[:, :w]
            out.append((s, rows, np.ascontiguousarray(local), ex))
        return out

    def search(self, queries: np.ndarray, lists: np.ndarray, k: int,
               bonus: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of each query over its lists, across shards (fused with ``bonus`` when given).

        Args:
            queries: ``[B, D]`` float32. lists: ``[B, W]`` int64 cell ids, -1 = skip, no repeats.
            k: matches. bonus: ``[B, W]`` float32 added to every match of that list, or None.
        Returns:
            scores ``[B, k]`` float32 descending (-inf pad), ids ``[B, k]`` int64 (-1 pad): what
            :func:`geoloc.index.lists.search_preassigned` / :func:`~geoloc.index.lists.search_fused`
            return on the unsharded index.
        """
        vl = self._vpos_x[lists]  # cell ids -> lists of the chained view (-1 stays -1)
        if bonus is None:
            return L.search_preassigned(self.view, queries, vl, k)
        return L.search_fused(self.view, queries, vl, bonus, k)

    def search_routed(self, queries: np.ndarray, lists: np.ndarray, k: int,
                      bonus: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` the way a front would fan out to shard hosts: each touched shard searched on
        its own over its local lists, the per-shard top-k merged (``docs/sharding.md``). Same
        answers as :meth:`search` (ties between equal scores may order differently)."""
        if len(lists) == 1:
            return self._search_one(queries, lists[0], k, None if bonus is None else bonus[0])
        parts = []
        for s, rows, local, ex in self.route(lists, bonus):
            q = queries if rows is None else queries[rows]
            if bonus is None:
                sc, ids = L.search_preassigned(self.ivfs[s], q, local, k)
            else:
                sc, ids = L.search_fused(self.ivfs[s], q, local, ex, k)
            parts.append((rows, sc, ids))
        return _merge(parts, len(queries), k)

    def _search_one(self, query: np.ndarray, lists: np.ndarray, k: int,
                    bonus: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` of one query (``[1, D]``; lists and bonus ``[W]``): the engine's call, with
        microseconds of routing (a query usually touches one to three shards)."""
        own = self._owner_x[lists]
        loc = self._local_x[lists]
        found = sorted(set(own.tolist()) - {-1})
        if not found:
            return np.full((1, k), -np.inf, np.float32), np.full((1, k), -1, np.int64)
        sc, ids = [], []
        for s in found:
            m = own == s
            local = loc[m][None, :] if len(found) > 1 else loc[None, :]
            if bonus is None:
                a, b = L.search_preassigned(self.ivfs[s], query, local, k)
            else:
                a, b = L.search_fused(self.ivfs[s], query, local, (bonus[m] if len(found) > 1 else bonus)[None, :], k)
            sc.append(a)
            ids.append(b)
        if len(found) == 1:
            return sc[0], ids[0]
        s_all, i_all = np.concatenate(sc, axis=1), np.concatenate(ids, axis=1)
        top = np.argsort(-s_all[0], kind="stable")[:k]
        out_s, out_i = s_all[:, top], i_all[:, top]
        out_i[~np.isfinite(out_s)] = -1
        return out_s, out_i

    def retrieve(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over every row of every shard: queries ``[B, D]`` -> scores ``[B, k]`` float32, ids ``[B, k]`` int64."""
        return self._scan.search(queries, k)

    @staticmethod
    def drop_pages(paths: list[Path]) -> None:
        """Ask the kernel to drop the cached pages of ``paths`` (``POSIX_FADV_DONTNEED``), for cold-cache
        measurements. Pages mapped by a live process are kept: close the shards first
        (:meth:`geoloc.index.CellIndex.reopen_shards` does)."""
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fdatasync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def file_bytes(self) -> int:
        """Bytes of the shard files on disk (0 when built in memory and not saved)."""
        return int(sum(Path(p).stat().st_size for p in self.paths))


def _merge(parts: list[tuple[np.ndarray | None, np.ndarray, np.ndarray]], b: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard top-k ``(rows [b_s] or None, scores [b_s, k], ids [b_s, k])`` into ``[b, k]``."""
    if len(parts) == 1 and parts[0][0] is None:
        return parts[0][1], parts[0][2]
    if not parts:
        return np.full((b, k), -np.inf, np.float32), np.full((b, k), -1, np.int64)
    sc = np.full((b, len(parts) * k), -np.inf, np.float32)
    ids = np.full((b, len(parts) * k), -1, np.int64)
    for j, (rows, s, i) in enumerate(parts):
        sl = slice(j * k, (j + 1) * k)
        if rows is None:
            sc[:, sl], ids[:, sl] = s, i
        else:
            sc[rows, sl], ids[rows, sl] = s, i
    top = np.argsort(-sc, axis=1, kind="stable")[:, :k]
    out_s = np.take_along_axis(sc, top, axis=1)
    out_i = np.take_along_axis(ids, top, axis=1)
    out_i[~np.isfinite(out_s)] = -1
    return out_s, out_i
