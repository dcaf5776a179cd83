"""The field's evaluation: LR@N for any N and several thresholds, positives per query, a
predictions file from which every recall can be recomputed, provenance, and one-line refusals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from citydata import TINY_CONFIG, write_dataset
from geoloc.build import build_index
from geoloc.config import load_config
from geoloc.data import load_records
from geoloc.engine import Localizer
from geoloc.errors import ConfigError, DatasetError
from geoloc.evaluate import count_positives, evaluate
from geoloc.geo import geodesic_m


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcity")
    write_dataset(root / "ds", seed=4)
    rep = build_index(database=root / "ds", out=root / "tiny", config=load_config(TINY_CONFIG), progress=False)
    return root, Localizer.load(rep.out), load_records(root / "ds", split="queries")


def test_recalls_at_any_n_and_thresholds_recomputed_from_the_predictions_file(setup, tmp_path):
    root, loc, q = setup
    pred = tmp_path / "runs" / "deep" / "p.jsonl"  # parent folders are created
    rep = evaluate(loc, q, threshold_m=25.0, thresholds_m=(50.0, 10.0), recall_values=(1, 3, 20), predictions=pred)
    assert rep.recall_values == (1, 3, 20) and rep.thresholds_m == (25.0, 50.0, 10.0)
    rows = [json.loads(line) for line in pred.read_text().splitlines()]
    assert len(rows) == 3 * len(q)
    for mode, r in rep.modes.items():
        mine = [x for x in rows if x["mode"] == mode]
        for t in rep.thresholds_m:
            for n in rep.recall_values:
                recomputed = np.mean([any(c["error_m"] <= t for c in x["top"][:n]) for x in mine])
                assert r.recall_by_threshold[t][n] == pytest.approx(recomputed)
        assert r.recall == r.recall_by_threshold[25.0]
        assert r.recall[1] <= r.recall[3] <= r.recall[20]
        assert r.recall_by_threshold[10.0][1] <= r.recall[1] <= r.recall_by_threshold[50.0][1]
        for x in mine:  # each row carries the truth and its top answers, best first
            assert len(x["top"]) == 20 or mode != "retrieve"  # hybrid: only what its cells hold
            assert x["top"][0]["error_m"] == pytest.approx(x["error_m"])
            top_err = geodesic_m(x["truth"]["lat"], x["truth"]["lon"], x["top"][0]["lat"], x["top"][0]["lon"])
            assert float(top_err) == pytest.approx(x["error_m"], abs=1e-6)
            scores = [c["score"] for c in x["top"]]
            assert scores == sorted(scores, reverse=True)
            assert (x["top"][0]["path"] is None) == (mode == "classify")
    js = rep.to_json()
    assert js["modes"]["retrieve"]["lr@20"] == rep.modes["retrieve"].recall[20]
    assert js["provenance"]["bundle_manifest_sha256"] == loc.bundle.manifest["manifest_sha256"]
    assert js["provenance"]["config"] == loc.config.to_dict() and "faiss" in js["provenance"]["versions"]
    assert "command" in js["provenance"]
    assert "| LR@1 | LR@3 | LR@20 |" in rep.table()


def test_positives_equal_brute_force_geodesic_counts(setup):
    _, loc, q = setup
    db = loc.bundle.records
    for radius in (10.0, 25.0, 60.0):
        got = count_positives(db, q, radius_m=radius)
        want = [int((geodesic_m(q.lat[i], q.lon[i], db.lat, db.lon) <= radius).sum()) for i in range(len(q))]
        # UTM and geodesic distances differ by millimetres here; no pair sits that close to the radius
        assert got.tolist() == want
    rep = evaluate(loc, q, modes=("retrieve",), threshold_m=10.0)
    assert rep.queries_without_positive == int((count_positives(db, q, radius_m=10.0) == 0).sum())
    # a query without any positive can never be answered correctly by retrieval
    assert rep.modes["retrieve"].recall[20] <= 1 - rep.queries_without_positive / rep.queries + 1e-9


@pytest.mark.parametrize("kwargs", [{"threshold_m": math.nan}, {"threshold_m": -5.0}, {"threshold_m": math.inf},
                                    {"thresholds_m": (0.0,)}, {"recall_values": (0,)}, {"recall_values": (2.5,)},
                                    {"recall_values": ()}])
def test_bad_settings_are_refused_before_any_work(setup, kwargs):
    _, loc, q = setup
    with pytest.raises(ConfigError):
        evaluate(loc, q, **kwargs)


def test_no_decodable_query_is_an_error_not_a_table_of_nan(setup, tmp_path):
    _, loc, q = setup
    bad = tmp_path / "queries"
    bad.mkdir()
    for name in q.paths[:3]:
        (bad / name.split("/")[-1]).write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="none of the 3 queries could be decoded"):
        evaluate(loc, load_records(bad, split="queries"))


def test_pictures_of_a_result(setup, tmp_path):
    from PIL import Image

    from geoloc.visualize import answer_sheet, error_histogram, error_map, prediction_strips, read_predictions

    _, loc, q = setup
    evaluate(loc, q, predictions=tmp_path / "p.jsonl")
    rows = read_predictions(tmp_path / "p.jsonl")
    retrieve = [r for r in rows if r["mode"] == "retrieve"]
    strips = prediction_strips(retrieve, tmp_path / "strips", n=3)
    assert len(strips) == len(q)
    with Image.open(strips[0]) as im:
        assert im.size == (4 * 192 + 3 * 8, 192)
        # the first match's frame is green when it is within the threshold, red otherwise
        frame = im.getpixel((192 + 8 + 2, 96))
        want = (42, 157, 143) if retrieve[0]["top"][0]["correct"] else (231, 111, 81)
        assert frame == want
    wrong = prediction_strips(retrieve, tmp_path / "wrong", n=3, only_wrong=True)
    assert len(wrong) == sum(not r["correct"] for r in retrieve)
    assert prediction_strips([r for r in rows if r["mode"] == "classify"], tmp_path / "none") == []  # no images
    for path in (answer_sheet(retrieve, tmp_path / "sheet.png"), error_map(retrieve, tmp_path / "map.png"),
                 error_histogram(rows, tmp_path / "hist.png")):
        with Image.open(path) as im:
            assert im.size[0] > 100 and im.size[1] > 100


def test_export_descriptors_and_hloc_pairs(setup, tmp_path):
    from geoloc.export import export_descriptors, read_descriptors, write_pairs

    _, loc, q = setup
    files = export_descriptors(loc, tmp_path / "x", queries=q)
    db_paths, db = read_descriptors(files[0])
    q_paths, qd = read_descriptors(files[1])
    assert db_paths == loc.bundle.records.paths and db.shape == (len(db_paths), loc.encoder.dim)
    assert q_paths == q.paths and qd.shape == (len(q), loc.encoder.dim)
    # exported descriptors answer exactly as the images do
    by_desc = loc.localize_descriptors(qd, mode="retrieve", top_matches=5)
    by_image = loc.localize([q.abspath(i) for i in range(len(q))], mode="retrieve", top_matches=5)
    assert [p.candidate_ids for p in by_desc] == [p.candidate_ids for p in by_image]
    pairs = write_pairs(loc, q, tmp_path / "pairs.txt", top=5, mode="retrieve").read_text().splitlines()
    assert len(pairs) == 5 * len(q)
    want = [f"{q.paths[i]} {loc.bundle.records.paths[j]}" for i, p in enumerate(by_image) for j in p.candidate_ids]
    assert pairs == want


def test_bundle_from_descriptors_computed_elsewhere_answers_like_the_image_bundle(setup, tmp_path):
    """A user's own descriptors (keyed by path) build the classifier and the index; when they are
    exactly the backbone's features, the bundle answers exactly as the one built from images."""
    from geoloc.backbones import create_backbone
    from geoloc.errors import BundleError
    from geoloc.evaluate import embed_queries, query_descriptors
    from geoloc.extract import extract_features

    root, loc, q = setup
    cfg = load_config(TINY_CONFIG)
    db = load_records(root / "ds", split="database")
    feats = extract_features(db.abspaths(), backbone=create_backbone(cfg.backbone), batch_size=cfg.backbone.batch_size,
                             num_workers=0, progress=False).features
    np.savez(tmp_path / "db.npz", paths=np.asarray(db.paths), descriptors=feats)
    qf = embed_queries(loc, q)
    absolute = [str(q.abspath(i)) for i in range(len(q))]  # keyed by absolute paths works too
    np.savez(tmp_path / "q.npz", paths=np.asarray(absolute), descriptors=qf.features)

    rep = build_index(database=root / "ds", out=tmp_path / "ext", config=cfg, progress=False,
                      descriptors=tmp_path / "db.npz")
    ext = Localizer.load(rep.out)
    assert ext.backbone is None and ext.bundle.manifest["backbone"]["name"] == "external"
    np.testing.assert_array_equal(ext.bundle.prototypes, loc.bundle.prototypes)
    a = evaluate(loc, qf).to_json()["modes"]
    b = evaluate(ext, query_descriptors(ext, q, tmp_path / "q.npz")).to_json()["modes"]
    for mode in a:
        for key in ("lr@1", "lr@5", "lr@20", "median_error_m", "vectors_scanned"):
            assert a[mode][key] == b[mode][key]
    with pytest.raises(BundleError, match="built from descriptors"):
        ext.localize([q.abspath(0)])
    np.savez(tmp_path / "short.npz", paths=np.asarray(db.paths[:-1]), descriptors=feats[:-1])
    with pytest.raises(DatasetError, match="no descriptor for 1 of"):
        build_index(database=root / "ds", out=tmp_path / "ext2", config=cfg, progress=False,
                    descriptors=tmp_path / "short.npz")


def test_build_with_augmented_views_and_validation_queries_stores_the_chosen_fusion_weight(setup, tmp_path):
    """The classifier recipe end to end: an augmented view of every database image joins training,
    validation queries select the epoch and the fusion weight, and the bundle keeps the weight."""
    from geoloc.bundle import read_manifest

    root, _, q = setup
    cfg = load_config(TINY_CONFIG, ["train.augment_views=1", "train.epochs=4"])
    rep = build_index(database=root / "ds", out=tmp_path / "b", config=cfg, progress=False,
                      val_queries=root / "ds" / "queries")
    assert "extract-augmented" in rep.timings_s and "select-fusion" in rep.timings_s
    assert rep.train.validation == "queries" and 1 <= rep.train.best_epoch <= 4
    m = read_manifest(rep.out)
    chosen = m["config"]["query"]["fusion_weight"]
    by_w = m["stats"]["fusion_weight_val_lr@1"]
    assert by_w[f"{chosen:g}"] == max(by_w.values())  # the weight with the best validation LR@1
    assert cfg.query.fusion_weight == 0.5  # the caller's config is left as it was
    loc = Localizer.load(rep.out)
    assert loc.config.query.fusion_weight == chosen
    assert len(loc.bundle.prototypes) == cfg.head.subcenters * len(loc.bundle.table)
    # the augmented view was extracted once and is reused by a rebuild
    again = build_index(database=root / "ds", out=tmp_path / "b", config=cfg, progress=False,
                        val_queries=root / "ds" / "queries")
    assert again.reused_feature_chunks >= 1
