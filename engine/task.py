"""Running one tensor task: read its own inputs, compute, write its bytes at the planned offset.

``run_task`` is the single function every executor calls (in-process threads, Ray CPU tasks, Ray
GPU actors). Tensors never travel back to the caller: only a small ``Receipt`` does.
"""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import torch

from raymerge.engine.errors import CheckpointError, OutputError, TaskError
from raymerge.engine.methods import MergeArgs, get_method
from raymerge.engine.plan import TensorTask
from raymerge.engine.storage import DTYPES, open_shard, row_span


@dataclass(frozen=True)
class Receipt:
    """What a finished task reports: identity, CRC32 of the bytes written, and figures."""

    id: str
    tensor: str
    crc32: int
    nbytes: int
    read_bytes: int
    seconds: float
    device: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def pwrite_all(path: str, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (pwrite may write less than asked)."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        raise OutputError(f"cannot open staging shard: {exc.strerror}", file=path) from None
    try:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    except OSError as exc:
        raise OutputError(
            f"write failed: {exc.strerror}", file=path, hint="free space and run again to resume"
        ) from None
    finally:
        os.close(fd)


def _check_finite(x: torch.Tensor, task: TensorTask, i: int) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise CheckpointError(
            "input contains NaN or Inf", file=task.inputs[i].url, tensor=task.tensor,
            hint="fix the checkpoint, or exclude this tensor from the merge",
        )  # fmt: skip


def run_task(task: TensorTask, staging_dir: str, device: str = "cpu") -> Receipt:
    """Execute ``task`` and write its output bytes into ``staging_dir/<shard>`` at its offset."""
    t0 = time.perf_counter()
    dev = resolve_device(device)
    readers = [open_shard(r.url) for r in task.inputs]
    entries = [r.entry(task.tensor) for r in task.inputs]
    try:
        views = [rd.read_rows(e, task.row_start, task.row_end) for rd, e in zip(readers, entries, strict=True)]
        read_bytes = sum(v.numel() * v.element_size() for v in views)
        if task.action == "copy":
            out = views[0]
        else:
            compute = DTYPES[task.compute_dtype][0]
            xs = [v.to(device=dev, dtype=compute) for v in views]
            for i, x in enumerate(xs):
                _check_finite(x, task, i)
            method = get_method(task.method)
            gen = torch.Generator().manual_seed(task.seed) if method.random else None
            args = MergeArgs(task.shared, task.per_model, gen, task.tensor)
            base = xs[0] if task.has_base else None
            experts = xs[1:] if task.has_base else xs
            try:
                merged = method.fn(base, experts, args)
            except torch.OutOfMemoryError as exc:
                raise TaskError(f"out of memory on {dev}: {exc}", tensor=task.tensor) from None
            del xs, base, experts
            out = merged.to(dtype=DTYPES[task.output.dtype][0]).cpu()
        data = tensor_bytes(out)
        if len(data) != task.output.nbytes:
            raise TaskError(f"produced {len(data)} bytes, plan expects {task.output.nbytes}", tensor=task.tensor)
        crc = zlib.crc32(data)
        pwrite_all(os.path.join(staging_dir, task.output.shard), data, task.output.offset)
        del out, data, views
    finally:
        for rd, e in zip(readers, entries, strict=True):
            rd.release(*row_span(e, task.row_start, task.row_end))
    return Receipt(task.id, task.tensor, crc, task.output.nbytes, read_bytes, time.perf_counter() - t0, str(dev))
