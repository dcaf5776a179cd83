"""Pictures of a result, from a predictions file (JSON lines written by :func:`geoloc.evaluate.evaluate`).

* :func:`prediction_strips` -- one PNG per query as VPR-methods-evaluation saves them: the query,
  then its top-N database matches, each framed green (within the threshold) or red.
* :func:`answer_sheet` -- a contact sheet of query / best-answer pairs, framed right or wrong.
* :func:`error_map` -- the cells, every query's true position, and an error line for the wrong
  answers only (the right ones are dots: a map of what went wrong, not a hairball).
* :func:`error_histogram` -- the distribution of errors (log metres) per mode, threshold marked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from geoloc.errors import ImageError
from geoloc.images import load_image

GREEN = (42, 157, 143)
RED = (231, 111, 81)
GREY = (60, 60, 60)

__all__ = ["read_predictions", "prediction_strips", "answer_sheet", "error_map", "error_histogram"]


def read_predictions(path: str | Path) -> list[dict]:
    """The rows of a predictions file (one JSON object per line)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _thumb(path: str | None, side: int, frame: tuple[int, int, int] | None, border: int = 6) -> Image.Image:
    """``path`` as a ``side`` x ``side`` tile with a coloured frame; a grey tile when unreadable."""
    tile = Image.new("RGB", (side, side), GREY)
    if path:
        try:
            im = load_image(path, max_side=2 * side)
            im.thumbnail((side - 2 * border, side - 2 * border))
            tile.paste(im, ((side - im.width) // 2, (side - im.height) // 2))
        except ImageError:
            pass
    if frame is not None:
        ImageDraw.Draw(tile).rectangle([0, 0, side - 1, side - 1], outline=frame, width=border)
    return tile


def _safe_name(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(text).stem)
    return keep[-80:] or "query"


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out_png: str | Path) -> Path:
    """Write ``fig`` to ``out_png`` (its folder created) and free it."""
    fig.tight_layout()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    _pyplot().close(fig)
    return out_png


def prediction_strips(rows: Iterable[dict], out_dir: str | Path, *, n: int = 5, only_wrong: bool = False,
                      limit: int | None = None, side: int = 192) -> list[Path]:
    """Write one strip per query (query, then its top-``n`` matches framed green/red).

    Args:
        rows: predictions-file rows of a retrieval mode (rows without match paths are skipped).
        only_wrong: keep the queries whose best answer is wrong.
        limit: at most this many strips.
    Returns:
        The PNG paths written, ``<out_dir>/<index>_<mode>_<query>.png``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for k, row in enumerate(rows):
        top = [c for c in row.get("top", []) if c.get("path")][:n]
        if not top or (only_wrong and row.get("correct")):
            continue
        tiles = [_thumb(row.get("query_path") or row["query"], side, None)]
        tiles += [_thumb(c["path"], side, GREEN if c["correct"] else RED) for c in top]
        strip = Image.new("RGB", (side * len(tiles) + 8 * (len(tiles) - 1), side), (255, 255, 255))
        for j, t in enumerate(tiles):
            strip.paste(t, (j * (side + 8), 0))
        path = out / f"{k:05d}_{row['mode']}_{_safe_name(row['query'])}.png"
        strip.save(path)
        written.append(path)
        if limit is not None and len(written) >= limit:
            break
    return written


def answer_sheet(rows: Sequence[dict], out_png: str | Path, *, pairs: int = 24, cols: int = 6, side: int = 160) -> Path:
    """A contact sheet of ``pairs`` query / best-answer pairs (evenly picked), framed right or wrong."""
    rows = [r for r in rows if r.get("match")]
    picks = [rows[i] for i in np.linspace(0, len(rows) - 1, min(pairs, len(rows))).astype(int)] if rows else []
    cols = max(1, min(cols, len(picks) or 1))
    n_rows = max(1, math.ceil(len(picks) / cols))
    cell_w, gap = 2 * side + 4, 12
    sheet = Image.new("RGB", (cols * cell_w + (cols - 1) * gap, n_rows * (side + gap)), (255, 255, 255))
    for k, r in enumerate(picks):
        x, y = (k % cols) * (cell_w + gap), (k // cols) * (side + gap)
        colour = GREEN if r.get("correct") else RED
        sheet.paste(_thumb(r.get("query_path") or r["query"], side, colour), (x, y))
        sheet.paste(_thumb(r["match"], side, colour), (x + side + 4, y))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out_png)
    return out_png


def error_map(rows: Sequence[dict], out_png: str | Path, *, cells_latlon: np.ndarray | None = None,
              threshold_m: float = 25.0, title: str = "") -> Path:
    """Truth of every query; for wrong answers a red line to the answer, right answers as green dots.

    Args:
        rows: predictions-file rows of one mode.
        cells_latlon: ``[C, 2]`` cell centres (lat, lon) drawn in grey, or None.
    """
    plt = _pyplot()
    truth = np.array([[r["truth"]["lat"], r["truth"]["lon"]] for r in rows], dtype=np.float64).reshape(-1, 2)
    guess = np.array([[r["lat"], r["lon"]] for r in rows], dtype=np.float64).reshape(-1, 2)
    ok = np.array([bool(r.get("correct")) for r in rows], dtype=bool)
    lat0 = float(truth[:, 0].mean()) if len(truth) else 0.0
    k = math.cos(math.radians(lat0))  # equirectangular: x = lon * cos(lat0)
    fig, ax = plt.subplots(figsize=(8, 8), dpi=110)
    if cells_latlon is not None and len(cells_latlon):
        ax.scatter(cells_latlon[:, 1] * k, cells_latlon[:, 0], s=4, c="#d0d0d0", marker="s", label="cells")
    for (a, b) in zip(truth[~ok], guess[~ok]):
        ax.plot([a[1] * k, b[1] * k], [a[0], b[0]], lw=0.6, c="#e76f51", alpha=0.7)
    ax.scatter(truth[:, 1] * k, truth[:, 0], s=7, c="#264653", label="query: true position")
    ax.scatter(guess[ok][:, 1] * k, guess[ok][:, 0], s=10, c="#2a9d8f", label=f"right (within {threshold_m:g} m)")
    ax.scatter(guess[~ok][:, 1] * k, guess[~ok][:, 0], s=10, c="#e76f51", marker="x",
               label="wrong answer (line from the truth)")
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"{len(rows)} queries, {ok.mean() if len(ok) else 0:.2f} right")
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, out_png)


def error_histogram(rows: Sequence[dict], out_png: str | Path, *, threshold_m: float = 25.0) -> Path:
    """Histogram of the best answer's error (log scale, metres), one panel row per mode."""
    plt = _pyplot()
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = plt.subplots(len(modes) or 1, 1, figsize=(7, 2.2 * max(len(modes), 1)), dpi=110, sharex=True,
                             squeeze=False)
    bins = np.logspace(-1, 4, 51)
    for ax, mode in zip(axes[:, 0], modes):
        err = np.array([r["error_m"] for r in rows if r["mode"] == mode and r.get("error_m") is not None], float)
        err = np.clip(err, bins[0], bins[-1])
        ax.hist(err, bins=bins, color="#457b9d")
        ax.axvline(threshold_m, c="#e76f51", lw=1.2)
        ax.set_xscale("log")
        ax.set_ylabel(mode)
        ax.set_title(f"{mode}: {np.mean(err <= threshold_m) if len(err) else 0:.2f} within {threshold_m:g} m, "
                     f"median {np.median(err) if len(err) else float('nan'):.1f} m", fontsize=9)
    axes[-1, 0].set_xlabel("error of the best answer (m, log scale)")
    return _save(fig, out_png)
