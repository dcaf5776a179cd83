"""The config: every key checked when it is set, declared in one place; the strict YAML reader;
presets by name from any directory."""

from __future__ import annotations

import dataclasses
import math
import os
import threading

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from geoloc.config import (MAX_CONFIG_BYTES, MODES, PRESET_DIR, QUANTIZERS, SECTIONS, Config, Range, all_keys, build_time_keys,
                           collect_overrides, list_presets, load_config, parse_sets, runtime_keys)
from geoloc.errors import ConfigError, one_line


@pytest.mark.parametrize("item, key, allowed", [
    ("train.batch_size=0", "train.batch_size", "an integer from 1 to"),
    ("head.dim=-5", "head.dim", "an integer from 0 to"),
    ("head.scale=nan", "head.scale", "finite number > 0"),
    ("train.epochs=-1", "train.epochs", "an integer from 0 to"),
    ("train.val_fraction=1.5", "train.val_fraction", "<= 0.9"),
    ("train.group_schedule=bogus", "train.group_schedule", "one of step, epoch"),
    ("index.quantizer=bogus", "index.quantizer", "one of " + ", ".join(QUANTIZERS)),
    ("query.mode=sideways", "query.mode", "one of classify, retrieve, hybrid"),
    ("backbone.device=tpu", "backbone.device", "one of auto, cpu, cuda, cuda:N"),
    ("cells.size_m=inf", "cells.size_m", "finite number >= 1"),
    ("cells.size_m=1e300", "cells.size_m", "<= 100000"),
    ("cells.groups=100000", "cells.groups", "an integer from 1 to 16"),
    ("query.top_cells=1000000000", "query.top_cells", "an integer from 1 to"),
    ("query.threshold_m=-5", "query.threshold_m", "> 0"),
    ("query.neighbours=maybe", "query.neighbours", "true or false"),
    ("backbone.name=", "backbone.name", "non-empty"),
    ("data.utm_zone=61S", "data.utm_zone", "(10S)"),
    ("data.utm_zone=10I", "data.utm_zone", "(10S)"),
])
def test_bad_values_are_one_line_naming_key_value_and_range(item, key, allowed):
    with pytest.raises(ConfigError) as e:
        load_config(None, [item])
    msg = str(e.value)
    assert "\n" not in msg and key in msg and allowed in msg and item.split("=", 1)[1] in msg


def test_good_values_are_coerced_to_the_key_type():
    cfg = load_config(None, ["cells.size_m=25", "cells.groups=3.0", "query.neighbours=yes", "data.utm_zone=10s ",
                             "backbone.device=cuda:1", "backbone.weights=/w/0123.safetensors", "backbone.name=1e3"])
    assert cfg.cells.size_m == 25.0 and isinstance(cfg.cells.size_m, float)
    assert cfg.cells.groups == 3 and isinstance(cfg.cells.groups, int)
    assert cfg.query.neighbours is True and cfg.data.utm_zone == "10s" and cfg.backbone.device == "cuda:1"
    assert cfg.backbone.weights == "/w/0123.safetensors" and cfg.backbone.name == "1e3"  # text keys stay text


def test_sections_built_in_code_are_checked_on_demand():
    from geoloc.config import IndexConfig

    assert IndexConfig(quantizer="flat", lsh_k_factor=16).check().lsh_k_factor == 16.0
    with pytest.raises(ConfigError, match="index.quantizer = 'bogus'"):
        IndexConfig(quantizer="bogus").check()
    cfg = Config()
    cfg.train.epochs = -1  # attribute assignment is not checked until validate()
    with pytest.raises(ConfigError, match="train.epochs = -1"):
        cfg.validate()


def test_every_key_declares_its_check():
    """The declarative rule: each non-bool key has a Choice/Range/Text; numeric ones a bounded Range."""
    for key, f in all_keys().items():
        check = f.metadata.get("check")
        if f.type in ("bool", bool):
            continue
        assert check is not None, key
        if f.type in ("int", "float", int, float):
            assert isinstance(check, Range) and math.isfinite(check.hi), key


def test_one_definition_of_the_modes():
    assert MODES == ("classify", "retrieve", "hybrid")
    assert {f.name: f for f in dataclasses.fields(SECTIONS["query"])}["mode"].metadata["check"].options == MODES


def test_runtime_keys_are_the_ones_a_built_bundle_can_take():
    rt = set(runtime_keys())
    assert {"query.mode", "query.top_cells", "index.quantizer", "backbone.device", "data.utm_zone"} <= rt
    assert build_time_keys(["cells.size_m", "head.dim", "train.epochs", "backbone.name", "query.mode"]) == [
        "cells.size_m", "head.dim", "train.epochs", "backbone.name"]


def test_default_yaml_documents_every_key_with_its_default():
    assert load_config("default").to_dict() == Config().to_dict()
    documented = yaml.safe_load((PRESET_DIR / "default.yaml").read_text())
    assert {f"{s}.{k}" for s, body in documented.items() for k in body} == set(all_keys())


def test_every_preset_loads_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert {"default", "demo", "lund", "tiny"} <= set(list_presets())
    for name in list_presets():
        assert load_config(name).to_dict() == load_config(PRESET_DIR / f"{name}.yaml").to_dict()
        assert load_config(f"{name}.yaml").to_dict() == load_config(name).to_dict()
    (tmp_path / "demo").mkdir()  # a folder of the same name does not hide the preset
    assert load_config("demo").head.scale == 30.0
    with pytest.raises(ConfigError, match="no such config file or preset; presets: default"):
        load_config("nonesuch")


# -- the YAML reader -----------------------------------------------------------------------------
@pytest.mark.parametrize("text, needle", [
    ("cells:\n  size_m: 3\ncells:\n  groups: 2\n", "'cells' is given twice (lines 1 and 3)"),
    ("cells:\n  size_m: 30\n  size_m: 40\n", "'size_m' is given twice (lines 2 and 3)"),
    ("cells: [1, 2]\n", "must be a mapping"),
    ("- a\n- b\n", "expected a mapping of sections"),
    ("cells:\n  size_m: [1]\n", "must be a single value"),
    ("cells:\n  size_m: 'x\n", "invalid YAML"),
    ("cells:\n  size_m: !!python/object:os.system x\n", "invalid YAML"),
    ("cells:\n  size_m: " + "9" * 5000 + "\n", "invalid YAML"),
    ("[" * 5000 + "]" * 5000, "invalid YAML"),
    ("sells:\n  size_m: 3\n", "unknown config section 'sells'"),
])
def test_bad_files_are_one_line(tmp_path, text, needle):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert needle in str(e.value) and "\n" not in str(e.value) and str(f) in str(e.value)


def test_not_a_config_file_is_refused_without_reading_it(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "latin1.yaml").write_bytes("cells:\n  size_m: 3 # \xe9\n".encode("latin-1"))
    (tmp_path / "big.yaml").write_text("#" * (MAX_CONFIG_BYTES + 1))
    for name, needle in [("bin.yaml", "binary file"), ("latin1.yaml", "not UTF-8"), ("big.yaml", "too large"),
                         (".", "is a folder")]:
        with pytest.raises(ConfigError, match=needle):
            load_config(tmp_path / name)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_never_hangs(tmp_path):
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    result: list = []
    t = threading.Thread(target=lambda: result.append(pytest.raises(ConfigError, load_config, fifo)), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "reading a FIFO hung"
    assert "not a regular file" in str(result[0].value)


def test_layers_keep_their_precedence_and_sources(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("cells:\n  size_m: 30\n  groups: 3\n")
    layers = collect_overrides(f, flags={"--cell-size": ("cells.size_m", 40.0), "--groups": ("cells.groups", None)},
                               sets=["cells.size_m=50"])
    assert [(o.key, o.source) for o in layers] == [("cells.size_m", str(f)), ("cells.groups", str(f)),
                                                  ("cells.size_m", "--cell-size"), ("cells.size_m", "--set")]
    cfg = Config().apply_overrides(layers)
    assert (cfg.cells.size_m, cfg.cells.groups) == (50.0, 3)
    with pytest.raises(ConfigError, match=r"^--cell-size: cells.size_m = nan"):
        Config().apply_overrides(collect_overrides(flags={"--cell-size": ("cells.size_m", float("nan"))}))


def test_one_line_escapes_line_breaks():
    assert one_line("a\nb\tc") == "a\\nb\\tc" and one_line("plain") == "plain"
    with pytest.raises(ConfigError) as e:
        load_config("/no/such\ndir/c.yaml")
    assert "\n" not in str(e.value)


# -- property: any scalar for any key is a valid Config or one ConfigError line ---------------------
_KEYS = sorted(all_keys())
_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70), st.floats(),
                     st.text(max_size=20), st.sampled_from(["nan", "inf", "-inf", "1e400", ".nan", "0x10", "1_000",
                                                             "~", "!!binary AAAA", "[1", "{a: 1}", "10S", "cuda:0",
                                                             "'hybrid'", "2001-12-14", "&a [*a]", "yes", "..."]))


def _valid_or_config_error(fn) -> Config | None:
    try:
        cfg = fn()
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
        return None
    cfg.validate()  # what was accepted passes the checks again
    return cfg


@settings(max_examples=400, deadline=None)
@given(key=st.sampled_from(_KEYS), value=_scalars)
def test_any_set_of_any_key_is_a_config_or_a_config_error(key, value):
    _valid_or_config_error(lambda: load_config(None, [f"{key}={value}"]))
    _valid_or_config_error(lambda: Config().set(key, value))


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(_KEYS), value=_scalars, junk=st.text(max_size=30))
def test_any_yaml_value_is_a_config_or_a_config_error(tmp_path_factory, key, value, junk):
    section, name = key.split(".")
    f = tmp_path_factory.mktemp("y") / "c.yaml"
    f.write_text(yaml.safe_dump({section: {name: value}}) + junk, encoding="utf-8")
    _valid_or_config_error(lambda: load_config(f))


def test_parse_sets_reads_values_for_the_key_type():
    pairs = parse_sets(["query.mode=hybrid", "cells.groups=3", "backbone.weights='a b'", "cells.size_m=2.5e1"])
    assert pairs[:3] == [("query.mode", "hybrid"), ("cells.groups", 3), ("backbone.weights", "a b")]
    assert Config().apply(pairs, source="--set").cells.size_m == 25.0
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_sets(["cells"])


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=300) | st.text(max_size=200).map(str.encode))
def test_any_file_content_is_a_config_or_a_config_error(tmp_path_factory, data):
    f = tmp_path_factory.mktemp("b") / "c.yaml"
    f.write_bytes(data)
    _valid_or_config_error(lambda: load_config(f))
