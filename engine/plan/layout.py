"""The output layout: tensor order, shard membership, safetensors headers and byte offsets.

Fixed before any compute, so every task knows the shard and absolute offset of its bytes and can
write them in place from any process, in any order, any number of times.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from raymerge.engine.arch import layer_index
from raymerge.engine.plan.types import OutputShard
from raymerge.engine.storage import DTYPES, TensorEntry


def tensor_order(name: str) -> tuple[int, int, str]:
    """Sort key of the output: embeddings first, then blocks by index, then the rest (by name)."""
    idx = layer_index(name)
    if idx is not None:
        return (1, idx, name)
    return (0 if "embed" in name else 2, 0, name)


def shard_header(entries: list[tuple[str, str, tuple[int, ...], int, int]]) -> bytes:
    """A safetensors JSON header for ``(name, dtype tag, shape, start, end)`` rows, 8-byte padded."""
    obj: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for name, tag, shape, lo, hi in entries:
        obj[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [lo, hi]}
    raw = json.dumps(obj, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned
    return raw


@dataclass(frozen=True)
class ShardLayout:
    """Where each output tensor goes: its shard file and absolute offset, and its stored dtype tag."""

    shards: tuple[OutputShard, ...]
    offset_of: Mapping[str, tuple[str, int]]
    dtype_of: Mapping[str, str]


def lay_out(
    names: Sequence[str], entries: Mapping[str, TensorEntry], out_tag: str | None, shard_bytes: int
) -> ShardLayout:
    """Fill shards of at most ``shard_bytes`` with ``names`` in order (a larger tensor gets its own).

    Float tensors are stored as ``out_tag`` when given; other tensors keep their dtype. A single
    shard is ``model.safetensors``; several are ``model-0000i-of-0000n.safetensors``.
    """
    members: list[list[str]] = [[]]
    fill = 0
    dtype_of: dict[str, str] = {}
    for name in names:
        e = entries[name]
        tag = out_tag if (out_tag and e.is_float) else e.dtype
        dtype_of[name] = tag
        nbytes = e.numel * DTYPES[tag][1]
        if members[-1] and fill + nbytes > shard_bytes:
            members.append([])
            fill = 0
        members[-1].append(name)
        fill += nbytes
    n_shards = len(members)
    shards: list[OutputShard] = []
    offset_of: dict[str, tuple[str, int]] = {}
    for i, group in enumerate(members):
        fname = "model.safetensors" if n_shards == 1 else f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        rows: list[tuple[str, str, tuple[int, ...], int, int]] = []
        pos = 0
        for name in group:
            e = entries[name]
            nb = e.numel * DTYPES[dtype_of[name]][1]
            rows.append((name, dtype_of[name], e.shape, pos, pos + nb))
            pos += nb
        header = shard_header(rows)
        data_start = 8 + len(header)
        for name, _, _, lo, _ in rows:
            offset_of[name] = (fname, data_start + lo)
        shards.append(OutputShard(fname, data_start + pos, header, tuple(group)))
    return ShardLayout(tuple(shards), offset_of, dtype_of)


__all__ = ["ShardLayout", "lay_out", "shard_header", "tensor_order"]
