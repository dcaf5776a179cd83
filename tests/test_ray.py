"""Extraction on a real local 2-CPU Ray cluster (marker ``ray``; skipped without the ``ray`` extra).

Each Ray run starts fresh actors (a process importing torch and timm each, seconds), so this file
keeps to four runs: equality with the local path, a killed run and its resumption, and a whole
bundle built through Ray. The actor class itself (fine-tuned weights, the one-line refusal of a
backbone whose fingerprint differs) is tested in-process, without Ray, in test_extract.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from geoloc.backbones import create_backbone
from geoloc.config import BackboneConfig
from geoloc.errors import GeolocError
from geoloc.extract import extract_features

from test_extract import _make_images, _same, _with_bad

pytestmark = pytest.mark.ray

try:
    import ray
    import ray.data  # noqa: F401
except ImportError:
    ray = None


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 CPUs and a small object store; yields its GCS address."""
    if ray is None:
        pytest.skip('ray is not installed (pip install -e ".[cpu,ray]")')
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20, log_to_driver=False,
             configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny():
    return create_backbone(BackboneConfig(name="test_tiny", weights="random"), device="cpu")


def test_ray_equals_local_bit_for_bit_and_fills_the_same_cache(tmp_path, tiny, cluster, monkeypatch):
    paths, bad = _with_bad(tmp_path / "im", _make_images(tmp_path / "im", 21))  # 24 paths, 3 bad
    monkeypatch.chdir(tmp_path)  # relative names: the actors resolve them against this folder
    names = [Path(p).relative_to(tmp_path) for p in paths]
    kw = dict(backbone=tiny, batch_size=3, chunk_size=7, progress=False)  # batches straddle nothing
    local = extract_features(names, num_workers=0, cache_dir=tmp_path / "local", **kw)
    dist = extract_features(names, engine="ray", workers=2, cache_dir=tmp_path / "ray", **kw)
    assert (dist.extracted_chunks, dist.reused_chunks) == (4, 0)
    assert np.array_equal(dist.features, local.features) and dist.features.dtype == np.float32
    _same(dist, local)
    assert [p for p, _ in dist.errors] == [str(names[i]) for i in sorted(bad)]
    files = sorted(f.name for f in (tmp_path / "local").glob("chunk_*"))
    assert files == sorted(f.name for f in (tmp_path / "ray").glob("chunk_*")) and len(files) == 4
    for name in files:  # the same cache files: tensors and metadata (the header's key order may vary)
        a, b = (_chunk_file(tmp_path / d / name) for d in ("local", "ray"))
        assert a[0] == b[0] and a[1].keys() == b[1].keys(), name
        assert all(np.array_equal(a[1][k], b[1][k]) for k in a[1]), name
    again = extract_features(names, engine="ray", workers=2, cache_dir=tmp_path / "ray", **kw)
    assert (again.reused_chunks, again.extracted_chunks) == (4, 0)
    mixed = extract_features(names, num_workers=0, cache_dir=tmp_path / "ray", **kw)  # one cache, both engines
    assert mixed.reused_chunks == 4
    _same(mixed, local)


def _chunk_file(path: Path) -> tuple[dict, dict]:
    """(metadata, tensors) of a cache chunk file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import ray
    import geoloc.extract as ex
    from geoloc.backbones import create_backbone
    from geoloc.config import BackboneConfig

    write = ex.write_chunk
    def slow_write(cache_dir, c, data):  # the driver writes each chunk it receives, then dawdles
        write(cache_dir, c, data)
        time.sleep(0.4)
    ex.write_chunk = slow_write

    paths = Path(sys.argv[1]).read_text().split()
    ray.init(address=sys.argv[3], log_to_driver=False, configure_logging=False)
    b = create_backbone(BackboneConfig(name="test_tiny", weights="random"), device="cpu")
    print("ready", flush=True)
    ex.extract_features(paths, backbone=b, engine="ray", workers=2, batch_size=2, chunk_size=2,
                        progress=False, cache_dir=Path(sys.argv[2]))
""")


def test_killed_ray_run_resumes_without_redoing_finished_chunks(tmp_path, tiny, cluster):
    paths = _make_images(tmp_path / "im", 24)  # 12 chunks of 2
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join(map(str, paths)))
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(listing), str(cache), cluster], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        deadline = time.monotonic() + 90
        while len(list(cache.glob("chunk_*.safetensors"))) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)  # the driver dies; Ray ends its job's actors
        proc.wait()
    done = len(list(cache.glob("chunk_*.safetensors")))
    assert 2 <= done < 12
    kw = dict(backbone=tiny, batch_size=2, chunk_size=2, progress=False)
    resumed = extract_features(paths, engine="ray", workers=2, cache_dir=cache, **kw)
    assert resumed.reused_chunks == done > 0 and resumed.extracted_chunks == 12 - done
    reference = extract_features(paths, num_workers=0, **kw)
    assert np.array_equal(resumed.features, reference.features)
    _same(resumed, reference)


def test_bundle_built_on_ray_answers_like_the_local_one(tmp_path, cluster, monkeypatch):
    """The issue's end-to-end check: build-index through Ray writes the same bundle (the checksum
    of every file but the stored config) and answers every query identically in every mode."""
    import functools

    import geoloc.build as build
    from citydata import TINY_CONFIG, write_dataset
    from geoloc.config import load_config
    from geoloc.engine import Localizer

    write_dataset(tmp_path / "ds", n_db=80, n_q=12)
    cfg = load_config(TINY_CONFIG, ["backbone.cache_chunk=16"])  # 5 chunks
    local = build.build_index(database=tmp_path / "ds", out=tmp_path / "local", config=cfg, progress=False)
    if "engine" in BackboneConfig.__dataclass_fields__:  # build.py passes backbone.engine through
        cfg = load_config(TINY_CONFIG, ["backbone.engine=ray", "backbone.workers=2", "backbone.cache_chunk=16"])
    else:
        cfg = load_config(TINY_CONFIG, ["backbone.cache_chunk=16"])
        monkeypatch.setattr(build, "extract_features", functools.partial(extract_features, engine="ray", workers=2))
    dist = build.build_index(database=tmp_path / "ds", out=tmp_path / "ray", config=cfg, progress=False)
    files = [json.loads((d / "manifest.json").read_text())["files"] for d in (local.out, dist.out)]
    for f in files:  # the stored config names the engine; everything else is the same, byte for byte
        f.pop("config.yaml")
    assert files[0] == files[1] and len(files[0]) >= 5
    queries = sorted((tmp_path / "ds" / "queries").glob("*.jpg"))
    a, b = Localizer.load(local.out), Localizer.load(dist.out)
    for mode in ("classify", "retrieve", "hybrid"):
        pa = [{k: v for k, v in p.to_json().items() if k != "timings_ms"} for p in a.localize(queries, mode=mode)]
        pb = [{k: v for k, v in p.to_json().items() if k != "timings_ms"} for p in b.localize(queries, mode=mode)]
        assert pa == pb and len(pa) == 12, mode
    # geographic shards on top of the Ray build (index.shards): the same answers again
    sharded = build.build_index(database=tmp_path / "ds", out=tmp_path / "ray-sharded",
                                config=cfg.set("index.shards", 2), progress=False)
    c = Localizer.load(sharded.out)
    assert c.bundle.index.n_shards == 2
    for mode in ("classify", "retrieve", "hybrid"):
        pa = [{k: v for k, v in p.to_json().items() if k != "timings_ms"} for p in a.localize(queries, mode=mode)]
        pc = [{k: v for k, v in p.to_json().items() if k != "timings_ms"} for p in c.localize(queries, mode=mode)]
        assert pa == pc, mode


def test_more_workers_than_cpus_is_refused(tmp_path, tiny, cluster):
    paths = _make_images(tmp_path / "im", 2)
    with pytest.raises(GeolocError, match="3 Ray workers asked for, but the Ray cluster has 2 CPUs"):
        extract_features(paths, backbone=tiny, engine="ray", workers=3, progress=False)
