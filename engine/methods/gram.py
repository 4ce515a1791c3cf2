"""Gram-family merges: one streaming reduction over experts, then a method-specific solve.

For a linear weight of shape [out, in] and task vectors Δ_t = expert_t − base, experts are read
one at a time, each in row chunks, and reduced to

    S = Σ_t w_t C_t   (in × in)      R = Σ_t w_t Δ_t C_t   (out × in)      ΣΔ_t (WUDI only)

with C_t = Δ_tᵀΔ_t. Per expert, a first pass over its row chunks accumulates C_t += δᵀδ and
‖Δ_t‖² (and ΣΔ_t's rows); then S += w_t C_t; a second pass accumulates R's rows += w_t δ C_t
(WUDI's w_t = 1/‖Δ_t‖² is known after the first pass). Then:

* **ACTMat** (Hameed et al., arXiv 2604.01329): w_t = 1, Δ* = R S⁺, the RegMean closed form with
  the data-free covariance estimate C_t ≈ Δ_tᵀΔ_t. S⁺ is ``torch.linalg.pinv``'s (cut-off
  max(dim)·eps·λ_max): by Cholesky when S is certified nonsingular well above that cut-off (then
  S⁺ = S⁻¹; ``eigh.gram_inverse``), else from ``eigh`` of the symmetric S; ``solve: eigh`` always
  takes the eigen-decomposition. ``merge_mode: weight`` gives
  W* = (Σ W_t C_t)(Σ C_t)⁺ = W₀·S S⁺ + Δ*. ``trim: k`` < 1 is the authors' trimmed-covariance
  variant (TACT): C_t = trim(Δ_t)ᵀ trim(Δ_t) from Δ_t's ⌈k·numel⌉ entries largest in magnitude
  (exact threshold streamed by ``gram_trim``), while R = Σ Δ_t C_t keeps the whole Δ_t.
* **RegMean** (Jin et al., ICLR 2023), the data-based original: W* = (Σ_t W_t G̃_t)(Σ_t G̃_t)⁻¹
  with each expert's input Gram G_t = XᵀX/N (given per expert by the ``grams`` parameter) and
  G̃_t = G_t with off-diagonal entries × ``alpha``. B = Σ W_t G̃_t accumulates by row chunks.
  Solved by Cholesky, falling back to the ``eigh`` pseudo-inverse when Σ G̃_t is not certified
  nonsingular (``eigh.gram_inverse``); never
  an explicit inverse.
* **WUDI** (Cheng et al., ICML 2025): w_t = 1/‖Δ_t‖_F², minimising Σ_t ‖(M − Δ_t)Δ_tᵀ‖²/‖Δ_t‖².
  ``solver: adam`` reproduces the paper (M₀ = ΣΔ_t, ``steps`` Adam steps at ``lr`` in fp32) with
  the analytic gradient 2(M S − R): no T×out×out products, no autograd. Row i of the gradient
  depends only on row i of M and Adam is entry-wise, so each block of rows runs its own
  ``steps`` (the same iterates as one whole-matrix run, up to fp32 rounding of the products).
  ``trim`` (closed form only) forms C_t from trim(Δ_t) as ACTMat's does, w_t from the whole Δ_t.
  ``solver: spectral`` is the closed form of gradient flow, M = M₀ − M₀ V f Vᵀ + R V (f/λ) Vᵀ
  with S = V Λ Vᵀ and f = 1 − exp(−λ t); ``solver: adaptive`` keeps f = 1 on the top
  K = ⌈(Σ√λ)²/Σλ⌉ eigendirections and 0 elsewhere; ``solver: closed_form`` is the exact
  minimiser R S⁺.

Every output is produced row block by row block (base rows + λ·Δ* rows) and handed out in the
task's row chunks. The streaming lives in ``gram_stream``, the memory and FLOP models in
``gram_memory``, the eigen-solves in ``eigh``.

Memory: S and one C_t (in × in), R (out × in; ΣΔ too for WUDI) in the statistics dtype, plus
row blocks: O(in² + out·in), independent of the number of experts, and never a whole Δ_t (the
70B down_proj, out 8192 × in 28672, holds 14 GiB in fp64 on CPU instead of ~38). The solve adds
eigenvectors and workspace (``eigh``: 2n² in all above ``eigh.IN_PLACE_BYTES`` on CPU, 4n² below,
3n² on CUDA); RegMean's Cholesky factor is n². On an accelerator all of that is device memory and
the host holds only the row chunks in flight. ``gram_memory`` states the model term by term; on
CPU it bounds the peak resident-set growth measured as tests/parity/test_memory_model.py measures
it by 1.03–1.39× (out × in from 512 × 3072 to 3072 × 512, 4 fp32 experts). Rows are read in
chunks but multiplied in blocks of at least ``gram_stream.BLOCK_ROWS`` rows, so the rank-k
updates of C_t stay compute-bound whatever the chunk size. Each expert is read twice and the base
2T + 1 times (page cache or range reads), the price of never holding a whole Δ_t.

Precision: statistics and solves run in fp64 on CPU and on GPUs with full-rate FP64, fp32
elsewhere (``precision``). TF32 never touches the statistics or the eigen-solves, whatever the
process-wide switch says: S⁺ amplifies TF32's ~5e-4 rounding of S by cond(S) (measured on an H100:
ACTMat in fp32 with TF32 gave 105 % relative error, without it 3e-3). WUDI's Adam loop runs in fp32,
as in the reference implementation, and may use TF32 there (``tf32: true``): its gradient does not
invert S, so the rounding stays at the 1e-3 level. In fp64, chunked and whole-tensor runs differ
only in the blocking of the products: ≤ 4e-15 relative on the merged task vector with a
well-conditioned S, ≤ 3e-12 with nearly low-rank task vectors (S⁺ amplifies the rounding); the
bounded CPU eigen-solver (SciPy ``syevr``) agrees with torch's ``syevd`` as closely (1.5e-14,
3.1e-12). WUDI's Adam arithmetic is ``torch.optim.Adam``'s bit for bit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from raymerge.engine.methods.chunks import ChunkSource
from raymerge.engine.methods.eigh import gram_inverse, sym_eigh, symmetrize_
from raymerge.engine.methods.gram_lora import factored_applies, factored_merge, source_factors
from raymerge.engine.methods.gram_memory import gram_flops, memory_model, regmean_flops
from raymerge.engine.methods.gram_stream import BlockReader, GramStats, gram_stats, pieces, register_gram, row_blocks
from raymerge.engine.methods.precision import stats_dtype, tf32
from raymerge.engine.methods.registry import REQUIRED, MergeArgs, Param, Scope

S_ = Scope.SHARED


_COMMON = (
    Param("lambda", float, S_, 1.0, "scale of the merged task vector"),
    Param(
        "precision",
        str,
        S_,
        "auto",
        "statistics/solve dtype: auto (fp64 on CPU and fast-FP64 GPUs) | fp32 | fp64",
        ("auto", "fp32", "fp64"),
    ),
)
_TF32 = Param("tf32", bool, S_, False, "TF32 matmuls in the Adam iterations on CUDA (never in statistics or solves)")
_TRIM = Param(
    "trim",
    float,
    S_,
    1.0,
    "estimate C_t from Δ_t's top fraction of entries by magnitude (1 = whole Δ_t); R uses the whole Δ_t",
    low=0.0,
    high=1.0,
    low_open=True,
)
_SOLVE = Param(
    "solve",
    str,
    S_,
    "auto",
    "S⁺ by Cholesky when S is certified nonsingular, else by eigh (auto) | always by eigh",
    ("auto", "eigh"),
)
_EIGH_PRECISION = Param(
    "eigh_precision",
    str,
    S_,
    "same",
    "dtype of the eigh fallback of R S⁺: the statistics' (same) | fp32 (half its memory; planned"
    " where the fp64 one would not fit the device)",
    ("same", "fp32"),
)


_INPUTS_ON_DEVICE = Param(
    "inputs_on_device",
    bool,
    S_,
    True,
    "on an accelerator, hold the base and the current expert in device memory, each read once"
    " (planned off where they would not fit)",
)


def _eigh_dtype(p: Mapping[str, Any]) -> torch.dtype | None:
    return torch.float32 if p.get("eigh_precision") == "fp32" else None


_GRAM: dict[str, Any] = {
    "oriented": True,  # input side = columns of an out × in weight (Conv1D weights arrive transposed)
    "applies_to": frozenset({"linear"}),
    "fallback": "mean",
    "streams_experts": True,
    "prefers_accelerator": True,
    "rereads_inputs": True,
    "flops": gram_flops,
}


# How each method accumulates its statistics over experts: ``gram_stats``' per-expert weighting and
# whether it keeps ΣΔ_t. A map-reduce over experts (``engine.reduce``) accumulates a group's the same way.
STATS_OF: dict[str, tuple[str, bool]] = {"actmat": ("none", False), "wudi": ("inv_sq_norm", True)}


def method_stats(
    method: str, src: ChunkSource, reader: BlockReader, blocks: list[list[tuple[int, int]]], p: Mapping[str, Any]
) -> GramStats:
    """The statistics ``method`` (``actmat`` or ``wudi``) solves from, over ``src``'s experts."""
    weighting, with_sum = STATS_OF[method]
    return gram_stats(src, reader, blocks, weighting, with_sum=with_sum, trim=float(p["trim"]))


def actmat(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """ACTMat: W = W₀ + λ·R S⁺ with C_t = Δ_tᵀΔ_t (or weight mode W₀ S S⁺ + λ·R S⁺)."""
    p = args.shared
    facs = source_factors(src) if factored_applies("actmat", p) else None
    if facs is not None:  # LoRA experts: solved in the span of their A factors
        yield from factored_merge("actmat", src, facs, p)
        return
    lam_ = float(p["lambda"])
    blocks = row_blocks(src.ranges)
    reader = BlockReader(blocks, str(p["precision"]))
    with tf32(False):
        st = method_stats("actmat", src, reader, blocks, p)
        S, R, origin = st.S, st.R, st.origin
        del st
        symmetrize_(S)
        ridge = float(p["ridge"])
        if ridge > 0:
            S.diagonal().add_(ridge * float(S.diagonal().mean()))
        pinv = gram_inverse(S, None if p["rcond"] < 0 else float(p["rcond"]), str(p["solve"]), _eigh_dtype(p))
        del S
        for block in blocks:
            rows = slice(block[0][0] - origin, block[-1][1] - origin)
            base = reader.read(src.base, block)
            delta = pinv.apply(R[rows])
            if p["merge_mode"] == "weight":
                out = pinv.project(base)
                out.add_(delta.mul_(lam_))
            else:
                out = delta.mul_(lam_).add_(base)
            del delta
            yield from pieces(out.to(reader.compute), block)


register_gram(
    "actmat",
    actmat,
    (
        *_COMMON,
        Param("merge_mode", str, S_, "delta", "delta: W₀ + R S⁺ | weight: (Σ W_t C_t)(Σ C_t)⁺", ("delta", "weight")),
        Param("ridge", float, S_, 0.0, "add ridge·mean(diag S) to S's diagonal before solving", low=0.0),
        Param("rcond", float, S_, -1.0, "eigenvalue cut-off relative to λ_max (negative: pinv default)"),
        _SOLVE,
        _EIGH_PRECISION,
        _INPUTS_ON_DEVICE,
        _TRIM,
    ),
    "https://arxiv.org/abs/2604.01329",
    memory=memory_model("actmat"),
    **_GRAM,
)


def wudi_adam(M0: torch.Tensor, S: torch.Tensor, R: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """``steps`` of Adam (β = 0.9, 0.999, ε = 1e-8) on Σ_t‖(M−Δ_t)Δ_tᵀ‖²/‖Δ_t‖² from M₀, using the
    gradient 2(M S − R); rows of M₀ and R with the whole S, in fp32.

    The arithmetic is ``torch.optim.Adam``'s (its single-tensor path, operation for operation), written
    out so that no optimizer or autograd machinery is involved: the first ``torch.optim.Adam`` of a
    process imports ~75 MiB of modules, and its buffers are these four: M, its gradient and the
    two moments (plus the denominator while it is formed).
    """
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    M = M0.to(torch.float32, copy=True)
    S32, R32 = S.to(torch.float32), R.to(torch.float32)
    exp_avg, exp_avg_sq = torch.zeros_like(M), torch.zeros_like(M)
    for k in range(1, steps + 1):
        g = M @ S32
        g.sub_(R32).mul_(2)
        exp_avg.lerp_(g, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        del g
        step = float(k)
        denom = exp_avg_sq.sqrt()
        denom.div_((1 - beta2**step) ** 0.5).add_(eps)
        M.addcdiv_(exp_avg, denom, value=-(lr / (1 - beta1**step)))
        del denom
    return M


def wudi_filter(lam: torch.Tensor, solver: str, t: float, keep_fraction: float) -> torch.Tensor:
    """Spectral filter f(λ) of WUDI's closed forms (exponential, or adaptive top-K)."""
    pos = lam.clamp(min=0)
    if solver == "adaptive":
        total = float(pos.sum())
        k = math.ceil(float(pos.sqrt().sum()) ** 2 / total) if total > 0 else 0
        f = torch.zeros_like(lam)
        if k:
            f[torch.argsort(lam, descending=True)[:k]] = 1
        return f
    f = 1 - torch.exp(-pos * t)
    if keep_fraction < 1:
        k = math.ceil(keep_fraction * lam.numel())
        mask = torch.zeros_like(lam)
        mask[torch.argsort(lam, descending=True)[:k]] = 1
        f = f * mask
    return f


def _wudi_rows(
    solver: str, S: torch.Tensor, R: torch.Tensor, M0: torch.Tensor, p: Any
) -> Callable[[slice], torch.Tensor]:
    """The rows of WUDI's merged task vector M for a slice of rows, in the statistics dtype; the
    solve (eigen-decomposition, fp32 copy of S) happens here, once. Consumes S."""
    if solver == "adam":
        S32 = S.to(torch.float32)
        del S
        steps, lr, fast = int(p["steps"]), float(p["lr"]), bool(p["tf32"])

        def adam(rows: slice) -> torch.Tensor:
            with tf32(fast):
                return wudi_adam(M0[rows], S32, R[rows], steps, lr).to(R.dtype)

        return adam
    if solver not in ("spectral", "adaptive", "closed_form"):  # validated by the recipe layer
        raise ValueError(f"unknown WUDI solver {solver!r}")
    if solver == "closed_form":
        pinv = gram_inverse(symmetrize_(S), solve=str(p["solve"]), eigh_dtype=_eigh_dtype(p))
        del S
        return lambda rows: pinv.apply(R[rows])
    lam, V = sym_eigh(symmetrize_(S))
    del S
    f = wudi_filter(lam, solver, float(p["t"]), float(p["keep_fraction"]))
    safe = torch.where(lam > 0, lam, torch.ones_like(lam))
    gain = torch.where(lam > 0, f / safe, torch.zeros_like(lam))

    def spectral(rows: slice) -> torch.Tensor:
        m0 = M0[rows]
        y = m0 @ V
        out = y.mul_(f) @ V.T  # M₀ V f Vᵀ
        torch.sub(m0, out, out=out)
        y = torch.matmul(R[rows], V, out=y)
        return out.addmm_(y.mul_(gain), V.T)  # + R V (f/λ) Vᵀ

    return spectral


def wudi(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """WUDI-Merging: ACTMat's objective with per-task weights 1/‖Δ_t‖²; Adam or closed forms."""
    p = args.shared
    facs = source_factors(src) if factored_applies("wudi", p) else None
    if facs is not None:  # LoRA experts, a closed-form solver: solved in the span of their A factors
        yield from factored_merge("wudi", src, facs, p)
        return
    lam_ = float(p["lambda"])
    blocks = row_blocks(src.ranges)
    reader = BlockReader(blocks, str(p["precision"]))
    with tf32(False):
        st = method_stats("wudi", src, reader, blocks, p)
        S, R, M0, origin = st.S, st.R, st.delta_sum, st.origin
        del st
        assert M0 is not None
        merged_rows = _wudi_rows(str(p["solver"]), S, R, M0, p)
        del S
        for block in blocks:
            merged = merged_rows(slice(block[0][0] - origin, block[-1][1] - origin))
            base = reader.read(src.base, block)
            out = merged.mul_(lam_).add_(base)
            yield from pieces(out.to(reader.compute), block)


def wudi_check(shared: Mapping[str, Any], per_model: Sequence[Mapping[str, Any]]) -> str | None:
    """``trim`` is offered with the closed-form solver only: on the quality suite it left Adam
    unchanged and did not help the spectral filter (README, trimmed covariance)."""
    if float(shared["trim"]) < 1 and shared["solver"] != "closed_form":
        return f"trim applies to solver closed_form only, not {shared['solver']!r}"
    return None


register_gram(
    "wudi",
    wudi,
    (
        *_COMMON,
        _TF32,
        Param(
            "solver",
            str,
            S_,
            "adam",
            "adam | spectral | adaptive | closed_form",
            ("adam", "spectral", "adaptive", "closed_form"),
        ),
        Param("steps", int, S_, 300, "Adam steps", low=1),
        _TRIM,
        _SOLVE,
        _EIGH_PRECISION,
        _INPUTS_ON_DEVICE,
        Param("lr", float, S_, 1e-5, "Adam learning rate", low=0.0, low_open=True),
        Param("t", float, S_, 300.0, "spectral filter time f = 1 − exp(−λt)", low=0.0, low_open=True),
        Param(
            "keep_fraction",
            float,
            S_,
            1.0,
            "spectral: keep only this fraction of top eigendirections",
            low=0.0,
            high=1.0,
            low_open=True,
        ),
    ),
    "https://arxiv.org/abs/2503.08099",
    memory=memory_model("wudi"),
    check=wudi_check,
    **_GRAM,
)


def shrink_off_diagonal_(G: torch.Tensor, alpha: float) -> torch.Tensor:
    """RegMean's G̃ = α·G + (1 − α)·diag(G), in place: off-diagonal entries scaled by α, the
    diagonal kept (as α·G_ii + (1 − α)·G_ii, the out-of-place formula's rounding); returns G."""
    if alpha != 1:
        diag = G.diagonal().clone()
        G.mul_(alpha)
        G.diagonal().add_(diag, alpha=1 - alpha)
    return G


def regmean(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """RegMean: W* = (Σ W_t G̃_t)(Σ G̃_t)⁻¹ from per-expert input Grams, one expert at a time."""
    p = args.shared
    alpha = float(p["alpha"])
    if len(args.aux) != src.n_experts:
        raise ValueError(f"regmean needs one Gram matrix per expert (args.aux), got {len(args.aux)}")
    blocks = row_blocks(src.ranges)
    reader = BlockReader(blocks, str(p["precision"]))
    origin, end = blocks[0][0][0], blocks[-1][-1][1]
    with tf32(False):
        A: torch.Tensor | None = None
        B: torch.Tensor | None = None
        for t in range(src.n_experts):
            G = args.aux[t]
            g = G.to(stats_dtype(str(p["precision"]), G.device))
            if alpha != 1 and g.data_ptr() == G.data_ptr():
                g = g.clone()  # never scale the caller's matrix
            del G
            shrink_off_diagonal_(g, alpha)
            A = g.clone() if A is None else A.add_(g)
            for block in blocks:
                x = reader.read(functools.partial(src.expert, t), block)
                if B is None:
                    B = torch.zeros(end - origin, x.shape[1], dtype=x.dtype, device=x.device)
                B[block[0][0] - origin : block[-1][1] - origin].addmm_(x, g)  # W_t G̃_t (G̃ is symmetric)
            del g
        assert A is not None and B is not None
        # Cholesky when Σ G̃_t is certified nonsingular (``eigh.gram_inverse``), else the pseudo-inverse
        inverse = gram_inverse(symmetrize_(A), solve=str(p["solve"]), eigh_dtype=_eigh_dtype(p))
        del A
        for block in blocks:
            merged = inverse.apply(B[block[0][0] - origin : block[-1][1] - origin])
            yield from pieces(merged.to(reader.compute), block)


register_gram(
    "regmean",
    regmean,
    (
        Param("grams", str, Scope.MODEL, REQUIRED, "directory or .safetensors file of this expert's input Grams"),
        Param(
            "alpha",
            float,
            S_,
            0.95,
            "off-diagonal scale of the Grams (1 = exact RegMean, 0 = diagonal only)",
            low=0.0,
            high=1.0,
        ),
        _COMMON[1],
        _SOLVE,
        _EIGH_PRECISION,
    ),
    "https://arxiv.org/abs/2212.09849",
    memory=memory_model("regmean"),
    **{**_GRAM, "aux_param": "grams", "needs_base": False, "flops": regmean_flops, "rereads_inputs": False},
)


__all__ = ["STATS_OF", "actmat", "method_stats", "regmean", "shrink_off_diagonal_", "wudi", "wudi_adam", "wudi_filter"]
