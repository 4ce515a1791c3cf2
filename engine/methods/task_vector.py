"""The task-vector family: linear, task arithmetic, TIES, DARE, breadcrumbs, TALL-mask consensus.

Semantics follow mergekit 0.1.5 (``generalized_task_arithmetic``): per expert the task vector
δ = expert − base is sparsified, multiplied by its ``weight``; a sign consensus (TIES) keeps the
entries agreeing with the weighted-sum sign; the result is optionally normalised by the summed
weights of the kept entries and scaled by ``lambda``. All math is per tensor on whatever device
the inputs live on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from raymerge.engine.methods import sparsify
from raymerge.engine.methods.registry import MergeArgs


def linear(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """Weighted average Σ wᵢ xᵢ (/ Σ wᵢ when ``normalize``) of the inputs themselves (no task vectors)."""
    inputs = list(experts)
    weights = [float(p["weight"]) for p in args.per_model]
    out = torch.zeros_like(inputs[0])
    for x, w in zip(inputs, weights, strict=True):
        out.add_(x, alpha=w)
    if args.shared["normalize"]:
        out.div_(sum(weights))
    return out


def mean(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """Plain average of the experts (= base + mean task vector); the fallback of Gram methods."""
    out: torch.Tensor | None = None
    n = 0
    for x in experts:
        if out is None:
            out = x.clone()
        else:
            out.add_(x)
        del x  # drop it before the next expert is read, so only one is ever held
        n += 1
    assert out is not None
    return out.div_(n)


Sparsifier = Callable[[torch.Tensor, dict, MergeArgs], torch.Tensor]


def _no_sparsify(delta: torch.Tensor, p: dict, args: MergeArgs) -> torch.Tensor:
    return delta


def _magnitude(delta: torch.Tensor, p: dict, args: MergeArgs) -> torch.Tensor:
    return sparsify.magnitude(delta, float(p["density"]), bool(args.shared["rescale"]))


def _random(delta: torch.Tensor, p: dict, args: MergeArgs) -> torch.Tensor:
    return sparsify.bernoulli(delta, float(p["density"]), args.generator, bool(args.shared["rescale"]))


def _outliers(delta: torch.Tensor, p: dict, args: MergeArgs) -> torch.Tensor:
    return sparsify.magnitude_outliers(delta, float(p["density"]), float(p["gamma"]), bool(args.shared["rescale"]))


def _combine(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    args: MergeArgs,
    sparsifier: Sparsifier,
    sign_consensus: bool,
) -> torch.Tensor:
    weights = [float(p["weight"]) for p in args.per_model]
    deltas = []
    for x, p, w in zip(experts, args.per_model, weights, strict=True):
        d = sparsifier(x - base, dict(p), args)
        deltas.append(d * w)
    if sign_consensus:
        total = torch.zeros_like(base)
        for d in deltas:
            total.add_(d)
        majority = torch.where(total >= 0, 1.0, -1.0).to(base.dtype)
        del total
        mixed = torch.zeros_like(base)
        divisor = torch.zeros_like(base)
        for d, w in zip(deltas, weights, strict=True):
            agree = d.sign() == majority  # zeros (trimmed entries) never agree
            mixed.add_(d * agree)
            divisor.add_(agree.to(base.dtype), alpha=w)
        divisor[divisor == 0] = 1
    else:
        mixed = torch.zeros_like(base)
        for d in deltas:
            mixed.add_(d)
        total_w = sum(weights)
        divisor = torch.tensor(1.0 if abs(total_w) < 1e-8 else total_w, dtype=base.dtype)
    del deltas
    if args.shared["normalize"]:
        mixed.div_(divisor)
    lam = float(args.shared["lambda"])
    if lam != 1:
        mixed.mul_(lam)
    return base + mixed


def task_arithmetic(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """θ₀ + λ·Σ wᵢ δᵢ (Ilharco et al. 2023)."""
    assert base is not None
    return _combine(base, experts, args, _no_sparsify, sign_consensus=False)


def ties(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """TIES (Yadav et al. 2023): magnitude trim to ``density``, sign election, disjoint mean."""
    assert base is not None
    return _combine(base, experts, args, _magnitude, sign_consensus=True)


def dare_linear(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """DARE (Yu et al. 2024): random drop with keep-probability ``density``, L1 rescale, then sum."""
    assert base is not None
    return _combine(base, experts, args, _random, sign_consensus=False)


def dare_ties(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """DARE drop-and-rescale followed by TIES sign consensus."""
    assert base is not None
    return _combine(base, experts, args, _random, sign_consensus=True)


def breadcrumbs(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023): drop the ``gamma`` top outliers and the smallest."""
    assert base is not None
    return _combine(base, experts, args, _outliers, sign_consensus=False)


def breadcrumbs_ties(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """Breadcrumbs sparsification followed by TIES sign consensus."""
    assert base is not None
    return _combine(base, experts, args, _outliers, sign_consensus=True)


def consensus(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """TALL-mask consensus (Wang et al. 2024).

    Task masks m_t = |δ_t| ≥ λ_tall·|Σ_s δ_s − δ_t|; entries marked by at least ``k`` masks are
    kept from the multi-task vector Σ wₜδₜ, which is then scaled by ``lambda``.
    """
    assert base is not None
    deltas = [x - base for x in experts]
    total = torch.zeros_like(base)
    for d, p in zip(deltas, args.per_model, strict=True):
        total.add_(d, alpha=float(p["weight"]))
    tall = float(args.shared["tall_lambda"])
    unweighted = torch.zeros_like(base)
    for d in deltas:
        unweighted.add_(d)
    count = torch.zeros(base.shape, dtype=torch.int16, device=base.device)
    for d in deltas:
        count += (d.abs() >= tall * (unweighted - d).abs()).to(torch.int16)
    keep = count >= int(args.shared["k"])
    return base + float(args.shared["lambda"]) * total * keep
