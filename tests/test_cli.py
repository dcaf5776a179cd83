"""The geoloc command end to end through typer's runner: build-index, query, eval, info."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from citydata import TINY_CONFIG, write_dataset
from geoloc.cli import app

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
    assert res.exit_code == 2
    err_lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(err_lines) == 1 and "broken.jpg" in err_lines[0] and "Traceback" not in res.output
    assert [r["image"] for r in json.loads(res.stdout)] == [str(good)]


def test_eval_writes_json_and_predictions(bundle, tmp_path):
    res = runner.invoke(app, ["eval", "--index", str(bundle / "idx"), "--queries", str(bundle / "ds"),
                              "--mode", "all", "--threshold-m", "25", "--json", str(tmp_path / "r.json"),
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


@pytest.mark.parametrize("args, needle", [
    (["query", "x.jpg", "--index", "/nonexistent/idx"], "no such bundle folder"),
    (["eval", "--index", "IDX", "--queries", "/nonexistent/q", "--mode", "sideways"], "unknown --mode"),
    (["build-index", "--database", "/nonexistent/db", "--out", "OUT"], "/nonexistent/db"),
    (["build-index", "--database", "DS", "--out", "OUT", "--set", "cells.size=3"], "unknown config key"),
    (["build-index", "--database", "DS", "--out", "OUT", "--config", "/nope.yaml"], "config file not found"),
])
def test_user_errors_are_one_line_with_exit_code_2(bundle, args, needle):
    args = [a.replace("IDX", str(bundle / "idx")).replace("DS", str(bundle / "ds")).replace("OUT", str(bundle / "o2"))
            for a in args]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
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
