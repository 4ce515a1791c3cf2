"""The streaming half of the Gram methods: row chunks gathered into blocks, each expert's two
passes over its rows into S = Σ w_t Δ_tᵀΔ_t, R = Σ w_t Δ_t Δ_tᵀΔ_t and ΣΔ_t (``gram_stats``), and
the whole-tensor adapter that feeds in-memory tensors through the same code (``whole_tensor``).

Chunks arrive as the task reads them (``chunks.ChunkSource``); products run on blocks of at
least ``BLOCK_ROWS`` rows, copied into one reusable buffer in the statistics dtype.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from raymerge.engine.methods.chunks import ChunkedFn, ChunkSource
from raymerge.engine.methods.gram_trim import magnitude_threshold, trim_
from raymerge.engine.methods.precision import stats_dtype
from raymerge.engine.methods.registry import MergeArgs, MergeFn, MethodSpec, Param, register

# Chunks are gathered into blocks of at least this many rows before the products: a rank-k update
# of an in × in matrix is memory-bound below k ≈ 100 (fp64 on CPUs and on an H100 alike).
BLOCK_ROWS = 256

Rows = Callable[[int, int], torch.Tensor]


def row_blocks(ranges: Sequence[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Consecutive row chunks grouped into blocks of at least ``BLOCK_ROWS`` rows (the last may be
    smaller); each block is the list of its chunks."""
    blocks: list[list[tuple[int, int]]] = [[]]
    for r in ranges:
        if blocks[-1] and blocks[-1][-1][1] - blocks[-1][0][0] >= BLOCK_ROWS:
            blocks.append([])
        blocks[-1].append(r)
    return blocks


class BlockReader:
    """Reads blocks of rows into one reusable buffer in the statistics dtype (allocated at the
    first read, on the chunks' device); ``compute`` is the dtype the chunks arrive in."""

    def __init__(self, blocks: list[list[tuple[int, int]]], precision: str) -> None:
        self.rows = max(b[-1][1] - b[0][0] for b in blocks)
        self.precision = precision
        self.buf: torch.Tensor | None = None
        self.compute = torch.float32

    def read(self, fetch: Rows, block: list[tuple[int, int]], minus: Rows | None = None) -> torch.Tensor:
        """Rows ``fetch(r0, r1)`` (less ``minus(r0, r1)``) of every chunk of ``block``, as one tensor."""
        b0 = block[0][0]
        for r0, r1 in block:
            x = fetch(r0, r1)
            if self.buf is None:
                self.compute = x.dtype
                dtype = stats_dtype(self.precision, x.device)
                self.buf = torch.empty(self.rows, x.shape[1], dtype=dtype, device=x.device)
            dst = self.buf[r0 - b0 : r1 - b0]
            dst.copy_(x)
            del x
            if minus is not None:
                dst.sub_(minus(r0, r1))  # in the statistics dtype: exactly x.to(dtype) − base.to(dtype)
        assert self.buf is not None
        return self.buf[: block[-1][1] - b0]


def pieces(out: torch.Tensor, block: list[tuple[int, int]]) -> Iterator[torch.Tensor]:
    """A block's output rows handed out in the task's row chunks."""
    b0 = block[0][0]
    for r0, r1 in block:
        yield out[r0 - b0 : r1 - b0]


@dataclass
class GramStats:
    """Accumulated statistics of one linear weight over experts (rows relative to ``origin``)."""

    S: torch.Tensor  # in × in, Σ w_t Δ_tᵀΔ_t
    R: torch.Tensor  # out × in, Σ w_t Δ_t Δ_tᵀΔ_t
    delta_sum: torch.Tensor | None  # out × in, Σ Δ_t (when asked for)
    count: int
    sq_norms: list[float]
    origin: int


def _deltas(
    reader: BlockReader, expert: Rows, base: Rows, blocks: list[list[tuple[int, int]]]
) -> Iterator[torch.Tensor]:
    """One expert's task vector block by block, in the reader's buffer."""
    for block in blocks:
        yield reader.read(expert, block, base)


def gram_stats(
    src: ChunkSource,
    reader: BlockReader,
    blocks: list[list[tuple[int, int]]],
    weighting: str,
    with_sum: bool,
    trim: float = 1.0,
) -> GramStats:
    """Two passes over each expert's row blocks (C_t, ‖Δ_t‖², ΣΔ; then R += w_t Δ_t C_t), one
    expert after another; weights 1 (``none``) or 1/‖Δ_t‖² (``inv_sq_norm``).

    ``trim`` < 1 forms C_t from trim(Δ_t), Δ_t's ⌈trim·numel⌉ entries largest in magnitude
    (``gram_trim``; its threshold costs 2–4 more passes over the expert), while ‖Δ_t‖², ΣΔ and
    R = Σ w_t Δ_t C_t use the whole Δ_t.

    A source with ``partial_stats`` (a map-reduce over experts, ``engine.reduce``) hands back the
    statistics other tasks accumulated over their experts, added up, instead of reading any."""
    summed = getattr(src, "partial_stats", None)
    if summed is not None:
        return summed(reader.precision)  # type: ignore[no-any-return]
    origin, end = blocks[0][0][0], blocks[-1][-1][1]
    S = C = R = total = None
    norms: list[float] = []
    for t in range(src.n_experts):
        expert = functools.partial(src.expert, t)
        sq: torch.Tensor | None = None
        cut = 0.0
        if trim < 1:
            cut = magnitude_threshold(functools.partial(_deltas, reader, expert, src.base, blocks), trim)
        for block in blocks:
            d = reader.read(expert, block, src.base)
            if S is None:
                S = torch.zeros(d.shape[1], d.shape[1], dtype=d.dtype, device=d.device)
                C = torch.empty_like(S)
                R = torch.zeros(end - origin, d.shape[1], dtype=d.dtype, device=d.device)
                total = torch.zeros_like(R) if with_sum else None
            assert C is not None
            if block is blocks[0]:
                C.zero_()
            flat = d.reshape(-1)
            sq = torch.dot(flat, flat) if sq is None else sq.add_(torch.dot(flat, flat))
            if total is not None:
                total[block[0][0] - origin : block[-1][1] - origin].add_(d)
            if cut > 0:
                trim_(d, cut)  # the reader's buffer: the next read overwrites it
            C.addmm_(d.T, d)
        assert S is not None and C is not None and R is not None and sq is not None
        norms.append(float(sq))
        w = 1.0 if weighting == "none" else (1.0 / norms[-1] if norms[-1] > 0 else 0.0)
        S.add_(C, alpha=w)
        for block in blocks:
            d = reader.read(expert, block, src.base)
            R[block[0][0] - origin : block[-1][1] - origin].addmm_(d, C, alpha=w)
    assert S is not None and R is not None
    return GramStats(S, R, total, src.n_experts, norms, origin)


class ExpertsInOrder:
    """A ``ChunkSource`` over whole tensors already in memory, for direct calls: the experts come
    from a (possibly lazy) sequence that is iterated once, and expert t + 1 replaces expert t, so
    one expert is held at a time (Gram methods finish with an expert before reading the next)."""

    def __init__(self, base: torch.Tensor | None, experts: Sequence[torch.Tensor], chunk_rows: int) -> None:
        self.n_experts = len(experts)
        self._it: Iterator[torch.Tensor] = iter(experts)
        self._t = -1
        self._cur: torch.Tensor | None = None
        ref = base if base is not None else self._take(0)
        self.has_base = base is not None
        self._base = None if base is None else base.reshape(base.shape[0], -1)
        self.shape = tuple(ref.shape)
        self.vector = ref.dim() <= 1
        self.numel = ref.numel()
        rows = ref.shape[0] if ref.dim() else 1
        self.ranges = [(r, min(rows, r + chunk_rows)) for r in range(0, rows, chunk_rows)] or [(0, 0)]

    def _take(self, t: int) -> torch.Tensor:
        if t < self._t:
            raise ValueError(f"expert {t} was asked for after expert {self._t}: experts are read in order")
        while self._t < t:
            self._cur = None  # drop the previous expert before the next one is read
            self._cur = next(self._it)
            self._t += 1
        assert self._cur is not None
        return self._cur

    def base(self, r0: int, r1: int) -> torch.Tensor:
        if self._base is None:
            raise ValueError("the method read a base model this merge does not have")
        return self._base[r0:r1]

    def expert(self, t: int, r0: int, r1: int) -> torch.Tensor:
        x = self._take(t)
        return x.reshape(x.shape[0], -1)[r0:r1]


def whole_tensor(fn: ChunkedFn, name: str) -> MergeFn:
    """``fn(base, experts, args) -> Tensor`` over a chunked Gram method: one expert at a time
    (``ExpertsInOrder``), rows in blocks of ``BLOCK_ROWS``, the output assembled in place."""

    def call(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
        src = ExpertsInOrder(base, experts, BLOCK_ROWS)
        out: torch.Tensor | None = None
        at = 0
        for piece in fn(src, args):
            if out is None:
                rows = src.ranges[-1][1]
                out = torch.empty(rows, *piece.shape[1:], dtype=piece.dtype, device=piece.device)
            out[at : at + piece.shape[0]] = piece
            at += piece.shape[0]
        assert out is not None
        return out.reshape(src.shape)

    call.__doc__ = fn.__doc__
    call.__name__ = name
    return call


def register_gram(name: str, fn: ChunkedFn, params: tuple[Param, ...], reference: str, **traits: Any) -> MethodSpec:
    """Register a chunked Gram method with ``whole_tensor`` as its plain function."""
    return register(MethodSpec(name, whole_tensor(fn, name), params, reference, chunked=fn, **traits))


__all__ = [
    "BLOCK_ROWS",
    "BlockReader",
    "ExpertsInOrder",
    "GramStats",
    "gram_stats",
    "pieces",
    "register_gram",
    "row_blocks",
    "whole_tensor",
]
