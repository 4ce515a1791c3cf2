"""Task-vector arithmetic: merges built from τ_t = expert_t − base, plus the plain averages.

* **Generalized task arithmetic** (mergekit's ``task_arithmetic``, ``ties``, ``dare_*``,
  ``della*``, ``breadcrumbs*``): one function, ``gta``, configured per method by how it
  sparsifies each task vector (``masks.Sparsifier``) and whether it keeps only entries that agree
  with the elected sign; each variant is one registration line.
* **SCE** and **TALL-mask consensus**: other rules for which entries of which τ_t survive.
* **linear** and **mean**: averages of the inputs themselves (no task vectors).

Methods that need whole-tensor statistics are chunked (``chunks.register_chunked``): their memory
model counts chunk-size buffers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from functools import partial
from typing import Any

import torch

from raymerge.engine.methods.chunks import ChunkSource, register_chunked
from raymerge.engine.methods.masks import CutMask, RankCut, Sparsifier, SparsifyKind, rank_cut
from raymerge.engine.methods.registry import REQUIRED, MergeArgs, MethodSpec, Param, Scope, register

S, M = Scope.SHARED, Scope.MODEL
# Elements per block of ``gta``'s combining passes (1 MiB of float32 per array: they stay in L2).
BLOCK_ELEMENTS = 1 << 18

INT8_MASK = Param(
    "int8_mask",
    bool,
    S,
    False,
    "accepted for mergekit compatibility (int8 masks save memory "
    "there; raymerge's masks are bool): no effect on results",
)


# ---------------------------------------------------------------------------------------------
# averages of the inputs


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


register(
    MethodSpec(
        "linear",
        linear,
        (Param("weight", float, M, REQUIRED), Param("normalize", bool, S, True)),
        "https://arxiv.org/abs/2203.05482",
        needs_base=False,
        row_separable=True,
        includes_base_in_inputs=True,
        work_buffers=lambda n: 2,
    )
)


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


register(
    MethodSpec(
        "mean", mean, (), "average of the experts", row_separable=True, streams_experts=True, work_buffers=lambda n: 2
    )
)


# ---------------------------------------------------------------------------------------------
# the generalized task-arithmetic family (mergekit semantics), chunked


def gta_params(*extra: Param, normalize: bool = False, rescale: bool = False) -> tuple[Param, ...]:
    """mergekit's generalized-task-arithmetic parameters, with a method's own defaults for
    ``normalize`` and ``rescale`` and its ``extra`` per-model parameters after ``density``."""
    return (
        Param("weight", float, M, REQUIRED, "scale of this expert's task vector"),
        Param("density", float, M, 1.0, "fraction of task-vector entries kept", low=0.0, high=1.0),
        *extra,
        Param("normalize", bool, S, normalize, "divide by the summed weights of kept entries"),
        Param("rescale", bool, S, rescale, "L1-rescale sparsified task vectors"),
        Param("lambda", float, S, 1.0, "scale of the merged task vector"),
        INT8_MASK,
    )


def gta(
    src: ChunkSource, args: MergeArgs, *, sparsify: SparsifyKind | None = None, sign_consensus: bool = False
) -> Iterator[torch.Tensor]:
    """Generalized task arithmetic: sparsify each task vector (``sparsify``: see ``Sparsifier``;
    None keeps it whole), weight it, with ``sign_consensus`` keep only the entries whose sign
    agrees with the sign of the weighted sum (TIES' election; the divisor is then the summed
    weights of the agreeing entries), normalise when ``normalize``, scale by ``lambda``."""
    weights = [float(p["weight"]) for p in args.per_model]
    sparsifiers = [Sparsifier(sparsify, src, t, dict(p), args) for t, p in enumerate(args.per_model)]
    normalize = bool(args.shared["normalize"])
    lam = float(args.shared["lambda"])
    total_w = sum(weights)
    n = src.n_experts
    # One buffer of task vectors reused across chunks (a shorter last chunk views its start). Each
    # step below is the same torch kernel on the same values as the plain expressions in the
    # comments, written in place, so the result is bit-identical to them with fewer passes and no
    # per-chunk allocations; the yielded chunk is fresh (callers may keep it).
    flat: torch.Tensor | None = None
    for r0, r1 in src.ranges:
        base = src.base(r0, r1)  # a rows × rest matrix (chunk sources hand out 2-D chunks)
        size = max(1, n) * base.numel()
        if flat is None or flat.numel() < size or flat.dtype != base.dtype or flat.device != base.device:
            flat = torch.empty(size, dtype=base.dtype, device=base.device)
        deltas = flat[: n * base.numel()].view(n, *base.shape)  # contiguous, like torch.stack(...)
        for t in range(n):
            d = deltas[t]
            torch.sub(src.expert(t, r0, r1), base, out=d)  # τ_t = expert − base
            sparsifiers[t].apply_(d, r0)  # d = sparsify(τ_t)
            d.mul_(weights[t])  # d = sparsify(τ_t) · w_t
        mixed = torch.empty_like(base)
        # The passes below touch n + 3 chunk-size arrays each; a block of rows at a time keeps
        # them in cache (3x faster than whole 4 MiB chunks here). Every operation is elementwise
        # and the sum over experts runs in expert order either way, so blocks change no bit.
        step = max(1, BLOCK_ELEMENTS // max(1, base[0].numel())) if base.dim() else 1
        for a in range(0, max(1, base.shape[0] if base.dim() else 1), step):
            b = a + step
            _combine(deltas[:, a:b], mixed[a:b], base[a:b], weights, sign_consensus, normalize, total_w, lam)
        yield mixed


def _combine(
    deltas: torch.Tensor,
    mixed: torch.Tensor,
    base: torch.Tensor,
    weights: Sequence[float],
    sign_consensus: bool,
    normalize: bool,
    total_w: float,
    lam: float,
) -> None:
    """``mixed`` = base + λ·(the combined weighted task vectors ``deltas``), for one block of rows."""
    mixed.zero_()
    n = deltas.shape[0]
    if sign_consensus:
        total = deltas.sum(0) if n else torch.zeros_like(base)  # Σ_t d_t, as torch.stack(...).sum(0)
        # The elected sign, torch.where(total >= 0, 1.0, -1.0), computed in place in float (the
        # bool kernels cost several times the float ones). An entry agrees with it when
        # d·majority > 0, which is d.sign() == majority (zeros never agree).
        majority = total.ge_(0).mul_(2).sub_(1)
        divisor = torch.zeros_like(base)
        agree = torch.empty_like(base)
        for t, w in enumerate(weights):
            d = deltas[t]
            torch.mul(d, majority, out=agree).gt_(0)  # 1.0 where the signs agree, else 0.0
            mixed.add_(d.mul_(agree))  # mixed += d · agree
            divisor.add_(agree, alpha=w)  # divisor += agree · w
        # divisor[divisor == 0] = 1: adding 1.0 where it is ±0 and 0.0 elsewhere changes nothing else.
        divisor.add_(torch.eq(divisor, 0, out=agree))
        if normalize:
            mixed.div_(divisor)
    else:
        for t in range(n):
            mixed.add_(deltas[t])
        if normalize:
            mixed.div_(1.0 if abs(total_w) < 1e-8 else total_w)
    if lam != 1:
        mixed.mul_(lam)
    mixed.add_(base)  # base + mixed (addition commutes bit for bit)


# Task arithmetic (Ilharco et al. 2023): base + λ·Σ w_t τ_t.
register_chunked(
    "task_arithmetic",
    gta,
    gta_params(),
    "https://arxiv.org/abs/2212.04089",
    row_separable=True,
    work_buffers=lambda n: n + 3,
)
# TIES (Yadav et al. 2023): magnitude trim to ``density``, sign election, disjoint mean.
register_chunked(
    "ties",
    partial(gta, sparsify="magnitude", sign_consensus=True),
    gta_params(normalize=True),
    "https://arxiv.org/abs/2306.01708",
    work_buffers=lambda n: 2 * n + 8,
    group_stats=True,
)
# DARE (Yu et al. 2024): random drop with keep-probability ``density``, L1 rescale, then a sum ...
register_chunked(
    "dare_linear",
    partial(gta, sparsify="random"),
    gta_params(rescale=True),
    "https://arxiv.org/abs/2311.03099",
    random=True,
    work_buffers=lambda n: n + 6,
)
# ... or TIES' sign consensus.
register_chunked(
    "dare_ties",
    partial(gta, sparsify="random", sign_consensus=True),
    gta_params(rescale=True),
    "https://arxiv.org/abs/2311.03099",
    random=True,
    work_buffers=lambda n: 2 * n + 8,
)

EPSILON = Param("epsilon", float, M, 0.15, "half-width of DELLA's keep-probability range around density", low=0.0)


def della_check(shared: Mapping[str, Any], per_model: Sequence[Mapping[str, Any]]) -> str | None:
    """mergekit's rule: with 0 < density < 1, density ± epsilon must stay inside (0, 1)."""
    for i, p in enumerate(per_model):
        d, e = float(p["density"]), float(p["epsilon"])
        if 0 < d < 1 and not (d - e > 0 and d + e < 1):
            return f"model {i}: density ± epsilon must lie inside (0, 1), got density {d:g}, epsilon {e:g}"
    return None


# DELLA (Deep et al. 2024): MAGPRUNE drop (keep-probability density ± ε by magnitude rank within
# each row), L1 rescale, then TIES' sign consensus and disjoint mean (della) or a weighted sum.
register_chunked(
    "della",
    partial(gta, sparsify="magprune", sign_consensus=True),
    gta_params(EPSILON, normalize=True, rescale=True),
    "https://arxiv.org/abs/2406.11617",
    random=True,
    check=della_check,
    work_buffers=lambda n: 2 * n + 10,
)
register_chunked(
    "della_linear",
    partial(gta, sparsify="magprune"),
    gta_params(EPSILON, rescale=True),
    "https://arxiv.org/abs/2406.11617",
    random=True,
    check=della_check,
    work_buffers=lambda n: n + 8,
)

GAMMA = Param("gamma", float, M, 0.01, "fraction of largest-magnitude outliers dropped", low=0.0, high=1.0)
# Model Breadcrumbs (Davari & Belilovsky 2023): drop the ``gamma`` top outliers and the smallest
# entries, then a sum, or TIES' sign consensus.
register_chunked(
    "breadcrumbs",
    partial(gta, sparsify="outliers"),
    gta_params(GAMMA),
    "https://arxiv.org/abs/2312.06795",
    work_buffers=lambda n: n + 8,
    group_stats=True,
)
register_chunked(
    "breadcrumbs_ties",
    partial(gta, sparsify="outliers", sign_consensus=True),
    gta_params(GAMMA),
    "https://arxiv.org/abs/2312.06795",
    work_buffers=lambda n: 2 * n + 8,
    group_stats=True,
)


# ---------------------------------------------------------------------------------------------
# other rules for which entries survive


def sce(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """SCE (Wan et al. 2024, mergekit's ``sce``): *select* the ``select_topk`` share of the entries
    with the largest variance across the task vectors (of those with non-zero variance), weight
    each task vector by its mean square over the tensor (normalised to sum 1), *erase* entries
    whose sign disagrees with the sign of the sum, and take the weighted mean of the rest.

    Three passes over the chunks: variances (twice, for the exact top-k cut), the experts' mean
    squares, then the merge; memory is a stack of the experts' chunks. The cut and the mean
    squares span the tensor mergekit fuses (a MoE layer's experts), as mergekit's do.
    """
    topk = float(args.shared["select_topk"])
    n_exp = src.n_experts
    sources = src.stats_sources  # the tensor, then the rest of the tensor mergekit fuses (a MoE's experts)
    numel = sum(s.numel for s in sources)

    def taus(s: ChunkSource, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        base = s.base(r0, r1)
        return base, torch.stack([s.expert(t, r0, r1) - base for t in range(n_exp)])

    def variances() -> Iterator[torch.Tensor]:
        for s in sources:
            for r0, r1 in s.ranges:
                yield taus(s, r0, r1)[1].var(0, unbiased=False)

    cut: RankCut | None = None  # None: every entry selected
    if topk < 1:
        k = int(sum(int(torch.count_nonzero(v)) for v in variances()) * topk) if topk > 0 else 0
        cut = RankCut(0.0, 0, nothing=True) if k == 0 else rank_cut(variances, numel, numel - k)

    def selected(s: ChunkSource, select: CutMask | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for r0, r1 in s.ranges:
            base, tv = taus(s, r0, r1)
            if select is not None:
                tv = tv * select(tv.var(0, unbiased=False))
            yield base, tv

    # The cut's equal values are counted in the order ``variances`` streams them, over every source.
    squares = torch.zeros(n_exp, dtype=torch.float64)
    select = CutMask(cut) if cut is not None else None
    for s in sources:
        for _, tv in selected(s, select):
            squares += tv.reshape(n_exp, -1).to(torch.float64).square().sum(1).cpu()
    means = squares / max(1, numel)
    total = float(means.sum())
    weights = torch.full((n_exp,), 1.0 / n_exp) if abs(total) < 1e-6 else (means / total).float()
    for base, tv in selected(src, CutMask(cut) if cut is not None else None):
        majority = torch.where(tv.sum(0) >= 0, 1.0, -1.0).to(tv.dtype)
        kept = (tv.sign() == majority).to(tv.dtype)  # zeros never agree
        w = weights.to(tv.device, tv.dtype).reshape(-1, *([1] * (tv.dim() - 1))) * kept
        yield base + (tv * w).sum(0) / w.sum(0).clamp(min=1e-6)


register_chunked(
    "sce",
    sce,
    (
        Param(
            "select_topk",
            float,
            S,
            1.0,
            "share of the entries (by variance across task vectors) kept",
            low=0.0,
            high=1.0,
        ),
        INT8_MASK,
    ),
    "https://arxiv.org/abs/2408.07990",
    work_buffers=lambda n: 3 * n + 6,
    group_stats=True,
)


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


register(
    MethodSpec(
        "consensus",
        consensus,
        (
            Param("weight", float, M, 1.0),
            Param("k", int, S, 2, "masks that must agree to keep an entry", low=0),
            Param("tall_lambda", float, S, 0.6, "TALL mask threshold λ", low=0.0),
            Param("lambda", float, S, 1.0),
        ),
        "https://arxiv.org/abs/2405.07813",
        min_experts=2,
        row_separable=True,
        work_buffers=lambda n: n + 4,
    )
)


def median(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """base + λ · the entry-wise median of the task vectors (the mean of the two middle values for
    an even count): coordinate-wise median aggregation, robust to a minority of outlying experts."""
    assert base is not None
    ranked = torch.stack([x - base for x in experts]).sort(dim=0).values
    n = ranked.shape[0]
    return base + float(args.shared["lambda"]) * (ranked[(n - 1) // 2] + ranked[n // 2]) / 2


register(
    MethodSpec(
        "median",
        median,
        (Param("lambda", float, S, 1.0, "scale of the merged task vector"),),
        "https://arxiv.org/abs/1803.01498",
        row_separable=True,
        work_buffers=lambda n: 2 * n + 3,
    )
)
