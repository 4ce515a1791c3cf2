"""``raymerge verify DIR|URL``: check a published model against its own receipts.

Re-parses the index and every shard header with the strict parser, checks that the index and the
shards agree, recomputes the CRC32 of every task's bytes from ``.raymerge/receipts.json`` and
checks that every floating-point tensor is finite. Works on a local directory (memory-mapped) or
any fsspec URL (range reads, retried like the merge's own reads).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from raymerge.engine.errors import CheckpointError
from raymerge.engine.storage import ShardReader, join_url, read_text

_CHUNK = 64 << 20


@dataclass(frozen=True)
class VerifyReport:
    tensors: int
    shards: int
    bytes_checked: int
    tasks_checked: int


def verify_model(path: str | Path) -> VerifyReport:
    """Raise ``CheckpointError`` naming the file and tensor at the first problem found."""
    root = str(path)
    index_file = join_url(root, "model.safetensors.index.json")
    receipts_file = join_url(join_url(root, ".raymerge"), "receipts.json")
    index_text = read_text(index_file)
    if index_text is None:
        raise CheckpointError("no model.safetensors.index.json", file=root, hint="is this a raymerge output?")
    try:
        weight_map: dict[str, str] = json.loads(index_text)["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"index is not valid: {exc}", file=index_file) from None
    readers: dict[str, ShardReader] = {}
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise CheckpointError(f"index names a shard outside the model directory: {shard!r}", file=index_file)
        readers[shard] = ShardReader(join_url(root, shard))
    stored = {name: shard for shard, r in readers.items() for name in r.entries}
    for name, shard in weight_map.items():
        if stored.get(name) != shard:
            raise CheckpointError(
                f"index places this tensor in {shard} but it is not there", file=index_file, tensor=name
            )
    extra = sorted(set(stored) - set(weight_map))
    if extra:
        raise CheckpointError(
            "shard holds a tensor the index does not list", file=join_url(root, stored[extra[0]]), tensor=extra[0]
        )
    checked = nbytes = 0
    receipts_text = read_text(receipts_file)
    if receipts_text is not None:
        for r in json.loads(receipts_text):
            shard = str(r["shard"])
            reader = readers.get(shard)
            if reader is None:
                raise CheckpointError(
                    "receipt names a shard the index does not list", file=receipts_file, tensor=r.get("tensor")
                )
            start, end = int(r["offset"]), int(r["offset"]) + int(r["nbytes"])
            crc = 0
            if end > reader.size:
                crc = -1  # the shard is shorter than the receipt: truncated after the merge
            else:
                for lo in range(start, end, _CHUNK):
                    crc = zlib.crc32(reader.read_bytes(lo, min(end, lo + _CHUNK)), crc)
            if crc != int(r["crc32"]):
                raise CheckpointError(
                    "checksum does not match the merge's receipt",
                    file=reader.url,
                    tensor=r["tensor"],
                    hint="the file was modified or corrupted after the merge",
                )
            checked += 1
            nbytes += end - start
    for reader in readers.values():
        for name, entry in reader.entries.items():
            if not entry.is_float or not entry.shape:
                continue
            rows = entry.shape[0]
            step = max(1, _CHUNK // max(1, entry.row_bytes()))
            for r0 in range(0, rows, step):
                x = reader.read_rows(entry, r0, min(rows, r0 + step))
                if not bool(torch.isfinite(x).all()):
                    raise CheckpointError("tensor contains NaN or Inf", file=reader.url, tensor=name)
    return VerifyReport(len(weight_map), len(readers), nbytes, checked)
