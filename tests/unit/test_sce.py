"""SCE beyond the mergekit parity cases: chunking invariance, the select cut, and edge values."""

from __future__ import annotations

import pytest
import torch

from raymerge.engine.methods import METHODS, MergeArgs
from raymerge.engine.methods.chunks import InMemorySource


def _merged(base, experts, topk, chunk_rows):
    src = InMemorySource(base, experts, chunk_rows)
    args = MergeArgs({"select_topk": topk, "int8_mask": False}, [{}] * len(experts), None, "w", 0)
    return src.assemble(METHODS["sce"].chunked(src, args))


def _reference(base, experts, topk):
    """SCE written out whole in fp64: select by variance, mean-square weights, sign erase."""
    tv = torch.stack([e - base for e in experts]).double()
    if topk < 1:
        var = tv.var(0, unbiased=False).reshape(-1)
        k = int(int(torch.count_nonzero(var)) * topk)
        mask = torch.zeros_like(var)
        mask[torch.argsort(var, stable=True)[var.numel() - k :]] = 1
        tv = tv * mask.reshape(base.shape)
    w = tv.reshape(len(experts), -1).square().mean(1)
    w = torch.full_like(w, 1 / len(experts)) if abs(float(w.sum())) < 1e-6 else w / w.sum()
    sign = torch.where(tv.sum(0) >= 0, 1.0, -1.0).double()
    ew = w.reshape(-1, *([1] * base.dim())) * (tv.sign() == sign)
    return base.double() + (tv * ew).sum(0) / ew.sum(0).clamp(min=1e-6)


@pytest.mark.parametrize("topk", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("shape", [(48, 40), (200,)], ids=["matrix", "vector"])
def test_sce_matches_fp64_reference_at_any_chunking(topk, shape):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(*shape, generator=g)
    experts = [base + torch.randn(*shape, generator=g) * s for s in (0.5, 1.0, 2.0)]
    ref = _reference(base, experts, topk)
    for rows in (None, 1, 7):
        out = _merged(base, experts, topk, rows)
        assert (out.double() - ref).abs().max() < 1e-5, (rows, topk)
    if topk == 0.0:
        assert torch.equal(_merged(base, experts, topk, 5), base)  # nothing selected: the base


def test_sce_ties_in_variance_are_cut_exactly():
    # Every entry has the same variance: top-k keeps exactly k of them (the last k in flat order).
    base = torch.zeros(10, 10)
    experts = [base + 1.0, base - 1.0, base + 1.0]
    out = _merged(base, experts, 0.25, 3)
    assert int((out != 0).sum()) == 25
    assert bool((out.reshape(-1)[-25:] != 0).all())


@pytest.mark.parametrize("shape", [(40, 24), (300,)], ids=["matrix", "vector"])
def test_arcee_fusion_is_independent_of_the_chunking(shape):
    # Rows of the softmax are complete in every chunk, a 1-D tensor is one row, and the quartiles
    # are exact order statistics over the whole tensor.
    g = torch.Generator().manual_seed(3)
    base = torch.randn(*shape, generator=g)
    other = base + 0.3 * torch.randn(*shape, generator=g)

    def run(rows):
        src = InMemorySource(base, [other], rows)
        return src.assemble(METHODS["arcee_fusion"].chunked(src, MergeArgs({}, [{}], None, "w", 0)))

    whole = run(None)
    for rows in (1, 7):
        assert torch.equal(run(rows), whole), rows
    took = whole != base
    assert 0 < int(took.sum()) < base.numel()  # some entries fused, not all
    assert torch.equal(whole[took], other[took])
