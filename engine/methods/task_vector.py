"""Row-separable task-vector methods: linear, mean and TALL-mask consensus.

Methods that need whole-tensor statistics (TIES, DARE, breadcrumbs, SLERP, Model Stock) and
task arithmetic live in ``chunked.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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


def nearswap(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """mergekit's NearSwap: move each entry of the base towards the other model by
    w = clamp(t / |base − other|, 0, 1), so entries that already nearly agree are swapped in and
    entries far apart stay with the base (|Δ| clamped at 1e-6, as mergekit)."""
    assert base is not None
    other = experts[0]
    w = (float(args.shared["t"]) / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * other + (1 - w) * base


def ram(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """RAM (mergekit's ``ram``): an entry changed (|τ| > epsilon) by one expert keeps that change;
    an entry changed by several gets the mean of their changes; unchanged entries stay at the base."""
    assert base is not None
    eps = float(args.shared["epsilon"])
    total = torch.zeros_like(base)
    count = torch.zeros_like(base)
    for i in range(len(experts)):
        tau = experts[i] - base
        changed = tau.abs() > eps
        total.add_(tau * changed)
        count.add_(changed.to(base.dtype))
    return base + total / count.clamp(min=1)


def passthrough(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """The one listed model, times its ``scale`` (mergekit's ``passthrough`` without slices)."""
    scale = args.per_model[0].get("scale")
    x = experts[0]
    return x if scale is None or float(scale) == 1.0 else x * float(scale)


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
