"""Gram-family merges: one streaming reduction over experts, then a method-specific solve.

For a linear weight of shape [out, in] and task vectors Δ_t = expert_t − base, experts are read
one at a time and reduced to

    S = Σ_t w_t Δ_tᵀΔ_t   (in × in)      R = Σ_t w_t Δ_t (Δ_tᵀΔ_t)   (out × in)      ΣΔ_t

so memory is O(in² + out·in) whatever the number of experts. Then:

* **ACTMat** (Hameed et al., arXiv 2604.01329): w_t = 1, Δ* = R S⁺, the RegMean closed form with
  the data-free covariance estimate C_t ≈ Δ_tᵀΔ_t. S⁺ comes from ``eigh`` of the symmetric S with
  ``torch.linalg.pinv``'s default cut-off (max(dim)·eps·λ_max). ``merge_mode: weight`` gives
  W* = (Σ W_t C_t)(Σ C_t)⁺ = W₀·S S⁺ + Δ*.
* **RegMean** (Jin et al., ICLR 2023), the data-based original: W* = (Σ_t W_t G̃_t)(Σ_t G̃_t)⁻¹
  with each expert's input Gram G_t = XᵀX/N (given per expert by the ``grams`` parameter) and
  G̃_t = G_t with off-diagonal entries × ``alpha``. Solved by Cholesky, falling back to the
  ``eigh`` pseudo-inverse when Σ G̃_t is singular; never an explicit inverse.
* **WUDI** (Cheng et al., ICML 2025): w_t = 1/‖Δ_t‖_F², minimising Σ_t ‖(M − Δ_t)Δ_tᵀ‖²/‖Δ_t‖².
  ``solver: adam`` reproduces the paper (M₀ = ΣΔ_t, ``steps`` Adam steps at ``lr`` in fp32) with
  the analytic gradient 2(M S − R): no T×out×out products, no autograd. ``solver: spectral``
  is the closed form of gradient flow, M = M₀ − M₀ V f Vᵀ + R V (f/λ) Vᵀ with S = V Λ Vᵀ and
  f = 1 − exp(−λ t); ``solver: adaptive`` keeps f = 1 on the top K = ⌈(Σ√λ)²/Σλ⌉ eigen-
  directions and 0 elsewhere; ``solver: closed_form`` is the exact minimiser R S⁺.

Precision: statistics and solves run in fp64 on CPU and on GPUs with full-rate FP64, fp32
elsewhere (``precision``). TF32 never touches the statistics or the eigen-solves, whatever the
process-wide switch says: S⁺ amplifies TF32's ~5e-4 rounding of S by cond(S) (measured on an H100:
ACTMat in fp32 with TF32 gave 105 % relative error, without it 3e-3). WUDI's Adam loop runs in fp32,
as in the reference implementation, and may use TF32 there (``tf32: true``): its gradient does not
invert S, so the rounding stays at the 1e-3 level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from raymerge.engine.methods.precision import stats_dtype, tf32
from raymerge.engine.methods.registry import REQUIRED, MergeArgs, MethodSpec, Param, Scope, register

S_ = Scope.SHARED


@dataclass
class GramStats:
    """Accumulated statistics of one linear weight over experts."""

    S: torch.Tensor  # in × in, Σ w_t Δ_tᵀΔ_t
    R: torch.Tensor  # out × in, Σ w_t Δ_t Δ_tᵀΔ_t
    delta_sum: torch.Tensor  # out × in, Σ Δ_t
    count: int
    sq_norms: list[float]


def gram_stats(base: torch.Tensor, experts: Sequence[torch.Tensor], weighting: str, dtype: torch.dtype) -> GramStats:
    """Stream over ``experts`` once and accumulate S, R, ΣΔ (weights 1 or 1/‖Δ‖²)."""
    rows, cols = base.shape
    S = torch.zeros(cols, cols, dtype=dtype, device=base.device)
    R = torch.zeros(rows, cols, dtype=dtype, device=base.device)
    total = torch.zeros(rows, cols, dtype=dtype, device=base.device)
    base_d = base.to(dtype)
    norms: list[float] = []
    n = 0
    for x in experts:
        d = x.to(dtype) - base_d
        del x
        sq = float((d * d).sum())
        norms.append(sq)
        w = 1.0 if weighting == "none" else (1.0 / sq if sq > 0 else 0.0)
        c = d.T @ d
        S.add_(c, alpha=w)
        # Δ(ΔᵀΔ) = (ΔΔᵀ)Δ: for wide matrices (out < in) the out×out product is the cheaper one.
        R.add_((d @ d.T) @ d if rows < cols else d @ c, alpha=w)
        total.add_(d)
        del c, d
        n += 1
    return GramStats(S, R, total, n, norms)


def _eigh(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of the symmetric S (symmetrised first against rounding)."""
    lam, V = torch.linalg.eigh((S + S.T) / 2)
    return lam, V


def pinv_apply(R: torch.Tensor, S: torch.Tensor, rcond: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """R S⁺ via ``eigh``; cut-off ``rcond``·λ_max (default max(dim)·eps, as ``torch.linalg.pinv``).

    Returns (R S⁺, the projector-onto-range basis V_kept) so callers can form S S⁺ = V Vᵀ.
    """
    lam, V = _eigh(S)
    if rcond is None:
        rcond = S.shape[0] * torch.finfo(S.dtype).eps
    top = lam.abs().max() if lam.numel() else torch.tensor(0.0)
    keep = lam > rcond * top
    Vk = V[:, keep]
    return ((R @ Vk) / lam[keep]) @ Vk.T, Vk


# ---------------------------------------------------------------------------------------------
# what every Gram method shares: its memory model, the numerics parameters, the planner traits


def _gram_extra(shape: tuple[int, ...], item: int) -> int:
    cols = shape[1] if len(shape) == 2 else 0
    return 4 * cols * cols * 8  # S, one C_t, eigenvectors and a temporary, fp64 at worst


def _gram_flops(shape: tuple[int, ...], n: int) -> int:
    rows, cols = (shape + (1, 1))[:2]
    return n * 4 * rows * cols * cols + 10 * cols**3


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
_GRAM: dict[str, Any] = {
    "oriented": True,  # input side = columns of an out × in weight (Conv1D weights arrive transposed)
    "applies_to": frozenset({"linear"}),
    "fallback": "mean",
    "streams_experts": True,
    "prefers_accelerator": True,
    "work_buffers": lambda n: 14,
    "extra_bytes": _gram_extra,
    "flops": _gram_flops,
}


def actmat(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """ACTMat: W = W₀ + λ·R S⁺ with C_t = Δ_tᵀΔ_t (or weight mode W₀ S S⁺ + R S⁺)."""
    assert base is not None
    p = args.shared
    dtype = stats_dtype(str(p["precision"]), base.device)
    with tf32(False):
        st = gram_stats(base, experts, "none", dtype)
        ridge = float(p["ridge"])
        S = st.S
        if ridge > 0:
            S = S + ridge * (torch.diagonal(S).mean()) * torch.eye(S.shape[0], dtype=dtype, device=S.device)
        delta, Vk = pinv_apply(st.R, S, None if p["rcond"] < 0 else float(p["rcond"]))
        if p["merge_mode"] == "weight":
            projected = (base.to(dtype) @ Vk) @ Vk.T
            return (projected + float(p["lambda"]) * delta).to(base.dtype)
    return (base.to(dtype) + float(p["lambda"]) * delta).to(base.dtype)


register(
    MethodSpec(
        "actmat",
        actmat,
        (
            *_COMMON,
            Param(
                "merge_mode", str, S_, "delta", "delta: W₀ + R S⁺ | weight: (Σ W_t C_t)(Σ C_t)⁺", ("delta", "weight")
            ),
            Param("ridge", float, S_, 0.0, "add ridge·mean(diag S) to S's diagonal before solving", low=0.0),
            Param("rcond", float, S_, -1.0, "eigenvalue cut-off relative to λ_max (negative: pinv default)"),
        ),
        "https://arxiv.org/abs/2604.01329",
        **_GRAM,
    )
)


def wudi_adam(M0: torch.Tensor, S: torch.Tensor, R: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """``steps`` of torch Adam on Σ_t‖(M−Δ_t)Δ_tᵀ‖²/‖Δ_t‖² from M₀, using the gradient 2(M S − R)."""
    M = torch.nn.Parameter(M0.to(torch.float32).clone())
    S32, R32 = S.to(torch.float32), R.to(torch.float32)
    opt = torch.optim.Adam([M], lr=lr)
    for _ in range(steps):
        with torch.no_grad():
            g = M @ S32
            g.sub_(R32).mul_(2)
        M.grad = g
        opt.step()
    return M.detach()


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


def wudi(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """WUDI-Merging: ACTMat's objective with per-task weights 1/‖Δ_t‖²; Adam or closed forms."""
    assert base is not None
    p = args.shared
    solver = str(p["solver"])
    dtype = stats_dtype(str(p["precision"]), base.device)
    with tf32(False):
        st = gram_stats(base, experts, "inv_sq_norm", dtype)
        if solver == "adam":
            with tf32(bool(p["tf32"])):
                merged = wudi_adam(st.delta_sum, st.S, st.R, int(p["steps"]), float(p["lr"])).to(dtype)
        elif solver == "closed_form":
            merged, _ = pinv_apply(st.R, st.S)
        elif solver in ("spectral", "adaptive"):
            lam, V = _eigh(st.S)
            f = wudi_filter(lam, solver, float(p["t"]), float(p["keep_fraction"]))
            safe = torch.where(lam > 0, lam, torch.ones_like(lam))
            gain = torch.where(lam > 0, f / safe, torch.zeros_like(lam))
            M0 = st.delta_sum
            merged = M0 - ((M0 @ V) * f) @ V.T + ((st.R @ V) * gain) @ V.T
        else:  # validated by the recipe layer; kept for direct callers
            raise ValueError(f"unknown WUDI solver {solver!r}")
    return (base.to(dtype) + float(p["lambda"]) * merged).to(base.dtype)


register(
    MethodSpec(
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
        **_GRAM,
    )
)


def shrink_off_diagonal(G: torch.Tensor, alpha: float) -> torch.Tensor:
    """RegMean's G̃ = α·G + (1 − α)·diag(G): off-diagonal entries scaled by α, diagonal kept."""
    if alpha == 1:
        return G
    out = G * alpha
    out.diagonal().add_(G.diagonal(), alpha=1 - alpha)
    return out


def regmean(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """RegMean: W* = (Σ W_t G̃_t)(Σ G̃_t)⁻¹ from per-expert input Grams, one expert at a time."""
    p = args.shared
    alpha = float(p["alpha"])
    with tf32(False):
        A: torch.Tensor | None = None
        B: torch.Tensor | None = None
        out_dtype = None
        for x, G in zip(experts, args.aux, strict=True):
            dtype = stats_dtype(str(p["precision"]), x.device)
            out_dtype = x.dtype
            g = shrink_off_diagonal(G.to(dtype), alpha)
            xb = x.to(dtype) @ g  # W_t G̃_t (G̃ is symmetric)
            A = g.clone() if A is None else A.add_(g)
            B = xb if B is None else B.add_(xb)
            del x, G, g, xb
        assert A is not None and B is not None and out_dtype is not None
        A = (A + A.T) / 2
        chol, info = torch.linalg.cholesky_ex(A)
        # Cholesky can "succeed" on a numerically singular matrix; trust it only when the factor's
        # diagonal shows a condition number the pinv cut-off would keep whole.
        d = chol.diagonal()
        cutoff = A.shape[0] * torch.finfo(A.dtype).eps
        if int(info) == 0 and float((d.min() / d.max()) ** 2) > cutoff:
            merged = torch.cholesky_solve(B.T, chol).T  # B A⁻¹ without forming A⁻¹
        else:
            merged, _ = pinv_apply(B, A)
    return merged.to(out_dtype)


register(
    MethodSpec(
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
        ),
        "https://arxiv.org/abs/2212.09849",
        **{**_GRAM, "aux_param": "grams", "needs_base": False},
    )
)
