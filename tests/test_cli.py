"""The geoloc command end to end through typer's runner: build-index, query, eval, info."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from citydata import TINY_CONFIG, write_dataset
from geoloc.cli import app
from geoloc.config import QUANTIZERS

runner = CliRunner()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    write_dataset(root / "ds", n_db=120, n_q=12)
    res = runner.invoke(app, ["build-index", "--database", str(root / "ds"), "--out", str(root / "idx"),
                              "--config", str(TINY_CONFIG), "--cell-size", "25", "--groups", "2",
                              "--min-images-per-cell", "2", "--set", "train.epochs=2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "images used" in res.output and "120" in res.output
    return root


def test_query_json_has_the_stable_keys(bundle):
    imgs = sorted((bundle / "ds" / "queries").iterdir())[:3]
    for mode in ("classify", "retrieve", "hybrid"):
        res = runner.invoke(app, ["query", *map(str, imgs), "--index", str(bundle / "idx"), "--mode", mode,
                                  "--top-cells", "3", "--json"])
        assert res.exit_code == 0, res.output
        rows = json.loads(res.stdout)
        assert len(rows) == 3
        for r in rows:
            assert {"image", "mode", "lat", "lon", "cell", "score", "match", "timings_ms"} <= set(r)
            assert r["mode"] == mode and (r["match"] is None) == (mode == "classify")
            assert {"decode", "backbone", "heads", "search"} <= set(r["timings_ms"])


def test_query_table_output(bundle):
    img = sorted((bundle / "ds" / "queries").iterdir())[0]
    res = runner.invoke(app, ["query", str(img), "--index", str(bundle / "idx")])
    assert res.exit_code == 0 and "lat/lon" in res.stdout and "match" in res.stdout


def test_bad_image_is_one_line_and_others_are_answered(bundle, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = sorted((bundle / "ds" / "queries").iterdir())[0]
    res = runner.invoke(app, ["query", str(bad), str(good), "--index", str(bundle / "idx"), "--json"])
    assert res.exit_code == 4  # partial success
    err_lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(err_lines) == 1 and "broken.jpg" in err_lines[0] and "Traceback" not in res.output
    assert [r["image"] for r in json.loads(res.stdout)] == [str(good)]


def test_eval_writes_json_and_predictions(bundle, tmp_path):
    res = runner.invoke(app, ["eval", "--index", str(bundle / "idx"), "--queries", str(bundle / "ds"),
                              "--mode", "all", "--threshold-m", "25", "--out", str(tmp_path / "r.json"),
                              "--predictions", str(tmp_path / "p.jsonl")])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data["modes"]) == {"classify", "retrieve", "hybrid"}
    for m in data["modes"].values():
        assert {"lr@1", "lr@5", "lr@10", "median_error_m", "ms_per_query"} <= set(m)
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 3 * 12
    assert "| hybrid |" in res.stdout


def test_info_verifies_the_bundle(bundle):
    res = runner.invoke(app, ["info", str(bundle / "idx")])
    assert res.exit_code == 0 and "match their checksums" in res.stdout


@pytest.mark.parametrize("args, needle, code", [
    (["query", "x.jpg", "--index", "/nonexistent/idx"], "no such bundle folder", 3),
    (["eval", "--index", "IDX", "--queries", "/nonexistent/q", "--mode", "sideways"], "--mode", 2),
    (["build-index", "--database", "/nonexistent/db", "--out", "OUT"], "/nonexistent/db", 3),
    (["build-index", "--database", "DS", "--out", "OUT", "--set", "cells.size=3"], "unknown config key", 2),
    (["build-index", "--database", "DS", "--out", "OUT", "--config", "/nope.yaml"], "config file not found", 2),
])
def test_user_errors_are_one_line_with_their_exit_code(bundle, args, needle, code):
    args = [a.replace("IDX", str(bundle / "idx")).replace("DS", str(bundle / "ds")).replace("OUT", str(bundle / "o2"))
            for a in args]
    res = runner.invoke(app, args)
    assert res.exit_code == code, res.output
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], res.stderr


def test_build_leaves_bad_images_out_and_reports_them(tmp_path):
    ds = write_dataset(tmp_path / "ds", n_db=40, n_q=0, seed=11)
    good = sorted(p.name for p in (ds / "database").iterdir())
    names = {"zero": b"", "truncated": (ds / "database" / good[0]).read_bytes()[:300], "noise": bytes(range(256)) * 8,
             "text": b"this is not an image\n"}
    for i, (kind, data) in enumerate(names.items()):
        (ds / "database" / f"@{386300 + i:.2f}@6174300.00@33@U@@@{kind}@@@@@@@@.jpg").write_bytes(data)
    res = runner.invoke(app, ["build-index", "--database", str(ds), "--out", str(tmp_path / "idx"),
                              "--config", str(TINY_CONFIG), "--set", "cells.min_images_per_cell=1", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "skipped 4 unreadable images" in res.stderr
    skipped = json.loads((tmp_path / "idx" / "skipped.json").read_text())
    assert sorted(s["path"].split("@")[7] for s in skipped) == sorted(names)
    assert all(s["reason"] for s in skipped)
    paths = json.loads((tmp_path / "idx" / "paths.json").read_text())["paths"]
    assert sorted(p.split("/")[-1] for p in paths) == good  # exactly the good images


# -- config applied before the bundle loads; one line, documented exit codes -----------------------
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import typer.main  # noqa: E402

from geoloc import __version__  # noqa: E402
from geoloc.errors import EXIT_INPUT, EXIT_OUTPUT, EXIT_USAGE  # noqa: E402


def _one_error_line(res) -> str:
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.output, res.output
    return lines[0]


def test_query_applies_query_time_overrides_from_set_and_config(bundle, tmp_path):
    img = str(sorted((bundle / "ds" / "queries").iterdir())[0])
    res = runner.invoke(app, ["query", img, "--index", str(bundle / "idx"), "--set", "query.mode=classify", "--json"])
    assert res.exit_code == 0, res.output
    assert [r["mode"] for r in json.loads(res.stdout)] == ["classify"]
    cfg = tmp_path / "q.yaml"  # build keys equal to the bundle's are accepted beside query keys
    cfg.write_text("cells:\n  size_m: 25\n  groups: 2\nquery:\n  mode: retrieve\n")
    res = runner.invoke(app, ["query", img, "--index", str(bundle / "idx"), "--config", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    assert [r["mode"] for r in json.loads(res.stdout)] == ["retrieve"]


@pytest.mark.parametrize("extra, needle", [
    (["--set", "cells.size_m=30"], "cannot apply to a built bundle"),
    (["--set", "head.dim=64"], "cannot apply to a built bundle"),
    (["--set", "query.top_cells=0"], "query.top_cells"),
    (["--top-cells", "1000000000"], "query.top_cells"),
    (["--set", "index.quantizer=bogus"], "index.quantizer"),
])
def test_query_refuses_bad_or_build_time_overrides_before_loading(bundle, extra, needle, monkeypatch):
    import geoloc.engine

    def boom(*a, **k):
        raise AssertionError("the bundle was loaded")
    monkeypatch.setattr(geoloc.engine.Localizer, "load", boom)
    res = runner.invoke(app, ["query", "x.jpg", "--index", str(bundle / "idx"), *extra])
    assert res.exit_code == EXIT_USAGE and needle in _one_error_line(res)


def test_query_config_file_that_contradicts_the_bundle_is_refused(bundle, tmp_path):
    cfg = tmp_path / "other.yaml"
    cfg.write_text("cells:\n  size_m: 40\n")
    res = runner.invoke(app, ["query", "x.jpg", "--index", str(bundle / "idx"), "--config", str(cfg)])
    line = _one_error_line(res)
    assert res.exit_code == EXIT_USAGE and "cells.size_m" in line and "differs from the bundle" in line


def test_eval_takes_config_and_set_and_creates_output_folders(bundle, tmp_path):
    out = tmp_path / "runs" / "deep" / "r.json"
    pred = tmp_path / "runs" / "p.jsonl"
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("query:\n  top_cells: 3\n  threshold_m: 30\n")
    res = runner.invoke(app, ["eval", "--index", str(bundle / "idx"), "--queries", str(bundle / "ds"), "-m", "hybrid",
                              "--config", str(cfg), "--set", "query.top_cells=2", "--out", str(out),
                              "--predictions", str(pred), "--json", "-q"])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.stdout)  # --json: stdout is the results JSON and nothing else
    assert printed == json.loads(out.read_text()) and set(printed["modes"]) == {"hybrid"}
    assert printed["threshold_m"] == 30 and printed["top_cells"] == 2
    assert len(pred.read_text().splitlines()) == 12


@pytest.mark.parametrize("flag", ["--out", "--predictions"])
def test_eval_refuses_an_output_folder_before_evaluating(bundle, tmp_path, flag, monkeypatch):
    import geoloc.engine

    monkeypatch.setattr(geoloc.engine.Localizer, "load", lambda *a, **k: (_ for _ in ()).throw(AssertionError))
    res = runner.invoke(app, ["eval", "--index", str(bundle / "idx"), "--queries", str(bundle / "ds"),
                              flag, str(tmp_path)])
    assert res.exit_code == EXIT_OUTPUT and "is a folder" in _one_error_line(res)


def test_eval_threshold_is_range_checked(bundle):
    for bad in ("nan", "-5", "inf"):
        res = runner.invoke(app, ["eval", "--index", str(bundle / "idx"), "--queries", str(bundle / "ds"),
                                  "--threshold-m", bad])
        assert res.exit_code == EXIT_USAGE and "query.threshold_m" in _one_error_line(res)


def test_old_eval_json_file_form_says_what_to_use(bundle, tmp_path):
    res = runner.invoke(app, ["eval", "--index", str(bundle / "idx"), "--queries", str(bundle / "ds"),
                              "--json", str(tmp_path / "r.json")])
    assert res.exit_code == EXIT_USAGE and "--out FILE" in _one_error_line(res)


def test_info_json_is_only_json(bundle):
    res = runner.invoke(app, ["info", str(bundle / "idx"), "--json"])
    assert res.exit_code == 0
    assert json.loads(res.stdout)["descriptor_dim"] == 32


def test_build_index_refuses_a_file_as_out_before_any_work(bundle, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("mine")
    res = runner.invoke(app, ["build-index", "--database", str(bundle / "ds"), "--out", str(target)])
    assert res.exit_code == EXIT_OUTPUT and "an existing file" in _one_error_line(res)
    assert target.read_text() == "mine"


def test_missing_faiss_is_one_line_naming_the_extra(bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    res = runner.invoke(app, ["info", str(bundle / "idx")])
    line = _one_error_line(res)
    assert res.exit_code == EXIT_USAGE and 'pip install -e ".[cpu]"' in line


def test_version_help_defaults_and_consistent_flags():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and __version__ in res.stdout
    res = runner.invoke(app, ["build-index", "--help"])
    flat = " ".join(res.stdout.replace("│", " ").split())  # the help box wraps at the terminal width
    assert res.exit_code == 0 and "cells.size_m" in flat.replace(" ", "") and "(20 or the config's)" in flat
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        for p in cmd.params:
            if "-q" in p.opts:
                assert p.opts == ["--quiet", "-q"] and p.is_flag, name
            if "--json" in p.opts:
                assert p.is_flag, name  # --json always prints JSON; files are named with --out
            if "-o" in p.opts:
                assert "--out" in p.opts, name


def test_real_process_refuses_a_bad_setting_in_one_line_at_once(tmp_path):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "geoloc", "build-index", "--set", "index.quantizer=bogus",
                           "--database", str(tmp_path / "db"), "--out", str(tmp_path / "out"), "--config", "lund"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "COLUMNS": "200"})
    elapsed = time.perf_counter() - t0
    assert proc.returncode == EXIT_USAGE and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: --set: index.quantizer = 'bogus': expected one of {', '.join(QUANTIZERS)}"]
    assert elapsed < 30 and not (tmp_path / "out").exists()
    proc = subprocess.run([sys.executable, "-m", "geoloc", "query", "x.jpg", "--index", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == EXIT_INPUT and len(proc.stderr.strip().splitlines()) == 1


def test_eval_with_unreadable_queries_is_partial_success(bundle, tmp_path):
    import shutil

    ds = tmp_path / "ds"
    shutil.copytree(bundle / "ds" / "queries", ds / "queries")
    good = sorted((ds / "queries").iterdir())[0].name
    (ds / "queries" / good.replace("@.jpg", "broken@.jpg")).write_bytes(b"\xff\xd8 not a jpeg")
    res = runner.invoke(app, ["eval", "--index", str(bundle / "idx"), "--queries", str(ds), "-m", "classify",
                              "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 4, res.output
    assert "skipped 1 unreadable queries" in res.stderr and json.loads((tmp_path / "r.json").read_text())["queries"] == 12


def test_utm_zone_reaches_the_dataset_reader(bundle, tmp_path, monkeypatch):
    import geoloc.data

    seen = {}
    real = geoloc.data.load_records

    def spy(*a, **kw):
        seen.update(kw)
        return real(*a, **kw)
    monkeypatch.setattr(geoloc.data, "load_records", spy)
    res = runner.invoke(app, ["eval", "--index", str(bundle / "idx"), "--queries", str(bundle / "ds"), "-m", "classify",
                              "--utm-zone", "33U"])
    assert res.exit_code == 0, res.output
    assert seen["utm_zone"] == "33U"
    res = runner.invoke(app, ["eval", "--index", str(bundle / "idx"), "--queries", str(bundle / "ds"), "--utm-zone", "99Z"])
    assert res.exit_code == EXIT_USAGE and "data.utm_zone" in _one_error_line(res)


def test_build_index_refuses_a_foreign_folder_before_any_work(bundle, tmp_path, monkeypatch):
    import geoloc.build

    monkeypatch.setattr(geoloc.build, "build_index", lambda **k: (_ for _ in ()).throw(AssertionError("built")))
    app_dir = tmp_path / "myapp"
    (app_dir / "src").mkdir(parents=True)
    (app_dir / "manifest.json").write_text('{"name": "my web app"}')
    (app_dir / "src" / "main.js").write_text("console.log(1)")
    res = runner.invoke(app, ["build-index", "--database", str(bundle / "ds"), "--out", str(app_dir)])
    assert res.exit_code == EXIT_OUTPUT and str(app_dir) in _one_error_line(res)
    assert (app_dir / "src" / "main.js").read_text() == "console.log(1)"


def test_query_takes_folders_and_list_files_and_streams_jsonl(bundle, tmp_path):
    qdir = bundle / "ds" / "queries"
    imgs = sorted(qdir.iterdir())
    lst = tmp_path / "list.txt"
    lst.write_text("# two images\n" + "\n".join(str(p) for p in imgs[:2]) + "\n")
    res = runner.invoke(app, ["query", str(qdir), str(lst), "--index", str(bundle / "idx"), "--jsonl",
                              "--set", "backbone.batch_size=5"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p in imgs] + [str(p) for p in imgs[:2]]
    res = runner.invoke(app, ["query", str(imgs[0]), "--index", str(bundle / "idx"), "--json", "--jsonl"])
    assert res.exit_code == 2 and "one of them" in res.stderr


def test_eval_recall_values_save_preds_and_export(bundle, tmp_path):
    res = runner.invoke(app, ["eval", "--index", str(bundle / "idx"), "--queries", str(bundle / "ds"),
                              "--recall-values", "1,2,20", "--more-thresholds-m", "50", "--mode", "retrieve",
                              "--out", str(tmp_path / "r" / "res.json"), "--save-preds", "3", "--quiet"])
    assert res.exit_code == 0, res.output
    js = json.loads((tmp_path / "r" / "res.json").read_text())
    assert js["recall_values"] == [1, 2, 20] and set(js["modes"]["retrieve"]["recall_by_threshold_m"]) == {"25", "50"}
    assert "| LR@1 | LR@2 | LR@20 |" in res.stdout and "no database image within" in res.stdout
    assert len(list((tmp_path / "r" / "preds" / "retrieve").glob("*.png"))) == 3
    res = runner.invoke(app, ["eval", "--index", str(bundle / "idx"), "--queries", str(bundle / "ds"),
                              "--recall-values", "0,5"])
    assert res.exit_code == 2 and "recall value 0" in res.stderr
    res = runner.invoke(app, ["export", "--index", str(bundle / "idx"), "--queries", str(bundle / "ds"),
                              "--out", str(tmp_path / "x"), "--pairs-top", "4"])
    assert res.exit_code == 0, res.output
    assert {p.name for p in (tmp_path / "x").iterdir()} == {"database.npz", "queries.npz", "pairs.txt"}
    assert len((tmp_path / "x" / "pairs.txt").read_text().splitlines()) == 4 * 12
