"""SIGKILL a real `geoloc build-index` at moments spread over every stage.

After each kill there is either no bundle at all or a complete one that answers exactly like
an uninterrupted build; the next run resumes from the feature chunks already extracted
(it does not extract them again) and ends with a bundle that answers identically.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from citydata import REPO, TINY_CONFIG, write_dataset
from geoloc.engine import Localizer

CHUNK = 16
N_DB = 192


def _cmd(ds: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "geoloc", "build-index", "--database", str(ds), "--out", str(out),
            "--config", str(TINY_CONFIG), "--set", f"backbone.cache_chunk={CHUNK}", "--set", "train.epochs=6"]


def _answers(bundle: Path, images: list[Path]) -> list[dict]:
    loc = Localizer.load(bundle)
    out = []
    for mode in ("classify", "retrieve", "hybrid"):
        for p in loc.localize(images, mode=mode):
            d = p.to_json()
            d.pop("timings_ms")
            out.append(d)
    return out


def _chunks(out: Path) -> int:
    return len(list((out.parent / f".{out.name}.work" / "features").glob("chunk_*.safetensors")))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    ds = write_dataset(root / "ds", n_db=N_DB, n_q=8)
    ref = root / "ref"
    done = subprocess.run(_cmd(ds, ref), capture_output=True, text=True, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr
    images = sorted((ds / "queries").iterdir()) + sorted((ds / "database").iterdir())[:8]
    return root, ds, images, _answers(ref, images)


def test_sigkill_never_leaves_a_wrong_bundle_and_the_build_resumes(setup):
    root, ds, images, reference = setup
    out = root / "indexes" / "city"
    rng = np.random.default_rng(0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    work = out.parent / f".{out.name}.work"
    # (what must have happened before the kill, extra random delay in seconds)
    moments = [
        ("start-up", lambda: True, rng.uniform(0.2, 2.0)),
        ("first chunk written", lambda: _chunks(out) >= 1, rng.uniform(0, 0.3)),
        ("half the chunks", lambda: _chunks(out) >= N_DB // CHUNK // 2, rng.uniform(0, 0.3)),
        ("training", lambda: (work / "train" / "train_state.json").exists(), rng.uniform(0, 0.2)),
        ("writing the bundle", lambda: bool(list(out.parent.glob(f".{out.name}.tmp-*"))), 0.0),
        ("random", lambda: True, rng.uniform(2.0, 8.0)),
    ]
    kills = 0
    for label, ready, delay in moments:
        chunks_before = _chunks(out)
        proc = subprocess.Popen(_cmd(ds, out), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and not ready() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        # never a partial or wrong bundle under the real name
        if out.exists():
            assert _answers(out, images) == reference, f"bundle left after a kill at {label!r} answers differently"
        assert _chunks(out) >= chunks_before, f"feature chunks were lost after a kill at {label!r}"
    assert kills >= 4

    chunks_before = _chunks(out)
    done = subprocess.run(_cmd(ds, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    reused = int(re.search(r"feature chunks reused\D+(\d+)", done.stdout).group(1))
    assert reused == chunks_before
    assert _answers(out, images) == reference
    assert not list(out.parent.glob(f".{out.name}.tmp-*")) and not list(out.parent.glob(f".{out.name}.old-*"))
    assert not (out.parent / f".{out.name}.lock").exists()  # the lock of the killed builds did not outlive them


def test_a_second_build_of_the_same_out_is_refused_naming_the_first(setup):
    """Two real `geoloc build-index` to one --out: the second exits 5 at once naming the first's pid; the first
    finishes with a bundle that answers like the reference."""
    root, ds, images, reference = setup
    out = root / "two" / "city"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(_cmd(ds, out), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    lock = out.parent / f".{out.name}.lock"
    deadline = time.monotonic() + 300
    while first.poll() is None and not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.poll() is None, "the first build ended before the second could start"
    first.send_signal(signal.SIGSTOP)  # holds the lock for as long as the second needs to start
    try:
        second = subprocess.run(_cmd(ds, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 5, second.stderr
    assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert _answers(out, images) == reference
