"""A full disk at any moment of a run: one line with the bytes needed and free, staging kept, and
the same command after freeing space resumes bit-identically."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess

import pytest

import raymerge.engine.local as local_executor
from raymerge.engine.errors import OutputError
from raymerge.engine.merge import merge
from raymerge.engine.recipe import parse_recipe
from raymerge.engine.verify import verify_model

from conftest import recipe_text

SHARD_BYTES = 100_000


def _digest(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.safetensors"))}


def _recipe(family):
    base, experts = family
    return parse_recipe(
        recipe_text("ties", base, experts, {"density": 0.4}, [{"weight": 1.0}] * 3, extra="out_dtype: bfloat16")
    )


@pytest.fixture(scope="module")
def clean(family, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES)
    return _digest(out)


def _at_task(monkeypatch, n, action):
    """Call ``action()`` just before the ``n``-th task runs."""
    real = local_executor.run_task
    calls = {"n": 0}

    def wrapped(task, staging_dir, device):
        calls["n"] += 1
        if calls["n"] == n:
            action()
        return real(task, staging_dir, device)

    monkeypatch.setattr(local_executor, "run_task", wrapped)


def _resume_and_check(family, out, clean):
    staging = out.with_name(out.name + ".raymerge-staging")
    assert not out.exists() and staging.is_dir(), "staging is kept for the resume"
    figures = merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES)
    assert 0 < figures.tasks_resumed < figures.tasks
    assert _digest(out) == clean
    verify_model(out)


def test_task_write_fails_for_lack_of_space(family, clean, tmp_path, monkeypatch):
    """A file system that could not reserve the space (no fallocate): the task's pwrite hits ENOSPC."""
    real_pwrite = os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    _at_task(monkeypatch, 6, lambda: monkeypatch.setattr(os, "pwrite", full))
    out = tmp_path / "out"
    with pytest.raises(OutputError) as exc:
        merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES, workers=1)
    line = str(exc.value)
    assert line.startswith("not enough disk space: the merge needs ") and " free (file " in line and "\n" not in line
    assert "staging kept at" in line and "run the same command again to resume" in line
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    monkeypatch.undo()
    _resume_and_check(family, out, clean)


@pytest.mark.parametrize("torn", [False, True])
def test_journal_write_fails_for_lack_of_space(family, clean, tmp_path, monkeypatch, torn):
    """No room for the journal: a receipt cannot be recorded (and may be half written)."""
    real_write = os.write
    state = {"half": torn}

    def full(fd, data):
        if state["half"]:  # the first write lands half, the next finds the disk full
            state["half"] = False
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    _at_task(monkeypatch, 6, lambda: monkeypatch.setattr(os, "write", full))
    out = tmp_path / "out"
    with pytest.raises(OutputError, match=r"not enough disk space: the merge needs .* more") as exc:
        merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES, workers=1)
    assert "journal.jsonl" in str(exc.value)
    monkeypatch.setattr(os, "write", real_write)
    monkeypatch.undo()
    _resume_and_check(family, out, clean)


@pytest.fixture
def small_fs(tmp_path):
    """A 2 MiB tmpfs made for the test (needs mount rights; skipped without them)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_filled_by_someone_else_mid_run_on_a_real_small_filesystem(family, clean, small_fs, monkeypatch):
    """The shards are reserved, then another writer takes every free byte: the journal (or the
    metadata at publish) cannot be written. One line; freeing the space and rerunning resumes."""
    filler = small_fs / "filler"

    def fill():
        with open(filler, "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 512)
            except OSError:
                pass

    _at_task(monkeypatch, 2, fill)
    out = small_fs / "out"
    with pytest.raises(OutputError, match=r"not enough disk space: the merge needs .* more, 0 bytes free"):
        merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES, workers=1)
    monkeypatch.undo()
    filler.unlink()
    staging = small_fs / "out.raymerge-staging"
    assert not out.exists() and staging.is_dir()
    figures = merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES)
    assert figures.tasks_resumed > 0
    assert _digest(out) == clean
    verify_model(out)


def test_file_size_limit_is_one_line_and_leaves_nothing(family, tmp_path):
    """RLIMIT_FSIZE (EFBIG) is reported like a full disk: before any compute, nothing left behind."""
    import resource
    import sys

    recipe = tmp_path / "ties.yml"
    recipe.write_text(_recipe(family).source)
    out = tmp_path / "out"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    proc = subprocess.run(
        [sys.executable, "-m", "raymerge.cli", "run", str(recipe), str(out), "--out-shard-size", "100000", "--quiet"],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("raymerge: error: file-size limit reached: the merge needs "), lines[0]
    assert "nothing was computed" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ties.yml"]
