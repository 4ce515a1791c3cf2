"""Method parameters out of their range are recipe errors at parse time, before any output exists.

Ranges follow the references and mergekit: fractions (density, gamma, RegMean's alpha) lie in
[0, 1]; weights and lambda may have any sign but must be finite; WUDI's optimiser settings must
be positive. Valid edge values (density 0 and 1, negative weights) still merge.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from raymerge.engine.errors import RecipeError
from raymerge.engine.merge import merge
from raymerge.engine.methods import METHODS
from raymerge.engine.recipe import parse_recipe, resolve_for_tensor

from conftest import load_dir, recipe_text

# Per-model parameters every expert entry needs (besides the one under test).
_EXPERT_PARAMS = {
    "regmean": "grams: g.safetensors",
    "wudi": "",
    "actmat": "",
}


def _recipe(method: str, expert: str = "", shared: str = "") -> str:
    first = _EXPERT_PARAMS.get(method, "weight: 1.0")
    # The parameter under test replaces a default of the same name (YAML refuses repeated keys).
    kept = [item for item in first.split(", ") if item and f"{item.split(':')[0]}:" not in expert]
    second = ", ".join(x for x in (*kept, expert) if x)
    return (
        f"merge_method: {method}\nbase_model: b\nmodels:\n"
        f"  - model: e1\n    parameters: {{{first}}}\n"
        f"  - model: e2\n    parameters: {{{second}}}\n"
        f"parameters: {{{shared}}}\n"
    )


# method, where the value is set ("model" = second expert's entry, "top" = top-level), param,
# YAML value, allowed-range text, the value as the message shows it
BAD = [
    ("ties", "model", "density", "1.7", "in [0, 1]", "1.7"),
    ("ties", "model", "density", "-0.2", "in [0, 1]", "-0.2"),
    ("ties", "top", "density", "2", "in [0, 1]", "2"),
    ("ties", "model", "density", "[0.2, 1.5]", "in [0, 1]", "1.5"),
    ("ties", "model", "density", "[{filter: mlp, value: 3}, {value: 0.5}]", "in [0, 1]", "3"),
    ("ties", "model", "density", ".nan", "finite", "nan"),
    ("dare_ties", "model", "density", "1.01", "in [0, 1]", "1.01"),
    ("dare_linear", "top", "density", "-1", "in [0, 1]", "-1"),
    ("breadcrumbs", "model", "density", "1.5", "in [0, 1]", "1.5"),
    ("breadcrumbs", "model", "gamma", "2", "in [0, 1]", "2"),
    ("breadcrumbs_ties", "model", "gamma", "-0.1", "in [0, 1]", "-0.1"),
    ("ties", "model", "weight", ".nan", "a finite number", "nan"),
    ("ties", "model", "weight", "nan", "a finite number", "'nan'"),
    ("task_arithmetic", "model", "weight", ".inf", "a finite number", "inf"),
    ("linear", "model", "weight", "-.inf", "a finite number", "-inf"),
    ("task_arithmetic", "top", "lambda", ".inf", "a finite number", "inf"),
    ("consensus", "top", "tall_lambda", ".nan", "a finite number", "nan"),
    ("wudi", "top", "steps", "0", "an integer >= 1", "0"),
    ("wudi", "top", "steps", "-5", "an integer >= 1", "-5"),
    ("wudi", "top", "lr", "-0.001", "> 0", "-0.001"),
    ("wudi", "top", "lr", "0", "> 0", "0"),
    ("wudi", "top", "lr", ".nan", "> 0", "nan"),
    ("wudi", "top", "t", "-1", "> 0", "-1"),
    ("wudi", "top", "keep_fraction", "0", "in (0, 1]", "0"),
    ("wudi", "top", "keep_fraction", "1.5", "in (0, 1]", "1.5"),
    ("wudi", "top", "lambda", ".inf", "a finite number", "inf"),
    ("actmat", "top", "ridge", "-0.1", ">= 0", "-0.1"),
    ("actmat", "top", "rcond", ".nan", "a finite number", "nan"),
    ("regmean", "top", "alpha", "1.5", "in [0, 1]", "1.5"),
    ("regmean", "top", "alpha", "-0.5", "in [0, 1]", "-0.5"),
]


@pytest.mark.parametrize(("method", "where", "param", "value", "allowed", "shown"), BAD)
def test_out_of_range_value_names_method_parameter_value_range_and_entry(method, where, param, value, allowed, shown):
    text = _recipe(method, f"{param}: {value}", "") if where == "model" else _recipe(method, "", f"{param}: {value}")
    with pytest.raises(RecipeError) as err:
        parse_recipe(text)
    msg = str(err.value)
    assert f"parameter {param!r} of method {method!r}" in msg, msg
    assert allowed in msg and f"got {shown}" in msg, msg
    assert msg.startswith("models[1] (e2).parameters:" if where == "model" else "parameters:"), msg


def test_int_parameter_given_infinity_is_a_recipe_error():
    with pytest.raises(RecipeError, match="'steps' of method 'wudi' expects int"):
        parse_recipe(_recipe("wudi", "", "steps: .inf"))


@pytest.mark.parametrize(
    ("method", "expert", "shared"),
    [
        ("ties", "density: 0", ""),
        ("ties", "density: 1", ""),
        ("ties", "density: [0.0, 1.0], weight: -0.5", "lambda: -1"),
        ("breadcrumbs", "density: 1, gamma: 0", ""),
        ("breadcrumbs", "density: 0, gamma: 1", ""),
        ("dare_ties", "density: 0.0", "int8_mask: true"),
        ("task_arithmetic", "weight: -2.5", "lambda: -0.3"),
        ("linear", "weight: -1", "normalize: false"),
        ("consensus", "weight: -1", "k: 0, tall_lambda: 0, lambda: -1"),
        ("wudi", "", "steps: 1, lr: 1e-9, t: 1e-6, keep_fraction: 1, lambda: -1"),
        ("actmat", "", "ridge: 0, rcond: -1, lambda: -2"),
        ("regmean", "", "alpha: 0"),
        ("regmean", "", "alpha: 1"),
    ],
)
def test_edge_values_are_accepted(method, expert, shared):
    r = parse_recipe(_recipe(method, expert, shared))
    resolve_for_tensor(r, "model.layers.0.mlp.up_proj.weight", 2)


@pytest.mark.parametrize(
    "method,shared",
    [
        ("wudi", "steps: [100, 300]"),
        ("consensus", "k: [{filter: mlp, value: [1, 3]}, {value: 2}]"),
        ("ties", "normalize: [true, false]"),
    ],
)
def test_gradient_on_a_non_float_parameter_is_refused_when_read(method, shared):
    # A gradient interpolates; an int or bool parameter cannot take the values in between.
    with pytest.raises(RecipeError, match="gradient interpolates") as exc:
        parse_recipe(_recipe(method, "", shared))
    assert shared.split(":")[0] in str(exc.value)


def test_one_point_lists_and_conditionals_stay_valid_for_int_parameters():
    r = parse_recipe(_recipe("wudi", "", "steps: [{filter: mlp, value: 100}, {value: 300}], lr: [1e-5, 2e-5]"))
    resolve_for_tensor(r, "model.layers.0.mlp.up_proj.weight", 2)


def test_every_default_lies_in_its_own_range():
    for spec in METHODS.values():
        for p in spec.params:
            if not p.required:
                assert p.accepts(p.default), (spec.name, p.name, p.default)


def test_mergekit_fractions_are_bounded_wherever_they_appear():
    for spec in METHODS.values():
        for name in ("density", "gamma"):
            p = spec.param(name)
            if p is not None:
                assert (p.low, p.high) == (0.0, 1.0), (spec.name, name)


def test_cli_refuses_out_of_range_density_before_writing(family, tmp_path):
    base, experts = family
    r = tmp_path / "r.yaml"
    r.write_text(
        recipe_text("ties", base, experts, None, [{"weight": 1}, {"weight": 1, "density": 1.7}, {"weight": 1}])
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "raymerge.cli", "run", str(r), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("raymerge: error:"), proc.stderr
    for needle in ("models[1]", str(experts[1]), "'density'", "'ties'", "[0, 1]", "1.7"):
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists()
    assert not any(p.name.startswith(out.name) for p in tmp_path.iterdir() if p != r)


def test_density_edges_and_negative_weights_merge(family, tmp_path):
    base, experts = family
    b = load_dir(base)
    xs = [load_dir(e) for e in experts]

    # density 0: every task vector trimmed away, the merge is the base itself
    merge(
        parse_recipe(recipe_text("ties", base, experts, {"density": 0.0}, [{"weight": 1}] * 3)),
        tmp_path / "d0",
        progress=False,
    )
    out = load_dir(tmp_path / "d0")
    assert all(torch.equal(out[k], b[k]) for k in b)

    # density 1 with a negative weight: nothing trimmed; TIES elects signs over w·δ
    pm = [{"weight": 1.0, "density": 1.0}, {"weight": -0.5, "density": 1.0}, {"weight": 0.7, "density": 1.0}]
    merge(parse_recipe(recipe_text("ties", base, experts, None, pm)), tmp_path / "d1", progress=False)
    out = load_dir(tmp_path / "d1")
    ws = [p["weight"] for p in pm]
    k = "model.layers.0.mlp.up_proj.weight"
    deltas = torch.stack([w * (x[k].double() - b[k].double()) for w, x in zip(ws, xs, strict=True)])
    sign = torch.where(deltas.sum(0) >= 0, 1.0, -1.0).double()
    agree = deltas.sign() == sign
    divisor = (agree.double() * torch.tensor(ws, dtype=torch.float64).view(-1, 1, 1)).sum(0)
    divisor[divisor == 0] = 1
    ref = b[k].double() + (deltas * agree).sum(0) / divisor
    assert (out[k].double() - ref).abs().max() < 1e-5

    # task arithmetic with negative weights and a negative lambda
    pm = [{"weight": -1.0}, {"weight": 0.5}, {"weight": -0.25}]
    merge(
        parse_recipe(recipe_text("task_arithmetic", base, experts, {"lambda": -0.5}, pm)),
        tmp_path / "ta",
        progress=False,
    )
    out = load_dir(tmp_path / "ta")
    ref = b[k].double() - 0.5 * sum(p["weight"] * (x[k].double() - b[k].double()) for p, x in zip(pm, xs, strict=True))
    assert (out[k].double() - ref).abs().max() < 1e-5
