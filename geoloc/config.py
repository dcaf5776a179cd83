"""One typed configuration for the whole engine; YAML is its file form.

Presets live in ``configs/``. Precedence, lowest first: dataclass defaults, the YAML file,
CLI flags, then ``--set section.key=value`` overrides. Unknown keys are errors, so a typo in
a config never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from geoloc.errors import ConfigError


@dataclass
class BackboneConfig:
    name: str = "efficientnet_lite0"
    """Registry name: efficientnet_lite0, dinov2_vits14, dinov2_vitb14 (see geoloc.backbones)."""
    weights: str = "default"
    """'default' (the backbone's own source: hub or packaged file), 'random', or a local file path."""
    image_size: int = 0
    """Square input side in pixels; 0 = the backbone's own default. ViT sides must be multiples of 14."""
    batch_size: int = 32
    num_workers: int = 2
    cache_chunk: int = 1024
    """Images per feature-cache chunk: the unit a killed build resumes from."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""


@dataclass
class CellConfig:
    size_m: float = 20.0
    """Side M of a square UTM cell, metres."""
    groups: int = 2
    """N: cells are split into N x N groups by (p mod N, q mod N)."""
    min_images_per_cell: int = 10


@dataclass
class HeadConfig:
    dim: int = 256
    """Descriptor dimension after the projection; 0 keeps the backbone's feature size."""
    scale: float = 100.0
    """AAMC scale s."""
    margin: float = 0.2
    """AAMC additive angular margin m, radians."""


@dataclass
class TrainConfig:
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    lr_projection: float = 1e-4
    train_projection: bool = True
    group_schedule: str = "step"
    """'step': one group per step, cycling; 'epoch': one group per epoch."""
    val_fraction: float = 0.1
    seed: int = 0
    finetune_blocks: int = 0
    """K > 0 also trains the last K backbone blocks on images (slow; needs the images)."""
    finetune_epochs: int = 1
    lr_backbone: float = 1e-5


@dataclass
class IndexConfig:
    quantizer: str = "auto"
    """How cells are scored at query time: 'flat' (exact scan), 'lsh' (binary-code shortlist re-ranked
    exactly), 'hnsw' (graph), 'auto' (lsh from approx_min_cells cells on, flat below)."""
    approx_min_cells: int = 10_000
    lsh_bits: int = 0
    """Bits per prototype code; 0 = max(256, descriptor dimension)."""
    lsh_k_factor: float = 16.0
    """The LSH shortlist holds lsh_k_factor * k cells, re-ranked by exact cosine."""
    hnsw_m: int = 32
    hnsw_ef_search: int = 128
    use_gpu: bool = True
    """Use a FAISS GPU index when faiss has GPU support and a GPU is present."""


@dataclass
class QueryConfig:
    mode: str = "hybrid"
    top_cells: int = 5
    neighbours: bool = False
    """Hybrid: also search the ring of 8 neighbours of each top cell."""
    top_matches: int = 10
    threshold_m: float = 25.0


@dataclass
class Config:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    cells: CellConfig = field(default_factory=CellConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    query: QueryConfig = field(default_factory=QueryConfig)

    # -- conversions ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "Config":
        cfg = cls()
        _merge(cfg, data, source=source, prefix="")
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Config":
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found; pass an existing file to --config (presets are in configs/)") from None
        except yaml.YAMLError as err:
            line = getattr(getattr(err, "problem_mark", None), "line", None)
            where = f" at line {line + 1}" if line is not None else ""
            raise ConfigError(f"{path}: invalid YAML{where}; fix the file or start from configs/default.yaml") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections (backbone:, cells:, ...) at the top level")
        return cls.from_dict(data, source=str(path))

    def override(self, assignments: list[str] | tuple[str, ...]) -> "Config":
        """Apply ``section.key=value`` strings in place (values parsed as YAML scalars)."""
        for item in assignments:
            key, sep, raw = item.partition("=")
            if not sep or "." not in key:
                raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set cells.size_m=25")
            section, _, name = key.strip().partition(".")
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
            _merge(self, {section: {name: value}}, source="--set", prefix="")
        return self

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


def _merge(obj: Any, data: dict[str, Any], *, source: str, prefix: str) -> None:
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{source}: unknown config key {dotted!r}; known keys here: {', '.join(sorted(names))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted!r} must be a mapping, got {value!r}")
            _merge(current, value, source=source, prefix=dotted + ".")
            continue
        setattr(obj, key, _coerce(value, hints[key], dotted, source))


def _coerce(value: Any, hint: Any, dotted: str, source: str) -> Any:
    kind = hint if isinstance(hint, type) else None
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            raise ValueError
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{source}: {dotted!r} must be {kind.__name__ if kind else hint}, got {value!r}")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file (if any), then ``section.key=value`` overrides."""
    cfg = Config.from_yaml(path) if path else Config()
    return cfg.override(list(overrides))
