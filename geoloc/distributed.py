"""Feature extraction on a Ray cluster (``extract_features(..., engine="ray")``).

The unit of work is one cache chunk of :func:`geoloc.extract.extract_features`: a Ray Data
dataset holds one row per chunk still to extract (chunk number, chunk key, file names), and
``map_batches`` sends each row to an actor of :class:`ChunkWorker`. Each actor creates its own
backbone from the :class:`~geoloc.config.BackboneConfig` with
:func:`geoloc.backbones.create_backbone` (plus the tuned weights when the caller's backbone was
fine-tuned), checks that its fingerprint equals the caller's, and embeds its chunks with
:func:`geoloc.extract.extract_chunk`: geoloc's own decoder and pooling, on the same batches as the
local path, so the features are the local path's bit for bit (same device kind, same torch
thread count). An actor takes one CPU, or one GPU when the caller's backbone is on CUDA.

A chunk comes back as the bytes of its cache file (:func:`geoloc.extract.chunk_payload`, its
chunk number in the row: Ray does not keep order); the caller checks it and writes it into the
feature cache as it arrives, so a build killed mid-way keeps every chunk it received and the
next run (local or Ray) extracts only the rest. Only the caller writes the cache: the workers
must read the images (same paths on every node, e.g. a shared file system), not the cache.

Ray is an optional dependency (``pip install -e ".[cpu,ray]"``), imported only here and only
when the Ray engine is asked for. Ray moves the actor's arguments with its own serialisation;
nothing geoloc writes to disk is a pickle.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from geoloc.backbones import Backbone, create_backbone
from geoloc.config import BackboneConfig
from geoloc.errors import BackboneError, DependencyError, GeolocError, one_line

__all__ = ["RAY_MISSING", "ChunkWorker", "config_of", "import_ray", "ray_chunks"]

RAY_MISSING = 'ray is not installed: pip install -e ".[cpu,ray]"'
"""The one-line error when the Ray engine is asked for without the ``ray`` extra."""


def import_ray() -> Any:
    """``import ray`` (with Ray Data), or a :class:`DependencyError` saying what to install."""
    try:
        import ray
        import ray.data  # noqa: F401 - the engine needs Ray Data, not only Ray core
    except ImportError:
        raise DependencyError(RAY_MISSING) from None
    return ray


def config_of(backbone: Backbone) -> BackboneConfig:
    """The :class:`BackboneConfig` that recreates ``backbone`` (before any fine-tuning): its name,
    its weights ('random', 'default' for hub/packaged weights, or the local file) and input size."""
    source = backbone.weights_source.removeprefix("tuned:")
    weights = "random" if source == "random" else source[len("file:"):] if source.startswith("file:") else "default"
    return BackboneConfig(name=backbone.name, weights=weights, image_size=backbone.input_size,
                          resize=getattr(backbone, "resize", "crop"))


class ChunkWorker:
    """A Ray Data actor: creates the backbone once, then embeds whole chunks.

    Input batch: ``chunk [b] int64``, ``key [b] str``, ``paths [b] str`` (JSON list of the chunk's
    file names). Output batch: ``chunk [b] int64``, ``payload [b] bytes`` (the chunk's cache
    file, :func:`geoloc.extract.chunk_payload`), ``failure [b] str`` ("" or why this actor
    cannot embed: its backbone differs from the caller's).
    """

    def __init__(self, *, config: dict[str, Any], fingerprint: str, tuned: dict[str, np.ndarray] | None,
                 device: str, threads: int, batch_size: int, root: str) -> None:
        torch.set_num_threads(threads)
        self.batch_size, self.root, self.failure = batch_size, root, ""
        self.backbone: Backbone | None = None
        try:
            backbone = create_backbone(BackboneConfig(**config), device=device)
            if tuned is not None:
                backbone.load_tuned({k: torch.from_numpy(np.asarray(v)) for k, v in tuned.items()})
        except GeolocError as err:
            self.failure = f"a Ray worker cannot create the backbone: {err}"
            return
        if backbone.fingerprint != fingerprint:
            self.failure = (f"a Ray worker's {backbone.name} backbone has weights {backbone.fingerprint[:12]}, "
                            f"this process's has {fingerprint[:12]}: give every node the same weights "
                            f"(backbone.weights) and the same geoloc and timm versions")
            return
        self.backbone = backbone

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from geoloc.extract import chunk_payload, extract_chunk

        chunks, payloads, failures = [], [], []
        for c, key, names in zip(batch["chunk"], batch["key"], batch["paths"]):
            payload = b""
            if self.backbone is not None:
                feats, ok, errors = extract_chunk(json.loads(str(names)), backbone=self.backbone,
                                                  batch_size=self.batch_size, root=self.root)
                payload = chunk_payload(str(key), int(c), feats, ok, errors)
            chunks.append(int(c))
            payloads.append(payload)
            failures.append(self.failure)
        return {"chunk": np.asarray(chunks, dtype=np.int64), "payload": np.asarray(payloads, dtype=object),
                "failure": np.asarray(failures, dtype=object)}


def _connect(ray: Any, address: str | None) -> bool:
    """Join ``address`` (or start a local cluster) unless this process already has a Ray session.
    Returns True when this call started the session (the caller shuts it down)."""
    if ray.is_initialized():
        return False
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as err:
        where = address or "a new local cluster"
        raise GeolocError(f"cannot start or join the Ray cluster at {where} ({one_line(str(err).splitlines()[0] if str(err) else type(err).__name__)}): "
                          f"start one with `ray start --head`, or leave --ray-address out to run a local one") from None
    return True


def ray_chunks(jobs: Sequence[tuple[int, str, Sequence[str]]], *, backbone: Backbone, config: BackboneConfig | None,
               batch_size: int, address: str | None = None, workers: int | None = None,
               threads: int | None = None) -> Iterator[tuple[int, bytes]]:
    """Embed cache chunks on Ray; yields ``(chunk number, chunk payload bytes)`` as chunks finish,
    in no particular order.

    Args:
        jobs: ``(chunk number, chunk key, file names)`` per chunk to extract.
        backbone: the caller's backbone: its fingerprint, device kind (CPU or CUDA) and tuned
            weights (if fine-tuned) are what every actor must reproduce.
        config: the config ``backbone`` was created from (None: :func:`config_of`).
        address: cluster to join (``"auto"``, ``"HOST:PORT"``); None: the session already
            running in this process, or a new local cluster (shut down when done).
        workers: actors (default: the cluster's CPUs, or GPUs for a CUDA backbone).
        threads: torch threads per actor (default: this process's ``torch.get_num_threads()``).
    Raises:
        DependencyError: ray is not installed.
        GeolocError: the cluster cannot be reached or is too small, or a worker's backbone differs.
    """
    if workers is not None and workers < 1:
        raise GeolocError(f"the Ray engine needs at least one worker (got workers={workers})")
    if threads is not None and threads < 1:
        raise GeolocError(f"threads_per_worker must be >= 1 (got {threads})")
    ray = import_ray()
    if not jobs:
        return
    cfg = config if config is not None else config_of(backbone)
    settings = {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}
    if settings["weights"] not in ("default", "random"):  # a local file: actors run in other folders
        settings["weights"] = os.path.abspath(settings["weights"])
    gpu = backbone.device.startswith("cuda")
    tuned = None
    if backbone.weights_source.startswith("tuned:"):
        tuned = {k: v.detach().cpu().numpy() for k, v in backbone.model.state_dict().items()}
    started = _connect(ray, address)
    try:
        kind = "GPU" if gpu else "CPU"
        have = int(ray.cluster_resources().get(kind, 0))
        n = workers if workers is not None else have
        if have < 1 or n > have:
            raise GeolocError(f"{n} Ray workers asked for, but the Ray cluster has {have} {kind}s "
                              f"(one worker takes one {kind}): lower --workers or add nodes")
        n = min(n, len(jobs))
        with warnings.catch_warnings():  # Ray Data's own deprecated defaults warn on first use
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        if hasattr(ctx, "print_on_execution_start"):
            ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        rows = [{"chunk": int(c), "key": key, "paths": json.dumps([str(p) for p in names])} for c, key, names in jobs]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        ds = ds.map_batches(
            ChunkWorker,
            fn_constructor_kwargs={
                "config": settings,
                "fingerprint": backbone.fingerprint,
                "tuned": tuned,
                "device": "cuda" if gpu else "cpu",
                "threads": threads if threads is not None else torch.get_num_threads(),
                "batch_size": batch_size,
                "root": os.getcwd(),
            },
            batch_size=1,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=n, max_tasks_in_flight_per_actor=2),
            num_cpus=0 if gpu else 1,
            num_gpus=1 if gpu else 0,
        )
        try:
            for row in ds.iter_rows():
                if row["failure"]:
                    raise BackboneError(str(row["failure"]))
                yield int(row["chunk"]), bytes(row["payload"])
        except ray.exceptions.RayError as err:
            first = one_line(str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__)
            raise GeolocError(f"the Ray extraction failed ({first[:300]}): see the Ray worker logs "
                              f"(/tmp/ray/session_latest/logs); every node needs geoloc installed") from None
    finally:
        if started:
            ray.shutdown()
