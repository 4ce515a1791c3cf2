"""The plan's data types: flat, serialisable task specs and the fixed output layout.

A ``TensorTask`` carries everything a worker needs (input byte ranges, method and resolved
parameters, output offset, declared estimates) and nothing else, so any executor on any node
can run it; ``MergePlan`` is the list of tasks plus the pre-sized output shards.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from raymerge.engine.lora import LoraRef
from raymerge.engine.recipe import Recipe
from raymerge.engine.storage import TensorEntry
from raymerge.engine.urls import redact

DEFAULT_SHARD_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class TensorRef:
    """Where one input tensor's bytes live: shard URL, absolute byte range, dtype tag, shape."""

    url: str
    start: int
    end: int
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, url: str, e: TensorEntry) -> TensorRef:
        return cls(url, e.start, e.end, e.dtype, e.shape)

    def entry(self, name: str) -> TensorEntry:
        return TensorEntry(name, self.dtype, self.shape, self.start, self.end)


@dataclass(frozen=True)
class OutputRef:
    """Where a task writes: output shard file name, absolute offset of its first byte, dtype, shape."""

    shard: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class TensorTask:
    """One self-contained unit of work: merge rows [row_start, row_end) of one tensor.

    ``action`` is ``merge`` (run ``method``), ``copy`` (take the base model's bytes, for
    non-float buffers) or ``partial`` (statistics of some experts only, see ``engine.reduce``).
    ``est_host_bytes`` and ``est_device_bytes`` are the declared peak host and accelerator memory, which executors use for admission; ``read_bytes``/``write_bytes`` are
    exact I/O volumes.
    """

    id: str
    tensor: str
    tensor_class: str
    action: str
    method: str
    row_start: int
    row_end: int
    inputs: tuple[TensorRef, ...]  # base first when the method has one, then experts
    has_base: bool
    shared: dict[str, Any] = field(hash=False)
    per_model: tuple[dict[str, Any], ...] = field(hash=False)
    seed: int
    compute_dtype: str
    output: OutputRef
    chunk_rows: int
    est_host_bytes: int
    read_bytes: int
    write_bytes: int
    flops: int
    # Per-expert auxiliary matrices (e.g. RegMean's input Grams): where they are and their names.
    aux: tuple[TensorRef, ...] = ()
    aux_names: tuple[str, ...] = ()
    # How a linear weight is stored: "out_in" (nn.Linear) or "in_out" (GPT-2's Conv1D).
    layout: str = "out_in"
    # Declared peak accelerator memory, where the plan places the task on one (else 0).
    est_device_bytes: int = 0
    # The other stored tensors of the tensor mergekit fuses (a MoE's experts, ``arch.fused_groups``):
    # (name, its inputs in the order of ``inputs``); read only for the tensor-wide statistics.
    group: tuple[tuple[str, tuple[TensorRef, ...]], ...] = ()
    # Where this tensor sits among its group's members (``order: mergekit`` fuses them in order).
    group_at: int = 0
    # "mergekit": run mergekit's arithmetic on the whole tensor (``methods.mergekit_order``).
    order: str = ""
    # Re-indexed vocabulary (``tokenizer_source``): the output has ``vocab_size`` token rows (then
    # padding rows). ``vocab_rows[i]``: input i's row of each output row from ``row_start`` (from 0
    # when the task reaches the padding rows, whose value is the mean of the token rows), or -k-1
    # for default row k, the mean of the rows ``vocab_defaults[k]`` lists as (index into
    # ``vocab_refs``, row); an empty default is zeros.
    vocab_size: int = 0
    vocab_rows: tuple[tuple[int, ...], ...] = ()
    vocab_defaults: tuple[tuple[tuple[int, int], ...], ...] = ()
    vocab_refs: tuple[TensorRef, ...] = ()
    # Per input, the LoRA update added to its rows (``base+adapter`` inputs), or None; () if none has one.
    lora: tuple[LoraRef | None, ...] = ()
    # Map-reduce over experts (``engine.reduce``): for ``action: partial``, the one file this task's
    # partial statistics go to; for a merge, the partial files to add up instead of reading experts.
    partials: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TensorTask:
        d = dict(d)
        d["inputs"] = tuple(TensorRef(**{**r, "shape": tuple(r["shape"])}) for r in d["inputs"])
        d["per_model"] = tuple(d["per_model"])
        d["aux"] = tuple(TensorRef(**{**r, "shape": tuple(r["shape"])}) for r in d.get("aux", ()))
        d["aux_names"] = tuple(d.get("aux_names", ()))
        d["group"] = tuple(
            (g[0], tuple(TensorRef(**{**r, "shape": tuple(r["shape"])}) for r in g[1])) for g in d.get("group", ())
        )
        d["vocab_rows"] = tuple(tuple(r) for r in d.get("vocab_rows", ()))
        d["vocab_defaults"] = tuple(tuple(tuple(p) for p in x) for x in d.get("vocab_defaults", ()))
        d["vocab_refs"] = tuple(TensorRef(**{**r, "shape": tuple(r["shape"])}) for r in d.get("vocab_refs", ()))
        d["lora"] = tuple(None if x is None else LoraRef.from_json(x) for x in d.get("lora", ()))
        d["partials"] = tuple(d.get("partials", ()))
        o = d["output"]
        d["output"] = OutputRef(**{**o, "shape": tuple(o["shape"])})
        return cls(**d)


_ESTIMATES = frozenset({"est_host_bytes", "est_device_bytes", "flops"})


@dataclass(frozen=True)
class OutputShard:
    """A pre-sized output file: its name, full size, the header bytes, and the tensors in it."""

    name: str
    size: int
    header: bytes
    tensors: tuple[str, ...]


@dataclass(frozen=True)
class MergePlan:
    recipe: Recipe
    models: tuple[str, ...]
    tasks: tuple[TensorTask, ...]
    shards: tuple[OutputShard, ...]
    config: dict[str, Any]
    out_dtype: str | None
    tokenizer_from: str | None
    # Where the plan placed accelerator work (``cpu`` or ``cuda``) and the device memory it assumed.
    device: str = "cpu"
    device_memory: int | None = None
    # The recipe's chat template, resolved (``chat_template.resolve``), for the output's tokenizer files.
    chat_template: str | None = None
    # The output tokenizer's files (name → bytes) where the recipe builds one (``tokenizer_source``);
    # then ``tokenizer_from`` is None.
    tokenizer_files: dict[str, bytes] = field(default_factory=dict, hash=False)

    @property
    def read_bytes(self) -> int:
        return sum(t.read_bytes for t in self.tasks)

    @property
    def write_bytes(self) -> int:
        return sum(t.write_bytes for t in self.tasks)

    @property
    def peak_task_bytes(self) -> int:
        return max((t.est_host_bytes for t in self.tasks), default=0)

    @property
    def peak_task_device_bytes(self) -> int:
        return max((t.est_device_bytes for t in self.tasks), default=0)

    def fingerprint(self) -> str:
        """A hash of everything that determines the output bytes (for safe resume).

        Estimates are left out: they depend on where the run computes, not on what it writes, so
        a merge interrupted on one device resumes on another.
        """
        h = hashlib.sha256()
        for s in self.shards:
            h.update(s.name.encode())
            h.update(s.header)
        for t in self.tasks:
            d = {k: v for k, v in t.to_json().items() if k not in _ESTIMATES}
            h.update(json.dumps(d, sort_keys=True, default=str).encode())
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        """Machine-readable summary printed by ``raymerge plan --json``."""
        by_class: dict[str, int] = {}
        for t in self.tasks:
            by_class[t.tensor_class] = by_class.get(t.tensor_class, 0) + 1
        return {
            "method": self.recipe.merge_method,
            "models": [redact(m) for m in self.models],  # printed and staged: no credentials
            "tensors": len({t.tensor for t in self.tasks}),
            "tasks": len(self.tasks),
            "tasks_by_class": by_class,
            "shards": [{"name": s.name, "bytes": s.size, "tensors": len(s.tensors)} for s in self.shards],
            "read_bytes": self.read_bytes,
            "write_bytes": self.write_bytes,
            "device": self.device,
            "device_memory": self.device_memory,
            "peak_task_host_bytes": self.peak_task_bytes,
            "peak_task_device_bytes": self.peak_task_device_bytes,
            "flops": sum(t.flops for t in self.tasks),
            "fingerprint": self.fingerprint(),
        }
