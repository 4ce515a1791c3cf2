"""Running one tensor task: read its own inputs, compute, write its bytes at the planned offset.

``run_task`` is the single function every executor calls (in-process threads, Ray CPU tasks, Ray
GPU actors). Tensors never travel back to the caller: only a small ``Receipt`` does.
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, overload

import torch

from raymerge.engine.errors import CheckpointError, OutputError, TaskError
from raymerge.engine.executor import task_device
from raymerge.engine.gather import VocabGather
from raymerge.engine.guard import disk_full
from raymerge.engine.lora import delta_rows, lora_factors
from raymerge.engine.methods import METHODS, MergeArgs, get_method
from raymerge.engine.methods.gram_lora import Factors
from raymerge.engine.methods.mergekit_order import mergekit_order
from raymerge.engine.methods.precision import prepare_device
from raymerge.engine.plan import TensorTask
from raymerge.engine.storage import DTYPES, ShardReader, TensorEntry, open_shard, row_span
from raymerge.engine.transfer import move_rows


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


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy."""
    flat = t.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data


def pwrite_all(path: str, data: memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (pwrite may write less than asked).

    The shard is opened without following a symlink: a link planted in staging is never written through.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise OutputError(f"cannot open staging shard: {exc.strerror}", file=path) from None
    done = 0
    try:
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
    except OSError as exc:
        full = disk_full(exc, Path(path), len(data) - done, Path(path).parent)
        if full is not None:
            raise full from None
        raise OutputError(
            f"write failed: {exc.strerror}", file=path, hint="fix the cause and run the same command again to resume"
        ) from None
    finally:
        os.close(fd)


class LazyTensors(Sequence[torch.Tensor]):
    """A sequence whose tensors are read when accessed (``_item``) and never cached."""

    def _item(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    @overload
    def __getitem__(self, i: int) -> torch.Tensor: ...
    @overload
    def __getitem__(self, i: slice) -> Sequence[torch.Tensor]: ...
    def __getitem__(self, i: int | slice) -> torch.Tensor | Sequence[torch.Tensor]:
        if isinstance(i, slice):
            return [self._item(j) for j in range(len(self))[i]]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        return self._item(i % len(self))

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self._item(i)


def moves_by_chunks(dev: torch.device) -> bool:
    """Whether whole-tensor inputs and results cross between host and ``dev`` in row chunks: on an
    accelerator, so the host holds one chunk at a time (on CPU the tensors are host memory anyway)."""
    return dev.type != "cpu"


def holds_inputs(task: TensorTask) -> bool:
    """Whether ``task``'s method re-reads its inputs and the plan left ``inputs_on_device`` on."""
    rereads = task.method in METHODS and METHODS[task.method].rereads_inputs
    return rereads and bool(task.shared.get("inputs_on_device", True))


def resident_inputs(task: TensorTask, dev: torch.device) -> bool:
    """Whether ``task`` holds its inputs in device memory (``holds_inputs``, on CUDA): there a
    second read from storage and a second host-to-device copy cost more than the device bytes."""
    return dev.type == "cuda" and holds_inputs(task)


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of ``x`` is finite, in one read-only pass in the common case.

    A sum is finite only if every term is (a NaN or an infinity makes any sum NaN or infinite),
    so a finite sum proves the tensor finite without the bool temporary and second pass of
    ``isfinite(x).all()``, which cost as much as the whole of task arithmetic's math; only a
    non-finite sum (a bad input, or finite values whose sum overflows) takes the exact check.
    """
    if not x.is_floating_point() or x.numel() == 0:
        return True
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


class ExpertStream(LazyTensors):
    """The experts of a task as a lazy sequence: each access reads that expert's rows afresh
    (zero-copy from the mapping, then cast to the compute dtype on the compute device), so a
    method that iterates holds one expert at a time and can iterate more than once."""

    def __init__(
        self, task: TensorTask, readers: list[ShardReader], first: int, dev: torch.device, resident: bool = False
    ) -> None:
        self.task = task
        self.readers = readers
        self.first = first
        self.dev = dev
        self.compute = DTYPES[task.compute_dtype][0]
        self.bytes_read = 0
        self.checked: set[tuple[int, int, int]] = set()
        self.vocab = VocabGather(task, readers, self.compute) if task.vocab_size else None
        # Inputs held on the accelerator in their stored dtype (``resident_inputs``): the base, and
        # the expert read last; a row chunk of either is then sliced and converted there.
        self.resident = resident and self.vocab is None and not task.lora and len(task.output.shape) == 2
        self.held: dict[int, torch.Tensor] = {}

    def load(self, i: int, r0: int | None = None, r1: int | None = None, *, chunk: bool = False) -> torch.Tensor:
        """Input ``i`` of the task (0 = base when the task has one), rows [r0, r1) if given.

        ``chunk``: a row chunk of a chunked method, checked by ``all_finite`` (no temporaries);
        whole-tensor reads keep ``isfinite(x).all()``, whose temporaries the memory models of the
        whole-tensor methods declare (they are small beside those methods' own work)."""
        ref = self.task.inputs[i]
        r0 = self.task.row_start if r0 is None else r0
        r1 = self.task.row_end if r1 is None else r1
        entry = ref.entry(self.task.tensor)
        if chunk and self.resident:
            return self._held_rows(i, entry, r0, r1)
        if self.vocab is not None:  # re-indexed rows, gathered on the host
            before = self.vocab.bytes_read
            x = self.vocab.rows(i, r0, r1).to(self.dev)
            self.bytes_read += self.vocab.bytes_read - before
        elif moves_by_chunks(self.dev) and entry.shape and r1 - r0 > self.task.chunk_rows > 0:
            x = self._to_device_by_chunks(i, entry, r0, r1)
        else:
            view = self.readers[i].read_rows(entry, r0, r1)
            self.bytes_read += view.numel() * view.element_size()
            x = view.to(device=self.dev, dtype=self.compute)
            if x.data_ptr() != view.data_ptr():
                # x is a converted copy: hand the mapped pages back now rather than at task end, so a
                # task's resident set is one chunk per input, not the whole tensor of every input.
                self.readers[i].release(*row_span(entry, r0, r1))
        if self.task.lora and (lora := self.task.lora[i]) is not None:  # base + scale·B·A, these rows only
            x = x + delta_rows(lora, self.task.tensor, r0, r1, self.compute).to(x.device)
        key = (i, r0, r1)
        if key not in self.checked and not (all_finite(x) if chunk else bool(torch.isfinite(x).all())):
            raise self._not_finite(i)
        self.checked.add(key)  # multi-pass methods re-read chunks; check each once
        return x

    def lora_factors(self, t: int) -> Factors | None:
        """Expert t's task vector as factors (scale·B·A) when it is exactly the base plus a LoRA
        adapter stored out × in, else None (``methods.gram_lora`` solves in their span)."""
        task, i = self.task, self.first + t
        if self.first != 1 or not task.lora or task.lora[0] is not None or self.vocab is not None:
            return None
        ref = task.lora[i]
        if ref is None or ref.transposed or task.inputs[i] != task.inputs[0] or len(task.output.shape) != 2:
            return None
        return lora_factors(ref, task.tensor, task.row_start, task.row_end, self.compute, self.dev)

    def _held_rows(self, i: int, entry: TensorEntry, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of input ``i`` in the compute dtype, from its copy in device memory (made on
        first use, replacing the expert held before; the base stays), checked for NaN/Inf once."""
        held = self.held.get(i)
        if held is None:
            if i >= self.first:  # one expert at a time: the Gram methods finish one before the next
                for k in [k for k in self.held if k >= self.first]:
                    del self.held[k]
            held = self._to_device_by_chunks(i, entry, self.task.row_start, self.task.row_end, entry.torch_dtype)
            if not all_finite(held):
                raise self._not_finite(i)
            self.held[i] = held
        a = r0 - self.task.row_start
        return held[a : a + (r1 - r0)].to(self.compute, copy=True)

    def _to_device_by_chunks(
        self, i: int, entry: TensorEntry, r0: int, r1: int, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Rows [r0, r1) of input ``i`` on the device in ``dtype`` (the compute dtype by default)."""
        out = move_rows(self.readers[i], entry, r0, r1, dtype or self.compute, self.dev, self.task.chunk_rows)
        self.bytes_read += (r1 - r0) * entry.row_bytes()
        return out

    def _not_finite(self, i: int) -> CheckpointError:
        return CheckpointError(
            "input contains NaN or Inf",
            file=self.task.inputs[i].url,
            tensor=self.task.tensor,
            hint="fix the checkpoint, or exclude this tensor from the merge",
        )

    def __len__(self) -> int:
        return len(self.readers) - self.first

    def _item(self, i: int) -> torch.Tensor:
        return self.load(self.first + i)


class Transposed(LazyTensors):
    """Another lazy sequence of 2-D tensors, each handed out transposed (a view, no copy)."""

    def __init__(self, inner: Sequence[torch.Tensor]) -> None:
        self.inner = inner

    def __len__(self) -> int:
        return len(self.inner)

    def _item(self, i: int) -> torch.Tensor:
        return self.inner[i].T


class AuxStream(LazyTensors):
    """A task's per-expert auxiliary matrices, read on demand in the compute dtype and device (on an
    accelerator in row chunks, like the inputs)."""

    def __init__(self, task: TensorTask, dev: torch.device) -> None:
        self.task = task
        self.dev = dev

    def __len__(self) -> int:
        return len(self.task.aux)

    def _item(self, i: int) -> torch.Tensor:
        ref, name = self.task.aux[i], self.task.aux_names[i]
        reader = open_shard(ref.url)
        entry, dtype = ref.entry(name), DTYPES[self.task.compute_dtype][0]
        if moves_by_chunks(self.dev) and entry.shape and entry.shape[0] > self.task.chunk_rows > 0:
            x = move_rows(reader, entry, 0, entry.shape[0], dtype, self.dev, self.task.chunk_rows)
        else:
            x = reader.read_rows(entry).to(device=self.dev, dtype=dtype)
        if not bool(torch.isfinite(x).all()):  # Gram memory models declare its mask
            raise CheckpointError("statistics contain NaN or Inf", file=ref.url, tensor=name)
        return x


class TaskChunks:
    """A ``chunks.ChunkSource`` over a task's rows, ``chunk_rows`` at a time, read on demand.

    Chunks are 2-D views (rows × the rest), so chunked methods see every tensor as a matrix.
    """

    def __init__(self, stream: ExpertStream, task: TensorTask) -> None:
        self.stream = stream
        self.scalar = not task.output.shape
        start, end = (0, 1) if self.scalar else (task.row_start, task.row_end)
        step = max(1, task.chunk_rows)
        self.ranges = [(r, min(end, r + step)) for r in range(start, end, step)] or [(start, end)]
        self.n_experts = len(stream)
        self.vector = len(task.output.shape) <= 1
        self.shape = tuple(task.output.shape)
        self.has_base = stream.first == 1
        row_numel = 1
        for d in task.output.shape[1:]:
            row_numel *= d
        self.numel = 1 if self.scalar else (task.row_end - task.row_start) * row_numel
        self._group: list[TaskChunks] | None = None

    @property
    def stats_sources(self) -> Sequence[TaskChunks]:
        """This tensor, then each other stored tensor of its fused group (``task.group``), whole,
        read through the same models on demand (opened on first use)."""
        if self._group is None:
            task, stream = self.stream.task, self.stream
            self._group = []
            for name, refs in task.group:
                shape = refs[0].shape
                rows = shape[0] if shape else 1
                sib = replace(
                    task,
                    tensor=name,
                    inputs=refs,
                    row_start=0,
                    row_end=rows,
                    group=(),
                    output=replace(task.output, shape=shape),
                )
                readers = [open_shard(r.url) for r in refs]
                self._group.append(TaskChunks(ExpertStream(sib, readers, stream.first, stream.dev), sib))
        return [self, *self._group]

    def _rows(self, i: int, r0: int, r1: int) -> torch.Tensor:
        if self.scalar:
            return self.stream.load(i, chunk=True).reshape(1, 1)
        x = self.stream.load(i, r0, r1, chunk=True)
        return x.reshape(r1 - r0, -1)

    def lora_factors(self, t: int) -> Factors | None:
        """Expert t's task vector as factors (``ExpertStream.lora_factors``)."""
        return None if self.scalar else self.stream.lora_factors(t)

    def base(self, r0: int, r1: int) -> torch.Tensor:
        if not self.has_base:  # base-free methods check ``has_base`` first; input 0 is an expert here
            raise TaskError("the method read a base model this merge does not have", tensor=self.stream.task.tensor)
        return self._rows(0, r0, r1)

    def expert(self, t: int, r0: int, r1: int) -> torch.Tensor:
        return self._rows(self.stream.first + t, r0, r1)


def _write_pieces(
    pieces: Iterable[torch.Tensor], out_dtype: torch.dtype, path: str, offset: int, task: TensorTask
) -> tuple[int, int]:
    """Write consecutive row pieces of a result (on any device) through host buffers of one piece;
    returns (CRC32 of all the bytes, bytes written), the same CRC as one whole write."""
    crc, written = 0, 0
    for piece in pieces:
        data = tensor_bytes(piece.to(dtype=out_dtype).cpu().contiguous())
        crc = zlib.crc32(data, crc)
        pwrite_all(path, data, offset + written)
        written += len(data)
    if written != task.output.nbytes:
        raise TaskError(f"produced {written} bytes, plan expects {task.output.nbytes}", tensor=task.tensor)
    return crc, written


def fused_call(fn: Any, task: TensorTask, stream: ExpertStream, args: MergeArgs) -> torch.Tensor:
    """mergekit's arithmetic on the task's tensor, or, for a tensor of a fused group (a MoE's
    experts), on the group fused as mergekit holds it (members stacked in order), keeping this
    tensor's rows of the result."""

    def inputs(i: int) -> torch.Tensor:
        own = stream.load(i)
        if not task.group:
            return own
        parts = []
        for name, refs in task.group:
            ref = refs[i]
            x = open_shard(ref.url).read_rows(ref.entry(name)).to(device=stream.dev, dtype=stream.compute)
            parts.append(x.reshape(-1, *own.shape[1:]))
        parts.insert(task.group_at, own)
        return torch.cat(parts)

    base = inputs(0) if task.has_base else None
    merged = fn(base, [inputs(stream.first + i) for i in range(len(stream))], args)
    if not task.group:
        return merged  # type: ignore[no-any-return]
    start = sum(refs[0].shape[0] for _, refs in task.group[: task.group_at])
    return merged[start : start + (task.row_end - task.row_start)]  # type: ignore[no-any-return]


def run_task(task: TensorTask, staging_dir: str, device: str = "cpu") -> Receipt:
    """Execute ``task`` and write its output bytes into ``staging_dir/<shard>`` at its offset."""
    if task.action == "partial" or task.partials:  # a map or the reduce of a map-reduce over experts
        from raymerge.engine.reduce import run_map_or_reduce

        return run_map_or_reduce(task, staging_dir, device, _write_pieces)  # type: ignore[no-any-return]
    t0 = time.perf_counter()
    dev = task_device(task, device)
    prepare_device(dev)
    readers = [open_shard(r.url) for r in task.inputs]
    entries = [r.entry(task.tensor) for r in task.inputs]
    try:
        path = os.path.join(staging_dir, task.output.shard)
        out_dtype = DTYPES[task.output.dtype][0]
        if task.output.nbytes == 0:  # a tensor with a 0-sized dimension: nothing to read, merge or write
            return Receipt(task.id, task.tensor, 0, 0, 0, time.perf_counter() - t0, str(dev))
        method = get_method(task.method) if task.action == "merge" else None
        # A method that reads weights as out × in gets a Conv1D weight (in × out) transposed, whole.
        turned = method is not None and method.oriented and task.layout == "in_out"  # set on linear weights only
        if method is not None and task.order == "mergekit":
            stream = ExpertStream(task, readers, 1 if task.has_base else 0, dev)
            fn = mergekit_order(task.method, task.shared, task.per_model)
            if fn is None:
                raise TaskError(f"method {task.method!r} has no mergekit arithmetic here", tensor=task.tensor)
            args = MergeArgs(task.shared, task.per_model, None, task.tensor, task.seed, AuxStream(task, dev))
            merged = fused_call(fn, task, stream, args)
            crc, written = _write_pieces([merged], out_dtype, path, task.output.offset, task)
            return Receipt(task.id, task.tensor, crc, written, stream.bytes_read, time.perf_counter() - t0, str(dev))
        if method is not None and method.chunked is not None and not turned:
            stream = ExpertStream(task, readers, 1 if task.has_base else 0, dev, resident_inputs(task, dev))
            args = MergeArgs(task.shared, task.per_model, None, task.tensor, task.seed, AuxStream(task, dev))
            pieces = method.chunked(TaskChunks(stream, task), args)
            crc, written = _write_pieces(pieces, out_dtype, path, task.output.offset, task)
            return Receipt(task.id, task.tensor, crc, written, stream.bytes_read, time.perf_counter() - t0, str(dev))
        if task.action == "copy":
            out = readers[0].read_rows(entries[0], task.row_start, task.row_end)
            read_bytes = out.numel() * out.element_size()
        else:
            assert method is not None
            stream = ExpertStream(task, readers, 1 if task.has_base else 0, dev)
            base = stream.load(0) if task.has_base else None
            gen = torch.Generator().manual_seed(task.seed) if method.random else None
            args = MergeArgs(task.shared, task.per_model, gen, task.tensor, task.seed, AuxStream(task, dev))
            try:
                if turned:
                    merged = method.fn(base.T if base is not None else None, Transposed(stream), args).T
                else:
                    merged = method.fn(base, stream, args)
            except torch.OutOfMemoryError as exc:
                raise TaskError(f"out of memory on {dev}: {exc}", tensor=task.tensor) from None
            del base
            if moves_by_chunks(dev) and merged.dim() >= 1 and merged.shape[0] > task.chunk_rows > 0:
                # One chunk at a time through the host: its share of the task stays O(chunk).
                step = task.chunk_rows
                rows = (merged[a : a + step] for a in range(0, merged.shape[0], step))
                crc, written = _write_pieces(rows, out_dtype, path, task.output.offset, task)
                return Receipt(
                    task.id, task.tensor, crc, written, stream.bytes_read, time.perf_counter() - t0, str(dev)
                )
            out = merged.to(dtype=out_dtype).cpu().contiguous()
            read_bytes = stream.bytes_read
        data = tensor_bytes(out)
        if len(data) != task.output.nbytes:
            raise TaskError(f"produced {len(data)} bytes, plan expects {task.output.nbytes}", tensor=task.tensor)
        crc = zlib.crc32(data)
        pwrite_all(path, data, task.output.offset)
        del out, data
    finally:
        for rd, e in zip(readers, entries, strict=True):
            rd.release(*row_span(e, task.row_start, task.row_end))
    return Receipt(task.id, task.tensor, crc, task.output.nbytes, read_bytes, time.perf_counter() - t0, str(dev))
