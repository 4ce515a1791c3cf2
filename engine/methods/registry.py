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

# At most this many elements of a chunked method's tensor get a resident int32 rank/selection
# scratch (4 bytes each); larger tensors rank in passes instead (see ``masks``).
RESIDENT_SELECT_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class WorkShape:
    """What one task's memory depends on; counts in elements, item sizes in bytes per element.

    ``numel``: elements of the task's span; ``work_numel``: elements computed at once (one row
    chunk for chunked methods, else ``numel``); ``chunk_shape``: the span's shape as the method
    sees it (out × in for oriented methods); ``chunk_rows``: rows one read moves; ``inputs``:
    tensors read per element (base + experts); ``experts``: task vectors merged; ``in_item``,
    ``compute_item``, ``out_item``, ``stats_item``: the stored inputs, the compute dtype, the
    output dtype, and the statistics/solve dtype of dense linear algebra (8 for fp64); ``params``:
    the task's method parameters, for models that depend on them (WUDI's solver); ``lora_rank``:
    Σ r_t when every expert is a LoRA adapter on the base that the method solves in factored form
    (``gram_lora``), else 0.
    """

    numel: int
    work_numel: int
    chunk_shape: tuple[int, ...]
    chunk_rows: int
    inputs: int
    experts: int
    in_item: int
    compute_item: int
    out_item: int
    stats_item: int = 8
    params: Mapping[str, Any] = field(default_factory=dict)
    lora_rank: int = 0

    @property
    def row_numel(self) -> int:
        rows = self.chunk_shape[0] if self.chunk_shape else 1
        return self.numel // rows if rows else 0

    @property
    def chunk_numel(self) -> int:
        """Elements of one row chunk as a task reads it (never more than the span)."""
        return min(self.numel, max(1, self.chunk_rows) * max(1, self.row_numel))

    @property
    def host_in_flight(self) -> int:
        """Host bytes of one input row chunk on its way to an accelerator: the chunk as read (its
        mapped pages) and the two pinned chunks of ``transfer.move_rows``, or, on the pageable
        path of a single chunk, the chunk read and its converted copy."""
        return self.chunk_numel * max(3 * self.in_item, self.in_item + self.compute_item)


@dataclass(frozen=True)
class Footprint:
    """Declared peak bytes of a task: in host memory and in accelerator memory."""

    host: int
    device: int = 0


# memory(shape, on_accelerator) -> the task's peak bytes, host and device.
MemoryModel = Callable[[WorkShape, bool], Footprint]


@dataclass(frozen=True)
class MethodSpec:
    """What the planner needs to know about a method besides its math.

    ``row_separable``: the result for a block of rows depends only on those rows, so the planner
    may split the tensor into row chunks. ``work_buffers(n_experts)``: how many full-size
    compute-dtype buffers the function holds at its peak (used for memory estimates).
    ``includes_base_in_inputs``: the base model is one of the averaged inputs (linear) rather
    than the reference point of task vectors. ``base_joins_inputs``: a ``base_model`` that the
    ``models`` list leaves out is merged as one more input after them, as mergekit adds it
    (karcher averages it in). ``group_stats``: the chunked function's tensor-wide statistics
    read ``src.stats_sources``, so a task may hand it the other stored tensors of the tensor
    mergekit fuses (``arch.fused_groups``: a MoE's experts) and the statistics span the group.

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
    ``rereads_inputs``: the chunked function reads each input more than once (the Gram statistics:
    two passes per expert, the base 2T + 1 times); on an accelerator a task then holds the base and
    the current expert in device memory in their stored dtype (``memory`` declares them), so each
    is read from storage and crosses to the device once.
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
    base_joins_inputs: bool = False
    group_stats: bool = False
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
    memory: MemoryModel | None = None
    rereads_inputs: bool = False

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def runs_on_accelerator(self, device: str) -> bool:
        """The device rule for a merge with this method: ``cpu`` never, ``cuda`` always, ``auto``
        when the method declares ``prefers_accelerator`` (elementwise work is bound by reading
        and gains nothing from a copy to the device)."""
        return device == "cuda" or (device == "auto" and self.prefers_accelerator)

    def footprint(self, shape: WorkShape, on_accelerator: bool) -> Footprint:
        """Peak host and device bytes of one task: the method's own ``memory`` model, else the
        generic one built from ``work_buffers`` and ``extra_bytes``.

        Generic model: ``work_buffers`` compute-dtype buffers of ``work_numel`` elements plus
        ``extra_bytes``, the inputs resident at once (two for a method that streams experts),
        the output (one chunk for a chunked method) and a chunked method's selection scratch.
        On CPU all of it is host memory. On an accelerator the inputs arrive in row chunks
        (host: one stored chunk and its converted copy) and leave in row chunks (host: one
        output chunk); the inputs in the compute dtype, the work buffers and the scratch are
        device memory.
        """
        if self.memory is not None:
            return self.memory(shape, on_accelerator)
        s = shape
        held = 2 if self.streams_experts else s.inputs
        compute = self.work_buffers(s.experts) * s.work_numel * s.compute_item + self.extra_bytes(
            s.chunk_shape, s.compute_item
        )
        select = 4 * s.numel if self.chunked and s.numel <= RESIDENT_SELECT_ELEMENTS else 0
        if not on_accelerator:
            out = s.work_numel * s.out_item if self.chunked else s.numel * s.out_item
            return Footprint(host=compute + s.work_numel * s.in_item * held + out + select)
        chunk = s.chunk_numel
        return Footprint(
            host=s.host_in_flight + chunk * s.out_item,
            device=compute + s.work_numel * s.compute_item * held + select + chunk * s.out_item,
        )


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
