"""Moving stored rows from a checkpoint onto an accelerator: bounded host memory, reads overlapped
with the copies.

``move_rows`` hands a range of a stored tensor's rows to the device ``step`` rows at a time, so the
host never holds more than a chunk or two of it. On CUDA the chunks go through two pinned
(page-locked) host buffers: while the copy engine moves chunk k from one buffer, the CPU reads
chunk k + 1 from the memory map (or the range read) into the other, so reading and the transfer
overlap instead of alternating, and the transfer itself runs at pinned speed (a pageable copy
stages through a driver buffer and blocks the thread). Chunks cross in their stored dtype (half
the bytes of an fp32 copy for bf16 checkpoints) and are converted on the device.

Host memory of one move: the chunk being read (its mapped pages, released after the copy) and the
two pinned chunks; device memory: the result and, when the dtype changes, two stored-dtype chunks.
"""

from __future__ import annotations

import math

import torch

from raymerge.engine.storage import ShardReader, TensorEntry, row_span


def move_rows(
    reader: ShardReader, entry: TensorEntry, r0: int, r1: int, dtype: torch.dtype, dev: torch.device, step: int
) -> torch.Tensor:
    """Rows [r0, r1) of a stored tensor on ``dev`` in ``dtype``, moved ``step`` rows at a time, so the
    host holds one chunk (and its mapped pages) at a time, never the whole tensor."""
    step = max(1, step)
    out = torch.empty((r1 - r0, *entry.shape[1:]), dtype=dtype, device=dev)
    if dev.type == "cuda" and r1 > r0:
        _pinned_copy(reader, entry, r0, r1, out, step)
        return out
    for a in range(r0, r1, step):
        b = min(r1, a + step)
        view = reader.read_rows(entry, a, b)
        out[a - r0 : b - r0].copy_(view)
        del view
        reader.release(*row_span(entry, a, b))
    return out


def _pinned_copy(reader: ShardReader, entry: TensorEntry, r0: int, r1: int, out: torch.Tensor, step: int) -> None:
    """Fill ``out`` (on a CUDA device) with rows [r0, r1) through two pinned host buffers of ``step``
    rows, copies on a side stream; the caller's stream waits for them, and so does this thread
    before the buffers go back to torch's pinned-memory cache."""
    dev = out.device
    stored = entry.torch_dtype
    rows = min(step, r1 - r0)
    row_numel = math.prod(entry.shape[1:])
    host = [torch.empty(rows * row_numel, dtype=stored, pin_memory=True) for _ in range(2)]
    # A chunk converts on the device from a stored-dtype copy there (none when the dtypes agree).
    landing = (
        [torch.empty(rows * row_numel, dtype=stored, device=dev) for _ in range(2)] if stored != out.dtype else None
    )
    copier = torch.cuda.Stream(dev)
    copier.wait_stream(torch.cuda.current_stream(dev))  # ``out`` was allocated on the caller's stream
    done: list[torch.cuda.Event | None] = [None, None]
    for k, a in enumerate(range(r0, r1, step)):
        b = min(r1, a + step)
        slot = k % 2
        if (ev := done[slot]) is not None:
            ev.synchronize()  # the copy that last used this buffer has finished with it
        view = reader.read_rows(entry, a, b)
        staged = host[slot][: view.numel()].view(view.shape)
        staged.copy_(view)  # the read: page cache (or fetched bytes) into pinned memory
        del view
        reader.release(*row_span(entry, a, b))
        dst = out[a - r0 : b - r0]
        with torch.cuda.stream(copier):
            if landing is None:
                dst.copy_(staged, non_blocking=True)
            else:
                land = landing[slot][: staged.numel()].view(staged.shape)
                land.copy_(staged, non_blocking=True)
                dst.copy_(land)
            ev = torch.cuda.Event()
            ev.record(copier)
        done[slot] = ev
    torch.cuda.current_stream(dev).wait_stream(copier)
    copier.synchronize()
    if landing is not None:  # allocated on the caller's stream and used on the copier's: now done
        del landing


__all__ = ["move_rows"]
