"""The ``geoloc`` command: a thin shell over the library (geoloc.build, geoloc.engine, ...).

One boundary, :class:`_Group`, turns every expected failure into one ``error: ...`` line on
stderr and the exit code of :mod:`geoloc.errors` (usage/config 2, bad input 3, partial
success 4, output not writable 5, interrupted 130): a :class:`~geoloc.errors.GeolocError`, a
click usage error (unknown flag, ``--mode foo``), an ``OSError`` on a file.

Each command checks everything it can before the expensive work: the whole config
(defaults < ``--config`` < flags < ``--set``), the choices, the output paths, and that faiss
imports. ``query`` and ``eval`` start from the bundle's own build config and accept only the
keys that can change after a build (``runtime=True`` in :mod:`geoloc.config`: ``query.*``,
``index.*``, ``backbone.device/batch_size/num_workers``, ``data.utm_zone``); a ``--set`` of
any other key is refused, and a ``--config`` file may hold build keys only where they agree
with the bundle.

Short flags mean the same in every command: ``-c --config``, ``-d --database``,
``-i --index``, ``-o --out``, ``-m --mode``, ``-k --top-cells``, ``-q --quiet``; ``--json``
always prints JSON (only JSON) to stdout.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from pathlib import Path
from typing import Any, List, Literal, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

try:  # typer >= 0.20 carries its own copy of click; its exceptions are the ones raised
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - older typer on the real click
    from click import exceptions as _cx

from geoloc import __version__
from geoloc.config import MODES, Config, Override, build_time_keys, collect_overrides, list_presets
from geoloc.errors import (EXIT_INPUT, EXIT_INTERRUPTED, EXIT_OUTPUT, EXIT_PARTIAL, EXIT_USAGE, BundleError,
                           ConfigError, DatasetError, GeolocError, ImageError, OutputError, one_line,
                           require_faiss)

out = Console()
err = Console(stderr=True, highlight=False, soft_wrap=True)

_NO_SPACE = {errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG}


def _fail(message: str, code: int) -> None:
    message = message.replace("Value error, ", "")  # typer's pydantic-style wording of a bad choice
    sys.stdout.flush()
    typer.echo(f"error: {one_line(message)}", err=True)
    sys.exit(code)


class _Group(TyperGroup):
    """The one exception boundary (see the module docstring)."""

    def main(self, args: Any = None, prog_name: Any = None, complete_var: Any = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _cx.NoArgsIsHelpError as e:
            e.show()
            sys.exit(EXIT_USAGE)
        except _cx.UsageError as e:
            where = f" (see {e.ctx.command_path} --help)" if e.ctx is not None else ""
            argv = list(sys.argv[1:] if args is None else args)
            if e.ctx is not None and e.ctx.info_name == "eval" and "--json" in argv and "extra argument" in str(e):
                where = "; eval --json now prints the results to stdout: write them to a file with --out FILE"
            _fail(f"{e.format_message()}{where}", EXIT_USAGE)
        except _cx.ClickException as e:
            _fail(e.format_message(), e.exit_code)
        except typer.Abort:
            _fail("interrupted", EXIT_INTERRUPTED)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except GeolocError as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED)
        except OSError as e:
            if e.errno in (errno.EPIPE,) or (e.filename is None and e.errno not in _NO_SPACE):
                raise
            what = f"{e.filename}: " if e.filename else ""
            code = EXIT_OUTPUT if e.errno in _NO_SPACE else EXIT_INPUT
            _fail(f"{what}{e.strerror or e}; free space or check the path and its permissions", code)


app = typer.Typer(
    name="geoloc",
    cls=_Group,
    help="Where was this street photo taken? Classify the map cell, then retrieve inside it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"geoloc {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Where was this street photo taken? Classify the map cell, then retrieve inside it.

    Exit codes: 0 ok, 2 usage or config, 3 bad or damaged input, 4 partial success
    (some inputs skipped), 5 output not writable or no space, 130 interrupted.
    """


# -- options shared by the commands ---------------------------------------------------------------
_DEFAULTS = Config()
ModeName = Literal[MODES]  # type: ignore[valid-type]
EvalMode = Literal[(*MODES, "all")]  # type: ignore[valid-type]


def _cfg_opt(key: str, *decls: str, help: str, of: str = "the config's", **kw: Any) -> Any:
    """An option that sets config ``key``; --help shows the default as ``key = value``."""
    value = _DEFAULTS.get(key)
    shown = str(value).lower() if isinstance(value, bool) else (f"{value:g}" if isinstance(value, float) else value)
    return typer.Option(None, *decls, help=f"{help} Config key {key}.", show_default=f"{shown!s} or {of}"
                        if shown != "" else "from the data", **kw)


def ConfigOpt() -> Any:  # noqa: N802 - a factory of typer options
    return typer.Option(None, "--config", "-c", show_default=False,
                        help=f"YAML config file, or a preset name: {', '.join(list_presets())}.")


def SetOpt() -> Any:  # noqa: N802
    return typer.Option(None, "--set", show_default=False, metavar="SECTION.KEY=VALUE",
                        help="Override any config key (repeatable); see geoloc/configs/default.yaml.")


def QuietOpt() -> Any:  # noqa: N802
    return typer.Option(False, "--quiet", "-q", help="No progress bars or log lines.")


def _mode_opt(*, with_all: bool, default: Any) -> Any:
    return typer.Option(default, "--mode", "-m",
                        help="Query mode" + (" (all: each mode in turn)." if with_all else ". Config key query.mode."),
                        show_default=default if default else f"{_DEFAULTS.query.mode} or the bundle's")


def _build_config(config: Optional[str], sets: Optional[List[str]], flags: dict[str, tuple[str, Any]]) -> Config:
    """Defaults < --config < flags < --set, every value checked (ConfigError naming it)."""
    return Config().apply_overrides(collect_overrides(config, flags=flags, sets=sets or ()))


def _check_input(source: str, flag: str) -> None:
    """A dataset folder or CSV that does not exist is refused before anything loads."""
    if not os.path.exists(source):
        raise DatasetError(f"{flag} {source}: no such folder or CSV file; pass a dataset folder, an image folder "
                           "or a CSV of path,lat,lon")


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_out_dir(path: Path, flag: str) -> None:
    """``flag`` names a folder to write: refuse, before any work, a file in its place or a
    parent that cannot be written (read-only file system, permissions)."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path}: an existing file, not a folder; pass a folder path (e.g. indexes/city)")
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise OutputError(f"{flag} {path}: {base} is a file, not a folder; pass another path")
    for p in {base, path} if path.is_dir() else {base}:
        if not os.access(p, os.W_OK | os.X_OK):
            raise OutputError(f"{flag} {path}: {p} is not writable (read-only file system or permissions); "
                              "pass a writable path")


def _prepare_out_file(path: Optional[Path], flag: str) -> None:
    """``flag`` names a file to write: refuse, before any work, a place where it cannot be
    written (:func:`geoloc.fileio.check_output_file`), then create its parent folder."""
    if path is None:
        return
    from geoloc.fileio import check_output_file

    check_output_file(path, flag=flag)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot create its folder ({e.strerror}); pass a writable path") from None


# -- build-index ----------------------------------------------------------------------------------
@app.command("build-index")
def build_index_cmd(
    database: str = typer.Option(..., "--database", "-d", help="Dataset folder (VPR names or EXIF GPS) or CSV."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Bundle folder to write, e.g. indexes/city."),
    config: Optional[str] = ConfigOpt(),
    backbone: Optional[str] = _cfg_opt("backbone.name", "--backbone", help="Backbone name."),
    cell_size: Optional[float] = _cfg_opt("cells.size_m", "--cell-size", help="Cell side M in metres."),
    groups: Optional[int] = _cfg_opt("cells.groups", "--groups", help="N: cells split into N x N groups."),
    min_images: Optional[int] = _cfg_opt("cells.min_images_per_cell", "--min-images-per-cell",
                                         help="Cells with fewer images are not classes."),
    utm_zone: Optional[str] = _cfg_opt("data.utm_zone", "--utm-zone",
                                       help="UTM zone of images named only @east@north@, e.g. 10S."),
    device: Optional[str] = _cfg_opt("backbone.device", "--device", help="auto, cpu, cuda or cuda:N."),
    engine: Optional[str] = _cfg_opt("backbone.engine", "--engine", help="Extraction engine: local or ray."),
    ray_address: Optional[str] = _cfg_opt("backbone.ray_address", "--ray-address", help="Ray cluster: auto or HOST:PORT."),
    workers: Optional[int] = _cfg_opt("backbone.workers", "--workers", help="Ray workers (0 = one per CPU)."),
    shards: Optional[int] = _cfg_opt("index.shards", "--shards", help="Geographic shards of the index, one FAISS file each."),
    val_queries: Optional[str] = typer.Option(None, "--val-queries",
                                              help="Geotagged validation queries (folder or CSV) that select the "
                                                   "training epoch and the hybrid fusion weight stored in the bundle."),
    descriptors: Optional[Path] = typer.Option(None, "--descriptors",
                                               help="Use descriptors computed elsewhere (.npz with paths and "
                                                    "descriptors, keyed by database path) instead of a backbone."),
    sets: Optional[List[str]] = SetOpt(),
    quiet: bool = QuietOpt(),
) -> None:
    """Extract descriptors, train the cell heads, build the cell-partitioned index, write the bundle."""
    cfg = _build_config(config, sets, {"--backbone": ("backbone.name", backbone), "--cell-size": ("cells.size_m", cell_size),
                                       "--groups": ("cells.groups", groups),
                                       "--min-images-per-cell": ("cells.min_images_per_cell", min_images),
                                       "--utm-zone": ("data.utm_zone", utm_zone), "--device": ("backbone.device", device),
                                       "--engine": ("backbone.engine", engine), "--ray-address": ("backbone.ray_address", ray_address),
                                       "--workers": ("backbone.workers", workers), "--shards": ("index.shards", shards)})
    _check_input(database, "--database")
    _check_out_dir(out_dir, "--out")
    if descriptors is not None:
        _check_input(str(descriptors), "--descriptors")
    if val_queries is not None:
        _check_input(val_queries, "--val-queries")
    require_faiss()
    from geoloc.bundle import check_output

    check_output(out_dir)  # refuses a folder that is not a bundle, before any work
    from geoloc.build import build_index

    rep = build_index(database=database, out=out_dir, config=cfg, progress=not quiet, descriptors=descriptors,
                      val_queries=val_queries,
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
    if rep.train and rep.train.subcenter_val_lr1:
        by_k = ", ".join(f"{k}: {v:.3f}" for k, v in rep.train.subcenter_val_lr1.items())
        t.add_row("train: sub-centres K selected", f"{rep.train.subcenters} ({rep.train.validation} LR@1 by K: {by_k})")
    t.add_row("retrieval descriptor", rep.descriptor)
    out.print(t)
    if rep.images_skipped:
        err.print(f"skipped {rep.images_skipped} unreadable images; reasons in {rep.out / 'skipped.json'}",
                  markup=False)


# -- query and eval: a built bundle plus query-time overrides --------------------------------------
def _refuse_build_keys(overrides: list[Override]) -> None:
    """--set and flags may only name keys that apply to a built bundle."""
    for o in overrides:
        if o.source.startswith("-") and build_time_keys([o.key]):
            raise ConfigError(f"{o.source} {o.key}={one_line(str(o.value))}: cannot apply to a built bundle "
                              f"({o.key} is fixed when the bundle is built); rebuild with geoloc build-index, or "
                              f"set only query-time keys: query.*, index.*, backbone.device/batch_size/num_workers, "
                              "data.utm_zone")


def _bundle_config(index: Path, overrides: list[Override]) -> Config:
    """The bundle's own build config with the user's query-time ``overrides`` applied.

    A build-time key from a ``--config`` file is accepted only where it equals the bundle's."""
    from geoloc.bundle import MANIFEST, read_manifest

    manifest = read_manifest(index)
    try:
        cfg = Config.from_dict(manifest.get("config") or {}, source=one_line(str(index / MANIFEST)))
    except ConfigError as e:
        raise BundleError(f"{e}; the bundle was written by another geoloc version or edited, rebuild it") from None
    probe = Config()
    for o in overrides:
        probe.set(o.key, o.value, source=o.source)
        if build_time_keys([o.key]):
            mine, theirs = probe.get(o.key), cfg.get(o.key)
            if mine != theirs:
                raise ConfigError(f"{o.source}: {o.key} = {mine!r} differs from the bundle's {theirs!r} "
                                  f"({one_line(str(index))}); build settings cannot change after the build: drop "
                                  "the key from the config file or rebuild with geoloc build-index")
        else:
            cfg.set(o.key, o.value, source=o.source)
    return cfg


def _query_config(index: Path, config: Optional[str], sets: Optional[List[str]],
                  flags: dict[str, tuple[str, Any]]) -> Config:
    """Check the user's config layers (values, then build-time keys), then faiss, then read
    the bundle's manifest: all before any model or index is loaded."""
    overrides = collect_overrides(config, flags=flags, sets=sets or ())
    Config().apply_overrides(overrides)  # every value checked, whatever the bundle holds
    _refuse_build_keys(overrides)
    require_faiss()
    return _bundle_config(index, overrides)


def _query_inputs(items: List[Path]) -> list[str]:
    """Image files, folders (every image below, sorted) and list files (``.txt``/``.lst``: one
    image path per line, relative to the list's folder) -> image paths, in order."""
    from geoloc.data import list_images

    paths: list[str] = []
    for item in items:
        if item.is_dir():
            found = list_images(item)
            if not found:
                raise DatasetError(f"{one_line(str(item))}: no images in this folder")
            paths += [str(item / f) for f in found]
        elif item.suffix.lower() in (".txt", ".lst") and item.is_file():
            with open(item, encoding="utf-8") as fh:
                lines = [ln.strip() for ln in fh if ln.strip() and not ln.lstrip().startswith("#")]
            paths += [ln if os.path.isabs(ln) else str(item.parent / ln) for ln in lines]
        else:
            paths.append(str(item))
    return paths


@app.command("query")
def query_cmd(
    images: List[Path] = typer.Argument(..., help="Image files, folders of images, or list files (.txt, one path a line)."),
    index: Path = typer.Option(..., "--index", "-i", help="Bundle folder."),
    config: Optional[str] = ConfigOpt(),
    mode: Optional[ModeName] = _mode_opt(with_all=False, default=None),
    top_cells: Optional[int] = _cfg_opt("query.top_cells", "--top-cells", "-k", help="Hybrid: cells to search.", of="the bundle's"),
    neighbours: Optional[bool] = typer.Option(None, "--neighbours/--no-neighbours", show_default="the bundle's",
                                              help="Hybrid: also search each top cell's 8 neighbours. "
                                                   "Config key query.neighbours."),
    device: Optional[str] = _cfg_opt("backbone.device", "--device", help="auto, cpu, cuda or cuda:N.", of="the bundle's"),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list to stdout instead of the text."),
    jsonl: bool = typer.Option(False, "--jsonl", help="Stream one JSON line per image to stdout as it is answered."),
    sets: Optional[List[str]] = SetOpt(),
) -> None:
    """Localise images against a bundle. Bad images get one error line each (exit 4); the rest are answered.

    Images are read in batches of backbone.batch_size, so memory stays bounded whatever their number.
    """
    if as_json and jsonl:
        raise ConfigError("--json and --jsonl both print to stdout; pass one of them")
    cfg = _query_config(index, config, sets, {"--mode": ("query.mode", mode), "--top-cells": ("query.top_cells", top_cells),
                                              "--neighbours": ("query.neighbours", neighbours),
                                              "--device": ("backbone.device", device)})
    paths = _query_inputs(images)
    from geoloc.engine import Localizer

    loc = Localizer.load(index, config=cfg)
    q = cfg.query
    n_good = n_bad = 0
    collected = []
    for r in loc.iter_localize(paths, mode=q.mode, top_cells=q.top_cells, neighbours=q.neighbours):
        if isinstance(r, ImageError):
            n_bad += 1
            err.print(f"error: {one_line(str(r))}", markup=False)
            continue
        n_good += 1
        if jsonl:
            typer.echo(json.dumps(r.to_json()))
        elif as_json:
            collected.append(r.to_json())
        else:
            stages = "  ".join(f"{k} {v:.1f}" for k, v in r.timings_ms.items())
            out.print(f"[bold]{r.image}[/bold]  ({r.mode})\n"
                      f"  lat/lon  {r.lat:.6f}, {r.lon:.6f}   UTM {r.zone}{r.hemisphere} {r.east:.1f} E {r.north:.1f} N\n"
                      f"  cell     {r.cell} (p={r.cell_pq[0]}, q={r.cell_pq[1]})   score {r.score:.3f}\n"
                      f"  match    {r.match or '-'}\n  ms       {stages}", highlight=False)
    if as_json:
        typer.echo(json.dumps(collected, indent=2))
    if n_bad:
        raise typer.Exit(EXIT_PARTIAL if n_good else EXIT_INPUT)


def _load_queries(source: str, utm_zone: str) -> Any:
    from geoloc.data import load_records

    return load_records(source, split="queries", utm_zone=utm_zone or None)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected integers, e.g. {flag} 1,5,10,20") from None


def _float_list(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: expected distances in metres, e.g. {flag} 25,100") from None


@app.command("eval")
def eval_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="Bundle folder."),
    queries: str = typer.Option(..., "--queries", help="Query folder or CSV with true positions."),
    config: Optional[str] = ConfigOpt(),
    mode: EvalMode = _mode_opt(with_all=True, default="all"),
    top_cells: Optional[int] = _cfg_opt("query.top_cells", "--top-cells", "-k", help="Hybrid: cells to search.", of="the bundle's"),
    neighbours: Optional[bool] = typer.Option(None, "--neighbours/--no-neighbours", show_default="the bundle's",
                                              help="Hybrid: also search each top cell's 8 neighbours."),
    threshold_m: Optional[float] = _cfg_opt("query.threshold_m", "--threshold-m",
                                            help="Distance in metres under which an answer is correct.", of="the bundle's"),
    utm_zone: Optional[str] = _cfg_opt("data.utm_zone", "--utm-zone",
                                       help="UTM zone of queries named only @east@north@, e.g. 10S."),
    device: Optional[str] = _cfg_opt("backbone.device", "--device", help="auto, cpu, cuda or cuda:N.", of="the bundle's"),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON to stdout instead of the table."),
    results_out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the results JSON to this file."),
    predictions: Optional[Path] = typer.Option(None, "--predictions", help="Write one JSON line per query and mode "
                                               "(truth, top-N answers with path, lat/lon, score, error, correct)."),
    recall_values: str = typer.Option("1,5,10,20", "--recall-values", help="The N of LR@N, e.g. 1,5,10,20."),
    more_thresholds: Optional[str] = typer.Option(None, "--more-thresholds-m",
                                                  help="Further thresholds reported in the JSON, e.g. 10,50,100."),
    save_preds: int = typer.Option(0, "--save-preds", min=0, max=1000,
                                   help="Save image strips (query, then its top-N matches framed green/red) of this "
                                        "many queries per mode under <--out's folder or runs/eval>/preds/."),
    only_wrong: bool = typer.Option(False, "--only-wrong", help="With --save-preds: only queries answered wrongly."),
    query_descriptors: Optional[Path] = typer.Option(None, "--query-descriptors",
                                                     help="Queries as descriptors computed elsewhere (.npz with paths "
                                                          "and descriptors), for a bundle built with --descriptors."),
    sets: Optional[List[str]] = SetOpt(),
    quiet: bool = QuietOpt(),
) -> None:
    """LR@N (N = --recall-values), median error and ms per query per stage, for each mode."""
    cfg = _query_config(index, config, sets, {
        "--top-cells": ("query.top_cells", top_cells), "--neighbours": ("query.neighbours", neighbours),
        "--threshold-m": ("query.threshold_m", threshold_m), "--utm-zone": ("data.utm_zone", utm_zone),
        "--device": ("backbone.device", device)})
    _check_input(queries, "--queries")
    from geoloc.evaluate import check_eval_settings

    ns = _int_list(recall_values, "--recall-values")
    extra = _float_list(more_thresholds, "--more-thresholds-m") if more_thresholds else []
    check_eval_settings([cfg.query.threshold_m, *extra], ns)
    preds_dir = ((results_out.parent if results_out else Path("runs") / "eval") / "preds") if save_preds else None
    if preds_dir is not None:
        _check_out_dir(preds_dir, "--save-preds")
    if results_out is not None and predictions is not None and results_out.absolute() == predictions.absolute():
        raise OutputError(f"--out and --predictions both name {results_out}; pass two different files")
    _prepare_out_file(results_out, "--out")
    _prepare_out_file(predictions, "--predictions")
    from geoloc.engine import Localizer
    from geoloc.evaluate import evaluate, query_descriptors as read_query_descriptors

    loc = Localizer.load(index, config=cfg)
    q = _load_queries(queries, cfg.data.utm_zone)
    q_cfg = cfg.query
    if save_preds and predictions is None:
        predictions = preds_dir / "predictions.jsonl"
    with _progress(quiet, "embedding queries") as tick:
        src = read_query_descriptors(loc, q, query_descriptors) if query_descriptors is not None else q
        rep = evaluate(loc, src, modes=MODES if mode == "all" else (mode,), top_cells=q_cfg.top_cells,
                       neighbours=q_cfg.neighbours, threshold_m=q_cfg.threshold_m, thresholds_m=extra,
                       recall_values=ns, predictions=predictions, progress=tick)
    if save_preds:
        from geoloc.visualize import prediction_strips, read_predictions

        rows = read_predictions(predictions)
        for m in rep.modes:
            strips = prediction_strips([r for r in rows if r["mode"] == m], preds_dir / m, n=min(max(ns), 10),
                                       only_wrong=only_wrong, limit=save_preds)
            err.print(f"{len(strips)} {m} strips in {preds_dir / m}", markup=False)
    results = json.dumps(rep.to_json(), indent=2)
    summary = (f"{rep.queries} queries, threshold {q_cfg.threshold_m:g} m, top cells {rep.top_cells}; "
               f"{rep.queries_without_positive} queries have no database image within {q_cfg.threshold_m:g} m")
    if as_json:
        typer.echo(results)
        err.print(summary, markup=False)
    else:
        out.print(summary, highlight=False)
        typer.echo(rep.table())
    if rep.skipped:
        err.print(f"skipped {len(rep.skipped)} unreadable queries (first: {one_line(str(rep.skipped[0][0]))}: "
                  f"{one_line(str(rep.skipped[0][1]))})", markup=False)
    if results_out is not None:
        try:
            results_out.write_text(results + "\n", encoding="utf-8")
        except OSError as e:
            if not as_json:
                typer.echo(results)  # the results are not lost: they go to stdout
            raise OutputError(f"--out {results_out}: cannot be written ({e.strerror}); the results JSON was printed "
                              "to stdout instead") from None
        err.print(f"results written to {results_out}", markup=False)
    if rep.skipped:
        raise typer.Exit(EXIT_PARTIAL)


class _progress:
    """A progress bar on stderr fed by ``tick(done, total)``; nothing when ``quiet``."""

    def __init__(self, quiet: bool, label: str) -> None:
        self.quiet, self.label, self.bar, self.task = quiet or not sys.stderr.isatty(), label, None, None

    def __enter__(self) -> Any:
        if self.quiet:
            return None
        from rich.progress import Progress

        self.bar = Progress(console=err, transient=True)
        self.bar.__enter__()
        return self.tick

    def tick(self, done: int, total: int) -> None:
        if self.task is None:
            self.task = self.bar.add_task(self.label, total=total)
        self.bar.update(self.task, completed=done, total=total)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


@app.command("export")
def export_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="Bundle folder."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write database.npz, queries.npz, pairs.txt."),
    queries: Optional[str] = typer.Option(None, "--queries", help="Query folder or CSV: embed them, and write pairs."),
    pairs_top: int = typer.Option(20, "--pairs-top", min=1, max=1000, help="Matches per query in pairs.txt."),
    mode: Literal["retrieve", "hybrid"] = typer.Option("hybrid", "--mode", "-m", help="Mode that ranks the pairs."),
    utm_zone: Optional[str] = _cfg_opt("data.utm_zone", "--utm-zone", help="UTM zone of queries named @east@north@."),
    sets: Optional[List[str]] = SetOpt(),
) -> None:
    """Descriptors with their paths (.npz) and an hloc pairs file of each query's top matches."""
    cfg = _query_config(index, None, sets, {"--utm-zone": ("data.utm_zone", utm_zone)})
    _check_out_dir(out_dir, "--out")
    if queries is not None:
        _check_input(queries, "--queries")
    from geoloc.engine import Localizer
    from geoloc.export import export_descriptors, write_pairs

    loc = Localizer.load(index, config=cfg)
    q = _load_queries(queries, cfg.data.utm_zone) if queries is not None else None
    written = export_descriptors(loc, out_dir, queries=q)
    if q is not None:
        written.append(write_pairs(loc, q, out_dir / "pairs.txt", top=pairs_top, mode=mode))
    for path in written:
        out.print(str(path), highlight=False)


@app.command("serve")
def serve_cmd(
    index: Path = typer.Option(..., "--index", "-i", help="Bundle folder."),
    config: Optional[str] = ConfigOpt(),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback; 0.0.0.0 exposes it, no auth)."),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535),
    max_batch: int = typer.Option(16, "--max-batch", min=1, max=1024, help="Most images per backbone batch."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0, max=10_000,
                                      help="Longest wait for uploading requests to join a batch."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, max=100_000,
                                  help="Queued images beyond which requests get 503."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", min=0.01, max=1024, help="Largest image upload, MB."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, max=1024, help="Torch threads (default: cores - 1)."),
    log_level: Literal["critical", "error", "warning", "info", "debug"] = typer.Option("info", "--log-level"),
    sets: Optional[List[str]] = SetOpt(),
) -> None:
    """Serve a bundle over HTTP: POST /v1/localize[/batch]; GET /healthz /readyz /v1/info /metrics."""
    cfg = _query_config(index, config, sets, {})  # query-time keys only, checked before the port opens
    from geoloc.serve import run_server

    run_server(index=index, host=host, port=port, config=cfg, max_batch=max_batch, max_wait_ms=max_wait_ms,
               max_queue=max_queue, max_upload_bytes=int(max_upload_mb * 2**20), log_level=log_level, threads=threads)


# -- info, synth-city -------------------------------------------------------------------------------
@app.command("info")
def info_cmd(
    index: Path = typer.Argument(..., help="Bundle folder."),
    as_json: bool = typer.Option(False, "--json", help="Print only the manifest summary as JSON."),
) -> None:
    """Verify a bundle's checksums and print its manifest summary."""
    require_faiss()
    from geoloc.bundle import manifest_summary, read_verified_manifest

    m = read_verified_manifest(index)  # checksums verified on one pinned folder, even during a rebuild
    summary = manifest_summary(m)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    t = Table(title=f"bundle {one_line(str(index))}", show_header=False)
    for k, v in summary.items():
        t.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    out.print(t)
    out.print(f"all {len(m['files'])} files match their checksums", highlight=False)


@app.command("synth-city")
def synth_city_cmd(
    out_dir: Path = typer.Option(..., "--out", "-o", help="Folder to write database/, queries/, aerial/ and CSVs."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1),
    extent_m: float = typer.Option(1000.0, "--extent-m", help="Side of the square city, metres."),
    spacing_m: float = typer.Option(5.0, "--spacing-m", help="Distance between database viewpoints."),
    shift: Optional[Literal["none", "mild", "strong"]] = typer.Option(None, "--shift", show_default=False,
                              help="Query domain shift [default: mild; with --queries-of the city's own]."),
    n_queries: int = typer.Option(500, "--queries", help="Number of query images."),
    headings: int = typer.Option(4, "--headings", help="Database headings per viewpoint."),
    workers: int = typer.Option(1, "--workers", min=1, max=256, help="Processes (output is identical for any count)."),
    queries_of: Optional[Path] = typer.Option(None, "--queries-of", help="Only queries of this existing synth city, "
                                              "drawn from --seed (not the city's own): validation queries for "
                                              "build-index --val-queries. Extent, spacing and headings are the city's."),
    quiet: bool = QuietOpt(),
) -> None:
    """Generate a geotagged synthetic city (the embedded default dataset), or with --queries-of
    validation queries of an existing one."""
    _check_out_dir(out_dir, "--out")
    if queries_of is not None:
        _synth_queries(queries_of, out_dir, seed=seed, shift=shift, n_queries=n_queries, workers=workers, quiet=quiet,
                       city_flags={"--extent-m": extent_m != 1000.0, "--spacing-m": spacing_m != 5.0,
                                   "--headings": headings != 4})
        return
    from geoloc.synth import generate_city

    info = generate_city(out=out_dir, seed=seed, extent_m=extent_m, spacing_m=spacing_m, shift=shift or "mild",
                         n_queries=n_queries, headings=headings, workers=workers, progress=not quiet)
    out.print(f"{info.n_database} database images, {info.n_queries} queries, {info.n_aerial} aerial tiles "
              f"in {out_dir} ({info.seconds:.1f} s, {info.images_per_second:.0f} images/s)")


def _synth_queries(city: Path, out_dir: Path, *, seed: int, shift: str | None, n_queries: int, workers: int, quiet: bool,
                   city_flags: dict[str, bool]) -> None:
    """``synth-city --queries-of CITY``: queries of an existing synth city with their own seed."""
    given = [flag for flag, changed in city_flags.items() if changed]
    if given:
        raise ConfigError(f"{', '.join(given)} cannot be combined with --queries-of: the queries are of that city, "
                         "with its own extent, spacing and headings")
    from geoloc.synth import generate_queries

    info = generate_queries(city_dir=city, out=out_dir, seed=seed, n_queries=n_queries, shift=shift,
                            workers=workers, progress=not quiet)
    out.print(f"{info.n_queries} {info.shift}-shift queries of {one_line(str(city))} (seed {info.seed}) in "
              f"{one_line(str(out_dir))} ({info.seconds:.1f} s); use them with build-index --val-queries")


def main() -> None:
    """Console entry point (``geoloc`` and ``python -m geoloc``)."""
    app()

