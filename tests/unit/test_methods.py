"""Method math checked against fp64 references and statistics (for the random ones)."""

from __future__ import annotations

import torch

from raymerge.engine.methods import METHODS, MergeArgs
from raymerge.engine.methods.chunks import InMemorySource
from raymerge.engine.methods.masks import CutMask, rank_cut


def _args(shared, per_model, seed=0):
    return MergeArgs(shared, per_model, None, "w", seed)


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


def _window(w, lo, hi, chunk):
    """Elements of flat ``w`` with ascending rank in [lo, hi), computed chunk by chunk."""
    parts = list(torch.split(w, chunk))
    n = w.numel()
    low, high = CutMask(rank_cut(lambda: iter(parts), n, lo)), CutMask(rank_cut(lambda: iter(parts), n, hi))
    return torch.cat([low(p) & ~high(p) for p in parts])


def test_rank_cut_against_sort_across_chunk_sizes():
    torch.manual_seed(2)
    w = torch.rand(1000)
    order = torch.argsort(w, stable=True)
    for chunk in (1000, 333, 7):
        for lo, hi in [(0, 10), (100, 900), (990, 1000), (0, 1000), (500, 500)]:
            ref = torch.zeros(1000, dtype=torch.bool)
            ref[order[lo:hi]] = True
            assert torch.equal(_window(w, lo, hi, chunk), ref), (chunk, lo, hi)


def test_rank_cut_breaks_ties_by_position_exactly():
    w = torch.tensor([1.0, 1.0, 0.5, 1.0, 0.0, 1.0, 0.2, 1.0])  # five tied 1.0 values
    order = torch.argsort(w, stable=True)
    for chunk in (8, 3, 1):
        for lo in range(9):
            ref = torch.zeros(8, dtype=torch.bool)
            ref[order[lo:]] = True
            assert torch.equal(_window(w, lo, 8, chunk), ref), (chunk, lo)


def _merged(name, base, experts, shared, per_model, chunk_rows, seed=0):
    src = InMemorySource(base, experts, chunk_rows)
    return src.assemble(METHODS[name].chunked(src, MergeArgs(shared, per_model, None, "w", seed)))


def test_chunked_methods_do_not_depend_on_chunk_size():
    torch.manual_seed(4)
    base = torch.randn(90, 40)
    experts = [base + 0.05 * torch.randn(90, 40) for _ in range(3)]
    gta = {"normalize": True, "rescale": False, "lambda": 0.8, "int8_mask": False}
    cases = {
        "ties": (
            gta,
            [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6}, {"weight": 0.7, "density": 0.1}],
        ),
        "breadcrumbs": ({**gta, "rescale": True}, [{"weight": 1.0, "density": 0.7, "gamma": 0.05}] * 3),
        "model_stock": ({"filter_wise": False}, [{}] * 3),
        "slerp": ({"t": 0.3}, [{}]),
    }
    for name, (shared, pm) in cases.items():
        ex = experts[: len(pm)]
        whole = _merged(name, base, ex, shared, pm, None)
        for rows in (1, 7, 32):
            assert torch.allclose(_merged(name, base, ex, shared, pm, rows), whole, atol=1e-6, rtol=0), (name, rows)
    # DARE masks are a function of the seed (and tensor, expert, element): same seed, same merge
    shared = {**gta, "rescale": True}
    pm = [{"weight": 1.0, "density": 0.5}] * 3
    a = _merged("dare_ties", base, experts, shared, pm, 16, seed=5)
    assert torch.equal(a, _merged("dare_ties", base, experts, shared, pm, 16, seed=5))
    assert not torch.equal(a, _merged("dare_ties", base, experts, shared, pm, 16, seed=6))


def test_ties_keeps_exactly_k_with_ties_in_magnitude():
    base = torch.zeros(1, 8)
    expert = torch.tensor([[1.0, -1.0, 1.0, 0.5, -1.0, 0.2, 1.0, 0.0]])
    shared = {"normalize": False, "rescale": False, "lambda": 1.0, "int8_mask": False}
    out = _merged("ties", base, [expert], shared, [{"weight": 1.0, "density": 0.25}], 1)
    assert int((out != 0).sum()) == 2  # k = 2 of four tied magnitudes, chosen by position
    # stable ascending rank: among equal magnitudes, later positions rank higher
    assert torch.equal(out, torch.tensor([[0, 0, 0, 0, -1.0, 0, 1.0, 0]]))


def test_block_projection_as_wide_as_the_vocabulary_is_linear_not_embedding():
    """A small model whose hidden size equals its vocabulary must still merge its block weights
    with the method (found by the quality suite: BERT hidden 64, vocab 64 averaged every layer)."""
    from raymerge.engine.arch import classify
    from raymerge.engine.storage import TensorEntry

    def entry(name, shape):
        return TensorEntry(name, "F32", shape, 0, 4 * shape[0] * shape[1])

    assert classify("encoder.layer.0.attention.self.query.weight", entry("q", (32, 32)), 32) == "linear"
    assert classify("model.layers.3.mlp.down_proj.weight", entry("d", (32, 48)), 32) == "linear"
    assert classify("embeddings.word_embeddings.weight", entry("e", (32, 32)), 32) == "embedding"
    assert classify("output.dense_out.weight", entry("o", (32, 16)), 32) == "embedding"  # vocab rows, no block
    assert classify("model.norm.weight", TensorEntry("n", "F32", (32,), 0, 128), 32) == "vector"


def test_rank_cut_takes_negative_zero_as_zero():
    """A zero change times a rounding-negative weight is -0.0 (arcee_fusion in bf16); its bit
    pattern is negative as an int32 and once crashed the histogram pass."""
    from raymerge.engine.methods.masks import rank_cut

    x = torch.tensor([0.5, -0.0, 0.25, 0.0, 1.0])
    assert rank_cut(lambda: iter([x]), 5, 2) == rank_cut(lambda: iter([x.abs()]), 5, 2)
    cut = rank_cut(lambda: iter([x]), 5, 1)  # the second of the two zeros starts the kept ranks
    assert cut.value == 0.0 and cut.skip == 1
