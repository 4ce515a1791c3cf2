"""Bounded, strict reading of the small files raymerge parses (configs, indexes, recipes, journals).

Every reader here refuses what is not a regular file (a FIFO would block forever, ``/dev/zero``
never ends, a directory is not a file), caps the bytes it reads before reading them, and turns
every way the content can be wrong — not UTF-8, not JSON, nested too deep, an integer with
thousands of digits, a duplicate key, a list where an object belongs — into one
``RaymergeError`` subclass naming the file. Nothing in this module raises anything else.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any

from raymerge.engine.errors import RaymergeError

# Caps on what a side file may hold; far above any real file of its kind.
SMALL_FILE_BYTES = 64 << 20  # config.json, indexes, journals, receipts, recipes
MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 40


def read_regular(
    path: str | os.PathLike[str],
    *,
    limit: int = SMALL_FILE_BYTES,
    error: type[RaymergeError] = RaymergeError,
    what: str = "file",
) -> bytes:
    """The bytes of a local regular file of at most ``limit`` bytes (symlinks to one are fine).

    Opened non-blocking so a FIFO cannot hang the open; the kind and size are checked on the
    open descriptor, so the file cannot be swapped between the check and the read.
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise error(f"{what} does not exist", file=name) from None
    except IsADirectoryError:
        raise error(f"{what} is a directory, not a file", file=name) from None
    except OSError as exc:
        raise error(f"cannot open {what}: {exc.strerror}", file=name) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{what} is a directory, not a file", file=name)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} is not a regular file (a FIFO, socket or device)", file=name)
        if st.st_size > limit:
            raise error(f"{what} is {st.st_size} bytes, more than the {limit}-byte limit for it", file=name)
        chunks, left = [], limit + 1
        while left > 0:
            try:
                piece = os.read(fd, min(left, 1 << 20))
            except OSError as exc:
                raise error(f"cannot read {what}: {exc.strerror}", file=name) from None
            if not piece:
                break
            chunks.append(piece)
            left -= len(piece)
        data = b"".join(chunks)
        if len(data) > limit:
            raise error(f"{what} grew past the {limit}-byte limit while being read", file=name)
        return data
    finally:
        os.close(fd)


def decode_text(data: bytes, *, file: str, error: type[RaymergeError] = RaymergeError, what: str = "file") -> str:
    """UTF-8 text (a leading BOM is dropped), or one error naming the file."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8 text (byte {exc.start})", file=file) from None


def _nesting_depth(text: str) -> int:
    """Deepest bracket nesting outside JSON strings (a linear scan, no recursion)."""
    depth = deepest = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


class _Refused(ValueError):
    pass


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise _Refused(f"duplicate key {k!r}")
        out[k] = v
    return out


def _bounded_int(s: str) -> int:
    if len(s.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(s)} digits")
    return int(s)


def parse_json(
    text: str | bytes,
    *,
    file: str,
    expect: type | tuple[type, ...] | None = dict,
    error: type[RaymergeError] = RaymergeError,
    what: str = "file",
    max_depth: int = MAX_JSON_DEPTH,
) -> Any:
    """Parse JSON strictly: bounded depth and integers, no duplicate keys, top level of ``expect``."""
    if isinstance(text, bytes):
        text = decode_text(text, file=file, error=error, what=what)
    if _nesting_depth(text) > max_depth:
        raise error(f"{what} nests more than {max_depth} levels deep", file=file)
    try:
        value = json.loads(text, object_pairs_hook=_unique_object, parse_int=_bounded_int)
    except _Refused as exc:
        raise error(f"{what} is not acceptable JSON: {exc}", file=file) from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise error(f"{what} is not valid JSON: {exc}", file=file) from None
    if expect is not None and not isinstance(value, expect):
        names = " or ".join(t.__name__ for t in (expect if isinstance(expect, tuple) else (expect,)))
        kinds: dict[type, str] = {dict: "object", list: "array"}
        kind = kinds.get(type(value), type(value).__name__)
        raise error(f"{what} holds a JSON {kind} where a {names.replace('dict', 'object')} belongs", file=file)
    return value


def read_json(
    path: str | os.PathLike[str],
    *,
    expect: type | tuple[type, ...] | None = dict,
    error: type[RaymergeError] = RaymergeError,
    what: str = "file",
    limit: int = SMALL_FILE_BYTES,
) -> Any:
    """``parse_json`` of a local regular file read through ``read_regular``."""
    name = os.fspath(path)
    data = read_regular(name, limit=limit, error=error, what=what)
    return parse_json(data, file=name, expect=expect, error=error, what=what)
