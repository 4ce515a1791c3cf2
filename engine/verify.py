"""``raymerge verify DIR``: check a published model against its own receipts, offline.

Re-parses the index and every shard header with the strict parser, checks that the index and the
shards agree, recomputes the CRC32 of every task's bytes from ``.raymerge/receipts.json`` and
checks that every floating-point tensor is finite. Reads each byte once, in file order.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from raymerge.engine.errors import CheckpointError
from raymerge.engine.storage import ShardReader

_CHUNK = 64 << 20


@dataclass(frozen=True)
class VerifyReport:
    tensors: int
    shards: int
    bytes_checked: int
    tasks_checked: int


def verify_model(path: str | Path) -> VerifyReport:
    """Raise ``CheckpointError`` naming the file and tensor at the first problem found."""
    root = Path(path)
    index_file = root / "model.safetensors.index.json"
    receipts_file = root / ".raymerge" / "receipts.json"
    if not index_file.exists():
        raise CheckpointError("no model.safetensors.index.json", file=str(root), hint="is this a raymerge output?")
    try:
        weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"index is not valid: {exc}", file=str(index_file)) from None
    readers: dict[str, ShardReader] = {}
    for shard in sorted(set(weight_map.values())):
        readers[shard] = ShardReader(str(root / shard))
    stored = {name: shard for shard, r in readers.items() for name in r.entries}
    for name, shard in weight_map.items():
        if stored.get(name) != shard:
            raise CheckpointError(
                f"index places this tensor in {shard} but it is not there", file=str(index_file), tensor=name
            )
    extra = sorted(set(stored) - set(weight_map))
    if extra:
        raise CheckpointError(
            "shard holds a tensor the index does not list", file=str(root / stored[extra[0]]), tensor=extra[0]
        )
    checked = nbytes = 0
    if receipts_file.exists():
        receipts = json.loads(receipts_file.read_text())
        for r in receipts:
            f = root / r["shard"]
            with open(f, "rb") as fh:
                fh.seek(int(r["offset"]))
                crc = 0
                left = int(r["nbytes"])
                while left:
                    block = fh.read(min(left, _CHUNK))
                    if not block:
                        break
                    crc = zlib.crc32(block, crc)
                    left -= len(block)
            if left or crc != int(r["crc32"]):
                raise CheckpointError("checksum does not match the merge's receipt", file=str(f), tensor=r["tensor"],
                                      hint="the file was modified or corrupted after the merge")  # fmt: skip
            checked += 1
            nbytes += int(r["nbytes"])
    for shard, reader in readers.items():
        for name, entry in reader.entries.items():
            if not entry.is_float or not entry.shape:
                continue
            rows = entry.shape[0]
            step = max(1, _CHUNK // max(1, entry.row_bytes()))
            for r0 in range(0, rows, step):
                x = reader.read_rows(entry, r0, min(rows, r0 + step))
                if not bool(torch.isfinite(x).all()):
                    raise CheckpointError("tensor contains NaN or Inf", file=str(root / shard), tensor=name)
    return VerifyReport(len(weight_map), len(readers), nbytes, checked)
