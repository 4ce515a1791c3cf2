"""The fast paths of elementwise merges give exactly what the plain formulations give (issue 13).

``gta`` works in place on reused buffers, the NaN/Inf check of inputs proves finiteness from a
sum, and a rank-cut mask skips locating equal elements once the skipped ones are behind it. Each
must agree bit for bit with the straightforward expression it replaces.
"""

from __future__ import annotations

import pytest
import torch

from raymerge.engine.methods import MergeArgs, get_method, task_arithmetic
from raymerge.engine.methods.chunks import InMemorySource
from raymerge.engine.methods.masks import CutMask, RankCut, Sparsifier, rank_cut
from raymerge.engine.task import all_finite


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def test_all_finite_is_exact_even_when_the_sum_overflows() -> None:
    assert all_finite(torch.tensor([3e38, 3e38, 3e38]))  # the sum is inf, every element finite
    assert all_finite(torch.zeros(0))
    assert all_finite(torch.arange(5))  # integers are always finite
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(1000)
        x[537] = bad
        assert not all_finite(x)
    assert not all_finite(torch.tensor([float("inf"), float("-inf")]))  # the sum is NaN
    assert not all_finite(torch.tensor([3e38, 3e38, float("nan")], dtype=torch.bfloat16))


def plain_gta(
    base: torch.Tensor, experts: list[torch.Tensor], weights: list[float], sparsifiers: list[Sparsifier], *, ties: bool
) -> torch.Tensor:
    """The out-of-place formulation ``gta`` had before its buffers were reused (one chunk)."""
    deltas = [sp(e - base, 0) * w for e, w, sp in zip(experts, weights, sparsifiers, strict=True)]
    if not ties:
        mixed = torch.zeros_like(base)
        for d in deltas:
            mixed.add_(d)
        return base + mixed
    total = torch.stack(deltas).sum(0)
    majority = torch.where(total >= 0, 1.0, -1.0).to(base.dtype)
    mixed, divisor = torch.zeros_like(base), torch.zeros_like(base)
    for d, w in zip(deltas, weights, strict=True):
        agree = d.sign() == majority
        mixed.add_(d * agree)
        divisor.add_(agree.to(base.dtype), alpha=w)
    divisor[divisor == 0] = 1
    return base + mixed / divisor


def family(seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """bf16-valued inputs (many equal task-vector entries, exact zeros, signed zeros)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(37, 29, generator=g).to(torch.bfloat16).float()
    base[0, :5] = -0.0
    experts = []
    for i in range(3):
        e = (base + 0.05 * torch.randn(37, 29, generator=g)).to(torch.bfloat16).float()
        e[0, :5] = -0.0 if i else 0.0  # zero task vectors of both signs
        e[3, 3 * i : 3 * i + 4] = base[3, 3 * i : 3 * i + 4]
        experts.append(e)
    return base, experts


@pytest.mark.parametrize("block", [29 * 3, 1 << 18])  # blocks of 3 rows, and whole chunks
def test_task_arithmetic_and_ties_match_the_plain_formulation_bit_for_bit(
    block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(task_arithmetic, "BLOCK_ELEMENTS", block)
    for seed in range(4):
        base, experts = family(seed)
        weights = [0.7, -0.4, 1.3]
        for method, ties, density in (("task_arithmetic", False, 1.0), ("ties", True, 0.3)):
            spec = get_method(method)
            per_model = tuple({"weight": w, "density": density} for w in weights)
            shared = {"normalize": ties, "rescale": False, "lambda": 1.0, "int8_mask": False}
            args = MergeArgs(shared, per_model, None, "t", 0)
            for chunk_rows in (1, 5, 37):  # chunkings whose last chunk is shorter, and one chunk
                src = InMemorySource(base, experts, chunk_rows)
                assert spec.chunked is not None
                got = src.assemble(spec.chunked(src, args))
                whole = InMemorySource(base, experts)
                sparsify = "magnitude" if ties else None
                sps = [Sparsifier(sparsify, whole, t, dict(p), args) for t, p in enumerate(per_model)]
                want = plain_gta(base, experts, weights, sps, ties=ties)
                assert torch.equal(bits(got), bits(want)), (method, seed, chunk_rows)


def test_float_cut_mask_keeps_the_same_equal_elements() -> None:
    # Many equal magnitudes straddle the cut: the first ``skip`` of them (flat order) are dropped.
    w = torch.tensor([0.5, 0.25, 0.5, 0.5, 0.75, 0.5, 0.5, 0.125, 0.5, 0.5] * 7)
    for r in range(0, w.numel() + 1, 3):
        cut = rank_cut(lambda: iter([w]), w.numel(), r)
        whole = CutMask(cut)(w)
        for step in (1, 4, 9):
            mask = CutMask(RankCut(cut.value, cut.skip, cut.everything, cut.nothing))
            pieces, floats = [], 0
            for a in range(0, w.numel(), step):
                chunk = w[a : a + step].clone()
                fast = mask.float_mask_(chunk)
                floats += fast is not None
                pieces.append(fast.bool() if fast is not None else mask(w[a : a + step]))
            assert torch.equal(torch.cat(pieces), whole), (r, step)
            if not (cut.everything or cut.nothing):
                assert floats >= len(pieces) - 1  # only the chunk where the skipping ends is slow
        assert int(whole.sum()) == w.numel() - r


def test_sum_over_experts_of_a_row_block_matches_the_whole_stack() -> None:
    # Cancelling terms make (d0 + d1) + d2 and d0 + (d1 + d2) differ: a block's sum must add in
    # the same order as the whole stack's, or TIES' elected sign would change near zero.
    g = torch.Generator().manual_seed(3)
    d0 = torch.randn(64, 300, generator=g) * 1e8
    stack = torch.stack([d0, -d0 + torch.randn(64, 300, generator=g), torch.randn(64, 300, generator=g) * 1e-3])
    assert not torch.equal((stack[0] + stack[1]) + stack[2], stack[0] + (stack[1] + stack[2]))
    whole = stack.sum(0)
    for step in (1, 7, 64):
        blocks = torch.cat([stack[:, a : a + step].sum(0) for a in range(0, 64, step)])
        assert torch.equal(bits(blocks), bits(whole))
