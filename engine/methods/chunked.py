"""Per-tensor methods computed in row chunks: exact tensor-level statistics, bounded memory.

TIES, DARE, breadcrumbs, Model Stock and SLERP each need a statistic of the *whole* tensor (a
magnitude rank threshold, an L1 norm, a cosine) before any element can be finalised. Here they
run as passes over row chunks: statistics passes that keep only scalars (rank thresholds come from
an exact two-level radix select on the float bit patterns, 2×65536 counters), then an apply pass
that yields output chunks in row order. Peak memory is O(experts × chunk), whatever the tensor.
DARE's random masks hash (seed, tensor, expert, flat element index), so the chunking never
changes the result.

A ``ChunkSource`` hands out rows of the base and of each expert on demand (the task reads them
from the memory map); ``InMemorySource`` wraps plain tensors for direct calls and tests.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from raymerge.engine.errors import RecipeError
from raymerge.engine.methods.registry import MergeArgs


class ChunkSource(Protocol):
    """Row-chunked access to one tensor of the base and of every expert (compute dtype)."""

    ranges: list[tuple[int, int]]
    n_experts: int
    vector: bool  # the tensor is 0-D or 1-D (its rows are single elements)
    numel: int  # elements covered by ``ranges``
    shape: tuple[int, ...]  # the whole tensor's shape
    has_base: bool  # ``base`` is a real model (methods with an optional base use it as the origin)

    def base(self, r0: int, r1: int) -> torch.Tensor: ...
    def expert(self, t: int, r0: int, r1: int) -> torch.Tensor: ...


class InMemorySource:
    """A ``ChunkSource`` over tensors already in memory, split into chunks of ``chunk_rows``."""

    def __init__(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], chunk_rows: int | None = None) -> None:
        self.has_base = base is not None
        if base is None:  # a base-free method: zeros stand in (never read as a model)
            base = torch.zeros_like(experts[0])
        self._shape = base.shape
        self.shape = tuple(base.shape)
        self._base = base.reshape(base.shape[0], -1) if base.dim() >= 1 else base.reshape(1, 1)
        self._experts = [e.reshape(self._base.shape) for e in experts]
        rows = self._base.shape[0]
        step = max(1, chunk_rows or rows)
        self.ranges = [(r, min(rows, r + step)) for r in range(0, rows, step)] or [(0, 0)]
        self.n_experts = len(self._experts)
        self.vector = base.dim() <= 1
        self.numel = base.numel()

    def base(self, r0: int, r1: int) -> torch.Tensor:
        return self._base[r0:r1]

    def expert(self, t: int, r0: int, r1: int) -> torch.Tensor:
        return self._experts[t][r0:r1]

    def assemble(self, chunks: Iterator[torch.Tensor]) -> torch.Tensor:
        return torch.cat([c.reshape(-1) for c in chunks]).reshape(self._shape)


ChunkedFn = Callable[[ChunkSource, MergeArgs], Iterator[torch.Tensor]]


def whole_tensor(fn: ChunkedFn) -> Callable[[torch.Tensor | None, Sequence[torch.Tensor], MergeArgs], torch.Tensor]:
    """Adapt a chunked method to the plain ``fn(base, experts, args) -> Tensor`` signature."""

    def call(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
        src = InMemorySource(base, list(experts))
        return src.assemble(fn(src, args))

    call.__doc__ = fn.__doc__
    call.__name__ = getattr(fn, "__name__", "chunked")
    return call


# ---------------------------------------------------------------------------------------------
# exact rank selection over chunks


@dataclass(frozen=True)
class RankCut:
    """Which elements have ascending rank ≥ r (ties broken by flat index): all of those whose
    value exceeds ``value``, plus those equal to it after the first ``skip`` equal ones."""

    value: float
    skip: int
    everything: bool = False
    nothing: bool = False


def _bits(w: torch.Tensor) -> torch.Tensor:
    # Non-negative float32 values order exactly like their int32 bit patterns.
    return w.to(torch.float32).contiguous().view(torch.int32).reshape(-1)


def rank_cut(chunks: Callable[[], Iterator[torch.Tensor]], n: int, r: int) -> RankCut:
    """Exact cut at ascending rank ``r`` of non-negative values streamed by ``chunks()`` (two passes)."""
    if r <= 0:
        return RankCut(0.0, 0, everything=True)
    if r >= n:
        return RankCut(0.0, 0, nothing=True)
    hi_counts = torch.zeros(1 << 15, dtype=torch.int64)
    for c in chunks():
        hi_counts += torch.bincount((_bits(c) >> 16).cpu(), minlength=1 << 15)[: 1 << 15]
    cum = torch.cumsum(hi_counts, 0)
    hi = int(torch.searchsorted(cum, torch.tensor(r, dtype=torch.int64), right=True))  # bucket holding rank r
    below_hi = int(cum[hi - 1]) if hi > 0 else 0
    lo_counts = torch.zeros(1 << 16, dtype=torch.int64)
    for c in chunks():
        b = _bits(c)
        sel = b[(b >> 16) == hi]
        if sel.numel():
            lo_counts += torch.bincount((sel & 0xFFFF).cpu(), minlength=1 << 16)
    cum_lo = torch.cumsum(lo_counts, 0)
    lo = int(torch.searchsorted(cum_lo, torch.tensor(r - below_hi, dtype=torch.int64), right=True))
    below = below_hi + (int(cum_lo[lo - 1]) if lo > 0 else 0)
    value = torch.tensor([(hi << 16) | lo], dtype=torch.int32).view(torch.float32).item()
    return RankCut(value, r - below)


class CutMask:
    """Applies a ``RankCut`` chunk by chunk in flat order, counting equal elements seen so far."""

    def __init__(self, cut: RankCut) -> None:
        self.cut = cut
        self.equal_seen = 0

    def __call__(self, w: torch.Tensor) -> torch.Tensor:
        cut = self.cut
        if cut.everything:
            return torch.ones_like(w, dtype=torch.bool)
        if cut.nothing:
            return torch.zeros_like(w, dtype=torch.bool)
        value = torch.tensor(cut.value, dtype=torch.float32, device=w.device)
        w32 = w.to(torch.float32)
        keep = w32 > value
        equal = w32 == value
        where = equal.reshape(-1).nonzero().squeeze(1)
        if where.numel():
            # The equal elements of this chunk are number equal_seen, equal_seen+1, … in flat order.
            first_kept = max(0, cut.skip - self.equal_seen)
            keep.view(-1)[where[first_kept:]] = True
            self.equal_seen += where.numel()
        return keep


# ---------------------------------------------------------------------------------------------
# random masks: a counter-based hash of (seed, tensor, expert, flat element index)

_U64 = (1 << 64) - 1


def _as_int64(x: int) -> int:
    """The signed int64 with the bit pattern of ``x`` mod 2⁶⁴ (torch has no uint64 arithmetic)."""
    x &= _U64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _as_int64(0x9E3779B97F4A7C15)
_MIX = ((30, _as_int64(0xBF58476D1CE4E5B9)), (27, _as_int64(0x94D049BB133111EB)), (31, None))
# Elements hashed per step: bounds the two int64 temporaries at 16 MiB whatever the chunk size.
MASK_SLICE = 1 << 20


def mask_key(seed: int, tensor_name: str, expert: int) -> int:
    """The 64-bit key of expert ``expert``'s random mask over tensor ``tensor_name`` (int64 pattern)."""
    digest = hashlib.sha256(f"{seed}:{tensor_name}:{expert}".encode()).digest()
    return _as_int64(int.from_bytes(digest[:8], "little"))


def _splitmix64_(z: torch.Tensor, tmp: torch.Tensor) -> None:
    """SplitMix64's finaliser in place on int64 ``z``; logical shifts are emulated by masking the
    arithmetic ones, and multiplication wraps mod 2⁶⁴ as the unsigned original does."""
    for shift, mult in _MIX:
        torch.bitwise_right_shift(z, shift, out=tmp)
        tmp.bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(tmp)
        if mult is not None:
            z.mul_(mult)


def _hash_bits53(key: int, start: int, n: int, device: torch.device) -> torch.Tensor:
    """The top 53 bits of SplitMix64(key + i·φ) for i = start … start + n − 1 (int64): the random
    draw behind DARE's and DELLA's masks; callers keep ``n`` at ``MASK_SLICE`` or below."""
    z = torch.arange(start, start + n, dtype=torch.int64, device=device)
    tmp = torch.empty_like(z)
    z.mul_(_GOLDEN).add_(key)
    _splitmix64_(z, tmp)
    torch.bitwise_right_shift(z, 11, out=tmp)
    return tmp.bitwise_and_((1 << 53) - 1)


def bernoulli_mask(key: int, start: int, shape: torch.Size, density: float, device: torch.device) -> torch.Tensor:
    """Keep-mask of the elements with flat indices ``start … start + numel(shape) − 1`` of a tensor.

    Element i is kept iff the top 53 bits of SplitMix64(key + i·φ) fall below ⌊density·2⁵³⌋, so
    P(keep) = density to double precision, and the mask is a pure function of (key, i): the same
    whatever the row chunking, the memory budget, the device or the order tasks run in.
    """
    n = math.prod(shape)
    out = torch.empty(n, dtype=torch.bool, device=device)
    threshold = int(density * 2.0**53)
    for lo in range(0, n, MASK_SLICE):
        hi = min(n, lo + MASK_SLICE)
        torch.lt(_hash_bits53(key, start + lo, hi - lo, device), threshold, out=out[lo:hi])
    return out.reshape(shape)


def magprune_probs(w: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MAGPRUNE keep-probabilities (fp64) for magnitudes ``w`` (rows × cols), ranked within
    each row: the smallest entry of a row gets density − ε, the largest density + ε, linear in the
    rank between (mergekit's rule; equal magnitudes are ranked by position, so the result is
    deterministic). A one-column row has no ranks to spread: every entry gets ``density``."""
    cols = w.shape[1]
    if cols <= 1:
        return torch.full(w.shape, density, dtype=torch.float64, device=w.device)
    order = torch.argsort(w, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(cols, device=w.device).expand_as(order))
    return ranks.to(torch.float64).mul_(2 * epsilon / (cols - 1)).add_(density - epsilon)


def ranked_mask(key: int, start: int, probs: torch.Tensor) -> torch.Tensor:
    """Keep-mask with element-wise probabilities ``probs`` (flat indices from ``start``): element i
    is kept iff its 53 hashed bits, read as a fraction of 2⁵³, fall below probs[i]."""
    flat = probs.reshape(-1)
    out = torch.empty(flat.shape, dtype=torch.bool, device=probs.device)
    for lo in range(0, flat.numel(), MASK_SLICE):
        hi = min(flat.numel(), lo + MASK_SLICE)
        u = _hash_bits53(key, start + lo, hi - lo, probs.device).to(torch.float64).mul_(2.0**-53)
        torch.lt(u, flat[lo:hi], out=out[lo:hi])
    return out.reshape(probs.shape)


# ---------------------------------------------------------------------------------------------
# sparsifiers: a per-expert plan made in statistics passes, applied chunk by chunk


# Up to this many elements, |Δ| is kept in memory for the two selection passes instead of being
# recomputed from the inputs (it costs 4 bytes per element, within a few chunks' worth).
RESIDENT_SELECT_ELEMENTS = 1 << 24


def _delta_chunks(src: ChunkSource, t: int) -> Callable[[], Iterator[torch.Tensor]]:
    def gen() -> Iterator[torch.Tensor]:
        for r0, r1 in src.ranges:
            yield (src.expert(t, r0, r1) - src.base(r0, r1)).abs()

    if src.numel <= RESIDENT_SELECT_ELEMENTS:
        cached = list(gen())
        return lambda: iter(cached)
    return gen


class Sparsifier:
    """Sparsify expert ``t``'s task vector chunk by chunk; ``prepare`` runs the statistics passes."""

    def __init__(self, kind: str | None, src: ChunkSource, t: int, p: dict[str, Any], args: MergeArgs) -> None:
        self.kind = kind
        self.density = float(p.get("density", 1.0))
        self.rescale = bool(args.shared.get("rescale", False))
        self.key = mask_key(args.seed, args.tensor_name, t) if kind in ("random", "magprune") else 0
        self.epsilon = float(p.get("epsilon", 0.0))
        self.vector_probs: torch.Tensor | None = None
        self.factor = 1.0
        self.lower: CutMask | None = None
        self.upper: CutMask | None = None
        self.zero = False
        if kind is None or self.density >= 1:
            self.kind = None
            return
        n = src.numel
        if kind == "magnitude":
            if self.density <= 0 or n == 0:
                self.zero = True
                return
            k = max(1, int(self.density * n))
            self.lower = CutMask(rank_cut(_delta_chunks(src, t), n, n - k))
        elif kind == "magprune":
            if self.density <= 0 or n == 0:
                self.zero = True
                return
            if src.vector:  # a 1-D tensor is one row (mergekit's unsqueeze): rank it whole, once
                w = torch.cat(list(_delta_chunks(src, t)())).reshape(1, -1)
                self.vector_probs = magprune_probs(w, self.density, self.epsilon).reshape(-1)
        elif kind == "outliers":
            target = int(self.density * n)
            top = int(float(p["gamma"]) * n)
            bottom = max(0, n - target - top)
            chunks = _delta_chunks(src, t)
            self.lower = CutMask(rank_cut(chunks, n, bottom))
            if bottom + target < n:
                self.upper = CutMask(rank_cut(chunks, n, bottom + target))
        if self.rescale:
            before = after = 0.0
            probe = self.fresh()
            for r0, r1 in src.ranges:
                d = src.expert(t, r0, r1) - src.base(r0, r1)
                before += float(d.abs().sum(dtype=torch.float64))
                after += float((d * probe._mask(d, r0)).abs().sum(dtype=torch.float64))
            if before >= 1e-7 and after >= 1e-7:
                self.factor = before / after

    def fresh(self) -> Sparsifier:
        """A copy with the chunk counters reset (masks depend on the equal elements seen); the
        rescale probe walks the chunks on a copy so this instance starts the apply pass unused."""
        twin = object.__new__(Sparsifier)
        twin.__dict__.update(self.__dict__)
        twin.lower = CutMask(self.lower.cut) if self.lower else None
        twin.upper = CutMask(self.upper.cut) if self.upper else None
        return twin

    def _mask(self, d: torch.Tensor, r0: int) -> torch.Tensor:
        if self.kind == "magprune":
            row = d[0].numel() if d.dim() >= 1 and d.shape[0] else 0
            if self.vector_probs is not None:
                probs = self.vector_probs[r0 : r0 + d.shape[0]].to(d.device).reshape(d.shape)
                return ranked_mask(self.key, r0 * row, probs)
            # Rows are complete in every chunk, so each row's ranks are local; a slice of rows at a
            # time bounds the int64/fp64 temporaries near MASK_SLICE elements whatever the chunk.
            flat = d.reshape(d.shape[0], -1) if d.dim() != 1 else d.reshape(1, -1)
            out = torch.empty(flat.shape, dtype=torch.bool, device=d.device)
            step = max(1, MASK_SLICE // max(1, flat.shape[1]))
            for a in range(0, flat.shape[0], step):
                b = min(flat.shape[0], a + step)
                probs = magprune_probs(flat[a:b].abs(), self.density, self.epsilon)
                out[a:b] = ranked_mask(self.key, (r0 + a) * row, probs)
            return out.reshape(d.shape)
        if self.kind == "random":
            # Chunks are rows × the rest of the tensor: row r0 starts at flat index r0 · row length.
            row = d[0].numel() if d.dim() >= 1 and d.shape[0] else 0
            return bernoulli_mask(self.key, r0 * row, d.shape, self.density, d.device)
        w = d.abs()
        keep = self.lower(w) if self.lower else torch.ones_like(w, dtype=torch.bool)
        if self.upper is not None:
            keep &= ~self.upper(w)
        return keep

    def __call__(self, d: torch.Tensor, r0: int) -> torch.Tensor:
        """Sparsified (and rescaled) task-vector chunk ``d`` holding rows ``r0 …`` of the tensor."""
        if self.zero:
            return torch.zeros_like(d)
        if self.kind is None:
            return d
        kept = d * self._mask(d, r0)
        return kept * self.factor if self.factor != 1.0 else kept


# ---------------------------------------------------------------------------------------------
# the generalized task-arithmetic family (mergekit semantics), chunked


def gta(src: ChunkSource, args: MergeArgs, sparsify: str | None, sign_consensus: bool) -> Iterator[torch.Tensor]:
    """Sparsify each task vector, weight it, optionally keep sign-consensus entries, normalise, scale."""
    weights = [float(p["weight"]) for p in args.per_model]
    sparsifiers = [Sparsifier(sparsify, src, t, dict(p), args) for t, p in enumerate(args.per_model)]
    normalize = bool(args.shared["normalize"])
    lam = float(args.shared["lambda"])
    total_w = sum(weights)
    for r0, r1 in src.ranges:
        base = src.base(r0, r1)
        deltas = []
        for t in range(src.n_experts):
            d = sparsifiers[t](src.expert(t, r0, r1) - base, r0)
            deltas.append(d * weights[t])
        if sign_consensus:
            total = torch.stack(deltas).sum(0) if deltas else torch.zeros_like(base)
            majority = torch.where(total >= 0, 1.0, -1.0).to(base.dtype)
            mixed = torch.zeros_like(base)
            divisor = torch.zeros_like(base)
            for d, w in zip(deltas, weights, strict=True):
                agree = d.sign() == majority  # trimmed zeros never agree
                mixed.add_(d * agree)
                divisor.add_(agree.to(base.dtype), alpha=w)
            divisor[divisor == 0] = 1
            if normalize:
                mixed.div_(divisor)
        else:
            mixed = torch.zeros_like(base)
            for d in deltas:
                mixed.add_(d)
            if normalize:
                mixed.div_(1.0 if abs(total_w) < 1e-8 else total_w)
        if lam != 1:
            mixed.mul_(lam)
        yield base + mixed


def ties(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """TIES (Yadav et al. 2023): magnitude trim to ``density``, sign election, disjoint mean."""
    return gta(src, args, "magnitude", True)


def dare_linear(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """DARE (Yu et al. 2024): random drop with keep-probability ``density``, L1 rescale, then sum."""
    return gta(src, args, "random", False)


def dare_ties(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """DARE drop-and-rescale followed by TIES sign consensus."""
    return gta(src, args, "random", True)


def della(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """DELLA (Deep et al. 2024): MAGPRUNE drop (keep-probability density ± ε by magnitude rank
    within each row), L1 rescale, then TIES sign consensus and disjoint mean (mergekit's della)."""
    return gta(src, args, "magprune", True)


def della_linear(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """DELLA's MAGPRUNE drop and L1 rescale, then a weighted sum (mergekit's della_linear)."""
    return gta(src, args, "magprune", False)


def breadcrumbs(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """Model Breadcrumbs (Davari & Belilovsky 2023): drop the ``gamma`` top outliers and the smallest."""
    return gta(src, args, "outliers", False)


def breadcrumbs_ties(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """Breadcrumbs sparsification followed by TIES sign consensus."""
    return gta(src, args, "outliers", True)


def sce(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """SCE (Wan et al. 2024, mergekit's ``sce``): *select* the ``select_topk`` share of the entries
    with the largest variance across the task vectors (of those with non-zero variance), weight
    each task vector by its mean square over the tensor (normalised to sum 1), *erase* entries
    whose sign disagrees with the sign of the sum, and take the weighted mean of the rest.

    Three passes over the chunks: variances (twice, for the exact top-k cut), the experts' mean
    squares, then the merge; memory is a stack of the experts' chunks.
    """
    topk = float(args.shared["select_topk"])
    n_exp = src.n_experts

    def taus(r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        base = src.base(r0, r1)
        return base, torch.stack([src.expert(t, r0, r1) - base for t in range(n_exp)])

    def variances() -> Iterator[torch.Tensor]:
        for r0, r1 in src.ranges:
            yield taus(r0, r1)[1].var(0, unbiased=False)

    cut: RankCut | None = None  # None: every entry selected
    if topk < 1:
        k = int(sum(int(torch.count_nonzero(v)) for v in variances()) * topk) if topk > 0 else 0
        cut = RankCut(0.0, 0, nothing=True) if k == 0 else rank_cut(variances, src.numel, src.numel - k)

    def selected() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        select = CutMask(cut) if cut is not None else None
        for r0, r1 in src.ranges:
            base, tv = taus(r0, r1)
            if select is not None:
                tv = tv * select(tv.var(0, unbiased=False))
            yield base, tv

    squares = torch.zeros(n_exp, dtype=torch.float64)
    for _, tv in selected():
        squares += tv.reshape(n_exp, -1).to(torch.float64).square().sum(1).cpu()
    means = squares / max(1, src.numel)
    total = float(means.sum())
    weights = torch.full((n_exp,), 1.0 / n_exp) if abs(total) < 1e-6 else (means / total).float()
    for base, tv in selected():
        majority = torch.where(tv.sum(0) >= 0, 1.0, -1.0).to(tv.dtype)
        kept = (tv.sign() == majority).to(tv.dtype)  # zeros never agree
        w = weights.to(tv.device, tv.dtype).reshape(-1, *([1] * (tv.dim() - 1))) * kept
        yield base + (tv * w).sum(0) / w.sum(0).clamp(min=1e-6)


# ---------------------------------------------------------------------------------------------
# spherical methods with an optional base (mergekit's multislerp and nuslerp)


def _origin_and_points(src: ChunkSource, r0: int, r1: int) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """(base chunk or None, the experts' chunks relative to it)."""
    if not src.has_base:
        return None, [src.expert(t, r0, r1) for t in range(src.n_experts)]
    base = src.base(r0, r1)
    return base, [src.expert(t, r0, r1) - base for t in range(src.n_experts)]


def multislerp(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """Barycentric interpolation on the hypersphere (mergekit's ``multislerp``), about the base
    when there is one. The inputs are projected to unit length, averaged with the (normalised)
    weights, and the mean direction is scaled to the weighted mean of their norms. (mergekit also
    maps the weighted tangent vectors at that mean back with the exponential map, but they sum to
    zero by construction, so that step changes nothing beyond rounding.) Two passes: the norms,
    then the norm of the weighted mean of unit vectors."""
    weights = [float(p["weight"]) for p in args.per_model]
    n = src.n_experts
    if n == 1:  # nothing to interpolate: the one model as it is
        for r0, r1 in src.ranges:
            yield src.expert(0, r0, r1)
        return
    if bool(args.shared["normalize_weights"]):
        total = sum(weights)
        weights = [w / total for w in weights]
    eps = float(args.shared["eps"])
    squares = torch.zeros(n, dtype=torch.float64)
    for r0, r1 in src.ranges:
        _, pts = _origin_and_points(src, r0, r1)
        squares += torch.stack([p.to(torch.float64).square().sum() for p in pts]).cpu()
    norms = squares.sqrt().tolist()

    def mean_chunk(pts: list[torch.Tensor]) -> torch.Tensor:
        m = torch.zeros_like(pts[0])
        for p, w, nrm in zip(pts, weights, norms, strict=True):
            m.add_(p / (nrm + eps) * w)  # mergekit's rounding order: unit vector, then weight
        return m

    mean_sq = 0.0
    for r0, r1 in src.ranges:
        mean_sq += float(mean_chunk(_origin_and_points(src, r0, r1)[1]).to(torch.float64).square().sum())
    mean_norm = mean_sq**0.5
    if mean_norm < eps and n != 2:
        raise RecipeError("multislerp: the weighted mean of the unit-length inputs is zero (antipodal inputs "
                          "whose weights balance out)", tensor=args.tensor_name, hint="use other weights")  # fmt: skip
    scale = sum(w * nrm for w, nrm in zip(weights, norms, strict=True)) / mean_norm if mean_norm >= eps else 0.0
    for r0, r1 in src.ranges:
        base, pts = _origin_and_points(src, r0, r1)
        if mean_norm < eps:  # two balanced antipodes: mergekit falls back to the weighted sum
            out = pts[0] * weights[0] + pts[1] * weights[1]
        else:
            out = mean_chunk(pts).mul_(scale)
        yield out if base is None else base + out


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


def arcee_fusion(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """Arcee Fusion (mergekit's ``arcee_fusion``): importance = |Δ| × KL(softmax(other) ‖
    softmax(base)) of its row (along the last dimension); entries with importance ≥ median +
    1.5·IQR take the other model's value, the rest keep the base's. The quartiles are exact order
    statistics (mergekit samples 1M entries at random above that size, so it is not deterministic
    there; below, the two agree)."""
    last = src.shape[-1] if src.shape else 1

    def importance(r0: int, r1: int) -> torch.Tensor:
        base, other = src.base(r0, r1), src.expert(0, r0, r1)
        rows_b = base.reshape(-1, last) if not src.vector else base.reshape(1, -1)
        rows_o = other.reshape(-1, last) if not src.vector else other.reshape(1, -1)
        p = torch.softmax(rows_o, dim=-1) + 1e-8
        q = torch.softmax(rows_b, dim=-1) + 1e-8
        kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
        return ((rows_o - rows_b).abs() * kl).clamp(min=0).reshape(-1)  # KL ≥ 0 up to rounding

    if src.vector and len(src.ranges) > 1:  # a 1-D tensor is one row: rank it whole
        whole = [(src.ranges[0][0], src.ranges[-1][1])]
        ranges = whole
    else:
        ranges = src.ranges
    n = src.numel
    cached = [importance(r0, r1) for r0, r1 in ranges] if n <= RESIDENT_SELECT_ELEMENTS else None

    def chunks() -> Iterator[torch.Tensor]:
        if cached is not None:
            yield from cached
        else:
            for r0, r1 in ranges:
                yield importance(r0, r1)

    q1, median, q3 = (rank_cut(chunks, n, int(q * (n - 1))).value for q in (0.25, 0.5, 0.75))
    threshold = median + 1.5 * (q3 - q1)
    for i, (r0, r1) in enumerate(ranges):
        imp = cached[i] if cached is not None else importance(r0, r1)
        base, other = src.base(r0, r1), src.expert(0, r0, r1)
        keep = (imp >= threshold).reshape(base.shape)
        yield base + (other - base) * keep


def karcher(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """Karcher (Riemannian) mean of the models on the unit hypersphere, scaled by their mean norm
    (mergekit's ``karcher``; equal weights, every listed model an input).

    Every iterate of mergekit's fixed-point iteration is a combination of the unit vectors
    u_t = x_t/‖x_t‖, so the iteration runs on those coefficients with the Gram matrix G = (u_s·u_t):
    one pass over the chunks for G, one to write Σ c_t u_t — memory stays a stack of chunks
    however large the tensor, and the result equals the iteration on full tensors.
    """
    n = src.n_experts
    if n == 1:
        for r0, r1 in src.ranges:
            yield src.expert(0, r0, r1)
        return
    max_iter, tol = int(args.shared["max_iter"]), float(args.shared["tol"])
    raw = torch.zeros(n, n, dtype=torch.float64)
    for r0, r1 in src.ranges:
        x = torch.stack([src.expert(t, r0, r1).reshape(-1) for t in range(n)]).to(torch.float64)
        raw += (x @ x.T).cpu()
    norms = raw.diagonal().clamp(min=0).sqrt()
    valid = [t for t in range(n) if float(norms[t]) > tol]
    scale = float(norms.sum()) / n  # Σ α_t‖x_t‖ with α_t = 1/n over every input, as mergekit
    if not valid:
        for r0, r1 in src.ranges:
            yield torch.zeros_like(src.expert(0, r0, r1))
        return
    idx = torch.tensor(valid)
    gram = raw[idx][:, idx] / (norms[idx, None] * norms[None, idx])
    alpha = torch.full((len(valid),), 1.0 / len(valid), dtype=torch.float64)

    def norm(c: torch.Tensor) -> float:
        return float(c @ gram @ c) ** 0.5 if float(c @ gram @ c) > 0 else 0.0

    c = alpha.clone()
    m = norm(c)
    c = torch.eye(len(valid), dtype=torch.float64)[0] if m < tol else c / m
    for _ in range(max_iter):
        dots = (gram @ c).clamp(-1.0, 1.0)
        theta = torch.arccos(dots)
        move = theta >= tol
        step = torch.where(move, alpha * theta / torch.sin(torch.where(move, theta, torch.ones_like(theta))),
                           torch.zeros_like(theta))  # fmt: skip
        tangent = step - (step * dots).sum() * c  # Σ_t step_t (u_t − d_t·mean), in coefficients
        tn = norm(tangent)
        if tn < tol:
            break
        c = c * math.cos(tn) + tangent * (math.sin(tn) / tn)
        un = norm(c)
        if un > tol:
            c = c / un
    coef = {t: scale * float(c[i]) / float(norms[t]) for i, t in enumerate(valid)}
    for r0, r1 in src.ranges:
        out = torch.zeros_like(src.expert(valid[0], r0, r1))
        for t, k in coef.items():
            out.add_(src.expert(t, r0, r1), alpha=k)
        yield out


def _slerp_coefficients(s00: torch.Tensor, s11: torch.Tensor, s01: torch.Tensor, t: float,
                        eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Coefficients (a, b) of result = a·v0 + b·v1 for slerp at ``t`` between v0 and v1, from the
    sums of squares and the dot product (fp64), per group; mergekit's nuslerp rule, including its
    linear fallback for (anti)colinear inputs."""
    cos = (s01 / (s00.sqrt().clamp(min=1e-7) * s11.sqrt().clamp(min=1e-7))).clamp(-1, 1)
    colinear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    sin = torch.sin(theta)
    a = torch.where(colinear, torch.full_like(cos, 1 - t), torch.sin((1 - t) * theta) / sin)
    b = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / sin)
    return a, b


def nuslerp(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """Slerp between two models (mergekit's ``nuslerp``), of their task vectors when there is a
    base, at t = w₁/(w₀ + w₁): over the whole flattened tensor (``nuslerp_flatten``, default), per
    row (along the last dimension) or per column (``nuslerp_row_wise``: along the first)."""
    w0, w1 = (float(p["weight"]) for p in args.per_model)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    flatten = bool(args.shared["nuslerp_flatten"])
    mode = "whole" if flatten or len(src.shape) <= 1 else ("columns" if args.shared["nuslerp_row_wise"] else "rows")
    sums: list[torch.Tensor] = []
    if mode != "rows":  # one pass: sums of squares and the dot product, whole or per column
        acc = None
        for r0, r1 in src.ranges:
            _, (v0, v1) = _origin_and_points(src, r0, r1)
            v0, v1 = v0.to(torch.float64), v1.to(torch.float64)
            dim = None if mode == "whole" else 0
            part = [(v0 * v0).sum(dim), (v1 * v1).sum(dim), (v0 * v1).sum(dim)]
            acc = part if acc is None else [x + y for x, y in zip(acc, part, strict=True)]
        assert acc is not None
        sums = acc
    coef = _slerp_coefficients(sums[0], sums[1], sums[2], t) if sums else None
    last = src.shape[-1] if src.shape else 1
    for r0, r1 in src.ranges:
        base, (v0, v1) = _origin_and_points(src, r0, r1)
        if coef is not None:
            a, b = (c.to(v0.device, v0.dtype) for c in coef)
            out = a * v0 + b * v1
        else:  # per row of the last dimension, inside this chunk
            r0w, r1w = v0.reshape(-1, last), v1.reshape(-1, last)
            x0, x1 = r0w.to(torch.float64), r1w.to(torch.float64)
            a, b = _slerp_coefficients((x0 * x0).sum(1, keepdim=True), (x1 * x1).sum(1, keepdim=True),
                                       (x0 * x1).sum(1, keepdim=True), t)  # fmt: skip
            out = (a.to(v0.dtype) * r0w + b.to(v0.dtype) * r1w).reshape(v0.shape)
        yield out if base is None else base + out


# ---------------------------------------------------------------------------------------------
# geometric methods with whole-tensor statistics


def slerp(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """Spherical interpolation from the base (t=0) to the one expert (t=1) over the whole tensor.

    The angle comes from the normalised flattened tensors; nearly collinear pairs (|cos| >
    0.9995) fall back to linear interpolation. Coefficients apply to the raw tensors.
    """
    t = float(args.shared["t"])
    eps = 1e-8
    sa = sb = dot = 0.0
    for r0, r1 in src.ranges:
        a, b = src.base(r0, r1).double(), src.expert(0, r0, r1).double()
        sa += float((a * a).sum())
        sb += float((b * b).sum())
        dot += float((a * b).sum())
    na, nb = math.sqrt(sa), math.sqrt(sb)
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    cos = max(-1.0, min(1.0, dot / (na * nb)))
    if abs(cos) > 0.9995:
        ca, cb = 1 - t, t
    else:
        theta = math.acos(cos)
        s = math.sin(theta)
        ca, cb = math.sin((1 - t) * theta) / s, math.sin(t * theta) / s
    for r0, r1 in src.ranges:
        yield ca * src.base(r0, r1) + cb * src.expert(0, r0, r1)


def _stock_t(cos: torch.Tensor, k: int) -> torch.Tensor:
    denom = 1 + (k - 1) * cos
    singular = denom.abs() < 1e-6  # no finite estimate: keep the base there
    return torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, torch.ones_like(denom), denom))


def model_stock(src: ChunkSource, args: MergeArgs) -> Iterator[torch.Tensor]:
    """Model Stock (Jang et al. 2024): move from the base towards the experts' mean by
    t = k·cosθ / (1 + (k−1)·cosθ), cosθ the mean pairwise cosine of task vectors over the whole
    tensor, or per output row with ``filter_wise``."""
    k = src.n_experts
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    # A 1-D tensor is a single filter (mergekit unsqueezes it), so it takes the whole-tensor path.
    filter_wise = bool(args.shared["filter_wise"]) and not src.vector

    def cosines(dots: torch.Tensor, sq: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(dots[0])
        for n, (i, j) in enumerate(pairs):
            norm = (sq[i].sqrt() * sq[j].sqrt()).clamp(min=1e-6)
            total += (dots[n] / norm).clamp(-1, 1)
        return total / len(pairs)

    scalar_t = None
    if not filter_wise:
        dots = torch.zeros(len(pairs), dtype=torch.float64)
        sq = torch.zeros(k, dtype=torch.float64)
        for r0, r1 in src.ranges:
            base = src.base(r0, r1)
            offs = [(src.expert(t, r0, r1) - base).double() for t in range(k)]
            for n, (i, j) in enumerate(pairs):
                dots[n] += (offs[i] * offs[j]).sum()
            for i in range(k):
                sq[i] += (offs[i] * offs[i]).sum()
        scalar_t = _stock_t(cosines(dots, sq), k)
    for r0, r1 in src.ranges:
        base = src.base(r0, r1)
        xs = [src.expert(t, r0, r1) for t in range(k)]
        if scalar_t is None:
            offs = [x - base for x in xs]
            dots = torch.stack([(offs[i] * offs[j]).sum(-1) for i, j in pairs])
            sq = torch.stack([(o * o).sum(-1) for o in offs])
            t = _stock_t(cosines(dots, sq), k).unsqueeze(-1)
        else:
            t = scalar_t.to(base.dtype)
        mean = torch.stack(xs).mean(0) if k else base
        yield t * mean + (1 - t) * base
