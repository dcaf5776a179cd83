"""Packaging: what the sdist and the wheel carry, the metadata, and (slow) that an unpacked sdist
runs its tests and a wheel installed in a fresh venv works from another directory.

The distributions are built offline with setuptools' own PEP 517 hooks (``setuptools.build_meta``,
the backend pyproject.toml names), in a copy of the source tree, so the checkout is left alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = ("geoloc", "tests", "configs", "docs", "benchmarks")
"""Folders of a checkout (or an unpacked sdist) the distributions are made from."""

SETUPTOOLS_MIN = (77,)
"""PEP 639 licence expressions (``license = "Apache-2.0"``, ``license-files``)."""


def _setuptools_ok() -> bool:
    try:
        v = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        return False
    return tuple(int(p) for p in v.split(".")[:1] if p.isdigit()) >= SETUPTOOLS_MIN


pytestmark = pytest.mark.skipif(not _setuptools_ok(), reason="needs setuptools>=77 (the build requirement)")


def _copy_source(dst: Path) -> Path:
    """The project's files without venvs, build outputs, bundles, runs or caches."""
    dst.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.py[cod]", ".pytest_cache", ".hypothesis", "*.egg-info")
    for item in ROOT.iterdir():
        if item.is_file() and not item.name.startswith("."):
            shutil.copy2(item, dst / item.name)
    for name in TREES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, dst / name, ignore=ignore)  # configs/ links become files
    if (ROOT / "indexes" / "README.md").is_file():
        (dst / "indexes").mkdir()
        shutil.copy2(ROOT / "indexes" / "README.md", dst / "indexes" / "README.md")
    return dst


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """Build the sdist and the wheel once: ``{"src", "sdist", "wheel"}``."""
    base = tmp_path_factory.mktemp("pkg")
    src = _copy_source(base / "src")
    out = base / "dist"
    built = {}
    for kind in ("sdist", "wheel"):  # one process each: setuptools keeps state between hooks
        code = f"import sys; from setuptools import build_meta as b; print('BUILT', b.build_{kind}(sys.argv[1]))"
        run = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True, check=False, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        built[kind] = out / next(line for line in run.stdout.splitlines() if line.startswith("BUILT ")).split()[1]
        assert built[kind].is_file()
    return {"src": src, **built}


def _sdist_names(sdist: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(sdist) as tf:
        members = tf.getmembers()
    top = sdist.name[: -len(".tar.gz")] + "/"
    return {m.name[len(top):]: m for m in members if m.name.startswith(top)}


def _expected_sources() -> set[str]:
    want = {"LICENSE", "README.md", "pyproject.toml", "MANIFEST.in", "tests/conftest.py", "tests/citydata.py"}
    want |= {f"tests/{p.name}" for p in (ROOT / "tests").glob("*.py")}
    want |= {f"geoloc/configs/{p.name}" for p in (ROOT / "geoloc" / "configs").glob("*.yaml")}
    want |= {f"configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")}
    want |= {p.relative_to(ROOT).as_posix() for p in (ROOT / "geoloc").rglob("*.py") if "__pycache__" not in p.parts}
    return want


# -- sdist ------------------------------------------------------------------------------------------
def test_sdist_carries_tests_helpers_configs_and_license(dists):
    names = _sdist_names(dists["sdist"])
    want = _expected_sources()
    assert len([n for n in want if n.endswith(".yaml")]) >= 10  # presets in the package and configs/ links
    missing = sorted(want - set(names))
    assert not missing, f"sdist lacks {missing}"
    assert all(names[n].isfile() for n in want)  # configs/ links arrive as regular files
    junk = [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyo")) or n.startswith((".venv", "runs/"))]
    assert not junk, junk
    with tarfile.open(dists["sdist"]) as tf:
        top = dists["sdist"].name[: -len(".tar.gz")]
        lic = tf.extractfile(f"{top}/LICENSE").read()
        demo = tf.extractfile(f"{top}/configs/demo.yaml").read()
    assert lic == (ROOT / "LICENSE").read_bytes()
    assert demo == (ROOT / "geoloc" / "configs" / "demo.yaml").read_bytes()


def test_metadata_spdx_licence_and_extras(dists):
    with tarfile.open(dists["sdist"]) as tf:
        pkg_info = tf.extractfile(dists["sdist"].name[: -len(".tar.gz")] + "/PKG-INFO").read().decode()
    lines = set(pkg_info.splitlines())
    assert "License-Expression: Apache-2.0" in lines and "License-File: LICENSE" in lines
    assert 'Requires-Dist: faiss-gpu>=1.15; extra == "gpu"' in lines
    assert 'Requires-Dist: faiss-cpu>=1.8; extra == "cpu"' in lines
    assert not any(line.startswith("Classifier: License ::") for line in lines)  # PEP 639: the expression only
    assert not any("faiss-gpu-cu12" in line for line in lines)


# -- wheel ------------------------------------------------------------------------------------------
def test_wheel_carries_presets_and_license_not_tests(dists):
    with zipfile.ZipFile(dists["wheel"]) as zf:
        names = set(zf.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        entry_points = zf.read(f"{dist_info}/entry_points.txt").decode()
        lic = zf.read(f"{dist_info}/licenses/LICENSE")
    presets = {f"geoloc/configs/{p.name}" for p in (ROOT / "geoloc" / "configs").glob("*.yaml")}
    assert presets and presets <= names
    assert lic == (ROOT / "LICENSE").read_bytes()
    assert "geoloc = geoloc.cli:main" in entry_points
    assert not [n for n in names if n.startswith(("tests/", "configs/", "benchmarks/"))]


def test_license_is_the_apache_2_text():
    text = (ROOT / "LICENSE").read_text()
    for part in ("Apache License", "Version 2.0, January 2004", "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION",
                 "9. Accepting Warranty or Additional Liability", "END OF TERMS AND CONDITIONS"):
        assert part in text
    assert len(text) > 11_000  # the full text, not a one-line notice


# -- slow: an unpacked sdist runs its tests; a wheel in a fresh venv runs from anywhere ------------
def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.mark.slow
def test_unpacked_sdist_runs_its_tests(dists, tmp_path):
    with tarfile.open(dists["sdist"]) as tf:
        tf.extractall(tmp_path, filter="data")
    root = tmp_path / dists["sdist"].name[: -len(".tar.gz")]
    where = subprocess.run([sys.executable, "-c", "import geoloc; print(geoloc.__file__)"], cwd=root, env=_env(),
                           capture_output=True, text=True, check=False, timeout=120)
    assert Path(where.stdout.strip()).resolve().is_relative_to(root.resolve()), where  # the sdist's own code
    # tests that use the shared helpers (conftest.py); the whole suite takes too long for one test
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_layouts.py",
                          "tests/test_geo.py"], cwd=root, env=_env(), capture_output=True, text=True, check=False, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1] and "error" not in run.stdout.splitlines()[-1]


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_from_another_directory(dists, tmp_path):
    """A venv of its own (this interpreter's base Python) that borrows the heavy dependencies
    (torch, timm, faiss...) from the current environment through a .pth line, geoloc itself from
    the wheel only; every command runs in a folder that is not the checkout."""
    venv = tmp_path / "venv"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "zz_borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    inst = subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(dists["wheel"])],
                          capture_output=True, text=True, check=False, timeout=300)
    assert inst.returncode == 0, inst.stderr[-2000:]
    work = tmp_path / "elsewhere"
    work.mkdir()
    geoloc = str(venv / "bin" / "geoloc")

    def run(*cmd: str, timeout: int = 600) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), cwd=work, env=_env(), capture_output=True, text=True, check=False, timeout=timeout)

    where = run(str(py), "-c", "import geoloc; print(geoloc.__file__)")
    assert Path(where.stdout.strip()).is_relative_to(site), where
    from geoloc import __version__

    version = run(geoloc, "--version")
    assert version.returncode == 0 and version.stdout.strip().endswith(__version__), version
    demo_help = run(str(py), "-m", "geoloc.demo", "--help")
    assert demo_help.returncode == 0 and "--workdir" in demo_help.stdout, demo_help.stderr[-2000:]
    city = run(geoloc, "synth-city", "--out", "city", "--extent-m", "60", "--queries", "2", "--headings", "1", "-q")
    assert city.returncode == 0, city.stderr[-2000:]
    build = run(geoloc, "build-index", "--config", "demo", "--database", "city", "--out", "indexes/city",
                "--set", "backbone.image_size=64", "--set", "cells.min_images_per_cell=2", "--set", "train.epochs=1")
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    import json

    manifest = json.loads((work / "indexes" / "city" / "manifest.json").read_text())
    assert manifest["cells"]["size_m"] == 25.0  # the demo preset's cell size (the default is 20), found by name
    assert manifest["backbone"]["name"] == "efficientnet_lite0" and manifest["backbone"]["input_size"] == 64
