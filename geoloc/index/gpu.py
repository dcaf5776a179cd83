"""GPU mirroring: a GPU copy of the inverted lists and the GPU variant of the cell scorer.

Used when faiss has GPU support, a GPU is present and ``config.use_gpu`` is set. The CPU index
stays the source of truth (it is what :func:`geoloc.index.io.save_index` writes). Answers equal
the CPU path's: exact inner products over the same lists; cell scorers without a GPU structure
of their own (LSH, HNSW) score exactly on the GPU instead (``CellScorer.to_gpu``).
"""

from __future__ import annotations

import faiss
import numpy as np

from geoloc.config import IndexConfig
from geoloc.index.scorers import CellScorer

__all__ = ["GpuMirror", "gpu_available"]


def gpu_available(config: IndexConfig) -> bool:
    """True when ``config.use_gpu`` is set, faiss has GPU support and sees a GPU."""
    return bool(config.use_gpu) and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


class GpuMirror:  # pragma: no cover - needs a CUDA build of faiss and a GPU
    """GPU 0 copies of the lists (``GpuIndexIVFFlat``) and of the cell scorer.

    Args:
        ivf: the CPU ``IndexIVFFlat`` (C lists). scorer: its cell scorer.
        first_prototype: ``[C, D]`` float32, one prototype per cell: a flat stand-in quantizer
            for the copy (``search_preassigned`` never asks it anything; FAISS's GPU IVF only
            copies flat quantizers with one row per list).
    Attributes:
        resources: the ``StandardGpuResources``; ivf: the GPU IVF; scorer: ``search(queries, m)``.
    """

    def __init__(self, ivf: faiss.IndexIVFFlat, scorer: CellScorer, first_prototype: np.ndarray) -> None:
        self.resources = faiss.StandardGpuResources()
        stand_in = faiss.IndexFlatIP(ivf.d)
        stand_in.add(np.ascontiguousarray(first_prototype, dtype=np.float32))
        shallow = faiss.IndexIVFFlat(stand_in, ivf.d, ivf.nlist, faiss.METRIC_INNER_PRODUCT)
        shallow.replace_invlists(ivf.invlists, False)  # shares the CPU lists, copies nothing
        shallow.ntotal = ivf.ntotal
        shallow.is_trained = True
        self.ivf = faiss.index_cpu_to_gpu(self.resources, 0, shallow)
        self.scorer = scorer.to_gpu(self.resources)

    def flat_index(self, dim: int) -> faiss.Index:
        """An empty exact inner-product index on the GPU (for the retrieve view)."""
        return faiss.GpuIndexFlatIP(self.resources, dim)

    def flat_index_factory(self, dim: int):
        """``flat_index`` bound to ``dim`` (a no-argument callable)."""
        return lambda: self.flat_index(dim)
