"""Street-level view of a :class:`~geoloc.synth.city.City`: a vectorised 2.5D column raycaster.

Per image column one ray is marched through the 0.5 m building raster (fixed samples whose
step grows with distance), up to three wall layers are kept per column (the nearest wall and
taller walls behind it, for the skyline), and each hit is refined exactly against the
building's footprint rectangle. Pixels are then shaded by kind: procedural facades (style,
floors, windows, shops, doors), perspective ground (road, markings, sidewalks, grass), a sky
gradient, and billboard sprites (trees, lamps, benches, signs, steeples, vehicles) depth-tested
per pixel. A :class:`Look` describes the appearance (time of day, fog, blur, noise, occluders,
changed facade details).

Only + - * / sqrt floor are used per pixel (no exp/sin from SIMD libm paths), so the bytes
are the same on any x86/ARM machine with the same numpy and Pillow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from geoloc.synth.city import (
    BMAP_RES, G_CROSS, G_GRASS, G_MARK, G_ROAD, G_SIDEWALK, GMAP_RES, GROUND_RGB, K_BENCH, K_BIN, K_CAR,
    K_LAMP, K_PERSON, K_SIGN, K_STEEPLE, K_TREE, MURAL_PALETTES, P_CHURCH, P_CURTAIN, P_MURAL, P_PUNCHED, P_RIBBON,
    P_TOWER, SHOP_RGB, STYLE_BRICK, STYLE_FLOOR, STYLE_PTYPE, STYLE_SPACING, STYLE_WW, STYLE_WZ0,
    STYLE_WZ1, City,
)

CAM_HEIGHT = 2.0
FOV_DEG = 90.0
MAX_DIST = 260.0


@dataclass(frozen=True)
class TimeOfDay:
    sky_h: tuple[float, float, float]
    sky_z: tuple[float, float, float]
    tint: tuple[float, float, float]
    fog_rgb: tuple[float, float, float]
    shade: tuple[float, float, float, float]
    """Facade light factor for faces looking west, east, south, north."""
    night: bool = False


TIMES: dict[str, TimeOfDay] = {
    "day": TimeOfDay((0.80, 0.87, 0.95), (0.36, 0.56, 0.88), (1.0, 1.0, 1.0), (0.82, 0.86, 0.90), (0.90, 0.78, 1.00, 0.66)),
    "morning": TimeOfDay((0.98, 0.86, 0.72), (0.50, 0.62, 0.86), (1.05, 0.95, 0.82), (0.94, 0.88, 0.80), (0.66, 1.00, 0.84, 0.62)),
    "overcast": TimeOfDay((0.78, 0.79, 0.80), (0.60, 0.62, 0.66), (0.84, 0.86, 0.90), (0.76, 0.77, 0.79), (0.88, 0.87, 0.90, 0.84)),
    "dusk": TimeOfDay((1.00, 0.62, 0.38), (0.28, 0.25, 0.46), (0.78, 0.60, 0.50), (0.72, 0.52, 0.44), (1.00, 0.62, 0.80, 0.60)),
    "night": TimeOfDay((0.10, 0.12, 0.22), (0.02, 0.03, 0.08), (0.24, 0.26, 0.36), (0.12, 0.13, 0.18), (0.90, 0.90, 0.90, 0.90), True),
}


@dataclass(frozen=True)
class Look:
    """Appearance of one rendering (everything but the pose).

    Attributes:
        tod: key of :data:`TIMES`.
        fog: haze strength 0..1; fog_dist: distance (m) at which half of ``fog`` is reached.
        blur: Gaussian blur radius in pixels; noise: sensor noise amplitude in 0..255 units.
        facade_change: share of buildings whose shop colours and curtains changed.
        cars, people: occluders placed in front of the camera.
        salt: seeds the facade changes (which buildings, what changed).
    """

    tod: str = "day"
    fog: float = 0.0
    fog_dist: float = 150.0
    blur: float = 0.0
    noise: float = 0.0
    facade_change: float = 0.0
    cars: int = 0
    people: int = 0
    salt: int = 0


# -- sprite textures (fixed, procedural) ------------------------------------------------------


def _make_textures() -> dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(kind, variant) -> (rgb ``[3, th, tw]`` float32, mask ``[th, tw]`` bool, emissive ``[th, tw]`` bool)."""
    rng = np.random.default_rng(12345)
    tex = {}

    def grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        return (yy + 0.5) / h, (xx + 0.5) / w

    for var, green in enumerate([(0.22, 0.42, 0.16), (0.14, 0.32, 0.14), (0.42, 0.48, 0.16)]):
        v, u = grid(64, 48)
        canopy = ((u - 0.5) / 0.48) ** 2 + ((v - 0.38) / 0.37) ** 2 < 1.0
        canopy &= rng.random((64, 48)) > 0.08
        trunk = (np.abs(u - 0.5) < 0.06) & (v > 0.55)
        rgb = np.zeros((64, 48, 3), np.float32)
        rgb[:] = (0.36, 0.25, 0.15)
        shadev = (0.75 + 0.5 * (0.6 - v) + 0.25 * rng.random((64, 48))).clip(0.5, 1.3)
        rgb[canopy] = np.array(green, np.float32) * shadev[canopy, None]
        tex[(K_TREE, var)] = (rgb, canopy | trunk, np.zeros((64, 48), bool))
    v, u = grid(64, 8)
    pole = np.abs(u - 0.5) < 0.2
    head = (v < 0.07) & (np.abs(u - 0.5) < 0.5)
    rgb = np.zeros((64, 8, 3), np.float32); rgb[:] = (0.20, 0.21, 0.22); rgb[head] = (1.0, 0.95, 0.75)
    tex[(K_LAMP, 0)] = (rgb, pole | head, head)
    v, u = grid(16, 32)
    back = (v < 0.35) & (v > 0.05); seat = (v > 0.45) & (v < 0.6)
    legs = (v >= 0.6) & ((np.abs(u - 0.12) < 0.04) | (np.abs(u - 0.88) < 0.04))
    rgb = np.zeros((16, 32, 3), np.float32); rgb[:] = (0.45, 0.30, 0.18); rgb[legs] = (0.15, 0.15, 0.15)
    tex[(K_BENCH, 0)] = (rgb, back | seat | legs, np.zeros((16, 32), bool))
    for var, c in enumerate([(0.10, 0.30, 0.75), (0.80, 0.10, 0.10), (0.10, 0.55, 0.25), (0.95, 0.80, 0.10)]):
        v, u = grid(64, 16)
        plate = v < 0.3
        border = plate & ((v < 0.03) | (v > 0.27) | (u < 0.1) | (u > 0.9))
        pole = np.abs(u - 0.5) < 0.1
        rgb = np.zeros((64, 16, 3), np.float32); rgb[:] = (0.45, 0.45, 0.47)
        rgb[plate] = c; rgb[border] = (0.95, 0.95, 0.95)
        tex[(K_SIGN, var)] = (rgb, plate | pole, np.zeros((64, 16), bool))
    v, u = grid(128, 24)
    spire = (v < 0.42) & (np.abs(u - 0.5) < 0.5 * (v / 0.42))
    body = v >= 0.42
    clock = ((u - 0.5) / 0.3) ** 2 + ((v - 0.52) / 0.055) ** 2 < 1
    belfry = (v > 0.6) & (v < 0.7) & (np.abs(u - 0.5) < 0.15)
    rgb = np.zeros((128, 24, 3), np.float32); rgb[:] = (0.78, 0.74, 0.64)
    rgb[spire] = (0.30, 0.55, 0.45); rgb[clock] = (0.95, 0.95, 0.90); rgb[belfry] = (0.15, 0.12, 0.10)
    tex[(K_STEEPLE, 0)] = (rgb, spire | body, clock & False)
    for var, c in enumerate([(0.75, 0.10, 0.10), (0.10, 0.20, 0.60), (0.85, 0.85, 0.85), (0.12, 0.12, 0.12),
                             (0.90, 0.75, 0.15), (0.35, 0.50, 0.35)]):
        v, u = grid(24, 48)
        bodym = (v > 0.35) & (v < 0.85)
        cabin = (v > 0.05) & (v <= 0.35) & (np.abs(u - 0.5) < 0.3 - 0.3 * (0.35 - v))
        wheels = (v >= 0.7) & ((((u - 0.22) / 0.09) ** 2 + ((v - 0.83) / 0.17) ** 2 < 1) |
                               (((u - 0.78) / 0.09) ** 2 + ((v - 0.83) / 0.17) ** 2 < 1))
        rgb = np.zeros((24, 48, 3), np.float32); rgb[:] = c
        rgb[cabin] = (0.15, 0.20, 0.25); rgb[wheels] = (0.05, 0.05, 0.05)
        tex[(K_CAR, var)] = (rgb, bodym | cabin | wheels, np.zeros((24, 48), bool))
    for var, c in enumerate([(0.70, 0.15, 0.15), (0.15, 0.25, 0.55), (0.20, 0.20, 0.20), (0.85, 0.80, 0.30)]):
        v, u = grid(48, 12)
        headm = ((u - 0.5) / 0.3) ** 2 + ((v - 0.07) / 0.07) ** 2 < 1
        torso = (v > 0.14) & (v < 0.55) & (np.abs(u - 0.5) < 0.45)
        legs = (v >= 0.55) & (np.abs(u - 0.5) < 0.35) & (np.abs(u - 0.5) > 0.04)
        rgb = np.zeros((48, 12, 3), np.float32); rgb[:] = c
        rgb[headm] = (0.85, 0.68, 0.55); rgb[legs] = (0.15, 0.15, 0.22)
        tex[(K_PERSON, var)] = (rgb, headm | torso | legs, np.zeros((48, 12), bool))
    v, u = grid(16, 10)
    rgb = np.zeros((16, 10, 3), np.float32); rgb[:] = (0.16, 0.30, 0.20)
    tex[(K_BIN, 0)] = (rgb, v > 0.05, np.zeros((16, 10), bool))
    # planar colour ([3, th, tw]): per-channel planes keep every image operation contiguous
    return {key: (np.ascontiguousarray(c.transpose(2, 0, 1)), m, e) for key, (c, m, e) in tex.items()}


_TEX = _make_textures()
_NOISE = (0.88 + 0.24 * np.random.default_rng(777).random((64, 64))).astype(np.float32)
_GROUND_LUT = np.ascontiguousarray((GROUND_RGB[:, None, :] * _NOISE.reshape(1, -1, 1)).reshape(-1, 3).T.astype(np.float32))
"""``[3, classes * 4096]``: ground colour per (class, noise texel), one plane per channel."""
_SAMPLES_CACHE: dict[float, np.ndarray] = {}


def _samples(max_dist: float = MAX_DIST) -> np.ndarray:
    """``[S]`` float32 ray sample distances; the step grows with distance (0.25 m near)."""
    if max_dist not in _SAMPLES_CACHE:
        t, out = 0.3, []
        while t < max_dist:
            out.append(t)
            t += 0.24 + 0.014 * t
        _SAMPLES_CACHE[max_dist] = np.array(out, np.float32)
    return _SAMPLES_CACHE[max_dist]


def _hash(*arrs: np.ndarray) -> np.ndarray:
    """Deterministic 32-bit integer hash of integer arrays (broadcast); ``[N]`` uint64 in [0, 2**32)."""
    m = np.uint64(0xFFFFFFFF)
    h = np.zeros(np.broadcast(*arrs).shape, np.uint64) + np.uint64(2166136261)
    for k, a in enumerate(arrs):
        a = np.asarray(a).astype(np.int64).astype(np.uint64)
        h = ((h ^ (a & m)) * np.uint64(16777619 + 2 * k)) & m
        h ^= h >> np.uint64(13)
    h = (h * np.uint64(0x2C1B3C6D)) & m
    return h ^ (h >> np.uint64(16))


# fixed facade materials (palette rows after the per-building wall colours)
_FIXED = np.array([
    (0.26, 0.33, 0.42),  # 0 glass (scaled by a vertical gradient)
    (0.90, 0.90, 0.88),  # 1 window frame
    (0.78, 0.74, 0.62),  # 2 curtain
    (0.42, 0.36, 0.30),  # 3 shutter
    (1.00, 0.82, 0.45),  # 4 lit window
    (0.28, 0.30, 0.30),  # 5 shop glass
    (1.00, 0.90, 0.70),  # 6 lit shop
    (0.26, 0.18, 0.12),  # 7 door
    (0.92, 0.92, 0.92),  # 8 tower band
    (0.75, 0.15, 0.12),  # 9 tower crown
    (0.28, 0.22, 0.45),  # 10 church window
    (0.90, 0.70, 0.40),  # 11 lit church window
    (0.30, 0.20, 0.12),  # 12 church door
], np.float32)


def _palette(city: City) -> np.ndarray:
    """``[3, B + 13 + 8 + 15]`` float32 (planar): building walls, fixed materials, shop colours, mural colours."""
    pal = getattr(city, "_pal", None)
    if pal is None:
        pal = np.concatenate([city.bwall, _FIXED, SHOP_RGB, MURAL_PALETTES.reshape(-1, 3)]).astype(np.float32)
        pal = np.ascontiguousarray(pal.T)
        city._pal = pal
    return pal


def _facade(city: City, lj: np.ndarray, xx: np.ndarray, z: np.ndarray, Lb: np.ndarray, Lu: np.ndarray,
            Lfw: np.ndarray, Lshade: np.ndarray, look: Look, night: bool) -> tuple[np.ndarray, np.ndarray]:
    """Facade colour of ``N`` wall pixels.

    Column quantities (``[L, W]``: building ``Lb``, metres along the face ``Lu``, face width
    ``Lfw``, light factor ``Lshade``) are derived once per column, then gathered per pixel
    through (layer ``lj [N]``, column ``xx [N]``); ``z [N]`` is the height above ground (m).
    Returns rgb ``[3, N]`` float32 (planar) and emissive ``[N]`` bool.
    """
    B = city.n_buildings
    FIX, SHOP, MUR = B, B + len(_FIXED), B + len(_FIXED) + len(SHOP_RGB)
    # ---- per column
    st = city.bstyle[Lb]
    pt = STYLE_PTYPE[st]
    nwin = np.maximum(1.0, np.floor(Lfw / STYLE_SPACING[st] + 0.5))
    uu = Lu * nwin / Lfw
    iu = np.floor(uu)
    du = np.abs(uu - iu - 0.5)
    ww2 = STYLE_WW[st] * 0.5
    std = (pt == P_PUNCHED) | (pt == P_RIBBON)
    curt = (pt == P_CURTAIN) | (pt == P_TOWER)
    shop_idx = city.bshop[Lb]
    salt = np.zeros(Lb.shape, np.int64)
    if look.facade_change > 0:
        hb = _hash(Lb, look.salt)
        changed = (hb % np.uint64(1000)).astype(np.int64) < int(look.facade_change * 1000)
        shift = (1 + (hb >> np.uint64(10)) % np.uint64(7)).astype(np.int32)
        shop_idx = np.where(changed & (shop_idx >= 0), (shop_idx + shift) % len(SHOP_RGB), shop_idx)
        salt = np.where(changed, look.salt + 1, 0)
    hc = _hash(Lb, iu, salt).astype(np.uint32)
    c_win = (du < ww2) & (std | curt)
    c_frame = std & (du > ww2 - 0.05)
    c_door = (iu == (city.bdoor[Lb] % nwin)) & (du < 0.2) & (std | curt)
    c_cdoor = (pt == P_CHURCH) & (np.abs(Lu - Lfw * 0.5) < 1.3)
    c_cwin = (pt == P_CHURCH) & (du < 0.16)
    c_sglass = du < 0.43
    # ---- per pixel
    ci = lj * Lb.shape[1] + xx
    b = Lb.ravel()[ci]
    h = city.bh[b]
    sp = st.ravel()[ci]
    ptp = pt.ravel()[ci]
    zz = z / STYLE_FLOOR[sp]
    iz = np.floor(zz)
    fz = zz - iz
    wz0 = STYLE_WZ0[sp]
    below = z < h - 0.9
    ground = iz == 0
    shp = shop_idx.ravel()[ci]
    has_shop = shp >= 0
    k = Lshade.ravel()[ci] * np.where(z < 0.3, np.float32(0.8), np.float32(1.0))
    k = np.where(z > h - 0.6, k * np.float32(0.7), k)
    k = np.where((ptp == P_PUNCHED) & (fz < 0.05) & (iz >= 1), k * np.float32(0.82), k)
    bi = np.flatnonzero(STYLE_BRICK[sp] > 0)
    if bi.size:
        zb = z[bi]
        u = Lu.ravel()[ci[bi]]
        row = np.floor(zb * (1 / 0.3))
        joint = ((np.floor(u * (1 / 0.6) + 0.5 * (row % 2)) * 0.6 - u) > -0.04) | ((zb * (1 / 0.3) - row) < 0.12)
        k[bi] = k[bi] * np.where(joint, np.float32(0.78), 0.9 + 0.1 * (row % 2))
    idx = b.astype(np.int64)
    win = c_win.ravel()[ci] & (fz > wz0) & (fz < STYLE_WZ1[sp]) & below & (z > 0.6) & ~(ground & has_shop)
    hw = hc.ravel()[ci] + (iz.astype(np.uint32) * np.uint32(0x9E3779B1))
    hw ^= hw >> np.uint32(15)
    hw *= np.uint32(0x2C1B3C6D)
    hw ^= hw >> np.uint32(12)
    gl = np.where(hw % np.uint32(5) == 0, FIX + 2, np.where(hw % np.uint32(11) == 3, FIX + 3, FIX + 0))
    lit = win & ((hw >> np.uint32(8)) % np.uint32(3) == 0) if night else np.zeros(z.shape, bool)
    gl = np.where(lit, FIX + 4, gl)
    frame = win & c_frame.ravel()[ci] | (win & (ptp != P_CURTAIN) & (ptp != P_TOWER) & (fz < wz0 + 0.04))
    idx = np.where(win, np.where(frame, FIX + 1, gl), idx)
    k = np.where(win & ~frame & (gl == FIX), k * (0.8 + 0.6 * fz), k)
    if (ptp == P_TOWER).any():
        tw = ptp == P_TOWER
        idx = np.where(tw & (iz % 10 == 0) & (fz < 0.35), FIX + 8, idx)
        idx = np.where(tw & (z > h - 5.0), FIX + 9, idx)
    shop = ground & has_shop
    sglass = shop & (fz > 0.10) & (fz < 0.72) & c_sglass.ravel()[ci]
    idx = np.where(sglass, FIX + (6 if night else 5), idx)
    idx = np.where(shop & (fz >= 0.76) & (fz < 0.95), SHOP + shp, idx)
    idx = np.where(ground & c_door.ravel()[ci] & (fz < 0.72), FIX + 7, idx)
    emis = lit | sglass if night else lit
    if (ptp == P_CHURCH).any():
        cw = c_cwin.ravel()[ci] & (z > 3.0) & (z < h - 3.0 - du.ravel()[ci] * 8.0)
        idx = np.where(cw, FIX + (11 if night else 10), idx)
        idx = np.where(c_cdoor.ravel()[ci] & (z < 3.8), FIX + 12, idx)
        if night:
            emis = emis | cw
    mu = np.flatnonzero((ptp == P_MURAL) & (z > 0.8) & below)
    if mu.size:
        bm = b[mu]
        p = city.bparam[bm]
        fwm = Lfw.ravel()[ci[mu]]
        um = Lu.ravel()[ci[mu]]
        ru = um - fwm * (0.3 + 0.4 * ((p % 7) / 6.0))
        rz = z[mu] - h[mu] * 0.5
        r = np.sqrt(ru * ru + rz * rz)
        km = (np.floor(r / (1.2 + (p % 5) * 0.3) + (p % 3)) + np.floor((um + z[mu] * ((p % 2) * 2 - 1)) / 5.0)) % 5
        idx[mu] = MUR + (p % len(MURAL_PALETTES)) * 5 + km.astype(np.int64)
        k[mu] = Lshade.ravel()[ci[mu]]
    pal = _palette(city)
    k = k.astype(np.float32)
    rgb = np.empty((3, idx.size), np.float32)
    for c in range(3):
        np.multiply(pal[c].take(idx), k, out=rgb[c])
    return rgb, emis


def render_view(city: City, *, x: float, y: float, heading_deg: float, pitch_deg: float = 0.0,
                size: int = 256, look: Look = Look(), seed: int = 0) -> np.ndarray:
    """Render the view from ground position (x, y), camera 2 m high.

    Args:
        x, y: local metres (east, north); heading_deg: compass heading (0 = north, 90 = east);
        pitch_deg: up is positive; size: square image side; look: appearance; seed: per-image
        randomness (occluder placement, noise).
    Returns:
        ``[size, size, 3]`` uint8 RGB.
    """
    H = W = int(size)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, 0x7E11]))
    tod = TIMES[look.tod]
    hr = math.radians(heading_deg)
    fx, fy = math.sin(hr), math.cos(hr)
    rx, ry = math.cos(hr), -math.sin(hr)
    tanh = math.tan(math.radians(FOV_DEG / 2))
    f = (W / 2) / tanh
    hor = H / 2 + f * math.tan(math.radians(pitch_deg))
    ch = CAM_HEIGHT
    camx = ((2.0 * (np.arange(W, dtype=np.float32) + 0.5) / W) - 1.0) * tanh
    dx = (fx + rx * camx).astype(np.float32)
    dy = (fy + ry * camx).astype(np.float32)
    dx = np.where(np.abs(dx) < 1e-6, np.float32(1e-6), dx)
    dy = np.where(np.abs(dy) < 1e-6, np.float32(1e-6), dy)
    cols = np.arange(W)

    # -- march ------------------------------------------------------------------------------
    T = _samples()
    S = T.size
    px = np.float32(x) + T[:, None] * dx[None, :]
    py = np.float32(y) + T[:, None] * dy[None, :]
    ny, nx = city.bmap.shape
    ix = np.floor(px * (1.0 / BMAP_RES)).astype(np.int32)
    iy = np.floor(py * (1.0 / BMAP_RES)).astype(np.int32)
    inside = (ix >= 0) & (ix < nx) & (iy >= 0) & (iy < ny)
    flat = np.where(inside, iy * nx + ix, 0)
    bid = np.where(inside, city.bmap.ravel()[flat], 0)
    hit = bid > 0
    ytop_s = hor - f * (city.bh_ext[bid] - ch) / T[:, None]
    kidx = np.arange(S)[:, None]

    Y = np.arange(H, dtype=np.float32)[:, None] + 0.5
    lid = np.full((H, W), -1, np.int8)
    L_b, L_t, L_u, L_fw, L_face = [], [], [], [], []
    prev_k = np.full(W, -1)
    front_t = np.full(W, np.inf, np.float32)
    front_top = np.full(W, np.inf, np.float32)
    prev_top = np.full(W, np.inf, np.float32)
    prev_top_exact = np.full(W, np.float32(H + 1))
    for j in range(3):
        valid = hit & (kidx > prev_k[None, :]) & (ytop_s < prev_top[None, :] - 0.5)
        k = valid.argmax(0)
        has = valid[k, cols]
        if not has.any():
            break
        b = np.where(has, bid[k, cols] - 1, 0)
        tx0 = (city.bx0[b] - x) / dx
        tx1 = (city.bx1[b] - x) / dx
        ty0 = (city.by0[b] - y) / dy
        ty1 = (city.by1[b] - y) / dy
        ex = np.minimum(tx0, tx1)
        ey = np.minimum(ty0, ty1)
        xface = ex > ey
        tent = np.maximum(np.where(xface, ex, ey), 0.05).astype(np.float32)
        hx = x + tent * dx
        hy = y + tent * dy
        u = np.where(xface, np.where(dx > 0, city.by1[b] - hy, hy - city.by0[b]),
                     np.where(dy > 0, hx - city.bx0[b], city.bx1[b] - hx))
        fw = np.where(xface, city.by1[b] - city.by0[b], city.bx1[b] - city.bx0[b])
        face = np.where(xface, np.where(dx > 0, 0, 1), np.where(dy > 0, 2, 3))
        top = hor - f * (city.bh[b] - ch) / tent
        bot = np.minimum(hor + f * ch / tent, prev_top_exact)
        m = has[None, :] & (Y >= top[None, :]) & (Y < bot[None, :])
        lid[m] = j
        L_b.append(b); L_t.append(tent); L_u.append(np.maximum(u, 0)); L_fw.append(fw); L_face.append(face)
        if j == 0:
            front_t = np.where(has, tent, np.inf).astype(np.float32)
            front_top = np.where(has, top, np.inf).astype(np.float32)
        prev_k = np.where(has, k, S)
        prev_top = np.where(has, ytop_s[k, cols], -np.inf)
        prev_top_exact = np.where(has, np.maximum(np.minimum(top, prev_top_exact), -1.0), -1.0).astype(np.float32)

    tint = np.array(tod.tint, np.float32)
    e = np.clip((hor - np.arange(H, dtype=np.float32) - 0.5) / (H * 0.7), 0.0, 1.0)[:, None]
    skyc = (np.array(tod.sky_h, np.float32) * (1 - e) + np.array(tod.sky_z, np.float32) * e) / tint
    img = np.empty((3, H, W), np.float32)  # planar: one contiguous plane per channel
    for c in range(3):
        img[c] = skyc[:, c, None]
    depth = np.full((H, W), np.inf, np.float32)
    emis = np.zeros((H, W), bool)
    shade_tab = np.array(tod.shade, np.float32)

    # -- walls ------------------------------------------------------------------------------
    idx = np.flatnonzero(lid >= 0)
    if idx.size:
        lj = lid.ravel()[idx].astype(np.int64)
        xx = idx % W
        yy = idx // W
        Lb, Lt = np.stack(L_b), np.stack(L_t)
        tt = Lt[lj, xx]
        zz = ch + (hor - (yy + 0.5)) * tt / f
        Lshade = shade_tab[np.stack(L_face)]
        rgb, em = _facade(city, lj, xx, zz, Lb, np.stack(L_u).astype(np.float32), np.stack(L_fw).astype(np.float32),
                          Lshade, look, tod.night)
        for c in range(3):
            img[c].ravel()[idx] = rgb[c]
        depth.ravel()[idx] = tt
        emis.ravel()[idx] = em

    # -- ground -----------------------------------------------------------------------------
    g0 = max(0, int(math.floor(hor + 0.5)))
    if g0 < H:
        rows = np.arange(g0, H, dtype=np.float32) + 0.5
        trow = np.minimum(f * ch / np.maximum(rows - hor, 1e-3), 3000.0).astype(np.float32)
        gxw = np.float32(x) + trow[:, None] * dx[None, :]
        gyw = np.float32(y) + trow[:, None] * dy[None, :]
        gn = city.gmap.shape[0]
        gi = np.floor(gxw * (1.0 / GMAP_RES)).astype(np.int64)
        gj = np.floor(gyw * (1.0 / GMAP_RES)).astype(np.int64)
        ins = (gi >= 0) & (gi < gn) & (gj >= 0) & (gj < gn)
        cls = np.where(ins, city.gmap.ravel()[np.where(ins, gj * gn + gi, 0)], G_GRASS).astype(np.int64)
        lidx = (cls << 12) | ((gj & 63) << 6) | (gi & 63)
        far = np.minimum(trow * np.float32(1 / 120.0), np.float32(1.0))[:, None]
        gm = lid[g0:] < 0
        for c in range(3):
            gc = _GROUND_LUT[c].take(lidx)
            gc *= 1 - far
            gc += np.float32(0.45) * far
            np.copyto(img[c, g0:], gc, where=gm)
        dsub = depth[g0:]
        np.copyto(dsub, trow[:, None], where=gm)

    # -- sprites ----------------------------------------------------------------------------
    sx, sy, sk, sv, sw, sh = city.sx, city.sy, city.skind, city.svar, city.sw, city.sh
    if look.cars or look.people:
        n = look.cars + look.people
        dist = rng.uniform(5.0, 28.0, n)
        lat = rng.uniform(-5.0, 5.0, n)
        ox = (x + fx * dist + rx * lat).astype(np.float32)
        oy = (y + fy * dist + ry * lat).astype(np.float32)
        gn = city.gmap.shape[0]
        ci = np.clip((ox / GMAP_RES).astype(np.int64), 0, gn - 1)
        cj = np.clip((oy / GMAP_RES).astype(np.int64), 0, gn - 1)
        gc_ = city.gmap[cj, ci]
        kind = np.array([K_CAR] * look.cars + [K_PERSON] * look.people, np.int32)
        ok = np.where(kind == K_CAR, np.isin(gc_, [G_ROAD, G_MARK, G_CROSS]),
                      np.isin(gc_, [G_ROAD, G_MARK, G_CROSS, G_SIDEWALK]))
        var = np.where(kind == K_CAR, rng.integers(0, 6, n), rng.integers(0, 4, n))
        wid = np.where(kind == K_CAR, rng.uniform(3.8, 4.6, n), 0.55).astype(np.float32)
        hei = np.where(kind == K_CAR, 1.5, rng.uniform(1.6, 1.9, n)).astype(np.float32)
        sx = np.concatenate([sx, ox[ok]]); sy = np.concatenate([sy, oy[ok]])
        sk = np.concatenate([sk, kind[ok]]); sv = np.concatenate([sv, var[ok].astype(np.int32)])
        sw = np.concatenate([sw, wid[ok]]); sh = np.concatenate([sh, hei[ok]])
    relx = sx - np.float32(x)
    rely = sy - np.float32(y)
    sd = relx * fx + rely * fy
    sl = relx * rx + rely * ry
    vis = np.flatnonzero((sd > 0.7) & (sd < 110.0) & (np.abs(sl) < sd * tanh + sw) & (f * sh > 3.0 * sd))
    if vis.size:
        # cull sprites hidden behind the front wall at their left, centre and right columns
        dv = sd[vis]
        xcv = W / 2 + f * sl[vis] / dv
        hw_ = 0.5 * f * sw[vis] / dv
        topv = hor + f * (ch - sh[vis]) / dv
        hidden = np.ones(vis.size, bool)
        for off in (-0.9, 0.0, 0.9):
            c_ = np.clip((xcv + off * hw_).astype(np.int64), 0, W - 1)
            hidden &= (front_t[c_] < dv) & (front_top[c_] <= topv)
        vis = vis[~hidden]
    order = vis[np.argsort(-sd[vis], kind="stable")]
    for s in order:
        d = float(sd[s])
        trgb, tmask, temis = _TEX[(int(sk[s]), int(sv[s]))]
        th, tw = tmask.shape
        wpx = f * float(sw[s]) / d
        hpx = f * float(sh[s]) / d
        xc = W / 2 + f * float(sl[s]) / d
        ybot = hor + f * ch / d
        ytop = ybot - hpx
        x0 = xc - wpx / 2
        xa, xb = max(0, int(math.floor(x0))), min(W, int(math.ceil(x0 + wpx)))
        ya, yb = max(0, int(math.floor(ytop))), min(H, int(math.ceil(ybot)))
        if xa >= xb or ya >= yb:
            continue
        tu = np.minimum(np.maximum(((np.arange(xa, xb) + 0.5 - x0) * (tw / wpx)).astype(np.int64), 0), tw - 1)
        tv = np.minimum(np.maximum(((np.arange(ya, yb) + 0.5 - ytop) * (th / hpx)).astype(np.int64), 0), th - 1)
        dreg = depth[ya:yb, xa:xb]
        m = tmask[tv][:, tu] & (dreg > d)
        if not m.any():
            continue
        np.copyto(img[:, ya:yb, xa:xb], trgb[:, tv][:, :, tu], where=m)
        dreg[m] = d
        if tod.night:
            emis[ya:yb, xa:xb][m] = temis[tv][:, tu][m]

    # -- light, sky, fog ----------------------------------------------------------------------
    if tod.night:
        for c in range(3):
            img[c][emis] = img[c][emis] / tint[c] * np.float32(0.95)
    for c in range(3):
        img[c] *= tint[c]
    if look.fog > 0:
        sky = ~np.isfinite(depth)
        d2 = np.where(sky, np.float32(1e12), depth * depth)
        a = look.fog * d2 / (d2 + np.float32(look.fog_dist * look.fog_dist))
        fog_rgb = np.array(tod.fog_rgb, np.float32)
        for c in range(3):
            img[c] = img[c] * (1 - a) + fog_rgb[c] * a
    img *= np.float32(255.0)
    img += np.float32(0.5)
    np.minimum(img, np.float32(255.0), out=img)
    np.maximum(img, np.float32(0.0), out=img)
    planes = img.astype(np.uint8)
    out = np.empty((H, W, 3), np.uint8)
    for c in range(3):
        out[:, :, c] = planes[c]
    if look.blur > 0:
        out = np.asarray(Image.fromarray(out).filter(ImageFilter.GaussianBlur(look.blur)))
    if look.noise > 0:
        nz = (rng.random((H, W, 1), dtype=np.float32) + rng.random((H, W, 1), dtype=np.float32) - 1.0) * look.noise
        out = np.clip(out.astype(np.float32) + nz + 0.5, 0, 255).astype(np.uint8)
    return out
