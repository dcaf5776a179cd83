"""Shared helpers of the scripts in ``benchmarks/`` (each script answers one question).

* :mod:`geoloc.bench.synthetic`: synthetic cell-structured descriptors ``[N, D]`` and their
  the cosines they are calibrated on (``make_cell_data``, ``measure_cosines``).
* :mod:`geoloc.bench.timing`: median ms per query, recall, read bandwidth, CPU model, peak RSS.
* :mod:`geoloc.bench.rows`: latency rows of the engine's modes and of the IVF / HNSW baselines.
* :mod:`geoloc.bench.report`: the markdown table, target ratios and plot of those rows.
* :mod:`geoloc.bench.endtoend`: backbone time, whole engine queries on a bundle, the GPU path.

Import the submodule you need (``from geoloc.bench.synthetic import make_cell_data``); this
package imports nothing heavy by itself.
"""
