"""mergekit's ``slices`` recipes: raymerge run and mergekit-yaml (mergekit 0.1.5) on the same fp32
4-block Llamas must write the same tensor names, the same block count in config.json and every
tensor within 1e-6; the outputs load through ``transformers``.

Cases: depth up-scaling (one model stacked with overlapping ranges of itself), a two-model
frankenmerge with per-source ``scale``, gradient SLERP over one slice (as mergekit's
examples/gradient-slerp.yml) and over two slices with their own parameters, linear with
per-source weights, task arithmetic with a base per slice, and TIES over shifted layer ranges
(inputs renamed to the output's blocks).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from raymerge.cli import main as raymerge_main
from raymerge.engine.errors import PlanError, RecipeError
from raymerge.engine.plan import build_plan
from raymerge.engine.recipe import parse_recipe
from raymerge.engine.synth import SHAPES, make_family

from conftest import load_dir, mergekit_yaml

LAYERS = 4


@pytest.fixture(scope="module")
def deep_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    """fp32 tiny Llama with 4 blocks: base + 2 experts, sharded."""
    root = tmp_path_factory.mktemp("family4")
    shape = dataclasses.replace(SHAPES["tiny"], layers=LAYERS)
    return make_family(root, shape, 2, dtype=torch.float32, shard_bytes=300_000)


def _src(model: Path, lo: int, hi: int, params: str = "") -> str:
    extra = f"\n        parameters: {params}" if params else ""
    return f"      - model: {model}\n        layer_range: [{lo}, {hi}]{extra}\n"


def _recipes(b: Path, e0: Path, e1: Path) -> dict[str, tuple[str, int]]:
    """Recipe YAML and output block count per case."""
    t_filters = (
        "  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
        "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n"
    )
    return {
        "depth_upscale": (
            f"merge_method: passthrough\nslices:\n  - sources:\n{_src(b, 0, 3)}  - sources:\n{_src(b, 1, 4)}",
            6,
        ),
        "frankenmerge_scaled": (
            "merge_method: passthrough\nslices:\n"
            f"  - sources:\n{_src(e0, 0, 2)}"
            f"  - sources:\n{_src(e1, 1, 4, '{scale: 0.5}')}"
            f"  - sources:\n{_src(e0, 3, 4)}",
            6,
        ),
        "gradient_slerp": (
            f"merge_method: slerp\nbase_model: {b}\nslices:\n"
            f"  - sources:\n{_src(b, 0, LAYERS)}{_src(e0, 0, LAYERS)}"
            f"parameters:\n{t_filters}",
            LAYERS,
        ),
        "slerp_two_slices": (
            f"merge_method: slerp\nbase_model: {b}\nslices:\n"
            f"  - sources:\n{_src(b, 0, 3)}{_src(e0, 0, 3)}"
            "    parameters: {t: [0.1, 0.9]}\n"
            f"  - sources:\n{_src(b, 2, 4)}{_src(e0, 2, 4)}"
            f"parameters:\n{t_filters}",
            5,
        ),
        "linear": (
            "merge_method: linear\nslices:\n"
            f"  - sources:\n{_src(e0, 0, LAYERS, '{weight: 0.7}')}{_src(e1, 0, LAYERS, '{weight: [0.2, 1.0]}')}",
            LAYERS,
        ),
        "task_arithmetic_slice_bases": (
            "merge_method: task_arithmetic\nslices:\n"
            f"  - base_model: {b}\n    sources:\n{_src(b, 0, 2)}{_src(e0, 0, 2, '{weight: 0.5}')}"
            f"  - base_model: {e1}\n    sources:\n{_src(e1, 2, 4)}{_src(e0, 1, 3, '{weight: [1.0, 0.2]}')}"
            "parameters:\n  lambda: 0.8\n",
            4,
        ),
        "ties_shifted": (
            f"merge_method: ties\nbase_model: {b}\nslices:\n"
            # e0's block 2 is output block 1: its filter matches its own name, as in mergekit
            f"  - sources:\n{_src(b, 0, 3)}{_src(e0, 1, 4, '{weight: 1.0, density: [{filter: layers.2., value: 0.3}]}')}"
            f"{_src(e1, 0, 3, '{weight: [0.3, 0.9], density: [{filter: layers.2., value: 0.4}, {value: 0.7}]}')}"
            "    parameters: {density: 0.5}\n"
            f"  - sources:\n{_src(b, 3, 4)}{_src(e0, 3, 4)}{_src(e1, 3, 4)}"
            "    parameters: {weight: 0.6}\n"
            "parameters:\n  normalize: true\n",
            4,
        ),
    }


@pytest.mark.parametrize("case", sorted(_recipes(Path("b"), Path("e0"), Path("e1"))))
def test_slices_match_mergekit(case, deep_family, tmp_path):
    base, (e0, e1) = deep_family
    text, blocks = _recipes(base, e0, e1)[case]
    text += "dtype: float32\n"
    mk_out, rm_out = tmp_path / "mergekit", tmp_path / "raymerge"
    mergekit_yaml(text, mk_out)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    assert raymerge_main(["run", str(recipe), str(rm_out), "-q"]) == 0
    ref, got = load_dir(mk_out), load_dir(rm_out)
    assert set(got) == set(ref)
    assert sum(1 for k in got if k.endswith("mlp.down_proj.weight")) == blocks
    worst = max(((ref[k].double() - got[k].double()).abs().max().item(), k) for k in ref)
    assert worst[0] <= 1e-6, f"{case}: max |diff| {worst[0]:.3g} at {worst[1]}"
    for out in (mk_out, rm_out):
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == blocks


def test_depth_upscaled_model_loads_in_transformers(deep_family, tmp_path):
    transformers = pytest.importorskip("transformers")
    base, _ = deep_family
    text = _recipes(base, base, base)["depth_upscale"][0]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    out = tmp_path / "out"
    assert raymerge_main(["run", str(recipe), str(out), "-q"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    assert model.config.num_hidden_layers == 6 and len(model.model.layers) == 6
    src = load_dir(base)
    # output block 3 is block 1 of the base (the second slice starts at its block 1)
    assert torch.equal(model.model.layers[3].mlp.up_proj.weight.detach(), src["model.layers.1.mlp.up_proj.weight"])
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, SHAPES["tiny"].vocab) and torch.isfinite(logits).all()


def test_plan_reads_source_blocks_by_byte_range(deep_family):
    """One task per output tensor of a stacked block, reading the source block's byte range only."""
    base, _ = deep_family
    plan = build_plan(parse_recipe(_recipes(base, base, base)["depth_upscale"][0]))
    assert plan.config["num_hidden_layers"] == 6
    by_name = {t.tensor: t for t in plan.tasks}
    src = build_plan(parse_recipe(f"merge_method: passthrough\nmodels: [{base}]\n"))
    src_by_name = {t.tensor: t for t in src.tasks}
    for out_i, in_i in enumerate([0, 1, 2, 1, 2, 3]):
        for part in ("self_attn.q_proj.weight", "post_attention_layernorm.weight"):
            got = by_name[f"model.layers.{out_i}.{part}"].inputs
            assert got == src_by_name[f"model.layers.{in_i}.{part}"].inputs
    assert by_name["lm_head.weight"].inputs == src_by_name["lm_head.weight"].inputs


@pytest.mark.parametrize(
    "body,error,match",
    [
        ("slices: []\n", RecipeError, "non-empty `slices`"),
        ("models: [{M}]\nslices:\n  - sources:\n{S}", RecipeError, "either `models` or `slices`"),
        ("slices:\n  - sources:\n      - model: {M}\n        layer_range: [2, 1]\n", RecipeError, "0 <= start < end"),
        ("slices:\n  - sources:\n      - model: {M}\n        layer_rang: [0, 1]\n", RecipeError, "layer_range"),
        ("slices:\n  - sources:\n{S}{S}", RecipeError, "listed twice"),
        ("slices:\n  - sources:\n      - model: {M}\n        layer_range: [0, 9]\n", PlanError, "past the 4 blocks"),
    ],
)
def test_bad_slices_name_the_problem(body, error, match, deep_family):
    base, _ = deep_family
    text = "merge_method: passthrough\n" + body.replace("{S}", _src(base, 0, 2)).replace("{M}", str(base))
    with pytest.raises(error, match=match):
        build_plan(parse_recipe(text))


def test_slice_base_must_be_a_source(deep_family):
    base, (e0, e1) = deep_family
    text = f"merge_method: ties\nbase_model: {base}\nslices:\n  - sources:\n{_src(e0, 0, 2)}{_src(e1, 0, 2)}"
    with pytest.raises(RecipeError, match="not one of the slice's sources"):
        parse_recipe(text + "parameters: {weight: 1.0}\n")
