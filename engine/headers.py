"""The safetensors format, strictly: dtype tags, tensor entries, header validation, row spans.

A header is 8 bytes of little-endian length and a JSON object; every entry's offsets must lie
inside the file's data section, agree with its dtype and shape, and not overlap another's. Pure
functions of bytes: reading them from files and URLs is ``storage``'s job.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymerge.engine.errors import HeaderError
from raymerge.engine.safeio import parse_json

# safetensors dtype tag -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
}
FLOAT_TAGS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
TAG_OF_DTYPE = {dt: tag for tag, (dt, _) in DTYPES.items()}
# A header larger than this is refused before any allocation (safetensors uses 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_DIMS = 64  # torch's limit on a tensor's dimensions


def dtype_from_name(name: str) -> torch.dtype:
    """Map a recipe dtype name (``float32``, ``bfloat16``, ``fp16`` …) to a torch dtype."""
    aliases = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float64": torch.float64,
        "fp64": torch.float64,
    }
    if name not in aliases:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(aliases)}")
    return aliases[name]


@dataclass(frozen=True)
class TensorEntry:
    """One tensor in a safetensors file: dtype tag, shape and absolute byte range in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute file offset of the first byte
    end: int  # absolute file offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_TAGS

    def row_bytes(self) -> int:
        """Bytes of one leading-dimension row (the whole tensor for scalars)."""
        if not self.shape:
            return self.nbytes
        return self.nbytes // max(self.shape[0], 1) if self.shape[0] else 0


def parse_header(raw: bytes, file_size: int, file: str) -> tuple[dict[str, TensorEntry], dict[str, str], int]:
    """Validate and parse a safetensors header.

    ``raw`` is the JSON header (without the 8-byte length prefix). Returns the entries, the
    ``__metadata__`` map and the absolute offset where the data section starts. Offsets must lie
    inside the file, tensors may not overlap, and each byte range must match dtype × shape.
    """
    data_start = 8 + len(raw)
    # Strict: a duplicate tensor name is refused (json.loads would keep the hidden second entry).
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderError(f"header is not UTF-8 JSON (bad byte at {exc.start})", file=file) from None
    obj = parse_json(text, file=file, expect=dict, error=HeaderError, what="header")
    metadata_raw = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata_raw, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata_raw.items()
    ):
        raise HeaderError("__metadata__ must map strings to strings", file=file)
    data_len = file_size - data_start
    if data_len < 0:
        raise HeaderError(f"header length {len(raw)} runs past the end of the file ({file_size} bytes)", file=file)
    entries: dict[str, TensorEntry] = {}
    for name, info in obj.items():
        if not isinstance(info, dict):
            raise HeaderError("tensor entry is not an object", file=file, tensor=name)
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPES:
            raise HeaderError(f"unsupported dtype {dtype!r}", file=file, tensor=name)
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise HeaderError(f"bad shape {shape!r}", file=file, tensor=name)
        if len(shape) > MAX_DIMS:
            raise HeaderError(f"{len(shape)} dimensions; at most {MAX_DIMS} are supported", file=file, tensor=name)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise HeaderError(f"bad data_offsets {offsets!r}", file=file, tensor=name)
        lo, hi = offsets
        if not 0 <= lo <= hi <= data_len:
            raise HeaderError(
                f"data_offsets {offsets} lie outside the data section ({data_len} bytes)",
                file=file,
                tensor=name,
                hint="the file is truncated or corrupt",
            )
        numel = 1
        for d in shape:
            numel *= d
        if numel * DTYPES[dtype][1] != hi - lo:
            raise HeaderError(
                f"{dtype}{shape} needs {numel * DTYPES[dtype][1]} bytes but data_offsets span {hi - lo}",
                file=file,
                tensor=name,
            )
        entries[name] = TensorEntry(name, dtype, tuple(shape), data_start + lo, data_start + hi)
    spans = sorted((e.start, e.end, e.name) for e in entries.values() if e.end > e.start)
    for (_, a_end, a_name), (b_start, _, b_name) in zip(spans, spans[1:], strict=False):
        if b_start < a_end:
            raise HeaderError(f"byte range overlaps tensor {a_name}", file=file, tensor=b_name)
    return entries, dict(metadata_raw), data_start


def row_span(entry: TensorEntry, row_start: int = 0, row_end: int | None = None) -> tuple[int, int]:
    """Absolute byte range of rows ``[row_start, row_end)`` of a tensor (all of it if 0-D)."""
    if not entry.shape:
        return entry.start, entry.end
    row_end = entry.shape[0] if row_end is None else row_end
    rb = entry.row_bytes()
    return entry.start + row_start * rb, entry.start + row_end * rb
