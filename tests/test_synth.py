"""Synthetic city generator: determinism, VPR names and labels, query placement, content sanity."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geoloc.errors import DatasetError
from geoloc.geo import latlon_to_utm
from geoloc.synth import (
    Look, build_city, contact_sheet, generate_city, load_city, place_city, render_aerial_tile, render_view,
    street_walk,
)
from geoloc.synth.writer import MARKER, query_look

TINY = dict(seed=3, extent_m=150.0, spacing_m=15.0, headings=2, n_queries=6, image_size=256, shift="mild",
            progress=False)

# sha256 over (relative path, bytes) of every file of generate_city(**TINY). It changes only when the
# generator's output changes, which must come with a bump of geoloc.synth.SYNTH_VERSION (and then this pin).
PINNED_SHA256 = "e70e4abb7f1a8c8423085902dfd358c0b03e7d45b8e03d7374632541b323a74b"


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MARKER:
            h.update(p.relative_to(root).as_posix().encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()


def parse(name: str) -> list[str]:
    parts = name.split("@")
    assert parts[0] == "" and parts[-1] == ".jpg", name
    return parts[1:-1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("tiny") / "city"
    return out, generate_city(out=out, **TINY)


def test_same_seed_same_bytes_any_workers(tiny, tmp_path):
    out, info = tiny
    again = generate_city(out=tmp_path / "again", **{**TINY, "workers": 2})
    assert again.n_database == info.n_database and again.n_queries == info.n_queries
    assert tree_hash(tmp_path / "again") == tree_hash(out)
    generate_city(out=tmp_path / "other", **{**TINY, "seed": 4})
    assert tree_hash(tmp_path / "other") != tree_hash(out)


def test_pinned_hash(tiny):
    out, _ = tiny
    assert tree_hash(out) == PINNED_SHA256, "generator output changed: bump SYNTH_VERSION and re-pin"


def test_counts_and_layout(tiny):
    out, info = tiny
    assert info.zone == 33 and info.zone_letter == "U"
    assert info.n_database == len(list((out / "database").glob("*.jpg"))) > 20
    assert info.n_queries == len(list((out / "queries").glob("*.jpg"))) == TINY["n_queries"]
    assert info.n_aerial == len(list((out / "aerial").glob("*.jpg"))) == 4
    assert (out / "city.json").is_file() and info.images_per_second > 0


@pytest.mark.parametrize("sub", ["database", "queries", "aerial"])
def test_names_parse_and_match_csv(tiny, sub):
    out, _ = tiny
    files = sorted((out / sub).glob("*.jpg"))
    rows = list(csv.DictReader(open(out / f"{sub}.csv")))
    assert list(rows[0].keys()) == ["path", "lat", "lon", "east", "north", "zone", "zone_letter", "heading"]
    assert sorted(r["path"] for r in rows) == sorted(f"{sub}/{f.name}" for f in files)
    by_path = {r["path"]: r for r in rows}
    east, north, lat, lon = [], [], [], []
    for f in files:
        fld = parse(f.name)
        assert len(fld) == 14
        assert fld[2] == "33" and fld[3] == "U"
        r = by_path[f"{sub}/{f.name}"]
        assert (r["east"], r["north"], r["zone"], r["zone_letter"], r["lat"], r["lon"]) == tuple(fld[:6])
        assert float(r["heading"]) == float(fld[8])
        assert (fld[13] == "aerial") == (sub == "aerial")
        east.append(float(fld[0])); north.append(float(fld[1])); lat.append(float(fld[4])); lon.append(float(fld[5]))
    e, n, z, s = latlon_to_utm(np.array(lat), np.array(lon))
    assert (z == 33).all() and not s.any()
    assert np.abs(e - np.array(east)).max() < 0.01 and np.abs(n - np.array(north)).max() < 0.01


def test_queries_off_grid_with_varied_headings(tiny):
    out, _ = tiny
    def read(sub):
        rows = list(csv.DictReader(open(out / f"{sub}.csv")))
        return np.array([[float(r["east"]), float(r["north"]), float(r["heading"])] for r in rows])
    db, q = read("database"), read("queries")
    d = np.sqrt(((q[:, None, :2] - db[None, :, :2]) ** 2).sum(-1)).min(1)
    assert (d > 0.5).all()
    assert (d < 40).all()  # still near the database: localisable
    assert len(np.unique(q[:, 2])) >= 3
    assert len(np.unique(db[:, 2])) == TINY["headings"]


def test_images_are_rgb_jpegs_with_content(tiny):
    out, _ = tiny
    for sub in ("database", "queries", "aerial"):
        for f in sorted((out / sub).glob("*.jpg"))[:5]:
            with Image.open(f) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (256, 256)
                assert np.asarray(im).std() > 10


def test_load_city_rebuilds_the_same_city(tiny):
    out, _ = tiny
    c = load_city(out)
    c2 = place_city(seed=TINY["seed"], extent_m=TINY["extent_m"], origin_latlon=(55.7047, 13.1910))
    assert np.array_equal(c.bmap, c2.bmap) and c.sw_east == c2.sw_east


def test_city_has_streets_styles_landmarks_and_furniture():
    c = build_city(seed=0, extent_m=400.0)
    assert len(c.h_streets) >= 2 and len(c.v_streets) >= 2
    assert c.n_buildings > 100
    assert len(np.unique(c.bstyle)) >= 6
    assert {lm["kind"] for lm in c.landmarks} == {"tower", "church", "mural"}
    assert len(np.unique(c.skind)) >= 5  # trees, lamps, benches, signs, steeples, bins
    assert c.bh.min() >= 4 and c.bh.max() > 50


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).ravel(); b = b.astype(np.float64).ravel()
    a -= a.mean(); b -= b.mean()
    return float((a @ b) / np.sqrt((a @ a) * (b @ b) + 1e-9))


def test_nearby_views_look_more_alike_than_distant_ones():
    c = build_city(seed=1, extent_m=600.0)
    pos = street_walk(c, 5.0)
    rng = np.random.default_rng(0)
    near, far = [], []
    for _ in range(12):
        i = int(rng.integers(0, len(pos)))
        x, y = pos[i]
        horizontal = np.isclose(c.h_streets[:, 0], y).any()
        dx, dy = (5.0, 0.0) if horizontal else (0.0, 5.0)
        h = 90.0 if horizontal else 0.0
        if not (8 < x + dx < 592 and 8 < y + dy < 592):
            continue
        far_i = np.flatnonzero(np.hypot(pos[:, 0] - x, pos[:, 1] - y) > 300)
        j = int(far_i[rng.integers(0, far_i.size)])
        a = render_view(c, x=x, y=y, heading_deg=h, pitch_deg=6.0)
        b = render_view(c, x=x + dx, y=y + dy, heading_deg=h, pitch_deg=6.0)
        z = render_view(c, x=pos[j, 0], y=pos[j, 1], heading_deg=h, pitch_deg=6.0)
        near.append(_corr(a, b)); far.append(_corr(a, z))
    assert len(near) >= 8
    assert np.mean(near) > np.mean(far) + 0.1


def test_strong_shift_changes_the_view_none_does_not():
    c = build_city(seed=2, extent_m=300.0)
    x, y = street_walk(c, 5.0)[40]
    base = render_view(c, x=x, y=y, heading_deg=90.0, pitch_deg=6.0, seed=5)
    assert np.array_equal(base, render_view(c, x=x, y=y, heading_deg=90.0, pitch_deg=6.0, look=Look(), seed=9))
    rng = np.random.default_rng(0)
    diffs = {}
    for level in ("mild", "strong"):
        d = []
        for k in range(4):
            look = query_look(level, rng, salt=k + 1)[0]
            img = render_view(c, x=x, y=y, heading_deg=90.0, pitch_deg=6.0, look=look, seed=k)
            d.append(np.abs(img.astype(np.int16) - base).mean())
        diffs[level] = float(np.mean(d))
    assert diffs["strong"] > 15.0
    assert diffs["strong"] > diffs["mild"] > 0.5


def test_aerial_tile_any_area(tiny):
    out, _ = tiny
    c = load_city(out)
    im = render_aerial_tile(c, east=c.sw_east + 75.0, north=c.sw_north + 75.0, size_m=60.0, pixels=128)
    assert im.size == (128, 128) and im.mode == "RGB"
    a = np.asarray(im)
    assert a.std() > 10
    # roofs and ground both present
    assert len(np.unique(a.reshape(-1, 3) // 32, axis=0)) > 5


def test_contact_sheet(tiny, tmp_path):
    out, _ = tiny
    paths = sorted((out / "database").glob("*.jpg"))[:10]
    p = contact_sheet(paths, tmp_path / "sheet.png", cols=4)
    with Image.open(p) as im:
        assert im.format == "PNG" and im.size == (4 * 192, 3 * 192)


@pytest.mark.parametrize(
    "kw, word",
    [({"shift": "bogus"}, "shift"), ({"extent_m": 10.0}, "extent_m"), ({"headings": 0}, "headings"),
     ({"spacing_m": 0.0}, "spacing_m"), ({"seed": -1}, "seed"), ({"origin_latlon": (95.0, 0.0)}, "origin_latlon"),
     ({"n_queries": -3}, "n_queries"), ({"workers": 0}, "workers")],
)
def test_invalid_arguments_raise_dataset_error(tmp_path, kw, word):
    with pytest.raises(DatasetError, match=word):
        generate_city(out=tmp_path / "c", **{**TINY, **kw})


def test_refuses_foreign_non_empty_folder(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("keep")
    with pytest.raises(DatasetError, match="not empty"):
        generate_city(out=tmp_path / "x", **TINY)
    assert (tmp_path / "x" / "mine.txt").read_text() == "keep"


def test_refuses_a_real_dataset_holding_a_city_json(tmp_path):
    """The data-loss case of issue 11: a real dataset with a `city.json` must not be emptied."""
    real = tmp_path / "realds"
    (real / "database").mkdir(parents=True)
    (real / "database" / "photo.jpg").write_bytes(b"\xff\xd8 my real photo")
    (real / "city.json").write_text('{"name": "Lund", "generator": "geoloc.synth"}')
    with pytest.raises(DatasetError, match="not a city written by geoloc synth-city") as err:
        generate_city(out=real, **TINY)
    assert "\n" not in str(err.value)
    assert (real / "database" / "photo.jpg").read_bytes() == b"\xff\xd8 my real photo"
    assert sorted(p.name for p in real.rglob("*")) == ["city.json", "database", "photo.jpg"]


def test_an_edited_or_forged_marker_is_not_trusted(tiny, tmp_path):
    import json
    import shutil

    out, _ = tiny
    copy = tmp_path / "c"
    shutil.copytree(out, copy)
    (copy / "database" / "keep.jpg").write_bytes(b"mine")
    m = json.loads((copy / MARKER).read_text())
    m["files"].append("database/keep.jpg")  # claims a file the generator did not write, without re-signing
    (copy / MARKER).write_text(json.dumps(m))
    with pytest.raises(DatasetError, match="not a city written by"):
        generate_city(out=copy, **TINY)
    assert (copy / "database" / "keep.jpg").read_bytes() == b"mine"


def test_regenerating_replaces_only_the_files_it_wrote(tiny, tmp_path):
    import shutil

    out, info = tiny
    copy = tmp_path / "c"
    shutil.copytree(out, copy)
    (copy / "database" / "notes.txt").write_text("mine")
    (copy / "demo_params.json").write_text("{}")
    other = generate_city(out=copy, **{**TINY, "seed": 5, "aerial": False})
    assert (copy / "database" / "notes.txt").read_text() == "mine"
    assert (copy / "demo_params.json").read_text() == "{}"
    assert not (copy / "aerial").exists() and not (copy / "aerial.csv").exists()
    assert len(list((copy / "database").glob("*.jpg"))) == other.n_database
    # and back: the tree equals a fresh generation, plus the two foreign files
    generate_city(out=copy, **TINY)
    (copy / "database" / "notes.txt").unlink()
    (copy / "demo_params.json").unlink()
    assert tree_hash(copy) == tree_hash(out) == PINNED_SHA256


def test_an_interrupted_generation_can_be_run_again(tmp_path, monkeypatch):
    import geoloc.synth.writer as w

    calls = {"n": 0}
    real = w._render_one

    def dies(task):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(w, "_render_one", dies)
    with pytest.raises(KeyboardInterrupt):
        generate_city(out=tmp_path / "c", **TINY)
    monkeypatch.setattr(w, "_render_one", real)
    generate_city(out=tmp_path / "c", **TINY)
    assert tree_hash(tmp_path / "c") == PINNED_SHA256


@pytest.mark.parametrize("code,word", [(28, "no space left on device while writing"), (30, "read-only")])
def test_a_failing_write_is_one_line(tmp_path, monkeypatch, code, word):
    import os

    from geoloc.fileio import OutputError

    def full(self, *_a, **_k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(OutputError, match=word) as err:
        generate_city(out=tmp_path / "c", **TINY)
    assert "\n" not in str(err.value) and str(tmp_path / "c") in str(err.value) and err.value.exit_code == 5
    monkeypatch.undo()
    generate_city(out=tmp_path / "c", **TINY)  # the partial city (marker first) is regenerated over
    assert tree_hash(tmp_path / "c") == PINNED_SHA256


# -- validation queries of an existing city (generate_queries, synth-city --queries-of) -----------------

def _local_positions(csv_path: Path) -> np.ndarray:
    with open(csv_path, newline="") as fh:
        return np.array([(float(r["east"]), float(r["north"])) for r in csv.DictReader(fh)])


def test_queries_of_a_city_same_places_own_seed_never_its_test_views(tiny, tmp_path):
    from geoloc.data import load_records
    from geoloc.synth import generate_queries

    city, _ = tiny
    info = generate_queries(city_dir=city, out=tmp_path / "val", seed=11, n_queries=8, progress=False)
    assert info.n_queries == 8 and info.shift == TINY["shift"]  # the city's own shift by default
    names = sorted(p.name for p in (tmp_path / "val" / "queries").glob("*.jpg"))
    assert len(names) == 8 and all(parse(n)[6].startswith("val") for n in names)
    own = {p.name for p in (city / "queries").glob("*.jpg")}
    assert not own & set(names)
    val, test, db = (_local_positions(p) for p in (tmp_path / "val" / "queries.csv", city / "queries.csv",
                                                   city / "database.csv"))
    # same city: inside its extent, same UTM zone; never within 1 m of a test query or a database viewpoint
    meta = __import__("json").loads((city / "city.json").read_text())["utm"]
    local = val - [meta["sw_east"], meta["sw_north"]]
    assert (local >= 0).all() and (local <= TINY["extent_m"]).all()
    d_test = np.sqrt(((val[:, None] - test[None]) ** 2).sum(-1)).min(1)
    d_db = np.sqrt(((val[:, None] - db[None]) ** 2).sum(-1)).min(1)
    assert (d_test >= 0.99).all() and (d_db >= 0.99).all()
    # usable as --val-queries: a folder holding queries/ reads as queries of the same zone
    recs = load_records(tmp_path / "val", split="queries")
    assert len(recs) == 8 and set(np.asarray(recs.zone).tolist()) == {info_zone(city)}
    # deterministic in its seed, different for another seed
    generate_queries(city_dir=city, out=tmp_path / "again", seed=11, n_queries=8, progress=False)
    generate_queries(city_dir=city, out=tmp_path / "other", seed=12, n_queries=8, progress=False)
    assert tree_hash(tmp_path / "again") == tree_hash(tmp_path / "val") != tree_hash(tmp_path / "other")


def info_zone(city: Path) -> int:
    return int(__import__("json").loads((city / "city.json").read_text())["utm"]["zone"])


def test_queries_of_refuses_what_is_not_a_synth_city_and_the_city_seed(tiny, tmp_path):
    from geoloc.synth import generate_queries

    city, _ = tiny
    with pytest.raises(DatasetError, match="own seed"):
        generate_queries(city_dir=city, out=tmp_path / "v", seed=TINY["seed"], n_queries=2, progress=False)
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "city.json").write_text("{}")
    for bad in (tmp_path / "real", tmp_path / "missing"):
        with pytest.raises(DatasetError, match="not a finished city"):
            generate_queries(city_dir=bad, out=tmp_path / "v", seed=5, n_queries=2, progress=False)
    generate_queries(city_dir=city, out=tmp_path / "q", seed=5, n_queries=2, progress=False)
    with pytest.raises(DatasetError, match="not a finished city"):  # a folder of queries is not a city
        generate_queries(city_dir=tmp_path / "q", out=tmp_path / "v", seed=6, n_queries=2, progress=False)
    assert not (tmp_path / "v").exists()
    # a city written before markers existed (city.json of this generator version) is accepted; another version is not
    import shutil

    old = tmp_path / "old"
    shutil.copytree(city, old)
    (old / MARKER).unlink()
    info = generate_queries(city_dir=old, out=tmp_path / "from_old", seed=5, n_queries=2, progress=False)
    assert tree_hash(tmp_path / "from_old") == tree_hash(tmp_path / "q")
    meta = __import__("json").loads((old / "city.json").read_text())
    (old / "city.json").write_text(__import__("json").dumps({**meta, "version": "0"}))
    with pytest.raises(DatasetError, match="not a finished city"):
        generate_queries(city_dir=old, out=tmp_path / "v", seed=6, n_queries=2, progress=False)


def test_cli_queries_of_exit_codes(tiny, tmp_path):
    from typer.testing import CliRunner

    from geoloc.cli import app

    city, _ = tiny
    r = CliRunner()
    ok = r.invoke(app, ["synth-city", "--out", str(tmp_path / "v"), "--queries-of", str(city), "--seed", "9",
                        "--queries", "3", "--shift", "strong", "-q"])
    assert ok.exit_code == 0, ok.output
    assert all("@strong-" in p.name for p in (tmp_path / "v" / "queries").glob("*.jpg"))
    (tmp_path / "plain").mkdir()
    bad = r.invoke(app, ["synth-city", "--out", str(tmp_path / "w"), "--queries-of", str(tmp_path / "plain"), "-q"])
    assert bad.exit_code == 3 and len(bad.output.strip().splitlines()) == 1
    clash = r.invoke(app, ["synth-city", "--out", str(tmp_path / "w"), "--queries-of", str(city), "--seed", "9",
                           "--headings", "8", "-q"])
    assert clash.exit_code == 2 and "--headings" in clash.output
