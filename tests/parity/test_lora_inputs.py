"""LoRA adapters as inputs (mergekit's ``model: BASE+ADAPTER``): raymerge run and mergekit-yaml
(0.1.5, which merges the adapter with PEFT first) on fp32 tiny Llamas must agree to 1e-6.

The adapters are written by hand (adapter_config.json + adapter_model.safetensors in PEFT's key
layout): plain (alpha / r), rsLoRA (alpha / √r) with an alpha_pattern override, and one that also
saves the LM head whole (modules_to_save); the plain one also adapts the token embedding. raymerge forms each expert tensor inside its task, so
no merged copy of an adapter's model is written anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_tiny import tiny_llama, write_adapter
from safetensors.torch import save_file

from raymerge.cli import main as raymerge_main
from raymerge.engine.errors import CheckpointError
from raymerge.engine.plan import TensorTask, build_plan
from raymerge.engine.recipe import parse_recipe

from conftest import load_dir, mergekit_yaml

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    root = tmp_path_factory.mktemp("lora")
    base = tiny_llama(root / "base", seed=0)
    other = tiny_llama(root / "other", seed=5)
    plain = write_adapter(root / "plain", base, 4, seed=1, embed=True)
    rs = write_adapter(
        root / "rs", base, 8, 2, {"use_rslora": True, "alpha_pattern": {"down_proj": 4}}, whole=("lm_head.weight",)
    )
    return base, other, plain, rs


def _recipes(base: Path, other: Path, plain: Path, rs: Path) -> dict[str, str]:
    return {
        "task_arithmetic": (
            f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"
            f"  - model: {base}+{plain}\n    parameters: {{weight: 0.7}}\n"
            f"  - model: {base}+{rs}\n    parameters: {{weight: [0.3, 1.0]}}\n"
        ),
        "ties": (
            f"merge_method: ties\nbase_model: {base}\nmodels:\n"
            f"  - model: {base}+{plain}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
            f"  - model: {other}\n    parameters: {{weight: 0.5, density: 0.7}}\n"
            "parameters: {normalize: true}\n"
        ),
        "linear_adapter_on_other": (
            f"merge_method: linear\nmodels:\n  - model: {other}+{plain}\n    parameters: {{weight: 0.4}}\n"
            f"  - model: {base}+{rs}\n    parameters: {{weight: 0.6}}\n"
        ),
    }


@pytest.mark.parametrize("case", sorted(_recipes(*(Path(x) for x in "bopr"))))
def test_lora_inputs_match_mergekit(case, lora_family, tmp_path):
    text = _recipes(*lora_family)[case] + "dtype: float32\n"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    mk_out, rm_out = tmp_path / "mergekit", tmp_path / "raymerge"
    mergekit_yaml(recipe.read_text(), mk_out, "--lora-merge-cache", str(tmp_path / "cache"))
    assert raymerge_main(["run", str(recipe), str(rm_out), "-q"]) == 0
    ref, got = load_dir(mk_out), load_dir(rm_out)
    assert set(ref) == set(got)
    worst = max(((ref[k].double() - got[k].double()).abs().max().item(), k) for k in ref)
    assert worst[0] <= 1e-6, f"{case}: max |diff| {worst[0]:.3g} at {worst[1]}"
    # the adapters changed their targets (the comparison is not vacuous), and nothing else was written
    base = load_dir(lora_family[0])
    assert (
        got["model.layers.1.self_attn.q_proj.weight"] - base["model.layers.1.self_attn.q_proj.weight"]
    ).abs().max() > 1e-3
    assert sorted(p.name for p in rm_out.iterdir() if p.suffix == ".safetensors") == ["model.safetensors"]


def test_expert_tensor_is_base_plus_scaled_product(lora_family):
    """The plan reads the base's bytes and carries the factors and scale: 16/4 plain, 4/√8 rsLoRA
    with the alpha_pattern on down_proj, 16/√8 elsewhere; a whole-saved LM head reads the adapter file."""
    base, _, plain, rs = lora_family
    text = (
        f"merge_method: linear\nmodels:\n  - model: {base}+{plain}\n    parameters: {{weight: 1}}\n"
        f"  - model: {base}+{rs}\n    parameters: {{weight: 1}}\n"
    )
    plan = build_plan(parse_recipe(text))
    by = {t.tensor: t for t in plan.tasks}
    q, down = by["model.layers.0.self_attn.q_proj.weight"], by["model.layers.0.mlp.down_proj.weight"]
    assert q.inputs[0].url == q.inputs[1].url and q.inputs[0].url.startswith(str(base))
    assert q.lora[0].scale == 4.0 and q.lora[1].scale == pytest.approx(16 / 8**0.5)
    assert down.lora[1].scale == pytest.approx(4 / 8**0.5)
    assert by["model.layers.0.self_attn.k_proj.weight"].lora == ()
    emb = by["model.embed_tokens.weight"].lora
    assert emb[0].transposed and emb[0].scale == 4.0 and emb[1] is None  # only the plain adapter has one
    assert TensorTask.from_json(json.loads(json.dumps(q.to_json()))) == q  # the wire format keeps the factors
    assert q.read_bytes > 2 * q.output.nbytes  # the base's rows twice, plus each adapter's factors
    head = by["lm_head.weight"]
    assert head.inputs[1].url == str(rs / "adapter_model.safetensors") and head.lora == ()


@pytest.mark.parametrize(
    "change,match",
    [
        ({"use_dora": True}, "DoRA"),
        ({"bias": "all"}, "trained biases"),
    ],
)
def test_unsupported_adapters_are_refused(change, match, lora_family, tmp_path):
    base = lora_family[0]
    bad = write_adapter(tmp_path / "bad", base, 2, 3, change)
    with pytest.raises(CheckpointError, match=match):
        build_plan(
            parse_recipe(f"merge_method: linear\nmodels:\n  - model: {base}+{bad}\n    parameters: {{weight: 1}}\n")
        )


def test_adapter_that_does_not_fit_is_one_error_line(lora_family, tmp_path, capsys):
    base = lora_family[0]
    bad = write_adapter(tmp_path / "bad", base, 2, seed=3)
    from safetensors.torch import load_file

    t = load_file(str(bad / "adapter_model.safetensors"))
    t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(5, 2)
    save_file(t, str(bad / "adapter_model.safetensors"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {base}+{bad}\n    parameters: {{weight: 1}}\n")
    assert raymerge_main(["run", str(recipe), str(tmp_path / "out"), "-q"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("raymerge: error: adapter factors") and "q_proj" in err[0]
    assert not (tmp_path / "out").exists()


def test_conv1d_adapter_matches_mergekit(tmp_path):
    """GPT-2 stores c_attn / c_fc as in × out (Conv1D): PEFT's fan_in_fan_out adapter adds (B·A)ᵀ."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    base = tmp_path / "gpt2"
    GPT2LMHeadModel(cfg).eval().save_pretrained(str(base))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, w in load_dir(base).items():
        if name.endswith(("attn.c_attn.weight", "mlp.c_fc.weight")):
            module = name.removesuffix(".weight")
            in_f, out_f = w.shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(3, in_f, generator=g) * 0.3
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, 3, generator=g) * 0.3
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": 3,
                "lora_alpha": 6,
                "target_modules": ["c_attn", "c_fc"],
                "fan_in_fan_out": True,
                "bias": "none",
                "base_model_name_or_path": str(base),
            }
        )
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {base}\ndtype: float32\nmodels:\n"
        f"  - model: {base}+{adapter}\n    parameters: {{weight: 0.8}}\n"
    )
    mk_out, rm_out = tmp_path / "mergekit", tmp_path / "raymerge"
    mergekit_yaml(recipe.read_text(), mk_out, "--lora-merge-cache", str(tmp_path / "cache"))
    assert raymerge_main(["run", str(recipe), str(rm_out), "-q"]) == 0
    ref, got, src = load_dir(mk_out), load_dir(rm_out), load_dir(base)
    assert set(ref) == set(got)
    worst = max(((ref[k].double() - got[k].double()).abs().max().item(), k) for k in ref)
    assert worst[0] <= 1e-6, worst
    assert (got["transformer.h.1.attn.c_attn.weight"] - src["transformer.h.1.attn.c_attn.weight"]).abs().max() > 1e-3
