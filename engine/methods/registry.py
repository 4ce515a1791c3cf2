"""Method registry: a name, its parameters (mergekit's scopes) and the pure function behind it.

A method function takes tensors already cast to the compute dtype and returns the merged tensor:
``fn(base, experts, args) -> Tensor``. ``args`` carries the shared parameters, one dict of
per-model parameters per expert, and a seeded generator for random methods. Nothing here reads
files or knows about tasks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch


class Scope(StrEnum):
    SHARED = "shared"  # one value per tensor (top-level `parameters`)
    MODEL = "model"  # one value per expert (per-model `parameters`, may also be set top-level)


REQUIRED: Any = object()


@dataclass(frozen=True)
class Param:
    """A method parameter: its name, Python type, scope and default (``REQUIRED`` if none).

    Numeric parameters may bound their values: ``low``/``high`` (inclusive unless ``low_open``/
    ``high_open``). Float values must also be finite, bounded or not. The recipe layer checks
    every value a recipe gives (each point of a gradient, each conditional) before planning.
    """

    name: str
    kind: type
    scope: Scope
    default: Any = REQUIRED
    help: str = ""
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def bounded(self) -> bool:
        return self.low is not None or self.high is not None

    def allowed(self) -> str:
        """The allowed values in words, e.g. ``a finite number in [0, 1]`` or ``an integer >= 1``."""
        what = "an integer" if self.kind is int else "a finite number"
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return f"{what} in {'(' if self.low_open else '['}{lo:g}, {hi:g}{')' if self.high_open else ']'}"
        if lo is not None:
            return f"{what} {'>' if self.low_open else '>='} {lo:g}"
        if hi is not None:
            return f"{what} {'<' if self.high_open else '<='} {hi:g}"
        return what

    def accepts(self, value: Any) -> bool:
        """Whether a coerced ``value`` lies in the allowed range (non-numeric kinds always do)."""
        if self.kind not in (int, float) or isinstance(value, bool):
            return True
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return not (self.high is not None and (value >= self.high if self.high_open else value > self.high))


@dataclass(frozen=True)
class MergeArgs:
    """Resolved parameters for one tensor: shared values, per-expert values, and an RNG."""

    shared: Mapping[str, Any]
    per_model: Sequence[Mapping[str, Any]]
    generator: torch.Generator | None = None
    tensor_name: str = ""
    seed: int = 0
    aux: Sequence[torch.Tensor] = ()


MergeFn = Callable[[torch.Tensor | None, Sequence[torch.Tensor], MergeArgs], torch.Tensor]

ALL_CLASSES = frozenset({"linear", "embedding", "vector", "other"})


@dataclass(frozen=True)
class MethodSpec:
    """What the planner needs to know about a method besides its math.

    ``row_separable``: the result for a block of rows depends only on those rows, so the planner
    may split the tensor into row chunks. ``work_buffers(n_experts)``: how many full-size
    compute-dtype buffers the function holds at its peak (used for memory estimates).
    ``includes_base_in_inputs``: the base model is one of the averaged inputs (linear) rather
    than the reference point of task vectors.

    ``applies_to``: tensor classes (see ``plan.classify``) the method handles; the others are
    merged with ``fallback`` (e.g. Gram methods average biases, norms and embeddings).
    ``streams_experts``: the function iterates over ``experts`` (a lazy sequence that reads each
    expert on demand) and holds O(1) experts at a time, so memory is independent of their number.
    ``prefers_accelerator``: runs on CUDA under ``device: auto`` (dense linear algebra).
    ``extra_bytes(shape, itemsize)``: peak bytes held besides the ``work_buffers`` full-size
    buffers (e.g. an in×in Gram matrix), for memory estimates.
    ``chunked``: a ``chunks.ChunkedFn`` that computes the tensor in row chunks after statistics
    passes; tasks then run it with bounded memory (``work_buffers`` counts chunk-size buffers),
    and ``fn`` is its whole-tensor adapter.
    ``aux_param``: a per-model parameter naming where each expert's auxiliary in×in matrices live
    (RegMean's Grams); the method then receives them lazily as ``args.aux``.
    ``check(shared, per_model)``: a rule across parameters (e.g. DELLA's density ± ε inside (0, 1))
    run on each tensor's resolved values while planning; it returns what is wrong, or None.
    ``oriented``: the method reads a linear weight as out × in (input Grams, ΔᵀΔ, a left singular
    space); a weight stored in × out (GPT-2's ``Conv1D``) is handed to it transposed, and the
    result transposed back.
    """

    name: str
    fn: MergeFn
    params: tuple[Param, ...]
    reference: str
    needs_base: bool = True
    min_experts: int = 1
    max_experts: int | None = None
    row_separable: bool = False
    random: bool = False
    includes_base_in_inputs: bool = False
    work_buffers: Callable[[int], int] = field(default=lambda n: n + 4)
    applies_to: frozenset[str] = ALL_CLASSES
    fallback: str | None = None
    streams_experts: bool = False
    prefers_accelerator: bool = False
    extra_bytes: Callable[[tuple[int, ...], int], int] = field(default=lambda shape, item: 0)
    flops: Callable[[tuple[int, ...], int], int] | None = None
    chunked: Callable[..., Any] | None = None
    aux_param: str | None = None
    check: Callable[[Mapping[str, Any], Sequence[Mapping[str, Any]]], str | None] | None = None
    oriented: bool = False

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None


METHODS: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS:
        raise ValueError(f"method {spec.name!r} registered twice")
    for p in spec.params:
        if p.default is not REQUIRED and not p.accepts(p.default):
            raise ValueError(f"method {spec.name!r}: default {p.default!r} of {p.name!r} is not {p.allowed()}")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    return METHODS[name]
