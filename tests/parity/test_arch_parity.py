"""raymerge run and mergekit-yaml on the same fp32 checkpoints of other architectures: several
stacks (T5's encoder and a deeper decoder, Gemma 3's text and vision towers), mixtures of experts
(Mixtral, Qwen3-MoE, stored as published) and a 4-D patch-embedding convolution.

Every tensor must agree to max |difference| ≤ 1e-6. mergekit reads a published MoE checkpoint in
transformers' fused layout (``mlp.experts.gate_up_proj`` = [gate; up] per expert, stacked;
``mlp.experts.down_proj``) and writes it so; raymerge keeps the stored layout, so its output is
fused the same way before the comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hf_tiny import fuse_moe, perturbed_file, tiny_gemma3, tiny_mixtral, tiny_qwen3_moe, tiny_t5

from raymerge.cli import main as raymerge_main

from conftest import load_dir, mergekit_yaml

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "gemma3": tiny_gemma3,
    "t5": tiny_t5,
    "mixtral": tiny_mixtral,
    "qwen3_moe": tiny_qwen3_moe,
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Callable[[str], tuple[Path, list[Path]]]:
    """A base and three fine-tuned-like experts of each architecture, built on first use."""
    built: dict[str, tuple[Path, list[Path]]] = {}

    def get(arch: str) -> tuple[Path, list[Path]]:
        if arch not in built:
            root = tmp_path_factory.mktemp(arch)
            base = BUILDERS[arch](root / "base")
            built[arch] = (base, [perturbed_file(base, root / f"e{i}", seed=i) for i in (1, 2, 3)])
        return built[arch]

    return get


def recipe(method: str, base: Path | None, models: list[Path], per_model: list[str], params: str = "") -> str:
    lines = [f"merge_method: {method}", "dtype: float32"]
    if base is not None:
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for m, p in zip(models, per_model, strict=True):
        lines.append(f"  - model: {m}")
        if p:
            lines.append(f"    parameters: {p}")
    if params:
        lines.append(f"parameters: {params}")
    return "\n".join(lines) + "\n"


def both(text: str, tmp_path: Path, arch: str, extra: str = "") -> tuple[dict, dict]:
    """mergekit's and raymerge's outputs of recipe ``text`` (raymerge's with ``extra`` appended)."""
    mergekit_yaml(text, tmp_path / "mk")
    (tmp_path / "rm.yaml").write_text(text + extra)
    assert raymerge_main(["run", str(tmp_path / "rm.yaml"), str(tmp_path / "rm"), "-q"]) == 0
    return load_dir(tmp_path / "mk"), fuse_moe(load_dir(tmp_path / "rm"), arch)


def assert_same(ref: dict, got: dict, base: dict, what: str) -> None:
    assert set(ref) == set(got), sorted(set(ref) ^ set(got))[:6]
    worst = max(((ref[k].double() - got[k].double()).abs().max().item(), k) for k in ref)
    assert worst[0] <= 1e-6, f"{what}: max |diff| {worst[0]:.3g} at {worst[1]}"
    assert any(not torch.equal(got[k], base[k]) for k in got if k in base)


GRADIENT = "{weight: [0.2, 0.7, 1.0]}"
CASES = {
    # per-stack depth: each tower / stack spans its own gradient
    "linear_gradient": ("linear", False, [GRADIENT, "{weight: 0.5}", "{weight: [1.0, 0.1]}"], ""),
    "ties_gradient": ("ties", True, ["{weight: 1.0, density: [0.2, 0.9]}"] * 3, "{normalize: true}"),
    # mergekit's filters match the names its architecture gives (a MoE's ``mlp.experts…``)
    "linear_filter_mlp": (
        "linear",
        False,
        ["{weight: [{filter: mlp, value: 0.9}, {value: 0.2}]}", "{weight: 0.5}", "{weight: 0.3}"],
        "",
    ),
    "ties_filter_gradient": (
        "ties",
        True,
        ["{weight: 1.0, density: [{filter: mlp, value: [0.3, 0.8]}, {value: 0.6}]}"] * 3,
        "",
    ),
    "model_stock": ("model_stock", True, ["", "", ""], ""),
    "model_stock_filter_wise": ("model_stock", True, ["", "", ""], "{filter_wise: true}"),
}


# Row chunks change how tensor-wide statistics are gathered, so the statistics cases run chunked too.
CHUNKED = ("ties_filter_gradient", "model_stock", "model_stock_filter_wise")
RUNS = [(case, None) for case in sorted(CASES)] + [(case, 512) for case in CHUNKED]


@pytest.mark.parametrize(("case", "chunk_bytes"), RUNS, ids=[f"{c}-{'chunked' if b else 'whole'}" for c, b in RUNS])
@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_matches_mergekit(arch, case, chunk_bytes, zoo, tmp_path):
    method, with_base, per_model, params = CASES[case]
    base, experts = zoo(arch)
    text = recipe(method, base if with_base else None, experts, per_model, params)
    extra = f"raymerge: {{chunk_bytes: {chunk_bytes}}}\n" if chunk_bytes else ""
    ref, got = both(text, tmp_path, arch, extra)
    assert_same(ref, got, fuse_moe(load_dir(base), arch), f"{arch} {case}")
