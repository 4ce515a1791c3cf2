"""DELLA and DELLA-linear: MAGPRUNE keep-probabilities equal to mergekit's, masks independent of the
chunking, keep rates that follow the magnitude rank, and mergekit's density ± ε rule at plan time."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from raymerge.engine.errors import RecipeError
from raymerge.engine.merge import merge
from raymerge.engine.methods import METHODS, MergeArgs
from raymerge.engine.methods import masks as masks_mod
from raymerge.engine.methods.chunks import InMemorySource
from raymerge.engine.methods.masks import magprune_probs
from raymerge.engine.plan import build_plan
from raymerge.engine.recipe import parse_recipe

from conftest import load_dir, recipe_text

DELLA = {"normalize": True, "rescale": True, "lambda": 1.0, "int8_mask": False}


def _merged(name, base, experts, per_model, chunk_rows, shared=DELLA, seed=7, tensor="w"):
    src = InMemorySource(base, experts, chunk_rows)
    return src.assemble(METHODS[name].chunked(src, MergeArgs(shared, per_model, None, tensor, seed)))


def _problem(shape=(64, 96), n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    return base, [base + 0.01 * torch.randn(*shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("shape", [(16, 40), (1, 300), (300,)], ids=["matrix", "one-row", "vector"])
def test_keep_probabilities_equal_mergekits(shape, monkeypatch):
    # mergekit's della_magprune draws torch.bernoulli(probs): capture its probs on the same task
    # vector and compare with ours (distinct magnitudes, so the ranks are unambiguous).
    from mergekit.sparsify import della_magprune

    tv = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float32)
    seen = {}

    def capture(p, *a, **k):
        seen["p"] = p.clone()
        return torch.ones_like(p)

    monkeypatch.setattr(torch, "bernoulli", capture)
    della_magprune(tv, density=0.4, epsilon=0.1)
    rows = tv.reshape(1, -1) if tv.dim() == 1 else tv
    ours = magprune_probs(rows.abs(), 0.4, 0.1)
    assert torch.allclose(ours, seen["p"].double().reshape(ours.shape), atol=1e-6, rtol=0)
    assert float(ours.min()) == pytest.approx(0.3) and float(ours.max()) == pytest.approx(0.5)


@pytest.mark.parametrize("name", ["della", "della_linear"])
def test_merge_does_not_depend_on_the_chunking(name, monkeypatch):
    base, experts = _problem()
    pm = [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}] * 3
    whole = _merged(name, base, experts, pm, None)
    monkeypatch.setattr(masks_mod, "MASK_SLICE", 50)  # several row slices inside each chunk too
    for rows in (1, 5, 17):
        assert torch.equal(_merged(name, base, experts, pm, rows), whole), rows
    assert torch.equal(METHODS[name].fn(base, experts, MergeArgs(DELLA, pm, None, "w", 7)), whole)
    assert not torch.equal(_merged(name, base, experts, pm, None, seed=8), whole)
    vb, ve = base[0], [e[0] for e in experts]  # a 1-D tensor is ranked whole
    assert torch.equal(_merged(name, vb, ve, pm, 7), _merged(name, vb, ve, pm, None))


def test_keep_rate_follows_the_magnitude_rank():
    # 200 rows × 500: within each row the smallest magnitudes are kept with p ≈ density − ε and the
    # largest with p ≈ density + ε; the overall rate is density (5-sigma binomial bounds).
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(200, 500)
    expert = torch.randn(200, 500, generator=g)
    pm = [{"weight": 1.0, "density": 0.4, "epsilon": 0.3}]
    out = _merged("della_linear", base, [expert], pm, 32, shared={**DELLA, "rescale": False})
    kept = out != 0
    rank = expert.abs().argsort(1).argsort(1)
    for lo, hi, p in ((0, 50, 0.1 + 0.3 * 49 / 499), (450, 500, 0.7 - 0.3 * 49 / 499)):
        sel = kept[(rank >= lo) & (rank < hi)].double()
        sigma = (p * (1 - p) / sel.numel()) ** 0.5
        assert abs(float(sel.mean()) - p) < 5 * sigma + 0.3 * 49 / 499, (lo, float(sel.mean()), p)
    total = float(kept.double().mean())
    assert abs(total - 0.4) < 5 * (0.24 / kept.numel()) ** 0.5
    assert torch.equal(out[kept], expert[kept])  # no rescale: kept entries are untouched


def test_zero_epsilon_is_dare_ties():
    # With ε = 0 every entry has p = density: DELLA's draw is DARE's, element for element.
    base, experts = _problem(seed=4)
    pm = [{"weight": 1.0, "density": 0.6, "epsilon": 0.0}] * 3
    shared = {**DELLA, "normalize": False}
    assert torch.equal(
        _merged("della", base, experts, pm, 9, shared=shared), _merged("dare_ties", base, experts, pm, 9, shared=shared)
    )


def test_density_one_keeps_everything_and_zero_drops_everything():
    base, experts = _problem(seed=5)
    keep = _merged(
        "della_linear",
        base,
        experts,
        [{"weight": 1.0, "density": 1.0, "epsilon": 0.15}] * 3,
        10,
        shared={**DELLA, "normalize": False},
    )
    want = base + sum(e - base for e in experts)
    assert torch.allclose(keep, want, atol=1e-6)
    drop = _merged("della_linear", base, experts, [{"weight": 1.0, "density": 0.0, "epsilon": 0.15}] * 3, 10)
    assert torch.equal(drop, base)


def test_density_plus_epsilon_outside_the_unit_interval_is_refused_while_planning(family, tmp_path):
    base, experts = family
    bad = parse_recipe(
        recipe_text("della", base, experts, None, [{"weight": 1.0, "density": 0.1, "epsilon": 0.15}] * 3)
    )
    with pytest.raises(RecipeError, match=r"density ± epsilon must lie inside \(0, 1\)"):
        build_plan(bad)
    r = tmp_path / "r.yaml"
    r.write_text(recipe_text("della", base, experts, None, [{"weight": 1.0, "density": 0.9, "epsilon": 0.15}] * 3))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "raymerge.cli", "run", str(r), str(out), "-q"], capture_output=True, text=True
    )
    assert proc.returncode != 0 and "epsilon" in proc.stderr and "della" in proc.stderr
    assert not out.exists()


def test_della_merges_a_checkpoint_end_to_end(family, tmp_path):
    base, experts = family
    pm = [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}] * 3
    text = recipe_text("della", base, experts, None, pm, extra="raymerge:\n  seed: 3")
    a, b = tmp_path / "a", tmp_path / "b"
    merge(parse_recipe(text), a, progress=False)
    merge(parse_recipe(text + "\n  chunk_bytes: 4096"), b, progress=False)
    ma, mb, mbase = load_dir(a), load_dir(b), load_dir(base)
    assert set(ma) == set(mbase)
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k  # same model whatever the chunking
    changed = [k for k in ma if not torch.equal(ma[k], mbase[k])]
    assert len(changed) == len(ma)
