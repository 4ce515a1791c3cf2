"""Spectral merges: per-matrix SVD work on task vectors τ_t = expert_t − base. Registered at import.

* **TSV-M** (Gargiulo et al., CVPR 2025): keep the top k = int(r·(1/T)) singular triplets of each
  τ_t (r = min(rows, cols); FusionBench's float rule, which is r // T except e.g. 49 // 49),
  concatenate U's columns, σ's and Vᵀ's rows task by task, replace the two factors by their polar
  factors (U Vᵀ of their own SVDs) and multiply back: τ = polar(Ū) diag(σ̄) polar(V̄ᵀ).
* **Iso-C** (Marczak et al. 2025): Σ_t τ_t = U S Vᵀ, τ = mean(S) · U Vᵀ (a flat spectrum).
* **Iso-CTS** (same paper): the top k_c = r − T·round((r − int(f·r))/T) directions of Σ_t τ_t
  form the common space; each task adds the top (r − k_c)/T directions of τ_t with the common
  left space projected out; task blocks then the common block are concatenated, both factors
  replaced by polar factors, and every singular value by their mean.

All three return base + alpha·τ (alpha applied after the SVD work). They apply to linear weights;
other tensors get ``mean_task_vector`` = base + alpha·mean_t τ_t, FusionBench's rule for non-2-D
keys (the plain mean of the experts at the default alpha = 1). Unlike FusionBench, embeddings /
``lm_head`` also get that fallback (FusionBench's ``exclude_keys`` for them).

Memory: experts are streamed (TSV-M and Iso-C read each once, Iso-CTS twice). They are read by
index and never bound to a name, so the previous one is freed before the next is read (a loop
variable, or enumerate's cached tuple, would keep it alive during the read). Besides one expert,
a method holds the fp64 factors Ū (rows×r) and V̄ᵀ (r×cols), or the fp64 sum, and one SVD.

Precision: task vectors are formed in the compute dtype (as FusionBench subtracts state dicts in
the model dtype), then SVDs and products run in the Gram methods' ``precision: auto`` dtype: fp64
on CPU and on GPUs with full-rate FP64 (A100, H100/H200, B200), fp32 elsewhere. fp32 SVDs cannot
be held to 1e-5: FusionBench's own fp32 result differs from its fp64 result by up to 3e-5 on
random task vectors (T = 2–8, 40–256 wide), and by O(1) when a task vector is numerically
rank-deficient (e.g. low-rank fine-tunes stored in fp32, whose tail spectrum is rounding noise).
In fp32, TF32 matmuls stay off unless ``tf32: true``; in fp64 the TF32 switch is irrelevant.

Solver (``svd: auto``, the default): in fp64 each SVD step first tries ``eigh`` of the smaller
Gram matrix (``Solver``), which is several times faster than the thin SVD on CPUs and GPUs alike,
and hands over to the exact SVD whenever the eigenvalues it needs span more than
``GRAM_MAX_COND`` (rank-deficient or nearly so), so its answers stay within ~1e-8 of the exact
path; fp32 always uses the exact SVD. ``svd: exact`` skips the Gram path.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from raymerge.engine.errors import RecipeError

# One meaning of ``precision: auto`` and ``tf32`` for every dense-linear-algebra method.
from raymerge.engine.methods.precision import stats_dtype as solve_dtype
from raymerge.engine.methods.precision import tf32 as _tf32
from raymerge.engine.methods.registry import MergeArgs, MethodSpec, Param, Scope, register

_F64 = 8  # bytes per fp64 element, for memory estimates


def _task_vector(x: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Subtract in the compute dtype first: the very τ FusionBench forms from the checkpoints.
    return (x - base).to(dtype)


# The Gram path accepts a Gram matrix whose eigenvalues span at most this ratio: in fp64 its
# results then carry a relative error of about 1e-16 · 1e8 = 1e-8 (σ_min/σ_max ≥ 1e-4).
GRAM_MAX_COND = 1e8


class Solver:
    """How one tensor's SVD work is done: exact ``torch.linalg.svd``, or the Gram path first.

    The Gram path replaces an SVD of an m×n matrix A by ``eigh`` of the r×r Gram (r = min(m, n)):
    AAᵀ = U Λ Uᵀ gives U, σ = √λ and Vᵀ = Σ⁻¹UᵀA (the other side for tall A). It squares the
    condition number, so it runs only in fp64 and only when the eigenvalues it uses stay within
    ``GRAM_MAX_COND`` of the largest; otherwise (rank-deficient or nearly so) the exact SVD runs
    instead. ``eigh`` of the smaller Gram is 2–6× faster than the thin SVD on CPU (1024×2752: 0.37
    vs 2.3 s) and on GPUs, whose SVD is the slow cuSOLVER routine. ``fallbacks`` counts the exact
    runs the Gram path handed over.
    """

    def __init__(self, mode: str, dtype: torch.dtype) -> None:
        self.gram = mode == "auto" and dtype == torch.float64
        self.fallbacks = 0

    def top(self, a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The k largest singular triplets (U_k, σ_k, V_kᵀ) of ``a``, σ descending."""
        if self.gram:
            out = _top_svd_gram(a, k)
            if out is not None:
                return out
            self.fallbacks += 1
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :k], s[:k], vh[:k]

    def polar(self, a: torch.Tensor, try_gram: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(U Vᵀ, σ) of ``a``: its orthogonal polar factor (closest matrix with orthonormal rows or
        columns) and its singular values (descending for the SVD, ascending for the Gram path).
        ``try_gram=False`` goes straight to the SVD where the Gram path is known to fail."""
        if self.gram and try_gram:
            out = _polar_gram(a)
            if out is not None:
                return out
            self.fallbacks += 1
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u @ vh, s


def _gram_eigh(a: torch.Tensor) -> tuple[bool, torch.Tensor, torch.Tensor]:
    """(tall, λ ascending, Q) of the smaller Gram of ``a``: AᵀA if tall, else AAᵀ."""
    tall = a.shape[0] > a.shape[1]
    lam, q = torch.linalg.eigh(a.T @ a if tall else a @ a.T)
    return tall, lam, q


def _top_svd_gram(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    tall, lam, q = _gram_eigh(a)
    lam_k = lam.flip(0)[:k]
    top, low = (float(x) for x in torch.stack([lam_k[0], lam_k[-1]]).cpu())
    if not top > 0 or low < top / GRAM_MAX_COND:
        return None
    q_k = q.flip(1)[:, :k]
    s = lam_k.sqrt()
    if tall:  # q holds right singular vectors
        return (a @ q_k).div_(s), s, q_k.T.contiguous()
    return q_k.contiguous(), s, (q_k.T @ a).div_(s[:, None])


def _polar_gram(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    tall, lam, q = _gram_eigh(a)
    low, top = (float(x) for x in torch.stack([lam[0], lam[-1]]).cpu())
    if not top > 0 or low < top / GRAM_MAX_COND:
        return None
    s = lam.sqrt()
    inv_sqrt = (q / s) @ q.T  # (AᵀA)^(-1/2) or (AAᵀ)^(-1/2)
    return (a @ inv_sqrt if tall else inv_sqrt @ a), s


def _finish(base: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """base + alpha·delta, summed in the solve dtype and rounded once to the base dtype."""
    return delta.mul_(alpha).add_(base).to(base.dtype)


def tsv_rank(r: int, n_tasks: int) -> int:
    """Components kept per task: FusionBench's ``int(r * (1 / T))`` (float rule, kept on purpose)."""
    return int(r * (1 / n_tasks))


def iso_cts_split(r: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    """(common dimensions, dimensions per task) for Iso-CTS, FusionBench's rounding rule.

    The task-specific total is rounded (Python's round-half-even) to a multiple of T and the
    common space takes the rest; if that rounding overshoots r (only for small fractions, where
    FusionBench fails) one multiple of T less is used.
    """
    common = int(r * fraction)
    specific = round((r - common) / n_tasks) * n_tasks
    if specific > r:
        specific -= n_tasks
    return r - specific, specific // n_tasks


def _opts(args: MergeArgs, base: torch.Tensor) -> tuple[torch.dtype, bool, float, Solver]:
    dtype = solve_dtype(str(args.shared["precision"]), base.device)
    return dtype, bool(args.shared["tf32"]), float(args.shared["alpha"]), Solver(str(args.shared["svd"]), dtype)


# ---------------------------------------------------------------------------------------------
# what every spectral method shares: SVD cost estimates, the numerics parameters, the traits


def _dims(shape: tuple[int, ...]) -> tuple[int, int, int]:
    rows, cols = (tuple(shape) + (1, 1))[:2]
    return rows, cols, min(rows, cols)


def _svd_bytes(rows: int, cols: int) -> int:
    """Peak bytes of one thin fp64 SVD besides its input: LAPACK's copy, U, Vᵀ and workspace.

    The 6·r² workspace term bounds the RSS growth measured for CPU ``torch.linalg.svd`` at
    4096×2048, 3072×3072 and 8192×1024 (2.9–6.3 input sizes in all).
    """
    r = min(rows, cols)
    return _F64 * (rows * cols + rows * r + r * cols + 6 * r * r)


def _svd_flops(rows: int, cols: int) -> int:
    r, big = min(rows, cols), max(rows, cols)
    return 6 * big * r * r + 20 * r**3


def _factor_bytes(shape: tuple[int, ...]) -> int:
    """Concatenated factors Ū (rows×r), σ̄, V̄ᵀ (r×cols) in fp64."""
    rows, cols, r = _dims(shape)
    return _F64 * (rows * r + r + r * cols)


def _finish_bytes(shape: tuple[int, ...]) -> int:
    """Polar factors plus the dense fp64 product at the end."""
    rows, cols, r = _dims(shape)
    return _F64 * (rows * r + r * cols + rows * cols)


S = Scope.SHARED
_ALPHA = Param("alpha", float, S, 1.0, "scale of the merged task vector, applied after the SVD work")
_NUMERICS = (
    Param(
        "precision",
        str,
        S,
        "auto",
        "SVD dtype: auto (fp64 on CPU and fast-FP64 GPUs) | fp32 | fp64",
        ("auto", "fp32", "fp64"),
    ),
    Param("tf32", bool, S, False, "allow TF32 matmuls on CUDA when precision is fp32"),
    Param(
        "svd",
        str,
        S,
        "auto",
        "auto: in fp64, eigh of the smaller Gram matrix where it is well conditioned, else the exact "
        "SVD | exact: always torch.linalg.svd",
        ("auto", "exact"),
    ),
)
_SPECTRAL: dict[str, Any] = {
    "oriented": True,  # input side = columns of an out × in weight (Conv1D weights arrive transposed)
    "applies_to": frozenset({"linear"}),
    "fallback": "mean_task_vector",
    "streams_experts": True,
    "prefers_accelerator": True,
    "work_buffers": lambda n: 2,  # τ_t in the compute dtype and the result
}


def mean_task_vector(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """base + alpha·mean_t τ_t: the spectral methods' rule for tensors they do not apply to."""
    assert base is not None
    total = torch.zeros_like(base)
    n = len(experts)
    for i in range(n):
        total.add_(experts[i])
    alpha = float(args.shared["alpha"])
    if alpha == 1.0:  # bit-identical to the plain mean of the experts
        return total.div_(n)
    return total.div_(n).sub_(base).mul_(alpha).add_(base)


register(
    MethodSpec(
        "mean_task_vector",
        mean_task_vector,
        (_ALPHA,),
        "base + alpha · mean task vector",
        row_separable=True,
        streams_experts=True,
        work_buffers=lambda n: 2,
    )
)


def tsv_m(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """TSV-M: polar(Ū) diag(σ̄) polar(V̄ᵀ) of each task's top int(r/T) triplets, one expert at a time."""
    assert base is not None
    dtype, tf32, alpha, solver = _opts(args, base)
    rows, cols = base.shape
    n_tasks = len(experts)
    k = tsv_rank(min(rows, cols), n_tasks)
    if k == 0:  # more tasks than rank: FusionBench's factors are all zero, so is its τ
        return base.clone()
    dev = base.device
    u_cat = torch.empty(rows, n_tasks * k, dtype=dtype, device=dev)
    s_cat = torch.empty(n_tasks * k, dtype=dtype, device=dev)
    vh_cat = torch.empty(n_tasks * k, cols, dtype=dtype, device=dev)
    with _tf32(tf32):
        for i in range(n_tasks):
            u, s, vh = solver.top(_task_vector(experts[i], base, dtype), k)
            u_cat[:, i * k : (i + 1) * k] = u
            s_cat[i * k : (i + 1) * k] = s
            vh_cat[i * k : (i + 1) * k] = vh
            del u, s, vh
        # FusionBench keeps zero columns/rows for the r − T·k unused slots; they meet zero σ's, so
        # dropping them changes nothing (given full column rank of Ū, as for any generic input).
        u_orth = solver.polar(u_cat)[0].mul_(s_cat)
        del u_cat
        vh_orth = solver.polar(vh_cat)[0]
        del vh_cat
        delta = u_orth @ vh_orth
    return _finish(base, delta, alpha)


def _tsv_extra(shape: tuple[int, ...], item: int) -> int:
    rows, cols, r = _dims(shape)
    per_task = _F64 * rows * cols + _svd_bytes(rows, cols)  # τ in fp64 and its SVD
    polar = max(_svd_bytes(rows, r), _svd_bytes(r, cols)) + _F64 * max(rows, cols) * r
    return _factor_bytes(shape) + max(per_task, polar, _finish_bytes(shape))


def _tsv_flops(shape: tuple[int, ...], n: int) -> int:
    rows, cols, r = _dims(shape)
    return n * _svd_flops(rows, cols) + _svd_flops(rows, r) + _svd_flops(r, cols) + 4 * rows * r * cols


register(
    MethodSpec(
        "tsv_m",
        tsv_m,
        (_ALPHA, *_NUMERICS),
        "https://arxiv.org/abs/2412.00081",
        extra_bytes=_tsv_extra,
        flops=_tsv_flops,
        **_SPECTRAL,
    )
)


def _sum_task_vectors(base: torch.Tensor, experts: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    total = torch.zeros(base.shape, dtype=dtype, device=base.device)
    for i in range(len(experts)):
        total.add_(experts[i] - base)
    return total


def iso_c(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """Iso-C: Σ τ_t = U S Vᵀ → mean(S)·U Vᵀ; needs only the running sum of task vectors."""
    assert base is not None
    dtype, tf32, alpha, solver = _opts(args, base)
    total = _sum_task_vectors(base, experts, dtype)
    with _tf32(tf32):
        # A square sum of task vectors is nearly singular, like a square random matrix (σ_min of
        # order σ_max/n), so the Gram path would only fail its condition test there (measured on
        # 768×768: every time, 0.7× the SVD's speed with the failed attempt); rectangular ones pass.
        delta, s = solver.polar(total, try_gram=total.shape[0] != total.shape[1])
        del total
    return _finish(base, delta.mul_(s.mean()), alpha)


def _iso_c_extra(shape: tuple[int, ...], item: int) -> int:
    rows, cols, _ = _dims(shape)
    return _F64 * rows * cols + max(_svd_bytes(rows, cols), _finish_bytes(shape))


def _iso_c_flops(shape: tuple[int, ...], n: int) -> int:
    rows, cols, r = _dims(shape)
    return n * rows * cols + _svd_flops(rows, cols) + 2 * rows * r * cols


register(
    MethodSpec(
        "iso_c",
        iso_c,
        (_ALPHA, *_NUMERICS),
        "https://arxiv.org/abs/2502.04959",
        extra_bytes=_iso_c_extra,
        flops=_iso_c_flops,
        **_SPECTRAL,
    )
)


def iso_cts(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """Iso-CTS: common space from Σ τ_t (pass 1), task-specific directions per expert (pass 2)."""
    assert base is not None
    dtype, tf32, alpha, solver = _opts(args, base)
    fraction = float(args.shared["common_space_fraction"])
    if not 0.0 <= fraction <= 1.0:
        raise RecipeError(
            f"common_space_fraction must lie in [0, 1], got {fraction}",
            tensor=args.tensor_name,
            hint="FusionBench's default is 0.8",
        )
    rows, cols = base.shape
    r = min(rows, cols)
    n_tasks = len(experts)
    k_common, k_task = iso_cts_split(r, n_tasks, fraction)
    start = n_tasks * k_task  # task blocks first, the common block last (FusionBench's order)
    dev = base.device
    u_cat = torch.empty(rows, r, dtype=dtype, device=dev)
    s_cat = torch.empty(r, dtype=dtype, device=dev)
    vh_cat = torch.empty(r, cols, dtype=dtype, device=dev)
    with _tf32(tf32):
        total = _sum_task_vectors(base, experts, dtype)
        u, s, vh = solver.top(total, k_common)
        del total
        u_cat[:, start:] = u
        s_cat[start:] = s
        vh_cat[start:] = vh
        del u, s, vh
        u_common = u_cat[:, start:]
        for i in range(n_tasks if k_task else 0):
            tau = _task_vector(experts[i], base, dtype)
            tau.addmm_(u_common, u_common.T @ tau, alpha=-1.0)  # remove the common left space
            u, s, vh = solver.top(tau, k_task)
            del tau
            u_cat[:, i * k_task : (i + 1) * k_task] = u
            s_cat[i * k_task : (i + 1) * k_task] = s
            vh_cat[i * k_task : (i + 1) * k_task] = vh
            del u, s, vh
        del u_common
        u_orth = solver.polar(u_cat)[0]
        del u_cat
        vh_orth = solver.polar(vh_cat)[0]
        del vh_cat
        delta = u_orth @ vh_orth
    return _finish(base, delta.mul_(s_cat.mean()), alpha)


def _iso_cts_extra(shape: tuple[int, ...], item: int) -> int:
    return _factor_bytes(shape) + _tsv_extra(shape, item)


def _iso_cts_flops(shape: tuple[int, ...], n: int) -> int:
    rows, cols, r = _dims(shape)
    return _iso_c_flops(shape, n) + n * (4 * rows * r * cols + _svd_flops(rows, cols)) + _tsv_flops(shape, 0)


register(
    MethodSpec(
        "iso_cts",
        iso_cts,
        (
            _ALPHA,
            Param(
                "common_space_fraction",
                float,
                S,
                0.8,
                "share of the rank given to the common subspace",
                low=0.0,
                high=1.0,
            ),
            *_NUMERICS,
        ),
        "https://arxiv.org/abs/2502.04959",
        extra_bytes=_iso_cts_extra,
        flops=_iso_cts_flops,
        **_SPECTRAL,
    )
)
