"""SVC, singular value calibration (Yang et al., "When Shared Knowledge Hurts: Spectral
Over-Accumulation in Model Merging", arXiv 2602.05536): a data-free correction applied after a
merge, registered as ``svc_<method>`` over task arithmetic, TIES, TSV-M, Iso-C and WUDI.

For a linear weight (out × in) with base W₀, experts W_i (Δ_i = W_i − W₀, K of them) and the
wrapped method's merged weight W_m (Δ_m = W_m − W₀):

    Δ_m = U diag(σ) Vᵀ                           (thin SVD, R = min(out, in) directions)
    a_r = u_rᵀ Δ_m = σ_r v_rᵀ,   a_r^i = u_rᵀ Δ_i  (the responses along the left direction u_r)
    s_r^i = ⟨a_r, a_r^i⟩ / max(‖a_r^i‖², 1e-12)   (how much of task i's response the merge holds)
    γ_r = K / Σ_i max(s_r^i, α)
    W = W₀ + U diag(γ σ) Vᵀ

A direction several tasks share is counted once per task by a sum (s_r^i ≈ K); γ_r scales it back
to what one task contributes. ``svc_alpha`` (α, FusionBench's ``alpha``, default 1) floors each
s_r^i, so directions no task over-counts are never amplified beyond K/(K·α). These are
FusionBench's semantics (``singular_value_calibration``, its vectorised implementation): fp64
throughout, the exact SVD, non-finite s_r^i (an all-zero Δ_m) taken as α. Only the tensors the
wrapped method treats as linear weights are calibrated; the others get the wrapped method (or
its fallback) unchanged — FusionBench calibrates every 2-D parameter, embeddings included.

Memory: the wrapped method's whole-tensor result, Δ_m in fp64, its SVD (U, σ, Vᵀ and the
solver's workspace), then one expert at a time (Δ_i and its responses Uᵀ Δ_i, R × in) and R×K
coefficients: O(out·in) in fp64 besides the wrapped method, whatever K.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from raymerge.engine.methods import gram, spectral, task_arithmetic  # noqa: F401  (the wrapped methods)
from raymerge.engine.methods.precision import stats_dtype
from raymerge.engine.methods.precision import tf32 as _tf32
from raymerge.engine.methods.registry import (
    METHODS,
    Footprint,
    MergeArgs,
    MethodSpec,
    Param,
    Scope,
    WorkShape,
    register,
)

REFERENCE = "https://arxiv.org/abs/2602.05536"
# What a CPU task's resident set grows by besides its buffers (BLAS/LAPACK buffers per thread,
# library pages): the Gram methods' figure (``gram_memory.RUNTIME_BYTES``).
RUNTIME_BYTES = 16 << 20
WRAPPED = ("task_arithmetic", "ties", "tsv_m", "iso_c", "wudi")
_SVC_ALPHA = Param(
    "svc_alpha", float, Scope.SHARED, 1.0, "SVC's floor α of each task's projection coefficient", low=0.0
)


def calibration(
    base: torch.Tensor, experts: Sequence[torch.Tensor], merged: torch.Tensor, alpha: float, dtype: torch.dtype
) -> torch.Tensor:
    """γ σ's directions applied: W₀ + U diag(γ σ) Vᵀ for the merged weight ``merged`` (see the module
    docstring), computed in ``dtype``, one expert at a time; returned in ``merged``'s dtype."""
    b = base.to(dtype)
    dm = merged.to(dtype) - b
    with _tf32(False):
        U, sigma, Vh = torch.linalg.svd(dm, full_matrices=False)
        Ut = U.T
        a_m = Ut @ dm  # R × in: σ_r v_rᵀ, as computed (not assumed)
        del dm
        total = torch.zeros_like(sigma)
        floor = torch.tensor(alpha, dtype=dtype, device=sigma.device)
        for i in range(len(experts)):
            a_i = Ut @ (experts[i].to(dtype) - b)  # R × in
            denom = a_i.square().sum(dim=1).clamp_min_(1e-12)
            s = (a_m * a_i).sum(dim=1).div_(denom)
            del a_i, denom
            total.add_(torch.maximum(torch.nan_to_num(s, nan=alpha, neginf=alpha), floor))
        gamma = len(experts) / total
        del a_m, Ut, total
        out = (U * (gamma * sigma).unsqueeze(0)) @ Vh
    return out.add_(b).to(merged.dtype)


def _svc_fn(inner: MethodSpec):  # type: ignore[no-untyped-def]
    def call(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
        assert base is not None
        merged = inner.fn(base, experts, args)
        precision = str(args.shared.get("precision", "auto"))
        dtype = stats_dtype(precision, base.device)
        return calibration(base, experts, merged, float(args.shared["svc_alpha"]), dtype)

    call.__name__ = f"svc_{inner.name}"
    call.__doc__ = f"SVC over {inner.name}: its merge, then the singular values of Δ_m calibrated."
    return call


def _svc_memory(inner: MethodSpec):  # type: ignore[no-untyped-def]
    def memory(s: WorkShape, on_accelerator: bool) -> Footprint:
        """The larger of the wrapped method's peak (run on the whole tensor: one span, one chunk)
        and the calibration's: the merged result and the base in the solve dtype throughout, then
        the largest of three phases: the SVD (Δ_m, the solver's copy of it, U, Vᵀ and 5.5·r² of
        workspace, as the spectral methods count it; one more matrix and 2·r² on CUDA); the
        loop over experts (U, Vᵀ, the merged responses, and an expert's converted copy and Δ_i,
        or Δ_i and its responses); the result (U scaled, the product, its rounded copy)."""
        rows, cols = (tuple(s.chunk_shape) + (1, 1))[:2]
        r, si, n = min(rows, cols), s.stats_item, s.numel
        whole = dataclasses.replace(s, work_numel=n, chunk_rows=max(1, rows))
        first = inner.footprint(whole, on_accelerator)
        u, vh = rows * r * si, r * cols * si
        svd = n * si + (n * si + u + vh) + si * 11 * r * r // 2
        if on_accelerator:
            svd += n * si + 2 * si * r * r
        loop = u + 2 * vh + 2 * n * si
        result = 2 * u + vh + n * (si + s.compute_item)
        calib = n * (s.compute_item + si) + max(svd, loop, result)
        if on_accelerator:
            return Footprint(host=first.host, device=max(first.device, calib + n * s.compute_item))
        inputs = n * s.in_item * s.inputs if s.in_item == s.compute_item else n * s.compute_item * 2
        return Footprint(host=max(first.host, calib + inputs + RUNTIME_BYTES))

    return memory


def register_svc(name: str) -> MethodSpec:
    """``svc_<name>``: method ``name`` then SVC on the tensors it treats as linear weights."""
    inner = METHODS[name]
    return register(
        MethodSpec(
            f"svc_{name}",
            _svc_fn(inner),
            (*inner.params, _SVC_ALPHA),
            REFERENCE,
            needs_base=True,
            min_experts=inner.min_experts,
            max_experts=inner.max_experts,
            applies_to=frozenset({"linear"}),
            fallback=inner.fallback if inner.fallback and "linear" in inner.applies_to else name,
            streams_experts=inner.streams_experts,
            prefers_accelerator=True,
            aux_param=inner.aux_param,
            check=inner.check,
            oriented=True,
            memory=_svc_memory(inner),
        )
    )


for _name in WRAPPED:
    register_svc(_name)


__all__ = ["REFERENCE", "WRAPPED", "calibration", "register_svc"]
