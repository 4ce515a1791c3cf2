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
import re
import stat
from typing import Any

import yaml

from raymerge.engine.errors import RaymergeError

# Caps on what a side file may hold; far above any real file of its kind.
SMALL_FILE_BYTES = 64 << 20  # config.json, indexes, journals, receipts, recipes
MAX_JSON_DEPTH = 64
MAX_INT_DIGITS = 40
MAX_YAML_NODES = 100_000  # nodes after alias expansion: a recipe has hundreds


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
    data = _read(os.fspath(path), limit, error, what, missing_ok=False)
    assert data is not None
    return data


def read_optional(
    path: str | os.PathLike[str],
    *,
    limit: int = SMALL_FILE_BYTES,
    error: type[RaymergeError] = RaymergeError,
    what: str = "file",
) -> bytes | None:
    """``read_regular``, or None when the file does not exist (a missing optional side file)."""
    return _read(os.fspath(path), limit, error, what, missing_ok=True)


def _read(name: str, limit: int, error: type[RaymergeError], what: str, *, missing_ok: bool) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        if missing_ok:
            return None
        raise error(f"{what} does not exist", file=name) from None
    except IsADirectoryError:
        raise error(f"{what} is a directory, not a file", file=name) from None
    except NotADirectoryError:
        raise error(f"{what} cannot exist: a path component above it is a file, not a directory", file=name) from None
    except OSError as exc:
        raise error(f"cannot open {what}: {exc.strerror}", file=name) from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise error(f"{what} is a directory, not a file", file=name)
        if not stat.S_ISREG(st.st_mode):
            raise error(f"{what} is not a regular file (a FIFO, socket or device)", file=name)
        check_size(st.st_size, limit, file=name, error=error, what=what)
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


def check_size(
    size: int, limit: int, *, file: str, error: type[RaymergeError] = RaymergeError, what: str = "file"
) -> None:
    """Refuse ``size`` bytes over ``limit`` (remote reads ask for at most ``limit + 1`` bytes and call this)."""
    if size > limit:
        raise error(f"{what} is larger than the {limit}-byte limit for it", file=file)


def require_regular(
    path: str | os.PathLike[str], *, error: type[RaymergeError] = RaymergeError, what: str = "file"
) -> None:
    """Refuse what is missing or not a regular file before a library opens it (a FIFO would block)."""
    name = os.fspath(path)
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise error(f"{what} does not exist", file=name) from None
    except OSError as exc:
        raise error(f"cannot open {what}: {exc.strerror}", file=name) from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{what} is a directory, not a file", file=name)
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} is not a regular file (a FIFO, socket or device)", file=name)


def decode_text(data: bytes, *, file: str, error: type[RaymergeError] = RaymergeError, what: str = "file") -> str:
    """UTF-8 text (a leading BOM is dropped), or one error naming the file."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not UTF-8 text (byte {exc.start})", file=file) from None


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)  # a JSON string (an unterminated one runs to the end)
_BRACKET = re.compile(r"[\[\]{}]")


def _nesting_depth(text: str) -> int:
    """Deepest bracket nesting outside JSON strings, without recursion (the strings are cut out
    by one regex pass, then only the brackets are visited)."""
    depth = deepest = 0
    for ch in _BRACKET.findall(_STRING.sub("", text)):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
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


class _StrictYamlLoader(yaml.SafeLoader):
    """The safe loader, refusing a mapping that repeats a key (YAML's spec forbids it; PyYAML would
    silently keep the last value, so `merge_method` given twice would run the second method), and
    a document whose node graph, with every alias expanded, exceeds ``MAX_YAML_NODES`` — a
    "billion laughs" alias bomb is a few hundred bytes that expand to billions of nodes."""

    def get_single_node(self) -> yaml.Node | None:
        return _bounded(super().get_single_node())

    def get_node(self) -> yaml.Node | None:  # each document of ``load_all``
        return _bounded(super().get_node())

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            try:
                hash(key)
            except TypeError:
                continue  # the base constructor reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"duplicate key {key!r} (first given on line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _bounded(node: yaml.Node | None) -> yaml.Node | None:
    if node is not None and _expanded_nodes(node) > MAX_YAML_NODES:
        raise _Refused(f"its aliases expand to more than {MAX_YAML_NODES} nodes")
    return node


def _expanded_nodes(root: yaml.Node) -> int:
    """How many nodes the graph under ``root`` has once aliases are expanded, counted without
    expanding them: each distinct node's count is computed once (iteratively, post-order), and a
    cycle counts as over the limit."""
    counts: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        if done:
            on_path.discard(key)
            counts[key] = min(1 + sum(counts[id(c)] for c in children), MAX_YAML_NODES + 1)
            continue
        if key in counts:
            continue
        if key in on_path:
            return MAX_YAML_NODES + 1  # a recursive alias
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in counts)
    return counts[id(root)]


def load_yaml(text: str, *, file: str, error: type[RaymergeError] = RaymergeError, what: str = "file") -> Any:
    """YAML through the safe loader: duplicate keys refused, alias expansion and nesting bounded;
    any failure is one ``error`` naming the file (with the line and column where YAML says)."""
    return _load(text, False, file, error, what)


def load_yaml_documents(
    text: str, *, file: str, error: type[RaymergeError] = RaymergeError, what: str = "file"
) -> list[Any]:
    """Every document of a YAML stream (``---`` separated), each loaded as ``load_yaml`` does."""
    docs = _load(text, True, file, error, what)
    assert isinstance(docs, list)
    return docs


def _load(text: str, every: bool, file: str, error: type[RaymergeError], what: str) -> Any:
    if _nesting_depth(text) > MAX_JSON_DEPTH * 4:  # flow-style nesting; block nesting is bounded by indentation
        raise error(f"{what} nests more than {MAX_JSON_DEPTH * 4} levels deep", file=file)
    try:
        if every:
            return list(yaml.load_all(text, Loader=_StrictYamlLoader))  # noqa: S506 - a SafeLoader subclass
        return yaml.load(text, Loader=_StrictYamlLoader)  # noqa: S506 - a SafeLoader subclass
    except _Refused as exc:
        raise error(f"{what} is refused: {exc}", file=file) from None
    except RecursionError:
        raise error(f"{what} nests too deep", file=file) from None
    except yaml.YAMLError as exc:
        problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        detail = f"{problem}{where}" if problem else " ".join(str(exc).split())
        raise error(f"{what} is not valid YAML: {detail}", file=file) from None
