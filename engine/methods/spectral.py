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

TSV-M on LoRA experts (every one base + s·B·A, offered by the task's stream) works on the factors
(``gram_lora.tsv_m_factored``).

All three return base + alpha·τ (alpha applied after the SVD work). They apply to linear weights;
other tensors get ``mean_task_vector`` = base + alpha·mean_t τ_t, FusionBench's rule for non-2-D
keys (the plain mean of the experts at the default alpha = 1). Unlike FusionBench, embeddings /
``lm_head`` also get that fallback (FusionBench's ``exclude_keys`` for them).

Memory: experts are streamed (TSV-M and Iso-C read each once, Iso-CTS twice). They are read by
index and never bound to a name, so the previous one is freed before the next is read (a loop
variable, or enumerate's cached tuple, would keep it alive during the read). Besides one expert,
a method holds the factors Ū (rows×r) and V̄ᵀ (r×cols), or the sum, in the solve dtype, and one
SVD. Each method's memory model (``_Live``, ``_memory``) lists those buffers phase by phase, in
the solve dtype the plan records (``WorkShape.stats_item``), for CPU tasks (host memory) and for
accelerator tasks (device memory; the host holds row chunks in flight).

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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from raymerge.engine.errors import RecipeError
from raymerge.engine.methods.gram_lora import stream_factors, tsv_m_factored
from raymerge.engine.methods.polar import Solver

# One meaning of ``precision: auto`` and ``tf32`` for every dense-linear-algebra method.
from raymerge.engine.methods.precision import stats_dtype as solve_dtype
from raymerge.engine.methods.precision import tf32 as _tf32
from raymerge.engine.methods.registry import (
    Footprint,
    MemoryModel,
    MergeArgs,
    MethodSpec,
    Param,
    Scope,
    WorkShape,
    register,
)


def _task_vector(x: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Subtract in the compute dtype first: the very τ FusionBench forms from the checkpoints.
    return (x - base).to(dtype)


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
# what every spectral method shares: memory and SVD cost models, the numerics parameters, the traits


def _dims(shape: tuple[int, ...]) -> tuple[int, int, int]:
    rows, cols = (tuple(shape) + (1, 1))[:2]
    return rows, cols, min(rows, cols)


def _svd_flops(rows: int, cols: int) -> int:
    r, big = min(rows, cols), max(rows, cols)
    return 6 * big * r * r + 20 * r**3


# Memory. A method's model lists the live buffers of each phase of its function; the task's peak
# is its largest phase plus the inputs held throughout (``_Live.held``). Every SVD step is charged
# as the exact SVD whatever ``svd`` says: the Gram path hands over to it on rank-deficient inputs
# (low-rank fine-tunes do that), and its own buffers are smaller. On CPU all of it is host memory,
# checked against the measured resident-set growth of real tasks by
# tests/parity/test_memory_model.py (with glibc's mmap threshold pinned, as executors must run
# tasks: glibc's default dynamic threshold keeps up to 64 MiB of freed buffers resident per
# arena). On an accelerator the phases are device memory and the host holds row chunks in flight.

# Resident bytes a CPU task adds besides its buffers: MKL's cached BLAS buffers (its fast memory
# manager keeps them), library code paged in on first use, small allocations (measured 2–6 MiB).
_CPU_RESIDUE = 8 << 20


@dataclass(frozen=True)
class _Live:
    """The sizes a spectral task's phases are made of, in bytes unless named otherwise.

    ``rows``×``cols`` (r = the smaller) is the matrix as the method sees it, ``n`` its elements;
    ``s``, ``c``, ``i``, ``o``: bytes per element of the solve, compute, stored and output dtypes;
    ``held``: the inputs resident for the whole task; ``cur``: the expert being read, beyond
    ``held``; ``device``: the phases are accelerator memory (other SVD workspace and writing).
    """

    rows: int
    cols: int
    r: int
    n: int
    s: int
    c: int
    i: int
    o: int
    held: int
    cur: int
    device: bool

    @classmethod
    def of(cls, w: WorkShape, device: bool) -> _Live:
        rows, cols, r = _dims(w.chunk_shape)
        n, c = w.numel, w.compute_item
        if device or w.in_item != w.compute_item:
            # Inputs are converted copies (on CPU the stream drops each one's mapped pages once
            # copied): the base stays, one expert at a time passes through.
            held, cur = n * c * (w.inputs - w.experts), n * c
        else:
            # Zero-copy views of the mapped files: each input's pages, once read, stay resident until
            # the task ends (``run_task`` releases them then), so all of them count.
            held, cur = n * w.in_item * w.inputs, 0
        return cls(rows, cols, r, n, w.stats_item, c, w.in_item, w.out_item, held, cur, device)

    def mat(self, m: int, k: int) -> int:
        """An m×k matrix in the solve dtype."""
        return self.s * m * k

    def svd(self, m: int, k: int) -> int:
        """One thin SVD of an m×k matrix besides its input: the solver's copy of it, U, Vᵀ, and
        5.5·r² of workspace, which bounds CPU ``torch.linalg.svd`` (MKL gesdd: 3–4.1·r² measured
        at 512×512 to 4096×1024, wide and tall, plus an r×r buffer MKL keeps from one call to the
        next). It also bounds the Gram path (Gram matrix, ``eigh`` and its workspace, one factor)
        and ``Solver.polar`` either way, whose product U Vᵀ takes the room of the freed copy and
        workspace.

        On CUDA one more m×k matrix and 2·r²: cuSOLVER's workspace; measured on an H200 (torch
        2.11, fp64, 512×2048) at 0.97× this figure for the exact SVD, and at 0.45× for the Gram
        path that ``svd: auto`` takes first (the figure covers the SVD it falls back to).
        """
        r = min(m, k)
        own = self.s * (m * k + m * r + r * k) + self.s * 11 * r * r // 2
        return own + self.mat(m, k) + 2 * self.s * r * r if self.device else own

    def read(self) -> int:
        """Reading one input, beyond ``held``: a converted copy (with the stored pages it is made
        from, dropped afterwards), and the stream's finiteness check (``torch.isfinite``: a copy
        of |x| and three boolean masks)."""
        check = self.n * (self.c + 3)
        return self.cur + max(self.n * self.i, check) if self.cur else check

    def task_vector(self) -> int:
        """Forming one τ_t: the expert, the difference in the compute dtype, τ in the solve dtype
        (more than ``read`` for a solve dtype of 4 or 8 bytes)."""
        return self.cur + self.n * (self.c + self.s)

    def finish(self) -> int:
        """``_finish`` and writing: δ in the solve dtype, then ``add_``'s promoted copy of the base
        or the rounded result; then the result and its output copy (two where a Conv1D result is
        made contiguous; from an accelerator rows leave one chunk at a time, see ``_memory``)."""
        result = self.n * self.c + (0 if self.device else 2 * self.n * self.o)
        return max(self.n * self.s + max(self.n * self.s, self.n * self.c), result)


def _memory(phases: Callable[[_Live, int], int]) -> MemoryModel:
    """A spectral method's ``MemoryModel`` from ``phases(live, experts)``: its peak besides the
    held inputs.

    CPU: host = held inputs + the largest phase + ``_CPU_RESIDUE``. Accelerator: the inputs reach
    the device one row chunk at a time (host: the stored chunk and its converted copy), the result
    leaves the same way (host: the output chunk and a contiguous copy of it, for ``Transposed``
    results), so host bytes do not grow with the layer; the device holds the base, the phases
    and one output chunk.
    """

    def memory(w: WorkShape, on_accelerator: bool) -> Footprint:
        live = _Live.of(w, on_accelerator)
        peak = live.held + phases(live, w.experts)
        if not on_accelerator:
            return Footprint(host=peak + _CPU_RESIDUE)
        chunk = w.chunk_numel
        return Footprint(host=w.host_in_flight + 2 * chunk * w.out_item, device=peak + chunk * w.out_item)

    return memory


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


def _mean_task_vector_memory(w: WorkShape, on_accelerator: bool) -> Footprint:
    """Held inputs, the running sum, then reading one input or the output copy. Tasks are row
    chunks (``row_separable``), so on an accelerator the host holds one input chunk and its
    converted copy, then the output chunk."""
    live = _Live.of(w, on_accelerator)
    peak = live.held + w.numel * w.compute_item + max(live.read(), w.numel * w.out_item)
    if not on_accelerator:
        return Footprint(host=peak + _CPU_RESIDUE)
    return Footprint(host=w.host_in_flight + w.chunk_numel * w.out_item, device=peak)


register(
    MethodSpec(
        "mean_task_vector",
        mean_task_vector,
        (_ALPHA,),
        "base + alpha · mean task vector",
        row_separable=True,
        streams_experts=True,
        memory=_mean_task_vector_memory,
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
    if (facs := stream_factors(experts)) is not None:  # LoRA experts: in the span of their factors
        with _tf32(tf32):
            return _finish(base, tsv_m_factored(base, facs, k, dtype), alpha)
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
        u_orth = solver.polar(u_cat, values=False)[0].mul_(s_cat)
        del u_cat
        vh_orth = solver.polar(vh_cat, values=False)[0]
        del vh_cat
        delta = u_orth @ vh_orth
    return _finish(base, delta, alpha)


def _tsv_phases(m: _Live, n_tasks: int) -> int:
    kept = n_tasks * tsv_rank(m.r, n_tasks)  # columns of Ū, rows of V̄ᵀ
    u, vh = m.mat(m.rows, kept), m.mat(kept, m.cols)
    factors = u + vh + m.s * kept  # written slice by slice: every page is touched by the end
    return max(
        factors + m.task_vector(),
        factors + m.n * m.s + m.svd(m.rows, m.cols),  # τ_t and its SVD
        factors + m.svd(m.rows, kept),
        u + vh + m.svd(kept, m.cols),  # Ū's polar factor, V̄ᵀ and its polar work
        u + vh + m.finish(),
    )


def _tsv_flops(shape: tuple[int, ...], n: int) -> int:
    rows, cols, r = _dims(shape)
    return n * _svd_flops(rows, cols) + _svd_flops(rows, r) + _svd_flops(r, cols) + 4 * rows * r * cols


register(
    MethodSpec(
        "tsv_m",
        tsv_m,
        (_ALPHA, *_NUMERICS),
        "https://arxiv.org/abs/2412.00081",
        memory=_memory(_tsv_phases),
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
        assert s is not None
        del total
    return _finish(base, delta.mul_(s.mean()), alpha)


def _iso_c_phases(m: _Live, n_tasks: int) -> int:
    total = m.n * m.s
    return max(
        total + m.cur + m.n * (m.c + m.s),  # the sum, τ_t in the compute dtype, add_'s promoted copy
        total + m.svd(m.rows, m.cols),
        m.finish(),
    )


def _iso_c_flops(shape: tuple[int, ...], n: int) -> int:
    rows, cols, r = _dims(shape)
    return n * rows * cols + _svd_flops(rows, cols) + 2 * rows * r * cols


register(
    MethodSpec(
        "iso_c",
        iso_c,
        (_ALPHA, *_NUMERICS),
        "https://arxiv.org/abs/2502.04959",
        memory=_memory(_iso_c_phases),
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
        u_orth = solver.polar(u_cat, values=False)[0]
        del u_cat
        vh_orth = solver.polar(vh_cat, values=False)[0]
        del vh_cat
        delta = u_orth @ vh_orth
    return _finish(base, delta.mul_(s_cat.mean()), alpha)


def _iso_cts_phases(m: _Live, n_tasks: int) -> int:
    u, vh = m.mat(m.rows, m.r), m.mat(m.r, m.cols)
    factors = u + vh + m.s * m.r  # allocated before pass 1, touched from the common SVD on
    tau = m.n * m.s
    # The projection of a τ_t (u_cᵀτ_t, k_c×cols) is smaller than the SVD that follows it.
    return max(
        m.cur + m.n * m.c + 2 * tau,  # pass 1: the sum, as in Iso-C
        factors + tau + m.svd(m.rows, m.cols),  # the common space; later each τ_t's SVD
        factors + m.task_vector(),
        factors + m.svd(m.rows, m.r),
        u + vh + m.s * m.r + m.svd(m.r, m.cols),
        u + vh + m.finish(),
    )


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
        memory=_memory(_iso_cts_phases),
        flops=_iso_cts_flops,
        **_SPECTRAL,
    )
)
