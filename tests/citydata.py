"""A small generated VPR-named dataset whose images depend on their position.

Each image is a smooth colour field whose hue and pattern are functions of (east, north), plus
per-image noise, so nearby images look alike and a random backbone can still tell places
apart. Small (64 px) and quick to write: for end-to-end tests of the engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from geoloc.config import PRESET_DIR
from geoloc.geo import latlon_to_utm

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = PRESET_DIR / "tiny.yaml"


def place_image(east: float, north: float, rng: np.random.Generator, size: int = 64) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size] / size
    fx, fy = 1 + (east % 97) / 20, 1 + (north % 89) / 20
    base = np.stack([np.sin(2 * np.pi * (fx * xx + east / 37.0)), np.cos(2 * np.pi * (fy * yy + north / 41.0)),
                     np.sin(2 * np.pi * (fx * yy + fy * xx + (east + north) / 53.0))], -1)
    img = 127.5 * (1 + base) + rng.normal(0, 12, base.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_dataset(root: Path, *, n_db: int = 160, n_q: int = 24, seed: int = 0,
                  lat0: float = 55.7, lon0: float = 13.19, span_deg: float = 0.0012) -> Path:
    """Write ``root/database`` and ``root/queries`` (VPR names); returns ``root``."""
    rng = np.random.default_rng(seed)
    for split, n in (("database", n_db), ("queries", n_q)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        lat = lat0 + rng.random(n) * span_deg
        lon = lon0 + rng.random(n) * span_deg * 1.7
        east, north, zone, south = latlon_to_utm(lat, lon)
        for i in range(n):
            letter = "M" if south[i] else "U"
            name = f"@{east[i]:.2f}@{north[i]:.2f}@{zone[i]}@{letter}@{lat[i]:.7f}@{lon[i]:.7f}@@@@@@@@@.jpg"
            place_image(east[i], north[i], rng).save(folder / name, quality=95)
    return root
