"""Dataset layouts (roots, named folders, EXIF trees, CSVs), --utm-zone, the file-list cache, and
inputs that must never block or split a message: FIFOs, corrupt EXIF, newlines in paths."""

from __future__ import annotations

import logging
import math
import os
import shutil

import numpy as np
import pytest
import utm
from conftest import vpr_name, write_image
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from guards import deadline
from geoloc.data import list_images, load_records, parse_utm_zone, parse_vpr_name, read_exif_gps
from geoloc.data.exif import dms_to_deg
from geoloc.data.folders import file_list_path
from geoloc.errors import DatasetError


def _one_line(err: pytest.ExceptionInfo, *words: str) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "\r" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def _vpr(folder, pts, *, minimal=False):
    """VPR-named placeholders at ``pts`` (lat, lon); ``minimal``: ``@east@north@.jpg`` only."""
    folder.mkdir(parents=True, exist_ok=True)
    for lat, lon in pts:
        e, n, z, b = utm.from_latlon(lat, lon)
        name = f"@{e:.2f}@{n:.2f}@.jpg" if minimal else vpr_name(e, n, z, b, lat, lon)
        (folder / name).touch()


def _exif_jpeg(path, lat, lon, *, dms=None):
    def to_dms(x):
        t = round(abs(x) * 3600 * 100)
        d, t = divmod(t, 360000)
        m, s = divmod(t, 6000)
        return (IFDRational(d, 1), IFDRational(m, 1), IFDRational(s, 100))

    exif = Image.Exif()
    exif.get_ifd(0x8825).update({1: "N" if lat >= 0 else "S", 2: dms or to_dms(lat), 3: "E" if lon >= 0 else "W",
                                 4: to_dms(lon)})
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16)).save(path, exif=exif)
    return path


SF = [(37.7570 + 1e-4 * i, -122.5004) for i in range(4)]


# -- layouts ---------------------------------------------------------------------------------


def test_dataset_root_split_picks_subfolder(tmp_path):
    _vpr(tmp_path / "database", SF)
    _vpr(tmp_path / "queries", SF[:2])
    assert len(load_records(tmp_path, split="database")) == 4
    q = load_records(tmp_path, split="queries")
    assert len(q) == 2 and q.root == tmp_path and all(p.startswith("queries/") for p in q.paths)


def test_sf_xl_and_svox_named_folders(tmp_path):
    """SF-XL test: database/, queries_v1/, queries_night/; SVOX: gallery/, queries_sun/."""
    sf = tmp_path / "sf_xl" / "test"
    _vpr(sf / "database", SF)
    _vpr(sf / "queries_v1", SF[:3])
    _vpr(sf / "queries_night", SF[:1])
    assert len(load_records(sf, split="database")) == 4
    assert len(load_records(sf / "queries_v1", split="queries")) == 3
    night = load_records(sf / "queries_night", split="queries")
    assert len(night) == 1 and night.root == sf / "queries_night" and night.paths[0].startswith("@")
    with pytest.raises(DatasetError) as err:  # a root without queries/: never evaluate on the database
        load_records(sf, split="queries")
    _one_line(err, "no queries/", "queries_night/", "queries_v1/")
    svox = tmp_path / "svox"
    _vpr(svox / "gallery", SF)
    _vpr(svox / "queries_sun", SF[:2])
    assert len(load_records(svox / "gallery", split="database")) == 4
    assert len(load_records(svox / "queries_sun", split="queries")) == 2


def test_any_folder_name_is_read_whole(tmp_path):
    _vpr(tmp_path / "my_photos" / "a", SF[:2])
    _vpr(tmp_path / "my_photos" / "b", SF[2:])
    for split in ("database", "queries", None):
        r = load_records(tmp_path / "my_photos", split=split)
        assert len(r) == 4 and r.root == tmp_path / "my_photos"


def test_exif_tree_nested(tmp_path):
    pts = [(55.6981, 13.1954), (55.6990, 13.1960), (-33.8568, 151.2153)]
    for i, (lat, lon) in enumerate(pts):
        _exif_jpeg(tmp_path / "trip" / f"day{i}" / "sub" / f"IMG_{i}.JPG", lat, lon)
    r = load_records(tmp_path / "trip", split="database")
    assert r.paths == [f"day{i}/sub/IMG_{i}.JPG" for i in range(3)]
    assert np.allclose(r.lat, [p[0] for p in pts], atol=1e-5) and r.south.tolist() == [False, False, True]


def test_real_photos_any_layout(shared_data, tmp_path):
    """The real photo folders, nested one level down (lund/images/*.jpg), as database or queries."""
    db = load_records(shared_data / "lund", split="database")
    q = load_records(shared_data / "berlin", split="queries")
    assert len(db) == 29 and db.paths[0] == "images/01.jpg" and (db.zone == 33).all()
    assert len(q) == 3 and all(p.startswith("images/") for p in q.paths)
    shutil.copytree(shared_data / "berlin" / "images", tmp_path / "ds" / "queries")
    shutil.copytree(shared_data / "lund" / "images", tmp_path / "ds" / "database")
    assert load_records(tmp_path / "ds", split="queries").lat.tolist() == q.lat.tolist()


def test_csv_with_and_without_split_column(tmp_path):
    for n in ("a.jpg", "b.jpg"):
        (tmp_path / n).touch()
    plain = tmp_path / "plain.csv"
    plain.write_text("path,lat,lon\na.jpg,55.7,13.2\nb.jpg,55.71,13.2\n")
    for split in ("database", "queries", None):
        assert load_records(plain, split=split).paths == ["a.jpg", "b.jpg"]
    both = tmp_path / "both.csv"
    both.write_text("path,lat,lon,split\na.jpg,55.7,13.2,database\nb.jpg,55.71,13.2,Queries\n")
    assert load_records(both, split="database").paths == ["a.jpg"]
    assert load_records(both, split="queries").paths == ["b.jpg"]


def test_nothing_fits_says_what_is_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    for src in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(DatasetError) as err:
            load_records(src, split="database")
        _one_line(err, "accepted:", "database/ and queries/", "VPR-named", "EXIF", "CSV")


# -- --utm-zone ------------------------------------------------------------------------------


def test_minimal_vpr_names_need_utm_zone(tmp_path):
    _vpr(tmp_path / "db", SF, minimal=True)
    with pytest.raises(DatasetError) as err:
        load_records(tmp_path / "db")
    _one_line(err, "--utm-zone", "data.utm_zone", "@.jpg")
    full = tmp_path / "full"
    _vpr(full, SF)
    ref = load_records(full)
    for zone in ("10S", "10s", " 10 S ", "10N", "10north"):
        r = load_records(tmp_path / "db", utm_zone=zone)
        assert (r.zone == 10).all() and not r.south.any()
        assert np.abs(r.lat - ref.lat).max() < 1e-6 and np.abs(r.lon - ref.lon).max() < 1e-6
    assert parse_vpr_name("@543256.96@4178906.70@.jpg", utm_zone="10S")["zone"] == 10
    with pytest.raises(ValueError, match="--utm-zone"):
        parse_vpr_name("@543256.96@4178906.70@.jpg")


def test_utm_zone_southern_and_conflicts(tmp_path):
    syd = [(-33.8568 + 1e-4 * i, 151.2153) for i in range(3)]
    _vpr(tmp_path / "syd", syd, minimal=True)
    for zone in ("56south", "56H", "56 South"):
        r = load_records(tmp_path / "syd", utm_zone=zone)
        assert r.south.all() and np.allclose(np.sort(r.lat), [p[0] for p in syd], atol=1e-5)
    with pytest.raises(DatasetError) as err:  # 56S is band S (32..40 N), not "south": caught, not 6000 km off
        load_records(tmp_path / "syd", utm_zone="56S")
    _one_line(err, "band S", "56south")
    _vpr(tmp_path / "full", SF)  # names with their own zone 10 must agree with utm_zone
    assert len(load_records(tmp_path / "full", utm_zone="10S")) == 4
    with pytest.raises(DatasetError) as err:
        load_records(tmp_path / "full", utm_zone="11S")
    _one_line(err, "differs from utm_zone 11S")
    for bad in ("0S", "61N", "10I", "10", "S10", "10SS", "ten", ""):
        with pytest.raises(DatasetError) as err:
            parse_utm_zone(bad)
        _one_line(err, "utm_zone", "10S")


def test_csv_east_north_with_utm_zone(tmp_path):
    (tmp_path / "a.jpg").touch()
    e, n, _, _ = utm.from_latlon(*SF[0])
    p = tmp_path / "utm.csv"
    p.write_text(f"path,east,north\na.jpg,{e},{n}\n")
    with pytest.raises(DatasetError) as err:
        load_records(p)
    _one_line(err, "utm.csv", "--utm-zone")
    r = load_records(p, utm_zone="10S")
    assert abs(r.lat[0] - SF[0][0]) < 1e-6 and r.zone[0] == 10


# -- the file-list cache ---------------------------------------------------------------------


def test_file_list_cache_equals_walk(tmp_path):
    for k in range(3):
        _vpr(tmp_path / "queries" / f"d{k}", SF[k:k + 2])
    walk = load_records(tmp_path, split="queries")
    listed = list_images(tmp_path / "queries")
    lst = tmp_path / "queries_images_paths.txt"
    assert file_list_path(tmp_path / "queries") == lst
    lst.write_text("\n".join(reversed(listed)) + "\n\n")  # any order; blank lines ignored
    os.rename(tmp_path / "queries" / "d0", tmp_path / "queries" / ".hidden_d0")  # proves the list is read...
    with pytest.raises(DatasetError) as err:  # ...and validated: a listed file is gone
        load_records(tmp_path, split="queries")
    _one_line(err, "queries_images_paths.txt", "line ", "stale")
    os.rename(tmp_path / "queries" / ".hidden_d0", tmp_path / "queries" / "d0")
    (tmp_path / "queries" / "unlisted.jpg").touch()  # the list, not the walk, decides
    cached = load_records(tmp_path, split="queries")
    assert cached.paths == walk.paths and np.array_equal(cached.east, walk.east)
    assert np.array_equal(cached.lat, walk.lat) and cached.root == walk.root


@pytest.mark.parametrize("text, words", [
    ("../escape.jpg\n", ["outside"]),
    ("a.jpg\n./a.jpg\n", ["listed twice"]),
    ("missing.jpg\n", ["missing.jpg", "stale"]),
    ("sub\n", ["sub", "not a file"]),
    ("\n\n", ["lists no images"]),
    ("x" * 70_000 + "\n", ["longer than"]),
])
def test_bad_file_list_is_one_line(tmp_path, text, words):
    (tmp_path / "db" / "sub").mkdir(parents=True)
    _exif_jpeg(tmp_path / "db" / "a.jpg", 55.7, 13.2)
    (tmp_path / "db_images_paths.txt").write_text(text)
    with pytest.raises(DatasetError) as err:
        load_records(tmp_path / "db", split="database")
    _one_line(err, "db_images_paths.txt", *words)


# -- never blocked, never more than one line -------------------------------------------------


def test_fifo_named_jpg_never_blocks(tmp_path, caplog):
    _exif_jpeg(tmp_path / "db" / "ok.jpg", 55.7, 13.2)
    os.mkfifo(tmp_path / "db" / "trap.jpg")
    (tmp_path / "db" / "folder.jpg").mkdir()  # a directory named like an image: walked, not opened
    _exif_jpeg(tmp_path / "db" / "folder.jpg" / "inner.jpg", 55.7, 13.21)
    with deadline(), caplog.at_level(logging.WARNING, logger="geoloc.data"):
        r = load_records(tmp_path / "db")
        assert r.paths == ["folder.jpg/inner.jpg", "ok.jpg"]
        assert "not regular files" in caplog.text and "trap.jpg" in caplog.text
        with pytest.raises(DatasetError) as err:
            read_exif_gps(tmp_path / "db" / "trap.jpg")
        _one_line(err, "trap.jpg", "FIFO", "regular files")
        os.mkfifo(tmp_path / "data.csv")
        with pytest.raises(DatasetError) as err:
            load_records(tmp_path / "data.csv")
        _one_line(err, "data.csv", "FIFO")
        (tmp_path / "db_images_paths.txt").unlink(missing_ok=True)
        os.mkfifo(tmp_path / "db_images_paths.txt")
        with pytest.raises(DatasetError) as err:
            load_records(tmp_path / "db")
        _one_line(err, "db_images_paths.txt", "FIFO")
        (tmp_path / "c.csv").write_text("path,lat,lon\ndb/trap.jpg,55.7,13.2\n")
        with pytest.raises(DatasetError) as err:
            load_records(tmp_path / "c.csv")
        _one_line(err, "c.csv", "line 2", "not a regular file")


def test_device_named_jpg_is_refused(tmp_path):
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    with deadline(), pytest.raises(DatasetError) as err:
        read_exif_gps(tmp_path / "zero.jpg")
    _one_line(err, "zero.jpg", "character device, expected a regular file")
    assert list_images(tmp_path) == []


@pytest.mark.parametrize("dms, words", [
    ((IFDRational(55, 1), IFDRational(60, 1), IFDRational(0, 1)), ">= 60"),
    ((IFDRational(55, 1), IFDRational(41, 1), IFDRational(6000, 100)), ">= 60"),
    ((IFDRational(55, 1), IFDRational(41, 1), IFDRational(1, 0)), "not valid"),  # x/0 reads as NaN
    ((IFDRational(95, 1), IFDRational(0, 1), IFDRational(0, 1)), "not a valid position"),
])
def test_corrupt_exif_dms_is_refused(tmp_path, dms, words):
    p = _exif_jpeg(tmp_path / "bad.jpg", 55.7, 13.2, dms=dms)
    with pytest.raises(DatasetError) as err:
        read_exif_gps(p)
    _one_line(err, "bad.jpg", words)
    with pytest.raises(DatasetError) as err:
        load_records(tmp_path)
    _one_line(err, "bad.jpg", words)


def test_dms_bounds():
    assert dms_to_deg((55, 59, 59.99), "N", axis="latitude", path="p") == pytest.approx(55 + 59 / 60 + 59.99 / 3600)
    assert dms_to_deg((55.5,), "S", axis="latitude", path="p") == -55.5
    assert dms_to_deg((13, 30.5, 0), "W", axis="longitude", path="p") == pytest.approx(-(13 + 30.5 / 60))
    for bad in [(55, -1, 0), (55, 0, -0.5), (-55, 0, 0), (55, math.nan, 0), (55, 0, math.inf), (55, 60, 0),
                (55, 0, 60), (55, 0, 0, 0), ()]:
        with pytest.raises(DatasetError, match="p: EXIF GPS latitude"):
            dms_to_deg(bad, "N", axis="latitude", path="p")


def test_newline_in_path_stays_one_line(tmp_path):
    d = tmp_path / "evil\nname\r\x1b[31m"
    write_image(d / "nolabel.jpg")
    with pytest.raises(DatasetError) as err:
        load_records(d)
    msg = _one_line(err, "evil\\nname\\r\\x1b[31m", "nolabel.jpg", "no location label")
    assert "\x1b" not in msg
    (d / "nolabel.jpg").unlink()
    (d / "@1@2@3@4@.jpg").touch()
    with pytest.raises(DatasetError) as err:
        load_records(d)
    _one_line(err, "evil\\nname")
    with pytest.raises(DatasetError) as err:
        read_exif_gps(d / "absent\n.jpg")
    _one_line(err, "absent\\n.jpg", "not found")
    csv_path = tmp_path / "x\ny.csv"
    csv_path.write_text('path,lat,lon\n"a\nb.jpg",55,13\n')
    with pytest.raises(DatasetError) as err:
        load_records(csv_path)
    _one_line(err, "x\\ny.csv", "a\\nb.jpg")
