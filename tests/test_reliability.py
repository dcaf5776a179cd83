"""Issue 11: nothing lost, nothing wrong, never stuck, one line instead of a traceback.

Covers the bundle's and the file layer's part: foreign ``--out`` folders are refused before any
work and left intact; a build holds a lock on its ``--out``; a reader during rebuilds sees one
whole bundle; bundle files follow the umask; a re-sealed bundle (valid checksums) holding
nonsense is refused; FIFOs and devices never hang a read; a full disk or a read-only file system
is one line and leaves nothing half-written. Hangs are guarded with ``signal.alarm``.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import faiss
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from citydata import REPO, TINY_CONFIG, write_dataset
from guards import deadline
from geoloc import bundle as bundle_mod
from geoloc.build import build_index
from geoloc.bundle import (BuildLockedError, OutputRefusedError, build_lock, check_output, lock_path, read_bundle,
                           read_manifest, read_verified_manifest, verify_files, write_bundle)
from geoloc.config import load_config
from geoloc.errors import BundleError, GeolocError
from geoloc.fileio import (OutputError, atomic_write_bytes, open_regular, read_bounded, sha256_file, sha256_json,
                           translate_write_errors)

ENV = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rel")
    write_dataset(root / "ds", n_db=80, n_q=0)
    return build_index(database=root / "ds", out=root / "idx", config=load_config(TINY_CONFIG), progress=False).out


@pytest.fixture()
def bundle(pristine, tmp_path) -> Path:
    copy = tmp_path / "idx"
    shutil.copytree(pristine, copy)
    return copy


def rewrite(b, out: Path, **stats) -> Path:
    """Write the loaded bundle ``b`` again at ``out`` (a quick real write_bundle)."""
    return write_bundle(out, config=b.config, backbone_info=b.manifest["backbone"], table=b.table, records=b.records,
                        filed=b.filed, projection=b.projection, prototypes=b.prototypes, index=b.index, skipped=[],
                        stats=stats)


def reseal(folder: Path) -> None:
    """Recompute every file's sha256 and size and the manifest's own checksum (a careful forger)."""
    mf = folder / "manifest.json"
    m = json.loads(mf.read_text())
    for name in m["files"]:
        m["files"][name] = {"sha256": sha256_file(folder / name), "bytes": (folder / name).stat().st_size}
    m.pop("manifest_sha256")
    m["manifest_sha256"] = sha256_json(m)
    mf.write_text(json.dumps(m))


def one_line_error(exc_info) -> str:
    msg = str(exc_info.value)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- data loss ------------------------------------------------------------------------------------

def _web_app(folder: Path) -> dict[str, bytes]:
    (folder / "src").mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"name": "My App", "start_url": "/", "display": "standalone"}))
    (folder / "src" / "main.js").write_text("console.log('my work');\n")
    return tree(folder)


def test_a_web_app_folder_with_a_manifest_json_is_refused_and_kept(pristine, tmp_path):
    app = tmp_path / "myapp"
    before = _web_app(app)
    with pytest.raises(OutputRefusedError) as err:
        check_output(app)
    assert "myapp" in one_line_error(err) and "not a geoloc bundle" in str(err.value)
    with pytest.raises(OutputRefusedError):
        rewrite(read_bundle(pristine), app)
    assert tree(app) == before
    assert [p.name for p in tmp_path.iterdir()] == ["myapp"]  # no temporary folder or lock left beside it


def test_build_index_refuses_a_foreign_out_before_any_work(pristine, tmp_path, monkeypatch):
    import geoloc.build as build

    app = tmp_path / "myapp"
    before = _web_app(app)

    def no_work(*_a, **_k):
        raise AssertionError("feature extraction started before --out was checked")

    monkeypatch.setattr(build, "extract_features", no_work)
    with pytest.raises(OutputRefusedError):
        build_index(database=pristine.parent / "ds", out=app, config=load_config(TINY_CONFIG), progress=False)
    assert tree(app) == before


@pytest.mark.parametrize("case", ["file", "symlink", "extra-file", "edited-manifest", "fake-format"])
def test_check_output_refuses_what_it_cannot_prove_it_wrote(bundle, tmp_path, case):
    target = bundle
    if case == "file":
        target = tmp_path / "notes.txt"
        target.write_text("mine")
    elif case == "symlink":
        target = tmp_path / "link"
        target.symlink_to(bundle)
    elif case == "extra-file":
        (bundle / "thesis.tex").write_text("mine")
    elif case == "edited-manifest":
        m = json.loads((bundle / "manifest.json").read_text())
        m["created"] = "yesterday"
        (bundle / "manifest.json").write_text(json.dumps(m))
    elif case == "fake-format":
        (bundle / "manifest.json").write_text(json.dumps({"format": "geoloc-bundle", "files": {}}))
    before = tree(tmp_path)
    with pytest.raises(OutputRefusedError) as err:
        check_output(target)
    one_line_error(err)
    assert err.value.exit_code == 5
    assert tree(tmp_path) == before


def test_check_output_accepts_new_empty_and_own_bundle(bundle, tmp_path):
    check_output(tmp_path / "new" / "deeper")
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty")
    check_output(bundle)
    old = read_bundle(bundle)
    rewrite(old, bundle, note="again")
    assert read_bundle(bundle).manifest["stats"] == {"note": "again"}


def test_an_older_format_bundle_may_be_replaced(bundle):
    m = json.loads((bundle / "manifest.json").read_text())
    m["format_version"] = 0
    m.pop("manifest_sha256")
    m["manifest_sha256"] = sha256_json(m)
    (bundle / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="older"):
        read_bundle(bundle)
    check_output(bundle)  # a verified bundle of ours, only old: rebuilding over it is the advice


# -- locks ----------------------------------------------------------------------------------------

_HOLD = textwrap.dedent("""
    import sys, time
    from geoloc.bundle import build_lock
    with build_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
""")


def test_a_second_build_is_refused_naming_the_pid_and_a_killed_holder_frees_the_lock(tmp_path):
    out = tmp_path / "idx"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BuildLockedError) as err:
            with build_lock(out):
                pass
        assert f"pid {holder.pid}" in one_line_error(err) and str(out) in str(err.value)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with build_lock(out) as lp:  # the kernel released the dead holder's lock
        assert lp.read_text().strip() == str(os.getpid())
        with build_lock(out):  # re-entrant in one thread (build_index holds it around write_bundle)
            pass
    assert not lock_path(out).exists()


_WRITER = textwrap.dedent("""
    import sys, time, traceback
    import numpy as np, dataclasses
    from pathlib import Path
    from geoloc.bundle import BuildLockedError, library_versions, read_bundle, write_bundle
    src, out, secs, mode = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    b = read_bundle(src)
    library_versions()  # imports torch and timm: seconds, not part of a write
    print("ready", flush=True)
    n = len(b.records)
    wrote = refused = 0
    t_end = time.monotonic() + secs
    i = 0
    while time.monotonic() < t_end:
        v = i % 2 if mode == "alternate" else 0
        rec = dataclasses.replace(b.records, heading=np.full(n, v, np.float32))
        try:
            write_bundle(out, config=b.config, backbone_info=b.manifest["backbone"], table=b.table, records=rec,
                         filed=b.filed, projection=b.projection, prototypes=b.prototypes, index=b.index,
                         skipped=[], stats={"variant": v, "i": i})
            wrote += 1
        except BuildLockedError:
            refused += 1
        except Exception:
            traceback.print_exc()
            sys.exit(1)
        i += 1
    print(wrote, refused, flush=True)
""")


def _writer(src: Path, out: Path, secs: float, mode: str) -> subprocess.Popen:
    """A process writing the bundle at ``out`` for ``secs`` seconds once it printed ``ready``."""
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(src), str(out), str(secs), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _ready(p: subprocess.Popen) -> None:
    line = p.stdout.readline().strip()
    if line != "ready":
        p.wait(timeout=60)
        raise AssertionError(f"writer did not start: {line!r} {p.stderr.read()[-2000:]}")


def test_two_processes_writing_the_same_out_never_crash(pristine, tmp_path):
    out = tmp_path / "idx"
    procs = [_writer(pristine, out, 4.0, "same") for _ in range(2)]
    for p in procs:
        _ready(p)
    results = []
    for p in procs:
        so, se = p.communicate(timeout=120)
        assert p.returncode == 0, se[-2000:]
        results.append(tuple(int(x) for x in so.split()))
    assert sum(w for w, _ in results) >= 2
    assert len(read_bundle(out).records) == 80
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary folder, old folder or lock left


# -- readers during rebuilds ----------------------------------------------------------------------

def test_a_reader_during_rebuilds_sees_one_whole_bundle_never_a_false_alarm(pristine, tmp_path):
    out = tmp_path / "idx"
    first = read_bundle(pristine)
    first.records = dataclasses.replace(first.records, heading=np.zeros(len(first.records), np.float32))
    rewrite(first, out, variant=0, i=-1)
    writer = _writer(pristine, out, 8.0, "alternate")
    _ready(writer)
    loads, seen, t_end = 0, set(), time.monotonic() + 7.0
    try:
        while time.monotonic() < t_end and writer.poll() is None:
            b = read_bundle(out)  # must never raise: no false "checksum differs", no "missing"
            v = b.manifest["stats"]["variant"]
            assert np.all(b.records.heading == v), "manifest of one bundle, records of another"
            seen.add(b.manifest["stats"]["i"])
            assert read_verified_manifest(out)["format"] == "geoloc-bundle"  # what `geoloc info` reads
            loads += 1
    finally:
        so, se = writer.communicate(timeout=120)
    assert writer.returncode == 0, se[-2000:]
    wrote = int(so.split()[0])
    assert loads >= 20 and wrote >= 5 and len(seen) >= 3, (loads, wrote, seen)


# -- permissions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_bundle_files_follow_the_umask(pristine, tmp_path, umask):
    old = os.umask(umask)
    try:
        out = rewrite(read_bundle(pristine), tmp_path / "idx")
        atomic_write_bytes(tmp_path / "x.bin", b"x")
    finally:
        os.umask(old)
    for f in [*out.iterdir(), tmp_path / "x.bin"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


# -- bundles checked for meaning ------------------------------------------------------------------

def _edit_ids(folder: Path, edit) -> None:
    index = faiss.read_index(str(folder / "index.faiss"))
    inv = index.invlists
    c = next(c for c in range(index.nlist) if inv.list_size(c) >= 2)
    ids, codes = faiss.contrib.inspect_tools.get_invlist(inv, c)
    ids = edit(ids.copy())
    inv.resize(c, 0)
    inv.add_entries(c, len(ids), faiss.swig_ptr(np.ascontiguousarray(ids, np.int64)),
                    faiss.swig_ptr(np.ascontiguousarray(codes)))
    faiss.write_index(index, str(folder / "index.faiss"))


def _swap_ids_between_lists(folder: Path) -> None:
    index = faiss.read_index(str(folder / "index.faiss"))
    inv = index.invlists
    a, b = [c for c in range(index.nlist) if inv.list_size(c) >= 1][:2]
    (ia, ca), (ib, cb) = (faiss.contrib.inspect_tools.get_invlist(inv, c) for c in (a, b))
    ia, ib = ia.copy(), ib.copy()
    ia[0], ib[0] = ib[0], ia[0]
    for c, ids, codes in ((a, ia, ca), (b, ib, cb)):
        inv.resize(c, 0)
        inv.add_entries(c, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(np.ascontiguousarray(codes)))
    faiss.write_index(index, str(folder / "index.faiss"))


def _edit_records(folder: Path, field: str, edit) -> None:
    rec = load_file(folder / "records.safetensors")
    rec[field] = edit(rec[field].copy())
    save_file(rec, folder / "records.safetensors")


def _ids_out_of_range(ids):
    ids[0] = 10_000
    return ids


def _ids_negative(ids):
    ids[0] = -7
    return ids


def _ids_duplicate(ids):
    ids[1] = ids[0]
    return ids


def _set0(value):
    def f(a):
        a[0] = value
        return a
    return f


@pytest.mark.parametrize("damage,word", [
    (lambda f: _edit_ids(f, _ids_out_of_range), "row ids outside"),
    (lambda f: _edit_ids(f, _ids_negative), "row ids outside"),
    (lambda f: _edit_ids(f, _ids_duplicate), "not each present once"),
    (_swap_ids_between_lists, "filed under another cell"),
    (lambda f: _edit_records(f, "lat", _set0(np.nan)), "not finite or out of range"),
    (lambda f: _edit_records(f, "lon", _set0(200.0)), "not finite or out of range"),
    (lambda f: _edit_records(f, "east", _set0(np.inf)), "not finite or out of range"),
    (lambda f: _edit_records(f, "north", lambda a: a + 500.0), "dropped cells"),
    (lambda f: _edit_records(f, "north", lambda a: a + 20.0), "another cell"),
    (lambda f: _edit_records(f, "filed", _set0(999)), "cells that do not exist"),
    (lambda f: _edit_records(f, "filed", lambda a: np.roll(a, 1)), "another cell|image counts|filed"),
    (lambda f: _edit_records(f, "heading", lambda a: a[:-1]), "shape"),
], ids=["id-out-of-range", "id-negative", "id-duplicate", "id-in-wrong-list", "lat-nan", "lon-200", "east-inf", "moved-away", "moved-a-cell", "filed-999",
        "filed-shuffled", "short-field"])
def test_a_resealed_bundle_holding_nonsense_is_refused_in_one_line(bundle, damage, word):
    damage(bundle)
    reseal(bundle)
    verify_files(bundle, read_manifest(bundle))  # the checksums are all valid...
    with pytest.raises(BundleError, match=word) as err:  # ...the content is not
        read_bundle(bundle)
    assert str(bundle) in one_line_error(err)


def test_the_meaning_checks_pass_on_every_real_bundle(pristine):
    b = read_bundle(pristine)
    assert b.index.ntotal == len(b.records) and b.filed.dtype == np.int64


# -- bounded reads --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "huge"])
def test_a_manifest_that_is_not_a_regular_file_is_one_line_never_a_hang(bundle, kind):
    mf = bundle / "manifest.json"
    mf.unlink()
    if kind == "fifo":
        os.mkfifo(mf)
    elif kind == "dev-zero":
        mf.symlink_to("/dev/zero")
    elif kind == "directory":
        mf.mkdir()
    else:
        with open(mf, "wb") as fh:
            fh.truncate(bundle_mod.MAX_MANIFEST_BYTES + 1)  # sparse: no disk used
    with deadline(10):
        for reader in (read_manifest, read_bundle, check_output):
            with pytest.raises(BundleError) as err:
                reader(bundle)
            assert "manifest.json" in one_line_error(err)


def test_geoloc_info_on_a_fifo_manifest_exits_with_one_line(bundle):
    (bundle / "manifest.json").unlink()
    os.mkfifo(bundle / "manifest.json")
    done = subprocess.run([sys.executable, "-m", "geoloc", "info", str(bundle)], capture_output=True, text=True,
                          timeout=60, env=ENV, cwd=REPO)
    assert done.returncode not in (0, 1) and "Traceback" not in done.stderr
    assert "manifest.json" in done.stderr and "FIFO" in done.stderr


@pytest.mark.parametrize("name", ["index.faiss", "records.safetensors", "paths.json"])
def test_a_bundle_member_that_is_a_fifo_or_link_is_refused(bundle, name):
    (bundle / name).unlink()
    os.mkfifo(bundle / name)
    with deadline(10), pytest.raises(BundleError, match=f"{name}.*(FIFO|regular)") as err:
        read_bundle(bundle)
    one_line_error(err)
    (bundle / name).unlink()
    (bundle / name).symlink_to("/dev/zero")
    with deadline(10), pytest.raises(BundleError, match=f"{name}.*(link|regular)"):
        read_bundle(bundle)


def test_bounded_readers(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 100)
    assert read_bounded(f, max_bytes=100) == b"x" * 100
    with pytest.raises(GeolocError, match="100 bytes"):
        read_bounded(f, max_bytes=99)
    os.mkfifo(tmp_path / "p")
    with deadline(5):
        with pytest.raises(GeolocError, match="FIFO"):
            open_regular(tmp_path / "p")
        with pytest.raises(GeolocError, match="FIFO"):
            sha256_file(tmp_path / "p")
        with pytest.raises(GeolocError, match="device"):
            read_bounded(Path("/dev/zero"), max_bytes=10)
    (tmp_path / "l").symlink_to(f)
    with pytest.raises(GeolocError, match="symbolic link"):
        open_regular(tmp_path / "l", follow_symlinks=False)


# -- disk full, read-only, permission ------------------------------------------------------------

@pytest.fixture()
def small_fs(tmp_path):
    """A 16 KiB tmpfs mounted at tmp_path/small (skipped where this test may not mount one)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root; the simulated ENOSPC tests cover this path")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the simulated ENOSPC tests cover this path")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_on_a_real_small_file_system(pristine, small_fs):
    size = sum(f.stat().st_size for f in pristine.iterdir())
    assert size > 16 * 1024, "the test bundle must not fit in the small file system"
    (small_fs / "idx").mkdir()
    with pytest.raises(OutputError) as err:
        rewrite(read_bundle(pristine), small_fs / "idx")
    msg = one_line_error(err)
    assert msg.startswith("no space left on device while writing ") and str(small_fs / "idx") in msg
    assert "free space or choose another --out" in msg and err.value.exit_code == 5
    assert sorted(p.name for p in small_fs.iterdir()) == ["idx"] and not any((small_fs / "idx").iterdir())


def test_torch_save_on_a_full_disk_is_one_line_with_the_helper(small_fs):
    torch = pytest.importorskip("torch")
    with pytest.raises(OutputError, match="no space left on device while writing .*opt.pt"):
        with translate_write_errors(small_fs / "opt.pt"):
            torch.save(torch.zeros(1 << 16), small_fs / "opt.pt")
    with pytest.raises(OutputError, match="no space left on device while writing .*blob"):
        atomic_write_bytes(small_fs / "blob", b"\0" * (1 << 20))
    assert not [p for p in small_fs.iterdir() if p.name.startswith(".blob")]


def test_a_read_only_file_system_is_refused_before_any_work(tmp_path, small_fs):
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    for out in (small_fs / "idx", small_fs / "a" / "b"):
        with pytest.raises(OutputError, match="read-only") as err:
            check_output(out)
        assert str(out) in one_line_error(err)


@pytest.mark.parametrize("where,err", [
    ("index", OSError(errno.ENOSPC, "No space left on device")),
    ("safetensors", RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")),
    ("torch-like", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")),
    ("readonly", OSError(errno.EROFS, "Read-only file system")),
    ("permission", OSError(errno.EACCES, "Permission denied")),
])
def test_a_failing_write_leaves_the_old_bundle_and_says_one_line(bundle, monkeypatch, where, err):
    """Simulated: runs everywhere. The old bundle at --out stays whole and loadable."""
    before = tree(bundle)
    b = read_bundle(bundle)

    def fail(*_a, **_k):
        raise err

    if where == "index":
        monkeypatch.setattr(type(b.index), "save", fail)
    else:
        monkeypatch.setattr(bundle_mod, "save_file", fail)
    if where == "torch-like":  # no reason given: the free space decides
        monkeypatch.setattr("geoloc.fileio._free_bytes", lambda _p: 4096)
    with pytest.raises(OutputError) as exc:
        rewrite(b, bundle)
    msg = one_line_error(exc)
    assert str(bundle) in msg
    want = {"readonly": "read-only", "permission": "permission denied"}.get(where, "no space left on device")
    assert want in msg
    assert tree(bundle) == before
    assert sorted(p.name for p in bundle.parent.iterdir()) == ["idx"]
    read_bundle(bundle)


def test_an_unrelated_runtime_error_is_not_disguised(bundle, monkeypatch):
    b = read_bundle(bundle)

    def fail(*_a, **_k):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(bundle_mod, "save_file", fail)
    with pytest.raises(RuntimeError, match="a real bug"):
        rewrite(b, bundle)
    read_bundle(bundle)


def test_atomic_write_maps_write_failures_to_one_line(tmp_path, monkeypatch):
    real_write = os.write

    for code, word in ((errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"), (errno.EACCES, "permission")):
        def failing(fd, data, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "write", failing)
        with pytest.raises(OutputError, match=word) as err:
            atomic_write_bytes(tmp_path / "a\nb.json", b"{}")
        assert "\n" not in str(err.value) and "a\\nb.json" in str(err.value)
        monkeypatch.setattr(os, "write", real_write)
        assert list(tmp_path.iterdir()) == []


def test_check_output_maps_an_unwritable_parent(tmp_path, monkeypatch):
    import tempfile

    def denied(*_a, **_k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    with pytest.raises(OutputError, match="permission denied") as err:
        check_output(tmp_path / "idx")
    one_line_error(err)
    (tmp_path / "f").write_text("x")
    monkeypatch.undo()
    with pytest.raises(OutputError, match="is not a folder"):
        check_output(tmp_path / "f" / "idx")


def test_records_heading_replace_keeps_other_fields(pristine):
    """Guard for the writer helper above: dataclasses.replace keeps every other record field."""
    b = read_bundle(pristine)
    r = dataclasses.replace(b.records, heading=np.zeros(len(b.records), np.float32))
    assert r.paths == b.records.paths and np.array_equal(r.lat, b.records.lat)


def test_check_output_file_before_work(tmp_path, monkeypatch):
    from geoloc.fileio import check_output_file

    check_output_file(tmp_path / "new" / "preds.json", flag="--predictions")  # a parent to create is fine
    assert not (tmp_path / "new").exists()
    with pytest.raises(OutputError, match="is a folder; --json needs a file name"):
        check_output_file(tmp_path, flag="--json")
    os.mkfifo(tmp_path / "p.json")
    with deadline(5), pytest.raises(OutputError, match="FIFO"):
        check_output_file(tmp_path / "p.json")
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is not a folder"):
        check_output_file(tmp_path / "f" / "out.json")
    import tempfile

    def rofs(*_a, **_k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", rofs)
    with pytest.raises(OutputError, match="read-only") as err:
        check_output_file(tmp_path / "out.json")
    assert err.value.exit_code == 5


def test_dot_as_out_is_a_folder_like_any_other(pristine, tmp_path, monkeypatch):
    work = tmp_path / "w"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    with pytest.raises(OutputRefusedError, match="keep.txt|not a geoloc bundle"):
        rewrite(read_bundle(pristine), Path("."))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"] and (work / "keep.txt").read_text() == "mine"
    (work / "keep.txt").unlink()
    assert rewrite(read_bundle(pristine), Path(".")) == Path(".")
    assert read_bundle(work).index.ntotal == 80
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w"]
