"""Fuzzing the JSON and YAML inputs (issue 17): any bytes as ``config.json``, as an index, or as a
recipe end in a ``RaymergeError`` or a valid result — never another exception or a hang."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from raymerge.engine.errors import RaymergeError
from raymerge.engine.recipe import parse_recipe
from raymerge.engine.storage import clear_shard_cache, open_checkpoint

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=12,
)
_weight_maps = st.dictionaries(
    st.sampled_from(["w", "v", "x"]) | st.text(max_size=4),
    st.sampled_from(["model.safetensors", "other.safetensors", "../x", "", "a.bin"]) | _json,
    max_size=3,
)


@pytest.fixture
def model(tmp_path) -> Path:
    d = tmp_path / "m"
    d.mkdir()
    save_file({"w": torch.ones(2, 2), "v": torch.zeros(3)}, d / "model.safetensors")
    return d


def _open(d: Path, name: str, data: bytes) -> None:
    (d / name).write_bytes(data)
    clear_shard_cache()
    try:
        ckpt = open_checkpoint(str(d))
    except RaymergeError:
        return
    assert isinstance(ckpt.config, dict) and set(ckpt.entries) <= {"w", "v"}


@SETTINGS
@given(blob=st.binary(max_size=200))
def test_any_bytes_as_config(model, blob):
    _open(model, "config.json", blob)


@SETTINGS
@given(value=_json)
def test_any_json_as_config(model, value):
    _open(model, "config.json", json.dumps(value).encode())


@SETTINGS
@given(blob=st.binary(max_size=200))
def test_any_bytes_as_index(model, blob):
    _open(model, "model.safetensors.index.json", blob)


@SETTINGS
@given(weight_map=_weight_maps, extra=st.dictionaries(st.text(max_size=4), _json, max_size=2))
def test_any_weight_map(model, weight_map, extra):
    _open(model, "model.safetensors.index.json", json.dumps({**extra, "weight_map": weight_map}).encode())


def _parse(text: str) -> None:
    with contextlib.suppress(RaymergeError):
        parse_recipe(text, "fuzz.yaml")


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_any_text_as_recipe(text):
    _parse(text)


_keys = st.sampled_from(
    ["merge_method", "base_model", "models", "parameters", "raymerge", "slices", "dtype", "tokenizer_source", "x"]
)


@settings(max_examples=300, deadline=None)
@given(doc=st.dictionaries(_keys, _json | st.sampled_from(["ties", "linear", "slerp", "task_arithmetic"]), max_size=5))
def test_any_mapping_as_recipe(doc):
    _parse(json.dumps(doc))  # JSON is YAML


@settings(max_examples=200, deadline=None)
@given(
    method=st.sampled_from(["ties", "linear", "dare_ties", "slerp", "model_stock"]) | _json,
    models=st.lists(st.fixed_dictionaries({"model": st.text(max_size=4)}, optional={"parameters": _json}), max_size=3)
    | _json,
    params=_json,
    options=st.dictionaries(st.sampled_from(["exclude", "device", "seed", "chunk_bytes", "split_fused"]), _json),
)
def test_near_valid_recipes(method, models, params, options):
    doc = {"merge_method": method, "models": models, "parameters": params, "raymerge": options}
    _parse(json.dumps(doc))
