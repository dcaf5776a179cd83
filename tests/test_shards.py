"""Geographic shards (index.shards): answers equal the unsharded index's in every mode, the files
are memory-mapped, the bundle lists and checksums them, and a missing or damaged shard is one line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest

from citydata import TINY_CONFIG, write_dataset
from geoloc.bench.synthetic import make_cell_data
from geoloc.config import IndexConfig, load_config
from geoloc.errors import EXIT_INPUT, BundleError
from geoloc.index import CellIndex
from geoloc.index.shards import SHARD_CELLS_FILE, ShardSet, plan_shards, shard_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One FAISS thread: OpenMP spinning on a shared 2-core machine makes PQ training 10x slower."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return make_cell_data(12000, 32, nq=24)


def _cfg(**kw) -> IndexConfig:
    return IndexConfig(use_gpu=False, quantizer="flat", **kw)


def _build(data, **kw) -> CellIndex:
    return CellIndex.build(descriptors=data.xb, cells=data.cells, prototypes=data.prototypes,
                           neighbours=data.neighbours, config=_cfg(**kw))


SEARCHES = [
    dict(mode="classify", top_cells=5),
    dict(mode="retrieve", k=10),
    dict(mode="hybrid", top_cells=5, k=10),
    dict(mode="hybrid", top_cells=5, k=10, neighbours=True),
    dict(mode="hybrid", top_cells=3, k=10, neighbours=True, fusion_weight=0.7),
    dict(mode="hybrid", top_cells=5, k=10, fusion_weight=0.3),
]


def _same(a, b) -> None:
    assert np.array_equal(a.cell_ids, b.cell_ids)
    assert np.array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.scores, b.scores, rtol=0, atol=1e-6)
    assert np.array_equal(a.lists, b.lists) and np.array_equal(a.scanned, b.scanned)


@pytest.mark.parametrize("codec,refine", [("flat", "none"), ("pq", "none"), ("sq8", "flat")])
def test_sharded_answers_equal_unsharded_in_every_mode(data, tmp_path, codec, refine):
    kw = dict(codec=codec, refine=refine, pq_m=4 if codec == "pq" else 0)
    one = _build(data, **kw)
    built = _build(data, shards=4, **kw)
    assert built.n_shards == 4 and built.ntotal == one.ntotal and built.faiss_index.ntotal == 0
    built.save(tmp_path)
    for s in range(4):
        assert (tmp_path / shard_file(s)).is_file()
    mapped = CellIndex.load(tmp_path, config=_cfg())
    in_ram = CellIndex.load(tmp_path, config=_cfg(mmap=False))
    assert mapped.shards.mapped and not in_ram.shards.mapped
    for search in SEARCHES:
        for batch in (data.xq, data.xq[:1], data.xq[:5]):  # one query (the engine's call), small, BLAS-sized
            ref = one.search(batch, **search)
            for idx in (built, mapped, in_ram):
                _same(ref, idx.search(batch, **search))
    x1, c1 = one.vectors()
    x2, c2 = mapped.vectors()
    assert np.array_equal(x1, x2) and np.array_equal(c1, c2)
    for c in (0, 7, one.nlist - 1):
        assert np.array_equal(np.sort(one.cell_members(c)), np.sort(mapped.cell_members(c)))
    lists = np.array([[0, one.nlist - 1, -1]], np.int64)
    a, b = one.search_lists(data.xq[:1], lists, 5), mapped.search_lists(data.xq[:1], lists, 5)
    assert np.array_equal(a[1], b[1])


def test_chunked_sharded_build_equals_build(data):
    cfg = _cfg(codec="sq8", shards=3)
    chunks = [(data.xb[i:i + 5000], data.cells[i:i + 5000]) for i in range(0, len(data.xb), 5000)]
    from geoloc.index.lists import training_sample

    a = CellIndex.build_chunked(chunks=chunks, train_sample=training_sample(data.xb, "sq8"),
                                prototypes=data.prototypes, neighbours=data.neighbours, config=cfg)
    b = CellIndex.build(descriptors=data.xb, cells=data.cells, prototypes=data.prototypes,
                        neighbours=data.neighbours, config=_cfg(codec="sq8"))
    for search in SEARCHES:
        _same(b.search(data.xq, **search), a.search(data.xq, **search))


def test_query_touches_only_the_shards_that_own_its_lists(data):
    idx = _build(data, shards=8)
    res = idx.search(data.xq, mode="hybrid", top_cells=1, k=5)
    assert (idx.shards_touched(res.lists) == 1).all()
    owner = idx.shards.owner
    routed = idx.shards.route(res.lists)
    assert {s for s, *_ in routed} == set(owner[res.lists[:, 0]].tolist())
    for lists in (res.lists, res.lists[:1]):  # the fan-out form (shards on other hosts) answers the same
        for bonus in (None, np.full(lists.shape, 0.25, np.float32)):
            a = idx.shards.search(data.xq[:len(lists)], lists, 10, bonus)
            b = idx.shards.search_routed(data.xq[:len(lists)], lists, 10, bonus)
            assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])
    wide = idx.search(data.xq, mode="hybrid", top_cells=5, k=5, neighbours=True)
    for lists in (wide.lists, wide.lists[:1]):
        a = idx.shards.search(data.xq[:len(lists)], lists, 10)
        b = idx.shards.search_routed(data.xq[:len(lists)], lists, 10)
        assert np.array_equal(a[1], b[1])
    touched = idx.shards_touched(wide.lists)
    expect = [len(set(owner[row[row >= 0]].tolist())) for row in wide.lists]
    assert touched.tolist() == expect and (touched >= 1).all()


def test_plan_shards_cuts_the_cell_order_into_balanced_contiguous_runs():
    rng = np.random.default_rng(0)
    sizes = rng.integers(10, 400, size=1000)
    owner = plan_shards(sizes, 8)
    assert owner.min() == 0 and owner.max() == 7 and (np.diff(owner) >= 0).all()  # contiguous in cell order
    load = np.bincount(owner, weights=sizes)
    assert load.max() / load.min() < 1.2
    order = rng.permutation(1000)
    owner2 = plan_shards(sizes, 4, order=order)
    assert (np.diff(owner2[order]) >= 0).all() and owner2.max() == 3
    assert plan_shards(np.array([5, 5]), 16).tolist() == [0, 1]  # no more shards than cells
    one = plan_shards(np.array([10_000, 1, 1, 1]), 4)  # a huge cell: every shard still owns a cell
    assert len(np.unique(one)) == one.max() + 1
    with pytest.raises(ValueError, match="permutation"):
        plan_shards(sizes, 4, order=np.zeros(1000, np.int64))


def test_missing_or_damaged_shard_file_is_one_line(data, tmp_path):
    _build(data, shards=3).save(tmp_path)
    (tmp_path / shard_file(1)).unlink()
    with pytest.raises(BundleError, match="shard-0001.faiss") as err:
        CellIndex.load(tmp_path, config=_cfg())
    assert "\n" not in str(err.value)
    (tmp_path / shard_file(1)).write_bytes(b"not a faiss file")
    with pytest.raises(BundleError, match="shard-0001.faiss"):
        CellIndex.load(tmp_path, config=_cfg())
    np.save(tmp_path / SHARD_CELLS_FILE, np.zeros(5, np.int64))
    with pytest.raises(BundleError, match=SHARD_CELLS_FILE):
        CellIndex.load(tmp_path, config=_cfg())


def test_resaving_unsharded_removes_shard_files(data, tmp_path):
    _build(data, shards=3).save(tmp_path)
    _build(data).save(tmp_path)
    assert not list(tmp_path.glob("shard-*")) and not (tmp_path / SHARD_CELLS_FILE).exists()
    assert CellIndex.load(tmp_path, config=_cfg()).shards is None


def test_resaving_leaves_files_it_did_not_write(data, tmp_path):
    mine = [tmp_path / "shard-notes.faiss", tmp_path / "shard-7.faiss"]
    for p in mine:
        p.write_bytes(b"user data")
    _build(data, shards=3).save(tmp_path)
    _build(data, shards=2).save(tmp_path)
    assert not (tmp_path / shard_file(2)).exists() and (tmp_path / shard_file(1)).exists()
    _build(data).save(tmp_path)
    assert [p.read_bytes() for p in mine] == [b"user data"] * 2


# -- the bundle --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    from geoloc.build import build_index

    root = tmp_path_factory.mktemp("shardbundle")
    write_dataset(root / "ds", n_db=120, n_q=6)
    for name, shards in (("one", 1), ("sharded", 3)):
        cfg = load_config(TINY_CONFIG).set("index.shards", shards)
        build_index(database=root / "ds", out=root / name, config=cfg, progress=False)
    return root


def test_sharded_bundle_lists_checksums_and_answers_like_unsharded(bundles):
    from geoloc.engine import Localizer

    manifest = json.loads((bundles / "sharded" / "manifest.json").read_text())
    shards = manifest["index_shards"]
    assert shards["count"] >= 2 and shards["files"] == [shard_file(s) for s in range(shards["count"])]
    for name in [*shards["files"], SHARD_CELLS_FILE]:
        assert name in manifest["files"] and manifest["files"][name]["bytes"] == (bundles / "sharded" / name).stat().st_size
    a, b = Localizer.load(bundles / "one"), Localizer.load(bundles / "sharded")
    assert b.bundle.index.n_shards == shards["count"]
    queries = sorted(str(p) for p in (bundles / "ds" / "queries").iterdir())
    for mode in ("classify", "retrieve", "hybrid"):
        for pa, pb in zip(a.localize(queries, mode=mode), b.localize(queries, mode=mode)):
            ja, jb = pa.to_json(), pb.to_json()
            ja.pop("timings_ms", None)
            jb.pop("timings_ms", None)
            assert ja == jb


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_missing_or_corrupt_shard_in_a_bundle_is_one_line_and_exit_code(bundles, tmp_path, damage):
    from typer.testing import CliRunner

    from geoloc.bundle import read_bundle
    from geoloc.cli import app

    copy = tmp_path / "b"
    shutil.copytree(bundles / "sharded", copy)
    f = copy / shard_file(1)
    if damage == "missing":
        f.unlink()
    else:
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 1
        f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="shard-0001.faiss") as err:
        read_bundle(copy)
    assert "\n" not in str(err.value)
    res = CliRunner().invoke(app, ["info", str(copy)])
    assert res.exit_code == EXIT_INPUT and "shard-0001.faiss" in res.output


def test_serve_answers_from_a_sharded_bundle(bundles):
    pytest.importorskip("fastapi", reason="the serve extra is not installed")
    httpx = pytest.importorskip("httpx")
    from geoloc.engine import Localizer
    from geoloc.serve import ServerThread, create_app

    loc = Localizer.load(bundles / "sharded")
    q = sorted((bundles / "ds" / "queries").iterdir())[0]
    want = loc.localize([str(q)], mode="hybrid")[0].to_json()
    with ServerThread(create_app(loc)) as url, httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/localize", params={"mode": "hybrid"}, files={"image": (q.name, q.read_bytes(), "image/jpeg")})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["candidate_ids"] == want["candidate_ids"] and got["match"] == want["match"]
    assert got["candidate_scores"] == pytest.approx(want["candidate_scores"], abs=1e-6)



def test_scale_benchmark_smoke(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import scale
    finally:
        sys.path.pop(0)
    out = tmp_path / "scale.json"
    assert scale.main(["--size", "20000", "--dim", "32", "--shards", "4", "--codec", "sq8", "--queries", "16", "--workers", "1",
                       "--no-ray", "--budget", "0.2", "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["size"] == 20000 and rep["shards"] == 4 and rep["disk_bytes"] > 0
    assert rep["equal_to_in_memory"] is True and rep["latency_ms"]["warm"]["hybrid"] > 0
    assert "extrapolation" in rep and rep["extrapolation"]["label"].startswith("EXTRAPOLATION")
    assert not (tmp_path / "work").exists()  # its own work folder is removed at the end

    # the extrapolation alone, from the saved report, with extraction at a given rate
    again = tmp_path / "again.json"
    assert scale.main(["--extrapolate-from", str(out), "--extract-rate", "10", "--cores-per-machine", "4",
                       "--out", str(again)]) == 0
    rows = json.loads(again.read_text())["extrapolation"]["rows"]
    assert rows[0]["machines"] == 1 and rows[0]["extract_hours"] == pytest.approx(1e8 / (10 * 4) / 3600)
    assert rows[1]["extract_hours"] == pytest.approx(rows[0]["extract_hours"] / 2)

    # a --work folder it did not make is refused, and left as it was
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("user data")
    with pytest.raises(SystemExit, match="not made by this script"):
        scale.main(["--size", "20000", "--dim", "32", "--no-ray", "--work", str(theirs), "--out", str(out)])
    assert (theirs / "keep.txt").read_text() == "user data"
