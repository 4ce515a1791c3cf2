"""Recipe parsing: mergekit schema, strictness with suggestions, parameter resolution."""

from __future__ import annotations

import pytest

from raymerge.engine.errors import RecipeError
from raymerge.engine.recipe import parse_recipe, resolve_for_tensor

BASE = "merge_method: ties\nbase_model: b\nmodels:\n  - model: e1\n    parameters: {weight: 1.0}\n  - model: e2\n    parameters: {weight: [0.0, 1.0]}\n"


@pytest.mark.parametrize(
    "text,match",
    [
        ("merge_methd: ties\nmodels: [a]\n", "did you mean 'merge_method'"),
        ("merge_method: tie\nbase_model: b\nmodels: [a]\n", "did you mean 'ties'"),
        (BASE + "parameters: {densty: 0.5}\n", "did you mean 'density'"),
        (BASE.replace("weight: 1.0", "weight: 1.0, normalize: true"), "shared parameter"),
        ("merge_method: ties\nmodels: [a]\n", "needs `base_model`"),
        ("merge_method: slerp\nbase_model: b\nmodels: [b, a, c]\nparameters: {t: 0.5}\n", "at most 1"),
        ("merge_method: linear\nmodels: [a, b]\n", "needs parameter 'weight'"),
        ("slices: []\nmerge_method: linear\n", "non-empty `slices`"),
        (
            "merge_method: ties\nbase_model: b\nmodels: [a]\nparameters: {weight: 1, density: {x: 1}}\n",
            "unknown key 'x'",
        ),
        ("- a\n- b\n", "mapping"),
        ("merge_method: [\n", "not valid YAML"),
        (BASE + "out_dtype: float12\n", "unknown dtype"),
        (BASE + "raymerge: {seeed: 1}\n", "did you mean 'seed'"),
    ],
)
def test_bad_recipes_name_the_problem(text, match):
    with pytest.raises(RecipeError, match=match):
        parse_recipe(text)


def test_gradient_filter_and_precedence():
    text = BASE + "parameters:\n  density: [{filter: mlp, value: [0.2, 0.6]}, {value: 0.9}]\n  lambda: 0.5\n"
    r = parse_recipe(text)
    p = resolve_for_tensor(r, "model.layers.2.mlp.up_proj.weight", num_layers=5)
    assert p.shared["lambda"] == 0.5 and p.shared["normalize"] is True  # default for ties
    assert p.per_model[0]["weight"] == 1.0
    assert p.per_model[1]["weight"] == pytest.approx(0.5)  # gradient at t = 2/4
    assert p.per_model[0]["density"] == pytest.approx(0.4)
    q = resolve_for_tensor(r, "model.layers.4.self_attn.q_proj.weight", num_layers=5)
    assert q.per_model[0]["density"] == 0.9 and q.per_model[1]["weight"] == 1.0
    e = resolve_for_tensor(r, "model.embed_tokens.weight", num_layers=5)
    assert e.per_model[1]["weight"] == 0.0  # non-layer tensors sit at t = 0, as in mergekit


def test_yaml_tags_that_build_python_objects_are_refused(tmp_path):
    """Recipes are safe-loaded: a python/object tag is an error, and nothing runs."""
    marker = tmp_path / "pwned"
    text = BASE + f"raymerge: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(RecipeError, match="not valid YAML"):
        parse_recipe(text)
    assert not marker.exists()


@pytest.mark.parametrize(
    "text,key",
    [
        ("merge_method: ties\nmerge_method: linear\nbase_model: b\nmodels: [{model: e}]\n", "merge_method"),
        (
            "merge_method: ties\nbase_model: b\nmodels:\n  - model: e\n    parameters: {weight: 1, weight: 2}\n",
            "weight",
        ),
        ("merge_method: ties\nbase_model: b\nmodels: [{model: e, model: f}]\n", "model"),
    ],
)
def test_duplicate_yaml_keys_are_refused(text, key):
    # PyYAML keeps the last of two equal keys; a recipe that says two things must not run one.
    with pytest.raises(RecipeError, match=f"duplicate key '{key}'") as exc:
        parse_recipe(text, "dup.yaml")
    assert "dup.yaml" in str(exc.value)


def test_a_parameter_only_other_methods_use_is_ignored_with_a_warning(caplog):
    """mergekit's own recipes give `weight` to slerp and `normalize` to model_stock: mergekit ignores
    them, so raymerge does too (one warning), while a misspelt name is still an error."""
    import logging

    text = (
        "merge_method: slerp\nbase_model: b\nmodels:\n  - model: b\n  - model: a\n    parameters: {weight: 0.5}\n"
        "parameters: {t: 0.3, normalize: true}\n"
    )
    with caplog.at_level(logging.WARNING, logger="raymerge.engine.recipe"):
        recipe = parse_recipe(text)
    assert recipe.parameters == {"t": 0.3}
    assert all(not m.parameters for m in recipe.models)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and "'weight'; ignored" in warned[0] and "'normalize'; ignored" in warned[1]
    with pytest.raises(RecipeError, match="has no parameter 'weight'.*without --strict"):
        parse_recipe(text, strict=True)
    with pytest.raises(RecipeError, match="did you mean 't'"):
        parse_recipe(text.replace("t: 0.3", "tt: 0.3"))


def test_strict_flag_on_the_command_line(tmp_path, capsys):
    from raymerge.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text("merge_method: model_stock\nbase_model: b\nmodels: [x, y]\nparameters: {normalize: true}\n")
    assert main(["plan", str(recipe), "--strict"]) != 0
    err = capsys.readouterr().err
    assert "has no parameter 'normalize'" in err and "Traceback" not in err
