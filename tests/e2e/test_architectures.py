"""Merges of tiny models of many transformers architectures load back through ``from_pretrained``
and equal an fp64 task-arithmetic reference; Gram and spectral merges keep every tensor finite and
leave embeddings / position tables to their fallback (the plain mean)."""

from __future__ import annotations

import pytest
import torch

from raymerge.engine.merge import merge
from raymerge.engine.plan import build_plan
from raymerge.engine.recipe import parse_recipe

from conftest import load_dir, recipe_text

transformers = pytest.importorskip("transformers")

ARCHS = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32),
    "mistral": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    ),
    "qwen2": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
    ),
    "gemma": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=8,
        vocab_size=64,
    ),
    "phi3": dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=64,
        pad_token_id=0,
    ),
    "mixtral": dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        num_local_experts=4,
    ),
    "t5": dict(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, vocab_size=64),
    "bert": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=64),
    "vit": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=8
    ),
}


def _family(root, arch):
    cfg = transformers.AutoConfig.for_model(arch, **ARCHS[arch])
    torch.manual_seed(0)
    try:
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    except ValueError:
        model = transformers.AutoModel.from_config(cfg)
    cls = type(model)
    dirs = []
    for i in range(3):
        m = cls(cfg)
        m.load_state_dict(model.state_dict())
        if i:
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.02 * torch.randn(p.shape, generator=g))
        m.save_pretrained(str(root / f"m{i}"), max_shard_size="200KB")
        dirs.append(root / f"m{i}")
    return cls, dirs


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_merge_loads_and_matches_reference(arch, tmp_path):
    cls, (base, e1, e2) = _family(tmp_path, arch)
    ta = parse_recipe(
        recipe_text("task_arithmetic", base, [e1, e2], {"lambda": 0.7}, [{"weight": 1.0}, {"weight": 0.5}])
    )
    merge(ta, tmp_path / "ta", progress=False)
    loaded = cls.from_pretrained(str(tmp_path / "ta"))  # loads with no missing or unexpected keys
    b, x1, x2 = load_dir(base), load_dir(e1), load_dir(e2)
    got = load_dir(tmp_path / "ta")
    assert set(got) == set(b)
    for k, v in got.items():
        want = b[k].double() + 0.7 * ((x1[k].double() - b[k]) + 0.5 * (x2[k].double() - b[k]))
        assert (v.double() - want).abs().max() <= 1e-6, k
    state = loaded.state_dict()
    for k, v in got.items():
        if k in state:
            assert torch.equal(state[k], v), k

    # Gram and spectral merges: finite, loadable, and the fallback (mean) on non-linear tensors.
    plan = build_plan(parse_recipe(recipe_text("actmat", base, [e1, e2])))
    fallback = {t.tensor for t in plan.tasks if t.method != "actmat"}
    for method in ("actmat", "tsv_m"):
        merge(parse_recipe(recipe_text(method, base, [e1, e2])), tmp_path / method, progress=False)
        cls.from_pretrained(str(tmp_path / method))
        out = load_dir(tmp_path / method)
        assert all(bool(torch.isfinite(v).all()) for v in out.values())
        for k in fallback:
            mean = (x1[k].double() + x2[k].double()) / 2
            assert (out[k].double() - mean).abs().max() <= 1e-6, (method, k)
    assert not any(
        ("position" in k or "wpe" in k or "relative_attention_bias" in k) and t.method == "actmat"
        for t in plan.tasks
        for k in [t.tensor]
    )
