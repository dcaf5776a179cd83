"""The classifier: AAMC logits against a hand computation, groups, training and resuming."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geoloc.cells import build_cells
from geoloc.config import Config
from geoloc.heads import AAMCHead, build_classifier
from geoloc.records import Records
from geoloc.train import split_holdout, train_classifier


def test_aamc_logits_equal_hand_computation():
    head = AAMCHead(dim=2, n_classes=3, scale=10.0, margin=0.3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0]]))  # normalised inside
    angle = 0.4
    emb = torch.tensor([[math.cos(angle), math.sin(angle)]])
    cos = [math.cos(angle), math.sin(angle), -(math.cos(angle) + math.sin(angle)) / math.sqrt(2)]
    # true class 0: s*cos(theta + m); others: s*cos(theta)
    expect = [10 * math.cos(angle + 0.3), 10 * cos[1], 10 * cos[2]]
    got = head(emb, torch.tensor([0]))[0].tolist()
    assert got == pytest.approx(expect, abs=1e-5)
    # true class 1 (theta = pi/2 - angle) and no-label inference logits
    got1 = head(emb, torch.tensor([1]))[0].tolist()
    assert got1 == pytest.approx([10 * cos[0], 10 * math.cos(math.pi / 2 - angle + 0.3), 10 * cos[2]], abs=1e-5)
    assert head(emb)[0].tolist() == pytest.approx([10 * c for c in cos], abs=1e-5)


def test_margin_is_clamped_at_pi():
    head = AAMCHead(dim=2, n_classes=2, scale=1.0, margin=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    emb = torch.tensor([[-1.0, 0.0]])  # theta_0 = pi: theta + m would wrap past pi
    assert head(emb, torch.tensor([0]))[0, 0].item() == pytest.approx(-1.0, abs=1e-4)


def _toy(n=1500, dim=64, noise=1.2, seed=0):
    rng = np.random.default_rng(seed)
    lat = 55.70 + rng.random(n) * 0.002
    lon = 13.19 + rng.random(n) * 0.003
    rec = Records.from_latlon([f"{i}.jpg" for i in range(n)], lat, lon)
    table, labels, filed = build_cells(rec, size_m=25, groups=2, min_images=5)
    centres = rng.normal(size=(len(table), dim)).astype(np.float32)
    feats = centres[filed] + noise * rng.normal(size=(n, dim)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return rec, table, labels, feats


def test_prototypes_stack_groups_in_cell_order():
    _, table, _, _ = _toy()
    model = build_classifier(in_dim=64, table=table, dim=16, scale=100, margin=0.2)
    protos = model.prototypes(table)
    assert protos.shape == (len(table), 16)
    for g, head in enumerate(model.heads):
        ids = table.group_cells(g)
        assert torch.allclose(protos[ids], torch.nn.functional.normalize(head.weight, dim=1))
    assert torch.allclose(protos.norm(dim=1), torch.ones(len(table)), atol=1e-5)


def test_holdout_keeps_every_cell_in_training():
    _, _, labels, _ = _toy()
    train, val = split_holdout(labels, fraction=0.2, seed=1)
    assert len(val) > 0 and not set(train) & set(val)
    assert set(labels[train]) == set(labels[labels >= 0])
    assert len(train) + len(val) == (labels >= 0).sum()


@pytest.mark.parametrize("schedule", ["step", "epoch"])
def test_training_lowers_loss_and_classifies(schedule, tmp_path):
    rec, table, labels, feats = _toy()
    cfg = Config()
    cfg.head.dim = 32
    cfg.head.scale = 30.0
    cfg.train.epochs = 6
    cfg.train.batch_size = 64
    cfg.train.lr = 1e-2
    cfg.train.group_schedule = schedule
    cfg.train.schedule = "constant"  # a schedule over a fixed number of epochs would not be resumed with more
    cfg.train.val_fraction = 0.2
    model, rep = train_classifier(features=feats, labels=labels, lat=rec.lat, lon=rec.lon, table=table, config=cfg,
                                  checkpoint_dir=tmp_path)
    losses = [h["loss"] for h in rep.history]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert rep.history[-1]["val_lr@1"] > 0.8
    # resume: asking for more epochs continues from the checkpoint instead of starting over
    cfg.train.epochs = 8
    _, rep2 = train_classifier(features=feats, labels=labels, lat=rec.lat, lon=rec.lon, table=table, config=cfg,
                               checkpoint_dir=tmp_path)
    assert rep2.resumed_from_epoch == 6 and len(rep2.history) == 8
    assert rep2.history[:6] == rep.history


def test_untrained_init_is_nearest_class_mean():
    rec, table, labels, feats = _toy(noise=0.3)
    model = build_classifier(in_dim=64, table=table, dim=0, scale=100, margin=0.2)
    rows = np.flatnonzero(labels >= 0)
    model.init_from_data(torch.from_numpy(feats[rows]), torch.from_numpy(labels[rows]), table)
    with torch.no_grad():
        pred = (model.embed(torch.from_numpy(feats[rows])) @ model.prototypes(table).T).argmax(1).numpy()
    assert (pred == labels[rows]).mean() > 0.95


def test_resumed_training_equals_uninterrupted(tmp_path):
    rec, table, labels, feats = _toy(n=600)
    cfg = Config()
    cfg.head.dim = 16
    cfg.train.schedule = "constant"  # so that asking for 4 epochs after 2 resumes (cosine keys epochs)
    cfg.train.epochs = 4
    full, _ = train_classifier(features=feats, labels=labels, lat=rec.lat, lon=rec.lon, table=table, config=cfg)
    cfg.train.epochs = 2
    train_classifier(features=feats, labels=labels, lat=rec.lat, lon=rec.lon, table=table, config=cfg,
                     checkpoint_dir=tmp_path)
    cfg.train.epochs = 4
    resumed, rep = train_classifier(features=feats, labels=labels, lat=rec.lat, lon=rec.lon, table=table, config=cfg,
                                    checkpoint_dir=tmp_path)
    assert rep.resumed_from_epoch == 2
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_cell_scores_do_not_depend_on_a_groups_weight_scale():
    """Groups are trained apart, so their weight norms differ; cosine scoring must ignore that."""
    rec, table, labels, feats = _toy(noise=0.6)
    model = build_classifier(in_dim=64, table=table, dim=0, scale=100, margin=0.2)
    rows = np.flatnonzero(labels >= 0)
    model.init_from_data(torch.from_numpy(feats[rows]), torch.from_numpy(labels[rows]), table)
    emb = model.embed(torch.from_numpy(feats))
    before = (emb @ model.prototypes(table).T).argmax(1)
    with torch.no_grad():
        model.heads[0].weight.mul_(25.0)  # one group's norms grow, as training can make them
    after = (emb @ model.prototypes(table).T).argmax(1)
    raw = (emb @ model.prototypes(table, normalized=False).T).argmax(1)
    assert torch.equal(before, after)
    assert (table.group[raw.numpy()] == 0).mean() > (table.group[before.numpy()] == 0).mean()  # raw scores drift
