"""Batched, resumable extraction on a tiny random ViT and small generated images."""

from __future__ import annotations

import dataclasses
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
import torch
from PIL import Image

from geoloc.backbones import create_backbone
from geoloc.config import BackboneConfig
from geoloc.encoder import Encoder, decode
from geoloc.extract import Extraction, extract_features


@pytest.fixture(scope="module")
def tiny():
    return create_backbone(BackboneConfig(name="test_tiny"), device="cpu")


def _make_images(folder: Path, n: int, *, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = int(rng.integers(48, 130)), int(rng.integers(48, 130))
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        p = folder / f"img_{i:03d}.{'jpg' if i % 2 else 'png'}"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def _with_bad(folder: Path, good: list[Path]) -> tuple[list[Path], set[int]]:
    empty = folder / "empty.jpg"
    empty.write_bytes(b"")
    junk = folder / "junk.jpg"
    junk.write_bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8).tobytes())
    missing = folder / "missing.jpg"
    paths = list(good)
    bad_at = {1: empty, 5: junk, len(paths) - 1: missing}
    for i in sorted(bad_at):
        paths.insert(i, bad_at[i])
    return paths, set(bad_at)


class _Counting(torch.nn.Module):
    """Wraps a model; counts forward calls and raises on call number ``crash_at`` (1-based)."""

    def __init__(self, inner: torch.nn.Module, crash_at: int | None = None) -> None:
        super().__init__()
        self.inner, self.crash_at, self.calls = inner, crash_at, 0

    def forward(self, x):
        self.calls += 1
        if self.crash_at is not None and self.calls >= self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        return self.inner(x)


def _same(a: Extraction, b: Extraction) -> None:
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.ok, b.ok)
    assert a.errors == b.errors


# -- basics -----------------------------------------------------------------------------------------
def test_features_normalised_and_in_order(tmp_path, tiny):
    paths = _make_images(tmp_path, 11)
    ex = extract_features(paths, backbone=tiny, batch_size=4, num_workers=0, progress=False)
    assert ex.features.shape == (11, tiny.feature_dim) and ex.features.dtype == np.float32
    assert ex.ok.all() and ex.errors == []
    np.testing.assert_allclose(np.linalg.norm(ex.features, axis=1), 1.0, atol=1e-5)
    ref = Encoder(tiny).features(torch.stack([decode(p, backbone=tiny) for p in paths]))
    np.testing.assert_allclose(ex.features, ref, atol=1e-5)
    assert len({tuple(np.round(r, 4)) for r in ex.features}) == 11  # distinct rows, not a broadcast


def test_bad_images_are_reported_not_zero_filled(tmp_path, tiny):
    good = _make_images(tmp_path, 9)
    paths, bad_at = _with_bad(tmp_path, good)
    ex = extract_features(paths, backbone=tiny, batch_size=4, num_workers=0, progress=False)
    assert ex.ok.shape == (len(paths),)
    assert {i for i in range(len(paths)) if not ex.ok[i]} == bad_at
    assert [p for p, _ in ex.errors] == [str(paths[i]) for i in sorted(bad_at)]
    assert all(reason for _, reason in ex.errors)
    assert "not found" in ex.errors[-1][1]
    assert ex.features.shape == (len(good), tiny.feature_dim)
    np.testing.assert_allclose(np.linalg.norm(ex.features, axis=1), 1.0, atol=1e-5)
    clean = extract_features(good, backbone=tiny, batch_size=4, num_workers=0, progress=False)
    np.testing.assert_allclose(ex.features, clean.features, atol=1e-5)
    rows = ex.row_of()
    assert rows[1] == -1 and rows[0] == 0 and rows[2] == 1


def test_all_bad_and_empty(tmp_path, tiny):
    (tmp_path / "a.jpg").write_bytes(b"")
    ex = extract_features([tmp_path / "a.jpg"], backbone=tiny, num_workers=0, progress=False)
    assert ex.features.shape == (0, tiny.feature_dim) and not ex.ok.any() and len(ex.errors) == 1
    ex = extract_features([], backbone=tiny, num_workers=0, progress=False, cache_dir=tmp_path / "c")
    assert ex.features.shape == (0, tiny.feature_dim) and ex.ok.shape == (0,)


def test_workers_zero_and_two_agree(tmp_path, tiny):
    paths, _ = _with_bad(tmp_path, _make_images(tmp_path, 14))
    a = extract_features(paths, backbone=tiny, batch_size=4, num_workers=0, progress=False)
    b = extract_features(paths, backbone=tiny, batch_size=4, num_workers=2, progress=False)
    _same(a, b)


def test_encoder_batch_and_single_input_agree(tiny):
    imgs = [Image.new("RGB", (80, 60), (i * 40, 10, 200)) for i in range(3)]
    enc = Encoder(tiny)
    a = enc.features(torch.stack([tiny.transform(im) for im in imgs]))
    c = enc.features(tiny.transform(imgs[0]))
    assert a.shape == (3, tiny.feature_dim) and a.dtype == np.float32
    np.testing.assert_allclose(c, a[:1], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enc.features(torch.zeros(2, 1, 8, 8))


def test_replaced_image_under_same_name_is_extracted_again(tmp_path, tiny):
    """Issue 11: the cache is keyed by file identity, not only by path (no stale features)."""
    paths = _make_images(tmp_path, 6)
    cache = tmp_path / "cache"
    first = extract_features(paths, backbone=tiny, batch_size=4, num_workers=0, progress=False, cache_dir=cache, chunk_size=3)
    other = _make_images(tmp_path / "other", 6, seed=1)
    Path(paths[4]).write_bytes(Path(other[4]).read_bytes())  # same name, new content
    second = extract_features(paths, backbone=tiny, batch_size=4, num_workers=0, progress=False, cache_dir=cache, chunk_size=3)
    assert second.reused_chunks == 1 and second.extracted_chunks == 1  # only the chunk holding image 4
    fresh = extract_features(paths, backbone=tiny, batch_size=4, num_workers=0, progress=False)
    np.testing.assert_allclose(second.features, fresh.features, atol=1e-6)
    assert not np.allclose(second.features[4], first.features[4], atol=1e-3)


# -- resumable cache --------------------------------------------------------------------------------
def test_resume_after_crash_reuses_finished_chunks(tmp_path, tiny):
    paths, _ = _with_bad(tmp_path, _make_images(tmp_path / "im", 23))  # 26 paths: chunks 8, 8, 8, 2
    kw = dict(batch_size=4, num_workers=0, progress=False, chunk_size=8)
    reference = extract_features(paths, backbone=tiny, **kw)
    cache = tmp_path / "cache"
    crashing = dataclasses.replace(tiny, model=_Counting(tiny.model, crash_at=5))  # dies in chunk 2
    with pytest.raises(KeyboardInterrupt):
        extract_features(paths, backbone=crashing, cache_dir=cache, **kw)
    assert sorted(f.name for f in cache.glob("chunk_*")) == ["chunk_000000.safetensors", "chunk_000001.safetensors"]
    counting = dataclasses.replace(tiny, model=_Counting(tiny.model))
    resumed = extract_features(paths, backbone=counting, cache_dir=cache, **kw)
    assert (resumed.reused_chunks, resumed.extracted_chunks) == (2, 2)
    assert counting.model.calls == 3  # chunk 2: two batches, chunk 3: one -- nothing recomputed
    _same(resumed, reference)
    again = extract_features(paths, backbone=counting, cache_dir=cache, **kw)
    assert (again.reused_chunks, again.extracted_chunks, counting.model.calls) == (4, 0, 3)
    _same(again, reference)


def test_damaged_chunk_and_tmp_leftovers_are_not_read(tmp_path, tiny):
    paths = _make_images(tmp_path / "im", 20)
    kw = dict(batch_size=4, num_workers=0, progress=False, chunk_size=8)
    cache = tmp_path / "cache"
    full = extract_features(paths, backbone=tiny, cache_dir=cache, **kw)
    data = (cache / "chunk_000001.safetensors").read_bytes()
    (cache / "chunk_000001.safetensors").write_bytes(data[: len(data) // 2])  # torn file
    (cache / ".chunk_000002.safetensors.tmp-4242").write_bytes(b"half")  # geoloc.fileio's temporary name
    again = extract_features(paths, backbone=tiny, cache_dir=cache, **kw)
    assert (again.reused_chunks, again.extracted_chunks) == (2, 1)
    assert not list(cache.glob(".*.tmp-*"))
    _same(again, full)


def test_cache_of_another_backbone_or_path_list_is_not_reused(tmp_path, tiny):
    paths = _make_images(tmp_path / "im", 10)
    kw = dict(batch_size=4, num_workers=0, progress=False, chunk_size=4)
    cache = tmp_path / "cache"
    first = extract_features(paths, backbone=tiny, cache_dir=cache, **kw)
    key = json.loads((cache / "cache.json").read_text())["key"]
    other = dataclasses.replace(tiny, fingerprint="0" * 64)
    ex = extract_features(paths, backbone=other, cache_dir=cache, **kw)
    assert ex.reused_chunks == 0 and json.loads((cache / "cache.json").read_text())["key"] != key
    ex = extract_features(paths, backbone=tiny, cache_dir=cache, **kw)  # the old cache was cleared
    assert ex.reused_chunks == 0
    _same(ex, first)
    ex = extract_features(paths[::-1], backbone=tiny, cache_dir=cache, **kw)
    assert ex.reused_chunks == 0
    np.testing.assert_allclose(ex.features, first.features[::-1], atol=1e-5)  # other batches
    ex = extract_features(paths, backbone=tiny, cache_dir=cache, **{**kw, "chunk_size": 5})
    assert ex.reused_chunks == 0


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time, dataclasses, torch
    from pathlib import Path
    from geoloc.backbones import create_backbone
    from geoloc.config import BackboneConfig
    from geoloc.extract import extract_features

    class Slow(torch.nn.Module):
        def __init__(self, inner):
            super().__init__(); self.inner = inner
        def forward(self, x):
            time.sleep(0.15)
            return self.inner(x)

    paths = [Path(p) for p in Path(sys.argv[1]).read_text().split()]
    b = create_backbone(BackboneConfig(name="test_tiny"), device="cpu")
    b = dataclasses.replace(b, model=Slow(b.model))
    print("ready", flush=True)
    extract_features(paths, backbone=b, batch_size=2, num_workers=0, progress=False,
                     chunk_size=2, cache_dir=Path(sys.argv[2]))
""")


def test_sigkill_leaves_a_usable_cache(tmp_path, tiny):
    paths = _make_images(tmp_path / "im", 40)
    listing = tmp_path / "paths.txt"
    listing.write_text("\n".join(map(str, paths)))
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT)
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(listing), str(cache)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        deadline = time.monotonic() + 30
        while len(list(cache.glob("chunk_*.safetensors"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.07)  # land somewhere inside a batch or a write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = len(list(cache.glob("chunk_*.safetensors")))
    assert 3 <= done < 20
    kw = dict(batch_size=2, num_workers=0, progress=False, chunk_size=2)
    resumed = extract_features(paths, backbone=tiny, cache_dir=cache, **kw)
    assert resumed.reused_chunks == done and resumed.extracted_chunks == 20 - done
    _same(resumed, extract_features(paths, backbone=tiny, **kw))


def test_relative_and_absolute_paths_share_the_cache(tmp_path, tiny, monkeypatch):
    paths = _make_images(tmp_path / "im", 10)
    kw = dict(batch_size=4, num_workers=0, progress=False, chunk_size=4)
    cache = tmp_path / "cache"
    first = extract_features([p.resolve() for p in paths], backbone=tiny, cache_dir=cache, **kw)
    monkeypatch.chdir(tmp_path)
    again = extract_features([Path(p).resolve().relative_to(tmp_path) for p in paths], backbone=tiny, cache_dir=cache, **kw)
    assert (again.reused_chunks, again.extracted_chunks) == (3, 0)
    _same(again, first)


# -- the Ray engine's pieces, without Ray (tests/test_ray.py runs them on a cluster) -----------------
def test_ray_engine_without_ray_says_what_to_install(tmp_path, tiny, monkeypatch):
    from geoloc.errors import ConfigError, DependencyError

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    paths = _make_images(tmp_path, 2)
    with pytest.raises(DependencyError) as err:
        extract_features(paths, backbone=tiny, engine="ray", progress=False)
    assert str(err.value) == 'ray is not installed: pip install -e ".[cpu,ray]"'
    with pytest.raises(ConfigError, match="unknown extraction engine 'spark'"):
        extract_features(paths, backbone=tiny, engine="spark", progress=False)


def test_chunk_worker_matches_the_local_path_and_checks_the_weights(tmp_path, tiny):
    """The Ray actor's code, run in this process: same chunk bytes' content as the local path,
    fine-tuned weights shipped to it, and a one-line refusal of other weights."""
    from geoloc.distributed import ChunkWorker, config_of
    from geoloc.extract import chunk_payload, extract_chunk, parse_chunk

    paths, _ = _with_bad(tmp_path, _make_images(tmp_path, 7))  # 10 paths
    tuned = dataclasses.replace(tiny, model=create_backbone(BackboneConfig(name="test_tiny", weights="random")).model)
    with torch.no_grad():
        for p in tuned.model.parameters():
            p.mul_(1.5)
    tuned.refresh_fingerprint()
    cfg = config_of(tuned)
    assert (cfg.name, cfg.weights, cfg.image_size) == ("test_tiny", "random", tiny.input_size)
    state = {k: v.numpy() for k, v in tuned.model.state_dict().items()}
    kw = dict(config={k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, device="cpu", threads=1,
              batch_size=3, root=str(tmp_path))
    names = [Path(p).name for p in paths]  # relative to root
    batch = {"chunk": np.array([0]), "key": np.array(["k"]), "paths": np.array([json.dumps(names)])}
    threads = torch.get_num_threads()
    try:
        out = ChunkWorker(fingerprint=tuned.fingerprint, tuned=state, **kw)(batch)
        refused = ChunkWorker(fingerprint=tuned.fingerprint, tuned=None, **kw)(batch)  # plain random weights
    finally:
        torch.set_num_threads(threads)  # the worker sets its own thread count
    assert out["failure"][0] == "" and int(out["chunk"][0]) == 0
    feats, ok, errors = parse_chunk(out["payload"][0], 0, "k", len(paths), tiny.feature_dim)
    local = extract_features(paths, backbone=tuned, batch_size=3, num_workers=0, progress=False)
    assert np.array_equal(feats, local.features) and np.array_equal(ok, local.ok)
    assert errors == [(Path(p).name, r) for p, r in local.errors]
    assert parse_chunk(out["payload"][0], 1, "k", len(paths), tiny.feature_dim) is None  # another chunk's number
    assert parse_chunk(chunk_payload("k", 0, *extract_chunk([str(p) for p in paths], backbone=tuned, batch_size=3)),
                       0, "k", len(paths), tiny.feature_dim) is not None
    assert refused["payload"][0] == b"" and "same weights" in refused["failure"][0]
    assert "\n" not in refused["failure"][0]
