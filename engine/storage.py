"""Checkpoint storage: fsspec access, a strict safetensors header parser and byte-range reads.

Local shards are memory-mapped (copy-on-write, so ``torch.frombuffer`` gets a writable view
without copying) and only the pages a task touches are faulted in; remote shards are read with
HTTP/S3 range requests for exactly the rows a task needs. ``safetensors.safe_open`` is not used
here: it is local-only and loads whole tensors.

Pickle checkpoints (``pytorch_model*.bin``) are refused unless the recipe opts in. With the
opt-in, their tensor table comes from ``torch.load(weights_only=True, map_location="meta")``,
which unpickles nothing but tensors and containers and reads no tensor data; each tensor's bytes
are an uncompressed record of the zip archive, so from then on a ``.bin`` shard is read exactly
like a safetensors one (mmap locally, range reads remotely).
"""

from __future__ import annotations

import bisect
import contextlib
import json
import logging
import mmap
import os
import posixpath
import re
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

import fsspec
import torch

from raymerge.engine.errors import CheckpointError, HeaderError, RaymergeError

log = logging.getLogger(__name__)
T = TypeVar("T")

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


def dtype_from_name(name: str) -> torch.dtype:
    """Map a recipe dtype name (``float32``, ``bfloat16``, ``fp16`` …) to a torch dtype."""
    aliases = {
        "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
        "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
        "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
        "float64": torch.float64, "fp64": torch.float64,
    }  # fmt: skip
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
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HeaderError(f"header is not valid UTF-8 JSON: {exc}", file=file) from None
    if not isinstance(obj, dict):
        raise HeaderError("header JSON is not an object", file=file)
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
                file=file, tensor=name, hint="the file is truncated or corrupt",
            )  # fmt: skip
        numel = 1
        for d in shape:
            numel *= d
        if numel * DTYPES[dtype][1] != hi - lo:
            raise HeaderError(
                f"{dtype}{shape} needs {numel * DTYPES[dtype][1]} bytes but data_offsets span {hi - lo}",
                file=file, tensor=name,
            )  # fmt: skip
        entries[name] = TensorEntry(name, dtype, tuple(shape), data_start + lo, data_start + hi)
    spans = sorted((e.start, e.end, e.name) for e in entries.values() if e.end > e.start)
    for (_, a_end, a_name), (b_start, _, b_name) in zip(spans, spans[1:], strict=False):
        if b_start < a_end:
            raise HeaderError(f"byte range overlaps tensor {a_name}", file=file, tensor=b_name)
    return entries, dict(metadata_raw), data_start


def _split_url(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs (memory-mapped); False for anything remote."""
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def join_url(base: str, name: str) -> str:
    """Join a directory URL and a relative file name (no path components allowed in ``name``)."""
    if is_local(base):
        return os.path.join(local_path(base), name)
    return base.rstrip("/") + "/" + name


def output_overlap(out: str, inputs: Sequence[str]) -> tuple[str, str] | None:
    """``(input, "is" | "contains")`` for the first input whose directory the output ``out`` is,
    or lies under; ``None`` if none. Replacing such an output would delete the inputs it reads.
    Local paths are compared after resolving symlinks and ``..``; URLs as normalised strings."""
    if is_local(out):
        target, sep = os.path.realpath(local_path(out)), os.sep
        pairs = [(m, os.path.realpath(local_path(m))) for m in inputs if is_local(m)]
    else:
        target, sep = out.rstrip("/"), "/"
        pairs = [(m, m.rstrip("/")) for m in inputs if not is_local(m)]
    for model, path in pairs:
        if path == target:
            return model, "is"
        if path.startswith(target.rstrip(sep) + sep):
            return model, "contains"
    return None


@dataclass
class ReadStats:
    """Bytes actually fetched by this process (range reads or mmap'd spans), for figures."""

    bytes_read: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes_read += n


READ_STATS = ReadStats()


class ShardReader:
    """Byte-range access to one safetensors file: mmap for local paths, range reads otherwise.

    Instances are cached per process (``open_shard``) so the header is parsed and the file mapped
    once; they are never pickled: tasks carry URLs and offsets and re-open here.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._mm: mmap.mmap | None = None
        self._fs: fsspec.AbstractFileSystem | None = None
        self._path = url
        if is_local(url):
            path = local_path(url)
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(f"cannot open shard: {exc.strerror}", file=url) from None
            try:
                self.size = os.fstat(fd).st_size
                if self.size > 0:
                    # ACCESS_COPY gives a writable private view, which torch.frombuffer needs,
                    # without copying: pages are shared with the page cache until written.
                    self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
            finally:
                os.close(fd)
        else:
            self._fs, self._path = _split_url(url)
            fs, path = self._fs, self._path
            self.size = int(with_retries(lambda: fs.size(path), url, "stat"))
        if is_pickle_shard(url):
            self.entries = torch_zip_entries(url, self.size, self._open)
            self.metadata: dict[str, str] = {}
            self.data_start = 0
            return
        if self.size < 8:
            raise HeaderError(f"file is {self.size} bytes, too short for a safetensors header", file=url)
        (hlen,) = _u64(self.read_bytes(0, 8))
        if hlen > MAX_HEADER_BYTES or 8 + hlen > self.size:
            raise HeaderError(
                f"header length {hlen} is beyond the file ({self.size} bytes)", file=url,
                hint="the file is truncated or not safetensors",
            )  # fmt: skip
        self.entries, self.metadata, self.data_start = parse_header(self.read_bytes(8, 8 + hlen), self.size, url)

    def _open(self) -> IO[bytes]:
        """A seekable binary file object, for the zip directory and pickle of a ``.bin``.

        Remote files are read in cached 64 KiB blocks: the directory and pickle are tens of KiB at the
        two ends of the file, and a larger block would fetch tensor data nobody asked for.
        """
        if self._fs is None:
            return open(local_path(self.url), "rb")
        fs, path = self._fs, self._path
        return with_retries(  # type: ignore[no-any-return]
            lambda: fs.open(path, "rb", block_size=1 << 16, cache_type="blockcache"), self.url, "open"
        )

    def read_bytes(self, start: int, end: int) -> bytes:
        """Read ``[start, end)`` as bytes (a copy); used for headers and remote data."""
        if self._mm is not None:
            return self._mm[start:end]
        fs = self._fs
        assert fs is not None
        path = self._path
        data = with_retries(lambda: fs.cat_file(path, start=start, end=end), self.url, f"range read [{start}, {end})")
        if len(data) != end - start:
            raise CheckpointError(f"short read: wanted {end - start} bytes, got {len(data)}", file=self.url)
        READ_STATS.add(len(data))
        return bytes(data)

    def read_rows(self, entry: TensorEntry, row_start: int = 0, row_end: int | None = None) -> torch.Tensor:
        """Return rows ``[row_start, row_end)`` of a tensor in its stored dtype.

        Local files give a zero-copy view into the mapping (valid while this reader lives);
        remote files give a tensor over freshly range-read bytes.
        """
        lo, hi = row_span(entry, row_start, row_end)
        shape = entry.shape
        if shape:
            stop = shape[0] if row_end is None else row_end
            out_shape: tuple[int, ...] = (stop - row_start, *shape[1:])
        else:
            out_shape = shape
        dtype = entry.torch_dtype
        if hi == lo:
            return torch.empty(out_shape, dtype=dtype)
        if self._mm is not None:
            READ_STATS.add(hi - lo)
            flat = torch.frombuffer(self._mm, dtype=dtype, count=(hi - lo) // entry.itemsize, offset=lo)
        else:
            flat = torch.frombuffer(bytearray(self.read_bytes(lo, hi)), dtype=dtype)
        return flat.view(out_shape)

    def release(self, start: int, end: int) -> None:
        """Drop the mapped pages of ``[start, end)`` from this process's resident set (local only).

        Pages are unmodified private mappings, so MADV_DONTNEED simply forgets them; a later read
        faults them in again from the page cache. Keeps RSS flat across a long merge.
        """
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        lo = (start // page) * page
        hi = min(self.size, -(-end // page) * page)
        if hi > lo:
            with contextlib.suppress(OSError, ValueError):
                self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


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


def torch_zip_entries(url: str, size: int, opener: Callable[[], IO[bytes]]) -> dict[str, TensorEntry]:
    """The tensors of a torch zip checkpoint as absolute byte ranges in the file, reading no tensor data.

    ``torch.load(weights_only=True, map_location="meta")`` unpickles the state dict with torch's
    restricted unpickler (tensors, containers, primitive types; any other global is refused before
    it is called) and tells, per storage, the file offset of its zip record. Each range is then
    checked against the zip directory: inside one uncompressed ``data/`` record, inside the file,
    little-endian, contiguous. ``opener`` gives a seekable file object (remote: small blocks).
    """
    import pickle

    local = is_local(url)
    with opener() as f:
        try:
            # A local path lets torch memory-map instead of reading; remote, it reads through ``f``.
            source: str | IO[bytes] = local_path(url) if local else f
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
                file=url, hint="re-save it with torch.save (torch >= 1.6) or convert it to safetensors",
            ) from None  # fmt: skip
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
                "tensor is stored as a strided view", file=url, tensor=name,
                hint="re-save the state dict with contiguous tensors, or convert it to safetensors",
            )  # fmt: skip
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
                "tensor bytes are not an uncompressed record of the archive", file=url, tensor=name,
                hint="re-save it with torch.save or convert it to safetensors",
            )  # fmt: skip
        entries[name] = TensorEntry(name, tag, tuple(t.shape), start, end)
    return entries


def row_span(entry: TensorEntry, row_start: int = 0, row_end: int | None = None) -> tuple[int, int]:
    """Absolute byte range of rows ``[row_start, row_end)`` of a tensor (all of it if 0-D)."""
    if not entry.shape:
        return entry.start, entry.end
    row_end = entry.shape[0] if row_end is None else row_end
    rb = entry.row_bytes()
    return entry.start + row_start * rb, entry.start + row_end * rb


def _u64(b: bytes) -> tuple[int]:
    return (int.from_bytes(b, "little"),)


# Remote reads that fail transiently (5xx, resets, timeouts) are retried with exponential backoff;
# a missing file is not retried. Module-level so tests and deployments can tune them.
RETRIES = 4
BACKOFF_S = 0.25


def with_retries(
    fn: Callable[[], T],
    url: str,
    what: str,
    *,
    missing_ok: bool = False,
    error: type[RaymergeError] = CheckpointError,
) -> T:
    """Call ``fn``, retrying transient failures ``RETRIES`` times with exponential backoff.

    A missing file is not transient: it raises ``error`` at once, or ``FileNotFoundError`` to the
    caller with ``missing_ok``. After the last attempt the failure becomes ``error`` (one line
    naming ``url``).
    """
    delay = BACKOFF_S
    for attempt in range(RETRIES + 1):
        try:
            return fn()
        except FileNotFoundError:
            if missing_ok:
                raise
            raise error(f"{what}: not found", file=url) from None
        except RaymergeError:
            raise
        except Exception as exc:  # noqa: BLE001 - fsspec backends raise many types
            if attempt == RETRIES:
                raise error(
                    f"{what} failed after {RETRIES + 1} attempts: {exc}".replace("\n", " "), file=url,
                    hint="check the storage endpoint; rerun to resume",
                ) from None  # fmt: skip
            log.warning("%s of %s failed (%s); retrying in %.2f s", what, url, exc, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


_READERS: dict[str, ShardReader] = {}
_READERS_LOCK = threading.Lock()


def open_shard(url: str) -> ShardReader:
    """Process-wide cached ``ShardReader`` for ``url`` (headers parsed once, files mapped once)."""
    with _READERS_LOCK:
        reader = _READERS.get(url)
    if reader is None:
        reader = ShardReader(url)
        with _READERS_LOCK:
            reader = _READERS.setdefault(url, reader)
    return reader


def clear_shard_cache() -> None:
    """Forget cached readers (tests that rewrite files between runs call this)."""
    with _READERS_LOCK:
        _READERS.clear()


def read_blob(url: str) -> bytes | None:
    """Read a small whole file (config, index, tokenizer) or return None if it does not exist.

    Remote reads are retried like range reads: a transient error must not look like a missing file.
    """
    if is_local(url):
        try:
            with open(local_path(url), "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            return None
    fs, path = _split_url(url)
    try:
        return bytes(with_retries(lambda: fs.cat_file(path), url, "read", missing_ok=True))
    except FileNotFoundError:
        return None


def read_text(url: str) -> str | None:
    """Read a small UTF-8 text file (config, index) or return None if it does not exist."""
    raw = read_blob(url)
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"not UTF-8 text: {exc}", file=url) from None


def exists(url: str) -> bool:
    """Whether a file exists; remote lookups are retried so a 5xx is not taken for "missing"."""
    if is_local(url):
        return os.path.exists(local_path(url))
    fs, path = _split_url(url)
    try:
        with_retries(lambda: fs.info(path), url, "stat", missing_ok=True)
    except FileNotFoundError:
        return False
    return True


def list_dir(url: str) -> list[str]:
    """File names (not paths) directly inside a directory URL."""
    if is_local(url):
        try:
            return sorted(os.listdir(local_path(url)))
        except FileNotFoundError:
            return []
    fs, path = _split_url(url)
    try:
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    except Exception:  # noqa: BLE001 - plain HTTP servers often cannot list
        return []


@dataclass(frozen=True)
class Checkpoint:
    """A Hugging Face model directory: its config, and where each tensor lives."""

    url: str
    config: dict[str, Any]
    shard_of: dict[str, str]  # tensor name -> shard URL
    entries: dict[str, TensorEntry]

    @property
    def label(self) -> str:
        return self.url


def _safe_shard_name(name: Any, index_url: str) -> str:
    if (
        not isinstance(name, str)
        or not name
        or "/" in name
        or "\\" in name
        or name in (".", "..")
        or os.path.isabs(name)
        or "\x00" in name
    ):
        raise CheckpointError(
            f"index names shard {name!r}, which is not a plain file name", file=index_url,
            hint="shard names may not contain path components",
        )  # fmt: skip
    return name


def _read_index(index_url: str, text: str) -> dict[str, str]:
    """An index's weight_map (tensor name -> shard file name), shard names checked."""
    try:
        index = json.loads(text)
        weight_map = index["weight_map"]
        assert isinstance(weight_map, dict)
    except (json.JSONDecodeError, KeyError, AssertionError, TypeError):
        raise CheckpointError("index is not valid JSON with a weight_map object", file=index_url) from None
    return {tname: _safe_shard_name(shard, index_url) for tname, shard in weight_map.items()}


def open_checkpoint(url: str, *, allow_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint directory (local or URL) reading headers only, never tensor data.

    safetensors wins when both formats are present. Pickle weights (``pytorch_model.bin`` or
    ``pytorch_model-*.bin`` + ``pytorch_model.bin.index.json``) are used only with
    ``allow_pickle``, and then only through ``torch_zip_entries`` (weights_only unpickling).
    """
    url = url.rstrip("/") if not is_local(url) else url
    cfg_url = join_url(url, "config.json")
    cfg_text = read_text(cfg_url)
    config: dict[str, Any] = {}
    if cfg_text is not None:
        try:
            config = json.loads(cfg_text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"config.json is not valid JSON: {exc}", file=cfg_url) from None
    index_url = join_url(url, "model.safetensors.index.json")
    index_text = read_text(index_url)
    shard_names: dict[str, str] = {}
    if index_text is not None:
        shard_names = _read_index(index_url, index_text)
        files = sorted(set(shard_names.values()))
    elif exists(join_url(url, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        index_url = join_url(url, PICKLE_INDEX)
        index_text = read_text(index_url)
        if index_text is not None:
            pickled = index_url
        elif exists(join_url(url, PICKLE_SINGLE)):
            pickled = join_url(url, PICKLE_SINGLE)
        else:
            others = [n for n in list_dir(url) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            if others:
                raise CheckpointError(
                    "only pickle weights found, and not in Hugging Face layout", file=join_url(url, others[0]),
                    hint="convert the checkpoint to safetensors; raymerge never unpickles by default",
                )  # fmt: skip
            raise CheckpointError(
                "no model.safetensors or model.safetensors.index.json", file=url,
                hint="point the recipe at a Hugging Face model directory",
            )  # fmt: skip
        if not allow_pickle:
            raise CheckpointError("checkpoint has only pickle weights", file=pickled, hint=PICKLE_OPT_IN)
        if index_text is not None:
            shard_names = _read_index(index_url, index_text)
            files = sorted(set(shard_names.values()))
            bad = [f for f in files if not is_pickle_shard(f)]
            if bad:
                raise CheckpointError(f"index names shard {bad[0]!r}, which is not a .bin file", file=index_url)
        else:
            files = [PICKLE_SINGLE]
    pickles = [f for f in files if is_pickle_shard(f)]
    if pickles and not allow_pickle:  # e.g. a safetensors index that points at a .bin shard
        raise CheckpointError("checkpoint has pickle weights", file=join_url(url, pickles[0]), hint=PICKLE_OPT_IN)
    shard_of: dict[str, str] = {}
    entries: dict[str, TensorEntry] = {}
    for fname in files:
        surl = join_url(url, fname)
        reader = open_shard(surl)
        for tname, entry in reader.entries.items():
            if tname in entries:
                raise CheckpointError("tensor appears in two shards", file=surl, tensor=tname)
            if shard_names and shard_names.get(tname) != fname:
                raise CheckpointError(
                    f"index places this tensor in {shard_names.get(tname)!r} but it is stored in {fname!r}",
                    file=index_url, tensor=tname,
                )  # fmt: skip
            entries[tname] = entry
            shard_of[tname] = surl
    missing = sorted(set(shard_names) - set(entries))
    if missing:
        raise CheckpointError(
            f"index lists {len(missing)} tensor(s) no shard contains", file=index_url, tensor=missing[0]
        )
    return Checkpoint(url=url, config=config, shard_of=shard_of, entries=entries)
