"""Entry-wise selection: for each entry, which model's value (or which experts' changes) to keep.

* **nearswap** and **arcee_fusion** choose, entry by entry, between the base and one other model
  (by their distance, or by an importance score with an outlier threshold over the tensor).
* **ram** and **ramplus_tl** keep, per entry, the changes τ_t = expert_t − base that exceed
  ``epsilon``: one expert's change whole, several experts' changes averaged.
* **passthrough** keeps the one listed model (optionally scaled).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from raymerge.engine.methods.chunks import ChunkSource, register_chunked
from raymerge.engine.methods.masks import rank_cut, resident
from raymerge.engine.methods.registry import REQUIRED, MergeArgs, MethodSpec, Param, Scope, register

S, M = Scope.SHARED, Scope.MODEL


def nearswap(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """mergekit's NearSwap: move each entry of the base towards the other model by
    w = clamp(t / |base − other|, 0, 1), so entries that already nearly agree are swapped in and
    entries far apart stay with the base (|Δ| clamped at 1e-6, as mergekit)."""
    assert base is not None
    other = experts[0]
    w = (float(args.shared["t"]) / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * other + (1 - w) * base


register(
    MethodSpec(
        "nearswap",
        nearswap,
        (
            Param(
                "t", float, S, REQUIRED, "distance scale: entries closer than t take the other model's value", low=0.0
            ),
        ),
        "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        max_experts=1,
        row_separable=True,
        work_buffers=lambda n: 5,
    )
)


def arcee_fusion(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """Arcee Fusion (mergekit's ``arcee_fusion``): importance = |Δ| × KL(softmax(other) ‖
    softmax(base)) of its row (along the last dimension); entries with importance ≥ median +
    1.5·IQR take the other model's value, the rest keep the base's. The quartiles are exact order
    statistics (mergekit samples 1M entries at random above that size, so it is not deterministic
    there; below, the two agree)."""

    def importance(g: ChunkSource, r0: int, r1: int) -> torch.Tensor:
        last = g.shape[-1] if g.shape else 1
        base, other = g.base(r0, r1), g.expert(0, r0, r1)
        rows_b = base.reshape(-1, last) if not g.vector else base.reshape(1, -1)
        rows_o = other.reshape(-1, last) if not g.vector else other.reshape(1, -1)
        p = torch.softmax(rows_o, dim=-1) + 1e-8
        q = torch.softmax(rows_b, dim=-1) + 1e-8
        kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
        return ((rows_o - rows_b).abs() * kl).clamp(min=0).reshape(-1)  # KL ≥ 0 up to rounding

    def ranges(g: ChunkSource) -> list[tuple[int, int]]:
        if g.vector and len(g.ranges) > 1:  # a 1-D tensor is one row: rank it whole
            return [(g.ranges[0][0], g.ranges[-1][1])]
        return list(g.ranges)

    # The quartiles span the tensor mergekit fuses this one into (a MoE layer's experts), as
    # mergekit's do; this tensor's chunks come first.
    parts = [(g, r0, r1) for g in src.stats_sources for r0, r1 in ranges(g)]
    n = sum(g.numel for g in src.stats_sources)
    cached = [importance(*part) for part in parts] if resident(n) else None

    def chunks() -> Iterator[torch.Tensor]:
        if cached is not None:
            yield from cached
        else:
            for part in parts:
                yield importance(*part)

    q1, median, q3 = (rank_cut(chunks, n, int(q * (n - 1))).value for q in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    for i, (r0, r1) in enumerate(ranges(src)):
        imp = cached[i] if cached is not None else importance(src, r0, r1)
        base, other = src.base(r0, r1), src.expert(0, r0, r1)
        keep = (imp >= threshold).reshape(base.shape)
        yield base + (other - base) * keep


register_chunked(
    "arcee_fusion",
    arcee_fusion,
    (),
    "https://arcee.ai (mergekit's arcee_fusion)",
    max_experts=1,
    work_buffers=lambda n: 10,
    group_stats=True,
)

RAM_EPSILON = Param("epsilon", float, S, 1e-5, "an entry counts as changed by an expert when |τ| exceeds it", low=0.0)


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


register(
    MethodSpec(
        "ram", ram, (RAM_EPSILON,), "https://arxiv.org/abs/2601.13572", row_separable=True, work_buffers=lambda n: 6
    )
)


def ramplus_tl(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """RAM+ tensor-local (mergekit's ``ramplus_tl``): RAM, with each expert's unique changes scaled
    by λ_t = 1 + r·clamp(ρ_t, 0, alpha), where ρ_t is its shared-to-unique change count over the
    tensor. One counting pass, then the merge."""
    eps, r, cap = float(args.shared["epsilon"]), float(args.shared["r"]), float(args.shared["alpha"])
    n = src.n_experts
    shared = torch.zeros(n, dtype=torch.float64)
    unique = torch.zeros(n, dtype=torch.float64)

    def masks(r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        base = src.base(r0, r1)
        tau = torch.stack([src.expert(t, r0, r1) - base for t in range(n)])
        changed = tau.abs() > eps
        count = changed.sum(0)
        return base, tau, changed, count

    for r0, r1 in src.ranges:
        _, _, changed, count = masks(r0, r1)
        shared += (changed & (count > 1)).reshape(n, -1).sum(1).cpu().to(torch.float64)
        unique += (changed & (count == 1)).reshape(n, -1).sum(1).cpu().to(torch.float64)
    lam = 1 + r * (shared / unique.clamp(min=eps)).clamp(0, cap)
    for r0, r1 in src.ranges:
        base, tau, changed, count = masks(r0, r1)
        kept = tau * changed
        lam_b = lam.to(tau.device, tau.dtype).reshape(-1, *([1] * (tau.dim() - 1)))
        out = (kept * (count == 1) * lam_b).sum(0) + (kept * (count > 1) / count.clamp(min=1)).sum(0)
        yield base + out


register_chunked(
    "ramplus_tl",
    ramplus_tl,
    (
        Param("r", float, S, 0.1, "strength of the boost of unique changes"),
        Param("alpha", float, S, 0.2, "cap on the shared-to-unique ratio ρ", low=0.0),
        RAM_EPSILON,
    ),
    "https://arxiv.org/abs/2601.13572",
    work_buffers=lambda n: 3 * n + 6,
)


def passthrough(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """The one listed model, times its ``scale`` (mergekit's ``passthrough`` without slices)."""
    scale = args.per_model[0].get("scale")
    x = experts[0]
    return x if scale is None or float(scale) == 1.0 else x * float(scale)


register(
    MethodSpec(
        "passthrough",
        passthrough,
        (Param("scale", float, M, 1.0, "multiply the model's tensors by this"),),
        "mergekit (without slices: the one model, optionally scaled)",
        needs_base=False,
        max_experts=1,
        includes_base_in_inputs=True,
        row_separable=True,
        work_buffers=lambda n: 2,
    )
)
