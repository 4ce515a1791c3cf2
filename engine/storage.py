"""Checkpoint storage: fsspec access, a strict safetensors header parser and byte-range reads.

Local shards are memory-mapped (copy-on-write, so ``torch.frombuffer`` gets a writable view
without copying) and only the pages a task touches are faulted in; remote shards are read with
HTTP/S3 range requests for exactly the rows a task needs. ``safetensors.safe_open`` is not used
here: it is local-only and loads whole tensors.

The safetensors format itself (dtype tags, entries, header validation) is ``headers``; pickle
checkpoints (``pytorch_model*.bin``, only with the recipe's opt-in) are ``pickle_bin``. Both are
re-exported here, the one module the rest of the engine reads checkpoints through.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import posixpath
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, TypeVar

import fsspec
import torch

from raymerge.engine.errors import CheckpointError, HeaderError, RaymergeError
from raymerge.engine.headers import (
    DTYPES,
    FLOAT_TAGS,
    MAX_HEADER_BYTES,
    TAG_OF_DTYPE,
    TensorEntry,
    dtype_from_name,
    parse_header,
    row_span,
)
from raymerge.engine.pickle_bin import PICKLE_INDEX, PICKLE_OPT_IN, PICKLE_SINGLE, is_pickle_shard, torch_zip_entries
from raymerge.engine.safeio import SMALL_FILE_BYTES, check_size, decode_text, parse_json, read_optional
from raymerge.engine.urls import RedactingFilter

log = logging.getLogger(__name__)
log.addFilter(RedactingFilter())  # retry warnings name URLs, also in Ray workers where the CLI set up no handler
T = TypeVar("T")


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
    """``(input, "is" | "contains" | "lies inside")`` for the first input whose directory the output
    ``out`` is, lies under, or holds; ``None`` if none. Replacing such an output would delete the
    inputs it reads, and writing inside an input's directory would change that model. Local paths
    are compared after resolving symlinks and ``..``; URLs as normalised strings."""
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
        if target.startswith(path.rstrip(sep) + sep):
            return model, "lies inside"
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


# Linux's MAP_NORESERVE (Python 3.11's mmap module does not name it).
_MAP_NORESERVE = 0x4000 if sys.platform.startswith("linux") else 0


def _map_private(fd: int, url: str) -> mmap.mmap:
    """A private (copy-on-write) mapping of the whole file: writable, which ``torch.frombuffer``
    needs, without copying; pages are shared with the page cache until written, and nothing is.

    MAP_NORESERVE keeps the kernel from reserving swap for the copy-on-write pages: without it,
    under Linux's default heuristic overcommit, a file larger than RAM plus swap (a multi-TB
    statistics file, a huge single-file checkpoint) could not be mapped at all.
    """
    try:
        return mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        raise CheckpointError(
            f"cannot map the file: {exc.strerror}", file=url, hint="check vm.overcommit_memory, or shard the file"
        ) from None


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
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block the open
            except OSError as exc:
                raise CheckpointError(f"cannot open shard: {exc.strerror}", file=url) from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise CheckpointError("shard is not a regular file (a directory, FIFO or device)", file=url)
                self.size = st.st_size
                if self.size > 0:
                    self._mm = _map_private(fd, url)
            finally:
                os.close(fd)
        else:
            self._fs, self._path = _split_url(url)
            fs, path = self._fs, self._path
            self.size = int(with_retries(lambda: fs.size(path), url, "stat"))
        if is_pickle_shard(url):
            self.entries = torch_zip_entries(url, self.size, self._open, local_path(url) if is_local(url) else None)
            self.metadata: dict[str, str] = {}
            self.data_start = 0
            return
        if self.size < 8:
            raise HeaderError(f"file is {self.size} bytes, too short for a safetensors header", file=url)
        (hlen,) = _u64(self.read_bytes(0, 8))
        if hlen > MAX_HEADER_BYTES or 8 + hlen > self.size:
            raise HeaderError(
                f"header length {hlen} is beyond the file ({self.size} bytes)",
                file=url,
                hint="the file is truncated or not safetensors",
            )
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
                    f"{what} failed after {RETRIES + 1} attempts: {exc}".replace("\n", " "),
                    file=url,
                    hint="check the storage endpoint; rerun to resume",
                ) from None
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


def read_blob(
    url: str, *, limit: int = SMALL_FILE_BYTES, error: type[RaymergeError] = CheckpointError, what: str = "file"
) -> bytes | None:
    """Read a small whole file (config, index, tokenizer) or return None if it does not exist.

    At most ``limit`` bytes: a local file must be a regular file no larger (``safeio``), and a
    remote one is read only up to ``limit + 1`` bytes, so ``/dev/zero`` or a huge object is refused
    instead of filling memory. Remote reads are retried like range reads: a transient error must
    not look like a missing file.
    """
    if is_local(url):
        return read_optional(local_path(url), limit=limit, error=error, what=what)
    fs, path = _split_url(url)

    def bounded() -> bytes:
        with fs.open(path, "rb") as f:
            return bytes(f.read(limit + 1))

    try:
        data = with_retries(bounded, url, "read", missing_ok=True, error=error)
    except FileNotFoundError:
        return None
    check_size(len(data), limit, file=url, error=error, what=what)
    return data


def read_text(
    url: str, *, limit: int = SMALL_FILE_BYTES, error: type[RaymergeError] = CheckpointError, what: str = "file"
) -> str | None:
    """Read a small UTF-8 text file (config, index) or return None if it does not exist."""
    raw = read_blob(url, limit=limit, error=error, what=what)
    return None if raw is None else decode_text(raw, file=url, error=error, what=what)


def read_json_file(
    url: str, *, expect: type | tuple[type, ...] = dict, error: type[RaymergeError] = CheckpointError, what: str
) -> Any:
    """A small JSON file at a path or URL, parsed strictly (``safeio.parse_json``); None if missing."""
    raw = read_blob(url, error=error, what=what)
    return None if raw is None else parse_json(raw, file=url, expect=expect, error=error, what=what)


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
            f"index names shard {name!r}, which is not a plain file name",
            file=index_url,
            hint="shard names may not contain path components",
        )
    return name


def _read_index(index_url: str, index: dict[str, Any]) -> dict[str, str]:
    """An index's weight_map (tensor name -> shard file name), shard names checked."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError("index has no weight_map object", file=index_url)
    if not weight_map:
        raise CheckpointError(
            "index has an empty weight_map: the checkpoint has no tensors",
            file=index_url,
            hint="the index is truncated or was written by a failed save",
        )
    return {tname: _safe_shard_name(shard, index_url) for tname, shard in weight_map.items()}


_CONFIG_INTS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)


def _check_config(config: dict[str, Any], file: str) -> dict[str, Any]:
    """The keys raymerge itself reads from ``config.json`` have the types transformers gives them."""
    for key in ("model_type", "torch_dtype", "dtype"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise CheckpointError(f"config.json: {key} must be a string, got {config[key]!r:.60}", file=file)
    archs = config.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str) for a in archs)):
        raise CheckpointError(f"config.json: architectures must be a list of names, got {archs!r:.60}", file=file)
    for key in _CONFIG_INTS:
        v = config.get(key)
        if v is not None and (type(v) is not int or v < 0):
            raise CheckpointError(f"config.json: {key} must be a whole number >= 0, got {v!r:.60}", file=file)
    return config


def check_model_dir(url: str) -> None:
    """Refuse a local model path that is not a directory (a file, a device, a FIFO) with one line."""
    if not is_local(url):
        return
    path = local_path(url)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(
            "model directory does not exist", file=path, hint="point the recipe at a Hugging Face model directory"
        ) from None
    except OSError as exc:
        raise CheckpointError(f"cannot open model directory: {exc.strerror}", file=path) from None
    if not stat.S_ISDIR(st.st_mode):
        kind = "a file" if stat.S_ISREG(st.st_mode) else "a device, FIFO or socket"
        raise CheckpointError(
            f"model path is {kind}, not a directory", file=path, hint="point the recipe at a model directory"
        )


def open_checkpoint(url: str, *, allow_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint directory (local or URL) reading headers only, never tensor data.

    safetensors wins when both formats are present. Pickle weights (``pytorch_model.bin`` or
    ``pytorch_model-*.bin`` + ``pytorch_model.bin.index.json``) are used only with
    ``allow_pickle``, and then only through ``torch_zip_entries`` (weights_only unpickling).
    """
    url = url.rstrip("/") if not is_local(url) else url
    check_model_dir(url)
    cfg_url = join_url(url, "config.json")
    config: dict[str, Any] = _check_config(read_json_file(cfg_url, what="config.json") or {}, cfg_url)
    index_url = join_url(url, "model.safetensors.index.json")
    index = read_json_file(index_url, what="index")
    shard_names: dict[str, str] = {}
    if index is not None:
        shard_names = _read_index(index_url, index)
        files = sorted(set(shard_names.values()))
    elif exists(join_url(url, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        index_url = join_url(url, PICKLE_INDEX)
        index = read_json_file(index_url, what="index")
        if index is not None:
            pickled = index_url
        elif exists(join_url(url, PICKLE_SINGLE)):
            pickled = join_url(url, PICKLE_SINGLE)
        else:
            others = [n for n in list_dir(url) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            if others:
                raise CheckpointError(
                    "only pickle weights found, and not in Hugging Face layout",
                    file=join_url(url, others[0]),
                    hint="convert the checkpoint to safetensors; raymerge never unpickles by default",
                )
            raise CheckpointError(
                "no model.safetensors or model.safetensors.index.json",
                file=url,
                hint="point the recipe at a Hugging Face model directory",
            )
        if not allow_pickle:
            raise CheckpointError("checkpoint has only pickle weights", file=pickled, hint=PICKLE_OPT_IN)
        if index is not None:
            shard_names = _read_index(index_url, index)
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
                    file=index_url,
                    tensor=tname,
                )
            entries[tname] = entry
            shard_of[tname] = surl
    missing = sorted(set(shard_names) - set(entries))
    if missing:
        raise CheckpointError(
            f"index lists {len(missing)} tensor(s) no shard contains", file=index_url, tensor=missing[0]
        )
    return Checkpoint(url=url, config=config, shard_of=shard_of, entries=entries)


__all__ = [
    "DTYPES",
    "FLOAT_TAGS",
    "READ_STATS",
    "TAG_OF_DTYPE",
    "Checkpoint",
    "ShardReader",
    "TensorEntry",
    "clear_shard_cache",
    "dtype_from_name",
    "exists",
    "is_local",
    "join_url",
    "list_dir",
    "local_path",
    "open_checkpoint",
    "open_shard",
    "output_overlap",
    "parse_header",
    "check_model_dir",
    "read_blob",
    "read_json_file",
    "read_text",
    "row_span",
    "with_retries",
]
