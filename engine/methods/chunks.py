"""Row-chunked access to a tensor, and registration of methods that run over row chunks.

Many methods need a statistic of the *whole* tensor (a magnitude rank threshold, an L1 norm, a
cosine) before any element can be finalised. They are written as generators over row chunks:
statistics passes that keep only scalars, then an apply pass that yields output chunks in row
order, so peak memory is O(experts × chunk) whatever the tensor. A ``ChunkSource`` hands out
rows of the base and of each expert on demand (a task reads them from the memory map;
``InMemorySource`` wraps plain tensors for direct calls and tests).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from raymerge.engine.methods.registry import MergeArgs, MergeFn, MethodSpec, Param, register


class ChunkSource(Protocol):
    """Row-chunked access to one tensor of the base and of every expert (compute dtype)."""

    ranges: list[tuple[int, int]]
    n_experts: int
    vector: bool  # the tensor is 0-D or 1-D (its rows are single elements)
    numel: int  # elements covered by ``ranges``
    shape: tuple[int, ...]  # the whole tensor's shape
    has_base: bool  # ``base`` is a real model (methods with an optional base use it as the origin)
    # Sources over which tensor-wide statistics run: this one, then the other stored tensors of
    # the tensor mergekit fuses (a MoE's experts), each over the same models; [self] otherwise.
    stats_sources: Sequence[ChunkSource]

    def base(self, r0: int, r1: int) -> torch.Tensor: ...
    def expert(self, t: int, r0: int, r1: int) -> torch.Tensor: ...


class InMemorySource:
    """A ``ChunkSource`` over tensors already in memory, split into chunks of ``chunk_rows``."""

    def __init__(
        self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], chunk_rows: int | None = None
    ) -> None:
        self.has_base = base is not None
        if base is None:  # a base-free method: zeros stand in (never read as a model)
            base = torch.zeros_like(experts[0])
        self._shape = base.shape
        self.shape = tuple(base.shape)
        self._base = base.reshape(base.shape[0], -1) if base.dim() >= 1 else base.reshape(1, 1)
        self._experts = [e.reshape(self._base.shape) for e in experts]
        rows = self._base.shape[0]
        step = max(1, chunk_rows or rows)
        self.ranges = [(r, min(rows, r + step)) for r in range(0, rows, step)] or [(0, 0)]
        self.n_experts = len(self._experts)
        self.vector = base.dim() <= 1
        self.numel = base.numel()
        self.stats_sources: Sequence[ChunkSource] = [self]

    def base(self, r0: int, r1: int) -> torch.Tensor:
        return self._base[r0:r1]

    def expert(self, t: int, r0: int, r1: int) -> torch.Tensor:
        return self._experts[t][r0:r1]

    def assemble(self, chunks: Iterator[torch.Tensor]) -> torch.Tensor:
        return torch.cat([c.reshape(-1) for c in chunks]).reshape(self._shape)


ChunkedFn = Callable[[ChunkSource, MergeArgs], Iterator[torch.Tensor]]


def whole_tensor(fn: ChunkedFn, name: str | None = None) -> MergeFn:
    """Adapt a chunked method to the plain ``fn(base, experts, args) -> Tensor`` signature."""

    def call(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
        src = InMemorySource(base, list(experts))
        return src.assemble(fn(src, args))

    call.__doc__ = fn.__doc__
    call.__name__ = name or str(getattr(fn, "__name__", "chunked"))
    return call


def register_chunked(name: str, fn: ChunkedFn, params: tuple[Param, ...], reference: str, **traits: Any) -> MethodSpec:
    """Register method ``name`` computed by the chunked ``fn`` (bounded memory in tasks), with its
    whole-tensor adapter as the plain function; ``traits`` are further ``MethodSpec`` fields (for
    a chunked method ``work_buffers`` counts chunk-size buffers)."""
    return register(MethodSpec(name, whole_tensor(fn, name), params, reference, chunked=fn, **traits))
