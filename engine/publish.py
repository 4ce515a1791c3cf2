"""Publishing a model directory: fill a local staging directory, then make it appear in one step.

Every writer of model directories — merges (``writer.Staging`` adds the journal and resume),
``align`` and TACT ``fold`` — goes through ``ModelPublication``::

    with ModelPublication(out, overwrite=overwrite, error=AlignmentError) as pub:
        pub.check(inputs)        # before any compute: an input or an existing model at ``out``
        staging = pub.start()    # an empty local directory: write shards and side files here
        ...
        pub.publish()            # leaving the block without it deletes the staging directory

A local ``OUT`` is staged in ``OUT.raymerge-staging`` beside it (same file system, so publishing
is a rename). Replacing an existing ``OUT`` swaps the two directories in one step (Linux
``renameat2(RENAME_EXCHANGE)``), so some complete model is at ``OUT`` at every moment; where the
swap is unsupported the old directory is renamed aside first (a window of one rename) and put
back if the second rename fails. The old model is deleted only after the new one is in place.

A remote ``OUT`` (``s3://…``, any writable fsspec URL) is staged under ``$RAYMERGE_STAGING_ROOT``
(default ``~/.cache/raymerge/staging``), one directory per output URL, and uploaded by
``RemoteOutput`` with the loader's entry points last; the local copy is removed once the upload
is complete.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import fsspec
from fsspec.callbacks import Callback
from tqdm import tqdm

from raymerge.engine.errors import OutputError, RaymergeError
from raymerge.engine.storage import (
    exists,
    is_local,
    join_url,
    list_dir,
    local_path,
    output_overlap,
    read_blob,
    with_retries,
)

log = logging.getLogger(__name__)

META = ".raymerge"  # raymerge's own files inside a model directory (plan, journal, receipts, alignment)
INDEX = "model.safetensors.index.json"
UPLOADS = f"{META}/uploads.json"  # local bookkeeping of a remote publish; never uploaded
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "spiece.model",
    "chat_template.jinja",
    "generation_config.json",
)
# Files besides the weights that make a directory a usable Hugging Face model.
SIDE_FILES = ("config.json", *TOKENIZER_FILES)
STAGING_SUFFIX = ".raymerge-staging"
OLD_SUFFIX = ".raymerge-old"


def default_staging_root() -> Path:
    """Where remote outputs are staged: ``$RAYMERGE_STAGING_ROOT``, else ``~/.cache/raymerge/staging``.

    With ``--executor ray`` every node that should take work must see this directory (a shared
    mount); nodes that do not are left out by the node probe.
    """
    root = os.environ.get("RAYMERGE_STAGING_ROOT")
    return Path(root) if root else Path.home() / ".cache" / "raymerge" / "staging"


def copy_side_files(src: str, dst: Path, names: Iterable[str] = SIDE_FILES) -> None:
    """Copy those of ``names`` that model directory ``src`` (path or URL) has into directory ``dst``."""
    if is_local(src):
        present = set(list_dir(src))
        for name in names:
            if name in present:
                shutil.copyfile(local_path(join_url(src, name)), dst / name)
        return
    for name in names:
        data = read_blob(join_url(src, name))  # bytes: tokenizer.model and spiece.model are binary
        if data is not None:
            (dst / name).write_bytes(data)


class _BarCallback(Callback):
    """Byte progress of one upload attempt on a shared bar; a retry first takes its bytes back."""

    def __init__(self, bar: tqdm) -> None:
        super().__init__()
        self.bar = bar
        self.reported = 0

    def relative_update(self, inc: int = 1) -> None:
        self.reported += inc
        self.bar.update(inc)

    def restart(self) -> None:
        self.bar.update(-self.reported)
        self.reported = 0


class RemoteOutput:
    """A model directory at an fsspec URL prefix, written by uploading a finished staging directory.

    Object stores have no rename, so a prefix cannot appear in one step. Instead the objects a
    loader opens first go last: every other file (config, tokenizer files, card, ``.raymerge/``,
    numbered shards ``model-XXXXX-of-YYYYY.safetensors``, which loaders reach only through the
    index) goes up before ``model.safetensors`` (single-shard outputs) and the index. Each PUT is
    atomic (an object appears whole or not at all), so an entry point appears only after
    everything it refers to is there: a failed or interrupted upload leaves no loadable model.
    Uploading to a temporary prefix and copying would not be atomic either (copies are per object
    too) and would move every byte twice. Each upload is retried with backoff; a local
    ``.raymerge/uploads.json`` records what landed, so a rerun after a failed upload sends only
    what is missing or changed.
    """

    ENTRY_POINTS = ("model.safetensors", INDEX)  # in upload order: these go after everything else

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        fs, self.path = fsspec.core.url_to_fs(self.url)
        self.fs: fsspec.AbstractFileSystem = fs

    def _url(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    def _remote(self, rel: str) -> str:
        return f"{self.path.rstrip('/')}/{rel}"

    def holds_model(self) -> bool:
        """Whether a loader would find a model here now (either entry point exists)."""
        return any(exists(self._url(n)) for n in self.ENTRY_POINTS)

    def check_writable(self) -> None:
        """Write and delete a small object now, so bad credentials or a missing bucket fail before compute."""
        rel = f"{META}/write-probe"
        fs, remote = self.fs, self._remote(rel)
        with_retries(lambda: fs.pipe_file(remote, b"raymerge"), self._url(rel), "test write", error=OutputError)
        try:
            self._delete(rel)
        except OutputError as exc:  # write-only credentials: a stray probe under .raymerge/ is harmless
            log.warning("could not delete the write probe: %s", exc)

    def _delete(self, rel: str) -> None:
        fs, remote = self.fs, self._remote(rel)
        with contextlib.suppress(FileNotFoundError):
            with_retries(lambda: fs.rm_file(remote), self._url(rel), "delete", missing_ok=True, error=OutputError)

    def _size(self, rel: str) -> int | None:
        fs, remote = self.fs, self._remote(rel)
        try:
            info = with_retries(lambda: fs.info(remote), self._url(rel), "stat", missing_ok=True, error=OutputError)
        except FileNotFoundError:
            return None
        return int(info.get("size") or 0)

    def upload(self, local: Path, *, overwrite: bool, progress: bool = False) -> int:
        """Upload every file under ``local`` (entry points last); return the bytes sent.

        With ``overwrite``, an existing model's entry points are deleted first (so it stops being
        loadable before any of its files change), and objects the new model does not have are
        deleted before the new entry points go up. ``progress`` shows a byte progress bar.
        """
        record = local / UPLOADS
        tmp = record.with_suffix(".tmp")
        record.parent.mkdir(exist_ok=True)  # outputs without raymerge's own files (a TACT fold)
        names = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file() and p not in (record, tmp)}
        done: dict[str, list[int]] = {}
        with contextlib.suppress(OSError, ValueError):
            done = json.loads(record.read_text())
        if overwrite:
            for rel in self.ENTRY_POINTS:
                self._delete(rel)
        sent = 0
        bar = tqdm(
            total=sum((local / n).stat().st_size for n in names),
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"upload {self.url}",
            disable=not progress,
            file=sys.stderr,
            dynamic_ncols=True,
        )

        def put(rel: str) -> None:
            nonlocal sent
            st = (local / rel).stat()
            key = [st.st_size, st.st_mtime_ns]
            if done.get(rel) == key and self._size(rel) == st.st_size:
                bar.update(st.st_size)
                return  # landed in an earlier attempt and unchanged since
            src, fs, remote, cb = str(local / rel), self.fs, self._remote(rel), _BarCallback(bar)

            def attempt() -> None:
                cb.restart()
                fs.put_file(src, remote, callback=cb)
                cb.relative_update(st.st_size - cb.reported)  # backends that report nothing

            with_retries(attempt, self._url(rel), "upload", error=OutputError)
            sent += st.st_size
            done[rel] = key
            tmp.write_text(json.dumps(done))
            os.replace(tmp, record)

        with bar:
            for rel in sorted(names - set(self.ENTRY_POINTS)):
                put(rel)
            if overwrite:
                self._delete_stale(names)
            for rel in self.ENTRY_POINTS:
                if rel in names:
                    put(rel)
        return sent

    def _delete_stale(self, keep: set[str]) -> None:
        fs, root = self.fs, self.path.rstrip("/")
        try:
            found = with_retries(lambda: fs.find(root), self.url, "list", missing_ok=True, error=OutputError)
        except FileNotFoundError:
            return
        for path in found:
            rel = str(path)[len(root) + 1 :] if str(path).startswith(root + "/") else None
            if rel and rel not in keep:
                self._delete(rel)


def _slug(url: str) -> str:
    """A readable file-system-safe name for a staging directory of ``url``."""
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", url.rstrip("/").rsplit("/", 1)[-1])[:40] or "out"
    return f"{tail}-{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:12]}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (deepest first), then ``root`` itself."""
    for dirpath, _, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _remove(path: Path) -> None:
    """Delete a directory tree, a file or a link at ``path``; nothing there is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap the entries at ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False where the platform, C library or file system cannot, so the caller falls back
    to two renames; any other failure raises ``OSError``.
    """
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:  # C library older than glibc 2.28
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class ModelPublication:
    """One model directory on its way to ``out``: a local staging directory, then one publish step.

    ``out`` is a local path or a writable fsspec URL. ``error`` is the exception class refusals
    raise (the caller's part of the ``RaymergeError`` hierarchy) and ``exists_message`` what they
    say about an existing output. ``progress`` shows a byte progress bar while uploading.
    """

    def __init__(
        self,
        out: str | Path,
        *,
        overwrite: bool = False,
        staging_root: str | Path | None = None,
        progress: bool = False,
        error: type[RaymergeError] = OutputError,
        exists_message: str = "output directory exists",
    ) -> None:
        text = str(out)
        self.remote = None if is_local(text) else RemoteOutput(text)
        self.final: Path | None = None
        if self.remote is None:
            self.final = Path(local_path(text)).absolute()
            self.dir = self.final.with_name(self.final.name + STAGING_SUFFIX)
            self.target = str(self.final)
        else:
            root = Path(staging_root) if staging_root is not None else default_staging_root()
            self.dir = root.absolute() / f"{_slug(text)}{STAGING_SUFFIX}"
            self.target = self.remote.url
        self.overwrite = overwrite
        self.progress = progress
        self.error = error
        self.exists_message = exists_message
        self._started = False
        self._published = False

    def __enter__(self) -> ModelPublication:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()

    def holds_model(self) -> bool:
        """Whether something is at a local output path, or a loadable model at a remote one."""
        if self.remote is not None:
            return self.remote.holds_model()
        assert self.final is not None
        return os.path.lexists(self.final)

    def check(
        self, inputs: Sequence[str] = (), *, role: str = "input model", hint: str = "write to a new directory"
    ) -> None:
        """Refuse, before any compute, an output that is or contains one of ``inputs`` (overwriting
        it would delete what is being read; even with ``overwrite``) and an existing output without
        ``overwrite``; for a URL, also write a probe object so bad credentials fail now.
        ``role`` names the inputs and ``hint`` says what to do instead, in the first refusal.
        """
        hit = output_overlap(self.target, inputs)
        if hit is not None:
            raise self.error(f"the output {hit[1]} the {role} {hit[0]}", file=self.target, hint=hint)
        if not self.overwrite and self.holds_model():
            message = self.exists_message if self.remote is None else "output already holds a model"
            raise self.error(message, file=self.target, hint="pass --overwrite to replace it")
        if self.remote is not None:
            self.remote.check_writable()

    def start(self) -> Path:
        """Create the staging directory empty (deleting a stale one) and return it."""
        if self.dir.exists():
            log.warning("deleting a stale staging directory %s", self.dir)
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self._started = True
        return self.dir

    def publish(self) -> str:
        """fsync the staging directory and make it the output; return the output path or URL.

        Local: a rename (an exchange when replacing). Remote: an upload, entry points last, then
        the staging directory is deleted. ``OSError`` (a full disk, a failed rename) propagates with
        the previous output still in place; an upload that keeps failing raises ``OutputError``.
        """
        _fsync_tree(self.dir)
        if self.remote is not None:
            sent = self.remote.upload(self.dir, overwrite=self.overwrite, progress=self.progress)
            log.info("uploaded %d bytes to %s", sent, self.remote.url)
            self._published = True
            shutil.rmtree(self.dir, ignore_errors=True)
            return self.remote.url
        final = self.final
        assert final is not None
        if not os.path.lexists(final):
            os.rename(self.dir, final)
        elif not self.overwrite:  # appeared while this output was being written
            raise self.error(self.exists_message, file=self.target, hint="pass --overwrite to replace it")
        else:
            self._replace(final)
        self._published = True
        _fsync_path(final.parent)
        for leftover in (final.with_name(final.name + OLD_SUFFIX), self.dir):  # the previous output, if any
            with contextlib.suppress(OSError):  # the new model is in place; a leftover goes next time
                _remove(leftover)
        return self.target

    def _replace(self, final: Path) -> None:
        """Put the staging directory at ``final`` and the previous output at ``final`` + OLD_SUFFIX."""
        old = final.with_name(final.name + OLD_SUFFIX)
        _remove(old)  # left by an earlier run that stopped before deleting it
        if _exchange(self.dir, final):
            # The staging name now holds the previous output: move it off that name at once, so a
            # crash before it is deleted cannot leave it looking like a staging area to resume.
            with contextlib.suppress(OSError):
                os.rename(self.dir, old)
            return
        os.rename(final, old)
        try:
            os.rename(self.dir, final)
        except OSError:
            os.rename(old, final)
            raise

    def discard(self) -> None:
        """Delete the staging directory this publication created, unless it was published."""
        if self._started and not self._published:
            shutil.rmtree(self.dir, ignore_errors=True)
            self._started = False
