"""The cell-partitioned index: one FAISS IVF index whose inverted lists *are* the cells.

Layout (shapes: ``N`` database vectors, ``D`` dims, ``C`` cells, ``P >= C`` prototypes)::

    prototypes [P, D] --(cell scorer: flat | lsh | hnsw | sq8 | pqfs | twolevel)--> top cells [B, Kc]
                                                                           |
    descriptors [N, D] filed by cells [N] --> C inverted lists --(search_preassigned)--> ids [B, K]

* **Cell scorer = the IVF's quantizer, over the prototypes.** Each cell has one or several
  L2-normalised prototypes (sub-centres; ``prototype_cells`` ``[P]`` says whose). A cell's
  score is the best cosine over its prototypes; scoring a query's cells (``classify``) is one
  search of the scorer for a shortlist of prototypes, reduced to distinct cells. Scorers are
  registered classes (:mod:`geoloc.index.scorers`): exact ``flat`` (``IndexFlatIP``), ``lsh``
  (binary codes shortlist, exact re-rank), ``hnsw`` (graph), ``sq8`` / ``pqfs`` (8-bit / 4-bit
  fast-scan codes shortlist, exact re-rank) and ``twolevel`` (coarse regions first); ``auto``
  picks ``pqfs`` from ``config.approx_min_cells`` prototypes on, ``flat`` below (the rule and
  its measurements are in the registry's docstring).
* **Inverted lists = cells** (:mod:`geoloc.index.lists`). Every database row is filed under
  its own cell with ``add_preassigned``; the stored id of a vector is its database row id.
  ``index.codec`` stores the lists as float32 (``flat``, exact), ``sq8`` or ``pq`` codes,
  optionally re-ranked against a second ``sq8``/``flat`` store (``index.refine``).
* **Hybrid** scores the cells, keeps the top ``top_cells`` (optionally with each top cell's
  ring of 8 neighbours, de-duplicated) and scans exactly those lists with
  ``search_preassigned``. The list count travels in a per-call ``SearchParametersIVF``:
  nothing index-wide is written after build, so one index serves many threads. With
  ``fusion_weight > 0`` candidates are ranked by ``inner product + weight x cell score``,
  exactly (each list searched on its own, its bonus added, the results merged).
* **Retrieve** is exact search over all N vectors, reading the lists in place
  (:mod:`geoloc.index.retrieve`): the hybrid kernel over every list for small batches, BLAS over
  blocks of lists for large ones; no second copy of the database.
* **GPU** (:mod:`geoloc.index.gpu`): with GPU faiss, a GPU and ``config.use_gpu``, the lists
  and the cell scoring run on GPU 0 with the CPU path's answers.
* **Files** (:mod:`geoloc.index.io`): ``index.faiss``, ``cell_neighbours.npy``,
  ``prototype_cells.npy`` (only with several prototypes per cell). No pickle.
* **Shards** (:mod:`geoloc.index.shards`, ``index.shards > 1``): the lists in one FAISS file per
  geographic shard (``shard-NNNN.faiss``, owner table ``shard_cells.npy``), memory-mapped and
  chained without copying; answers equal the unsharded index's (``docs/sharding.md``).

Where this sits in the engine: ``docs/architecture.md``.
"""

from geoloc.errors import require_faiss

require_faiss()  # one line naming the extra to install, not a traceback from deep inside

from geoloc.index.cellindex import MODES, CellIndex  # noqa: E402
from geoloc.index.io import INDEX_FILE, NEIGHBOURS_FILE, PROTOTYPE_CELLS_FILE
from geoloc.index.result import SearchResult, SearchTimes
from geoloc.index.scorers import (
    SCORERS,
    CellScorer,
    register_scorer,
    resolve_scorer_name,
    scorer_names,
)

__all__ = [
    "INDEX_FILE",
    "MODES",
    "NEIGHBOURS_FILE",
    "PROTOTYPE_CELLS_FILE",
    "SCORERS",
    "CellIndex",
    "CellScorer",
    "SearchResult",
    "SearchTimes",
    "register_scorer",
    "resolve_scorer_name",
    "scorer_names",
]
