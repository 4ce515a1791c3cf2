"""Method math checked against fp64 references and statistics (for the random ones)."""

from __future__ import annotations

import torch

from raymerge.engine.methods import METHODS, MergeArgs
from raymerge.engine.methods.sparsify import magnitude, rank_window_mask


def _args(shared, per_model, seed=None):
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return MergeArgs(shared, per_model, gen)


def test_dare_keeps_density_fraction_and_rescales_l1():
    torch.manual_seed(0)
    base = torch.randn(400, 300)
    experts = [base + 0.01 * torch.randn(400, 300)]
    shared = {"normalize": False, "rescale": True, "lambda": 1.0, "int8_mask": False}
    for density in (0.1, 0.5, 0.9):
        out = METHODS["dare_linear"].fn(base, experts, _args(shared, [{"weight": 1.0, "density": density}], seed=3))
        delta, kept = experts[0] - base, out - base
        frac = (kept != 0).float().mean().item()
        assert abs(frac - density) < 0.01, (density, frac)
        # L1 rescale: the kept task vector has the original task vector's L1 norm
        assert torch.allclose(kept.abs().sum(), delta.abs().sum(), rtol=1e-4)
        # kept entries are the original entries times one common factor
        mask = kept != 0
        scale = delta.abs().sum() / delta[mask].abs().sum()
        assert abs(scale.item() - 1 / density) < 0.05 / density
        assert torch.allclose(kept[mask], delta[mask] * scale, atol=1e-6)


def test_dare_is_reproducible_by_seed():
    base = torch.zeros(50, 50)
    experts = [torch.randn(50, 50), torch.randn(50, 50)]
    shared = {"normalize": False, "rescale": True, "lambda": 1.0, "int8_mask": False}
    pm = [{"weight": 1.0, "density": 0.5}] * 2
    a = METHODS["dare_ties"].fn(base, experts, _args(shared, pm, seed=11))
    b = METHODS["dare_ties"].fn(base, experts, _args(shared, pm, seed=11))
    c = METHODS["dare_ties"].fn(base, experts, _args(shared, pm, seed=12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_consensus_matches_fp64_reference():
    torch.manual_seed(1)
    base = torch.randn(64, 48)
    experts = [base + 0.1 * torch.randn(64, 48) for _ in range(4)]
    weights = [1.0, 0.5, 0.8, 1.2]
    shared = {"k": 2, "tall_lambda": 0.6, "lambda": 0.7}
    out = METHODS["consensus"].fn(base, experts, _args(shared, [{"weight": w} for w in weights]))
    b64 = base.double()
    taus = [e.double() - b64 for e in experts]
    total = sum(taus)
    masks = [(t.abs() >= 0.6 * (total - t).abs()) for t in taus]
    keep = sum(m.long() for m in masks) >= 2
    ref = b64 + 0.7 * keep * sum(w * t for w, t in zip(weights, taus))
    assert (out.double() - ref).abs().max() < 1e-6
    assert 0.05 < keep.double().mean() < 0.95  # the mask is doing something


def test_magnitude_keeps_exactly_k_even_with_ties():
    d = torch.tensor([1.0, -1.0, 1.0, 0.5, -1.0, 0.2, 1.0, 0.0])
    out = magnitude(d, density=0.25)  # k = 2 of four tied 1.0 magnitudes
    assert int((out != 0).sum()) == 2
    assert torch.equal(out, magnitude(d, density=0.25))  # deterministic


def test_rank_window_mask_against_sort():
    torch.manual_seed(2)
    w = torch.rand(1000)
    order = torch.argsort(w)
    for lo, hi in [(0, 10), (100, 900), (990, 1000), (0, 1000)]:
        ref = torch.zeros(1000, dtype=torch.bool)
        ref[order[lo:hi]] = True
        assert torch.equal(rank_window_mask(w, lo, hi), ref)
