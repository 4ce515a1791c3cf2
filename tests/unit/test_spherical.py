"""multislerp and nuslerp edge cases (the general behaviour is checked against mergekit-yaml in
test_mergekit_parity.py): one model, antipodal inputs, colinear inputs, chunking invariance."""

from __future__ import annotations

import pytest
import torch

from raymerge.engine.errors import RecipeError
from raymerge.engine.methods import METHODS, MergeArgs
from raymerge.engine.methods.chunks import InMemorySource


def _run(method, base, experts, per_model, shared=None, chunk_rows=None):
    spec = METHODS[method]
    defaults = {p.name: p.default for p in spec.params if p.scope.value == "shared"}
    src = InMemorySource(base, experts, chunk_rows)
    return src.assemble(spec.chunked(src, MergeArgs({**defaults, **(shared or {})}, per_model, None, "w", 0)))


def test_multislerp_of_one_model_is_that_model():
    x = torch.randn(6, 5)
    assert torch.equal(_run("multislerp", None, [x], [{"weight": 0.3}]), x)


def test_multislerp_direction_and_norm():
    # Unit directions averaged with the weights, scaled to the weighted mean norm, about the base.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(8, 6, generator=g)
    pts = [torch.randn(8, 6, generator=g) * s for s in (1.0, 3.0, 0.5)]
    w = torch.tensor([0.2, 0.5, 0.3])
    out = _run("multislerp", base, [base + p for p in pts], [{"weight": float(x)} for x in w], chunk_rows=3)
    units = torch.stack([p / p.norm() for p in pts])
    mean = (units * w.view(-1, 1, 1)).sum(0)
    want = base + mean / mean.norm() * sum(float(x) * p.norm() for x, p in zip(w, pts))
    assert torch.allclose(out, want, atol=1e-5)


def test_multislerp_balanced_antipodes():
    x = torch.randn(4, 4)
    two = _run("multislerp", None, [x, -x], [{"weight": 1.0}, {"weight": 1.0}])
    assert torch.allclose(two, torch.zeros_like(x), atol=1e-6)  # mergekit's fallback: the weighted sum
    with pytest.raises(RecipeError, match="weighted mean of the unit-length inputs is zero") as exc:
        _run("multislerp", None, [x, -x, x, -x], [{"weight": 1.0}] * 4)
    assert exc.value.tensor == "w"


@pytest.mark.parametrize(
    "shared", [{}, {"nuslerp_flatten": False}, {"nuslerp_flatten": False, "nuslerp_row_wise": True}]
)
def test_nuslerp_colinear_inputs_interpolate_linearly_and_chunking_does_not_matter(shared):
    x = torch.randn(6, 10)
    out = _run("nuslerp", None, [x, 2 * x], [{"weight": 1.0}, {"weight": 3.0}], shared, chunk_rows=4)
    assert torch.allclose(out, 0.25 * x + 0.75 * 2 * x, atol=1e-5)
    y = torch.randn(6, 10)
    whole = _run("nuslerp", None, [x, y], [{"weight": 1.0}, {"weight": 1.0}], shared)
    for rows in (1, 4):
        assert torch.allclose(
            _run("nuslerp", None, [x, y], [{"weight": 1.0}, {"weight": 1.0}], shared, rows), whole, atol=1e-6
        )
    # halfway between two orthogonal unit vectors: the slerp midpoint, not the chord's
    e0, e1 = torch.eye(2)[0].reshape(1, 2), torch.eye(2)[1].reshape(1, 2)
    mid = _run("nuslerp", None, [e0, e1], [{"weight": 1.0}, {"weight": 1.0}])
    assert torch.allclose(mid, torch.tensor([[0.5**0.5, 0.5**0.5]]), atol=1e-6)


def test_karcher_matches_the_iteration_on_full_tensors():
    # The coefficient-space iteration equals mergekit's fixed-point iteration written out on full
    # tensors (fp64 here), at any chunking; zero inputs give zero, one input is returned as is.
    from mergekit.merge_methods.karcher import karcher_merge_tensors

    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(9, 7, generator=g, dtype=torch.float64) * s for s in (1.0, 2.0, 0.3, 1.5)]
    want = karcher_merge_tensors(xs, [0.25] * 4, max_iter=30, tol=1e-9)
    for rows in (None, 2):
        got = _run("karcher", None, xs, [{}] * 4, {"max_iter": 30, "tol": 1e-9}, rows)
        assert torch.allclose(got, want, atol=1e-10), rows
    zeros = [torch.zeros(3, 3)] * 2
    assert torch.equal(_run("karcher", None, zeros, [{}] * 2), torch.zeros(3, 3))
    assert torch.equal(_run("karcher", None, xs[:1], [{}]), xs[0])
