"""Checks of a local output path before any work, so a bad one is one line, not a traceback at
publish time: the root directory, the current directory, a name too long for the filesystem once
raymerge's staging suffix is added, a parent that is a file, a parent that cannot be written.
"""

from __future__ import annotations

import errno
import os
import stat

from raymerge.engine.errors import OutputError
from raymerge.engine.storage import is_local, local_path

# The longest suffix raymerge adds to an output's name (its staging and replaced-output siblings).
SUFFIX_ROOM = len(".raymerge-staging")


def _name_max(directory: str) -> int:
    try:
        return int(os.pathconf(directory, "PC_NAME_MAX"))
    except (OSError, ValueError):
        return 255


def _nearest_existing(path: str) -> str:
    """``path`` or its nearest ancestor that exists (``lexists``: a dangling link counts)."""
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def check_output_path(out: str) -> None:
    """Refuse a local output path that cannot work, with one ``OutputError`` line naming it."""
    if not is_local(out):
        return
    raw = local_path(out)
    if not raw or "\x00" in raw:
        raise OutputError("the output path is empty or holds a NUL byte", file=repr(raw))
    path = os.path.abspath(raw)
    if os.path.dirname(path) == path:
        raise OutputError("the output cannot be the root directory", file=raw, hint="name a new directory")
    real = os.path.realpath(path)
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:
        cwd = ""
    if cwd and (cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep)):
        raise OutputError(
            "the output is (or holds) the current directory, which publishing would replace",
            file=raw,
            hint="name a new directory, or run from outside it",
        )
    parent = os.path.dirname(path)
    existing = _nearest_existing(parent)
    try:
        st = os.stat(existing)
    except OSError as exc:
        raise OutputError(f"cannot inspect the output's parent: {exc.strerror}", file=existing) from None
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(
            "a parent of the output is a file, not a directory", file=existing, hint="choose another output path"
        )
    limit = _name_max(existing)
    for part in path.split(os.sep):
        if len(os.fsencode(part)) > limit:
            raise OutputError(
                f"a name in the output path is {len(os.fsencode(part))} bytes, over the filesystem's {limit}",
                file=raw,
                hint="use a shorter name",
            )
    name = os.path.basename(path)
    if len(os.fsencode(name)) + SUFFIX_ROOM > limit:
        raise OutputError(
            f"the output's name is {len(os.fsencode(name))} bytes; with raymerge's staging suffix it would be "
            f"over the filesystem's {limit}",
            file=raw,
            hint=f"use a name of at most {limit - SUFFIX_ROOM} bytes",
        )
    if existing == parent and not os.access(parent, os.W_OK | os.X_OK):
        reason = "a read-only file system" if _read_only_fs(parent) else "no write permission"
        raise OutputError(
            f"cannot write in the output's parent directory ({reason})",
            file=parent,
            hint="choose a writable location, or fix its permissions",
        )


def _read_only_fs(directory: str) -> bool:
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError as exc:
        return exc.errno == errno.EROFS


__all__ = ["check_output_path"]
