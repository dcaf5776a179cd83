"""Shared fixtures: the real photos in ../shared/data, and generated VPR-named datasets."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from PIL import Image

# CI runs the property tests on a fixed example sequence (reproducible verdicts); local runs
# keep exploring new examples.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
"""Real geotagged photos (see its README.md); outside the repository, may be absent."""


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path to ``../shared/data`` next to the repository; skips the test when it is absent."""
    if not (SHARED_DATA / "lund" / "images").is_dir() or not (SHARED_DATA / "berlin" / "images").is_dir():
        pytest.skip(f"real test photos not found at {SHARED_DATA} (expected lund/images and berlin/images "
                    "from the project's shared data folder)")
    return SHARED_DATA


def vpr_name(
    east: float,
    north: float,
    zone: int,
    letter: str,
    lat: float | None = None,
    lon: float | None = None,
    *,
    pano_id: str = "",
    heading: float | None = None,
    timestamp: str = "",
    note: str = "",
    ext: str = ".jpg",
) -> str:
    """A file name in the VPR convention (SF-XL / Pitts30k / gmberton downloaders):
    ``@east@north@zone@letter@lat@lon@pano_id@tile_num@heading@pitch@roll@height@timestamp@note@.jpg``.
    Fields left None / empty are written empty."""
    def f(v, fmt):
        return "" if v is None else format(v, fmt)

    fields = [f(east, ".2f"), f(north, ".2f"), str(zone), letter, f(lat, ".6f"), f(lon, ".6f"), pano_id, "",
              f(heading, ".2f"), "", "", "", timestamp, note]
    return "@" + "@".join(fields) + "@" + ext


def write_image(path: Path, size: tuple[int, int] = (32, 24), *, seed: int = 0) -> Path:
    """Write a small random RGB image at ``path`` (format from the suffix); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def write_vpr_images(folder: Path, rows: list[dict], *, real: bool = False) -> list[Path]:
    """Create one file per ``rows`` entry (kwargs of :func:`vpr_name`) in ``folder``.

    With ``real=False`` the files are empty placeholders (the data layer only reads names);
    with ``real=True`` they are small valid JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, row in enumerate(rows):
        p = folder / vpr_name(**row)
        if real:
            write_image(p, seed=i)
        else:
            p.touch()
        out.append(p)
    return out


@pytest.fixture
def make_vpr_images():
    """The :func:`write_vpr_images` helper as a fixture."""
    return write_vpr_images
