"""Symmetric eigen-decompositions and pseudo-inverses for the Gram methods, in bounded memory.

``torch.linalg.eigh`` on CPU (LAPACK ``syevd``) holds its input, a copy that becomes the
eigenvectors V and about 2n² elements of workspace: 4n² with the caller's S. Above
``IN_PLACE_BYTES`` per n × n matrix a CPU decomposition goes through SciPy's ``syevr`` (MRRR)
instead, handed S itself as the Fortran-ordered matrix to destroy (``overwrite_a``: no copy of S;
the eigenvectors are the one new n × n matrix, the workspace is O(n)): 2n² in all, which is what
the statistics already needed (S and one C_t), so the solve no longer sets the task's peak.
``syev`` (QR iteration) would overwrite S with V and need only n², but the statistics pass has
already held 2n², so it would lower no peak, and it is ~5× slower than ``syevr``. Measured here
(n = 3072, fp64, 2 threads of an AMD EPYC, torch's MKL and SciPy's OpenBLAS): torch ``syevd``
31.7 s, SciPy ``syevr`` 6.1 s, ``syev`` 29.5 s; at n = 1024: 0.41, 0.30 and 1.42 s.

Pseudo-inverses are applied row block by row block, ``x ↦ ((x V) / λ) Vᵀ``, never forming S⁺.
Below the threshold the kept columns V[:, keep] are copied out, as before; above it the dropped
directions get divisor +∞ instead (an exact zero), so there is no second n × n matrix.

Most Gram matrices of full fine-tunes are nonsingular, and comfortably so: then S⁺ = S⁻¹, which a
Cholesky factorisation applies at a fraction of an eigen-decomposition's cost (n³/3 flops against
~10n³, and none of ``syevd``'s serial tridiagonal stage: on an H200 in fp64, ``eigh`` takes 1.1 s
at n = 11008 and 14.5 s at n = 28672). ``gram_inverse`` takes that path only when S is *certified*
far from the pseudo-inverse's cut-off: a few steps of inverse iteration through the factor bound
S's smallest eigenvalue from below (with probability 1 − 1e-8 over a fixed-seed start; the start
is the same on every run, so the choice is deterministic) and its Frobenius norm bounds the
largest from above; when the bound clears the cut-off with room to spare, no eigenvalue would be
dropped and R S⁻¹ is the pseudo-inverse's result up to rounding. Otherwise (a singular, nearly
singular or not positive definite S) it falls back to the eigen-decomposition.
"""

from __future__ import annotations

import math

import torch

# Per n × n matrix (n² × itemsize): 1 GiB is n ≈ 11.6k in fp64, above every projection of a 7B
# Llama (in ≤ 11008). Below it torch's eigh costs at most 2 GiB more than the SciPy path, and
# small merges keep the numerics they had (the paths agree to ~1e-14 on well-conditioned S);
# beyond it the saving is 2n² (12 GiB at n = 28672) and grows with n². Where MKL's syevd is slow
# (above), a lower threshold would also be faster.
IN_PLACE_BYTES = 1 << 30

# Rows and columns of one block while symmetrising in place (a block² temporary).
_SYM_BLOCK = 512


def in_place(n: int, itemsize: int, on_cpu: bool = True) -> bool:
    """Whether an n × n decomposition of ``itemsize``-byte elements takes the bounded CPU path."""
    return on_cpu and n * n * itemsize > IN_PLACE_BYTES


def symmetrize_(S: torch.Tensor) -> torch.Tensor:
    """S ← (S + Sᵀ)/2 in place, block by block (bitwise what the out-of-place formula gives:
    fp addition commutes, halving is exact); returns S. Temporary: one diagonal block."""
    n = S.shape[0]
    for i in range(0, n, _SYM_BLOCK):
        a = slice(i, min(n, i + _SYM_BLOCK))
        diag = (S[a, a] + S[a, a].T) / 2  # a diagonal block overlaps its transpose: one temporary
        S[a, a] = diag
        del diag
        for j in range(i + _SYM_BLOCK, n, _SYM_BLOCK):
            b = slice(j, min(n, j + _SYM_BLOCK))
            upper = S[a, b]
            upper.add_(S[b, a].T).div_(2)
            S[b, a] = upper.T
    return S


def sym_eigh(S: torch.Tensor, bounded: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors (columns) of the symmetric S, already symmetrised.

    Consumes S: the caller must drop its own reference and not read S afterwards (on the bounded
    CPU path S is overwritten). V may be Fortran-ordered (a transposed view); matmuls take it as is.
    ``bounded``: take the bounded CPU path whatever the size (RegMean's rare fallback, so that its
    declared peak need not reserve 4n² for it).
    """
    n = S.shape[0]
    on_cpu = S.device.type == "cpu" and S.dtype in (torch.float64, torch.float32)
    if not on_cpu or not (bounded or in_place(n, S.element_size())):
        return torch.linalg.eigh(S)
    import scipy.linalg
    from threadpoolctl import threadpool_limits

    # SciPy's LAPACK (its own OpenBLAS) rounds by its thread count, which torch's setting does not
    # reach: give it torch's, which the executors pin per run (``uniform_threads``, the journal),
    # so the result does not depend on the process that computed it. Process-wide and idempotent.
    threadpool_limits(limits=torch.get_num_threads(), user_api="blas")
    a = S.T.numpy()  # S is symmetric, so its transpose, a Fortran-ordered view of the same memory, is S
    assert a.flags.f_contiguous and a.ctypes.data == S.data_ptr()
    w, v = scipy.linalg.eigh(a, overwrite_a=True, driver="evr", check_finite=False)
    del a
    return torch.from_numpy(w), torch.from_numpy(v)


class Pseudoinverse:
    """S⁺ = V diag(1/λ) Vᵀ over the eigenvalues above ``rcond``·max|λ| (default n·eps, as
    ``torch.linalg.pinv``), applied to row blocks; also the projector S S⁺ onto S's range."""

    def __init__(
        self, lam: torch.Tensor, V: torch.Tensor, rcond: float | None = None, no_copy: bool | None = None
    ) -> None:
        """``no_copy``: drop directions by an ∞ divisor rather than copying the kept columns of V
        (default: on the bounded CPU path, ``in_place``)."""
        n = V.shape[0]
        if rcond is None:
            rcond = n * torch.finfo(V.dtype).eps
        top = lam.abs().max() if lam.numel() else torch.tensor(0.0, dtype=lam.dtype, device=lam.device)
        keep = lam > rcond * top
        self.rank = int(keep.sum())
        if in_place(n, V.element_size(), V.device.type == "cpu") if no_copy is None else no_copy:
            inf = torch.full_like(lam, float("inf"))
            self.V = V
            self.div = torch.where(keep, lam, inf)  # x / ∞ = 0: the dropped directions, no copy of V
            self.unit = torch.where(keep, torch.ones_like(lam), inf)
        else:
            self.V = V[:, keep]
            self.div = lam[keep]
            self.unit = torch.ones_like(self.div)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x S⁺ for a block of rows ``x`` (rows × n), in x's dtype (computed in V's)."""
        if x.dtype != self.V.dtype:  # an fp32 decomposition of fp64 statistics (``gram_inverse``)
            return self.apply(x.to(self.V.dtype)).to(x.dtype)
        y = x @ self.V
        y.div_(self.div)
        return y @ self.V.T

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x S S⁺ (the rows of ``x`` projected onto S's range)."""
        if x.dtype != self.V.dtype:
            return self.project(x.to(self.V.dtype)).to(x.dtype)
        y = x @ self.V
        if self.V.shape[1] != self.rank:
            y.div_(self.unit)
        return y @ self.V.T


def cholesky_solve(L: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """A⁻¹ X for A = L Lᵀ: X solved against L, then Lᵀ, as LAPACK's potrs does."""
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, X, upper=False), upper=True)


def cholesky_apply(L: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """B A⁻¹ for A = L Lᵀ, never forming A⁻¹ (bit for bit ``torch.cholesky_solve(B.T, L).T``,
    which would also copy L for every block)."""
    return cholesky_solve(L, B.T).T


class CholeskyInverse:
    """S⁻¹ = L⁻ᵀL⁻¹ for a nonsingular S = L Lᵀ, with ``Pseudoinverse``'s interface."""

    def __init__(self, L: torch.Tensor) -> None:
        self.L = L
        self.rank = L.shape[0]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x S⁻¹ for a block of rows ``x`` (rows × n)."""
        return cholesky_apply(self.L, x)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x S S⁺ = x: a nonsingular S's range is the whole space."""
        return x.clone()


# Inverse iteration that certifies S's smallest eigenvalue: this many steps from this many random
# unit vectors. If one of them has a component of at least ``_CERTIFY_DELTA``/√n along the bottom
# eigenvector (each misses with probability ≤ ``_CERTIFY_DELTA``), then after k steps of x ← S⁻¹x
# with growth G = ‖S⁻ᵏx₀‖ the bottom eigenvalue is ≥ (δ/√n / G)^(1/k).
_CERTIFY_STEPS = 8
_CERTIFY_VECTORS = 4
_CERTIFY_DELTA = 0.01
# How far above the pseudo-inverse's cut-off that bound must lie: the rounding of the two paths is
# then the same size, far below the tests' tolerances against fp64 references.
_CERTIFY_MARGIN = 16.0


def smallest_eigenvalue_bound(L: torch.Tensor) -> float:
    """A lower bound (with probability ≥ 1 − 1e-8) on the smallest eigenvalue of S = L Lᵀ, from
    ``_CERTIFY_STEPS`` steps of inverse iteration through the factor; deterministic (fixed seed).
    Memory: n × 4 vectors; cost: 2·``_CERTIFY_STEPS`` triangular solves against L."""
    n = L.shape[0]
    gen = torch.Generator().manual_seed(0x5EED)
    x = torch.randn(n, _CERTIFY_VECTORS, generator=gen, dtype=torch.float64).to(device=L.device, dtype=L.dtype)
    x.div_(x.norm(dim=0))
    log_growth = torch.zeros(_CERTIFY_VECTORS, dtype=torch.float64, device=L.device)
    for _ in range(_CERTIFY_STEPS):
        x = cholesky_solve(L, x)
        norms = x.norm(dim=0)
        if not bool(torch.isfinite(norms).all()) or bool((norms == 0).any()):
            return 0.0
        log_growth.add_(norms.double().log())
        x.div_(norms)
    worst = float(log_growth.max())
    return math.exp((math.log(_CERTIFY_DELTA / math.sqrt(n)) - worst) / _CERTIFY_STEPS)


def certified_cholesky(S: torch.Tensor, rcond: float | None = None) -> torch.Tensor | None:
    """The Cholesky factor L of the symmetric S when S is certified to have no eigenvalue at or
    below ``rcond``·λ_max (default n·eps, ``torch.linalg.pinv``'s cut-off) with room to spare
    (``_CERTIFY_MARGIN``), so that S⁺ = S⁻¹; else None (S is left as it was). Memory: one n × n."""
    n = S.shape[0]
    if n == 0:
        return None
    cut = (n * torch.finfo(S.dtype).eps if rcond is None else rcond) * float(torch.linalg.matrix_norm(S))
    L, info = torch.linalg.cholesky_ex(S)
    if int(info) != 0 or not cut > 0 or smallest_eigenvalue_bound(L) <= _CERTIFY_MARGIN * cut:
        return None
    return L


def gram_inverse(
    S: torch.Tensor, rcond: float | None = None, solve: str = "auto", eigh_dtype: torch.dtype | None = None
) -> Pseudoinverse | CholeskyInverse:
    """S⁺ of the symmetric (symmetrised) S: by Cholesky when ``certified_cholesky`` vouches for it
    (``solve: auto``), else, or with ``solve: eigh``, the eigen-decomposition's pseudo-inverse
    (on CPU the bounded ``syevr`` path, so both paths hold 2n² with S).

    ``eigh_dtype`` (fp32 under fp64 statistics): the eigen-decomposition runs in that dtype, with
    its cut-off, on a copy of S whose fp64 memory is released first (its peak is then S in both
    dtypes, then the fp32 decomposition: half the fp64 one's). Consumes S: its storage may be freed,
    whatever other references to it exist."""
    if solve == "auto":
        L = certified_cholesky(S, rcond)
        if L is not None:
            return CholeskyInverse(L)
    if eigh_dtype is not None and eigh_dtype != S.dtype:
        narrow = S.to(eigh_dtype)
        S.untyped_storage().resize_(0)  # the caller's S is consumed: its bytes go before the solve
        S = narrow
    lam, V = sym_eigh(S, bounded=True)
    # S (overwritten on CPU) is the caller's until this returns: no copy of V's kept columns there
    return Pseudoinverse(lam, V, rcond, no_copy=S.device.type == "cpu")


__all__ = [
    "IN_PLACE_BYTES",
    "CholeskyInverse",
    "Pseudoinverse",
    "certified_cholesky",
    "cholesky_apply",
    "cholesky_solve",
    "gram_inverse",
    "in_place",
    "smallest_eigenvalue_bound",
    "sym_eigh",
    "symmetrize_",
]
