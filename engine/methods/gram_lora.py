"""ACTMat, WUDI's closed forms and TSV-M on LoRA experts in factored form: never an in × in matrix.

When every expert is a LoRA adapter on the merge's base, Δ_t = s_t B_t A_t (A_t: r_t × in, B_t:
out × r_t) exactly, and every statistic lives in the span of the stacked A's (K = Σ r_t rows).
With Aᵀ = [A_1; …; A_T]ᵀ = Q L (thin QR: Q in × K orthonormal, L K × K, L_t its block of columns
for task t, so A_t = L_tᵀ Qᵀ):

    S  = Σ w_t s_t² A_tᵀ (B_tᵀB_t) A_t                = Q M Qᵀ,  M = Σ w_t s_t² L_t (B_tᵀB_t) L_tᵀ
    R  = Σ w_t s_t³ B_t (A_tA_tᵀ)(B_tᵀB_t) A_t        = Y Qᵀ,    Y = Σ w_t s_t³ B_t (A_tA_tᵀ)(B_tᵀB_t) L_tᵀ
    ΣΔ = Σ s_t B_t A_t                                = Z Qᵀ,    Z = Σ s_t B_t L_tᵀ
    ‖Δ_t‖² = s_t² tr((B_tᵀB_t)(A_tA_tᵀ))

S's eigenvectors with non-zero eigenvalues are Q U (M = U Λ Uᵀ); the others are orthogonal to
every row of R, ΣΔ and the A's. So R S⁺ = (Y U Λ⁺ Uᵀ) Qᵀ, with the cut-off of the dense path
(``torch.linalg.pinv``'s in·eps·λ_max, in = the dense dimension) applied to Λ; a ridge ε·I adds ε to
Λ (and its null-space directions meet zero rows); WUDI's spectral filters act on Λ (f(0) = 0 on
the null space). Every merged task vector is X Qᵀ with X out × K, written row block by row block
(base rows + λ·X_rows Qᵀ). ACTMat's weight mode projects the base rows onto Q U_kept.

Not factored (the dense path runs): ``trim`` < 1 (a trimmed Δ_t is not low-rank), WUDI's Adam
(entry-wise, it leaves the span), weight mode with a ridge, adapters stored transposed (Conv1D
``fan_in_fan_out``, embeddings), and any expert that is not exactly base + adapter.

Memory: the factors (K·(in + out)), Q (in × K), Y and Z (out × K), K × K matrices, and the output
row blocks: O(K·(in + out)) in the statistics dtype, against O(in² + out·in) dense.

TSV-M (``tsv_m_factored``, called from ``spectral.tsv_m`` when the expert stream offers factors)
takes each task's singular triplets from an r_t × r_t core and the polar factors from K' × K'
ones; see its docstring for where it can differ from the dense path.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from raymerge.engine.methods.chunks import ChunkSource
from raymerge.engine.methods.gram_stream import BlockReader, pieces, row_blocks
from raymerge.engine.methods.precision import stats_dtype, tf32


@dataclass(frozen=True)
class Factors:
    """Expert t's task vector Δ_t = scale · B @ A over the task's rows (A: r × in, B: rows × r)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float


def factored_applies(method: str, shared: Mapping[str, Any]) -> bool:
    """Whether ``method`` with these parameters has a factored path (the data does not matter here)."""
    if method == "actmat":
        return float(shared.get("trim", 1.0)) >= 1 and not (
            shared.get("merge_mode") == "weight" and float(shared.get("ridge", 0.0)) > 0
        )
    if method == "wudi":
        return shared.get("solver", "adam") != "adam" and float(shared.get("trim", 1.0)) >= 1
    return method == "tsv_m"


def factored_rank(
    method: str, shared: Mapping[str, Any], refs: Sequence[Any], lora: Sequence[Any], has_base: bool
) -> int:
    """Σ r_t when a task of ``method`` will run factored: every expert is the base's tensor (the
    same stored bytes, ``refs``) plus an adapter stored out × in (``lora``, per input); else 0."""
    if not has_base or not lora or lora[0] is not None or not factored_applies(method, shared):
        return 0
    total = 0
    for ref, lo in zip(refs[1:], lora[1:], strict=True):
        if lo is None or lo.transposed or ref != refs[0]:
            return 0
        total += int(lo.a_shape[0])
    return total


def source_factors(src: ChunkSource) -> list[Factors] | None:
    """Every expert's factors when the source offers them for all (``src.lora_factors(t)``)."""
    get = getattr(src, "lora_factors", None)
    if get is None or not src.has_base or src.n_experts == 0:  # a map-reduce's reduce reads no expert
        return None
    out = []
    for t in range(src.n_experts):
        f = get(t)
        if f is None:
            return None
        out.append(f)
    return out


@dataclass
class _Span:
    Q: torch.Tensor  # in × K, orthonormal columns spanning the rows of every A_t
    M: torch.Tensor  # K × K: S = Q M Qᵀ
    Y: torch.Tensor  # out × K: R = Y Qᵀ
    Z: torch.Tensor | None  # out × K: ΣΔ = Z Qᵀ


def _span(facs: Sequence[Factors], weighting: str, with_sum: bool, dtype: torch.dtype) -> _Span:
    A = torch.cat([f.A.to(dtype) for f in facs])  # K × in
    Q, L = torch.linalg.qr(A.T)  # Aᵀ = Q L
    del A
    K = L.shape[1]
    rows = facs[0].B.shape[0]
    M = torch.zeros(K, K, dtype=dtype, device=Q.device)
    Y = torch.zeros(rows, K, dtype=dtype, device=Q.device)
    Z = torch.zeros(rows, K, dtype=dtype, device=Q.device) if with_sum else None
    at = 0
    for f in facs:
        r = f.A.shape[0]
        Lt = L[:, at : at + r]  # A_t = Lt ᵀ Qᵀ
        at += r
        B = f.B.to(dtype)
        s = float(f.scale)
        btb = B.T @ B
        aat = Lt.T @ Lt  # A_t A_tᵀ (Q orthonormal)
        sq = s * s * float((btb * aat).sum())  # ‖Δ_t‖² = s² tr(BᵀB AAᵀ)
        w = 1.0 if weighting == "none" else (1.0 / sq if sq > 0 else 0.0)
        M.add_(Lt @ btb @ Lt.T, alpha=w * s * s)
        Y.add_(B @ (aat @ btb @ Lt.T), alpha=w * s**3)
        if Z is not None:
            Z.add_(B @ Lt.T, alpha=s)
    M = (M + M.T) / 2
    return _Span(Q, M, Y, Z)


def _cutoff(lam: torch.Tensor, n: int, rcond: float | None) -> torch.Tensor:
    """Eigenvalues kept by the dense path's pseudo-inverse of the n × n S (``eigh.Pseudoinverse``)."""
    if rcond is None:
        rcond = n * torch.finfo(lam.dtype).eps
    top = lam.abs().max() if lam.numel() else torch.tensor(0.0, dtype=lam.dtype)
    return lam > rcond * top


def _wudi_filter(lam: torch.Tensor, n: int, solver: str, t: float, keep_fraction: float) -> torch.Tensor:
    """WUDI's spectral filter on M's eigenvalues; the dense path's other n − K eigenvalues are 0."""
    pos = lam.clamp(min=0)
    f = torch.zeros_like(lam)
    order = torch.argsort(lam, descending=True)
    if solver == "adaptive":
        total = float(pos.sum())
        k = math.ceil(float(pos.sqrt().sum()) ** 2 / total) if total > 0 else 0
        f[order[:k]] = 1
        return f
    f = 1 - torch.exp(-pos * t)
    if keep_fraction < 1:
        k = math.ceil(keep_fraction * n)
        mask = torch.zeros_like(lam)
        mask[order[:k]] = 1
        f = f * mask
    return f


def factored_merge(
    method: str, src: ChunkSource, facs: Sequence[Factors], p: Mapping[str, Any]
) -> Iterator[torch.Tensor]:
    """The merged rows of ``method`` (``actmat`` or ``wudi``) from the experts' factors."""
    blocks = row_blocks(src.ranges)
    reader = BlockReader(blocks, str(p["precision"]))
    origin = blocks[0][0][0]
    device = facs[0].A.device
    dtype = stats_dtype(str(p["precision"]), device)
    n = facs[0].A.shape[1]
    with tf32(False):
        sp = _span(facs, "none" if method == "actmat" else "inv_sq_norm", method == "wudi", dtype)
        M = sp.M
        if method == "actmat" and float(p["ridge"]) > 0:
            M.diagonal().add_(float(p["ridge"]) * float(M.diagonal().sum()) / n)  # mean diag S = tr M / n
        lam, U = torch.linalg.eigh(M)
        solver = "closed_form" if method == "actmat" else str(p["solver"])
        if solver == "closed_form":
            rcond = None if method == "wudi" or p["rcond"] < 0 else float(p["rcond"])
            keep = _cutoff(lam, n, rcond)
            Uk = U[:, keep]
            X = (sp.Y @ Uk).div_(lam[keep]) @ Uk.T  # out × K
        else:
            assert sp.Z is not None
            f = _wudi_filter(lam, n, solver, float(p["t"]), float(p["keep_fraction"]))
            gain = torch.where(lam > 0, f / torch.where(lam > 0, lam, torch.ones_like(lam)), torch.zeros_like(lam))
            X = sp.Z - ((sp.Z @ U).mul_(f) @ U.T)
            X.add_((sp.Y @ U).mul_(gain) @ U.T)
            Uk = U
        weight_mode = method == "actmat" and p["merge_mode"] == "weight"
        P = sp.Q @ Uk if weight_mode else None  # the kept eigenvectors of S: S S⁺ = P Pᵀ
        Qt = sp.Q.T
        del sp, M, U
        lam_ = float(p["lambda"])
        for block in blocks:
            rows = slice(block[0][0] - origin, block[-1][1] - origin)
            base = reader.read(src.base, block)
            delta = X[rows] @ Qt
            if P is not None:
                out = (base @ P) @ P.T
                out.add_(delta.mul_(lam_))
            else:
                out = delta.mul_(lam_).add_(base)
            del delta
            yield from pieces(out.to(reader.compute), block)


def _polar_small(r: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor U Vᵀ of a small square matrix (exact SVD)."""
    u, _, vh = torch.linalg.svd(r)
    return u @ vh


def tsv_m_factored(base: torch.Tensor, facs: Sequence[Factors], k: int, dtype: torch.dtype) -> torch.Tensor:
    """TSV-M's merged task vector from LoRA factors, in the solve dtype (``spectral.tsv_m``).

    Each τ_t = s B A = Q_B (s R_B R_Aᵀ) Q_Aᵀ (thin QRs of B and Aᵀ): its singular triplets are the
    r_t × r_t core's, rotated. The top min(k, r_t) are kept (a rank-r_t τ_t has no more non-zero
    ones; the dense path fills the rest with σ = 0 and singular vectors LAPACK picks arbitrarily,
    which then move the polar factors, so the two agree exactly when k ≤ r_t for every task).
    Ū = Q_U R_U and V̄ = Q_V R_V (thin QRs, out × K' and in × K', K' = Σ min(k, r_t)), so
    polar(Ū) = Q_U polar(R_U) and τ = Q_U [polar(R_U) diag(σ̄) polar(R_V)ᵀ] Q_Vᵀ: one out × in
    product, everything else O(K'·(in + out))."""
    us, ss, vs = [], [], []
    for f in facs:
        qb, rb = torch.linalg.qr(f.B.to(dtype))
        qa, ra = torch.linalg.qr(f.A.to(dtype).T)
        uc, sc, vch = torch.linalg.svd(float(f.scale) * rb @ ra.T)
        kt = min(k, sc.numel())
        us.append(qb @ uc[:, :kt])
        ss.append(sc[:kt])
        vs.append(qa @ vch[:kt].T)
    qu, ru = torch.linalg.qr(torch.cat(us, dim=1))
    qv, rv = torch.linalg.qr(torch.cat(vs, dim=1))
    core = (_polar_small(ru) * torch.cat(ss)) @ _polar_small(rv).T
    return (qu @ core) @ qv.T


def stream_factors(experts: Sequence[torch.Tensor]) -> list[Factors] | None:
    """Every expert's factors when the lazy expert sequence offers them (``lora_factors(t)``)."""
    get = getattr(experts, "lora_factors", None)
    if get is None:
        return None
    out = []
    for t in range(len(experts)):
        f = get(t)
        if f is None:
            return None
        out.append(f)
    return out


__all__ = [
    "Factors",
    "factored_applies",
    "factored_merge",
    "factored_rank",
    "source_factors",
    "stream_factors",
    "tsv_m_factored",
]
