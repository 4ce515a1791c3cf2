"""Staging shards, the receipt journal, resume, and the commit that publishes a merged model.

Layout while a merge runs (``OUT`` is the requested output directory)::

    OUT.raymerge-staging.lock              flock held for the whole run (see ``guard.RunLock``)
    OUT.raymerge-staging/
        model-00001-of-0000N.safetensors   pre-sized; tasks pwrite into them
        .raymerge/plan.json                fingerprint of the plan (resume only if it matches)
        .raymerge/journal.jsonl            one receipt per finished task (append-only)

Only one run at a time holds an output (a second fails at once). A staging directory of another
plan is refused (``--overwrite`` discards it). Resuming trusts nothing it has not checked: every
path in staging must be a real directory or a regular file (a symlink is refused, never
followed); a shard whose size or header bytes differ from the plan gets them rewritten, and every
journal receipt is kept only if the CRC32 of its bytes still matches, so damaged tasks are redone.

``commit`` checks that every task has a receipt, checks the shards' headers and every receipt's
CRC against the bytes once more, writes the index, config, tokenizer files and model card, and
publishes the directory through ``publish.ModelPublication``: fsynced, then renamed to ``OUT`` in
one step (a remote ``OUT`` is staged under ``$RAYMERGE_STAGING_ROOT`` with the same journal and
resume, and uploaded with the loader's entry points last). Nothing at ``OUT`` looks like a model
before that step. A full disk at any moment is one line with the bytes needed and free; the
staging directory is kept and the same command resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from raymerge.engine import __version__, chat_template
from raymerge.engine.errors import OutputError
from raymerge.engine.guard import (
    DISK_FULL,
    LOCK_SUFFIX,
    RunLock,
    check_tree,
    crc_of,
    disk_full,
    refuse_untrusted,
    regular_or_absent,
    shard_problem,
)
from raymerge.engine.plan import MergePlan, OutputShard, TensorTask
from raymerge.engine.publish import (
    INDEX,
    META,
    OLD_SUFFIX,
    TOKENIZER_FILES,
    UPLOADS,
    ModelPublication,
    _remove,
    copy_side_files,
)
from raymerge.engine.safeio import parse_json, read_json, read_regular
from raymerge.engine.storage import is_local, local_path
from raymerge.engine.task import Receipt

MERGE_CONFIG = "mergekit_config.yml"
# What refusing an existing output (without --overwrite) says.
OUTPUT_EXISTS = "output path already exists"
SHARDS = "shards.json"  # in .raymerge/: each shard's size and header hash, for `raymerge verify`
JOURNAL_LIMIT = 1 << 30  # one line per task: far above any plan's journal

log = logging.getLogger(__name__)


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
        self.publication = ModelPublication(
            out_dir,
            overwrite=overwrite,
            staging_root=staging_root,
            progress=progress,
            error=OutputError,
            exists_message=OUTPUT_EXISTS,
        )
        self.dir = self.publication.dir
        self.plan = plan
        self.overwrite = overwrite
        self.lock = RunLock(self.dir.with_name(self.dir.name + LOCK_SUFFIX), self.publication.target)
        self._journal_lock = threading.Lock()
        self._journal: int | None = None
        self._last_sync = 0.0
        self.threads: int | None = None

    @property
    def meta(self) -> Path:
        return self.dir / META

    def prepare(self, threads: int | None = None) -> dict[str, Receipt]:
        """Lock the output, create or check and reopen the staging area; return the receipts of
        tasks already done whose bytes still match. Nothing here computes: every refusal comes
        before the first task.

        ``threads`` (torch threads per task, when the executor has one count) is recorded in a new
        staging area; ``self.threads`` is then the count the staged run started with, which a
        resume must use for bit-identical results (None: not recorded).
        """
        self.threads = threads
        pub = self.publication
        pub.check(self.plan.models, hint="write the merge to a new directory")
        if pub.final is not None and not pub.final.parent.exists():
            raise OutputError("parent directory of the output does not exist", file=pub.target)
        if pub.final is None:
            self.dir.parent.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            try:
                self._stale_old_output()
                done = self._open_staging()
                self._open_journal()
            except OSError as exc:  # permissions, a vanished path, a full disk while repairing
                where = Path(exc.filename) if exc.filename else self.dir
                raise self._io_error(
                    exc, where, self.plan.write_bytes, "cannot prepare the staging directory"
                ) from None
        except BaseException:
            self.release()
            raise
        return done

    def _stale_old_output(self) -> None:
        """``OUT.raymerge-old`` is a previous output an interrupted replace left behind."""
        final = self.publication.final
        if final is None:
            return
        old = final.with_name(final.name + OLD_SUFFIX)
        if not os.path.lexists(old):
            return
        if not self.overwrite:
            raise OutputError(
                "a previous output was left here by an interrupted --overwrite",
                file=str(old),
                hint=f"move it back to {final} or delete it, or pass --overwrite to replace it",
            )
        if os.path.lexists(final):  # the replace had put the new output in place: the old one is garbage
            log.warning("deleting %s, left by an interrupted --overwrite", old)
            _remove(old)
        # Otherwise it is the output being replaced; publishing deletes it once the new one is in place.

    def _open_staging(self) -> dict[str, Receipt]:
        fingerprint = self.plan.fingerprint()
        if os.path.lexists(self.dir):
            try:
                check_tree(self.dir)
                staged = self._staged_fingerprint()
                if staged is not None and staged != fingerprint:
                    raise OutputError(
                        "the staging directory holds an unfinished merge of another plan "
                        "(the recipe, its inputs or the output options changed)",
                        file=str(self.dir),
                        hint="rerun the recipe it was started with to finish it, or pass --overwrite to discard it",
                    )
            except OutputError as exc:
                if not self.overwrite:
                    raise
                log.warning("discarding the staging directory (%s)", exc.message)
                _remove(self.dir)
            else:
                if staged == fingerprint:
                    return self._resume()
                log.warning("discarding an unfinished staging directory that records no plan: %s", self.dir)
                _remove(self.dir)
        self._create(fingerprint)
        return {}

    def _staged_fingerprint(self) -> str | None:
        """The plan fingerprint the staging directory records; None when it records none readable."""
        meta = self.meta
        if not os.path.lexists(meta):
            return None
        if not meta.is_dir():  # check_tree has refused links and special files already
            raise refuse_untrusted(meta, "a file where the .raymerge directory belongs", self.dir)
        plan_file = meta / "plan.json"
        if not regular_or_absent(plan_file, self.dir):
            return None
        try:
            record = read_json(plan_file, error=OutputError, what="staged plan")
        except OutputError:
            return None  # torn by a crash while it was written: the run had not started any task
        threads = record.get("threads")
        staged = record.get("fingerprint")
        if isinstance(staged, str) and staged == self.plan.fingerprint():
            ok = isinstance(threads, int) and not isinstance(threads, bool) and threads > 0
            self.threads = threads if ok else None
        return staged if isinstance(staged, str) else None

    def _create(self, fingerprint: str) -> None:
        self.publication.start()
        self.meta.mkdir()
        record = {"fingerprint": fingerprint, "threads": self.threads, "summary": self.plan.summary()}
        text = json.dumps(record, indent=1)
        self._write_file(self.meta / "plan.json", text.encode())
        try:
            for shard in self.plan.shards:
                self._allocate(shard, fresh=True)
        except OutputError as exc:  # nothing computed yet: give the space back
            _remove(self.dir)
            raise OutputError(
                exc.message, file=exc.file, hint="nothing was computed; free space and run again"
            ) from None

    def _write_file(self, path: Path, data: bytes) -> None:
        """Write a small file whole (write then rename), mapping a full disk to one line."""
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as exc:
            raise self._io_error(exc, path, len(data), "cannot write") from None

    def _io_error(self, exc: OSError, path: Path, needed: int, doing: str) -> OutputError:
        return disk_full(exc, path, needed, self.dir) or OutputError(
            f"{doing}: {exc.strerror or exc}",
            file=str(path),
            hint=f"staging kept at {self.dir}; fix the cause and run the same command again to resume",
        )

    def _allocate(self, shard: OutputShard, *, fresh: bool) -> None:
        """Give a staged shard the plan's header and size; a resumed shard keeps its data bytes."""
        path = self.dir / shard.name
        flags = os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if fresh else 0)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            raise self._io_error(exc, path, shard.size, "cannot create staging shard") from None
        try:
            if os.fstat(fd).st_size > shard.size:
                os.ftruncate(fd, shard.size)
            os.pwrite(fd, len(shard.header).to_bytes(8, "little") + shard.header, 0)
            try:
                # Reserve the space now so a full disk fails before hours of compute, not after.
                os.posix_fallocate(fd, 0, shard.size)
            except OSError as exc:
                if exc.errno in DISK_FULL:
                    raise
                os.ftruncate(fd, shard.size)  # filesystems without fallocate
        except OSError as exc:
            later = sum(s.size for s in self.plan.shards if s.name > shard.name) if fresh else 0
            raise self._io_error(exc, path, shard.size + later, "cannot allocate staging shard") from None
        finally:
            os.close(fd)

    def _resume(self) -> dict[str, Receipt]:
        """Check and repair the staging directory of this plan; the receipts whose bytes still match."""
        shards = {s.name for s in self.plan.shards}
        keep_meta = {"plan.json", "journal.jsonl", UPLOADS.split("/")[-1]}
        for entry in list(self.dir.iterdir()):  # index, card, side files of a failed publish: rewritten at commit
            if entry.name == META or (entry.name in shards and not entry.is_dir()):
                continue
            _remove(entry)
        for entry in list(self.meta.iterdir()):
            if entry.name not in keep_meta:
                _remove(entry)
        for shard in self.plan.shards:
            problem = shard_problem(self.dir / shard.name, shard)
            if problem is not None:
                log.warning(
                    "staged shard %s: %s; rewriting it to the plan, its damaged tasks are redone", shard.name, problem
                )
                if problem != "missing" and (self.dir / shard.name).is_dir():
                    _remove(self.dir / shard.name)
                self._allocate(shard, fresh=False)
        done, damaged = self._matching_receipts()
        if damaged:
            log.warning("%d finished task(s) no longer match their receipts; redoing them", damaged)
        log.info("resuming %s: %d of %d tasks already done", self.dir, len(done), len(self.plan.tasks))
        return done

    def _journal_receipts(self) -> list[Receipt]:
        journal = self.meta / "journal.jsonl"
        if not regular_or_absent(journal, self.dir):
            return []
        data = read_regular(journal, limit=JOURNAL_LIMIT, error=OutputError, what="journal")
        out = []
        for line in data.splitlines():
            try:
                r = Receipt(**parse_json(line, file=str(journal), error=OutputError, what="journal line"))
            except (OutputError, TypeError):
                continue  # a torn last line after a crash or a full disk
            if isinstance(r.id, str) and isinstance(r.crc32, int) and isinstance(r.nbytes, int):
                out.append(r)
        return out

    def _matching_receipts(self, receipts: Iterable[Receipt] | None = None) -> tuple[dict[str, Receipt], int]:
        """The receipts (of the journal by default) whose task's staged bytes match their CRC, and
        the number that did not. The CRCs are read on a thread per core (``pread`` and ``crc32``
        release the GIL), then folded in receipt order, so a later receipt of a task decides."""
        by_id = {t.id: t for t in self.plan.tasks}
        wanted = []
        for r in self._journal_receipts() if receipts is None else receipts:
            task = by_id.get(r.id)
            if task is not None and r.tensor == task.tensor and r.nbytes == task.output.nbytes:
                wanted.append((r, task))
        fds: dict[str, int] = {}
        try:
            for _, task in wanted:
                shard = task.output.shard
                if shard not in fds:
                    fds[shard] = os.open(self.dir / shard, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)

            def crc(task: TensorTask) -> int | None:
                return crc_of(fds[task.output.shard], task.output.offset, task.output.nbytes)

            workers = max(1, min(len(wanted), os.cpu_count() or 1))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="raymerge-verify") as pool:
                crcs = list(pool.map(crc, [task for _, task in wanted]))
        finally:
            for fd in fds.values():
                os.close(fd)
        done: dict[str, Receipt] = {}
        damaged = 0
        for (r, _), got in zip(wanted, crcs, strict=True):
            if got == r.crc32:
                done[r.id] = r
            else:
                done.pop(r.id, None)
                damaged += 1
        return done, damaged

    def _open_journal(self) -> None:
        journal = self.meta / "journal.jsonl"
        try:
            fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise self._io_error(exc, journal, 1, "cannot open the journal") from None
        self._journal = fd
        size = os.fstat(fd).st_size
        if size:
            with open(journal, "rb") as f:
                f.seek(size - 1)
                torn = f.read(1) != b"\n"
            if torn:  # a line cut short by a crash or a full disk: end it so the next receipt parses
                self._append(b"\n")

    def _append(self, data: bytes) -> None:
        assert self._journal is not None
        journal = self.meta / "journal.jsonl"
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._journal, view) :]
        except OSError as exc:
            left = sum(t.output.nbytes for t in self.plan.tasks) // max(1, len(self.plan.tasks))
            raise self._io_error(exc, journal, len(data) + left, "cannot write the journal") from None

    def record(self, receipt: Receipt) -> None:
        """Append a receipt to the journal (written now; fsynced at most every 2 s and at commit)."""
        with self._journal_lock:
            self._append((json.dumps(receipt.to_json()) + "\n").encode())
            now = time.monotonic()
            if now - self._last_sync > 2.0 and self._journal is not None:
                with contextlib.suppress(OSError):
                    os.fsync(self._journal)
                self._last_sync = now

    def close(self) -> None:
        """Close the journal (fsynced first). Never raises: it runs on the way out of failures."""
        if self._journal is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._journal)
            with contextlib.suppress(OSError):
                os.close(self._journal)
            self._journal = None

    def release(self) -> None:
        """Close the journal and release the output's lock."""
        self.close()
        self.lock.release()

    def check_staged(self, receipts: dict[str, Receipt]) -> None:
        """Refuse to publish unless every staged path is a regular file, every shard's size and
        header bytes are the plan's, and every receipt's CRC matches the bytes now on disk."""
        check_tree(self.dir)
        for shard in self.plan.shards:
            problem = shard_problem(self.dir / shard.name, shard)
            if problem is not None:
                raise OutputError(
                    f"staged shard {problem}; not publishing",
                    file=str(self.dir / shard.name),
                    hint="run the same command again: the shard is rewritten and its tasks redone",
                )
        ok, _ = self._matching_receipts(receipts[t.id] for t in self.plan.tasks)
        bad = [t for t in self.plan.tasks if t.id not in ok]
        if bad:
            raise OutputError(
                f"the staged bytes of {len(bad)} task(s) no longer match their receipts; not publishing",
                file=str(self.dir / bad[0].output.shard),
                tensor=bad[0].tensor,
                hint="run the same command again to redo them",
            )

    def commit(self, receipts: dict[str, Receipt], card: str) -> str:
        """Verify coverage and the staged bytes, write metadata files, fsync, and publish. Returns
        the output path or URL.

        Any I/O failure here (a full disk, an upload that keeps failing) leaves the staging area
        as it is, so running the same merge again resumes straight to this step.
        """
        missing = [t.id for t in self.plan.tasks if t.id not in receipts]
        if missing:
            raise OutputError(f"{len(missing)} task(s) have no receipt; not publishing", tensor=missing[0])
        self.close()
        try:
            self.check_staged(receipts)
            return self._publish(receipts, card)
        except OSError as exc:
            full = disk_full(exc, self.dir, self._metadata_bytes(card), self.dir)
            if full is not None:
                raise full from None
            raise OutputError(
                f"cannot publish the merged model: {exc.strerror or exc}",
                file=str(self.dir),
                hint="free space (or fix permissions) and run the same command again to resume",
            ) from None

    def _metadata_bytes(self, card: str) -> int:
        """About how many bytes the files written at commit take (for the disk-full line)."""
        n = len(card.encode()) + len(self.plan.recipe.source or "") + 4096
        n += sum(len(name) + 256 for s in self.plan.shards for name in s.tensors) * 2
        src = self.plan.tokenizer_from
        if src and is_local(src):
            for name in TOKENIZER_FILES:
                with contextlib.suppress(OSError):
                    n += os.stat(Path(local_path(src)) / name).st_size
        return n

    def _publish(self, receipts: dict[str, Receipt], card: str) -> str:
        self._write_metadata(receipts, card)
        return self.publication.publish()

    def _write_metadata(self, receipts: dict[str, Receipt], card: str) -> None:
        """Index, config, tokenizer files, card and receipts into the staging directory."""
        plan = self.plan
        weight_map = {name: s.name for s in plan.shards for name in s.tensors}
        total = sum(t.output.nbytes for t in plan.tasks)
        index = {
            "metadata": {"total_size": total, "raymerge_version": __version__},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.dir / INDEX).write_text(json.dumps(index, indent=2))
        config = dict(plan.config)
        if plan.out_dtype:
            config["torch_dtype"] = plan.out_dtype
            if "dtype" in config:
                config["dtype"] = plan.out_dtype
        if config:
            (self.dir / "config.json").write_text(json.dumps(config, indent=2))
        if plan.tokenizer_from:
            copy_side_files(plan.tokenizer_from, self.dir, TOKENIZER_FILES)
        for name, data in plan.tokenizer_files.items():
            (self.dir / name).write_bytes(data)
        if plan.chat_template:
            chat_template.write(self.dir, plan.chat_template)
        (self.dir / "README.md").write_text(card, encoding="utf-8")
        # mergekit's name for the recipe as run, which tools that read mergekit outputs look for.
        (self.dir / MERGE_CONFIG).write_text(plan.recipe.source or "", encoding="utf-8")
        # Where each task's bytes are, so `raymerge verify` can recompute every checksum later.
        ordered = [{**receipts[t.id].to_json(), "shard": t.output.shard, "offset": t.output.offset} for t in plan.tasks]
        (self.meta / "receipts.json").write_text(json.dumps(ordered))
        # Each shard's exact size and header, so `raymerge verify` can tell an edited header
        # (a swapped shape, another dtype) or appended bytes from the merge's own.
        shards = [
            {"name": s.name, "size": s.size, "header_sha256": hashlib.sha256(s.header).hexdigest()} for s in plan.shards
        ]
        (self.meta / SHARDS).write_text(json.dumps(shards))
