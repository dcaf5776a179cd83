"""One typed configuration for the whole engine; YAML is its file form.

Precedence, lowest first: dataclass defaults, the YAML file (``--config``: a path, or the bare
name of a packaged preset in ``geoloc/configs/``: ``demo``, ``lund``, ...), CLI flags, then
``--set section.key=value`` overrides. Every value is checked when it is set, before any work:

* unknown sections and keys are errors (a typo never silently falls back to a default);
* each key declares its check in its field (:func:`setting` with a :class:`Choice`,
  :class:`Range` or :class:`Text`), so adding a key is one line, e.g.
  ``fusion_weight: float = setting(0.5, Range(0, 1), runtime=True)``;
* a failure is one :class:`~geoloc.errors.ConfigError` line naming the source, the key, the
  value and what is allowed.

``runtime=True`` marks the keys that can still change once a bundle is built (``geoloc query``
and ``geoloc eval`` refuse the others: see :func:`build_time_keys`).

The YAML reader only opens regular files of at most :data:`MAX_CONFIG_BYTES`, refuses binary
files, and refuses a key given twice in one mapping (PyYAML would keep the last one silently).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence, get_type_hints

import yaml

from geoloc.errors import ConfigError, GeolocError, one_line

MODES: tuple[str, ...] = ("classify", "retrieve", "hybrid")
"""The query modes, in this order everywhere (the one definition; others import it from here)."""

QUANTIZERS: tuple[str, ...] = ("flat", "lsh", "hnsw", "sq8", "pqfs", "twolevel", "auto")
"""``index.quantizer``: how cells are scored at query time."""

GROUP_SCHEDULES: tuple[str, ...] = ("step", "epoch")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")

PRESET_DIR = Path(__file__).resolve().parent / "configs"
"""The packaged presets (shipped as package data): ``--config NAME`` loads ``NAME.yaml`` here."""

MAX_CONFIG_BYTES = 1 << 20
"""Largest config file read (1 MiB); a config is a few hundred bytes."""


# -- declarative checks -------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """A closed set of strings (plus, optionally, strings matching ``pattern``, e.g. ``cuda:N``)."""

    options: tuple[str, ...]
    pattern: str | None = None
    pattern_doc: str = ""

    def __call__(self, value: str) -> str:
        if value in self.options or (self.pattern and re.fullmatch(self.pattern, value)):
            return value
        raise ValueError(self.describe())

    def describe(self, kind: type = str) -> str:
        extra = [self.pattern_doc] if self.pattern else []
        return "one of " + ", ".join(list(self.options) + extra)


@dataclass(frozen=True)
class Range:
    """A finite number in ``[lo, hi]`` (``lo_open``: ``lo`` itself excluded)."""

    lo: float
    hi: float
    lo_open: bool = False

    def __call__(self, value: float) -> float:
        ok = math.isfinite(value) and (value > self.lo if self.lo_open else value >= self.lo) and value <= self.hi
        if not ok:
            raise ValueError(self.describe())
        return value

    def describe(self, kind: type = float) -> str:
        if kind is int:
            return f"an integer from {_num(self.lo)} to {_num(self.hi)}"
        lo = f"> {_num(self.lo)}" if self.lo_open else f">= {_num(self.lo)}"
        return f"a finite number {lo} and <= {_num(self.hi)}"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


@dataclass(frozen=True)
class Text:
    """One line of text: non-empty unless ``empty_ok``; matching ``pattern`` when given
    (the empty string always passes when ``empty_ok``)."""

    empty_ok: bool = False
    max_len: int = 4096
    pattern: str | None = None
    pattern_doc: str = ""

    def __call__(self, value: str) -> str:
        value = value.strip()
        if not value:
            if self.empty_ok:
                return value
            raise ValueError("a non-empty name")
        if len(value) > self.max_len or any(ord(c) < 32 or ord(c) == 127 for c in value):
            raise ValueError(f"one line of at most {self.max_len} printable characters")
        if self.pattern and not re.fullmatch(self.pattern, value):
            raise ValueError(self.describe())
        return value

    def describe(self, kind: type = str) -> str:
        what = self.pattern_doc or f"text of at most {self.max_len} characters"
        return f"{what} (or empty)" if self.empty_ok else what


@dataclass(frozen=True)
class Parsed:
    """One line of text (or empty) that the parser ``target`` (``"module:function"``, imported
    only when a value is checked) accepts; the value is kept as written, stripped."""

    target: str
    doc: str

    def __call__(self, value: str) -> str:
        value = Text(empty_ok=True, max_len=64)(value)
        if value:
            module, _, name = self.target.partition(":")
            parse = getattr(importlib.import_module(module), name)
            try:
                parse(value)
            except GeolocError:
                raise ValueError(self.describe()) from None
        return value

    def describe(self, kind: type = str) -> str:
        return f"{self.doc} (or empty)"


def setting(default: Any, check: Choice | Range | Text | Parsed | None = None, *, runtime: bool = False) -> Any:
    """A config field: its default, its check, and whether it may change after the build."""
    return field(default=default, metadata={"check": check, "runtime": runtime})


class _Section:
    """Base of the config sections. Values are checked when set through :class:`Config`
    (files, flags, ``--set``, :meth:`Config.set`); a section built directly in code, e.g.
    ``IndexConfig(quantizer="flat")``, is checked by :meth:`check`."""

    _name = ""

    def check(self, *, source: str = "") -> "_Section":
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            setattr(self, f.name, check_value(self, f.name, getattr(self, f.name), source=source or type(self).__name__))
        return self


# -- the sections -------------------------------------------------------------------------------
@dataclass
class BackboneConfig(_Section):
    _name = "backbone"
    name: str = setting("efficientnet_lite0", Text())
    """Registry name (efficientnet_lite0, dinov2_vits14, dinov2_vitb14) or timm:<model_name>."""
    weights: str = setting("default", Text())
    """'default' (the backbone's own source: hub or packaged file), 'random', or a local file path."""
    image_size: int = setting(0, Range(0, 4096))
    """Square input side in pixels; 0 = the backbone's own default. ViT sides must be multiples of 14."""
    resize: str = setting("crop", Choice(("crop", "keep_aspect")))
    """'crop' (timm's centre crop) or 'keep_aspect' (letterbox: long side to image_size, padded with the mean)."""
    batch_size: int = setting(32, Range(1, 4096), runtime=True)
    num_workers: int = setting(2, Range(0, 256), runtime=True)
    cache_chunk: int = setting(1024, Range(1, 1_000_000))
    """Images per feature-cache chunk: the unit a killed build resumes from."""
    device: str = setting("auto", Choice(DEVICES, r"cuda:[0-9]{1,2}", "cuda:N"), runtime=True)
    """'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'."""
    engine: str = setting("local", Choice(("local", "ray")), runtime=True)
    """Where extraction runs: 'local', or 'ray' (Ray Data actors; pip install -e ".[cpu,ray]")."""
    workers: int = setting(0, Range(0, 4096), runtime=True)
    """Ray actors for engine 'ray'; 0 = one per CPU of the cluster (one per GPU on CUDA)."""
    ray_address: str = setting("", Text(empty_ok=True), runtime=True)
    """Ray cluster to join: 'auto', 'HOST:PORT', or '' to start a local one."""
    threads_per_worker: int = setting(0, Range(0, 256), runtime=True)
    """Torch threads per Ray actor; 0 = this process's count (CPU features equal the local path's bit for bit)."""


@dataclass
class CellConfig(_Section):
    _name = "cells"
    size_m: float = setting(20.0, Range(1, 100_000))
    """Side M of a square UTM cell, metres (cell keys need M >= 1 m)."""
    groups: int = setting(2, Range(1, 16))
    """N: cells are split into N x N groups by (p mod N, q mod N)."""
    min_images_per_cell: int = setting(10, Range(1, 1_000_000))


@dataclass
class HeadConfig(_Section):
    _name = "head"
    dim: int = setting(256, Range(0, 8192))
    """Descriptor dimension after the projection; 0 keeps the backbone's feature size."""
    scale: float = setting(100.0, Range(0, 1000, lo_open=True))
    """AAMC scale s."""
    margin: float = setting(0.2, Range(0, 1.5))
    """Additive angular margin m, radians (AAMC), or additive cosine margin (CosFace)."""
    subcenters: int = setting(4, Range(1, 64))
    """K prototypes (sub-centres) per cell; a cell scores its best one."""
    kind: str = setting("aamc", Choice(("aamc", "cosface")))
    """Margin loss: 'aamc' (ArcFace: s cos(theta + m)) or 'cosface' (LMCC: s (cos theta - m))."""
    subcenter_init: str = setting("heading", Choice(("heading", "random")))
    """How sub-centres start: class means per heading bin (random images where headings are unknown), or random images."""


@dataclass
class TrainConfig(_Section):
    _name = "train"
    epochs: int = setting(20, Range(0, 10_000))
    batch_size: int = setting(256, Range(1, 1_000_000))
    lr: float = setting(1e-3, Range(0, 10))
    lr_projection: float = setting(1e-4, Range(0, 10))
    train_projection: bool = setting(True)
    group_schedule: str = setting("step", Choice(GROUP_SCHEDULES))
    """'step': one group per step, cycling; 'epoch': one group per epoch."""
    val_fraction: float = setting(0.1, Range(0, 0.9))
    seed: int = setting(0, Range(0, 2**32 - 1))
    finetune_blocks: int = setting(0, Range(0, 1000))
    """K > 0 also trains the last K backbone blocks on images (slow; needs the images)."""
    finetune_epochs: int = setting(1, Range(0, 10_000))
    lr_backbone: float = setting(1e-5, Range(0, 10))
    sampler: str = setting("balanced", Choice(("balanced", "uniform")))
    """'balanced': a cell, then one of its images (Divide&Classify); 'uniform': images directly."""
    schedule: str = setting("constant", Choice(("constant", "cosine")))
    """Learning-rate schedule: 'constant', or 'cosine' (linear warm-up, then cosine decay)."""
    warmup_fraction: float = setting(0.05, Range(0, 0.95))
    """Share of the steps spent warming up (schedule 'cosine')."""
    select_epoch: bool = setting(False)
    """Keep the epoch with the best held-out LR@1 (always done with --val-queries)."""
    augment_views: int = setting(1, Range(0, 16))
    """Augmented views per database image whose features join training (photometric + crop; extracted once, cached)."""
    select_fusion: bool = setting(True)
    """With --val-queries: choose query.fusion_weight on them at build time (stored in the bundle)."""
    select_subcenters: str = setting("", Text(empty_ok=True, max_len=64,
                                              pattern=r"(6[0-4]|[1-5][0-9]|[1-9])( *, *(6[0-4]|[1-5][0-9]|[1-9]))*",
                                              pattern_doc="comma-separated numbers of sub-centres 1-64, e.g. 1,2,4"))
    """Candidate K, e.g. '1,2,4': one head set is trained per K on the shared feature cache and the one with the
    best validation LR@1 (--val-queries, else the held-out split) is kept; empty: head.subcenters."""


@dataclass
class IndexConfig(_Section):
    """Cell scoring and list storage. The scoring keys apply at load time too (the quantizer is
    rebuilt from the stored prototypes when another kind is asked for), so they are ``runtime``;
    the storage keys (codec, pq_m, refine) are fixed by the build."""

    _name = "index"
    quantizer: str = setting("auto", Choice(QUANTIZERS), runtime=True)
    """How cells are scored at query time: 'flat' (exact scan), 'lsh' (binary-code shortlist re-ranked
    exactly), 'hnsw' (graph), 'sq8' / 'pqfs' (8-bit / 4-bit fast-scan codes shortlist re-ranked exactly),
    'twolevel' (coarse regions, then the prototypes of the best ones), 'auto' (the rule in
    geoloc.index.scorers.resolve_scorer_name)."""
    approx_min_cells: int = setting(10_000, Range(0, 1_000_000_000), runtime=True)
    """quantizer 'auto': the 'pqfs' scorer from this many prototypes (cells x prototypes per cell) on, 'flat' below."""
    lsh_bits: int = setting(0, Range(0, 65_536), runtime=True)
    """Bits per prototype code; 0 = max(256, descriptor dimension)."""
    lsh_k_factor: float = setting(16.0, Range(1, 1000), runtime=True)
    """The LSH shortlist holds lsh_k_factor * k cells, re-ranked by exact cosine."""
    hnsw_m: int = setting(32, Range(2, 256), runtime=True)
    hnsw_ef_search: int = setting(128, Range(1, 100_000), runtime=True)
    use_gpu: bool = setting(True, runtime=True)
    """Use a FAISS GPU index when faiss has GPU support and a GPU is present."""
    scorer_k_factor: float = setting(8.0, Range(1, 1000), runtime=True)
    """Scorers 'sq8' and 'pqfs': the codes shortlist scorer_k_factor * k prototypes, re-ranked by exact cosine."""
    pqfs_m: int = setting(0, Range(0, 4096), runtime=True)
    """Scorer 'pqfs': 4-bit sub-quantizers per prototype (lowered to a divisor of D); 0 = D / 2."""
    twolevel_regions: int = setting(0, Range(0, 1_000_000_000), runtime=True)
    """Scorer 'twolevel': coarse regions (k-means over the prototypes); 0 = 2 sqrt(P)."""
    twolevel_probe: int = setting(16, Range(1, 1_000_000), runtime=True)
    """Scorer 'twolevel': regions whose prototypes are scored exactly, per query."""
    codec: str = setting("flat", Choice(("flat", "sq8", "pq")))
    """Storage of the database vectors in the cell lists: 'flat' (float32, exact, 4 D bytes per vector),
    'sq8' (8-bit scalar quantizer, D bytes), 'pq' (product quantizer, pq_m bytes). Build time only."""
    pq_m: int = setting(0, Range(0, 4096))
    """codec 'pq': bytes per vector (sub-quantizers, lowered to a divisor of D); 0 = D / 4."""
    refine: str = setting("none", Choice(("none", "sq8", "flat")))
    """Compressed codecs: re-rank the best refine_k_factor * k candidates against a second store of the
    rows, 'flat' (float32: exact scores) or 'sq8'; 'none' keeps the codec's scores. Build time only."""
    refine_k_factor: float = setting(4.0, Range(1, 1000), runtime=True)
    """Candidates re-ranked per match wanted, with refine."""
    retrieve_blas_min_batch: int = setting(16, Range(1, 1_000_000), runtime=True)
    """Exact retrieve over flat lists: batches of at least this many queries score blocks of lists with BLAS;
    smaller ones scan every list with the hybrid kernel."""
    shards: int = setting(1, Range(1, 65_536))
    """Geographic shards of the lists, each its own FAISS file (cells in key order: UTM zone, then easting
    strips, cut into runs of about equal vector counts); 1 = one index.faiss. Build time only."""
    descriptor: str = setting("projected", Choice(("projected", "pooled", "second")))
    """What the lists hold for retrieval: 'projected' (the classifier's descriptor), 'pooled' (the backbone's
    pooled feature) or 'second' (a second backbone's pooled feature, index.second_backbone). Cells are always
    scored by the classifier's prototypes. Build time only."""
    second_backbone: str = setting("", Text(empty_ok=True))
    """descriptor 'second': its backbone, named like backbone.name (a registered name or timm:<model_name>)."""
    second_weights: str = setting("default", Text())
    """descriptor 'second': 'default', 'random' or a local file path, as backbone.weights."""
    second_image_size: int = setting(0, Range(0, 4096))
    """descriptor 'second': square input side; 0 = that backbone's own default."""
    mmap: bool = setting(True, runtime=True)
    """Sharded indexes: open the shard files memory-mapped (an index larger than memory still answers);
    false reads them into RAM."""


@dataclass
class QueryConfig(_Section):
    _name = "query"
    mode: str = setting("hybrid", Choice(MODES), runtime=True)
    top_cells: int = setting(5, Range(1, 10_000), runtime=True)
    neighbours: bool = setting(False, runtime=True)
    """Hybrid: also search the ring of 8 neighbours of each top cell."""
    top_matches: int = setting(10, Range(1, 1000), runtime=True)
    threshold_m: float = setting(25.0, Range(0, 25_000_000, lo_open=True), runtime=True)
    """eval: an answer within this many metres is correct."""
    fusion_weight: float = setting(0.5, Range(0, 10), runtime=True)
    """Hybrid: candidates ranked by cosine + fusion_weight x their cell's score (0: retrieval similarity alone)."""


@dataclass
class DataConfig(_Section):
    _name = "data"
    utm_zone: str = setting("", Parsed("geoloc.data:parse_utm_zone", "a UTM zone 1-60 with its latitude band "
                                       "letter C-X (10S) or hemisphere (32N, 56south)"), runtime=True)
    """Zone of images named with only ``@east@north@`` (no zone in the name), e.g. '10S'; '' = from the data."""


SECTIONS: dict[str, type] = {"backbone": BackboneConfig, "cells": CellConfig, "head": HeadConfig,
                             "train": TrainConfig, "index": IndexConfig, "query": QueryConfig, "data": DataConfig}


@dataclass
class Config:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    cells: CellConfig = field(default_factory=CellConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    data: DataConfig = field(default_factory=DataConfig)

    # -- conversions ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "config") -> "Config":
        cfg = cls()
        cfg.apply(flatten(data, source=source), source=source)
        return cfg

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Config":
        """Read a YAML file or a packaged preset by name (see :func:`resolve_config_path`)."""
        p = resolve_config_path(path)
        return cls.from_dict(read_yaml(p), source=_show(p))

    def get(self, key: str) -> Any:
        section, name = _split_key(key, source="config")
        return getattr(getattr(self, section), name)

    def set(self, key: str, value: Any, *, source: str = "--set") -> "Config":
        """Set one ``section.key`` to an already-typed (or textual) value, checked."""
        section, name = _split_key(key, source=source)
        sec = getattr(self, section)
        setattr(sec, name, check_value(sec, name, value, source=source))
        return self

    def apply(self, pairs: Iterable[tuple[str, Any]], *, source: str) -> "Config":
        for key, value in pairs:
            self.set(key, value, source=source)
        return self

    def apply_overrides(self, overrides: Iterable["Override"]) -> "Config":
        """Set each :class:`Override` in order, checked, errors naming its source."""
        for o in overrides:
            self.set(o.key, o.value, source=o.source)
        return self

    def override(self, assignments: Sequence[str]) -> "Config":
        """Apply ``section.key=value`` strings in place (values parsed for the key's type)."""
        for key, value in parse_sets(assignments):
            self.set(key, value, source="--set")
        return self

    def validate(self, *, source: str = "config") -> "Config":
        """Re-check every value (for configs changed by attribute assignment)."""
        for section in SECTIONS:
            getattr(self, section).check(source=source)
        return self

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file or preset (if any), then ``section.key=value`` overrides."""
    cfg = Config.from_yaml(path) if path else Config()
    return cfg.override(list(overrides))


class Override(NamedTuple):
    """One user-set value and where it came from (a file path, ``--set``, or a flag name)."""

    key: str
    value: Any
    source: str


def collect_overrides(path: str | Path | None = None, *, flags: dict[str, tuple[str, Any]] | None = None,
                      sets: Sequence[str] = ()) -> list[Override]:
    """The user's layers in precedence order: the file or preset, then the CLI flags
    (``{flag: (key, value)}``, None values skipped), then ``--set`` items. Nothing is checked
    against a :class:`Config` yet (see :meth:`Config.apply_overrides`), but names are."""
    layers: list[Override] = []
    if path:
        p = resolve_config_path(path)
        layers += [Override(k, v, _show(p)) for k, v in flatten(read_yaml(p), source=_show(p))]
    for flag, (key, value) in (flags or {}).items():
        if value is not None:
            layers.append(Override(key, value, flag))
    layers += [Override(k, v, "--set") for k, v in parse_sets(sets)]
    return layers


# -- keys -----------------------------------------------------------------------------------------
def all_keys() -> dict[str, dataclasses.Field]:
    """Every ``section.key`` -> its dataclass field (metadata: ``check``, ``runtime``)."""
    return {f"{s}.{f.name}": f for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}


def build_time_keys(keys: Iterable[str]) -> list[str]:
    """Those of ``keys`` that are fixed once a bundle is built (not ``runtime``)."""
    fields = all_keys()
    return [k for k in keys if k in fields and not fields[k].metadata.get("runtime")]


def runtime_keys() -> list[str]:
    return [k for k, f in all_keys().items() if f.metadata.get("runtime")]


def _split_key(key: str, *, source: str) -> tuple[str, str]:
    section, dot, name = str(key).strip().partition(".")
    if not dot:
        raise ConfigError(f"{source}: {one_line(key)!r} is not a section.key name, e.g. cells.size_m")
    if section not in SECTIONS:
        raise ConfigError(f"{source}: unknown config section {one_line(section)!r}; known sections: "
                          f"{', '.join(SECTIONS)}")
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if name not in names:
        raise ConfigError(f"{source}: unknown config key {one_line(section + '.' + name)!r}; "
                          f"known keys here: {', '.join(sorted(names))}")
    return section, name


def check_value(section: Any, name: str, value: Any, *, source: str) -> Any:
    """Coerce ``value`` to the type of ``section.name`` and run the field's check.

    Raises:
        ConfigError: ``<source>: <section.key> = <value>: expected <what is allowed>``.
    """
    f, hint = _field_info(type(section))[name]
    key = f"{section._name}.{name}"
    check = f.metadata.get("check")
    try:
        typed = _coerce(value, hint)
        return check(typed) if check is not None else typed
    except (TypeError, ValueError, OverflowError) as err:
        if isinstance(check, (Text, Parsed)):
            want = (str(err) or check.describe()) if isinstance(value, str) else _type_name(hint)
        else:
            want = check.describe(hint) if check is not None else _type_name(hint)
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ConfigError(f"{source}: {key} = {one_line(shown)}: expected {want}") from None


@functools.lru_cache(maxsize=None)
def _field_info(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _type_name(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(hint, str(hint))


def _coerce(value: Any, hint: Any) -> Any:
    """YAML or CLI value -> the field's type; ValueError/TypeError when it cannot be."""
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise ValueError
    if hint is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            if not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(value, str):
            text = value.strip()
            try:
                return int(text)
            except ValueError:
                return _coerce(float(text), int)
        raise TypeError
    if hint is float:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        raise TypeError
    if hint is str:
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        raise TypeError
    return value


_BOOL_WORDS = {"true": True, "false": False, "yes": True, "no": False, "on": True, "off": False, "1": True, "0": False}


# -- YAML and --set parsing ---------------------------------------------------------------------
def flatten(data: Any, *, source: str) -> list[tuple[str, Any]]:
    """``{section: {key: value}}`` -> ``[("section.key", value), ...]``, refusing unknown names."""
    if data is None:
        return []
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}) at the top level")
    pairs = []
    for section, body in data.items():
        if not isinstance(section, str) or section not in SECTIONS:
            raise ConfigError(f"{source}: unknown config section {one_line(repr(section))}; known sections: "
                              f"{', '.join(SECTIONS)}")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping of keys, got {one_line(repr(body))[:60]}")
        for name, value in body.items():
            key = f"{section}.{name}"
            _split_key(key, source=source)
            if isinstance(value, (dict, list)):
                raise ConfigError(f"{source}: {key} must be a single value, got a {type(value).__name__}")
            pairs.append((key, value))
    return pairs


def parse_sets(assignments: Sequence[str]) -> list[tuple[str, Any]]:
    """``["section.key=value", ...]`` -> ``[(key, value)]``; values parsed for the key's type
    (text keys take the text as written; others are read as YAML scalars: ``true``, ``1e-3``)."""
    pairs = []
    for item in assignments:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or "." not in key:
            raise ConfigError(f"--set {one_line(repr(item))}: expected section.key=value, e.g. --set cells.size_m=25")
        _split_key(key, source="--set")
        section, name = key.split(".", 1)
        if _field_info(SECTIONS[section])[name][1] is str:
            value: Any = raw.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
        else:
            try:
                value = yaml.load(raw, Loader=_StrictLoader) if raw.strip() else raw
            except (yaml.YAMLError, ValueError, RecursionError, _DuplicateKey):
                value = raw
            if isinstance(value, (dict, list)) or value is None:
                value = raw
        pairs.append((key, value))
    return pairs


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int) -> None:
        super().__init__(key)
        self.key, self.first, self.second = key, first, second


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (any level)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            continue  # construct_mapping below reports unhashable keys
        line = key_node.start_mark.line + 1
        if key in seen:
            raise _DuplicateKey(key, seen[key], line)
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: Path) -> Any:
    """Parse a config file read by :func:`read_config_text`; one ConfigError line on any problem."""
    text = read_config_text(path)
    where = _show(path)
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as dup:
        raise ConfigError(f"{where}: key {one_line(repr(dup.key))} is given twice (lines {dup.first} and {dup.second}); "
                          "keep one of them") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"{where}: invalid YAML{at} ({one_line(str(problem))}); fix the file or start from "
                          "the preset 'default' (geoloc/configs/default.yaml)") from None
    except (ValueError, TypeError, RecursionError) as err:
        raise ConfigError(f"{where}: invalid YAML ({type(err).__name__}: {one_line(str(err))[:120]})") from None


def read_config_text(path: Path) -> str:
    """The text of a config file: regular files only (no folder, FIFO, device), at most
    :data:`MAX_CONFIG_BYTES`, UTF-8 without NUL bytes. Never blocks on a FIFO."""
    where = _show(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{where}: config file not found; pass a YAML file or a preset name "
                          f"({', '.join(list_presets())})") from None
    except OSError as err:
        raise ConfigError(f"{where}: config file cannot be read ({err.strerror}); check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{where}: is a folder, not a config file; pass a YAML file or a preset name "
                          f"({', '.join(list_presets())})")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{where}: not a regular file (a FIFO, device or socket); pass a YAML file")
    if st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: {st.st_size} bytes is too large for a config file (at most "
                          f"{MAX_CONFIG_BYTES} bytes); pass the YAML config, not a data file")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # replaced between stat and open
                raise ConfigError(f"{where}: not a regular file; pass a YAML file")
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read(MAX_CONFIG_BYTES + 1)
        finally:
            os.close(fd)
    except OSError as err:
        raise ConfigError(f"{where}: config file cannot be read ({err.strerror}); check its permissions") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_CONFIG_BYTES} bytes; pass the YAML config, not a data file")
    if b"\x00" in data:
        raise ConfigError(f"{where}: a binary file, not a YAML config; pass a YAML file or a preset name")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not UTF-8 text (a binary file?); pass a YAML config file") from None


# -- presets ---------------------------------------------------------------------------------------
def list_presets() -> list[str]:
    """Names of the packaged presets (``geoloc/configs/*.yaml``), sorted."""
    try:
        return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    except OSError:
        return []


def resolve_config_path(value: str | Path) -> Path:
    """``--config`` value -> a file path: an existing regular file as given; otherwise a bare
    name (``demo`` or ``demo.yaml``, no folder) of a packaged preset; otherwise the path as
    given (so that reading it reports what is wrong with it)."""
    text = str(value)
    path = Path(text)
    if path.is_file():
        return path
    bare = "/" not in text and os.sep not in text and path.suffix in ("", ".yaml", ".yml")
    if bare and text and (PRESET_DIR / f"{path.stem}.yaml").is_file():
        return PRESET_DIR / f"{path.stem}.yaml"
    if bare and not os.path.lexists(path):
        raise ConfigError(f"{one_line(text)}: no such config file or preset; presets: {', '.join(list_presets())}")
    return path


def _show(path: str | Path) -> str:
    return one_line(str(path))
