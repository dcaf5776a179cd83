"""load_records: VPR-named folders, CSVs, EXIF-GPS photos, and every way they can be wrong."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import utm
from PIL import Image

from geoloc.data import load_records, parse_vpr_name, read_exif_gps
from geoloc.errors import DatasetError
from geoloc.geo import geodesic_m

from conftest import write_image, write_vpr_images


def _vpr_row(lat, lon, *, latlon=True, heading=None, letter=None):
    e, n, z, band = utm.from_latlon(lat, lon)
    return dict(east=e, north=n, zone=z, letter=letter or band, lat=lat if latlon else None,
                lon=lon if latlon else None, heading=heading)


def _one_line_naming(err: pytest.ExceptionInfo, *names: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    for n in names:
        assert n in msg, (n, msg)
    return msg


# -- VPR folders -----------------------------------------------------------------------------


def test_vpr_full_names(tmp_path):
    rows = [_vpr_row(37.7570 + 1e-4 * i, -122.5004, heading=10.0 * i) for i in range(5)]
    write_vpr_images(tmp_path, rows)
    r = load_records(tmp_path)
    assert len(r) == 5 and r.root == tmp_path
    assert all(p.startswith("@") and "/" not in p for p in r.paths)
    assert (r.zone == 10).all() and not r.south.any()
    order = np.argsort([p for p in r.paths])
    assert (order == np.arange(5)).all()  # sorted
    for i, p in enumerate(r.paths):
        f = parse_vpr_name(p)
        assert r.east[i] == f["east"] and r.north[i] == f["north"]
    assert np.allclose(sorted(r.heading), [0, 10, 20, 30, 40])
    assert geodesic_m(np.sort(r.lat), r.lon, np.array(sorted(x["lat"] for x in rows)), -122.5004).max() < 0.05


def test_vpr_minimal_fields_derive_latlon(tmp_path):
    e, n, z, band = utm.from_latlon(-33.8568, 151.2153)  # Sydney: southern band H
    assert band == "H"
    (tmp_path / f"@{e:.2f}@{n:.2f}@{z}@{band}@.jpg").touch()
    (tmp_path / f"@{e + 10:.2f}@{n:.2f}@{z}@{band}.png").touch()  # no trailing @ either
    r = load_records(tmp_path)
    assert len(r) == 2 and r.south.all() and (r.zone == 56).all()
    assert abs(r.lat[0] - -33.8568) < 1e-5 and abs(r.lon[0] - 151.2153) < 1e-5
    assert np.isnan(r.heading).all()


def test_gmberton_name():
    f = parse_vpr_name("@0543256.96@4178906.70@10@S@037.75705@-122.50039@dMQZ0xWWxE_TtVs8aYK6_Q@@@@@@201311@@.jpg")
    assert f["zone"] == 10 and f["south"] is False and f["east"] == 543256.96 and f["lat"] == 37.75705


@pytest.mark.parametrize(
    "name, words",
    [
        ("@abc@4178906.70@10@S@@@.jpg", "UTM east"),
        ("@543256.96@@10@S@@@.jpg", "UTM north"),
        ("@543256.96@4178906.70@61@S@@@.jpg", "zone number"),
        ("@543256.96@4178906.70@ten@S@@@.jpg", "zone number"),
        ("@543256.96@4178906.70@10@I@@@.jpg", "zone letter"),
        ("@543256.96@4178906.70@10@@@@.jpg", "zone letter"),
        ("@543256.96.jpg", "not a VPR name"),
        ("@543256.96@4178906.70@.jpg", "--utm-zone"),  # minimal name, no zone given
        ("@543256.96@4178906.70@10@S@37.7@x@.jpg", "longitude"),
        ("@543256.96@4178906.70@10@S@37.75705@@.jpg", "only one of latitude"),
        ("@543256.96@4178906.70@10@M@37.75705@-122.50039@.jpg", "m from the UTM"),  # wrong hemisphere
        ("@543256.96@4178906.70@11@S@37.75705@-122.50039@.jpg", "m from the UTM"),  # wrong zone
        ("@543256.96@4178906.70@10@S@97.75705@-122.50039@.jpg", "not a valid position"),
        ("@543256.96@4178906.70@10@S@nan@nan@.jpg", "not a valid position"),
        ("@-5.0@4178906.70@10@S@@@.jpg", "out of range"),
        ("@543256.96@4178906.70@10@S@@@@@x@.jpg", "heading"),
        ("@inf@4178906.70@10@S@@@.jpg", "finite number"),
    ],
)
def test_bad_vpr_names_name_the_file(tmp_path, name, words):
    write_vpr_images(tmp_path, [_vpr_row(37.75, -122.5)])
    (tmp_path / name).touch()
    with pytest.raises(DatasetError) as err:
        load_records(tmp_path)
    assert words in _one_line_naming(err, name)


def test_split_subfolders(tmp_path):
    write_vpr_images(tmp_path / "database", [_vpr_row(45.0 + 1e-4 * i, 7.6) for i in range(4)])
    write_vpr_images(tmp_path / "queries" / "sub", [_vpr_row(45.0, 7.6 + 1e-4 * i) for i in range(3)])
    db = load_records(tmp_path, split="database")
    q = load_records(tmp_path, split="queries")
    assert len(db) == 4 and len(q) == 3
    assert db.root == tmp_path and q.root == tmp_path
    assert all(p.startswith("database/") for p in db.paths)
    assert all(p.startswith("queries/sub/") for p in q.paths)
    assert all(path.exists() for path in q.abspaths())
    with pytest.raises(DatasetError, match="split="):
        load_records(tmp_path)  # both present: refuse to mix them
    assert len(load_records(tmp_path / "queries", split="queries")) == 3  # pointing at the split folder itself
    assert len(load_records(tmp_path / "queries" / "sub", split="database")) == 3  # any folder: read whole
    with pytest.raises(DatasetError, match="split must be"):
        load_records(tmp_path, split="train")


def test_empty_folder_and_missing_source(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / ".hidden.jpg").touch()
    with pytest.raises(DatasetError) as err:
        load_records(tmp_path)
    assert "no images found" in _one_line_naming(err, str(tmp_path))
    with pytest.raises(DatasetError, match="not found"):
        load_records(tmp_path / "absent")


def test_two_zones_and_equator(tmp_path):
    pts = [(0.001, 5.999), (0.001, 6.001), (-0.001, 5.999), (-0.001, 6.001), (-0.0005, 6.0005)]
    write_vpr_images(tmp_path, [_vpr_row(a, o) for a, o in pts])
    r = load_records(tmp_path)
    got = {(round(float(a), 4), round(float(o), 4)): (int(z), bool(s)) for a, o, z, s in zip(r.lat, r.lon, r.zone, r.south)}
    assert got[(0.001, 5.999)] == (31, False)
    assert got[(0.001, 6.001)] == (32, False)
    assert got[(-0.001, 5.999)] == (31, True)
    assert got[(-0.001, 6.001)] == (32, True)
    assert got[(-0.0005, 6.0005)] == (32, True)
    # the same via CSV lat/lon and via EXIF, which derive the zone from lat/lon
    with open(tmp_path / "pts.csv", "w") as f:
        f.write("path,lat,lon\n" + "".join(f"{p},{a},{o}\n" for p, (a, o) in zip(sorted(r.paths), pts)))
    c = load_records(tmp_path / "pts.csv", check_files=False)
    assert sorted(zip(c.zone.tolist(), c.south.tolist())) == sorted(zip(r.zone.tolist(), r.south.tolist()))


def test_large_listing_is_fast(tmp_path):
    """10k VPR names in nested folders parse in well under a second (scandir + vectorised parse)."""
    import time
    from geoloc.geo import latlon_to_utm
    rng = np.random.default_rng(0)
    lat = 45 + rng.random(10_000) * 0.1
    lon = 7 + rng.random(10_000) * 0.1
    e, n, z, _ = latlon_to_utm(lat, lon)
    for k in range(10):
        (tmp_path / f"d{k}").mkdir()
    for i in range(10_000):
        open(tmp_path / f"d{i % 10}" / f"@{e[i]:.2f}@{n[i]:.2f}@{z[i]}@T@{lat[i]:.6f}@{lon[i]:.6f}@{i}@@@@@@@@.jpg",
             "wb").close()
    t = time.perf_counter()
    r = load_records(tmp_path)
    assert len(r) == 10_000 and time.perf_counter() - t < 2.0
    assert r.paths == sorted(r.paths)
    i = r.paths.index(next(p for p in r.paths if p.endswith("@17@@@@@@@@.jpg")))
    assert abs(r.lat[i] - lat[17]) < 1e-5 and abs(r.lon[i] - lon[17]) < 1e-5


# -- CSV ---------------------------------------------------------------------------------------


def _csv(tmp_path, text, name="data.csv"):
    p = tmp_path / name
    p.write_text(text)
    return p


def _touch(tmp_path, *names):
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).touch()


def test_csv_latlon(tmp_path):
    _touch(tmp_path, "img/a.jpg", "img/b.jpg")
    p = _csv(tmp_path, "Image , Latitude,Longitude,heading\nimg/a.jpg,55.698,13.195,90\nimg/b.jpg,55.699,13.196,\n")
    r = load_records(p)
    assert r.paths == ["img/a.jpg", "img/b.jpg"] and r.root == tmp_path
    assert (r.zone == 33).all() and not r.south.any()
    assert r.heading[0] == 90 and np.isnan(r.heading[1])


def test_csv_utm_with_letter_or_hemisphere(tmp_path):
    _touch(tmp_path, "a.jpg", "b.jpg")
    e, n, z, b = utm.from_latlon(-33.8568, 151.2153)
    for hdr, v in [("utm_zone_letter", b), ("hemisphere", "S"), ("hemisphere", "south")]:
        p = _csv(tmp_path, f"filename,utm_east,utm_north,utm_zone,{hdr}\na.jpg,{e},{n},{z},{v}\nb.jpg,{e + 5},{n},{z},{v}\n")
        r = load_records(p)
        assert r.south.all() and (r.zone == 56).all()
        assert abs(r.lat[0] + 33.8568) < 1e-6 and r.east[1] == e + 5
    p = _csv(tmp_path, f"path,east,north,zone,zone_letter\na.jpg,{e},{n},{z}H,\n")  # "56H" in the zone column
    assert load_records(p).south.all()


def test_csv_utm_and_latlon_must_agree(tmp_path):
    _touch(tmp_path, "a.jpg")
    e, n, z, b = utm.from_latlon(52.519, 13.401)
    ok = _csv(tmp_path, f"path,east,north,zone,zone_letter,lat,lon\na.jpg,{e},{n},{z},{b},52.519,13.401\n")
    assert len(load_records(ok)) == 1
    bad = _csv(tmp_path, f"path,east,north,zone,zone_letter,lat,lon\na.jpg,{e},{n},{z},{b},52.519,13.41\n")
    with pytest.raises(DatasetError) as err:
        load_records(bad)
    assert "m from the UTM" in _one_line_naming(err, "data.csv", "line 2")


@pytest.mark.parametrize(
    "text, words",
    [
        ("lat,lon\n1,2\n", ["line 1", "path column"]),
        ("path,lat\na.jpg,1\n", ["line 1", "position columns"]),
        ("path,lat,lon\na.jpg,nan,13\n", ["line 2", "not a valid position"]),
        ("path,lat,lon\na.jpg,55,13\nb.jpg,95,13\n", ["line 3", "not a valid position"]),
        ("path,lat,lon\na.jpg,55,13\nb.jpg,55,181\n", ["line 3", "not a valid position"]),
        ("path,lat,lon\na.jpg,55,13\nb.jpg,,13\n", ["line 3", "not a valid position"]),
        ("path,lat,lon\na.jpg,55,13\nb.jpg,north,13\n", ["line 3", "latitude 'north' is not a number"]),
        ("path,lat,lon\na.jpg,55,13\n./a.jpg,55,13\n", ["line 3", "duplicate", "line 2"]),
        ("path,lat,lon\n../../etc/passwd,55,13\n", ["line 2", "outside the dataset folder"]),
        ("path,lat,lon\n/etc/passwd,55,13\n", ["line 2", "outside the dataset folder"]),
        ("path,lat,lon\nsub/../../x.jpg,55,13\n", ["line 2", "outside the dataset folder"]),
        ("path,lat,lon\n,55,13\n", ["line 2", "empty image path"]),
        ("path,lat,lon\nmissing.jpg,55,13\n", ["line 2", "not found"]),
        ("path,lat,lon\n", ["no rows"]),
        ("", ["empty file"]),
        ("path,lat,lon\na.jpg,55\n", ["line 2", "fields"]),
        ("path,east,north,zone,zone_letter\na.jpg,500000,6000000,0,U\n", ["line 2", "zone"]),
        ("path,east,north,zone,hemisphere\na.jpg,500000,6000000,33,Q\n", ["line 2", "hemisphere"]),
        ("path,east,north,zone,zone_letter\na.jpg,500000,6000000,33,O\n", ["line 2", "zone letter"]),
        ("path,lat,lon,latitude\na.jpg,55,13,55\n", ["line 1", "several columns"]),
    ],
)
def test_csv_errors_name_the_line(tmp_path, text, words):
    _touch(tmp_path, "a.jpg", "b.jpg")
    p = _csv(tmp_path, text)
    with pytest.raises(DatasetError) as err:
        load_records(p)
    msg = _one_line_naming(err, "data.csv")
    for w in words:
        assert w in msg, (w, msg)


def test_csv_absolute_path_inside_root_is_relative(tmp_path):
    _touch(tmp_path, "a.jpg")
    p = _csv(tmp_path, f"path,lat,lon\n{tmp_path / 'a.jpg'},55,13\n")
    assert load_records(p).paths == ["a.jpg"]


def test_csv_split_column(tmp_path):
    _touch(tmp_path, "a.jpg", "b.jpg", "c.jpg")
    p = _csv(tmp_path, "path,lat,lon,split\na.jpg,55,13,database\nb.jpg,55,13,queries\nc.jpg,55,13,database\n")
    assert load_records(p, split="database").paths == ["a.jpg", "c.jpg"]
    assert load_records(p, split="queries").paths == ["b.jpg"]
    assert len(load_records(p)) == 3
    q = _csv(tmp_path, "path,lat,lon\na.jpg,55,13\n", "q.csv")
    assert load_records(q, split="queries").paths == ["a.jpg"]  # no split column: the CSV is one set
    with pytest.raises(DatasetError) as err:
        load_records(_csv(tmp_path, "path,lat,lon,split\na.jpg,55,13,train\n", "t.csv"), split="queries")
    assert "'train'" in _one_line_naming(err, "t.csv", "no rows with split 'queries'")


# -- EXIF GPS ------------------------------------------------------------------------------------


def _exif_jpeg(path, lat, lon, *, refs=None, direction=None):
    from PIL.TiffImagePlugin import IFDRational

    def dms(x):  # rounded to 1e-4 s first, so seconds never read 60.0000 (refused as corrupt)
        t = round(abs(x) * 3600 * 10000)
        d, t = divmod(t, 3600 * 10000)
        m, s = divmod(t, 60 * 10000)
        return (IFDRational(d, 1), IFDRational(m, 1), IFDRational(s, 10000))

    exif = Image.Exif()
    gps = exif.get_ifd(0x8825)
    lat_ref, lon_ref = refs or ("N" if lat >= 0 else "S", "E" if lon >= 0 else "W")
    gps.update({1: lat_ref, 2: dms(lat), 3: lon_ref, 4: dms(lon)})
    if direction is not None:
        gps[17] = IFDRational(int(direction * 100), 100)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32)).save(path, exif=exif)
    return path


def test_exif_roundtrip_all_hemispheres(tmp_path):
    for i, (lat, lon) in enumerate([(55.6981, 13.1954), (-33.8568, 151.2153), (40.7128, -74.0060), (-22.9068, -43.1729)]):
        p = _exif_jpeg(tmp_path / f"{i}.jpg", lat, lon)
        got = read_exif_gps(p)
        assert got is not None and abs(got[0] - lat) < 1e-6 and abs(got[1] - lon) < 1e-6
    r = load_records(tmp_path)
    assert r.south.tolist() == [False, True, False, True]
    assert r.zone.tolist() == [33, 56, 18, 23]


def test_exif_heading_and_bad_refs(tmp_path):
    _exif_jpeg(tmp_path / "h.jpg", 55.7, 13.2, direction=123.5)
    assert abs(load_records(tmp_path).heading[0] - 123.5) < 1e-4
    bad = _exif_jpeg(tmp_path / "x" / "bad.jpg", 55.7, 13.2, refs=("Q", "E"))
    with pytest.raises(DatasetError) as err:
        read_exif_gps(bad)
    assert "reference" in _one_line_naming(err, "bad.jpg")


def test_file_without_label(tmp_path, caplog):
    _exif_jpeg(tmp_path / "gps.jpg", 55.7, 13.2)
    write_image(tmp_path / "nolabel.jpg")
    write_vpr_images(tmp_path, [_vpr_row(55.7, 13.2)])
    with pytest.raises(DatasetError) as err:
        load_records(tmp_path)
    assert "no location label" in _one_line_naming(err, "nolabel.jpg")
    with caplog.at_level(logging.WARNING, logger="geoloc.data"):
        r = load_records(tmp_path, on_missing_label="skip")
    assert len(r) == 2 and "nolabel.jpg" not in r.paths
    assert "skipped 1 image" in caplog.text and "nolabel.jpg" in caplog.text
    assert r.paths[0].startswith("@")  # VPR names take precedence, mixed folders work


def test_broken_image_in_exif_folder(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError) as err:
        load_records(tmp_path)
    _one_line_naming(err, "broken.jpg")


def test_real_lund_walk(shared_data):
    r = load_records(shared_data / "lund" / "images")
    assert len(r) == 29
    assert r.paths == [f"{i:02d}.jpg" for i in range(1, 30)]
    assert (r.zone == 33).all() and not r.south.any()
    assert ((r.lat > 55.69) & (r.lat < 55.71) & (r.lon > 13.18) & (r.lon < 13.21)).all()
    d = geodesic_m(r.lat[:, None], r.lon[:, None], r.lat[None], r.lon[None])
    assert d.max() < 250
    # a walk: distance from the first frame grows (allow GPS jitter of a few metres)
    from_start = d[0]
    assert np.corrcoef(from_start, np.arange(29))[0, 1] > 0.9
    assert from_start[-1] > 150
    e, n, z, b = utm.from_latlon(r.lat[0], r.lon[0])
    assert abs(e - r.east[0]) < 1e-3 and abs(n - r.north[0]) < 1e-3 and b == "U"


def test_real_berlin(shared_data):
    r = load_records(shared_data / "berlin" / "images")
    assert len(r) == 3 and (r.zone == 33).all() and not r.south.any()
    assert geodesic_m(r.lat, r.lon, 52.519, 13.401).max() < 150
    for p in r.abspaths():
        lat, lon = read_exif_gps(p)
        assert abs(lat - 52.519) < 0.002 and abs(lon - 13.401) < 0.002
