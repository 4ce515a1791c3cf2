"""The trimmed covariance of ACTMat's ``trim`` option: the exact magnitude threshold of one task
vector, found by streaming its row blocks, and the trimming of a block by it.

``trim = k`` keeps, per tensor and per expert, the ⌈k·numel⌉ entries of Δ_t largest in
magnitude: τ_t is the ⌈k·numel⌉-th largest |δ| of the whole Δ_t (in the statistics dtype), and
trim(Δ_t) = Δ_t ⊙ [|Δ_t| ≥ τ_t] (entries tied with τ_t are all kept). C_t = trim(Δ_t)ᵀ trim(Δ_t).

τ_t is found without holding Δ_t: |δ| ≥ 0, so the bit pattern of |δ| read as a signed integer of
the same width orders as |δ| does, and a radix selection on it needs only histograms. Pass 1
counts the top 16 bits (sign, exponent and the leading mantissa bits) of every |δ| into 65 536
bins and finds the bin holding the k-th largest. If that bin holds at most one block's worth of
entries, pass 2 collects them and selects exactly; otherwise the next 16 bits of the entries in
that bin are counted, and so on: at most 4 passes in fp64 (2 in fp32), each a read of the
expert's row blocks. Memory: the 65 536-bin histogram (512 KiB), and per block |δ| (one block in
the statistics dtype) and three boolean masks, or the collected candidates (at most one block).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

DIGIT_BITS = 16
BINS = 1 << DIGIT_BITS
_INT = {torch.float64: torch.int64, torch.float32: torch.int32}


def trim_count(trim: float, numel: int) -> int:
    """How many entries ``trim`` keeps of a tensor of ``numel`` entries: ⌈trim·numel⌉, at least 1."""
    return max(1, min(numel, math.ceil(trim * numel * (1 - 1e-12))))


def _bits(d: torch.Tensor) -> torch.Tensor:
    """|d| as integers of the same width (order-preserving for non-negative floats)."""
    return d.abs().view(_INT[d.dtype]).reshape(-1)


def magnitude_threshold(blocks: Callable[[], Iterable[torch.Tensor]], keep: float) -> float:
    """τ: the ⌈keep·numel⌉-th largest |δ| over every block that ``blocks()`` yields, exactly (one
    pass over the blocks per call; at most 4 calls in fp64, 2 in fp32).

    ``blocks()`` must yield the same values on every call (the blocks of one Δ_t in the statistics
    dtype). Returns 0.0 when fewer than ⌈keep·numel⌉ entries are non-zero.
    """
    width = None
    prefix = 0  # the bits above ``shift`` that the k-th largest has
    need = 0  # its rank among the entries that share that prefix (set after the first pass)
    numel = 0
    shift = None
    budget = 0
    dtype = torch.float64
    while True:
        hist: torch.Tensor | None = None
        for d in blocks():
            if width is None:
                width = d.element_size() * 8
                shift = width - DIGIT_BITS
                dtype = d.dtype
            budget = max(budget, d.numel())
            if need == 0:
                numel += d.numel()
            assert shift is not None
            t = _bits(d)
            if shift + DIGIT_BITS < width:  # only the entries whose higher bits are ``prefix``
                lo = prefix << DIGIT_BITS
                t.bitwise_right_shift_(shift)
                sel = t.ge(lo)
                sel.logical_and_(t.lt(lo + BINS))
                digits = t[sel].sub_(lo)
                del sel
            else:
                digits = t.bitwise_right_shift_(shift)
            del t
            h = torch.bincount(digits.long(), minlength=BINS)
            hist = h if hist is None else hist.add_(h)
            del digits, h
        if hist is None:
            raise ValueError("no blocks")
        assert shift is not None and width is not None
        if need == 0:
            need = trim_count(keep, numel)
        above = hist.flip(0).cumsum(0)  # entries in this bin or a higher one, from the top bin down
        top = int(torch.searchsorted(above, torch.tensor(need, dtype=above.dtype, device=above.device)))
        digit = BINS - 1 - top
        need -= int(above[top - 1]) if top > 0 else 0
        count = int(hist[digit])
        prefix = (prefix << DIGIT_BITS) | digit
        if shift == 0:
            return float(torch.tensor(prefix, dtype=_INT[dtype]).view(dtype))
        if count <= budget:
            return _collect(blocks, prefix, shift, count, need, dtype)
        shift -= DIGIT_BITS


def _collect(
    blocks: Callable[[], Iterable[torch.Tensor]], prefix: int, shift: int, count: int, need: int, dtype: torch.dtype
) -> float:
    """The ``need``-th largest of the ``count`` entries whose |δ| bits above ``shift`` are ``prefix``."""
    cand: torch.Tensor | None = None
    at = 0
    for d in blocks():
        a = d.abs()
        sel = a.view(_INT[dtype]).bitwise_right_shift(shift).eq(prefix)
        vals = a[sel]
        del a, sel
        if cand is None:
            cand = torch.empty(count, dtype=dtype, device=d.device)
        cand[at : at + vals.numel()] = vals
        at += vals.numel()
        del vals
    assert cand is not None and at == count
    return float(torch.kthvalue(cand, count - need + 1).values)


def trim_(d: torch.Tensor, threshold: float) -> torch.Tensor:
    """Zero, in place, the entries of ``d`` smaller in magnitude than ``threshold``; returns ``d``."""
    if threshold > 0:
        d.mul_(d.abs().ge_(threshold))
    return d


__all__ = ["BINS", "magnitude_threshold", "trim_", "trim_count"]
