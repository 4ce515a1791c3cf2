"""Example parameters for every merge method: one row per (method, variant), one table.

Read by test_mergekit_parity.py (the rows with a ``mergekit`` name: raymerge and mergekit 0.1.5
must agree to 1e-6) and by test_ray.py's every-method test (the rows with ``ray=True``: Ray and
the local executor must write the same bytes); test_method_examples.py checks that every
registered method has a row, that each row names only the method's parameters, and merges every
row that carries a ``reference`` (a plain fp64 formula) and compares the output with it.

The models are the ``family`` fixture's: one tiny Llama base and three fine-tuned experts.
``models`` says which of them a recipe lists (mergekit's two-model methods list the base among
the models as well; raymerge drops it from the experts there):

* ``experts`` — the three experts
* ``two`` — the first two experts
* ``one`` — the first expert
* ``base+two`` — the base and the first two experts, all averaged inputs (no ``base_model``)
* ``pairwise`` — the base, then the first expert (per-model parameters: none for the base)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from conftest import recipe_text

# reference(base or None, experts) -> the merged tensor, in fp64, for this row's parameters.
Reference = Callable[[torch.Tensor | None, Sequence[torch.Tensor]], torch.Tensor]

Layout = Literal["experts", "two", "one", "base+two", "pairwise"]

# Merge only the tensors other methods do not apply to; their results are covered there.
FALLBACKS = frozenset({"mean", "mean_task_vector"})


@dataclass(frozen=True)
class Example:
    """One example recipe of ``method``; ``name`` is unique (the parity test's case id).

    ``base``: the recipe names the base as ``base_model``. ``shared`` / ``per_model``: top-level
    and per-model ``parameters`` (values as YAML text, so ``"[0.2, 1.0]"`` is a gradient), one
    per-model dict per listed expert. ``mergekit``: the method's name in mergekit 0.1.5 when this
    example's result is compared with mergekit's; None when it is not (no such method there, or
    a random drop that mergekit draws differently). ``ray``: the every-method Ray test runs it.
    ``inputs``: files the test writes and passes as per-model parameters (``grams``: each
    expert's input Gram matrices, for RegMean). ``reference``: the method's formula in plain
    fp64 torch for this row's (scalar) parameters; the row is then merged and every tensor
    compared with it.
    """

    name: str
    method: str
    base: bool = True
    models: Layout = "experts"
    shared: Mapping[str, Any] | None = None
    per_model: Sequence[Mapping[str, Any]] | None = None
    mergekit: str | None = None
    ray: bool = False
    inputs: Literal["grams"] | None = None
    reference: Reference | None = None

    def recipe(
        self,
        base: Path,
        experts: Sequence[Path],
        extra: str = "",
        per_model: Sequence[Mapping[str, Any]] | None = None,
        method: str | None = None,
    ) -> str:
        """The recipe YAML over the fixture's models; ``per_model`` replaces the table's (for
        ``inputs``), ``method`` the merge method's name (mergekit's, where it differs)."""
        pm = list(per_model if per_model is not None else self.per_model or []) or None
        models: list[Path] = {
            "experts": list(experts),
            "two": list(experts[:2]),
            "one": list(experts[:1]),
            "base+two": [base, *experts[:2]],
            "pairwise": [base, experts[0]],
        }[self.models]
        if self.models == "pairwise" and pm:
            pm = [{}, *pm]
        return recipe_text(
            method or self.method, base if self.base else None, models, dict(self.shared or {}) or None, pm, extra=extra
        )


def _weights(*ws: float | str) -> list[dict[str, Any]]:
    return [{"weight": w} for w in ws]


def _task_arithmetic(lam: float, weights: Sequence[float]) -> Reference:
    def ref(base: torch.Tensor | None, experts: Sequence[torch.Tensor]) -> torch.Tensor:
        assert base is not None
        return base + lam * sum((w * (x - base) for w, x in zip(weights, experts, strict=True)), torch.zeros_like(base))

    return ref


def _median(lam: float) -> Reference:
    def ref(base: torch.Tensor | None, experts: Sequence[torch.Tensor]) -> torch.Tensor:
        assert base is not None
        return base + lam * torch.stack([x - base for x in experts]).quantile(0.5, dim=0)

    return ref


def _ram(eps: float) -> Reference:
    """RAM: an entry changed (|τ| > eps) by one expert keeps that change; by several, their mean."""

    def ref(base: torch.Tensor | None, experts: Sequence[torch.Tensor]) -> torch.Tensor:
        assert base is not None
        taus = torch.stack([x - base for x in experts])
        changed = taus.abs() > eps
        return base + (taus * changed).sum(0) / changed.sum(0).clamp(min=1)

    return ref


E = Example
EXAMPLES: tuple[Example, ...] = (
    # ---- task arithmetic family
    E("linear", "linear", base=False, models="base+two", per_model=_weights(0.5, 0.3, "[0.2, 1.0]"), mergekit="linear"),
    E(
        "task_arithmetic",
        "task_arithmetic",
        shared={"lambda": 0.8},
        per_model=_weights(1.0, 0.5, "[0.1, 0.9]"),
        mergekit="task_arithmetic",
    ),
    E(
        "task_arithmetic_reference",
        "task_arithmetic",
        shared={"lambda": 0.8},
        per_model=_weights(1.0, 0.5, 0.3),
        reference=_task_arithmetic(0.8, (1.0, 0.5, 0.3)),
    ),
    E(
        "ties",
        "ties",
        shared={"normalize": "true"},
        mergekit="ties",
        per_model=[
            {"weight": 1.0, "density": 0.3},
            {"weight": 0.7, "density": 0.5},
            {"weight": 0.5, "density": "[0.2, 0.8]"},
        ],
    ),
    E(
        "ties_filtered",
        "ties",
        shared={"density": "[{filter: mlp, value: 0.2}, {value: 0.6}]"},
        per_model=_weights(1.0, 1.0, 1.0),
        mergekit="ties",
    ),
    E("dare_linear", "dare_linear", shared={"density": 0.5}, per_model=_weights(1.0, 1.0, 1.0), ray=True),
    # Random drops: compared between executors (test_ray.py's own cases run dare_ties), not with mergekit.
    E("dare_ties", "dare_ties", shared={"density": 0.5}, per_model=_weights(1.0, 1.0, 1.0)),
    E(
        "breadcrumbs",
        "breadcrumbs",
        mergekit="breadcrumbs",
        per_model=[
            {"weight": 1.0, "density": 0.8, "gamma": 0.02},
            {"weight": 0.6, "density": 0.7, "gamma": 0.01},
            {"weight": 0.4, "density": 0.9, "gamma": 0.05},
        ],
    ),
    E(
        "breadcrumbs_top_level",
        "breadcrumbs",
        shared={"density": 0.8, "gamma": 0.02},
        per_model=_weights(1.0, 1.0, 1.0),
        ray=True,
    ),
    E(
        "breadcrumbs_ties",
        "breadcrumbs_ties",
        shared={"density": 0.8, "gamma": 0.02},
        per_model=_weights(1.0, 1.0, 1.0),
        ray=True,
    ),
    # DELLA's drop is random (checked against mergekit's probabilities in test_della.py); at density
    # 1 nothing is dropped and the rest of the method (sign election, disjoint mean, λ) must match.
    E(
        "della_undropped",
        "della",
        shared={"lambda": 0.9},
        mergekit="della",
        per_model=[
            {"weight": 1.0, "density": 1.0},
            {"weight": 0.7, "density": 1.0},
            {"weight": "[0.3, 0.9]", "density": 1.0},
        ],
    ),
    E("della", "della", shared={"density": 0.5, "epsilon": 0.2}, per_model=_weights(1.0, 1.0, 1.0), ray=True),
    E(
        "della_linear_undropped",
        "della_linear",
        per_model=[{"weight": 0.6, "density": 1.0}] * 3,
        mergekit="della_linear",
    ),
    E("della_linear", "della_linear", shared={"density": 0.6}, per_model=_weights(0.7, 0.7, 0.7), ray=True),
    E("sce", "sce", shared={"select_topk": 0.3}, mergekit="sce"),
    E("sce_all", "sce", mergekit="sce"),
    E("sce_top_40", "sce", shared={"select_topk": 0.4}, ray=True),
    E("consensus", "consensus", shared={"k": 2}, ray=True),
    E("median", "median", shared={"lambda": 0.9}, ray=True, reference=_median(0.9)),
    # ---- spherical
    E("slerp", "slerp", models="pairwise", shared={"t": "[0.1, 0.9]"}, mergekit="slerp"),
    # mergekit's own tests give every model a `weight`, which slerp does not use: both tools ignore it.
    E(
        "slerp_unused_weight",
        "slerp",
        models="pairwise",
        shared={"t": 0.4},
        per_model=[{"weight": 1.0}],
        mergekit="slerp",
    ),
    E("multislerp", "multislerp", base=False, per_model=_weights(1.0, 0.5, "[0.2, 1.0]"), mergekit="multislerp"),
    E(
        "multislerp_base",
        "multislerp",
        shared={"normalize_weights": "false"},
        per_model=_weights(0.4, 0.3, 0.3),
        mergekit="multislerp",
    ),
    E("multislerp_base_normalized", "multislerp", per_model=_weights(1.0, 0.5, 0.8), ray=True),
    E("nuslerp", "nuslerp", base=False, models="two", per_model=_weights(0.3, 0.7), mergekit="nuslerp"),
    E(
        "nuslerp_base_rows",
        "nuslerp",
        models="two",
        shared={"nuslerp_flatten": "false"},
        per_model=_weights(1.0, "[0.2, 2.0]"),
        mergekit="nuslerp",
    ),
    E(
        "nuslerp_base_columns",
        "nuslerp",
        models="two",
        shared={"nuslerp_flatten": "false", "nuslerp_row_wise": "true"},
        per_model=_weights(0.5, 0.5),
        mergekit="nuslerp",
    ),
    E(
        "nuslerp_base_rows_fixed_weights",
        "nuslerp",
        models="two",
        shared={"nuslerp_flatten": False},
        per_model=_weights(0.4, 0.6),
        ray=True,
    ),
    E("karcher", "karcher", base=False, mergekit="karcher"),
    E("karcher_tight", "karcher", base=False, shared={"max_iter": 50, "tol": 1e-7}, mergekit="karcher"),
    E("karcher_with_base", "karcher", shared={"max_iter": 20}, ray=True, mergekit="karcher"),
    E("model_stock", "model_stock", mergekit="model_stock"),
    E("model_stock_filter_wise", "model_stock", shared={"filter_wise": "true"}, mergekit="model_stock"),
    # ---- entry-wise selection
    E("nearswap", "nearswap", models="pairwise", shared={"t": "[0.001, 0.01]"}, mergekit="nearswap"),
    E("nearswap_base_unlisted", "nearswap", models="one", shared={"t": 0.01}, ray=True),
    E("arcee_fusion", "arcee_fusion", models="pairwise", mergekit="arcee_fusion"),
    E("arcee_fusion_base_unlisted", "arcee_fusion", models="one", ray=True),
    E("ram", "ram", shared={"epsilon": 0.004}, mergekit="ram", ray=True, reference=_ram(0.004)),
    E("ramplus_tl", "ramplus_tl", shared={"epsilon": 0.004, "r": 0.5, "alpha": 0.8}, mergekit="ramplus_tl"),
    E("ramplus_tl_default_alpha", "ramplus_tl", shared={"epsilon": 0.004, "r": 0.5}, ray=True),
    E("passthrough", "passthrough", base=False, models="one", per_model=[{"scale": 0.5}], mergekit="passthrough"),
    E("passthrough_with_base", "passthrough", models="one", per_model=[{"scale": 0.5}], ray=True),
    # ---- Gram
    E("actmat", "actmat", ray=True),
    E("actmat_trim", "actmat", shared={"trim": 0.5}, ray=True),
    E("wudi", "wudi", shared={"steps": 50}, ray=True),
    E("regmean", "regmean", shared={"alpha": 0.9}, inputs="grams", ray=True),
    # ---- spectral
    E("tsv_m", "tsv_m", ray=True),
    E("iso_c", "iso_c", shared={"alpha": 1.5}, ray=True),
    E("iso_cts", "iso_cts", ray=True),
    # ---- SVC over a merge
    E(
        "svc_task_arithmetic",
        "svc_task_arithmetic",
        shared={"lambda": 0.5},
        per_model=_weights(1.0, 1.0, 1.0),
        ray=True,
    ),
    E("svc_ties", "svc_ties", per_model=[{"weight": 1.0, "density": 0.5}] * 3, ray=True),
    E("svc_tsv_m", "svc_tsv_m", shared={"svc_alpha": 0.5}, ray=True),
    E("svc_iso_c", "svc_iso_c", ray=True),
    E("svc_wudi", "svc_wudi", shared={"steps": 20}, ray=True),
)
