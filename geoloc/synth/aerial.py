"""Top-down (aerial) tiles of a synthetic city: roofs coloured per building, streets, trees."""

from __future__ import annotations

import numpy as np
from PIL import Image

from geoloc.synth.city import BMAP_RES, G_GRASS, GMAP_RES, GROUND_RGB, K_TREE, City

_NOISE = (0.9 + 0.2 * np.random.default_rng(4242).random((64, 64))).astype(np.float32)
_TREE_RGB = np.array([[0.20, 0.40, 0.15], [0.13, 0.30, 0.13], [0.40, 0.46, 0.15]], np.float32)


def render_aerial_tile(city: City, *, east: float, north: float, size_m: float, pixels: int) -> Image.Image:
    """Nadir view of the square of side ``size_m`` metres centred on UTM (``east``, ``north``).

    The UTM frame is the city's (``city.sw_east``, ``city.sw_north`` is its south-west corner);
    north is up. Returns an RGB PIL image of ``pixels x pixels``.
    """
    P = int(pixels)
    if P < 8 or size_m <= 0:
        raise ValueError(f"aerial tile needs pixels >= 8 and size_m > 0 (got {pixels}, {size_m})")
    res = float(size_m) / P
    cx, cy = float(east) - city.sw_east, float(north) - city.sw_north
    xs = (cx + (np.arange(P, dtype=np.float64) + 0.5 - P / 2) * res).astype(np.float32)
    ys = (cy + (P / 2 - np.arange(P, dtype=np.float64) - 0.5) * res).astype(np.float32)
    X = np.broadcast_to(xs[None, :], (P, P))
    Y = np.broadcast_to(ys[:, None], (P, P))
    gn = city.gmap.shape[0]
    gi = np.floor(X / GMAP_RES).astype(np.int64)
    gj = np.floor(Y / GMAP_RES).astype(np.int64)
    ins = (gi >= 0) & (gi < gn) & (gj >= 0) & (gj < gn)
    cls = np.where(ins, city.gmap.ravel()[np.where(ins, gj * gn + gi, 0)], G_GRASS)
    img = GROUND_RGB[cls] * _NOISE[gj & 63, gi & 63][..., None]
    bn = city.bmap.shape[0]
    bi = np.floor(X / BMAP_RES).astype(np.int64)
    bj = np.floor(Y / BMAP_RES).astype(np.int64)
    binside = (bi >= 0) & (bi < bn) & (bj >= 0) & (bj < bn)
    bid = np.where(binside, city.bmap.ravel()[np.where(binside, bj * bn + bi, 0)], 0)
    m = bid > 0
    if m.any():
        b = bid[m] - 1
        xm, ym = X[m], Y[m]
        edge = np.minimum(np.minimum(xm - city.bx0[b], city.bx1[b] - xm), np.minimum(ym - city.by0[b], city.by1[b] - ym))
        wide = (city.bx1[b] - city.bx0[b]) >= (city.by1[b] - city.by0[b])
        ridge_half = np.where(wide, ym > (city.by0[b] + city.by1[b]) / 2, xm > (city.bx0[b] + city.bx1[b]) / 2)
        k = np.where(edge < 0.7, 0.72, np.where(ridge_half, 0.88, 1.0)).astype(np.float32)
        img[m] = city.broof[b] * k[:, None]
    # trees as round canopies
    t = np.flatnonzero((city.skind == K_TREE) & (np.abs(city.sx - cx) < size_m / 2 + 6) & (np.abs(city.sy - cy) < size_m / 2 + 6))
    for s in t:
        r = float(city.sw[s]) / 2
        j0 = int(np.floor((city.sx[s] - r - xs[0]) / res)); j1 = int(np.ceil((city.sx[s] + r - xs[0]) / res)) + 1
        i0 = int(np.floor((ys[0] - city.sy[s] - r) / res)); i1 = int(np.ceil((ys[0] - city.sy[s] + r) / res)) + 1
        j0, j1, i0, i1 = max(j0, 0), min(j1, P), max(i0, 0), min(i1, P)
        if j0 >= j1 or i0 >= i1:
            continue
        ddx = xs[j0:j1][None, :] - city.sx[s]
        ddy = ys[i0:i1][:, None] - city.sy[s]
        d2 = (ddx * ddx + ddy * ddy) / (r * r)
        disk = d2 < 1.0
        shade = (1.05 - 0.35 * d2 + 0.25 * (ddx - ddy) / max(r, 1e-3) * 0.3)[..., None]
        reg = img[i0:i1, j0:j1]
        reg[disk] = (_TREE_RGB[int(city.svar[s]) % 3] * shade)[disk]
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(out, "RGB")
