"""``generate_city``: a geotagged street-level dataset of a procedural city, written to disk.

Layout under ``out/``: ``database/``, ``queries/``, ``aerial/`` (JPEGs named in the VPR
``@east@north@zone@letter@lat@lon@pano@tile@heading@pitch@roll@height@timestamp@note@.jpg``
convention), ``database.csv``, ``queries.csv``, ``aerial.csv``, ``city.json`` and the
generator's signed marker ``.geoloc-synth.json`` (its parameters and every file it writes,
written before the first image). A folder is regenerated over only when that marker verifies,
and then only the files it lists are deleted: a real dataset that happens to hold a
``city.json`` is refused, never emptied.

Every image depends only on (seed, its own index, the generator version): poses and looks are
drawn up front from named sub-streams of the seed, and each rendering gets its own seed, so
the bytes are the same for any number of workers.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import math
import multiprocessing as mp
import os
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import utm
from PIL import Image

from geoloc.errors import DatasetError, GeolocError
from geoloc.fileio import atomic_write_json, one_line, read_bounded, translate_write_errors
from geoloc.geo import check_latlon, latlon_to_utm, utm_to_latlon
from geoloc.synth.aerial import render_aerial_tile
from geoloc.synth.city import GMAP_RES, G_CROSS, G_MARK, G_ROAD, SYNTH_VERSION, City, build_city, street_walk
from geoloc.synth.render import CAM_HEIGHT, Look, render_view

SHIFTS = ("none", "mild", "strong")
DB_PITCH = 6.0
"""Database camera pitch (degrees up): a little above the horizon shows more facade."""
DB_JPEG_QUALITY = 90
AERIAL_TILE_M = 100.0
CSV_HEADER = "path,lat,lon,east,north,zone,zone_letter,heading"

# sub-stream tags of the seed
_S_QUERY, _S_RENDER_DB, _S_RENDER_Q = 11, 12, 13


@dataclass
class CityInfo:
    """What :func:`generate_city` wrote."""

    out: Path
    n_database: int
    n_queries: int
    n_aerial: int
    zone: int
    zone_letter: str
    seconds: float
    images_per_second: float
    database_csv: Path
    queries_csv: Path
    aerial_csv: Path | None
    city_json: Path


@dataclass
class _Shot:
    """One image to render: local pose, look, file name and its labels."""

    x: float
    y: float
    heading: float
    pitch: float
    look: Look
    quality: int
    seed: int
    path: str  # relative to out/


def _vpr_name(east: float, north: float, zone: int, letter: str, lat: float, lon: float, pano: str, tile: str,
              heading: float, pitch: float, timestamp: str, note: str) -> str:
    return (f"@{east:.2f}@{north:.2f}@{zone}@{letter}@{lat:.7f}@{lon:.7f}@{pano}@{tile}@{heading:.1f}"
            f"@{pitch:.1f}@@{CAM_HEIGHT:g}@{timestamp}@{note}@.jpg")


def _image_seed(seed: int, stream: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), stream, int(index)]).generate_state(1)[0])


def query_look(level: str, rng: np.random.Generator, salt: int) -> tuple[Look, int, float, float]:
    """(look, jpeg quality, heading jitter deg, pitch jitter deg) of one query under ``level``."""
    if level == "none":
        return Look(), DB_JPEG_QUALITY, 10.0, 0.0
    if level == "mild":
        tod = ("day", "day", "morning", "overcast")[int(rng.integers(0, 4))]
        look = Look(tod=tod, fog=float(rng.uniform(0.0, 0.35)), fog_dist=float(rng.uniform(120, 250)),
                    blur=float(rng.uniform(0.0, 0.8)), noise=float(rng.uniform(0.0, 4.0)), facade_change=0.2,
                    cars=int(rng.integers(0, 3)), people=int(rng.integers(0, 3)), salt=salt)
        return look, int(rng.integers(70, 91)), 15.0, 3.0
    tod = ("dusk", "night", "overcast", "morning")[int(rng.integers(0, 4))]
    look = Look(tod=tod, fog=float(rng.uniform(0.3, 0.65)), fog_dist=float(rng.uniform(70, 150)),
                blur=float(rng.uniform(0.5, 1.5)), noise=float(rng.uniform(4.0, 10.0)), facade_change=0.5,
                cars=int(rng.integers(1, 6)), people=int(rng.integers(0, 5)), salt=salt)
    return look, int(rng.integers(35, 61)), 25.0, 6.0


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise DatasetError(msg)


# -- rendering workers ---------------------------------------------------------------------------

_CTX: dict = {}


def _render_one(task: tuple[int, int]) -> int:
    kind, i = task
    city, out, size = _CTX["city"], _CTX["out"], _CTX["size"]
    sh: _Shot = _CTX["shots"][kind][i]
    arr = render_view(city, x=sh.x, y=sh.y, heading_deg=sh.heading, pitch_deg=sh.pitch, size=size,
                      look=sh.look, seed=sh.seed)
    Image.fromarray(arr, "RGB").save(out / sh.path, format="JPEG", quality=sh.quality, optimize=False,
                                      progressive=False, subsampling=2)
    return 1


def _render_all(city: City, out: Path, size: int, shots: tuple[list[_Shot], list[_Shot]], *, workers: int,
                progress: bool) -> float:
    """Render every shot (database, then queries) to ``out``; returns the seconds spent rendering."""
    _CTX.update(city=city, out=out, size=int(size), shots=shots)
    tasks = [(0, i) for i in range(len(shots[0]))] + [(1, i) for i in range(len(shots[1]))]
    total = len(tasks)
    t_render = time.perf_counter()
    done = 0
    step = max(1, total // 20)

    def report() -> None:
        if progress and (done % step == 0 or done == total):
            el = time.perf_counter() - t_render
            print(f"synth-city: {done}/{total} images, {done / max(el, 1e-9):.0f} img/s", file=sys.stderr, flush=True)

    try:
        if workers > 1 and total > 8 and "fork" in mp.get_all_start_methods():
            with mp.get_context("fork").Pool(int(workers)) as pool:
                for _ in pool.imap_unordered(_render_one, tasks, chunksize=16):
                    done += 1
                    report()
        else:
            for t in tasks:
                _render_one(t)
                done += 1
                report()
    finally:
        _CTX.clear()
    return time.perf_counter() - t_render


def place_city(*, seed: int, extent_m: float, origin_latlon: tuple[float, float]) -> City:
    """Build the city of ``seed`` and place its centre at ``origin_latlon`` (UTM of the origin's zone)."""
    lat0, lon0 = float(origin_latlon[0]), float(origin_latlon[1])
    check_latlon(np.array([lat0]), np.array([lon0]), where="origin_latlon")
    e0, n0, z0, south = latlon_to_utm(np.array([lat0]), np.array([lon0]))
    city = build_city(seed=seed, extent_m=extent_m)
    city.sw_east = float(round(float(e0[0]) - extent_m / 2))
    city.sw_north = float(round(float(n0[0]) - extent_m / 2))
    city.zone = int(z0[0])
    city.zone_letter = utm.latitude_to_zone_letter(lat0)
    city.south = bool(south[0])
    return city


def load_city(out: Path) -> City:
    """Rebuild the :class:`City` of a generated folder from its ``city.json`` (deterministic)."""
    try:
        meta = json.loads(read_bounded(Path(out) / "city.json", max_bytes=64 << 20).decode("utf-8"))
    except (GeolocError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{one_line(Path(out) / 'city.json')}: cannot be read ({one_line(err)}); regenerate the city") from None
    if meta.get("version") != SYNTH_VERSION:
        raise DatasetError(f"{out}/city.json: generator version {meta.get('version')} != {SYNTH_VERSION}; regenerate the city")
    p = meta["parameters"]
    return place_city(seed=p["seed"], extent_m=p["extent_m"], origin_latlon=tuple(p["origin_latlon"]))


def _labels(city: City, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Local (x, y) -> UTM east, north (rounded to 1 cm) and the lat, lon of those rounded values."""
    east = np.round(city.sw_east + np.asarray(x, np.float64), 2)
    north = np.round(city.sw_north + np.asarray(y, np.float64), 2)
    lat, lon = utm_to_latlon(east, north, np.full(east.shape, city.zone), np.full(east.shape, city.south))
    return east, north, lat, lon


def _query_shots(city: City, pos: np.ndarray, hdg: np.ndarray, *, seed: int, n_queries: int, shift: str,
                 avoid: np.ndarray | None = None, pano: str = "query") -> tuple[list[_Shot], list[str]]:
    """Query poses, looks and CSV rows of ``city`` drawn from ``seed``'s query sub-stream.

    pos ``[P, 2]`` local database positions (metres), hdg ``[H]`` database headings; queries keep
    1 m away from every database position and from every ``avoid`` ``[A, 2]`` local position (the
    city's own test queries, when drawing validation queries of it).
    """
    extent_m = city.extent
    zone, letter = city.zone, city.zone_letter
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _S_QUERY]))
    streets = [(0, c, w) for c, w in city.h_streets] + [(1, c, w) for c, w in city.v_streets]
    q_shots, q_rows = [], []
    margin = 3.0
    tries = 0
    while len(q_shots) < n_queries:
        tries += 1
        _check(tries < 100 * n_queries + 1000, "cannot place queries away from the database positions; use a larger city")
        axis, c, w = streets[int(rng.integers(0, len(streets)))]
        along = float(rng.uniform(margin, extent_m - margin))
        road_half = (w - 5.0 if w < 15 else w - 6.0) / 2
        lateral = float(rng.uniform(-road_half + 0.5, road_half - 0.5))
        x, y = (along, c + lateral) if axis == 0 else (c + lateral, along)
        x, y = round(x, 2), round(y, 2)
        if np.min((pos[:, 0] - x) ** 2 + (pos[:, 1] - y) ** 2) < 1.0:
            continue
        if avoid is not None and len(avoid) and np.min((avoid[:, 0] - x) ** 2 + (avoid[:, 1] - y) ** 2) < 1.0:
            continue
        gi, gj = int(x / GMAP_RES), int(y / GMAP_RES)
        if city.gmap[gj, gi] not in (G_ROAD, G_MARK, G_CROSS):
            continue
        i = len(q_shots)
        look, quality, hj, pj = query_look(shift, rng, salt=i + 1)
        base = float(hdg[int(rng.integers(0, len(hdg)))])
        heading = round((base + float(rng.uniform(-hj, hj))) % 360.0, 1) % 360.0
        pitch = round(DB_PITCH + float(rng.uniform(-pj, pj)), 1)
        e, n, la, lo = (v[0] for v in _labels(city, np.array([x]), np.array([y])))
        name = _vpr_name(e, n, zone, letter, la, lo, f"{pano}{i:06d}", "0", heading, pitch, "202411",
                         f"{shift}-{look.tod}")
        rel = f"queries/{name}"
        q_shots.append(_Shot(float(e - city.sw_east), float(n - city.sw_north), heading, pitch, look, quality,
                             _image_seed(seed, _S_RENDER_Q, i), rel))
        q_rows.append(f"{rel},{la:.7f},{lo:.7f},{e:.2f},{n:.2f},{zone},{letter},{heading:.1f}")
    return q_shots, q_rows


def _write_csv(path: Path, rows: list[str]) -> None:
    path.write_text(CSV_HEADER + "\n" + "".join(r + "\n" for r in rows))


MARKER = ".geoloc-synth.json"
"""The generator's signed marker in every folder it writes: its parameters and every file it wrote."""
_MARKER_KEY = b"geoloc.synth/marker/v1"
_MARKER_MAX_BYTES = 512 << 20


def _sign(body: dict) -> str:
    payload = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hmac.new(_MARKER_KEY, payload, hashlib.sha256).hexdigest()


def _write_marker(out: Path, *, params: dict, files: list[str], dirs: list[str], complete: bool) -> None:
    body = {"generator": "geoloc.synth", "version": SYNTH_VERSION, "parameters": params, "complete": bool(complete),
            "dirs": sorted(dirs), "files": sorted(files)}
    atomic_write_json(out / MARKER, {**body, "signature": _sign(body)})


def _own_relpath(rel: object) -> bool:
    if not isinstance(rel, str) or not rel or "\\" in rel:
        return False
    pure = PurePosixPath(rel)
    return not pure.is_absolute() and ".." not in pure.parts and len(pure.parts) <= 2


def read_marker(out: Path) -> dict | None:
    """The verified marker of a folder written by :func:`generate_city`, or None (absent, unsigned, edited).

    Only a regular file (not a link) of bounded size is read.
    """
    try:
        raw = read_bounded(Path(out) / MARKER, max_bytes=_MARKER_MAX_BYTES, follow_symlinks=False)
        marker = json.loads(raw.decode("utf-8"))
    except (GeolocError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(marker, dict) or marker.get("generator") != "geoloc.synth":
        return None
    body = {k: v for k, v in marker.items() if k != "signature"}
    if not isinstance(marker.get("signature"), str) or not hmac.compare_digest(marker["signature"], _sign(body)):
        return None
    if not (isinstance(marker.get("files"), list) and isinstance(marker.get("dirs"), list)
            and all(_own_relpath(f) for f in marker["files"])
            and all(_own_relpath(d) and "/" not in d for d in marker["dirs"])):
        return None
    return marker


def _claim_folder(out: Path) -> dict | None:
    """Refuse an ``out`` the generator may not write into; returns the marker of a city it generated there.

    Accepted: a new path, an empty folder, or a folder holding a valid signed marker (a city this
    generator wrote). Anything else (a real dataset with its own ``city.json``, say) is refused
    before any work.
    """
    if os.path.islink(out):
        raise DatasetError(f"{one_line(out)}: is a symbolic link; give the folder itself as --out")
    if not os.path.lexists(out):
        return None
    _check(out.is_dir(), f"{one_line(out)}: exists and is not a folder; choose another --out")
    if not any(out.iterdir()):
        return None
    marker = read_marker(out)
    _check(marker is not None,
           f"{one_line(out)}: folder is not empty and is not a city written by geoloc synth-city (no valid {MARKER} "
           "marker); choose an empty or new folder")
    return marker


def _remove_own_files(out: Path, marker: dict | None) -> None:
    """Delete the files a previous generation listed in its marker (only those), then its folders if empty."""
    if marker is None:
        return
    for rel in marker["files"]:
        f = out / rel
        try:
            if stat.S_ISREG(os.lstat(f).st_mode):
                os.unlink(f)
        except FileNotFoundError:
            pass
    for d in marker["dirs"]:
        with contextlib.suppress(OSError):
            (out / d).rmdir()  # only when empty: files someone else put there stay
    with contextlib.suppress(FileNotFoundError):
        os.unlink(out / MARKER)


def generate_city(*, out: Path, seed: int = 0, extent_m: float = 1000.0, spacing_m: float = 5.0,
                  shift: str = "mild", n_queries: int = 500, headings: int = 4, image_size: int = 256,
                  origin_latlon: tuple[float, float] = (55.7047, 13.1910), aerial: bool = True,
                  progress: bool = True, workers: int = 1) -> CityInfo:
    """Generate a synthetic city dataset into ``out`` (see the module docstring for the layout).

    Raises:
        geoloc.fileio.OutputError: one line when the disk fills up, the file system is read-only or
            permission is denied while writing.
        DatasetError: an invalid argument, or ``out`` is a non-empty folder that is not a city
            this generator wrote (recognised by its signed marker, :data:`MARKER`). In a city it
            wrote, only the files its marker lists are deleted or replaced; files added by
            someone else stay.
    """
    with translate_write_errors(Path(out)):
        return _generate(out=out, seed=seed, extent_m=extent_m, spacing_m=spacing_m, shift=shift,
                         n_queries=n_queries, headings=headings, image_size=image_size, origin_latlon=origin_latlon,
                         aerial=aerial, progress=progress, workers=workers)


def _generate(*, out: Path, seed: int, extent_m: float, spacing_m: float, shift: str, n_queries: int, headings: int,
              image_size: int, origin_latlon: tuple[float, float], aerial: bool, progress: bool,
              workers: int) -> CityInfo:
    t_start = time.perf_counter()
    _check(isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and 0 <= seed < 2**63,
           f"seed must be a non-negative integer (got {seed!r})")
    _check(isinstance(extent_m, (int, float)) and 60.0 <= float(extent_m) <= 5000.0,
           f"extent_m must lie in [60, 5000] metres (got {extent_m!r})")
    _check(isinstance(spacing_m, (int, float)) and 1.0 <= float(spacing_m) <= 100.0,
           f"spacing_m must lie in [1, 100] metres (got {spacing_m!r})")
    _check(shift in SHIFTS, f"shift must be one of {', '.join(SHIFTS)} (got {shift!r})")
    _check(isinstance(n_queries, (int, np.integer)) and 0 <= n_queries <= 1_000_000,
           f"n_queries must be an integer in [0, 1000000] (got {n_queries!r})")
    _check(isinstance(headings, (int, np.integer)) and 1 <= headings <= 36,
           f"headings must be an integer in [1, 36] (got {headings!r})")
    _check(isinstance(image_size, (int, np.integer)) and 64 <= image_size <= 2048,
           f"image_size must be an integer in [64, 2048] pixels (got {image_size!r})")
    _check(isinstance(workers, (int, np.integer)) and workers >= 1, f"workers must be >= 1 (got {workers!r})")
    try:
        origin = (float(origin_latlon[0]), float(origin_latlon[1]))
    except (TypeError, ValueError, IndexError):
        raise DatasetError(f"origin_latlon must be a (lat, lon) pair of degrees (got {origin_latlon!r})") from None
    out = Path(out)
    previous = _claim_folder(out)
    extent_m, spacing_m = float(extent_m), float(spacing_m)
    city = place_city(seed=int(seed), extent_m=extent_m, origin_latlon=origin)
    zone, letter = city.zone, city.zone_letter

    # -- database poses: every street, every spacing_m, `headings` headings --------------------
    pos = street_walk(city, spacing_m)
    hdg = np.round((np.arange(headings) * (360.0 / headings)) % 360.0, 1)
    de, dn, dlat, dlon = _labels(city, pos[:, 0], pos[:, 1])
    db_shots, db_rows = [], []
    for p in range(len(pos)):
        for k, h in enumerate(hdg):
            name = _vpr_name(de[p], dn[p], zone, letter, dlat[p], dlon[p], f"synth{p:06d}", str(k), float(h),
                             DB_PITCH, "202406", "database")
            rel = f"database/{name}"
            db_shots.append(_Shot(float(de[p] - city.sw_east), float(dn[p] - city.sw_north), float(h), DB_PITCH,
                                  Look(), DB_JPEG_QUALITY, _image_seed(seed, _S_RENDER_DB, len(db_shots)), rel))
            db_rows.append(f"{rel},{dlat[p]:.7f},{dlon[p]:.7f},{de[p]:.2f},{dn[p]:.2f},{zone},{letter},{h:.1f}")

    # -- queries: other positions on the streets, random-ish headings, shifted looks -------------
    q_shots, q_rows = _query_shots(city, pos, hdg, seed=int(seed), n_queries=int(n_queries), shift=shift)

    # -- aerial tiles: positions and names up front, so the marker lists every file before any is written
    a_tiles, a_rows = [], []
    if aerial:
        nt = max(1, int(math.ceil(extent_m / AERIAL_TILE_M)))
        size_m = extent_m / nt
        for j in range(nt):
            for i in range(nt):
                x, y = (i + 0.5) * size_m, (j + 0.5) * size_m
                e, n, la, lo = (v[0] for v in _labels(city, np.array([x]), np.array([y])))
                name = _vpr_name(e, n, zone, letter, la, lo, f"aerial{j:03d}{i:03d}", f"{size_m:g}m", 0.0, -90.0,
                                 "202406", "aerial")
                a_tiles.append((e, n, size_m, f"aerial/{name}"))
                a_rows.append(f"aerial/{name},{la:.7f},{lo:.7f},{e:.2f},{n:.2f},{zone},{letter},0.0")

    params = {"seed": int(seed), "extent_m": extent_m, "spacing_m": spacing_m, "shift": shift,
              "n_queries": int(n_queries), "headings": int(headings), "image_size": int(image_size),
              "origin_latlon": list(origin), "aerial": bool(aerial)}
    planned = ([sh.path for sh in db_shots] + [sh.path for sh in q_shots] + [t[3] for t in a_tiles]
               + ["database.csv", "queries.csv", "city.json"] + (["aerial.csv"] if aerial else []))
    subdirs = ["database", "queries"] + (["aerial"] if aerial else [])
    out.mkdir(parents=True, exist_ok=True)
    _remove_own_files(out, previous)
    # written before any image (complete: false): an interrupted run can be regenerated over
    _write_marker(out, params=params, files=planned, dirs=subdirs, complete=False)
    for sub in subdirs:
        (out / sub).mkdir(parents=True, exist_ok=True)

    # -- render -------------------------------------------------------------------------------
    render_s = _render_all(city, out, int(image_size), (db_shots, q_shots), workers=workers, progress=progress)

    _write_csv(out / "database.csv", db_rows)
    _write_csv(out / "queries.csv", q_rows)

    # -- aerial tiles -----------------------------------------------------------------------------
    n_aerial, aerial_csv = 0, None
    if aerial:
        for e, n, size_m, rel in a_tiles:
            tile = render_aerial_tile(city, east=e, north=n, size_m=size_m, pixels=int(image_size))
            tile.save(out / rel, format="JPEG", quality=DB_JPEG_QUALITY, optimize=False, progressive=False,
                      subsampling=2)
        aerial_csv = out / "aerial.csv"
        _write_csv(aerial_csv, a_rows)
        n_aerial = len(a_rows)

    meta = {
        "generator": "geoloc.synth",
        "version": SYNTH_VERSION,
        "parameters": params,
        "utm": {"zone": zone, "zone_letter": letter, "sw_east": city.sw_east, "sw_north": city.sw_north},
        "counts": {"database": len(db_shots), "database_positions": int(len(pos)), "queries": len(q_shots),
                   "aerial": n_aerial, "buildings": city.n_buildings, "sprites": int(city.sx.size),
                   "streets_ew": int(len(city.h_streets)), "streets_ns": int(len(city.v_streets))},
        "landmarks": [dict(lm, east=round(city.sw_east + lm["x"], 2), north=round(city.sw_north + lm["y"], 2))
                      for lm in city.landmarks],
        "camera": {"height_m": CAM_HEIGHT, "fov_deg": 90.0, "database_pitch_deg": DB_PITCH},
    }
    (out / "city.json").write_text(json.dumps(meta, indent=2) + "\n")
    _write_marker(out, params=params, files=planned, dirs=subdirs, complete=True)
    secs = time.perf_counter() - t_start
    return CityInfo(out=out, n_database=len(db_shots), n_queries=len(q_shots), n_aerial=n_aerial, zone=zone,
                    zone_letter=letter, seconds=secs, images_per_second=(len(db_shots) + len(q_shots)) / max(render_s, 1e-9),
                    database_csv=out / "database.csv", queries_csv=out / "queries.csv", aerial_csv=aerial_csv,
                    city_json=out / "city.json")


@dataclass
class QueriesInfo:
    """What :func:`generate_queries` wrote."""

    out: Path
    city: Path
    n_queries: int
    seed: int
    shift: str
    seconds: float
    queries_csv: Path


def _read_city_queries(city_dir: Path, city: City) -> np.ndarray:
    """Local positions ``[Q, 2]`` (metres) of the city's own queries, from its ``queries.csv``."""
    path = city_dir / "queries.csv"
    try:
        lines = read_bounded(path, max_bytes=1 << 30).decode("utf-8").splitlines()
    except (GeolocError, UnicodeDecodeError) as err:
        raise DatasetError(f"{one_line(path)}: cannot be read ({one_line(err)}); regenerate the city") from None
    header = lines[0].split(",") if lines else []
    if header != CSV_HEADER.split(","):
        raise DatasetError(f"{one_line(path)}: not a synth-city queries.csv (header {lines[0][:80] if lines else ''!r}); "
                           "regenerate the city")
    rows = [ln.split(",") for ln in lines[1:] if ln.strip()]
    try:
        en = np.array([(float(r[3]), float(r[4])) for r in rows], np.float64).reshape(-1, 2)
    except (ValueError, IndexError):
        raise DatasetError(f"{one_line(path)}: holds a row without numeric east,north; regenerate the city") from None
    return en - np.array([city.sw_east, city.sw_north])


_CITY_KEYS = ("seed", "extent_m", "spacing_m", "shift", "headings", "image_size", "origin_latlon")


def _city_parameters(city_dir: Path) -> dict:
    """The generation parameters of a finished city folder: from its signed marker, or (a city written
    before markers existed) from a ``city.json`` of this generator version whose queries.csv exists.

    Raises:
        DatasetError: the folder is not a finished synth city (or is a folder of validation queries).
    """
    what = (f"{one_line(city_dir)}: not a finished city written by geoloc synth-city (no valid {MARKER} marker, "
            f"or no city.json of generator version {SYNTH_VERSION} with database.csv and queries.csv); give the "
            "--out folder of a finished synth-city run")
    _check(city_dir.is_dir(), what)
    marker = read_marker(city_dir)
    if marker is not None:
        params = marker.get("parameters")
        _check(isinstance(params, dict) and marker.get("complete") is True and "queries_of" not in params, what)
    else:
        try:
            meta = json.loads(read_bounded(city_dir / "city.json", max_bytes=64 << 20).decode("utf-8"))
        except (GeolocError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            meta = None
        ok = isinstance(meta, dict) and meta.get("generator") == "geoloc.synth" and meta.get("version") == SYNTH_VERSION
        params = meta.get("parameters") if ok else None
    _check(isinstance(params, dict) and all(k in params for k in _CITY_KEYS)
           and (city_dir / "city.json").is_file() and (city_dir / "database.csv").is_file()
           and (city_dir / "queries.csv").is_file(), what)
    return params


def generate_queries(*, city_dir: Path, out: Path, seed: int, n_queries: int = 500, shift: str | None = None,
                     progress: bool = True, workers: int = 1) -> QueriesInfo:
    """Queries of an existing synthetic city drawn from their own ``seed`` (e.g. validation queries
    for ``build-index --val-queries``): the same city (streets, buildings, positions), other
    viewpoints and looks.

    ``out`` gets ``queries/`` (VPR-named JPEGs, pano ids ``val000000``...), ``queries.csv`` and the
    generator's marker. Queries keep 1 m away from every database position and from every one of
    the city's own test queries, so no validation image shows a test query's view. ``shift``
    defaults to the city's own; the image size and database headings are the city's.

    Raises:
        DatasetError: ``city_dir`` is not a finished city written by :func:`generate_city` (neither
            a valid marker nor a city.json of this generator version, or a folder of queries),
            ``seed`` equals the city's seed, an invalid
            argument, or ``out`` is a non-empty folder this generator did not write.
        geoloc.fileio.OutputError: one line on a full disk, a read-only file system or a permission error.
    """
    with translate_write_errors(Path(out)):
        return _generate_queries(city_dir=Path(city_dir), out=Path(out), seed=seed, n_queries=n_queries, shift=shift,
                                 progress=progress, workers=workers)


def _generate_queries(*, city_dir: Path, out: Path, seed: int, n_queries: int, shift: str | None, progress: bool,
                      workers: int) -> QueriesInfo:
    t_start = time.perf_counter()
    params = _city_parameters(city_dir)
    _check(isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and 0 <= seed < 2**63,
           f"seed must be a non-negative integer (got {seed!r})")
    _check(int(seed) != int(params["seed"]),
           f"seed {seed} is the city's own seed, which drew its test queries; choose another --seed for validation queries")
    shift = params["shift"] if shift is None else shift
    _check(shift in SHIFTS, f"shift must be one of {', '.join(SHIFTS)} (got {shift!r})")
    _check(isinstance(n_queries, (int, np.integer)) and 1 <= n_queries <= 1_000_000,
           f"n_queries must be an integer in [1, 1000000] (got {n_queries!r})")
    _check(isinstance(workers, (int, np.integer)) and workers >= 1, f"workers must be >= 1 (got {workers!r})")
    _check(out.resolve() != city_dir.resolve(), f"{one_line(out)}: is the city itself; choose another --out")
    city = load_city(city_dir)
    previous = _claim_folder(out)
    pos = street_walk(city, float(params["spacing_m"]))
    headings = int(params["headings"])
    hdg = np.round((np.arange(headings) * (360.0 / headings)) % 360.0, 1)
    avoid = _read_city_queries(city_dir, city)
    q_shots, q_rows = _query_shots(city, pos, hdg, seed=int(seed), n_queries=int(n_queries), shift=shift,
                                   avoid=avoid, pano="val")
    own = {"queries_of": str(city_dir.resolve()), "city_seed": int(params["seed"]), "seed": int(seed),
           "shift": shift, "n_queries": int(n_queries), "image_size": int(params["image_size"])}
    planned = [sh.path for sh in q_shots] + ["queries.csv"]
    out.mkdir(parents=True, exist_ok=True)
    _remove_own_files(out, previous)
    _write_marker(out, params=own, files=planned, dirs=["queries"], complete=False)
    (out / "queries").mkdir(parents=True, exist_ok=True)
    _render_all(city, out, int(params["image_size"]), ([], q_shots), workers=int(workers), progress=progress)
    _write_csv(out / "queries.csv", q_rows)
    _write_marker(out, params=own, files=planned, dirs=["queries"], complete=True)
    return QueriesInfo(out=out, city=city_dir, n_queries=len(q_shots), seed=int(seed), shift=shift,
                       seconds=time.perf_counter() - t_start, queries_csv=out / "queries.csv")


def contact_sheet(paths: list[str | Path], out_png: str | Path, cols: int = 8, thumb: int = 192) -> Path:
    """Tile images (``thumb`` px squares, ``cols`` per row) into one PNG; returns its path."""
    paths = list(paths)
    if not paths:
        raise DatasetError("contact_sheet: no images given")
    cols = max(1, min(int(cols), len(paths)))
    rows = (len(paths) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * thumb, rows * thumb), (0, 0, 0))
    for k, p in enumerate(paths):
        with Image.open(p) as im:
            im = im.convert("RGB").resize((thumb, thumb), Image.BILINEAR)
        sheet.paste(im, ((k % cols) * thumb, (k // cols) * thumb))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png, format="PNG")
    return out_png
