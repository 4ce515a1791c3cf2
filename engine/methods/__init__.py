"""Merge methods, registered by name (mergekit's names where they exist)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from raymerge.engine.methods import chunked, task_vector
from raymerge.engine.methods.chunked import RESIDENT_SELECT_ELEMENTS
from raymerge.engine.methods.registry import (
    METHODS,
    REQUIRED,
    MergeArgs,
    MethodSpec,
    Param,
    Scope,
    get_method,
    register,
)

S, M = Scope.SHARED, Scope.MODEL


_INT8_MASK = Param("int8_mask", bool, S, False, "accepted for mergekit compatibility (int8 masks save memory "
                                              "there; raymerge's masks are bool): no effect on results")


def _gta(normalize: bool, rescale: bool, *extra: Param) -> tuple[Param, ...]:
    """mergekit's generalized-task-arithmetic parameter set with per-method defaults."""
    return (
        Param("weight", float, M, REQUIRED, "scale of this expert's task vector"),
        Param("density", float, M, 1.0, "fraction of task-vector entries kept", low=0.0, high=1.0),
        *extra,
        Param("normalize", bool, S, normalize, "divide by the summed weights of kept entries"),
        Param("rescale", bool, S, rescale, "L1-rescale sparsified task vectors"),
        Param("lambda", float, S, 1.0, "scale of the merged task vector"),
        _INT8_MASK,
    )


def _chunked(name: str, fn: chunked.ChunkedFn, params: tuple[Param, ...], ref: str, **kw: object) -> MethodSpec:
    """Register a method computed in row chunks (bounded memory) with its whole-tensor adapter."""
    return register(MethodSpec(name, chunked.whole_tensor(fn), params, ref, chunked=fn, **kw))  # type: ignore[arg-type]


_GAMMA = Param("gamma", float, M, 0.01, "fraction of largest-magnitude outliers dropped", low=0.0, high=1.0)

register(MethodSpec(
    "linear", task_vector.linear, (Param("weight", float, M, REQUIRED), Param("normalize", bool, S, True)),
    "https://arxiv.org/abs/2203.05482", needs_base=False, row_separable=True, includes_base_in_inputs=True,
    work_buffers=lambda n: 2,
))  # fmt: skip
_chunked("task_arithmetic", lambda src, a: chunked.gta(src, a, None, False), _gta(False, False),
         "https://arxiv.org/abs/2212.04089", row_separable=True, work_buffers=lambda n: n + 3)  # fmt: skip
_chunked("ties", chunked.ties, _gta(True, False), "https://arxiv.org/abs/2306.01708", work_buffers=lambda n: 2 * n + 8)
_chunked("dare_linear", chunked.dare_linear, _gta(False, True), "https://arxiv.org/abs/2311.03099", random=True,
         work_buffers=lambda n: n + 6)  # fmt: skip
_chunked("dare_ties", chunked.dare_ties, _gta(False, True), "https://arxiv.org/abs/2311.03099", random=True,
         work_buffers=lambda n: 2 * n + 8)  # fmt: skip
_EPSILON = Param("epsilon", float, M, 0.15, "half-width of DELLA's keep-probability range around density", low=0.0)


def _della_check(shared: Mapping[str, Any], per_model: Sequence[Mapping[str, Any]]) -> str | None:
    """mergekit's rule: with 0 < density < 1, density ± epsilon must stay inside (0, 1)."""
    for i, p in enumerate(per_model):
        d, e = float(p["density"]), float(p["epsilon"])
        if 0 < d < 1 and not (d - e > 0 and d + e < 1):
            return f"model {i}: density ± epsilon must lie inside (0, 1), got density {d:g}, epsilon {e:g}"
    return None


_chunked("della", chunked.della, _gta(True, True, _EPSILON), "https://arxiv.org/abs/2406.11617",
         random=True, check=_della_check, work_buffers=lambda n: 2 * n + 10)  # fmt: skip
_chunked("della_linear", chunked.della_linear, _gta(False, True, _EPSILON), "https://arxiv.org/abs/2406.11617",
         random=True, check=_della_check, work_buffers=lambda n: n + 8)  # fmt: skip
_chunked("sce", chunked.sce, (
    Param("select_topk", float, S, 1.0, "share of the entries (by variance across task vectors) kept", low=0.0,
          high=1.0),
    _INT8_MASK,
), "https://arxiv.org/abs/2408.07990", work_buffers=lambda n: 3 * n + 6)  # fmt: skip
_chunked("breadcrumbs", chunked.breadcrumbs, _gta(False, False, _GAMMA), "https://arxiv.org/abs/2312.06795",
         work_buffers=lambda n: n + 8)  # fmt: skip
_chunked("breadcrumbs_ties", chunked.breadcrumbs_ties, _gta(False, False, _GAMMA),
         "https://arxiv.org/abs/2312.06795", work_buffers=lambda n: 2 * n + 8)  # fmt: skip
register(MethodSpec(
    "consensus", task_vector.consensus,
    (Param("weight", float, M, 1.0), Param("k", int, S, 2, "masks that must agree to keep an entry", low=0),
     Param("tall_lambda", float, S, 0.6, "TALL mask threshold λ", low=0.0), Param("lambda", float, S, 1.0)),
    "https://arxiv.org/abs/2405.07813", min_experts=2, row_separable=True, work_buffers=lambda n: n + 4,
))  # fmt: skip
register(MethodSpec("mean", task_vector.mean, (), "average of the experts", row_separable=True, streams_experts=True,
                    work_buffers=lambda n: 2))  # fmt: skip
_chunked("slerp", chunked.slerp, (Param("t", float, S, REQUIRED, "0 = base, 1 = other model", low=0.0, high=1.0),),
         "https://en.wikipedia.org/wiki/Slerp", max_experts=1, work_buffers=lambda n: 6)  # fmt: skip
_chunked("multislerp", chunked.multislerp, (
    Param("weight", float, M, REQUIRED, "this model's weight in the spherical mean"),
    Param("normalize_weights", bool, S, True, "divide the weights by their sum"),
    Param("eps", float, S, 1e-8, "added to norms before dividing", low=0.0),
), "https://goddard.blog/posts/multislerp-wow-what-a-cool-idea", needs_base=False,
    work_buffers=lambda n: n + 4)  # fmt: skip
_chunked("nuslerp", chunked.nuslerp, (
    Param("weight", float, M, REQUIRED, "t = w₁ / (w₀ + w₁)"),
    Param("nuslerp_flatten", bool, S, True, "slerp the whole tensor as one vector"),
    Param("nuslerp_row_wise", bool, S, False, "without flatten: slerp each column (else each row)"),
), "https://github.com/arcee-ai/mergekit", needs_base=False, min_experts=2, max_experts=2,
    work_buffers=lambda n: 8)  # fmt: skip
_RAM_EPSILON = Param("epsilon", float, S, 1e-5, "an entry counts as changed by an expert when |τ| exceeds it", low=0.0)
register(MethodSpec("ram", task_vector.ram, (_RAM_EPSILON,), "https://arxiv.org/abs/2601.13572", row_separable=True,
                    work_buffers=lambda n: 6))  # fmt: skip
_chunked("ramplus_tl", chunked.ramplus_tl, (
    Param("r", float, S, 0.1, "strength of the boost of unique changes"),
    Param("alpha", float, S, 0.2, "cap on the shared-to-unique ratio ρ", low=0.0),
    _RAM_EPSILON,
), "https://arxiv.org/abs/2601.13572", work_buffers=lambda n: 3 * n + 6)  # fmt: skip
register(MethodSpec("passthrough", task_vector.passthrough, (
    Param("scale", float, M, 1.0, "multiply the model's tensors by this"),
), "mergekit (without slices: the one model, optionally scaled)", needs_base=False, max_experts=1,
    includes_base_in_inputs=True, row_separable=True, work_buffers=lambda n: 2))  # fmt: skip
_chunked("arcee_fusion", chunked.arcee_fusion, (), "https://arcee.ai (mergekit's arcee_fusion)", max_experts=1,
         work_buffers=lambda n: 10)  # fmt: skip
register(MethodSpec("nearswap", task_vector.nearswap, (
    Param("t", float, S, REQUIRED, "distance scale: entries closer than t take the other model's value", low=0.0),
), "https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001", max_experts=1, row_separable=True,
    work_buffers=lambda n: 5))  # fmt: skip
_chunked("karcher", chunked.karcher, (
    Param("max_iter", int, S, 10, "fixed-point iterations at most", low=0),
    Param("tol", float, S, 1e-5, "stop when the tangent step is shorter; norms below it are ignored", low=0.0),
), "https://arxiv.org/abs/2603.04972", needs_base=False, includes_base_in_inputs=True,
    work_buffers=lambda n: n + 4)  # fmt: skip
_chunked("model_stock", chunked.model_stock, (Param("filter_wise", bool, S, False),),
         "https://arxiv.org/abs/2403.19522", min_experts=2, work_buffers=lambda n: 2 * n + 6)  # fmt: skip

# Families that register themselves in their own modules (one function + one register line each).
from raymerge.engine.methods import gram, spectral  # noqa: E402,F401

__all__ = ["METHODS", "RESIDENT_SELECT_ELEMENTS", "MergeArgs", "MethodSpec", "Param", "Scope", "get_method"]
