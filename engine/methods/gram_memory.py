"""The memory model of the Gram methods (ACTMat, WUDI per solver, RegMean), term by term, and
their FLOP models.

``gram_memory`` gives a task's declared peak host and device bytes from its ``WorkShape``: the
statistics (S, one C_t, R, ΣΔ), the solve (``eigh`` path or Cholesky), the output pass, the
inputs in flight and the runtime's share. On CPU it bounds the resident-set growth measured as
tests/parity/test_memory_model.py measures it by 1.03–1.39× (4 fp32 experts, out × in from
512 × 3072 to 3072 × 512); at the 70B down_proj (out 8192 × in 28672, 8 bf16 experts, fp64
statistics) ACTMat is declared 14.1 GiB on CPU (WUDI 15.8 GiB).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from raymerge.engine.methods import gram_stream, gram_trim
from raymerge.engine.methods.eigh import in_place
from raymerge.engine.methods.registry import Footprint, WorkShape


@dataclass(frozen=True)
class _Dims:
    out: int  # rows of the span (as the method sees it)
    n: int  # columns: the input width, S is n × n
    chunk: int  # elements of one row chunk as the task reads it
    block: int  # elements of one row block of the products
    whole: bool  # the task hands the method whole tensors (one chunk, or a Conv1D weight turned)

    @staticmethod
    def of(s: WorkShape) -> _Dims:
        out, n = (s.chunk_shape + (1, 1))[:2] if len(s.chunk_shape) == 2 else (max(1, s.numel), 1)
        chunk = max(1, min(s.numel, s.work_numel))
        rows = max(1, chunk // max(1, n))
        return _Dims(out, n, chunk, min(out, max(rows, gram_stream.BLOCK_ROWS)) * n, chunk >= s.numel)


def _inputs_host(s: WorkShape, d: _Dims) -> int:
    """Host bytes of the inputs in flight on CPU.

    Stored in the compute dtype, chunks are zero-copy views of the memory map whose pages stay
    resident until the task ends (every input, whole: the method reads each expert twice and the
    base 2T + 1 times). Otherwise a chunk is converted and its pages released: one stored chunk and
    its copy; whole tensors (``d.whole``): the base and one expert converted, one stored while read.
    """
    mask = s.numel if d.whole else d.chunk  # the reader's isfinite check of what it read
    if s.in_item == s.compute_item:
        return s.inputs * s.numel * s.in_item + mask
    if d.whole:
        return s.numel * (2 * s.compute_item + s.in_item) + mask
    return d.chunk * (s.in_item + s.compute_item) + mask


def _output_host(s: WorkShape, d: _Dims) -> int:
    """The result as written: one chunk in the output dtype (its block in the compute dtype is in the
    output phase's block temporaries), or whole tensors: the assembled result and its copy."""
    if d.whole:
        return s.numel * (s.compute_item + s.out_item)
    return d.chunk * s.out_item


def _eigh_bytes(n: int, item: int, on_accelerator: bool, bounded: bool = False) -> int:
    """Peak bytes of ``sym_eigh`` of an n × n matrix including S itself.

    CPU below ``IN_PLACE_BYTES`` (unless ``bounded``): S, V and syevd's 1 + 6n + 2n² workspace
    (measured: 3.05n² + 6 MiB above S at n = 3072); above it, or ``bounded``: S (overwritten), V
    and syevr's O(n) workspace. CUDA: ``torch.linalg.eigh`` allocates 5.0n² beyond S (H200, torch
    2.11, fp64, n = 4096, 11008 and 28672; ``benchmarks/cuda_solvers.py``), so 6n² with S; the
    pseudo-inverse's copy of the kept eigenvectors comes after the workspace is freed."""
    if on_accelerator:
        return 6 * n * n * item + 64 * n * item
    if bounded or in_place(n, item):
        return 2 * n * n * item + 64 * n * item
    return 4 * n * n * item + 256 * n * item


# What the Cholesky path's library calls keep beyond S and L: measured 1.3 MiB (potrf) and 2.4 MiB
# (the certifying triangular solves) of resident-set growth at n = 2048, one thread, apart; within a
# task the two together measured 3.3 MiB above S, L and the itemised rest, so twice that is declared.
CHOLESKY_WORK_BYTES = 8 << 20


def _inverse_bytes(n: int, item: int, on_accelerator: bool, eigh_item: int | None = None) -> int:
    """Peak bytes of ``eigh.gram_inverse`` with S: S and its Cholesky factor (the certifying vectors,
    and on CPU ``CHOLESKY_WORK_BYTES``), or, when S is not certified, the eigen-decomposition
    (bounded on CPU) in the statistics' dtype, or in ``eigh_item``-byte elements after S is copied
    to them and released (``eigh_precision: fp32``)."""
    chol = 2 * n * n * item + 16 * n * item + (0 if on_accelerator else CHOLESKY_WORK_BYTES)
    if eigh_item is None or eigh_item == item:
        return max(chol, _eigh_bytes(n, item, on_accelerator, bounded=True))
    return max(chol, n * n * (item + eigh_item), _eigh_bytes(n, eigh_item, on_accelerator, bounded=True))


# Besides its own tensors, a task's resident set grows by what BLAS and LAPACK keep (packing
# buffers, per thread). Measured as tests/parity/test_memory_model.py does (a process that has
# initialised BLAS and LAPACK, glibc's mmap threshold pinned, one thread), the itemised terms alone
# bound the growth, by 3–9 MiB, at out × in = 512 × 2048 … 3072 × 512; this covers more threads.
# The first task of a fresh process with glibc's dynamic threshold measured 11–51 MiB above the
# itemised terms (library initialisation, and freed buffers of up to 32 MiB kept in the heap):
# processes that run tasks should pin the threshold, as the executors' workers do.
RUNTIME_BYTES = 16 << 20


# The trimmed covariance's threshold (``gram_trim``): the histogram, its reversed running sum and
# each pass's bincount, 65 536 int64 each.
TRIM_HIST_BYTES = 4 * gram_trim.BINS * 8


def _trim_bytes(d: _Dims, si: int) -> int:
    """What ``trim`` adds to the statistics phase beyond the block buffer: during a threshold pass
    |δ| of a block (shifted in place through its integer view), two boolean masks and the selected
    digits; during the candidate pass |δ|, a mask, a block's selected values and the candidates (at
    most a block each); during the C pass |δ| ≥ τ of a block. The largest: the candidate pass, 3
    blocks and a mask, plus the histograms."""
    return 3 * d.block * si + d.block + TRIM_HIST_BYTES


def gram_memory(
    kind: str, s: WorkShape, on_accelerator: bool, trim: bool = False, eigh_item: int | None = None
) -> Footprint:
    """Declared peak bytes of a Gram task: ``kind`` is ``actmat``, ``wudi:<solver>``, ``wudi``
    (the largest over its solvers) or ``regmean``; ``trim``: the trimmed covariance (ACTMat, WUDI);
    ``eigh_item``: the element size of R S⁺'s eigh fallback when not the statistics'.

    Phases (the peak is the largest): statistics (S, C_t, R [, ΣΔ] and the block buffer), the
    solve (``_inverse_bytes`` for R S⁺, ``_eigh_bytes`` for WUDI's filters, WUDI-Adam's fp32 copy of S), and the
    output pass (eigenvectors, R [, ΣΔ] and a few block temporaries). On CPU all of it is host
    memory, with the inputs (``_inputs_host``), the output (``_output_host``) and
    ``RUNTIME_BYTES``. On an accelerator it is device memory, with the chunk copies and (ACTMat,
    WUDI) the base and the current expert as stored, which the statistics re-read; the host holds
    one input chunk in flight (``WorkShape.host_in_flight``) and one output chunk (and a chunk of a
    Gram).
    """
    if kind == "wudi":
        peaks = [
            gram_memory(f"wudi:{x}", s, on_accelerator, trim, eigh_item) for x in ("adam", "spectral", "closed_form")
        ]
        return Footprint(max(p.host for p in peaks), max(p.device for p in peaks))
    d = _Dims.of(s)
    if s.lora_rank and kind != "regmean":
        return _factored_memory(s, d, on_accelerator)
    si, n = s.stats_item, d.n
    nn = n * n * si
    rows = d.out * n * si  # one out × in statistic (R, ΣΔ, B)
    blk = d.block * si  # the block buffer, from the first read to the end
    if kind == "regmean":
        # A, G̃_t and the Gram as read (on the host a zero-copy view when the compute dtype is the
        # Grams' fp32) | A and its Cholesky factor, or the eigen-decomposition (``gram_inverse``)
        read = n * n * s.compute_item if on_accelerator or s.compute_item != 4 else 0
        stats = 2 * nn + read + rows + blk
        solve = _inverse_bytes(n, si, on_accelerator, eigh_item) + rows + blk
        output = nn + rows + 3 * blk
    else:
        held = rows * (2 if kind.startswith("wudi") else 1)  # R [and ΣΔ]
        stats = 2 * nn + held + blk + (_trim_bytes(d, si) if trim else 0)
        if kind == "wudi:adam":
            # S in fp64 and fp32 for a moment; then per block M, its gradient, two moments, the
            # denominator and R's rows, all fp32; after it the result in the statistics dtype
            solve = nn + n * n * 4 + held + blk
            output = n * n * 4 + held + blk + max(6 * d.block * 4, blk + d.block * s.compute_item)
        else:
            # R S⁺ (``gram_inverse``: Cholesky or eigh) or WUDI's spectral filters (eigh)
            inverse = kind in ("actmat", "wudi:closed_form")
            solve = held + blk
            solve += _inverse_bytes(n, si, on_accelerator, eigh_item) if inverse else _eigh_bytes(n, si, on_accelerator)
            # L or V, the block buffer, the first solve's (x V's) block, the block's result and its
            # compute-dtype copy; ACTMat's weight mode also holds the projection of the base rows
            output = nn + held + (4 if kind == "actmat" else 3) * blk
    peak = max(stats, solve, output)
    if not on_accelerator:
        # RegMean's Grams are read whole, zero-copy from their memory maps (``raymerge stats``
        # writes fp32), and their pages stay resident until the task ends; with each one's
        # isfinite mask (n² bytes, freed at once)
        grams = s.experts * n * n * 4 + n * n if kind == "regmean" else 0
        return Footprint(host=peak + _inputs_host(s, d) + _output_host(s, d) + grams + RUNTIME_BYTES)
    chunk = s.chunk_numel
    copies = 2 * chunk * (s.compute_item + s.in_item) + chunk * s.out_item + d.block * s.compute_item
    host = s.host_in_flight + chunk * s.out_item + RUNTIME_BYTES
    if kind == "regmean":  # a Gram crosses the host in row chunks too
        host += max(1, s.chunk_rows) * n * (4 + s.compute_item)
    elif s.params.get("inputs_on_device", True):  # the base and the current expert as stored
        copies += 2 * s.numel * s.in_item
    return Footprint(host=host, device=peak + copies)


# What a factored task's resident set grows by besides its buffers: its solves are K × K and
# in × K (no in × in LAPACK work), so BLAS's buffers remain, as for the spectral methods (2–6 MiB).
FACTORED_RUNTIME_BYTES = 8 << 20


def _factored_memory(s: WorkShape, d: _Dims, on_accelerator: bool) -> Footprint:
    """LoRA experts in factored form (``gram_lora``), K = Σ r_t: the factors in the compute dtype
    (K·(in + out)); the stacked A in the statistics dtype, its QR (Q in × K, the solver's copy and
    workspace) and K × K matrices; Y, ΣΔ's Z and the result X (out × K each) and, for ACTMat's
    weight mode, Q's kept rotation P (in × K); then the output pass: the block buffer (base rows),
    a block of X Qᵀ (the result, in place) and its compute-dtype copy, plus the weight mode's
    projection (rows × K). Expert rows are never read: on CPU the base's pages (or one converted
    chunk), one output chunk and ``FACTORED_RUNTIME_BYTES``; on an accelerator the host holds one
    stored chunk, its converted copy, one output chunk and the factors as stored."""
    k, n, out, si = s.lora_rank, d.n, d.out, s.stats_item
    factors = k * (n + out) * s.compute_item
    span = 3 * k * n * si + 3 * k * k * si + out * k * si
    solved = 3 * out * k * si + k * n * si
    rows = d.block // max(1, n)
    output = 2 * d.block * si + d.block * s.compute_item + rows * k * si
    peak = factors + max(span, solved + output)
    if not on_accelerator:
        base = s.numel * s.in_item if s.in_item == s.compute_item else d.chunk * (s.in_item + s.compute_item)
        return Footprint(host=peak + base + d.chunk * s.out_item + FACTORED_RUNTIME_BYTES)
    chunk = s.chunk_numel
    host = s.host_in_flight + chunk * s.out_item + k * (n + out) * 4 + RUNTIME_BYTES
    return Footprint(host=host, device=peak + 2 * chunk * (s.compute_item + s.in_item) + chunk * s.out_item)


def memory_model(kind: str) -> Callable[[WorkShape, bool], Footprint]:
    """The registered model; WUDI's depends on its solver, taken from the task's parameters when
    the shape carries them (``params``), else the largest over the solvers."""

    def model(s: WorkShape, on_accelerator: bool) -> Footprint:
        params = getattr(s, "params", None) or {}
        k = f"wudi:{params['solver']}" if kind == "wudi" and "solver" in params else kind
        trim = float(params.get("trim", 1.0)) < 1
        eigh_item = 4 if params.get("eigh_precision") == "fp32" else None
        return gram_memory(k.replace("adaptive", "spectral"), s, on_accelerator, trim, eigh_item)

    return model


def gram_flops(shape: tuple[int, ...], n: int) -> int:
    """C_t and R's share (2·out·in² each) per expert, the eigen-decomposition (~10 in³) and the
    output pass's two products with the eigenvectors (4·out·in²). WUDI-Adam adds 2·out·in² a step."""
    rows, cols = (shape + (1, 1))[:2]
    return n * 4 * rows * cols * cols + 10 * cols**3 + 4 * rows * cols * cols


def regmean_flops(shape: tuple[int, ...], n: int) -> int:
    """B's share (2·out·in²) per expert, Cholesky (in³/3) and the two triangular solves (2·out·in²)."""
    rows, cols = (shape + (1, 1))[:2]
    return n * 2 * rows * cols * cols + cols**3 // 3 + 2 * rows * cols * cols


__all__ = ["RUNTIME_BYTES", "gram_flops", "gram_memory", "memory_model", "regmean_flops"]
