"""SVC (singular value calibration) against FusionBench's implementation on identical inputs.

FusionBench's ``subspace_consistency_spectral_calibration_accelerated`` (the function its
``SingularValueCalibration`` algorithms apply to every 2-D parameter) is called on the same base,
experts and merged weight; the wrapped merges are FusionBench's own (task arithmetic: base + λ·ΣΔ
in fp32, as its state-dict arithmetic does; TSV-M and Iso-C: its functions, as in
test_spectral.py). The bound is on the calibrated task vector, ‖ours − FB‖/‖FB‖ ≤ 1e-6.
"""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from raymerge.engine.errors import RaymergeError
from raymerge.engine.merge import merge
from raymerge.engine.methods import METHODS, MergeArgs
from raymerge.engine.methods.svc import calibration
from raymerge.engine.recipe import parse_recipe

from conftest import load_dir, recipe_text

SHAPES = [(96, 40), (40, 96), (64, 64)]


def _fb_svc(base, experts, merged, alpha):
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.singular_value_calibration.utils import (
        subspace_consistency_spectral_calibration_accelerated as fb,
    )

    return fb(base_weight=base, task_weights=list(experts), merged_weight=merged, alpha=alpha, accelerator="cpu")


def _fb_merged_tv(method, task_vectors):
    pytest.importorskip("fusion_bench")
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction

    with contextlib.redirect_stdout(io.StringIO()):
        if method == "tsv_m":
            return compute_and_sum_svd_mem_reduction(task_vectors, accelerator="cpu")
        return iso_c(task_vectors, accelerator="cpu")


def _problem(shape, n, seed, shared=0.0):
    """fp32 base and experts: low-rank task vectors plus noise, and a direction all share."""
    g = torch.Generator().manual_seed(seed)
    base = 0.02 * torch.randn(*shape, generator=g)
    common = torch.randn(shape[0], 2, generator=g) @ torch.randn(2, shape[1], generator=g)
    experts = []
    for _ in range(n):
        low = torch.randn(shape[0], 4, generator=g) @ torch.randn(4, shape[1], generator=g) / 2
        experts.append(base + 4e-3 * (low + shared * common + torch.randn(*shape, generator=g)))
    return base, experts


def _args(method, n, per_model=None, **over):
    shared = {p.name: p.default for p in METHODS[method].params if not p.required}
    shared.update(over)
    return MergeArgs(shared, per_model or [{}] * n, tensor_name="w")


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_calibration_equals_fusion_bench_on_the_same_merged_weight(shape, alpha):
    base, experts = _problem(shape, 3, seed=shape[0], shared=3.0)
    merged = base + 0.7 * sum(e - base for e in experts)
    ours = calibration(base, experts, merged, alpha, torch.float64)
    ref = _fb_svc(base, experts, merged, alpha)
    assert ours.dtype == torch.float32
    assert _rel(ours.double() - base.double(), ref.double() - base.double()) <= 1e-6
    # it changes the merge: the shared direction is over-counted by the sum
    assert _rel(ours - base, merged - base) > 1e-2


@pytest.mark.parametrize("n", [2, 3, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_svc_task_arithmetic_equals_fusion_bench(shape, n):
    """FusionBench's SingularValueCalibrationArithmeticTask: TA with scaling_factor λ, then SVC."""
    base, experts = _problem(shape, n, seed=10 * n + shape[1], shared=2.0)
    lam, alpha = 0.3, 1.0
    fb_merged = base + lam * sum(e - base for e in experts)  # fp32 state-dict arithmetic
    ref = _fb_svc(base, experts, fb_merged, alpha)
    args = _args("svc_task_arithmetic", n, [{"weight": 1.0}] * n, **{"lambda": lam, "svc_alpha": alpha})
    ours = METHODS["svc_task_arithmetic"].fn(base, experts, args)
    assert _rel(ours - base, ref - base) <= 1e-6


@pytest.mark.parametrize("method", ["tsv_m", "iso_c"])
@pytest.mark.parametrize("shape", SHAPES)
def test_svc_over_spectral_methods_equals_fusion_bench(method, shape):
    """FusionBench's SingularValueCalibrationWithBaseMethod over its TSV-M / Iso-C merge."""
    n = 3
    base, experts = _problem(shape, n, seed=7 + shape[0], shared=2.0)
    tv = _fb_merged_tv(method, [{"w": (x - base).double()} for x in experts])["w"]
    fb_merged = (base.double() + tv).float()  # its merged model, fp32
    ref = _fb_svc(base, experts, fb_merged, 1.0)
    ours = METHODS[f"svc_{method}"].fn(base, experts, _args(f"svc_{method}", n))
    assert _rel(ours - base, ref - base) <= 1e-6
    plain = METHODS[method].fn(base, experts, _args(method, n))
    assert _rel(ours - base, plain - base) > 1e-3


def test_svc_damps_a_direction_every_task_shares():
    """Experts that all add the same rank-1 update u vᵀ: the sum counts it T times, SVC brings it
    back to once (γ = 1/T along it), which is each expert's own update."""
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(32, 1, generator=g, dtype=torch.float64), torch.randn(1, 24, generator=g, dtype=torch.float64)
    base = torch.randn(32, 24, generator=g, dtype=torch.float64)
    experts = [base + u @ v for _ in range(4)]
    out = METHODS["svc_task_arithmetic"].fn(
        base, experts, _args("svc_task_arithmetic", 4, [{"weight": 1.0}] * 4, **{"lambda": 1.0})
    )
    assert _rel(out - base, u @ v) <= 1e-12


def test_engine_svc_end_to_end(family, tmp_path):
    """Through a recipe: linear weights calibrated (the calibration of the engine's TA merge), every
    other tensor exactly task arithmetic's."""
    base, experts = family
    per_model = [{"weight": 1.0}] * 3
    params = {"lambda": 0.5, "svc_alpha": 1.0}
    merge(
        parse_recipe(recipe_text("svc_task_arithmetic", base, experts, params, per_model)),
        tmp_path / "svc",
        progress=False,
    )
    merge(
        parse_recipe(recipe_text("task_arithmetic", base, experts, {"lambda": 0.5}, per_model)),
        tmp_path / "ta",
        progress=False,
    )
    out, ta, b = load_dir(tmp_path / "svc"), load_dir(tmp_path / "ta"), load_dir(base)
    es = [load_dir(e) for e in experts]
    name = "model.layers.1.mlp.down_proj.weight"
    ref = calibration(b[name], [e[name] for e in es], ta[name], 1.0, torch.float64)
    assert _rel(out[name] - b[name], ref - b[name]) <= 1e-6
    assert _rel(out[name] - b[name], ta[name] - b[name]) > 1e-3
    for k in ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(out[k], ta[k]), k


def test_bad_svc_alpha_is_refused(family, tmp_path):
    base, experts = family
    text = recipe_text("svc_tsv_m", base, experts, {"svc_alpha": -1})
    with pytest.raises(RaymergeError, match="svc_alpha"):
        merge(parse_recipe(text), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
