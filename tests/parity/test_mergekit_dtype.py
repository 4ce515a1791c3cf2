"""``raymerge.compute_dtype: mergekit`` against mergekit-yaml in bf16 (and fp16): mergekit computes
in the recipe's ``dtype`` in its own order, so raymerge's default fp32 arithmetic differs from it
far beyond rounding for selection methods; this mode must give mergekit's bits.

mergekit writes some methods' results in fp32 although the recipe says bf16 (ramplus_tl and
arcee_fusion promote through an fp32 factor, and mergekit saves the promoted tensor); raymerge
writes the recipe's dtype, so the comparison is with mergekit's output rounded to that dtype.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from raymerge.cli import main as raymerge_main

from conftest import load_dir, mergekit_yaml
from method_examples import EXAMPLES

ROWS = (
    "ties",
    "sce",
    "arcee_fusion",
    "ramplus_tl",
    "della_undropped",
    "model_stock",
    "model_stock_filter_wise",
    "slerp",
    "karcher",
    "karcher_with_base",
)
CASES = {e.name: e for e in EXAMPLES if e.name in ROWS}


def _run(example, family, tmp_path: Path, dtype: str, compute: str) -> tuple[dict, dict]:
    base, experts = family
    mk = example.recipe(base, experts, extra=f"dtype: {dtype}", method=example.mergekit)
    mergekit_yaml(mk, tmp_path / "mk")
    rm = example.recipe(base, experts, extra=f"dtype: {dtype}\nraymerge: {{compute_dtype: {compute}}}")
    (tmp_path / "rm.yaml").write_text(rm)
    assert raymerge_main(["run", str(tmp_path / "rm.yaml"), str(tmp_path / "rm"), "-q"]) == 0
    return load_dir(tmp_path / "mk"), load_dir(tmp_path / "rm")


@pytest.mark.parametrize("case", ROWS)
def test_bit_equal_to_mergekit_in_bf16(case, family, tmp_path):
    assert case in CASES, f"no example row {case!r}"
    ref, got = _run(CASES[case], family, tmp_path, "bfloat16", "mergekit")
    assert set(ref) == set(got)
    for k in ref:
        assert got[k].dtype == torch.bfloat16
        want = ref[k].to(torch.bfloat16)
        bad = (got[k] != want).sum().item()
        assert bad == 0, f"{case}: {bad} of {want.numel()} elements of {k} differ from mergekit's"


@pytest.mark.parametrize("case", ["ties", "sce"])
def test_bit_equal_to_mergekit_in_fp16(case, family, tmp_path):
    ref, got = _run(CASES[case], family, tmp_path, "float16", "mergekit")
    assert all(torch.equal(got[k], ref[k].to(torch.float16)) for k in ref)


def test_fp32_arithmetic_differs_from_mergekit_in_bf16(family, tmp_path):
    """The default (and ``compute_dtype: bfloat16``) is raymerge's own order: TIES' selection on
    fp32 task vectors differs from mergekit's on bf16 ones by far more than one bf16 step."""
    ref, got = _run(CASES["ties"], family, tmp_path, "bfloat16", "bfloat16")
    worst = max((ref[k].float() - got[k].float()).abs().max().item() for k in ref)
    assert worst > 1e-2


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("method", ["ties", "model_stock", "sce"])
def test_fused_experts_bit_equal_to_mergekit_in_bf16(arch, method, tmp_path_factory, tmp_path):
    """A MoE's experts in this mode: mergekit's arithmetic on the fused expert tensor."""
    from hf_tiny import perturbed_file
    from test_arch_parity import BUILDERS, both, recipe

    root = tmp_path_factory.mktemp(arch)
    base = BUILDERS[arch](root / "base")
    experts = [perturbed_file(base, root / f"e{i}", seed=i) for i in (1, 2, 3)]
    per_model = {"ties": "{weight: 1.0, density: 0.4}", "model_stock": "", "sce": ""}[method]
    params = "{select_topk: 0.5}" if method == "sce" else ""
    text = recipe(method, base, experts, [per_model] * 3, params).replace("float32", "bfloat16")
    ref, got = both(text, tmp_path, arch, "raymerge: {compute_dtype: mergekit}\n")
    assert set(ref) == set(got)
    for k in ref:
        bad = (got[k] != ref[k].to(torch.bfloat16)).sum().item()
        assert bad == 0, f"{arch} {method}: {bad} of {ref[k].numel()} elements of {k} differ from mergekit's"
