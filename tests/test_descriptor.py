"""The retrieval descriptor as a config choice (index.descriptor) and K selected at build time.

Equivalence tests against reference paths: a pooled / second-backbone bundle classifies exactly
like the projected one (same classifier), retrieves exactly like brute force over the chosen
descriptor, and its hybrid over all cells at weight 0 equals its retrieve.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from citydata import TINY_CONFIG, write_dataset
from geoloc.backbones import create_backbone
from geoloc.build import build_index
from geoloc.bundle import read_bundle
from geoloc.config import load_config
from geoloc.data import load_records
from geoloc.encoder import DescriptorLayout, second_backbone_config
from geoloc.engine import Localizer
from geoloc.errors import BundleError, ConfigError

SECOND = ["index.second_backbone=timm:test_efficientnet", "index.second_weights=random",
          "index.second_image_size=64"]
COMMON = ["train.select_subcenters=1,2", "train.epochs=2"]


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("desc")
    write_dataset(root / "ds", n_db=120, n_q=16, seed=2)
    write_dataset(root / "val", n_db=0, n_q=20, seed=3)
    return root


@pytest.fixture(scope="module")
def bundles(city) -> dict[str, Path]:
    out = {}
    for kind in ("projected", "pooled", "second"):
        cfg = load_config(TINY_CONFIG, [*COMMON, f"index.descriptor={kind}", *(SECOND if kind == "second" else [])])
        rep = build_index(database=city / "ds", out=city / kind, config=cfg, progress=False, val_queries=city / "val")
        out[kind] = rep.out
    return out


def _queries(city: Path) -> list[str]:
    q = load_records(city / "ds", split="queries")
    return [str(q.abspath(i)) for i in range(len(q))]


def test_manifest_records_descriptor_and_selected_k(bundles):
    dims = {}
    for kind, path in bundles.items():
        m = json.loads((path / "manifest.json").read_text())
        rec = m["stats"]["descriptor"]
        assert rec["kind"] == kind and m["config"]["index"]["descriptor"] == kind
        layout = DescriptorLayout.from_manifest(m)
        assert layout.dim == m["descriptor_dim"]
        dims[kind] = (rec["classifier_dim"], rec["retrieval_dim"])
        assert (rec["second_backbone"] is not None) == (kind == "second")
        scores = m["stats"]["subcenters_val_lr@1"]
        k = m["stats"]["subcenters_selected"]
        assert set(scores) == {"1", "2"} and m["config"]["head"]["subcenters"] == k
        assert scores[str(k)] == max(scores.values()) and m["stats"]["subcenters_validation"] == "queries"
        assert k == min(int(x) for x, v in scores.items() if v == max(scores.values()))
        assert read_bundle(path).index.prototype_cells.size == k * m["cells"]["count"]
    assert dims["projected"] == (32, 0) and dims["pooled"] == (32, 64)  # test_tiny: F = 64, head.dim 32
    assert dims["second"][0] == 32 and dims["second"][1] > 0
    # the second backbone's features are cached beside the first's, under their own key
    from geoloc.build import work_dir

    keys = [json.loads((work_dir(bundles["second"]) / d / "cache.json").read_text())["key"]
            for d in ("features", "features-second", "val-features-second")]
    assert keys[0] != keys[1] == keys[2]


def test_classify_is_the_same_classifier_whatever_the_retrieval_descriptor(bundles, city):
    imgs = _queries(city)
    ref = Localizer.load(bundles["projected"]).localize(imgs, mode="classify", top_cells=3)
    for kind in ("pooled", "second"):
        got = Localizer.load(bundles[kind]).localize(imgs, mode="classify", top_cells=3)
        assert [p.top_cells for p in got] == [p.top_cells for p in ref]
        np.testing.assert_allclose([p.candidate_scores for p in got], [p.candidate_scores for p in ref], atol=1e-5)


def _brute(q: np.ndarray, db: np.ndarray, k: int) -> np.ndarray:
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    db = db / np.linalg.norm(db, axis=1, keepdims=True)
    return np.argsort(-(q @ db.T), axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("kind", ["pooled", "second"])
def test_retrieve_is_brute_force_over_the_chosen_descriptor_and_hybrid_over_all_cells_is_retrieve(bundles, city, kind):
    loc = Localizer.load(bundles[kind])
    b = loc.bundle
    cfg = b.config
    model = create_backbone(cfg.backbone) if kind == "pooled" else create_backbone(second_backbone_config(cfg.backbone, cfg.index))
    from geoloc.encoder import Encoder

    raw = Encoder(model)  # that backbone's pooled features, computed independently of the bundle
    db = raw.encode_files([str(b.records.abspath(i)) for i in range(len(b.records))]).features
    imgs = _queries(city)
    q = raw.encode_files(imgs).features
    vec, _ = b.index.vectors()
    d = loc.layout.classifier_dim
    assert np.abs(vec[:, :d]).max() == 0  # database rows hold only the retrieval block
    np.testing.assert_allclose(vec[:, d:], db / np.linalg.norm(db, axis=1, keepdims=True), atol=1e-5)
    expect = _brute(q, db, 3)
    ret = loc.localize(imgs, mode="retrieve", top_matches=3)
    assert [p.candidate_ids[0] for p in ret] == expect[:, 0].tolist()
    sims = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (db / np.linalg.norm(db, axis=1, keepdims=True)).T
    np.testing.assert_allclose([p.score for p in ret], sims.max(1), atol=1e-4)  # reported as cosines
    hyb = loc.localize(imgs, mode="hybrid", top_cells=len(b.table), neighbours=False, fusion_weight=0.0, top_matches=3)
    assert [p.candidate_ids for p in hyb] == [p.candidate_ids for p in ret]


def test_hybrid_restricts_the_chosen_descriptor_to_the_classifiers_cells(bundles, city):
    imgs = _queries(city)
    cls = Localizer.load(bundles["projected"]).localize(imgs, mode="classify", top_cells=2)
    loc = Localizer.load(bundles["pooled"])
    hyb = loc.localize(imgs, mode="hybrid", top_cells=2, neighbours=False, fusion_weight=0.0)
    for c, h in zip(cls, hyb):
        assert h.top_cells == c.top_cells
        assert {int(loc.bundle.filed[j]) for j in h.candidate_ids} <= set(c.top_cells)


def test_second_backbone_is_needed_and_checked(bundles):
    b = read_bundle(bundles["second"])
    first = create_backbone(b.config.backbone)
    with pytest.raises(BundleError, match="second backbone"):
        Localizer(b, first)
    other = create_backbone(second_backbone_config(b.config.backbone, load_config(TINY_CONFIG, [
        "index.second_backbone=timm:test_efficientnet", "index.second_weights=random",
        "index.second_image_size=96"]).index))
    with pytest.raises(BundleError, match="another backbone"):
        Localizer(b, first, other)


def test_bad_descriptor_settings_are_one_line_before_any_work(city, tmp_path):
    cfg = load_config(TINY_CONFIG, ["index.descriptor=second"])
    with pytest.raises(ConfigError, match="second_backbone is empty") as err:
        build_index(database=city / "ds", out=tmp_path / "x", config=cfg, progress=False)
    assert "\n" not in str(err.value) and not (tmp_path / "x").exists()
    with pytest.raises(ConfigError, match="--descriptors"):
        build_index(database=city / "ds", out=tmp_path / "x", config=load_config(TINY_CONFIG, [
            "index.descriptor=second", *SECOND]), progress=False, descriptors=tmp_path / "d.npz")
    with pytest.raises(ConfigError, match="descriptor"):
        load_config(TINY_CONFIG, ["index.descriptor=both"])
    with pytest.raises(ConfigError, match="val-queries"):
        build_index(database=city / "ds", out=tmp_path / "x", config=load_config(TINY_CONFIG, [
            "train.select_subcenters=1,2", "train.val_fraction=0"]), progress=False)


def test_layout_vectors_are_unit_and_keep_the_two_cosines():
    rng = np.random.default_rng(0)
    lay = DescriptorLayout("pooled", 4, 6)
    u, p = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (rng.normal(size=(3, 4)), rng.normal(size=(5, 4))))
    v, r = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (rng.normal(size=(3, 6)), rng.normal(size=(7, 6))))
    q, P, R = lay.queries(u, v), lay.prototypes(p), lay.database(r)
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose((q @ P.T) * lay.score_scale, u @ p.T, atol=1e-6)
    np.testing.assert_allclose((q @ R.T) * lay.score_scale, v @ r.T, atol=1e-6)
    w = rng.normal(size=(4, 6)).astype(np.float32)
    assert lay.projection(w).shape == (10, 6) and np.array_equal(lay.projection(w)[4:], np.eye(6))
    same = DescriptorLayout("projected", 4, 0)
    assert same.dim == 4 and same.score_scale == 1 and np.array_equal(same.queries(u, None), u.astype(np.float32))
    with pytest.raises(BundleError, match="rebuild"):
        DescriptorLayout.from_manifest({"descriptor_dim": 9, "stats": {"descriptor": lay.to_json()}})


def test_a_sharded_pooled_bundle_answers_like_the_unsharded_one(bundles, city):
    cfg = load_config(TINY_CONFIG, [*COMMON, "index.descriptor=pooled", "index.shards=2"])
    rep = build_index(database=city / "ds", out=city / "pooled-sharded", config=cfg, progress=False,
                      val_queries=city / "val")
    imgs = _queries(city)
    one, two = Localizer.load(bundles["pooled"]), Localizer.load(rep.out)
    for mode in ("classify", "retrieve", "hybrid"):
        a, b = one.localize(imgs, mode=mode), two.localize(imgs, mode=mode)
        assert [p.candidate_ids for p in a] == [p.candidate_ids for p in b], mode
        np.testing.assert_allclose([p.candidate_scores for p in a], [p.candidate_scores for p in b], atol=1e-5)


def test_calibration_query_cache_belongs_to_its_bundle(bundles, tmp_path):
    """``benchmarks/latency.py --bundle`` caches the encoded query photos; a cache written for
    another bundle (e.g. the demo before a rebuild) is encoded anew, never silently reused."""
    from geoloc.bench.calibration import bundle_queries

    a, b = read_bundle(bundles["projected"]), read_bundle(bundles["pooled"])
    rec = a.records
    rows = [f"{rec.paths[i]},{rec.east[i]},{rec.north[i]}" for i in range(4)]
    qcsv = Path(rec.root) / "queries.csv"
    qcsv.write_text("path,east,north\n" + "\n".join(rows) + "\n")
    try:
        cache = tmp_path / "q.npz"
        first = bundle_queries(bundles["projected"], cache=cache)
        again = bundle_queries(bundles["projected"], cache=cache)
        assert "cached" in again["source"] and np.array_equal(again["xq"], first["xq"])
        other = bundle_queries(bundles["pooled"], cache=cache)  # same photos, another bundle
        assert "cached" not in other["source"]
        assert other["xq"].shape[1] == b.index.dim != first["xq"].shape[1]
        assert "cached" in bundle_queries(bundles["pooled"], cache=cache)["source"]
    finally:
        qcsv.unlink()
