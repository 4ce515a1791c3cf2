"""Pickle checkpoints (``pytorch_model*.bin``), read without unpickling anything but tensors.

Refused unless the recipe opts in. With the opt-in, the tensor table comes from
``torch.load(weights_only=True, map_location="meta")``, which unpickles nothing but tensors and
containers and reads no tensor data; each tensor's bytes are an uncompressed record of the zip
archive, so from then on a ``.bin`` shard is read exactly like a safetensors one.
"""

from __future__ import annotations

import bisect
import re
import zipfile
from collections.abc import Callable
from typing import IO

import torch

from raymerge.engine.errors import CheckpointError, RaymergeError
from raymerge.engine.headers import DTYPES, TAG_OF_DTYPE, TensorEntry

PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_OPT_IN = (
    "raymerge never unpickles by default; to load it with torch.load(weights_only=True), "
    "set `allow_pickle_bin: true` under `raymerge:` in the recipe or pass --allow-pickle "
    "(or convert the checkpoint to safetensors)"
)


def is_pickle_shard(url: str) -> bool:
    """A ``.bin`` shard: torch's zip serialization of a state dict (read only after the opt-in)."""
    return url.endswith(".bin")


def _unpickle_refusal(exc: Exception) -> str:
    """One line out of torch's multi-paragraph weights_only error: the global it refused."""
    m = re.search(r"(?:unsupported GLOBAL|Unsupported global: GLOBAL) ([\w.]+)", str(exc))
    what = f"refers to {m.group(1)}" if m else "holds objects other than tensors"
    return f"the pickle {what}, which weights_only loading refuses; nothing was executed"


def torch_zip_entries(
    url: str, size: int, opener: Callable[[], IO[bytes]], local_file: str | None = None
) -> dict[str, TensorEntry]:
    """The tensors of a torch zip checkpoint as absolute byte ranges in the file, reading no tensor data.

    ``torch.load(weights_only=True, map_location="meta")`` unpickles the state dict with torch's
    restricted unpickler (tensors, containers, primitive types; any other global is refused before
    it is called) and tells, per storage, the file offset of its zip record. Each range is then
    checked against the zip directory: inside one uncompressed ``data/`` record, inside the file,
    little-endian, contiguous. ``opener`` gives a seekable file object (remote: small blocks);
    ``local_file`` is the path of a local file, which torch then memory-maps instead of reading.
    """
    import pickle

    local = local_file is not None
    with opener() as f:
        try:
            # A local path lets torch memory-map instead of reading; remote, it reads through ``f``.
            source: str | IO[bytes] = local_file if local_file is not None else f
            state = torch.load(source, map_location="meta", weights_only=True, mmap=local)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(
                _unpickle_refusal(exc), file=url, hint="get a safetensors copy of this model from a source you trust"
            ) from None
        except RaymergeError:
            raise
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/ValueError/... for bad archives
            raise CheckpointError(
                f"not a torch zip checkpoint: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                file=url,
                hint="re-save it with torch.save (torch >= 1.6) or convert it to safetensors",
            ) from None
        if not isinstance(state, dict):
            raise CheckpointError(f"holds a {type(state).__name__}, not a state dict of tensors", file=url)
        try:
            f.seek(0)
            archive = zipfile.ZipFile(f)
            infos = archive.infolist()
            order = [i for i in infos if i.filename.endswith("/byteorder")]
            byteorder = archive.read(order[0]).decode() if order else "little"
        except (zipfile.BadZipFile, OSError, UnicodeDecodeError, EOFError) as exc:
            raise CheckpointError(f"cannot read the zip directory: {exc}", file=url) from None
    if byteorder != "little":
        raise CheckpointError(f"{byteorder}-endian checkpoint", file=url, hint="re-save it on a little-endian machine")
    records = sorted((i for i in infos if "/data/" in i.filename), key=lambda i: i.header_offset)
    starts = [i.header_offset for i in records]
    entries: dict[str, TensorEntry] = {}
    for name, t in state.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(f"entry {name!r} is a {type(t).__name__}, not a tensor", file=url)
        tag = TAG_OF_DTYPE.get(t.dtype)
        if tag is None:
            raise CheckpointError(f"unsupported dtype {t.dtype}", file=url, tensor=name)
        if not t.is_contiguous():
            raise CheckpointError(
                "tensor is stored as a strided view",
                file=url,
                tensor=name,
                hint="re-save the state dict with contiguous tensors, or convert it to safetensors",
            )
        offset = getattr(t.untyped_storage(), "_checkpoint_offset", None)
        item = DTYPES[tag][1]
        start = (offset if isinstance(offset, int) else 0) + int(t.storage_offset()) * item
        end = start + int(t.numel()) * item
        # The record holding this storage: the last one whose local header starts before it.
        k = bisect.bisect_left(starts, offset) - 1 if isinstance(offset, int) else -1
        rec = records[k] if k >= 0 else None
        if (
            offset is None
            or rec is None
            or rec.compress_type != zipfile.ZIP_STORED
            or offset <= rec.header_offset
            or offset - rec.header_offset > 30 + len(rec.filename.encode()) + 0xFFFF  # local header + extra
            or end > offset + rec.file_size
            or end > size
        ):
            raise CheckpointError(
                "tensor bytes are not an uncompressed record of the archive",
                file=url,
                tensor=name,
                hint="re-save it with torch.save or convert it to safetensors",
            )
        entries[name] = TensorEntry(name, tag, tuple(t.shape), start, end)
    return entries
