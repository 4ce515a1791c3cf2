"""DARE's random masks are a pure function of (seed, tensor, expert, element index).

So the merged model does not change with ``raymerge.chunk_bytes`` (the row chunking), with the
whole-tensor adapter versus the chunked path, or with the order tasks run in; masks still keep
each element with probability ``density`` and differ between experts and between tensors.
"""

from __future__ import annotations

import math

import pytest
import torch

from raymerge.engine.merge import merge
from raymerge.engine.methods import METHODS, MergeArgs
from raymerge.engine.methods import masks as masks_mod
from raymerge.engine.methods.chunks import InMemorySource
from raymerge.engine.methods.masks import bernoulli_mask, mask_key
from raymerge.engine.recipe import parse_recipe

from conftest import load_dir, recipe_text

GTA = {"normalize": False, "rescale": True, "lambda": 1.0, "int8_mask": False}
CPU = torch.device("cpu")


def _splitmix64_reference(key: int, i: int) -> int:
    """SplitMix64 over Python ints (unsigned 64-bit), the definition the torch version must match."""
    m = (1 << 64) - 1
    z = (key + i * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def _merged(name, base, experts, per_model, chunk_rows, shared=GTA, seed=7, tensor="w"):
    src = InMemorySource(base, experts, chunk_rows)
    return src.assemble(METHODS[name].chunked(src, MergeArgs(shared, per_model, None, tensor, seed)))


def test_mask_matches_python_splitmix64_bit_for_bit():
    key = mask_key(3, "model.layers.0.mlp.up_proj.weight", 1)
    density = 0.37
    got = bernoulli_mask(key, 10**12, torch.Size([4, 50]), density, CPU).reshape(-1)
    want = [(_splitmix64_reference(key, 10**12 + i) >> 11) < int(density * 2**53) for i in range(200)]
    assert got.tolist() == want


def test_mask_depends_only_on_the_flat_index(monkeypatch):
    key = mask_key(0, "w", 0)
    whole = bernoulli_mask(key, 0, torch.Size([1000]), 0.5, CPU)
    # any window of it, however it is sliced internally
    monkeypatch.setattr(masks_mod, "MASK_SLICE", 17)
    assert torch.equal(bernoulli_mask(key, 123, torch.Size([13, 29]), 0.5, CPU).reshape(-1), whole[123 : 123 + 377])
    assert torch.equal(bernoulli_mask(key, 0, torch.Size([1000]), 0.5, CPU), whole)


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties"])
def test_chunked_and_whole_tensor_paths_agree_bit_for_bit(name):
    torch.manual_seed(0)
    base = torch.randn(90, 40)
    experts = [base + 0.05 * torch.randn(90, 40) for _ in range(3)]
    pm = [{"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.6}, {"weight": -0.7, "density": 0.9}]
    whole = METHODS[name].fn(base, experts, MergeArgs(GTA, pm, None, "w", 7))
    for rows in (None, 1, 7, 32, 89):
        assert torch.equal(_merged(name, base, experts, pm, rows), whole), rows
    # 1-D tensors: rows are single elements
    vb = torch.randn(301)
    ve = [vb + torch.randn(301) for _ in range(2)]
    v_whole = _merged(name, vb, ve, pm[:2], None)
    assert torch.equal(_merged(name, vb, ve, pm[:2], 10), v_whole)
    assert (v_whole != vb).any()


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_merge_is_bit_identical_across_chunk_sizes(method, family, tmp_path):
    base, experts = family
    pm = [{"weight": 1.0, "density": 0.4}, {"weight": 0.6, "density": 0.7}, {"weight": 0.8, "density": 0.2}]
    outs = []
    for chunk in (1024, 4 << 20):  # 4 rows of the 64-wide weights per chunk vs one chunk per tensor
        extra = f"raymerge:\n  seed: 11\n  chunk_bytes: {chunk}"
        recipe = parse_recipe(recipe_text(method, base, experts, None, pm, extra))
        merge(recipe, tmp_path / f"out-{chunk}", progress=False)
        outs.append(load_dir(tmp_path / f"out-{chunk}"))
    small, large = outs
    assert small.keys() == large.keys()
    for k in small:
        assert torch.equal(small[k], large[k]), k
    b = load_dir(base)
    k = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(small[k], b[k])  # the merge did something


@pytest.mark.parametrize("density", [0.05, 0.5, 0.9])
def test_keep_rate_is_binomial_around_density(density):
    n = 2000 * 1500
    kept = int(bernoulli_mask(mask_key(1, "t", 0), 0, torch.Size([2000, 1500]), density, CPU).sum())
    sigma = math.sqrt(n * density * (1 - density))
    assert abs(kept - n * density) < 5 * sigma, (kept, n * density, sigma)


def test_masks_of_experts_and_tensors_are_uncorrelated():
    n = 1 << 20
    shape = torch.Size([n])

    def mask(name: str, expert: int) -> torch.Tensor:
        return bernoulli_mask(mask_key(5, name, expert), 0, shape, 0.5, CPU).double()

    ref = mask("model.layers.0.mlp.up_proj.weight", 0)
    others = [
        mask("model.layers.0.mlp.up_proj.weight", 1),  # another expert, same tensor
        mask("model.layers.1.mlp.up_proj.weight", 0),  # another tensor, same expert
        bernoulli_mask(mask_key(6, "model.layers.0.mlp.up_proj.weight", 0), 0, shape, 0.5, CPU).double(),  # seed
    ]
    for other in others:
        corr = float(torch.corrcoef(torch.stack([ref, other]))[0, 1])
        assert abs(corr) < 5 / math.sqrt(n), corr
        # shifted copies would also be correlated: compare against the neighbour's bit too
        assert abs(float(torch.corrcoef(torch.stack([ref[1:], other[:-1]]))[0, 1])) < 5 / math.sqrt(n)


def test_two_experts_with_the_same_task_vector_drop_different_entries():
    torch.manual_seed(2)
    base = torch.zeros(300, 200)
    delta = torch.randn(300, 200)
    pm = [{"weight": 1.0, "density": 0.5}] * 2
    out = _merged("dare_linear", base, [delta, delta], pm, 16, shared={**GTA, "rescale": False})
    kept = torch.round(out / delta)  # 0, 1 or 2 experts kept each entry
    both, one = float((kept == 2).double().mean()), float((kept == 1).double().mean())
    n = delta.numel()
    assert abs(both - 0.25) < 5 * math.sqrt(0.25 * 0.75 / n)
    assert abs(one - 0.5) < 5 * math.sqrt(0.25 / n)


@pytest.mark.parametrize("rows", [None, 7])
def test_rescale_restores_the_l1_norm_with_factor_about_one_over_density(rows):
    torch.manual_seed(3)
    base = torch.randn(400, 300)
    experts = [base + 0.01 * torch.randn(400, 300)]
    for density in (0.1, 0.5, 0.9):
        out = _merged("dare_linear", base, experts, [{"weight": 1.0, "density": density}], rows)
        delta, kept = experts[0] - base, out - base
        mask = kept != 0
        assert abs(float(mask.double().mean()) - density) < 5 * math.sqrt(density * (1 - density) / delta.numel())
        factor = delta.abs().sum() / delta[mask].abs().sum()
        assert torch.allclose(kept.abs().sum(), delta.abs().sum(), rtol=1e-4)
        assert torch.allclose(kept[mask], delta[mask] * factor, atol=1e-6)
        assert abs(float(factor) - 1 / density) < 0.05 / density
        # without rescale the kept entries are the task vector's own
        plain = _merged(
            "dare_linear", base, experts, [{"weight": 1.0, "density": density}], rows, shared={**GTA, "rescale": False}
        )
        assert torch.equal((plain - base) != 0, mask)


def test_int8_mask_is_accepted_and_changes_nothing(family, tmp_path):
    base, experts = family
    pm = [{"weight": 1.0, "density": 0.5}] * 3
    outs = []
    for flag in ("false", "true"):
        text = recipe_text("dare_ties", base, experts, {"int8_mask": flag}, pm, "raymerge:\n  seed: 2")
        merge(parse_recipe(text), tmp_path / flag, progress=False)
        outs.append(load_dir(tmp_path / flag))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert "no effect" in METHODS["dare_ties"].param("int8_mask").help


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mask_is_the_same_on_cuda():
    key = mask_key(9, "w", 2)
    cpu = bernoulli_mask(key, 77, torch.Size([300, 41]), 0.3, CPU)
    gpu = bernoulli_mask(key, 77, torch.Size([300, 41]), 0.3, torch.device("cuda"))
    assert torch.equal(cpu, gpu.cpu())
