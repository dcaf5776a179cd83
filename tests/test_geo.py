"""Property tests of positions, distances, cell keys, cells and VPR names (Hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
import utm
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from geoloc.cells import build_cells, record_cell_keys
from geoloc.data import parse_vpr_name
from geoloc.geo import (
    cell_key,
    cell_pq,
    geodesic_m,
    latlon_to_utm,
    latlon_to_zone_number,
    split_cell_key,
    utm_to_latlon,
    zone_letter_is_south,
)
from geoloc.records import Records

prop = settings(max_examples=150, deadline=None)  # per test: never touch the global Hypothesis profile

lats = st.floats(-80.0, 84.0, allow_nan=False)
lons = st.floats(-180.0, 180.0, allow_nan=False)
border_lons = st.builds(lambda k, d: float(np.clip(6 * k - 180 + d, -180, 180)),
                        st.integers(0, 60), st.sampled_from([-1e-9, 0.0, 1e-9]))
limit_lats = st.sampled_from([-80.0, -80.0 + 1e-9, 84.0 - 1e-9, 84.0, 0.0, -1e-12, 1e-12, 56.0, 64.0, 72.0])


def _is_special_zone(lat: float, lon: float) -> bool:
    """Norway (zone 32 widened to 3..12 E) and Svalbard (31/33/35/37, 9-12 degrees wide): points there
    lie up to 6 degrees from their central meridian, where utm's series lose a little precision."""
    return (56 <= lat < 64 and 3 <= lon < 12) or (72 <= lat <= 84 and 0 <= lon < 42)


def _lon_diff(a, b):
    return np.abs((np.asarray(a) - np.asarray(b) + 180) % 360 - 180)


def _roundtrip_ok(lat, lon):
    e, n, z, s = latlon_to_utm(np.array([lat]), np.array([lon]))
    la, lo = utm_to_latlon(e, n, z, s)
    assert z[0] == utm.latlon_to_zone_number(lat, lon)
    assert bool(s[0]) == (lat < 0)
    tol = 2e-6 if _is_special_zone(lat, lon) else 1e-6
    assert abs(la[0] - lat) < 1e-6
    assert _lon_diff(lo[0], lon) < tol  # 180 and -180 are the same meridian
    assert geodesic_m(lat, lon, la[0], lo[0]) < 0.01  # under 1 cm everywhere


@prop
@given(lats, lons)
def test_utm_roundtrip(lat, lon):
    _roundtrip_ok(lat, lon)


@prop
@given(st.one_of(lats, limit_lats), border_lons)
def test_utm_roundtrip_zone_borders_and_limits(lat, lon):
    _roundtrip_ok(lat, lon)


@prop
@given(st.lists(st.tuples(st.one_of(lats, limit_lats), st.one_of(lons, border_lons)), min_size=1, max_size=50))
def test_zone_number_matches_utm_library(points):
    lat, lon = np.array(points).T
    assert latlon_to_zone_number(lat, lon).tolist() == [utm.latlon_to_zone_number(a, o) for a, o in points]


def test_special_zones_are_the_utm_librarys():
    assert latlon_to_zone_number([60.0, 60.0, 78.0, 78.0, 78.0, 78.0], [5.0, 2.9, 8.0, 20.0, 30.0, 40.0]).tolist() == [
        32, 31, 31, 33, 35, 37]


def test_zone_border_points_differ():
    for k in range(1, 60):
        border = 6 * k - 180
        if border in (0, 6, 12, 18, 24, 30, 36):
            lat = 10.0  # away from Norway/Svalbard
        else:
            lat = 45.0
        e, n, z, s = latlon_to_utm(np.array([lat, lat]), np.array([border - 1e-9, border + 1e-9]))
        assert z[1] == z[0] + 1


@prop
@given(st.integers(1, 60), st.booleans(), st.integers(0, 2**28 - 1), st.integers(0, 2**28 - 1))
def test_cell_key_roundtrip(zone, south, p, q):
    key = cell_key(np.array([zone]), np.array([south]), np.array([p]), np.array([q]))
    assert key.dtype == np.int64 and key[0] >= 0
    z, s, pp, qq = split_cell_key(key)
    assert (z[0], bool(s[0]), pp[0], qq[0]) == (zone, south, p, q)


@prop
@given(st.integers(1, 59), st.booleans(), st.integers(0, 2**28 - 1), st.integers(0, 2**28 - 1))
def test_same_pq_other_zone_or_hemisphere_never_share_key(zone, south, p, q):
    k = cell_key(np.array([zone, zone + 1, zone]), np.array([south, south, not south]), np.array([p] * 3),
                 np.array([q] * 3))
    assert len(set(k.tolist())) == 3


@prop
@given(st.floats(-79, 83), st.integers(1, 59), st.sampled_from([1.0, 20.0, 100.0, 1000.0]))
def test_points_across_a_zone_border_never_share_a_cell(lat, k, size_m):
    border = 6 * k - 180
    assume(not _is_special_zone(lat, border - 1e-6) and not _is_special_zone(lat, border + 1e-6))
    e, n, z, s = latlon_to_utm(np.array([lat, lat]), np.array([border - 1e-9, border + 1e-9]))
    p, q = cell_pq(e, n, size_m)
    keys = cell_key(z, s, p, q)
    assert keys[0] != keys[1]
    # and even when their p, q are forced equal:
    assert cell_key(z, s, p[:1].repeat(2), q[:1].repeat(2)).tolist()[0] != cell_key(z, s, p[:1].repeat(2),
                                                                                       q[:1].repeat(2)).tolist()[1]


@prop
@given(lats, lons, lats, lons)
def test_geodesic_symmetric_and_zero(a1, o1, a2, o2):
    d12, d21 = geodesic_m(a1, o1, a2, o2), geodesic_m(a2, o2, a1, o1)
    assert d12 >= 0 and abs(d12 - d21) <= 1e-6 * max(1.0, d12)
    assert geodesic_m(a1, o1, a1, o1) == 0.0
    assert d12 <= 20_040_000  # at most half the equator


@prop
@given(lats, lons, st.floats(0, 2 * np.pi), st.floats(1.0, 1000.0))
def test_geodesic_matches_utm_for_short_lines(lat, lon, bearing, dist):
    """Within one zone, UTM distances are true distances times the scale factor (0.9996..1.0013
    in standard and special zones), so they agree with the geodesic within 0.5 %. Both ends go
    through the same inverse projection: the utm series' own round-trip error (up to ~5 cm
    at 6 degrees from the central meridian of Norway's widened zone 32V) must not count."""
    e, n, z, s = latlon_to_utm(np.array([lat]), np.array([lon]))
    e2, n2 = e + dist * np.sin(bearing), n + dist * np.cos(bearing)
    la1, lo1 = utm_to_latlon(e, n, z, s)
    la2, lo2 = utm_to_latlon(e2, n2, z, s)
    assume(-80 <= la2[0] <= 84)
    assume(latlon_to_zone_number(la2, lo2)[0] == z[0] and (la2[0] < 0) == s[0])
    g = geodesic_m(la1[0], lo1[0], la2[0], lo2[0])
    assert abs(g / dist - 1) < 0.005


def test_geodesic_reference_values():
    assert abs(geodesic_m(0, 0, 0, 1) - 111_319.491) < 0.01  # one degree of the equator
    assert abs(geodesic_m(0, 0, 1, 0) - 110_574.389) < 0.5  # one degree of meridian at the equator
    assert abs(geodesic_m(0, 0, 90, 0) - 10_001_965.729) < 20  # quarter meridian
    d = geodesic_m(np.array([0.0, 52.5]), np.array([0.0, 13.4]), np.array([[0.0], [1.0]]), np.array([[1.0], [0.0]]))
    assert d.shape == (2, 2)  # broadcasts


@st.composite
def record_sets(draw):
    """Records clustered in a few places, possibly in several zones and both hemispheres."""
    n_sites = draw(st.integers(1, 3))
    sites = [(draw(st.floats(-60, 70)), draw(st.floats(-179, 179))) for _ in range(n_sites)]
    n = draw(st.integers(1, 120))
    site = np.array(draw(st.lists(st.integers(0, n_sites - 1), min_size=n, max_size=n)))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    span = draw(st.sampled_from([0.0002, 0.001, 0.005]))
    lat = np.array([sites[i][0] for i in site]) + rng.uniform(-span, span, n)
    lon = np.array([sites[i][1] for i in site]) + rng.uniform(-span, span, n)
    return Records.from_latlon([f"{i}.jpg" for i in range(n)], lat, lon)


@prop
@given(record_sets(), st.sampled_from([5.0, 20.0, 50.0]), st.integers(2, 4), st.integers(1, 4))
def test_build_cells_invariants(records, size_m, groups, min_images):
    keys = record_cell_keys(records, size_m)
    _, counts = np.unique(keys, return_counts=True)
    assume(counts.max() >= min_images)
    table, label, filed = build_cells(records, size_m=size_m, groups=groups, min_images=min_images)
    C = len(table)
    assert (np.diff(table.key) > 0).all()
    # every record filed in a kept cell; labels -1 exactly for records of dropped cells
    assert ((filed >= 0) & (filed < C)).all()
    own = table.lookup(keys)
    count_of = dict(zip(*np.unique(keys, return_counts=True)))
    dropped = np.array([count_of[k] < min_images for k in keys])
    assert ((label == -1) == dropped).all()
    assert (label[~dropped] == own[~dropped]).all() and (own[dropped] == -1).all()
    assert (filed[~dropped] == label[~dropped]).all()
    assert (table.n_images == np.bincount(filed, minlength=C)).all()
    # a dropped record is filed in its own zone/hemisphere when that has a kept cell
    for i in np.flatnonzero(dropped):
        if ((table.zone == records.zone[i]) & (table.south == records.south[i])).any():
            assert table.zone[filed[i]] == records.zone[i] and table.south[filed[i]] == records.south[i]
    # the 8 neighbours of a cell are never in its group (N >= 2)
    nb = table.neighbours()
    has = nb >= 0
    assert (table.group[nb[has]] != np.repeat(table.group, 8).reshape(C, 8)[has]).all()
    # and directly from p, q: any 8-neighbour offset changes the group
    for dp in (-1, 0, 1):
        for dq in (-1, 0, 1):
            if (dp, dq) != (0, 0):
                g2 = ((table.p + dp) % groups) * groups + (table.q + dq) % groups
                assert (g2 != table.group).all()
    # columns number each group's cells 0..C_g-1
    for g in range(groups * groups):
        ids = table.group_cells(g)
        assert (table.column[ids] == np.arange(len(ids))).all()
    # centres round-trip to their own cell
    back = cell_key(table.zone, table.south, *cell_pq(table.east, table.north, size_m))
    assert (back == table.key).all()


def test_build_cells_two_zones_and_equator():
    lat = np.array([0.0001] * 3 + [-0.0001] * 3 + [0.0001] * 3)
    lon = np.array([5.9999] * 6 + [6.0001] * 3)
    r = Records.from_latlon([f"{i}" for i in range(9)], lat, lon)
    table, label, filed = build_cells(r, size_m=20, groups=2, min_images=3)
    assert len(table) == 3 and (label >= 0).all()
    assert sorted(zip(table.zone.tolist(), table.south.tolist())) == [(31, False), (31, True), (32, False)]


@prop
@given(
    st.floats(100_000, 899_999.99, allow_nan=False), st.floats(0, 9_999_999.99, allow_nan=False),
    st.integers(1, 60), st.sampled_from(list("CDEFGHJKLMNPQRSTUVWX")),
    st.one_of(st.none(), st.tuples(lats, lons)), st.one_of(st.none(), st.floats(0, 360, exclude_max=True)),
    st.text("abcXYZ019_-", max_size=22), st.sampled_from([".jpg", ".JPG", ".png", ".jpeg"]),
)
def test_vpr_name_roundtrip(east, north, zone, letter, latlon, heading, pano, ext):
    lat, lon = latlon if latlon else (None, None)
    fmt = lambda v: "" if v is None else repr(v)  # noqa: E731
    fields = [repr(east), repr(north), f"{zone:02d}", letter, fmt(lat), fmt(lon), pano, "", fmt(heading), "", "", "",
              "201311", ""]
    name = "@" + "@".join(fields) + "@" + ext
    f = parse_vpr_name(name)
    assert (f["east"], f["north"], f["zone"], f["south"]) == (east, north, zone, zone_letter_is_south(letter))
    assert (f["lat"], f["lon"]) == ((lat, lon) if latlon else (pytest.approx(np.nan, nan_ok=True),) * 2)
    assert f["heading"] == (heading if heading is not None else pytest.approx(np.nan, nan_ok=True))


def test_zone_letter_is_south():
    assert [zone_letter_is_south(c) for c in "CMNXm"] == [True, True, False, False, True]
    for bad in ("I", "O", "A", "Z", "", "NN"):
        with pytest.raises(ValueError):
            zone_letter_is_south(bad)
