"""Guards of a staging directory: one run at a time, only regular files, bytes that match the plan.

A staging directory is trusted only as far as it can be checked. ``RunLock`` keeps a second
``raymerge run`` off an output while one is running (an ``flock``, so a killed run releases it).
``check_tree`` refuses anything in staging that is not a real directory or a regular file — a
symlink is never followed, a FIFO never opened. ``shard_problem`` compares a staged shard's kind,
size and header bytes with the plan, and ``crc_of`` recomputes a task's checksum from the bytes.
``disk_full`` turns a full disk (or a file-size limit) into one line with the bytes needed and free.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import zlib
from pathlib import Path

from raymerge.engine.errors import OutputError
from raymerge.engine.plan import OutputShard

LOCK_SUFFIX = ".lock"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_CHUNK = 16 << 20


class RunLock:
    """An exclusive ``flock`` on ``path`` for the whole of one run.

    The lock file sits beside the staging directory (which a run creates, deletes and renames
    into the output, so it cannot hold the lock itself). The kernel drops the lock when the
    process dies, so a killed run never blocks the next one. Acquisition checks that the locked
    file is still the one at ``path`` (a releasing run unlinks it), so two runs can never each
    hold a lock on a different inode.
    """

    def __init__(self, path: Path, target: str) -> None:
        self.path = path
        self.target = target
        self.fd: int | None = None

    def acquire(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise OutputError(
                    f"cannot create the run's lock file: {exc.strerror}",
                    file=str(self.path),
                    hint="check that the output's parent directory is writable",
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = ""
                with contextlib.suppress(OSError):
                    holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                os.close(fd)
                raise OutputError(
                    "another raymerge run is writing this output" + (f" (pid {holder})" if holder else ""),
                    file=self.target,
                    hint="wait for it to finish, or stop it; a killed run releases the lock",
                ) from None
            except OSError as exc:
                os.close(fd)
                raise OutputError(f"cannot lock the output: {exc.strerror}", file=str(self.path)) from None
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                self.fd = fd
                return
            os.close(fd)  # released and unlinked by its previous holder meanwhile: lock the new one

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it, so no one locks the file being removed
        os.close(self.fd)
        self.fd = None


def refuse_untrusted(path: Path, what: str, staging: Path) -> OutputError:
    return OutputError(
        f"the staging directory holds {what}; it was not followed or opened",
        file=str(path),
        hint=f"delete {staging} (or pass --overwrite) to start the merge over",
    )


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "something that is not a regular file"


def check_tree(root: Path) -> None:
    """Refuse ``root`` unless it is a real directory holding only directories and regular files."""
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(
            f"the staging path is {_kind(st.st_mode) if not stat.S_ISREG(st.st_mode) else 'a file'}, not a directory",
            file=str(root),
            hint=f"delete {root} (or pass --overwrite) to start the merge over",
        )
    stack = [root]
    while stack:
        here = stack.pop()
        with os.scandir(here) as it:
            for entry in it:
                mode = entry.stat(follow_symlinks=False).st_mode
                if stat.S_ISDIR(mode):
                    stack.append(Path(entry.path))
                elif not stat.S_ISREG(mode):
                    raise refuse_untrusted(Path(entry.path), _kind(mode), root)


def regular_or_absent(path: Path, staging: Path) -> bool:
    """Whether a file raymerge reads or appends to in staging exists; refuse it if it is not a regular file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISDIR(st.st_mode):
        raise refuse_untrusted(path, "a directory where a file belongs", staging)
    if not stat.S_ISREG(st.st_mode):
        raise refuse_untrusted(path, _kind(st.st_mode), staging)
    return True


def shard_problem(path: Path, shard: OutputShard) -> str | None:
    """What is wrong with a staged shard against the plan (missing, size, header bytes), or None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"cannot be opened ({exc.strerror})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return _kind(st.st_mode)
        prefix = len(shard.header).to_bytes(8, "little") + shard.header
        head = os.pread(fd, len(prefix), 0)
        if head != prefix:
            return "header differs from the plan" if len(head) == len(prefix) else "shorter than its header"
        if st.st_size != shard.size:
            return f"{st.st_size} bytes where the plan has {shard.size}"
        return None
    finally:
        os.close(fd)


def crc_of(fd: int, offset: int, nbytes: int) -> int | None:
    """CRC32 of ``nbytes`` at ``offset`` of an open file; None if the file ends before them."""
    crc, pos, end = 0, offset, offset + nbytes
    while pos < end:
        piece = os.pread(fd, min(_CHUNK, end - pos), pos)
        if not piece:
            return None
        crc = zlib.crc32(piece, crc)
        pos += len(piece)
    return crc


def free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        try:
            return shutil.disk_usage(p).free
        except OSError:
            continue
    return None


def _fmt(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} bytes"


def disk_full(exc: OSError, path: Path, needed: int, staging: Path) -> OutputError | None:
    """One line for a write that failed for lack of space (ENOSPC, EDQUOT, EFBIG); None for other errors."""
    if exc.errno not in DISK_FULL:
        return None
    free = free_bytes(path)
    why = "file-size limit reached" if exc.errno == errno.EFBIG else "not enough disk space"
    have = f", {_fmt(free)} free" if free is not None else ""
    return OutputError(
        f"{why}: the merge needs {_fmt(needed)} more{have}",
        file=str(path),
        hint=f"staging kept at {staging}; free space and run the same command again to resume",
    )


__all__ = [
    "DISK_FULL",
    "LOCK_SUFFIX",
    "RunLock",
    "check_tree",
    "crc_of",
    "disk_full",
    "free_bytes",
    "refuse_untrusted",
    "regular_or_absent",
    "shard_problem",
]
