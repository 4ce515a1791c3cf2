"""Which entries of a task vector to keep: exact rank cuts, hashed random masks, sparsifiers.

* **Rank cuts** select by magnitude rank over a whole tensor streamed in row chunks: an exact
  two-level radix select on the float bit patterns (2×65536 counters, two passes), then a mask
  applied chunk by chunk in flat order with ties broken by flat index (TIES, breadcrumbs, SCE,
  Arcee Fusion).
* **Random masks** (DARE, DELLA) hash (seed, tensor, expert, flat element index) with a
  counter-based SplitMix64, so a mask never depends on the row chunking, the device or the order
  tasks run in.
* A **Sparsifier** makes one expert's plan in statistics passes (a rank cut, a mask key, an L1
  rescale factor) and applies it to each chunk of that expert's task vector.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from raymerge.engine.methods.chunks import ChunkSource
from raymerge.engine.methods.registry import RESIDENT_SELECT_ELEMENTS, MergeArgs

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
    # Non-negative float32 values order exactly like their int32 bit patterns; abs() turns a -0.0
    # (a zero change times a rounding-negative weight) into +0.0, whose pattern is not negative.
    return w.to(torch.float32).abs().contiguous().view(torch.int32).reshape(-1)


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

    def float_mask_(self, w: torch.Tensor) -> torch.Tensor | None:
        """This chunk's mask as 1.0 / 0.0 written over float32 ``w``, or None (``w`` untouched)
        for the one chunk where the skipped equal elements end, which needs ``__call__``.

        In every other chunk the equal elements are either all skipped (the mask is ``w > value``)
        or all kept (``w >= value``), so one in-place float comparison gives the same mask as the
        bool path without locating them: a float pass instead of bool temporaries, and callers
        multiply by a float, several times cheaper than by a bool.
        """
        cut = self.cut
        if cut.everything or cut.nothing:
            return None
        to_skip = cut.skip - self.equal_seen
        if to_skip <= 0:
            return w.ge_(cut.value)
        equal = int(torch.count_nonzero(torch.eq(w, cut.value, out=torch.empty_like(w))))
        if equal > to_skip:
            return None
        self.equal_seen += equal
        return w.gt_(cut.value)

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
# Elements hashed per step: bounds the two int64 temporaries at 4 MiB whatever the chunk size. The
# hash is a dozen in-place int64 passes; slices this small keep them in a core's L2 cache, which
# made DARE's mask 3.6x faster than 1 << 20 slices (the mask is per element, so the same bits).
MASK_SLICE = 1 << 18


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


def bernoulli_mask(
    key: int, start: int, shape: torch.Size, density: float, device: torch.device, dtype: torch.dtype = torch.bool
) -> torch.Tensor:
    """Keep-mask of the elements with flat indices ``start … start + numel(shape) − 1`` of a tensor.

    Element i is kept iff the top 53 bits of SplitMix64(key + i·φ) fall below ⌊density·2⁵³⌋, so
    P(keep) = density to double precision, and the mask is a pure function of (key, i): the same
    whatever the row chunking, the memory budget, the device or the order tasks run in. A float
    ``dtype`` gives the same mask as 1.0 / 0.0 (multiplying by it is much cheaper than by a bool).
    """
    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype, device=device)
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


# Up to RESIDENT_SELECT_ELEMENTS elements (registry.py, where the memory model counts it), |Δ| is
# kept in memory for the two selection passes instead of being recomputed from the inputs.


def resident(numel: int) -> bool:
    """Whether a selection statistic over ``numel`` elements stays in memory between its passes
    (the planner counts 4 bytes per element for it up to ``RESIDENT_SELECT_ELEMENTS``)."""
    return numel <= RESIDENT_SELECT_ELEMENTS


def stats_numel(src: ChunkSource) -> int:
    """Elements the tensor-wide statistics of ``src`` span (its fused group's, see ``stats_sources``)."""
    return sum(s.numel for s in src.stats_sources)


def _delta_chunks(src: ChunkSource, t: int) -> Callable[[], Iterator[torch.Tensor]]:
    """|τ_t| chunk by chunk over every stats source (the tensor, then the rest of its fused group)."""

    def gen() -> Iterator[torch.Tensor]:
        for s in src.stats_sources:
            for r0, r1 in s.ranges:
                yield (s.expert(t, r0, r1) - s.base(r0, r1)).abs()

    if resident(stats_numel(src)):
        cached = list(gen())
        return lambda: iter(cached)
    return gen


SparsifyKind = Literal["magnitude", "random", "magprune", "outliers"]


class Sparsifier:
    """Sparsify expert ``t``'s task vector chunk by chunk; the constructor runs the statistics passes.

    ``kind``: ``magnitude`` keeps the ``density`` share of largest |τ| (TIES), ``random`` keeps
    each entry with probability ``density`` (DARE), ``magprune`` with density ± epsilon by
    magnitude rank within its row (DELLA), ``outliers`` drops the ``gamma`` share of largest and
    the smallest entries so ``density`` remain (breadcrumbs); None keeps everything.
    """

    def __init__(self, kind: SparsifyKind | None, src: ChunkSource, t: int, p: dict[str, Any], args: MergeArgs) -> None:
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
        n = stats_numel(src) if kind in ("magnitude", "outliers") else src.numel
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
            return bernoulli_mask(self.key, r0 * row, d.shape, self.density, d.device, d.dtype)
        w = d.abs()
        if self.upper is None and self.lower is not None and w.dtype == torch.float32:
            fast = self.lower.float_mask_(w)
            if fast is not None:
                return fast
        keep = self.lower(w) if self.lower else torch.ones_like(w, dtype=torch.bool)
        if self.upper is not None:
            keep &= ~self.upper(w)
        return keep

    def apply_(self, d: torch.Tensor, r0: int) -> torch.Tensor:
        """``__call__`` in place on ``d`` (the same kernels on the same values, so the same bits)."""
        if self.zero:
            return d.zero_()
        if self.kind is None:
            return d
        d.mul_(self._mask(d, r0))
        return d.mul_(self.factor) if self.factor != 1.0 else d

    def __call__(self, d: torch.Tensor, r0: int) -> torch.Tensor:
        """Sparsified (and rescaled) task-vector chunk ``d`` holding rows ``r0 …`` of the tensor."""
        if self.zero:
            return torch.zeros_like(d)
        if self.kind is None:
            return d
        kept = d * self._mask(d, r0)
        return kept * self.factor if self.factor != 1.0 else kept
