"""End to end through the library: build a bundle, reload it, answer in every mode.

Equivalence tests against reference paths (docs/architecture.md): hybrid over all cells equals
retrieve; answers equal brute force over the bundle's own arrays; a reloaded bundle answers
identically; 8 threads answer like one.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from citydata import TINY_CONFIG, write_dataset
from geoloc.backbones import create_backbone
from geoloc.build import build_index, work_dir
from geoloc.config import BackboneConfig, load_config
from geoloc.data import load_records
from geoloc.engine import Localizer
from geoloc.errors import BundleError
from geoloc.evaluate import evaluate


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("city")
    write_dataset(root / "ds")
    cfg = load_config(TINY_CONFIG)
    rep = build_index(database=root / "ds", out=root / "indexes" / "tiny", config=cfg, progress=False)
    return root, rep


@pytest.fixture(scope="module")
def loc(built):
    return Localizer.load(built[1].out)


def test_build_report_and_bundle_files(built):
    root, rep = built
    assert rep.images_used == 160 and rep.images_skipped == 0
    assert rep.cells > 10 and rep.groups == 4 and rep.descriptor_dim == 32
    names = {p.name for p in rep.out.iterdir()}
    assert {"manifest.json", "model.safetensors", "cells.safetensors", "records.safetensors", "paths.json",
            "skipped.json", "config.yaml"} <= names
    manifest = json.loads((rep.out / "manifest.json").read_text())
    assert set(manifest["files"]) == names - {"manifest.json"}
    assert manifest["backbone"]["name"] == "test_tiny" and manifest["descriptor_dim"] == 32
    assert manifest["cells"] == {"size_m": 20.0, "groups": 2, "min_images_per_cell": 2, "count": rep.cells}
    assert not any(p.suffix in {".pkl", ".pickle"} for p in rep.out.iterdir())
    assert not list(rep.out.parent.glob(".tiny.tmp-*"))


def test_hybrid_over_all_cells_equals_retrieve(loc):
    q = np.random.default_rng(1).normal(size=(16, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    c = len(loc.bundle.table)
    # weight 0: ranking by retrieval similarity alone (the default fuses in the cell score)
    hyb = loc.localize_descriptors(q, mode="hybrid", top_cells=c, top_matches=10, fusion_weight=0.0)
    ret = loc.localize_descriptors(q, mode="retrieve", top_matches=10)
    for h, r in zip(hyb, ret):
        assert (h.lat, h.lon, h.match, h.candidates) == (r.lat, r.lon, r.match, r.candidates)
        assert h.score == pytest.approx(r.score, abs=1e-6)


def test_answers_equal_brute_force_over_bundle_arrays(loc, built):
    root = built[0]
    queries = sorted((root / "ds" / "queries").iterdir())
    preds = {m: loc.localize(queries, mode=m, top_cells=3) for m in ("classify", "retrieve", "hybrid")}
    feats = loc.encoder.features(__import__("torch").stack([loc.encoder.decode(p) for p in queries]))
    desc = loc.encoder.descriptors(feats)
    db, cells = loc.bundle.index.vectors()
    protos = loc.bundle.prototypes / np.linalg.norm(loc.bundle.prototypes, axis=1, keepdims=True)
    owner = loc.bundle.index.prototype_cells  # [P] cell of each sub-centre
    assert len(protos) == loc.config.head.subcenters * len(loc.bundle.table)
    cell_scores = np.full((len(desc), len(loc.bundle.table)), -np.inf)
    np.maximum.at(cell_scores, (slice(None), owner), desc @ protos.T)  # a cell scores its best sub-centre
    w = loc.config.query.fusion_weight
    assert w > 0  # the default ranks hybrid candidates by similarity + w x their cell's score
    for i in range(len(queries)):
        top = np.argsort(-cell_scores[i], kind="stable")[:3]
        assert preds["classify"][i].cell == top[0]
        best = int(np.argmax(db @ desc[i]))
        assert preds["retrieve"][i].match == loc.match_path(best)
        members = np.flatnonzero(np.isin(cells, top))
        best_in = members[np.argmax(db[members] @ desc[i] + w * cell_scores[i, cells[members]])]
        assert preds["hybrid"][i].match == loc.match_path(int(best_in))


def test_reloaded_bundle_answers_identically(loc, built, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(built[1].out, copy)
    again = Localizer.load(copy)
    queries = sorted((built[0] / "ds" / "queries").iterdir())[:8]
    for mode in ("classify", "retrieve", "hybrid"):
        a = [p.to_json() for p in loc.localize(queries, mode=mode)]
        b = [p.to_json() for p in again.localize(queries, mode=mode)]
        for x, y in zip(a, b):
            x.pop("timings_ms"), y.pop("timings_ms")
            x.pop("match"), y.pop("match")  # same images, different bundle folder is irrelevant: paths are dataset paths
            assert x == y


def test_self_query_finds_itself(loc, built):
    db = sorted((built[0] / "ds" / "database").iterdir())[:20]
    rows = [loc.bundle.records.paths.index(f"database/{p.name}") for p in db]
    retrieved = loc.localize(db, mode="retrieve")
    assert [Path(p.match).name for p in retrieved] == [p.name for p in db]
    # hybrid finds the image itself exactly when the classifier put its cell in the top k
    hybrid = loc.localize(db, mode="hybrid", top_cells=3)
    in_top = [loc.bundle.filed[r] in p.top_cells for r, p in zip(rows, hybrid)]
    assert sum(in_top) >= len(db) // 2
    for p, q, hit in zip(hybrid, db, in_top):
        assert (Path(p.match).name == q.name) == hit


def test_eval_reports_every_mode(loc, built, tmp_path):
    q = load_records(built[0] / "ds", split="queries")
    rep = evaluate(loc, q, threshold_m=25.0, predictions=tmp_path / "p.jsonl")
    assert set(rep.modes) == {"classify", "retrieve", "hybrid"} and rep.queries == 24
    for r in rep.modes.values():
        assert 0 <= r.recall[1] <= r.recall[5] <= r.recall[10] <= 1
        assert set(r.ms_per_query) == {"decode", "backbone", "heads", "search", "total"}
    n = len(loc.bundle.records)
    assert rep.modes["retrieve"].vectors_scanned == n and rep.modes["classify"].vectors_scanned == 0
    assert 0 < rep.modes["hybrid"].vectors_scanned < n
    lines = (tmp_path / "p.jsonl").read_text().splitlines()
    assert len(lines) == 3 * 24 and {"query", "mode", "lat", "lon", "cell", "match", "error_m"} <= set(json.loads(lines[0]))
    # the retrieve rows of the predictions reproduce the table's LR@1
    errs = [json.loads(x)["error_m"] for x in lines if json.loads(x)["mode"] == "retrieve"]
    assert np.mean(np.array(errs) <= 25.0) == pytest.approx(rep.modes["retrieve"].recall[1])


def test_eight_threads_answer_like_one(loc):
    rng = np.random.default_rng(3)
    q = rng.normal(size=(64, 32)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    jobs = [(m, k) for m in ("classify", "retrieve", "hybrid") for k in (1, 2, 5)]
    serial = {(m, k): [p.to_json() for p in loc.localize_descriptors(q, mode=m, top_cells=k)] for m, k in jobs}
    results: dict = {}

    def work(t: int) -> None:
        for rep in range(3):
            m, k = jobs[(t + rep) % len(jobs)]
            results[(t, rep)] = ((m, k), [p.to_json() for p in loc.localize_descriptors(q, mode=m, top_cells=k)])

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 24
    for key, preds in results.values():
        strip = lambda ps: [{k: v for k, v in p.items() if k != "timings_ms"} for p in ps]  # noqa: E731
        assert strip(preds) == strip(serial[key])


def test_other_backbone_is_refused(built):
    other = create_backbone(BackboneConfig(name="test_tiny", weights="random", image_size=80))
    with pytest.raises(BundleError, match="another backbone.*input_size"):
        Localizer.load(built[1].out, backbone=other)


def test_rebuild_reuses_features_and_replaces_bundle(built, tmp_path):
    root, rep = built
    cfg = load_config(TINY_CONFIG)
    again = build_index(database=root / "ds", out=rep.out, config=cfg, progress=False)
    assert again.reused_feature_chunks >= 1
    assert work_dir(rep.out).is_dir()
    Localizer.load(rep.out)  # still a valid bundle after being replaced in place


def test_database_over_two_zones_and_the_equator(tmp_path):
    """Cells never merge across zones or hemispheres; errors stay geodesic."""
    root = tmp_path / "ds"
    # lon 11.99/12.01 straddles the 32/33 zone border; lat +-0.0004 straddles the equator
    write_dataset(root, n_db=60, n_q=0, seed=5, lat0=55.7, lon0=11.9995, span_deg=0.001)
    write_dataset(root, n_db=60, n_q=0, seed=6, lat0=-0.0005, lon0=30.0, span_deg=0.001)
    recs = load_records(root, split="database")
    assert set(zip(recs.zone.tolist(), recs.south.tolist())) == {(32, False), (33, False), (36, False), (36, True)}
    cfg = load_config(TINY_CONFIG, ["cells.min_images_per_cell=1"])
    rep = build_index(database=root, out=tmp_path / "idx", config=cfg, progress=False)
    loc = Localizer.load(rep.out)
    t = loc.bundle.table
    for i in range(len(recs)):  # every record filed in a cell of its own zone and hemisphere
        c = loc.bundle.filed[i]
        assert (t.zone[c], t.south[c]) == (loc.bundle.records.zone[i], loc.bundle.records.south[i])
    preds = loc.localize(sorted((root / "database").iterdir()), mode="retrieve")
    assert all(Path(p.match).parent.name == "database" for p in preds)



def test_finetuning_last_blocks_ships_the_tuned_backbone(tmp_path):
    from geoloc.bundle import read_manifest

    write_dataset(tmp_path / "ds", n_db=60, n_q=0, seed=9)
    cfg = load_config(TINY_CONFIG, ["train.finetune_blocks=1", "train.finetune_epochs=1", "train.lr_backbone=1e-3"])
    rep = build_index(database=tmp_path / "ds", out=tmp_path / "idx", config=cfg, progress=False)
    assert "finetune" in rep.timings_s and (rep.out / "backbone.safetensors").exists()
    stock = create_backbone(cfg.backbone)
    manifest = read_manifest(rep.out)
    assert manifest["backbone"]["fingerprint"] != stock.fingerprint
    assert manifest["backbone"]["weights_source"].startswith("tuned:")
    with pytest.raises(BundleError, match="fingerprint"):
        Localizer.load(rep.out, backbone=stock)  # the untuned network is refused
    loc = Localizer.load(rep.out)  # rebuilt from its name + the bundle's tuned weights
    db = sorted((tmp_path / "ds" / "database").iterdir())[:10]
    assert [Path(p.match).name for p in loc.localize(db, mode="retrieve")] == [p.name for p in db]
