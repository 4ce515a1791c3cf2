"""Packed projections: merged as stored by default, block by block with raymerge.split_fused."""

from __future__ import annotations

import pytest
import torch

from raymerge.engine.errors import PlanError
from raymerge.engine.merge import merge
from raymerge.engine.methods import METHODS, MergeArgs
from raymerge.engine.recipe import parse_recipe
from raymerge.engine.synth import write_checkpoint

from conftest import load_dir, recipe_text

CONFIG = {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 32, "num_hidden_layers": 1}
SPECS = [
    ("model.layers.0.self_attn.qkv_proj.weight", (64, 32)),  # q 32 + k 16 + v 16
    ("model.layers.0.mlp.gate_up_proj.weight", (96, 32)),
    ("model.layers.0.input_layernorm.weight", (32,)),
]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    g = torch.Generator().manual_seed(0)
    base = {n: 0.02 * torch.randn(s, generator=g) for n, s in SPECS}

    def expert(i):
        # dense task vectors: with low-rank ones ACTMat recovers every Δ exactly, split or not
        gi = torch.Generator().manual_seed(100 + i)
        return {n: t + 0.01 * torch.randn(t.shape, generator=gi) for n, t in base.items()}

    models = {"base": base, **{f"e{i}": expert(i) for i in range(3)}}
    dirs = {k: write_checkpoint(root / k, list(v.items()), SPECS, torch.float32, CONFIG) for k, v in models.items()}
    return dirs, models


def _reference(method, models, name, blocks):
    shared = {p.name: p.default for p in METHODS[method].params if p.scope.value == "shared"}
    base = models["base"][name].double()
    experts = [models[f"e{i}"][name].double() for i in range(3)]
    out, r = [], 0
    for b in blocks:
        out.append(METHODS[method].fn(base[r : r + b], [e[r : r + b] for e in experts], MergeArgs(shared, [{}] * 3)))
        r += b
    return torch.cat(out)


@pytest.mark.parametrize("split", [False, True])
def test_actmat_split_fused(packed, tmp_path, split):
    dirs, models = packed
    text = recipe_text(
        "actmat",
        dirs["base"],
        [dirs[f"e{i}"] for i in range(3)],
        extra=f"raymerge: {{split_fused: {str(split).lower()}}}",
    )
    merge(parse_recipe(text), tmp_path / "out", progress=False)
    out = load_dir(tmp_path / "out")
    for name, blocks in [
        ("model.layers.0.self_attn.qkv_proj.weight", [32, 16, 16]),
        ("model.layers.0.mlp.gate_up_proj.weight", [48, 48]),
    ]:
        ref = _reference("actmat", models, name, blocks if split else [sum(blocks)])
        other = _reference("actmat", models, name, [sum(blocks)] if split else blocks)
        err = ((out[name].double() - ref).norm() / ref.norm()).item()
        assert err <= 1e-6, (name, err)
        assert ((ref - other).norm() / ref.norm()).item() > 1e-4  # splitting changes the answer
    card = (tmp_path / "out" / "README.md").read_text()
    assert ("split into blocks" in card) == split


def test_split_fused_refuses_inconsistent_config(packed, tmp_path):
    dirs, _ = packed
    import json

    bad = tmp_path / "bad"
    bad.mkdir()
    for f in dirs["base"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps({**CONFIG, "num_key_value_heads": 4}))
    text = recipe_text(
        "ties",
        bad,
        [dirs["e0"], dirs["e1"]],
        None,
        [{"weight": 1, "density": 0.5}] * 2,
        extra="raymerge: {split_fused: true}",
    )
    with pytest.raises(PlanError, match="qkv_proj"):
        merge(parse_recipe(text), tmp_path / "out", progress=False)
