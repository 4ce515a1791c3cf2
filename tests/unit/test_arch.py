"""Depth per stack for gradients, and the names mergekit gives a published MoE's expert tensors."""

from __future__ import annotations

import pytest

from raymerge.engine.arch import depth_fraction, fused_groups, mergekit_name, stack_depths
from raymerge.engine.recipe import parse_recipe, resolve_for_tensor

T5 = [f"encoder.block.{i}.layer.0.SelfAttention.q.weight" for i in range(2)] + [
    f"decoder.block.{i}.layer.1.EncDecAttention.q.weight" for i in range(4)
]
GEMMA3 = [f"language_model.model.layers.{i}.mlp.up_proj.weight" for i in range(3)] + [
    f"vision_tower.vision_model.encoder.layers.{i}.mlp.fc1.weight" for i in range(2)
]


def test_each_stack_spans_its_own_depth():
    d = stack_depths({"num_hidden_layers": 2, "num_decoder_layers": 4}, T5)
    assert d == {"encoder.block.": 2, "decoder.block.": 4}
    assert [depth_fraction(n, d) for n in T5] == [0.0, 1.0, 0.0, 1 / 3, 2 / 3, 1.0]
    g = stack_depths({"text_config": {"num_hidden_layers": 3}}, GEMMA3)
    assert [depth_fraction(n, g) for n in GEMMA3] == [0.0, 0.5, 1.0, 0.0, 1.0]
    assert depth_fraction("shared.weight", d) == 0.0
    # one stack: the config's count where it is at least the blocks present (mergekit's key)
    assert stack_depths({"num_hidden_layers": 5}, ["model.layers.1.x"]) == {"model.layers.": 5}


def test_gradients_of_any_length_fit_every_stack():
    r = parse_recipe(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [0.0, 1.0, 0.5]}\n"
        "  - model: b\n    parameters: {weight: 1.0}\n"
    )
    d = stack_depths({}, T5)
    got = [resolve_for_tensor(r, n, d).per_model[0]["weight"] for n in T5]
    assert got == pytest.approx([0.0, 0.5, 0.0, 2 / 3, 5 / 6, 0.5])
    # a count smaller than the blocks present never takes t past 1 (was an IndexError)
    assert resolve_for_tensor(r, T5[-1], 2).per_model[0]["weight"] == 0.5


def test_moe_experts_take_mergekit_fused_names():
    assert mergekit_name("model.layers.3.block_sparse_moe.experts.7.w3.weight", "mixtral") == (
        "model.layers.3.mlp.experts.gate_up_proj"
    )
    assert mergekit_name("model.layers.3.block_sparse_moe.gate.weight", "mixtral") == "model.layers.3.mlp.gate.weight"
    assert mergekit_name("model.layers.0.mlp.experts.2.down_proj.weight", "qwen3_moe") == (
        "model.layers.0.mlp.experts.down_proj"
    )
    assert mergekit_name("model.layers.0.mlp.experts.2.up_proj.weight", "qwen2_moe") == (
        "model.layers.0.mlp.experts.gate_up_proj"
    )
    shared = "model.layers.0.mlp.shared_expert.up_proj.weight"
    assert mergekit_name(shared, "qwen2_moe") == shared
    assert mergekit_name("model.layers.0.mlp.experts.2.down_proj.weight", "olmoe") == (
        "model.layers.0.mlp.experts.2.down_proj.weight"
    )
    names = [f"model.layers.0.block_sparse_moe.experts.{e}.w{w}.weight" for e in (10, 0, 2, 1) for w in (3, 2, 1)]
    groups = fused_groups("mixtral", [*names, "model.layers.0.block_sparse_moe.gate.weight"])
    assert groups[names[0]] == tuple(
        f"model.layers.0.block_sparse_moe.experts.{e}.w{w}.weight" for e in (0, 1, 2, 10) for w in (1, 3)
    )
    assert len(groups[names[1]]) == 4 and "model.layers.0.block_sparse_moe.gate.weight" not in groups


def test_moe_tasks_carry_their_fused_group(tmp_path):
    """TIES on a Mixtral: each expert tensor's task reads the rest of its fused group for the
    statistics (and says so in read_bytes); the group survives the task's JSON round trip."""
    from hf_tiny import perturbed_file, tiny_mixtral

    from raymerge.engine.plan import TensorTask, build_plan

    base = tiny_mixtral(tmp_path / "base", experts=2)
    experts = [perturbed_file(base, tmp_path / f"e{i}", seed=i) for i in (1, 2)]
    models = "".join(f"  - model: {e}\n    parameters: {{weight: 1.0, density: 0.5}}\n" for e in experts)
    recipe = parse_recipe(f"merge_method: ties\nbase_model: {base}\nmodels:\n{models}")
    tasks = {t.tensor: t for t in build_plan(recipe).tasks}
    w1 = tasks["model.layers.1.block_sparse_moe.experts.1.w1.weight"]
    assert [g[0] for g in w1.group] == [
        "model.layers.1.block_sparse_moe.experts.0.w1.weight",
        "model.layers.1.block_sparse_moe.experts.0.w3.weight",
        "model.layers.1.block_sparse_moe.experts.1.w3.weight",
    ]
    assert all(len(refs) == 3 for _, refs in w1.group)  # base and both experts
    assert w1.read_bytes == 4 * 3 * 24 * 32 * 4
    assert len(tasks["model.layers.0.block_sparse_moe.experts.0.w2.weight"].group) == 1
    assert tasks["model.layers.0.block_sparse_moe.gate.weight"].group == ()
    assert tasks["model.layers.0.self_attn.q_proj.weight"].group == ()
    assert TensorTask.from_json(w1.to_json()) == w1


def test_karcher_averages_an_unlisted_base_as_mergekit(family):
    """mergekit adds a ``base_model`` missing from ``models`` as one more input; karcher averages
    it in, and ``plan`` counts it."""
    from raymerge.engine.plan import build_plan

    from conftest import recipe_text

    base, experts = family
    plan = build_plan(parse_recipe(recipe_text("karcher", base, experts[:2])))
    assert plan.models == (str(experts[0]), str(experts[1]), str(base))
    task = next(t for t in plan.tasks if t.action == "merge")
    assert not task.has_base and len(task.inputs) == 3 and len(task.per_model) == 3


def test_mergekit_compute_dtype_plans_whole_tensors_in_the_recipe_dtype(family):
    from raymerge.engine.plan import build_plan

    from conftest import recipe_text

    base, experts = family
    extra = "dtype: bfloat16\nraymerge: {compute_dtype: mergekit, chunk_bytes: 256}"
    ties = build_plan(parse_recipe(recipe_text("ties", base, experts, {"density": 0.5, "weight": 1.0}, extra=extra)))
    assert {(t.order, t.compute_dtype) for t in ties.tasks} == {("mergekit", "BF16")}
    assert all(t.row_start == 0 and t.row_end == t.output.shape[0] for t in ties.tasks if t.output.shape)
    # DELLA's random drop is raymerge's own (mergekit draws it from its RNG); task_arithmetic has
    # no mergekit order here: both compute in bf16 in raymerge's order
    for method, params in (("della", {"density": 0.5, "weight": 1.0}), ("task_arithmetic", {"weight": 1.0})):
        plan = build_plan(parse_recipe(recipe_text(method, base, experts, params, extra=extra)))
        assert {(t.order, t.compute_dtype) for t in plan.tasks} == {("", "BF16")}
