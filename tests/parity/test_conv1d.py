"""GPT-2's Conv1D stores linear weights as in × out. Methods that read a weight's input side (Gram
methods, Iso-CTS) must see it as out × in, as they would for nn.Linear; RegMean's Grams are
collected on Conv1D layers and the merged weight matches FusionBench's GPT-2 RegMean
(``weight_transpose=False``) on the same Grams."""

from __future__ import annotations

import pytest
import torch

from raymerge.engine.merge import merge
from raymerge.engine.methods import METHODS, MergeArgs
from raymerge.engine.plan import build_plan
from raymerge.engine.recipe import parse_recipe

from conftest import load_dir, recipe_text

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@pytest.fixture(scope="module")
def gpt2_family(tmp_path_factory):
    from hf_tiny import perturbed, tiny_gpt2

    root = tmp_path_factory.mktemp("gpt2")
    base = tiny_gpt2(root / "base", 0)
    return base, [perturbed(base, root / f"e{i}", seed=i, scale=0.3) for i in range(3)]


def _is_conv1d(name):
    return any(name.endswith(s) for s in CONV1D)


def test_plan_marks_conv1d_weights_as_input_major(gpt2_family):
    base, experts = gpt2_family
    plan = build_plan(parse_recipe(recipe_text("actmat", base, experts)))
    layouts = {t.tensor: t.layout for t in plan.tasks}
    conv = [n for n in layouts if _is_conv1d(n)]
    assert len(conv) == 8
    assert all(layouts[n] == "in_out" for n in conv)
    assert all(layouts[n] == "out_in" for n in layouts if not _is_conv1d(n))


@pytest.mark.parametrize("method", ["actmat", "iso_cts"])
def test_oriented_methods_see_conv1d_weights_as_out_by_in(gpt2_family, tmp_path, method):
    base, experts = gpt2_family
    merge(parse_recipe(recipe_text(method, base, experts)), tmp_path / "out", progress=False)
    out, b, es = load_dir(tmp_path / "out"), load_dir(base), [load_dir(e) for e in experts]
    spec = METHODS[method]
    args = MergeArgs({p.name: p.default for p in spec.params}, [{}] * 3, tensor_name="w")
    checked = 0
    for name in out:
        if not _is_conv1d(name):
            continue
        want = spec.fn(b[name].double().T, [e[name].double().T for e in es], args).T
        wrong = spec.fn(b[name].double(), [e[name].double() for e in es], args)
        err = ((out[name].double() - want).norm() / (want - b[name]).norm()).item()
        assert err <= 1e-5, (name, err)
        # the orientation matters: read as stored (in × out), the merge would be another one
        assert ((wrong - want).norm() / (want - b[name]).norm()).item() > 1e-2, name
        checked += 1
    assert checked == 8


def test_regmean_on_gpt2_matches_fusion_bench_on_the_same_grams(gpt2_family, tmp_path):
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights
    from safetensors.torch import load_file

    from raymerge.engine.stats import DataSpec, collect_stats

    _, experts = gpt2_family
    grams = []
    for i, e in enumerate(experts):
        ids = torch.randint(3, 40, (12, 10), generator=torch.Generator().manual_seed(10 + i))
        torch.save({"input_ids": ids}, tmp_path / f"task{i}.pt")
        collect_stats(e, DataSpec((str(tmp_path / f"task{i}.pt"),), batch_size=4), tmp_path / f"stats{i}")
        grams.append(load_file(str(tmp_path / f"stats{i}" / "grams.safetensors")))
    assert {f"transformer.h.{b}.{s[: -len('.weight')]}" for b in (0, 1) for s in CONV1D} <= set(grams[0])
    per_model = [{"grams": str(tmp_path / f"stats{i}" / "grams.safetensors")} for i in range(3)]
    merge(
        parse_recipe(recipe_text("regmean", None, experts, {"alpha": 0.95}, per_model)),
        tmp_path / "out",
        progress=False,
    )
    ours = load_dir(tmp_path / "out")
    sds = [load_dir(e) for e in experts]
    conv = [n for n in ours if _is_conv1d(n)]
    params = {n: [sd[n].double() for sd in sds] for n in conv}
    ref = merging_with_regmean_weights(
        params, [{k: v.double() for k, v in g.items()} for g in grams], 0.95, weight_transpose=False
    )
    for n in conv:
        err = ((ours[n].double() - ref[n]).norm() / ref[n].norm()).item()
        assert err <= 1e-5, (n, err)
        avg = sum(params[n]) / 3
        assert ((avg - ref[n]).norm() / ref[n].norm()).item() > 1e-2  # not the plain average
