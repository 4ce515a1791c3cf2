"""Staging shards, the receipt journal, resume, and the atomic commit that publishes a model.

Layout while a merge runs (``OUT`` is the requested output directory)::

    OUT.raymerge-staging/
        model-00001-of-0000N.safetensors   pre-sized; tasks pwrite into them
        .raymerge/plan.json                fingerprint of the plan (resume only if it matches)
        .raymerge/journal.jsonl            one receipt per finished task (append-only)

``commit`` checks that every task has a receipt, writes the index, config, tokenizer files and
model card, fsyncs, and renames the staging directory to ``OUT`` in one step. Nothing at ``OUT``
looks like a model before that rename.

A remote ``OUT`` (``s3://…``, any writable fsspec URL) is staged locally under
``$RAYMERGE_STAGING_ROOT`` (default ``~/.cache/raymerge/staging``), one directory per output URL,
with the same journal and resume; ``commit`` then uploads it (``RemoteOutput``) and removes the
local copy only once the upload is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import fsspec
from fsspec.callbacks import Callback
from tqdm import tqdm

from raymerge.engine.errors import OutputError
from raymerge.engine.plan import MergePlan, OutputShard
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
from raymerge.engine.task import Receipt

log = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json",
    "merges.txt", "vocab.txt", "added_tokens.json", "spiece.model", "chat_template.jinja", "generation_config.json",
)  # fmt: skip
META = ".raymerge"
INDEX = "model.safetensors.index.json"
UPLOADS = f"{META}/uploads.json"  # local bookkeeping of a remote publish; never uploaded


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


def default_staging_root() -> Path:
    """Where remote outputs are staged: ``$RAYMERGE_STAGING_ROOT``, else ``~/.cache/raymerge/staging``.

    With ``--executor ray`` every node that should take work must see this directory (a shared
    mount); nodes that do not are left out by the node probe.
    """
    root = os.environ.get("RAYMERGE_STAGING_ROOT")
    return Path(root) if root else Path.home() / ".cache" / "raymerge" / "staging"


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
        names = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file() and p not in (record, tmp)}
        done: dict[str, list[int]] = {}
        with contextlib.suppress(OSError, ValueError):
            done = json.loads(record.read_text())
        if overwrite:
            for rel in self.ENTRY_POINTS:
                self._delete(rel)
        sent = 0
        bar = tqdm(
            total=sum((local / n).stat().st_size for n in names), unit="B", unit_scale=True, unit_divisor=1024,
            desc=f"upload {self.url}", disable=not progress, file=sys.stderr, dynamic_ncols=True,
        )  # fmt: skip

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


class Staging:
    """The staging area of one merge: pre-allocated shards plus the journal of receipts."""

    def __init__(
        self,
        out_dir: str | Path,
        plan: MergePlan,
        *,
        overwrite: bool = False,
        staging_root: str | Path | None = None,
        progress: bool = False,
    ) -> None:
        out = str(out_dir)
        self.remote = None if is_local(out) else RemoteOutput(out)
        if self.remote is None:
            self.final = Path(local_path(out)).absolute()
            self.dir = self.final.with_name(self.final.name + ".raymerge-staging")
        else:
            root = Path(staging_root) if staging_root is not None else default_staging_root()
            self.dir = root.absolute() / f"{_slug(out)}.raymerge-staging"
            self.final = self.dir  # never renamed: commit uploads it, then removes it
        self.plan = plan
        self.overwrite = overwrite
        self.progress = progress
        self._journal_lock = threading.Lock()
        self._journal: Any = None
        self._last_sync = 0.0

    @property
    def meta(self) -> Path:
        return self.dir / META

    def _refuse_input_overlap(self) -> None:
        """Replacing an output that is (or holds) an input model would delete the files it reads."""
        out = str(self.final) if self.remote is None else self.remote.url
        hit = output_overlap(out, self.plan.models)
        if hit is not None:
            raise OutputError(f"the output {hit[1]} the input model {hit[0]}", file=out,
                              hint="write the merge to a new directory")  # fmt: skip

    def prepare(self) -> dict[str, Receipt]:
        """Create or reopen the staging area; return receipts of tasks already done and verified."""
        self._refuse_input_overlap()
        if self.remote is not None:
            if not self.overwrite and self.remote.holds_model():
                raise OutputError("output already holds a model", file=self.remote.url,
                                  hint="pass --overwrite to replace it")  # fmt: skip
            self.remote.check_writable()
            self.dir.parent.mkdir(parents=True, exist_ok=True)
        elif self.final.exists() and not self.overwrite:
            raise OutputError("output path already exists", file=str(self.final), hint="pass --overwrite to replace it")
        elif not self.final.parent.exists():
            raise OutputError("parent directory of the output does not exist", file=str(self.final))
        fingerprint = self.plan.fingerprint()
        done: dict[str, Receipt] = {}
        plan_file = self.meta / "plan.json"
        if self.dir.exists():
            staged = None
            with contextlib.suppress(OSError, ValueError, KeyError):
                staged = json.loads(plan_file.read_text())["fingerprint"]
            if staged == fingerprint:
                done = self._verified_receipts()
                log.info("resuming %s: %d of %d tasks already done", self.dir, len(done), len(self.plan.tasks))
            else:
                log.warning("discarding staging area of a different merge at %s", self.dir)
                shutil.rmtree(self.dir)
        if not self.dir.exists():
            self.meta.mkdir(parents=True)
            for shard in self.plan.shards:
                self._allocate(shard)
            plan_file.write_text(json.dumps({"fingerprint": fingerprint, "summary": self.plan.summary()}, indent=1))
        self._journal = open(self.meta / "journal.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        return done

    def _allocate(self, shard: OutputShard) -> None:
        path = self.dir / shard.name
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
        try:
            os.pwrite(fd, len(shard.header).to_bytes(8, "little") + shard.header, 0)
            try:
                # Reserve the space now so a full disk fails before hours of compute, not after.
                os.posix_fallocate(fd, 0, shard.size)
            except OSError as exc:
                if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                    raise OutputError(
                        f"not enough disk space for {shard.size / 2**30:.2f} GiB shard", file=str(path),
                        hint="free space and run again",
                    ) from None  # fmt: skip
                os.ftruncate(fd, shard.size)  # filesystems without fallocate
        finally:
            os.close(fd)

    def _verified_receipts(self) -> dict[str, Receipt]:
        """Receipts from the journal whose bytes in the staging shards still match their CRC."""
        by_id = {t.id: t for t in self.plan.tasks}
        done: dict[str, Receipt] = {}
        journal = self.meta / "journal.jsonl"
        if not journal.exists():
            return done
        for line in journal.read_text(encoding="utf-8").splitlines():
            try:
                r = Receipt(**json.loads(line))
            except (ValueError, TypeError):
                continue  # a torn last line after a crash
            task = by_id.get(r.id)
            if task is None:
                continue
            with open(self.dir / task.output.shard, "rb") as f:
                f.seek(task.output.offset)
                if zlib.crc32(f.read(task.output.nbytes)) == r.crc32:
                    done[r.id] = r
        return done

    def record(self, receipt: Receipt) -> None:
        """Append a receipt to the journal (flushed now; fsynced at most every 2 s and at commit)."""
        with self._journal_lock:
            self._journal.write(json.dumps(receipt.to_json()) + "\n")
            self._journal.flush()
            now = time.monotonic()
            if now - self._last_sync > 2.0:
                os.fsync(self._journal.fileno())
                self._last_sync = now

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def commit(self, receipts: dict[str, Receipt], card: str) -> str:
        """Verify coverage, write metadata files, fsync, and publish. Returns the output path or URL.

        Any I/O failure here (a full disk, an upload that keeps failing) leaves the staging area
        as it is, so running the same merge again resumes straight to this step.
        """
        missing = [t.id for t in self.plan.tasks if t.id not in receipts]
        if missing:
            raise OutputError(f"{len(missing)} task(s) have no receipt; not publishing", tensor=missing[0])
        self.close()
        try:
            return self._publish(receipts, card)
        except OSError as exc:
            raise OutputError(
                f"cannot publish the merged model: {exc.strerror or exc}", file=str(self.dir),
                hint="free space (or fix permissions) and run the same command again to resume",
            ) from None  # fmt: skip

    def _publish(self, receipts: dict[str, Receipt], card: str) -> str:
        self._write_metadata(receipts, card)
        if self.remote is not None:
            sent = self.remote.upload(self.dir, overwrite=self.overwrite, progress=self.progress)
            log.info("uploaded %d bytes to %s", sent, self.remote.url)
            shutil.rmtree(self.dir, ignore_errors=True)
            return self.remote.url
        old = None
        if self.final.exists():
            old = self.final.with_name(self.final.name + ".raymerge-old")
            if old.exists():
                shutil.rmtree(old)
            os.rename(self.final, old)
        os.rename(self.dir, self.final)
        _fsync_path(self.final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return str(self.final)

    def _write_metadata(self, receipts: dict[str, Receipt], card: str) -> None:
        """Index, config, tokenizer files, card and receipts into the staging directory, fsynced."""
        plan = self.plan
        weight_map = {name: s.name for s in plan.shards for name in s.tensors}
        total = sum(t.output.nbytes for t in plan.tasks)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = dict(plan.config)
        if plan.out_dtype:
            config["torch_dtype"] = plan.out_dtype
            if "dtype" in config:
                config["dtype"] = plan.out_dtype
        if config:
            (self.dir / "config.json").write_text(json.dumps(config, indent=2))
        if plan.tokenizer_from:
            self._copy_tokenizer(plan.tokenizer_from)
        (self.dir / "README.md").write_text(card, encoding="utf-8")
        # Where each task's bytes are, so `raymerge verify` can recompute every checksum later.
        ordered = [{**receipts[t.id].to_json(), "shard": t.output.shard, "offset": t.output.offset} for t in plan.tasks]
        (self.meta / "receipts.json").write_text(json.dumps(ordered))
        for p in self.dir.iterdir():
            if p.is_file():
                _fsync_path(p)
        _fsync_path(self.dir)

    def _copy_tokenizer(self, src: str) -> None:
        names = set(list_dir(src)) if is_local(src) else set()
        for fname in TOKENIZER_FILES:
            url = join_url(src, fname)
            if is_local(src):
                if fname in names:
                    shutil.copyfile(local_path(url), self.dir / fname)
            else:
                data = read_blob(url)  # bytes: tokenizer.model and spiece.model are binary
                if data is not None:
                    (self.dir / fname).write_bytes(data)
