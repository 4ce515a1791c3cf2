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
"""

from __future__ import annotations

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

    a = S.T.numpy()  # S is symmetric, so its transpose, a Fortran-ordered view of the same memory, is S
    assert a.flags.f_contiguous and a.ctypes.data == S.data_ptr()
    w, v = scipy.linalg.eigh(a, overwrite_a=True, driver="evr", check_finite=False)
    del a
    return torch.from_numpy(w), torch.from_numpy(v)


class Pseudoinverse:
    """S⁺ = V diag(1/λ) Vᵀ over the eigenvalues above ``rcond``·max|λ| (default n·eps, as
    ``torch.linalg.pinv``), applied to row blocks; also the projector S S⁺ onto S's range."""

    def __init__(self, lam: torch.Tensor, V: torch.Tensor, rcond: float | None = None) -> None:
        n = V.shape[0]
        if rcond is None:
            rcond = n * torch.finfo(V.dtype).eps
        top = lam.abs().max() if lam.numel() else torch.tensor(0.0, dtype=lam.dtype, device=lam.device)
        keep = lam > rcond * top
        self.rank = int(keep.sum())
        if in_place(n, V.element_size(), V.device.type == "cpu"):
            inf = torch.full_like(lam, float("inf"))
            self.V = V
            self.div = torch.where(keep, lam, inf)  # x / ∞ = 0: the dropped directions, no copy of V
            self.unit = torch.where(keep, torch.ones_like(lam), inf)
        else:
            self.V = V[:, keep]
            self.div = lam[keep]
            self.unit = torch.ones_like(self.div)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x S⁺ for a block of rows ``x`` (rows × n)."""
        y = x @ self.V
        y.div_(self.div)
        return y @ self.V.T

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """x S S⁺ (the rows of ``x`` projected onto S's range)."""
        y = x @ self.V
        if self.V.shape[1] != self.rank:
            y.div_(self.unit)
        return y @ self.V.T


__all__ = ["IN_PLACE_BYTES", "Pseudoinverse", "in_place", "sym_eigh", "symmetrize_"]
