"""Map-reduce of a task's statistics over its experts, for clusters where no node reads them all.

The statistics of some methods are sums over experts: ACTMat's S = Σ C_t and R = Σ Δ_t C_t,
WUDI's weighted S, R and ΣΔ_t (each w_t = 1/‖Δ_t‖² is known from Δ_t alone), and the plain mean
(the Gram methods' fallback for norms and embeddings) Σ x_t. Such a task can be cut in two:

* **map** tasks (``action: partial``), one per group of experts that a node can read: the base and
  those experts in, their statistics accumulated exactly as the whole task would, written in the
  statistics dtype to one safetensors file (``task.partials[0]``, on storage every node sees);
* the **reduce** task: the original task with ``partials`` set and its base as its only input. It
  adds the files in order, then runs the method's own solve and writes its output rows as usual.

With the experts of each file consecutive, the sums are the single-node merge's own additions,
so the output is bit-identical; otherwise the fp64 additions are reassociated (≤ 1e-12 relative
on the statistics). ``plan_map_reduce`` does the cutting; executors decide when (``cluster``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from raymerge.engine.errors import TaskError
from raymerge.engine.executor import task_device
from raymerge.engine.methods import MergeArgs, get_method
from raymerge.engine.methods.gram import STATS_OF, method_stats
from raymerge.engine.methods.gram_stream import BlockReader, GramStats, row_blocks
from raymerge.engine.methods.precision import prepare_device, stats_dtype
from raymerge.engine.plan import TensorTask
from raymerge.engine.storage import DTYPES, open_shard, row_span

PARTIALS_DIR = os.path.join(".raymerge", "partials")

# Methods whose statistics are sums over experts: the Gram methods (accumulated as they do it
# themselves, ``gram.method_stats``) and the mean (Σ x_t).
REDUCIBLE = frozenset({*STATS_OF, "mean"})


def reducible(task: TensorTask) -> bool:
    """Whether ``task`` can be cut into per-expert-group maps and a reduce."""
    return (
        task.action == "merge"
        and task.method in REDUCIBLE
        and task.has_base
        and len(task.inputs) > 2
        and not task.order
        and not task.group
        and not task.vocab_size
        and not task.aux
        and not task.lora  # adapters are merged in their factors' span, on one node
        and task.layout == "out_in"
        and not task.partials
        and (task.method == "mean" or task.row_start == 0)
    )


def partial_dir(staging_dir: str, task: TensorTask) -> str:
    """The directory of ``task``'s partial files under the staging area."""
    return os.path.join(staging_dir, PARTIALS_DIR, hashlib.sha1(task.id.encode()).hexdigest()[:16])


def discard_partials(task: TensorTask) -> None:
    """Delete a reduce task's partial files (and their directory once empty)."""
    for path in task.partials:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if task.partials:
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(task.partials[0]))


def plan_map_reduce(
    task: TensorTask, groups: Sequence[Sequence[int]], staging_dir: str
) -> tuple[list[TensorTask], TensorTask]:
    """``task`` cut into one map task per group of expert indices (each in order, the groups
    covering every expert once) and the reduce task that adds their files in group order."""
    first = 1  # reducible tasks have a base
    n = len(task.inputs) - first
    if sorted(i for g in groups for i in g) != list(range(n)) or any(not g for g in groups):
        raise ValueError(f"expert groups {groups} do not cover experts 0..{n - 1} exactly once")
    where = partial_dir(staging_dir, task)
    maps: list[TensorTask] = []
    for k, group in enumerate(groups):
        pick = [0, *(first + i for i in group)]
        maps.append(
            replace(
                task,
                id=f"{task.id}@map{k}",
                action="partial",
                inputs=tuple(task.inputs[i] for i in pick),
                per_model=tuple(task.per_model[i] for i in group),
                partials=(os.path.join(where, f"{k}.safetensors"),),
                write_bytes=0,
                read_bytes=task.read_bytes * len(pick) // len(task.inputs),
            )
        )
    extra = _partial_bytes(task)
    reduce = replace(
        task,
        inputs=task.inputs[:1],
        per_model=(),
        partials=tuple(m.partials[0] for m in maps),
        read_bytes=task.read_bytes // len(task.inputs),
        est_host_bytes=task.est_host_bytes + extra,
        est_device_bytes=task.est_device_bytes + extra if task.est_device_bytes else 0,
    )
    return maps, reduce


def _partial_bytes(task: TensorTask) -> int:
    """Bytes of one partial file, which the reduce holds beside its accumulators while adding it."""
    shape = task.output.shape
    rows = task.row_end - task.row_start
    cols = 1
    for d in shape[1:]:
        cols *= d
    if task.method == "mean":
        return rows * cols * 8
    return 8 * (cols * cols + rows * cols * (2 if STATS_OF[task.method][1] else 1))


def run_map_or_reduce(task: TensorTask, staging_dir: str, device: str, write: Callable[..., Any]) -> Any:
    """Run a map task (write its partial file; an empty receipt) or a reduce task (its output)."""
    from raymerge.engine.task import ExpertStream, Receipt, TaskChunks, resident_inputs  # task.py dispatches here

    t0 = time.perf_counter()
    dev = task_device(task, device)
    prepare_device(dev)
    readers = [open_shard(r.url) for r in task.inputs]
    stream = ExpertStream(task, readers, 1, dev, resident_inputs(task, dev))
    src = TaskChunks(stream, task)
    args = MergeArgs(task.shared, task.per_model, None, task.tensor, task.seed, ())
    precision = str(task.shared.get("precision", "auto"))
    try:
        if task.action == "partial":
            _save_atomic(_map_stats(task, src, precision), task.partials[0])
            return Receipt(task.id, task.tensor, 0, 0, stream.bytes_read, time.perf_counter() - t0, str(dev))
        path = os.path.join(staging_dir, task.output.shard)
        if task.method == "mean":
            pieces: Any = [_mean_of_partials(task, dev, stream.compute)]
        else:
            src.partial_stats = functools.partial(_gram_of_partials, task, dev)  # type: ignore[attr-defined]
            method = get_method(task.method)
            assert method.chunked is not None
            pieces = method.chunked(src, args)
        crc, written = write(pieces, DTYPES[task.output.dtype][0], path, task.output.offset, task)
        discard_partials(task)  # the output is written: the statistics are not needed again
    finally:
        for rd, ref in zip(readers, task.inputs, strict=True):
            rd.release(*row_span(ref.entry(task.tensor), task.row_start, task.row_end))
    return Receipt(task.id, task.tensor, crc, written, stream.bytes_read, time.perf_counter() - t0, str(dev))


def _map_stats(task: TensorTask, src: Any, precision: str) -> dict[str, torch.Tensor]:
    """The statistics of the map task's experts, as the whole task would accumulate them."""
    if task.method == "mean":  # Σ x_t in the compute dtype, as ``methods.mean`` adds them
        total: torch.Tensor | None = None
        for t in range(src.n_experts):
            x = src.stream.load(src.stream.first + t)
            total = x.clone() if total is None else total.add_(x)
            del x
        assert total is not None
        return {"sum": total, "count": torch.tensor([src.n_experts])}
    blocks = row_blocks(src.ranges) if src.ranges else [[(0, 0)]]
    st = method_stats(task.method, src, BlockReader(blocks, precision), blocks, task.shared)
    out = {"S": st.S, "R": st.R, "count": torch.tensor([st.count]), "origin": torch.tensor([st.origin])}
    if st.delta_sum is not None:
        out["delta_sum"] = st.delta_sum
    return out


def _save_atomic(tensors: dict[str, torch.Tensor], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def _load(task: TensorTask, path: str, dev: torch.device) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device=str(dev))
    except (OSError, RuntimeError, ValueError) as exc:
        raise TaskError(
            f"cannot read the partial statistics {path}: {exc}",
            tensor=task.tensor,
            hint="run the same command again: the statistics are recomputed",
        ) from None


def _gram_of_partials(task: TensorTask, dev: torch.device, precision: str) -> GramStats:
    """The Gram statistics of every expert: the map files added in order, in the statistics dtype."""
    dtype = stats_dtype(precision, dev)
    acc: dict[str, torch.Tensor] = {}
    count, origin = 0, task.row_start
    for path in task.partials:
        part = _load(task, path, dev)
        count += int(part.pop("count"))
        origin = int(part.pop("origin"))
        for k, v in part.items():
            if k in acc:
                acc[k].add_(v.to(dtype))
            else:
                acc[k] = v.to(dtype, copy=True)
        del part
    return GramStats(acc["S"], acc["R"], acc.get("delta_sum"), count, [], origin)


def _mean_of_partials(task: TensorTask, dev: torch.device, compute: torch.dtype) -> torch.Tensor:
    total: torch.Tensor | None = None
    count = 0
    for path in task.partials:
        part = _load(task, path, dev)
        count += int(part["count"])
        x = part["sum"].to(compute)
        total = x.clone() if total is None else total.add_(x)
        del part, x
    assert total is not None and count > 0
    return total.div_(count)


__all__ = [
    "REDUCIBLE",
    "discard_partials",
    "PARTIALS_DIR",
    "partial_dir",
    "plan_map_reduce",
    "reducible",
    "run_map_or_reduce",
]
