"""The shared table of example parameters (tests/method_examples.py) covers every method and is valid,
and the rows that carry a reference formula merge to it.

Cheap: no Ray, no mergekit; recipes are parsed with placeholder model paths, and only rows with a
``reference`` are merged (on the tiny test family).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raymerge.engine.merge import merge
from raymerge.engine.methods import METHODS
from raymerge.engine.recipe import parse_recipe

from conftest import load_dir
from method_examples import EXAMPLES, FALLBACKS

BASE = Path("/models/base")
EXPERTS = [Path(f"/models/expert{i}") for i in range(3)]


def test_every_registered_method_has_an_example():
    missing = set(METHODS) - FALLBACKS - {e.method for e in EXAMPLES}
    assert not missing, f"add a row for {sorted(missing)} to tests/method_examples.py (docs/adding-a-method.md)"


def test_example_names_are_unique():
    names = [e.name for e in EXAMPLES]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.name)
def test_example_is_a_valid_recipe(example):
    """Known method, known parameters in range, as many per-model entries as models, and a model
    count the method accepts: what the recipe layer checks before planning."""
    assert example.method in METHODS
    per_model = [{"grams": f"/grams/{i}.safetensors"} for i in range(3)] if example.inputs == "grams" else None
    recipe = parse_recipe(example.recipe(BASE, EXPERTS, per_model=per_model))
    assert recipe.merge_method == example.method
    listed = len(recipe.models) - (example.models == "pairwise")
    given = per_model if per_model is not None else example.per_model
    assert given is None or len(given) == listed


@pytest.mark.parametrize("example", [e for e in EXAMPLES if e.reference], ids=lambda e: e.name)
def test_example_matches_its_reference(example, family, tmp_path):
    """The whole pipeline (plan, tasks, fp32 compute, write) against the row's fp64 formula, per tensor."""
    base, experts = family
    out = tmp_path / "out"
    merge(parse_recipe(example.recipe(base, experts)), out, progress=False, workers=1)
    got, b = load_dir(out), load_dir(base)
    listed = example.recipe(base, experts).count("  - model: ")
    xs = [load_dir(e) for e in experts[: listed - (example.models == "pairwise")]]
    assert set(got) == set(b)
    for name, t in got.items():
        want = example.reference(b[name].double() if example.base else None, [x[name].double() for x in xs])
        err = (t.double() - want).abs().max().item()
        assert err <= 1e-6 * max(1.0, want.abs().max().item()), f"{example.name}: {name} off by {err:.3g}"
    assert any(not torch.equal(got[k], b[k]) for k in got)  # the merge moved away from the base
