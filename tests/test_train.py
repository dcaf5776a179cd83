"""The training recipe: sub-centres, heading seeding, balanced sampling, schedule, checkpoint keys,
bit-exact resume, epoch selection and the fusion-weight selection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geoloc.cells import build_cells
from geoloc.config import Config
from geoloc.errors import ConfigError
from geoloc.geo import geodesic_m
from geoloc.heads import MarginHead, build_classifier, heading_bins
from geoloc.records import Records
from geoloc.train import (Recipe, Validation, _GroupRows, lr_factor, select_fusion_weight, split_holdout,
                          subcenter_candidates, train_classifier, train_selecting_subcenters)


def _toy(n=800, dim=32, noise=0.8, seed=0):
    """Cells whose images look different per heading (4 headings): one mean per (cell, heading)."""
    rng = np.random.default_rng(seed)
    lat = 55.70 + rng.random(n) * 0.0015
    lon = 13.19 + rng.random(n) * 0.002
    heading = rng.integers(0, 4, n) * 90.0
    rec = Records.from_latlon([f"{i}.jpg" for i in range(n)], lat, lon, heading=heading)
    table, labels, filed = build_cells(rec, size_m=25, groups=2, min_images=4)
    centres = rng.normal(size=(len(table), 4, dim)).astype(np.float32)
    feats = centres[filed, (heading // 90).astype(int)] + noise * rng.normal(size=(n, dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return rec, table, labels, filed, feats


def _cfg(**over) -> Config:
    cfg = Config()
    cfg.head.dim = 16
    cfg.head.scale = 30.0
    cfg.train.epochs = 4
    cfg.train.batch_size = 64
    cfg.train.lr = 1e-2
    for dotted, value in over.items():
        section, name = dotted.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def _train(rec, table, labels, feats, cfg, **kw):
    return train_classifier(features=feats, labels=labels, lat=rec.lat, lon=rec.lon, table=table, config=cfg,
                            headings=rec.heading, **kw)


@pytest.mark.parametrize("kind", ["aamc", "cosface"])
def test_subcenter_logits_equal_hand_computation(kind):
    head = MarginHead(dim=2, n_classes=2, scale=10.0, margin=0.3, subcenters=2, kind=kind)
    a = 0.4
    with torch.no_grad():  # class 0: sub-centres at angles 0 and 1.2; class 1: at pi/2 and pi
        head.weight.copy_(torch.tensor([[1.0, 0.0], [math.cos(1.2), math.sin(1.2)], [0.0, 2.0], [-1.0, 0.0]]))
    emb = torch.tensor([[math.cos(a), math.sin(a)]])
    cos0 = max(math.cos(a), math.cos(1.2 - a))  # best sub-centre of class 0
    cos1 = max(math.cos(math.pi / 2 - a), math.cos(math.pi - a))
    assert head.cosine(emb)[0].tolist() == pytest.approx([cos0, cos1], abs=1e-6)
    target = math.cos(math.acos(cos0) + 0.3) if kind == "aamc" else cos0 - 0.3
    assert head(emb, torch.tensor([0]))[0].tolist() == pytest.approx([10 * target, 10 * cos1], abs=1e-5)


def test_prototypes_are_cell_major_with_their_cells():
    _, table, _, _, _ = _toy()
    model = build_classifier(in_dim=32, table=table, dim=8, scale=30, margin=0.2, subcenters=3)
    protos, cells = model.prototypes(table), model.prototype_cells(table)
    assert protos.shape == (3 * len(table), 8) and cells.shape == (3 * len(table),) and cells.dtype == np.int64
    assert np.array_equal(cells, np.repeat(np.arange(len(table)), 3))
    for g, head in enumerate(model.heads):
        for j, c in enumerate(table.group_cells(g)):
            assert torch.allclose(protos[3 * c : 3 * c + 3], torch.nn.functional.normalize(head.weight[3 * j : 3 * j + 3], dim=1))
    emb = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    best = (emb @ protos.T).view(5, len(table), 3).max(2).values
    assert torch.equal(model.cell_scores(emb, table), best)


def test_heading_bins():
    got = heading_bins(np.array([0.0, 44.0, 46.0, 90.0, 180.0, 270.0, 359.0, np.nan]), 4)
    assert got.tolist() == [0, 0, 1, 1, 2, 3, 0, -1]
    assert heading_bins(np.array([0.0, 90.0, 180.0, 270.0]), 2).tolist() == [0, 1, 1, 0]


def test_heading_seeded_subcenters_are_per_heading_means():
    rec, table, labels, _, feats = _toy(noise=0.3)
    model = build_classifier(in_dim=32, table=table, dim=0, scale=30, margin=0.2, subcenters=4)
    rows = np.flatnonzero(labels >= 0)
    model.init_from_data(torch.from_numpy(feats[rows]), torch.from_numpy(labels[rows]), table, headings=rec.heading[rows])
    protos = model.prototypes(table)
    c = int(labels[rows[0]])
    mine = rows[(labels[rows] == c) & (rec.heading[rows] == 90.0)]
    if len(mine):
        mean = torch.nn.functional.normalize(torch.from_numpy(feats[mine]).mean(0), dim=0)
        assert torch.allclose(protos[4 * c + 1], mean, atol=1e-2)
    # per-heading sub-centres classify the heading-structured toy better than class means
    one = build_classifier(in_dim=32, table=table, dim=0, scale=30, margin=0.2)
    one.init_from_data(torch.from_numpy(feats[rows]), torch.from_numpy(labels[rows]), table)
    x = torch.from_numpy(feats[rows])
    acc4 = (model.cell_scores(model.embed(x), table).argmax(1).numpy() == labels[rows]).mean()
    acc1 = (one.cell_scores(one.embed(x), table).argmax(1).numpy() == labels[rows]).mean()
    assert acc4 > acc1


def test_balanced_sampler_draws_cells_uniformly():
    _, table, labels, _, _ = _toy(n=2000)
    lab = labels[labels >= 0]
    lab = np.concatenate([lab, np.full(3000, lab[0])])  # one cell holds far more images
    g = int(table.group[lab[0]])
    rows = _GroupRows(lab, table, g)
    rng = np.random.default_rng(0)
    drawn = lab[np.concatenate([rows.draw(rng, 256, "balanced") for _ in range(40)])]
    share = (drawn == lab[0]).mean()
    n_cells = len(np.unique(lab[table.group[lab] == g]))
    assert share < 3.0 / n_cells  # uniform over cells, not over images
    assert (table.group[drawn] == g).all()
    uni = lab[rows.draw(rng, 256, "uniform")]
    assert (uni == lab[0]).mean() > 0.3


def test_lr_factor_warmup_and_cosine():
    assert lr_factor(5, 100, schedule="constant", warmup_fraction=0.1) == 1.0
    assert lr_factor(0, 100, schedule="cosine", warmup_fraction=0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, schedule="cosine", warmup_fraction=0.1) == pytest.approx(1.0)
    assert lr_factor(10, 100, schedule="cosine", warmup_fraction=0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, schedule="cosine", warmup_fraction=0.1) == pytest.approx(0.5)
    assert lr_factor(99, 100, schedule="cosine", warmup_fraction=0.1) < 0.01


def test_recipe_rejects_bad_settings():
    cfg = Config()
    cfg.train.sampler = "bogus"  # an attribute the config may not declare yet: read via getattr
    with pytest.raises(ConfigError, match="train.sampler"):
        Recipe.from_config(cfg)


def _recipe_cfg(**over):
    cfg = _cfg(**over)
    for k, v in {"subcenters": 2, "kind": "aamc"}.items():
        setattr(cfg.head, k, v)
    for k, v in {"sampler": "balanced", "schedule": "cosine", "select_epoch": True}.items():
        setattr(cfg.train, k, v)
    return cfg


def test_recipe_trains():
    rec, table, labels, _, feats = _toy()
    cfg = _recipe_cfg(train__epochs=6)
    model, rep = _train(rec, table, labels, feats, cfg)
    assert rep.history[-1]["loss"] < rep.history[0]["loss"]
    assert rep.history[-1]["val_lr@1"] > 0.4 and rep.validation == "holdout"  # chance: 1 / len(table) ~ 0.03
    assert model.prototypes(table).shape[0] == 2 * len(table)


def test_resumed_training_equals_uninterrupted_with_the_full_recipe(tmp_path):
    rec, table, labels, _, feats = _toy(n=500)
    aug = [feats + 0.01 * np.random.default_rng(1).normal(size=feats.shape).astype(np.float32)]
    cfg = _recipe_cfg()
    full, rep_full = _train(rec, table, labels, feats, cfg, augmented=aug)

    class Crash(Exception):
        pass

    def crash_at_epoch_3(msg):
        if msg.startswith("epoch 3/"):
            raise Crash

    with pytest.raises(Crash):
        _train(rec, table, labels, feats, cfg, augmented=aug, checkpoint_dir=tmp_path, log=crash_at_epoch_3)
    resumed, rep = _train(rec, table, labels, feats, cfg, augmented=aug, checkpoint_dir=tmp_path)
    assert rep.resumed_from_epoch == 2 and rep.best_epoch == rep_full.best_epoch
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_fewer_epochs_never_reuse_a_longer_run(tmp_path):
    """Issue 11: epochs 40 -> 2 reused the 40-epoch checkpoint. Under either schedule a shorter run
    must equal a fresh run of that length."""
    rec, table, labels, _, feats = _toy(n=500)
    for schedule in ("cosine", "constant"):
        cfg = _recipe_cfg(train__epochs=4)
        cfg.train.schedule = schedule
        _train(rec, table, labels, feats, cfg, checkpoint_dir=tmp_path / schedule)
        cfg.train.epochs = 2
        short, rep = _train(rec, table, labels, feats, cfg, checkpoint_dir=tmp_path / schedule)
        fresh, _ = _train(rec, table, labels, feats, cfg)
        assert rep.resumed_from_epoch == 0 and len(rep.history) == 2
        for a, b in zip(short.state_dict().values(), fresh.state_dict().values()):
            assert torch.equal(a, b)


def test_checkpoint_key_covers_features_and_augmented_views(tmp_path):
    rec, table, labels, _, feats = _toy(n=500)
    cfg = _recipe_cfg(train__epochs=2)
    cfg.train.schedule = "constant"
    _train(rec, table, labels, feats, cfg, checkpoint_dir=tmp_path)
    cfg.train.epochs = 3
    _, rep = _train(rec, table, labels, feats, cfg, checkpoint_dir=tmp_path, augmented=[feats[::-1].copy()])
    assert rep.resumed_from_epoch == 0
    other = feats.copy()
    other[0] = other[1]
    _, rep = _train(rec, table, labels, other, cfg, checkpoint_dir=tmp_path / "b")
    _, rep = _train(rec, table, labels, feats, cfg, checkpoint_dir=tmp_path / "b")
    assert rep.resumed_from_epoch == 0


def test_epoch_selection_on_validation_queries():
    rec, table, labels, filed, feats = _toy(n=600)
    rng = np.random.default_rng(3)
    pick = rng.choice(len(feats), 60, replace=False)
    val = Validation(features=feats[pick], lat=rec.lat[pick], lon=rec.lon[pick])
    cfg = _recipe_cfg(train__epochs=3)
    model, rep = _train(rec, table, labels, feats, cfg, validation=val)
    assert rep.validation == "queries" and rep.n_val == 60
    curve = [h["val_lr@1"] for h in rep.history]
    assert rep.best_epoch == max(range(1, 4), key=lambda e: (curve[e - 1], e))
    top = model.cell_scores(model.embed(torch.from_numpy(val.features)), table).argmax(1).numpy()
    got = (geodesic_m(val.lat, val.lon, table.lat[top], table.lon[top]) <= 25.0).mean()
    assert got == pytest.approx(curve[rep.best_epoch - 1])


def test_fusion_weight_zero_over_all_cells_is_retrieval():
    rec, table, labels, filed, feats = _toy(n=600)
    model, _ = _train(rec, table, labels, feats, _recipe_cfg(train__epochs=2))
    rng = np.random.default_rng(4)
    q = feats[:50] + 0.3 * rng.normal(size=(50, feats.shape[1])).astype(np.float32)
    val = Validation(features=q / np.linalg.norm(q, axis=1, keepdims=True), lat=rec.lat[:50], lon=rec.lon[:50])
    kw = dict(db_features=feats, filed=filed, db_lat=rec.lat, db_lon=rec.lon, validation=val, threshold_m=25.0)
    w, recall = select_fusion_weight(model, table, top_cells=len(table), neighbours=False, weights=(0.0,), **kw)
    with torch.no_grad():
        d = model.embed(torch.from_numpy(feats))
        best = (model.embed(torch.from_numpy(val.features)) @ d.T).argmax(1).numpy()
    expect = (geodesic_m(val.lat, val.lon, rec.lat[best], rec.lon[best]) <= 25.0).mean()
    assert w == 0.0 and recall[0.0] == pytest.approx(expect)
    w, recall = select_fusion_weight(model, table, top_cells=3, neighbours=True, **kw)
    assert w in recall and recall[w] == max(recall.values())
    assert all(recall[w] > recall[v] or v >= w for v in recall)  # ties go to the smaller weight


def test_a_full_disk_while_checkpointing_is_one_output_error_line(tmp_path, monkeypatch):
    """Issue 11: disk full during a build was a RuntimeError traceback from torch.save."""
    import errno

    from citydata import TINY_CONFIG, write_dataset
    from geoloc.build import build_index
    from geoloc.config import load_config
    from geoloc.errors import OutputError

    write_dataset(tmp_path / "ds", n_db=60, n_q=4)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("geoloc.train.torch.save", full)
    with pytest.raises(OutputError) as err:
        build_index(database=tmp_path / "ds", out=tmp_path / "idx", config=load_config(TINY_CONFIG), progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "optimizer-0001.pt" in msg and "no space left" in msg.lower()
    assert not (tmp_path / "idx").exists()


# -- K selected on validation (train.select_subcenters) ------------------------------------------------

def test_subcenter_candidates_parse_and_refuse():
    cfg = _cfg()
    assert subcenter_candidates(cfg) == []
    cfg.set("train.select_subcenters", "4, 1,2,4", source="t")
    assert subcenter_candidates(cfg) == [1, 2, 4]
    for bad in ("two", "0,2", "65", "1,,2"):  # refused when the config is read, before any work
        with pytest.raises(ConfigError, match="comma-separated numbers of sub-centres 1-64"):
            cfg.set("train.select_subcenters", bad, source="--set")
    assert subcenter_candidates(cfg) == [1, 2, 4]


def test_subcenters_selected_on_validation_queries(tmp_path):
    rec, table, labels, _, feats = _toy(n=600, noise=0.6)
    rng = np.random.default_rng(5)
    pick = rng.choice(len(feats), 80, replace=False)
    q = feats[pick] + 0.3 * rng.normal(size=(80, feats.shape[1])).astype(np.float32)
    val = Validation(features=q / np.linalg.norm(q, axis=1, keepdims=True), lat=rec.lat[pick], lon=rec.lon[pick])
    cfg = _recipe_cfg(train__epochs=3)
    args = dict(features=feats, labels=labels, lat=rec.lat, lon=rec.lon, table=table, headings=rec.heading,
                validation=val)
    model, rep = train_selecting_subcenters(candidates=[4, 1], config=cfg, checkpoint_dir=tmp_path, **args)
    assert sorted(rep.subcenter_val_lr1) == [1, 4] and set(rep.subcenter_seconds) == {1, 4}
    # each candidate's score is what training that K alone returns (same seed, same data)
    for k in (1, 4):
        alone = _recipe_cfg(train__epochs=3)
        alone.head.subcenters = k
        _, r = train_classifier(config=alone, **args)
        assert rep.subcenter_val_lr1[k] == pytest.approx(r.val_lr1)
    best = max(rep.subcenter_val_lr1.values())
    assert rep.subcenters == min(k for k, v in rep.subcenter_val_lr1.items() if v == best)  # ties: smaller K
    # the returned weights are the chosen K's, and their validation LR@1 is the recorded one
    assert model.prototypes(table).shape[0] == rep.subcenters * len(table) and rep.validation == "queries"
    top = model.cell_scores(model.embed(torch.from_numpy(val.features)), table).argmax(1).numpy()
    assert (geodesic_m(val.lat, val.lon, table.lat[top], table.lon[top]) <= 25.0).mean() == pytest.approx(rep.val_lr1)
    # heading-structured cells: 4 heading-seeded sub-centres beat one prototype here
    assert rep.subcenter_val_lr1[4] > rep.subcenter_val_lr1[1] and rep.subcenters == 4
    assert (tmp_path / "subcenters-1" / "train_state.json").is_file()
    assert (tmp_path / "subcenters-4" / "train_state.json").is_file()
    assert cfg.head.subcenters == 2  # the caller's config is left alone


def test_subcenter_selection_needs_validation_rows():
    rec, table, labels, _, feats = _toy(n=300)
    cfg = _recipe_cfg(train__epochs=1, train__val_fraction=0.0)
    with pytest.raises(ConfigError, match="val-queries"):
        train_selecting_subcenters(candidates=[1, 2], config=cfg, features=feats, labels=labels, lat=rec.lat,
                                   lon=rec.lon, table=table)
    # too few images for a held-out row: K stays head.subcenters (one training), no error
    few = np.full(len(labels), -1)
    few[np.flatnonzero(labels >= 0)[:1]] = labels[labels >= 0][0]
    cfg = _recipe_cfg(train__epochs=1, train__val_fraction=0.1)
    model, rep = train_selecting_subcenters(candidates=[1, 4], config=cfg, features=feats, labels=few, lat=rec.lat,
                                            lon=rec.lon, table=table)
    assert rep.subcenters == cfg.head.subcenters == 2 and rep.subcenter_val_lr1 == {} and rep.n_val == 0
