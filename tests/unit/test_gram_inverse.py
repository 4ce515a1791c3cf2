"""``eigh.gram_inverse``: Cholesky when S is certified nonsingular, the eigh pseudo-inverse otherwise,
and the certificate itself (a lower bound on S's smallest eigenvalue)."""

from __future__ import annotations

import pytest
import torch

from raymerge.engine.methods import METHODS, MergeArgs
from raymerge.engine.methods.eigh import (
    CholeskyInverse,
    Pseudoinverse,
    gram_inverse,
    smallest_eigenvalue_bound,
)


def _spd(n: int, eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    S = (q * eigenvalues) @ q.T
    return (S + S.T) / 2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("seed", range(6))
def test_bound_is_below_the_smallest_eigenvalue_and_near_it(seed):
    n = 300
    g = torch.Generator().manual_seed(100 + seed)
    lam = torch.logspace(-6, 2, n, dtype=torch.float64)[torch.randperm(n, generator=g)]
    S = _spd(n, lam, seed)
    bound = smallest_eigenvalue_bound(torch.linalg.cholesky(S))
    true = float(torch.linalg.eigvalsh(S)[0])
    assert bound <= true  # a lower bound ...
    assert bound >= true / 10  # ... and a useful one


def test_bound_with_a_cluster_at_the_bottom():
    # many eigenvalues near the smallest: inverse iteration cannot separate them, the bound must hold
    n = 256
    lam = torch.cat([torch.full((200,), 1e-3), torch.linspace(1, 10, 56)]).double()
    lam[0] = 0.9e-3
    S = _spd(n, lam, 3)
    assert smallest_eigenvalue_bound(torch.linalg.cholesky(S)) <= 0.9e-3


def test_well_conditioned_s_takes_cholesky_and_matches_the_pseudo_inverse():
    n = 200
    S = _spd(n, torch.logspace(-3, 1, n, dtype=torch.float64), 0)
    x = torch.randn(7, n, dtype=torch.float64)
    inv = gram_inverse(S.clone())
    assert isinstance(inv, CholeskyInverse)
    assert _rel(inv.apply(x), x @ torch.linalg.pinv(S, hermitian=True)) <= 1e-12
    assert torch.equal(inv.project(x), x)
    ref = gram_inverse(S.clone(), solve="eigh")
    assert isinstance(ref, Pseudoinverse)
    assert _rel(ref.apply(x), inv.apply(x)) <= 1e-12


@pytest.mark.parametrize("floor", [0.0, 1e-13, -1e-3])
def test_singular_nearly_singular_and_indefinite_s_fall_back(floor):
    n = 120
    lam = torch.logspace(-2, 1, n, dtype=torch.float64)
    lam[:10] = floor  # rank 110, or eigenvalues below the cut-off (n·eps·λ_max ≈ 2.7e-13), or negative
    S = _spd(n, lam, 1)
    x = torch.randn(5, n, dtype=torch.float64)
    inv = gram_inverse(S.clone())
    assert isinstance(inv, Pseudoinverse)
    assert inv.rank == 110
    # negative eigenvalues of a Gram are rounding: the pseudo-inverse drops them with the small ones
    ref = torch.linalg.pinv(_spd(n, lam.clamp(min=0), 1), hermitian=True)
    assert _rel(inv.apply(x), x @ ref) <= 1e-10


def test_a_user_cut_off_above_the_spectrum_falls_back():
    n = 80
    S = _spd(n, torch.logspace(-4, 0, n, dtype=torch.float64), 2)
    assert isinstance(gram_inverse(S.clone()), CholeskyInverse)
    inv = gram_inverse(S.clone(), rcond=1e-2)  # drops every eigenvalue below 1e-2·λ_max
    assert isinstance(inv, Pseudoinverse) and inv.rank < n


@pytest.mark.parametrize(
    "name,over",
    [("actmat", {}), ("actmat", {"merge_mode": "weight"}), ("wudi", {"solver": "closed_form"}), ("regmean", {})],
)
def test_methods_give_the_eigh_result_through_cholesky(name, over):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(64, 48, generator=g, dtype=torch.float64) * 0.1
    experts = [base + 0.01 * torch.randn(64, 48, generator=g, dtype=torch.float64) for _ in range(3)]
    spec = METHODS[name]
    defaults = {p.name: p.default for p in spec.params}
    per_model = [{}] * 3
    aux = ()
    if name == "regmean":
        defaults.pop("grams", None)
        xs = [torch.randn(200, 48, generator=g, dtype=torch.float64) for _ in range(3)]
        aux = tuple(x.T @ x / 200 for x in xs)
    auto = spec.fn(base, experts, MergeArgs({**defaults, **over}, per_model, None, "w", 0, aux))
    eigh = spec.fn(base, experts, MergeArgs({**defaults, **over, "solve": "eigh"}, per_model, None, "w", 0, aux))
    assert _rel(auto - base, eigh - base) <= 1e-10


def test_fp32_eigh_fallback_releases_s_and_stays_close():
    n = 120
    lam = torch.logspace(-2, 1, n, dtype=torch.float64)
    lam[:10] = 0.0  # singular: not certified, so the fallback runs, in fp32
    S = _spd(n, lam, 5)
    x = torch.randn(6, n, dtype=torch.float64)
    ref = x @ torch.linalg.pinv(S, hermitian=True)
    work = S.clone()
    inv = gram_inverse(work, eigh_dtype=torch.float32)
    assert isinstance(inv, Pseudoinverse) and inv.V.dtype == torch.float32
    assert work.untyped_storage().nbytes() == 0  # the fp64 S was released before the decomposition
    assert inv.rank == 110
    got = inv.apply(x)
    assert got.dtype == torch.float64
    assert _rel(got, ref) <= 1e-4  # fp32's rounding amplified by the kept spectrum's condition (1e3)
    # a certified S never reaches the fallback: the fp64 Cholesky result
    well = _spd(n, torch.logspace(-2, 1, n, dtype=torch.float64), 6)
    assert isinstance(gram_inverse(well.clone(), eigh_dtype=torch.float32), CholeskyInverse)


def test_actmat_with_an_fp32_eigh_fallback_on_rank_deficient_experts():
    # 8 rows × 3 experts: S (48 × 48) has rank ≤ 24, so R S⁺ takes the (fp32) eigen-decomposition
    g = torch.Generator().manual_seed(9)
    base = torch.randn(8, 48, generator=g, dtype=torch.float64)
    deltas = [0.05 * torch.randn(8, 48, generator=g, dtype=torch.float64) for _ in range(3)]
    spec = METHODS["actmat"]
    shared = {p.name: p.default for p in spec.params}
    got = spec.fn(base, [base + d for d in deltas], MergeArgs({**shared, "eigh_precision": "fp32"}, [{}] * 3))
    S = sum(d.T @ d for d in deltas)
    R = sum(d @ (d.T @ d) for d in deltas)
    ref = R @ torch.linalg.pinv(S, hermitian=True)
    assert _rel(got - base, ref) <= 1e-4


def test_scipy_eigensolver_runs_with_torch_thread_count():
    """The bounded path's SciPy LAPACK gets torch's thread count (which the executors pin), so its
    rounding does not depend on the process: a Ray worker and the local driver agree bit for bit."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from raymerge.engine.methods.eigh import sym_eigh

    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            threadpool_limits(limits=3, user_api="blas")  # whatever the process had
            S = _spd(96, torch.logspace(-3, 1, 96, dtype=torch.float64), 7)
            sym_eigh(S, bounded=True)
            scipy_blas = [i for i in threadpool_info() if "scipy" in i["filepath"] and i["user_api"] == "blas"]
            assert scipy_blas and all(i["num_threads"] == threads for i in scipy_blas)
    finally:
        torch.set_num_threads(before)
