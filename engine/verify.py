"""``raymerge verify DIR|URL``: check a published model against its own index, plan and receipts.

Structure: the index (strict, bounded JSON) names shards inside the directory; every shard is a
regular file whose header parses strictly (no duplicate keys) and whose tensors cover the data
section exactly (no gap, no trailing byte: what the safetensors library itself demands); the index
and the shards list the same tensors. Against the merge: ``.raymerge/shards.json`` gives each
shard's size and the hash of the header the plan wrote (so a swapped shape, renamed tensor or
changed dtype is caught even when the JSON stays valid), and ``.raymerge/receipts.json`` gives
every task's bytes and CRC32, recomputed here; every receipt must lie inside its tensor and the
receipts must cover every tensor's bytes. Then every floating-point value must be finite.

Without the merge's records the bytes cannot be checked: verify says what it could not check
and fails, unless ``structural`` asks for the structure only. Works on a local directory
(memory-mapped) or any fsspec URL (range reads, retried like the merge's own reads).
"""

from __future__ import annotations

import hashlib
import os
import stat
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raymerge.engine.errors import CheckpointError
from raymerge.engine.safeio import parse_json, read_regular
from raymerge.engine.storage import ShardReader, is_local, join_url, local_path, read_blob

_CHUNK = 64 << 20
INDEX = "model.safetensors.index.json"
RECORDS_LIMIT = 1 << 30  # receipts.json: one entry per task


@dataclass(frozen=True)
class VerifyReport:
    tensors: int
    shards: int
    bytes_checked: int
    tasks_checked: int
    headers_checked: int = 0
    structural_only: bool = False


def _read_small(url: str, what: str, limit: int = 64 << 20) -> bytes | None:
    """A small file's bytes, or None when it does not exist (local: regular files only, bounded)."""
    if is_local(url):
        path = local_path(url)
        if not os.path.lexists(path):
            return None
        return read_regular(path, limit=limit, error=CheckpointError, what=what)
    return read_blob(url)


def _json(url: str, what: str, expect: type, limit: int = 64 << 20) -> Any:
    data = _read_small(url, what, limit)
    if data is None:
        return None
    return parse_json(data, file=url, expect=expect, error=CheckpointError, what=what)


def _open_shard(url: str) -> ShardReader:
    if is_local(url):
        try:
            mode = os.stat(local_path(url)).st_mode
        except OSError as exc:
            raise CheckpointError(f"cannot open shard: {exc.strerror}", file=url) from None
        if not stat.S_ISREG(mode):
            raise CheckpointError("shard is not a regular file (a directory, FIFO or device)", file=url)
    return ShardReader(url)


def _check_layout(reader: ShardReader) -> bytes:
    """Refuse duplicate keys, gaps and trailing bytes; return the raw header bytes."""
    hlen = reader.data_start - 8
    raw = reader.read_bytes(8, 8 + hlen)
    parse_json(raw, file=reader.url, expect=dict, error=CheckpointError, what="shard header")  # duplicate keys
    pos = reader.data_start
    for e in sorted(reader.entries.values(), key=lambda e: (e.start, e.end)):
        if e.start != pos:
            raise CheckpointError(
                f"{e.start - pos} bytes before this tensor's data belong to no tensor", file=reader.url, tensor=e.name
            )
        pos = e.end
    if reader.size != pos:
        raise CheckpointError(
            f"{reader.size - pos} trailing bytes after the last tensor's data",
            file=reader.url,
            hint="the file was modified after the merge (safetensors refuses to open it)",
        )
    return raw


def _weight_map(index_file: str) -> dict[str, str]:
    index = _json(index_file, "index", dict)
    if index is None:
        return {}
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError("index has no weight_map mapping tensor names to shard files", file=index_file)
    if not weight_map:
        raise CheckpointError("index lists no tensors", file=index_file)
    for shard in weight_map.values():
        if "/" in shard or "\\" in shard or shard in ("", ".", ".."):
            raise CheckpointError(f"index names a shard outside the model directory: {shard!r}", file=index_file)
    return weight_map


def _check_shard_records(root: str, readers: dict[str, ShardReader], raws: dict[str, bytes]) -> int:
    """Compare each shard's size and header with ``.raymerge/shards.json``; the shards checked (-1: no record)."""
    url = join_url(join_url(root, ".raymerge"), "shards.json")
    records = _json(url, "shard records", list)
    if records is None:
        return -1
    seen = set()
    for rec in records:
        if not isinstance(rec, dict) or not isinstance(rec.get("name"), str) or not isinstance(rec.get("size"), int):
            raise CheckpointError("shard record is not {name, size, header_sha256}", file=url)
        name = rec["name"]
        seen.add(name)
        reader = readers.get(name)
        if reader is None:
            raise CheckpointError("the merge wrote a shard the index does not list", file=join_url(root, name))
        if reader.size != rec["size"]:
            raise CheckpointError(
                f"shard is {reader.size} bytes; the merge wrote {rec['size']}",
                file=reader.url,
                hint="the file was truncated or extended after the merge",
            )
        if hashlib.sha256(raws[name]).hexdigest() != rec.get("header_sha256"):
            raise CheckpointError(
                "shard header differs from the one the merge wrote (names, shapes, dtypes or offsets edited)",
                file=reader.url,
            )
    missing = sorted(set(readers) - seen)
    if missing:
        raise CheckpointError("shard has no record of the merge", file=join_url(root, missing[0]))
    return len(seen)


def _check_receipts(root: str, readers: dict[str, ShardReader]) -> tuple[int, int] | None:
    """Recompute every receipt's CRC32; (tasks, bytes) checked, or None without receipts."""
    url = join_url(join_url(root, ".raymerge"), "receipts.json")
    receipts = _json(url, "receipts", list, RECORDS_LIMIT)
    if receipts is None:
        return None
    covered: dict[tuple[str, str], int] = {}
    checked = nbytes = 0
    for r in receipts:
        ok = isinstance(r, dict) and isinstance(r.get("shard"), str) and isinstance(r.get("tensor"), str)
        if not ok or not all(
            isinstance(r.get(k), int) and not isinstance(r.get(k), bool) for k in ("offset", "nbytes", "crc32")
        ):
            raise CheckpointError("receipt is not {tensor, shard, offset, nbytes, crc32}", file=url)
        shard, tensor = r["shard"], r["tensor"]
        reader = readers.get(shard)
        if reader is None:
            raise CheckpointError("receipt names a shard the index does not list", file=url, tensor=tensor)
        entry = reader.entries.get(tensor)
        start, end = r["offset"], r["offset"] + r["nbytes"]
        if entry is None or not entry.start <= start <= end <= entry.end:
            raise CheckpointError(
                "the header places this tensor elsewhere than the merge wrote it",
                file=reader.url,
                tensor=tensor,
                hint="the header was edited after the merge",
            )
        crc = 0
        for lo in range(start, end, _CHUNK):
            crc = zlib.crc32(reader.read_bytes(lo, min(end, lo + _CHUNK)), crc)
        if crc != r["crc32"]:
            raise CheckpointError(
                "checksum does not match the merge's receipt",
                file=reader.url,
                tensor=tensor,
                hint="the file was modified or corrupted after the merge",
            )
        covered[(shard, tensor)] = covered.get((shard, tensor), 0) + r["nbytes"]
        checked += 1
        nbytes += end - start
    for shard, reader in readers.items():
        for name, entry in reader.entries.items():
            if covered.get((shard, name), 0) != entry.end - entry.start:
                raise CheckpointError("the receipts do not cover this tensor's bytes", file=reader.url, tensor=name)
    return checked, nbytes


def verify_model(path: str | Path, *, structural: bool = False) -> VerifyReport:
    """Raise ``CheckpointError`` naming the file and tensor at the first problem found.

    Without ``.raymerge/receipts.json`` and ``.raymerge/shards.json`` the bytes and headers cannot
    be compared with the merge's: that is an error too unless ``structural``.
    """
    root = str(path)
    index_file = join_url(root, INDEX)
    weight_map = _weight_map(index_file)
    if not weight_map:
        raise CheckpointError(f"no {INDEX}", file=root, hint="is this a raymerge output?")
    readers = {shard: _open_shard(join_url(root, shard)) for shard in sorted(set(weight_map.values()))}
    raws = {shard: _check_layout(r) for shard, r in readers.items()}
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
    headers = _check_shard_records(root, readers, raws)
    sums = _check_receipts(root, readers)
    unchecked = []
    if sums is None:
        unchecked.append("the tensor bytes against the merge's checksums (no .raymerge/receipts.json)")
    if headers < 0:
        unchecked.append("the headers against the ones the merge wrote (no .raymerge/shards.json)")
    if unchecked and not structural:
        raise CheckpointError(
            "the structure is consistent, but verify could not check " + " nor ".join(unchecked),
            file=root,
            hint="pass --structural to check the structure only",
        )
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
    checked, nbytes = sums or (0, 0)
    return VerifyReport(len(weight_map), len(readers), nbytes, checked, max(headers, 0), bool(unchecked))
