"""Sparsification of task vectors: magnitude top-k, magnitude with outliers removed, Bernoulli.

Selections by rank use ``kthvalue`` thresholds (O(n) memory) instead of a full argsort, and
break ties in magnitude by flat index so every run keeps exactly the same elements.
"""

from __future__ import annotations

import torch


def _rank_at_least(w: torch.Tensor, r: int) -> torch.Tensor:
    """Mask of the elements of flat ``w`` whose ascending rank is ≥ r (ties broken by index)."""
    n = w.numel()
    if r <= 0:
        return torch.ones(n, dtype=torch.bool, device=w.device)
    if r >= n:
        return torch.zeros(n, dtype=torch.bool, device=w.device)
    value = torch.kthvalue(w.cpu() if w.device.type == "mps" else w, r + 1).values.to(w.device)
    above = w > value
    equal = w == value
    below_count = n - int(above.sum()) - int(equal.sum())
    skip = r - below_count  # how many of the equal elements still fall below rank r
    if skip > 0:
        position = torch.cumsum(equal, dim=0, dtype=torch.int64) - 1
        equal &= position >= skip
    return above | equal


def rank_window_mask(w: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Mask keeping the elements of flat non-negative ``w`` with ascending rank in [lo, hi)."""
    mask = _rank_at_least(w, lo)
    if hi < w.numel():
        mask &= ~_rank_at_least(w, hi)
    return mask


def rescale_l1(delta: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Scale the sparsified ``kept`` so its L1 norm matches ``delta``'s (no-op for tiny norms)."""
    before = delta.abs().sum()
    after = kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """Keep the ``max(1, int(density·n))`` largest-magnitude entries of ``delta``, zero the rest."""
    if density >= 1:
        return delta
    n = delta.numel()
    if density <= 0 or n == 0:
        return torch.zeros_like(delta)
    k = max(1, int(density * n))
    w = delta.abs().reshape(-1)
    kept = delta * rank_window_mask(w, n - k, n).reshape(delta.shape)
    return rescale_l1(delta, kept) if rescale else kept


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool = False) -> torch.Tensor:
    """Breadcrumbs: drop the ``gamma`` largest and then the smallest entries, keeping ``density``."""
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - target - top)
    w = delta.abs().reshape(-1)
    kept = delta * rank_window_mask(w, bottom, bottom + target).reshape(delta.shape)
    return rescale_l1(delta, kept) if rescale else kept


def bernoulli(delta: torch.Tensor, density: float, generator: torch.Generator | None, rescale: bool) -> torch.Tensor:
    """DARE: keep each entry independently with probability ``density``; L1-rescale if asked."""
    if density >= 1:
        return delta
    # Drawn on the CPU so the same seed gives the same mask whatever the compute device.
    keep = (torch.rand(delta.shape, generator=generator, dtype=torch.float32) < density).to(delta.device)
    kept = delta * keep
    return rescale_l1(delta, kept) if rescale else kept
