"""The ``geoloc`` command: a thin shell over the library (geoloc.build, geoloc.engine, ...).

Every command runs inside :func:`_user_errors`, the one boundary where a
:class:`~geoloc.errors.GeolocError` becomes a single ``error: ...`` line on stderr and an
exit code; nothing reaches the user as a traceback.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from geoloc.config import Config, load_config
from geoloc.errors import GeolocError, ImageError

app = typer.Typer(
    name="geoloc",
    help="Where was this street photo taken? Classify the map cell, then retrieve inside it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
out = Console()
err = Console(stderr=True, highlight=False, soft_wrap=True)


@contextmanager
def _user_errors() -> Iterator[None]:
    try:
        yield
    except GeolocError as e:
        err.print(f"error: {e}", markup=False)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        err.print("interrupted", markup=False)
        raise typer.Exit(130) from None


def _config(config: Optional[Path], sets: Optional[List[str]], **flags) -> Config:
    cfg = load_config(config, sets or ())
    pairs = [f"{k}={v}" for k, v in flags.items() if v is not None]
    return cfg.override(pairs)


ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (presets in configs/).")
SetOpt = typer.Option(None, "--set", help="Override any config key: section.key=value (repeatable).")


@app.command("build-index")
def build_index_cmd(
    database: str = typer.Option(..., "--database", "-d", help="Image folder (VPR names or EXIF GPS) or CSV."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write, e.g. indexes/city."),
    config: Optional[Path] = ConfigOpt,
    backbone: Optional[str] = typer.Option(None, help="Backbone name (efficientnet_lite0, dinov2_vits14, ...)."),
    cell_size: Optional[float] = typer.Option(None, "--cell-size", help="Cell side M in metres."),
    groups: Optional[int] = typer.Option(None, "--groups", help="N: cells split into N x N groups."),
    min_images: Optional[int] = typer.Option(None, "--min-images-per-cell", help="Drop cells with fewer images."),
    sets: Optional[List[str]] = SetOpt,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or training log."),
) -> None:
    """Extract descriptors, train the cell heads, build the cell-partitioned index, write the bundle."""
    from geoloc.build import build_index

    with _user_errors():
        cfg = _config(config, sets, **{"backbone.name": backbone, "cells.size_m": cell_size, "cells.groups": groups,
                                      "cells.min_images_per_cell": min_images})
        rep = build_index(database=database, out=out_dir, config=cfg, progress=not quiet,
                          log=(lambda m: None) if quiet else (lambda m: err.print(m, markup=False)))
        t = Table(title=f"bundle written: {rep.out}", show_header=False)
        for k, v in [("images used", rep.images_used), ("images skipped", rep.images_skipped),
                     ("cells", rep.cells), ("groups", rep.groups),
                     ("images in dropped cells (filed in nearest cell)", rep.images_in_dropped_cells),
                     ("descriptor dim", rep.descriptor_dim), ("feature chunks reused", rep.reused_feature_chunks)]:
            t.add_row(k, str(v))
        for stage, s in rep.timings_s.items():
            t.add_row(f"time: {stage}", f"{s:.2f} s")
        if rep.train and rep.train.history:
            last = rep.train.history[-1]
            t.add_row("train: final loss / held-out LR@1", f"{last['loss']:.4f} / {last['val_lr@1']:.3f}")
        out.print(t)
        if rep.images_skipped:
            err.print(f"skipped {rep.images_skipped} unreadable images; reasons in {rep.out / 'skipped.json'}",
                      markup=False)


@app.command("query")
def query_cmd(
    images: List[Path] = typer.Argument(..., help="Image files to localise."),
    index: Path = typer.Option(..., "--index", "-i", help="Bundle folder."),
    mode: Optional[str] = typer.Option(None, "--mode", "-m", help="classify | retrieve | hybrid"),
    top_cells: Optional[int] = typer.Option(None, "--top-cells", "-k", help="Hybrid: cells to search."),
    neighbours: Optional[bool] = typer.Option(None, "--neighbours/--no-neighbours",
                                              help="Hybrid: also search each top cell's 8 neighbours."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list instead of a table."),
    sets: Optional[List[str]] = SetOpt,
) -> None:
    """Localise images against a bundle. Bad images get one error line each; the rest are answered."""
    from geoloc.engine import Localizer

    with _user_errors():
        loc = Localizer.load(index)
        loc.config.override(sets or ())
        results = loc.localize([str(p) for p in images], mode=mode, top_cells=top_cells, neighbours=neighbours)
        good = [r for r in results if not isinstance(r, ImageError)]
        for r in results:
            if isinstance(r, ImageError):
                err.print(f"error: {r}", markup=False)
        if as_json:
            typer.echo(json.dumps([p.to_json() for p in good], indent=2))
        else:
            for p in good:
                stages = "  ".join(f"{k} {v:.1f}" for k, v in p.timings_ms.items())
                out.print(f"[bold]{p.image}[/bold]  ({p.mode})\n"
                          f"  lat/lon  {p.lat:.6f}, {p.lon:.6f}   UTM {p.zone}{p.hemisphere} {p.east:.1f} E {p.north:.1f} N\n"
                          f"  cell     {p.cell} (p={p.cell_pq[0]}, q={p.cell_pq[1]})   score {p.score:.3f}\n"
                          f"  match    {p.match or '-'}\n  ms       {stages}", highlight=False)
        if len(good) < len(results):
            raise typer.Exit(2)


@app.command("eval")
def eval_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="Bundle folder."),
    queries: str = typer.Option(..., "--queries", "-q", help="Query folder or CSV with true positions."),
    mode: str = typer.Option("all", "--mode", "-m", help="classify | retrieve | hybrid | all"),
    top_cells: Optional[int] = typer.Option(None, "--top-cells", "-k"),
    neighbours: Optional[bool] = typer.Option(None, "--neighbours/--no-neighbours"),
    threshold_m: float = typer.Option(25.0, "--threshold-m", help="Distance under which an answer is correct."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="Write one JSON line per query and mode."),
) -> None:
    """LR@1/5/10, median error and ms per query per stage, for each mode."""
    from geoloc.data import load_records
    from geoloc.engine import MODES, Localizer
    from geoloc.evaluate import evaluate

    with _user_errors():
        if mode != "all" and mode not in MODES:
            raise GeolocError(f"unknown --mode {mode!r}; choose classify, retrieve, hybrid or all")
        loc = Localizer.load(index)
        q = load_records(queries, split="queries")
        rep = evaluate(loc, q, modes=MODES if mode == "all" else (mode,), top_cells=top_cells, neighbours=neighbours,
                       threshold_m=threshold_m, predictions=predictions)
        out.print(f"{rep.queries} queries, threshold {threshold_m:g} m, top cells {rep.top_cells}")
        typer.echo(rep.table())
        if rep.skipped:
            err.print(f"skipped {len(rep.skipped)} unreadable queries (first: {rep.skipped[0][0]}: {rep.skipped[0][1]})",
                      markup=False)
        if json_out:
            json_out.parent.mkdir(parents=True, exist_ok=True)
            json_out.write_text(json.dumps(rep.to_json(), indent=2), encoding="utf-8")
            out.print(f"results written to {json_out}")


@app.command("info")
def info_cmd(index: Path = typer.Argument(..., help="Bundle folder.")) -> None:
    """Verify a bundle and print its manifest summary."""
    from geoloc.bundle import read_manifest, verify_files

    with _user_errors():
        m = read_manifest(index)
        verify_files(index, m)
        summary = {k: m[k] for k in ("format_version", "created", "versions", "backbone", "descriptor_dim", "cells",
                                     "database")}
        typer.echo(json.dumps(summary, indent=2))
        out.print(f"all {len(m['files'])} files match their checksums")


@app.command("synth-city")
def synth_city_cmd(
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write database/, queries/, aerial/ and CSVs."),
    seed: int = typer.Option(0, "--seed"),
    extent_m: float = typer.Option(1000.0, "--extent-m", help="Side of the square city, metres."),
    spacing_m: float = typer.Option(5.0, "--spacing-m", help="Distance between database viewpoints."),
    shift: str = typer.Option("mild", "--shift", help="Query domain shift: none | mild | strong."),
    n_queries: int = typer.Option(500, "--queries"),
    headings: int = typer.Option(4, "--headings", help="Database headings per viewpoint."),
    workers: int = typer.Option(1, "--workers", help="Processes (output is identical for any count)."),
) -> None:
    """Generate a geotagged synthetic city (the embedded default dataset)."""
    from geoloc.synth import generate_city

    with _user_errors():
        info = generate_city(out=out_dir, seed=seed, extent_m=extent_m, spacing_m=spacing_m, shift=shift,
                             n_queries=n_queries, headings=headings, workers=workers)
        out.print(f"{info.n_database} database images, {info.n_queries} queries, {info.n_aerial} aerial tiles "
                  f"in {out_dir} ({info.seconds:.1f} s, {info.images_per_second:.0f} images/s)")


def main() -> None:
    """Console entry point."""
    try:
        app()
    except GeolocError as e:  # raised outside a command's boundary (should not happen)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
