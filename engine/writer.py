"""Staging shards, the receipt journal, resume, and the commit that publishes a merged model.

Layout while a merge runs (``OUT`` is the requested output directory)::

    OUT.raymerge-staging/
        model-00001-of-0000N.safetensors   pre-sized; tasks pwrite into them
        .raymerge/plan.json                fingerprint of the plan (resume only if it matches)
        .raymerge/journal.jsonl            one receipt per finished task (append-only)

``commit`` checks that every task has a receipt, writes the index, config, tokenizer files and
model card, and publishes the directory through ``publish.ModelPublication``: fsynced, then
renamed to ``OUT`` in one step (a remote ``OUT`` is staged under ``$RAYMERGE_STAGING_ROOT`` with
the same journal and resume, and uploaded with the loader's entry points last). Nothing at
``OUT`` looks like a model before that step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
import zlib
from pathlib import Path
from typing import Any

from raymerge.engine import __version__, chat_template
from raymerge.engine.errors import OutputError
from raymerge.engine.plan import MergePlan, OutputShard
from raymerge.engine.publish import INDEX, META, TOKENIZER_FILES, ModelPublication, copy_side_files
from raymerge.engine.task import Receipt

MERGE_CONFIG = "mergekit_config.yml"

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
            exists_message="output path already exists",
        )
        self.dir = self.publication.dir
        self.plan = plan
        self._journal_lock = threading.Lock()
        self._journal: Any = None
        self._last_sync = 0.0

    @property
    def meta(self) -> Path:
        return self.dir / META

    def prepare(self) -> dict[str, Receipt]:
        """Create or reopen the staging area; return receipts of tasks already done and verified."""
        pub = self.publication
        pub.check(self.plan.models, hint="write the merge to a new directory")
        if pub.final is not None and not pub.final.parent.exists():
            raise OutputError("parent directory of the output does not exist", file=pub.target)
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
            pub.start()
            self.meta.mkdir()
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
                        f"not enough disk space for {shard.size / 2**30:.2f} GiB shard",
                        file=str(path),
                        hint="free space and run again",
                    ) from None
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
                f"cannot publish the merged model: {exc.strerror or exc}",
                file=str(self.dir),
                hint="free space (or fix permissions) and run the same command again to resume",
            ) from None

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
