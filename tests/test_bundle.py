"""Damaged, foreign and newer bundles are refused with a message naming the file."""

from __future__ import annotations

import json
import shutil

import pytest

from citydata import TINY_CONFIG, write_dataset
from geoloc.build import build_index
from geoloc.bundle import FORMAT_VERSION, read_bundle
from geoloc.config import load_config
from geoloc.engine import Localizer
from geoloc.errors import BundleError
from geoloc.fileio import sha256_file, sha256_json


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    write_dataset(root / "ds", n_db=80, n_q=0)
    return build_index(database=root / "ds", out=root / "idx", config=load_config(TINY_CONFIG), progress=False).out


@pytest.fixture()
def bundle(pristine, tmp_path):
    copy = tmp_path / "idx"
    shutil.copytree(pristine, copy)
    return copy


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_pristine_bundle_loads(bundle):
    assert len(read_bundle(bundle).records) == 80


@pytest.mark.parametrize("offset", [0, 0.5, -1])
def test_one_flipped_byte_in_any_file_is_refused_naming_it(pristine, tmp_path, offset):
    for name in _files(pristine):
        copy = tmp_path / f"{name}-{offset}"
        shutil.copytree(pristine, copy)
        data = bytearray((copy / name).read_bytes())
        pos = int(offset * (len(data) - 1)) if offset >= 0 else len(data) - 1
        data[pos] ^= 0x01
        (copy / name).write_bytes(bytes(data))
        with pytest.raises(BundleError) as err:
            Localizer.load(copy)
        assert name in str(err.value) and "\n" not in str(err.value)


def test_truncated_index_is_refused(bundle):
    f = bundle / "index.faiss"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(BundleError, match="index.faiss"):
        read_bundle(bundle)


def test_missing_file_is_refused(bundle):
    (bundle / "cells.safetensors").unlink()
    with pytest.raises(BundleError, match="cells.safetensors.*missing"):
        read_bundle(bundle)


def test_edited_manifest_is_refused(bundle):
    mf = bundle / "manifest.json"
    m = json.loads(mf.read_text())
    m["cells"]["size_m"] = 50.0
    mf.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="manifest.json: checksum differs"):
        read_bundle(bundle)


def test_newer_format_version_is_refused(bundle):
    mf = bundle / "manifest.json"
    m = json.loads(mf.read_text())
    m["format_version"] = FORMAT_VERSION + 1
    m["manifest_sha256"] = sha256_json({k: v for k, v in m.items() if k != "manifest_sha256"})
    mf.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="newer than this geoloc reads"):
        read_bundle(bundle)


def test_escaping_record_path_is_refused_even_with_a_matching_checksum(bundle):
    listing = json.loads((bundle / "paths.json").read_text())
    listing["paths"][0] = "../../etc/passwd"
    (bundle / "paths.json").write_text(json.dumps(listing))
    mf = bundle / "manifest.json"
    m = json.loads(mf.read_text())
    m["files"]["paths.json"] = {"sha256": sha256_file(bundle / "paths.json"), "bytes": (bundle / "paths.json").stat().st_size}
    m["manifest_sha256"] = sha256_json({k: v for k, v in m.items() if k != "manifest_sha256"})
    mf.write_text(json.dumps(m))
    with pytest.raises(BundleError, match="escapes the dataset root"):
        read_bundle(bundle)


def test_not_a_bundle(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(BundleError, match="manifest.json: missing"):
        read_bundle(tmp_path / "x")
    (tmp_path / "x" / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="damaged manifest"):
        read_bundle(tmp_path / "x")


def test_build_refuses_to_overwrite_a_foreign_folder(tmp_path, pristine):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.tex").write_text("do not lose me")
    root = pristine.parent / "ds"
    with pytest.raises(BundleError, match="not a geoloc bundle"):
        build_index(database=root, out=target, config=load_config(TINY_CONFIG), progress=False)
    assert (target / "thesis.tex").read_text() == "do not lose me"


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from geoloc.bundle import read_manifest  # noqa: E402

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                     max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["format", "format_version", "files", "backbone", "descriptor_dim", "cells", "config",
                            "manifest_sha256", "extra"]),
       value=_json, drop=st.booleans(), reseal=st.booleans())
def test_manifest_reader_refuses_any_mangled_manifest_cleanly(pristine, tmp_path_factory, key, value, drop, reseal):
    """Any change to any manifest key either loads a working bundle or raises one BundleError line."""
    folder = tmp_path_factory.mktemp("m") / "idx"
    shutil.copytree(pristine, folder)
    m = json.loads((pristine / "manifest.json").read_text())
    if drop:
        m.pop(key, None)
    else:
        m[key] = value
    if reseal:  # recompute the self-checksum, so the structural checks are reached too
        m["manifest_sha256"] = sha256_json({k: v for k, v in m.items() if k != "manifest_sha256"})
    (folder / "manifest.json").write_text(json.dumps(m))
    try:
        loc = Localizer.load(folder)
    except BundleError as err:
        assert "\n" not in str(err) and str(folder) in str(err)
    else:  # only harmless changes (an extra key, a new creation date, ...) load
        assert read_manifest(folder) == m
        assert len(loc.localize_descriptors(loc.bundle.index.vectors()[0][:2], mode="hybrid")) == 2


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_manifest_reader_refuses_arbitrary_bytes(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("b")
    (folder / "manifest.json").write_bytes(data)
    with pytest.raises(BundleError):
        read_manifest(folder)
