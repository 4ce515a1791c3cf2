"""Tampered staging between an interrupted run and its resume: damaged tasks are redone, untrusted
paths refused, and nothing is ever published whose bytes disagree with its receipts."""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest

import raymerge.engine.local as local_executor
from raymerge.engine.errors import OutputError
from raymerge.engine.merge import merge
from raymerge.engine.recipe import parse_recipe
from raymerge.engine.verify import verify_model
from raymerge.engine.writer import Staging

from conftest import recipe_text

SHARD_BYTES = 100_000


def _digest(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.glob("*.safetensors"))}


def _recipe(family, density: float = 0.4):
    base, experts = family
    return parse_recipe(
        recipe_text("ties", base, experts, {"density": density}, [{"weight": 1.0}] * 3, extra="out_dtype: bfloat16")
    )


@pytest.fixture(scope="module")
def clean(family, tmp_path_factory):
    """The undisturbed run every resumed output must equal byte for byte."""
    out = tmp_path_factory.mktemp("clean") / "out"
    merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES)
    return _digest(out)


def _interrupted(family, out, monkeypatch, after: int = 12):
    """Run until ``after`` tasks are done, then fail: the staging directory a killed run leaves."""
    real = local_executor.run_task
    calls = {"n": 0}

    def flaky(task, staging_dir, device):
        calls["n"] += 1
        if calls["n"] > after:
            raise RuntimeError("simulated crash")
        return real(task, staging_dir, device)

    monkeypatch.setattr(local_executor, "run_task", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES, workers=1)
    monkeypatch.setattr(local_executor, "run_task", real)
    staging = out.with_name(out.name + ".raymerge-staging")
    assert not out.exists() and staging.is_dir()
    assert not out.with_name(out.name + ".raymerge-staging.lock").exists(), "the lock file goes with the run"
    return staging


def _done_shard(staging):
    """The shard holding the first finished task."""
    first = json.loads((staging / ".raymerge" / "journal.jsonl").read_text().splitlines()[0])
    for shard in sorted(staging.glob("*.safetensors")):
        raw = shard.read_bytes()
        if first["tensor"] in json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")]):
            return shard
    raise AssertionError("no shard holds the first finished task")


def _swap_a_shape(raw: bytes) -> bytes:
    m = next(m for m in re.finditer(rb'"shape":\[(\d+),(\d+)\]', raw) if m.group(1) != m.group(2))
    swapped = b'"shape":[' + m.group(2) + b"," + m.group(1) + b"]"
    return raw[: m.start()] + swapped + raw[m.end() :]


TAMPERS = {
    "deleted": lambda p: p.unlink(),
    "emptied": lambda p: p.write_bytes(b""),
    "truncated": lambda p: os.truncate(p, p.stat().st_size // 2),
    "grown": lambda p: p.write_bytes(p.read_bytes() + b"\0" * 4096),
    "header_shape_swapped": lambda p: p.write_bytes(_swap_a_shape(p.read_bytes())),
    "data_byte_flipped": lambda p: p.write_bytes(p.read_bytes()[:-1] + bytes([p.read_bytes()[-1] ^ 0xFF])),
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_damaged_shard_is_repaired_and_its_tasks_redone(family, clean, tmp_path, monkeypatch, tamper):
    out = tmp_path / "out"
    staging = _interrupted(family, out, monkeypatch)
    TAMPERS[tamper](_done_shard(staging))
    figures = merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES)
    assert figures.tasks_resumed < 12 or tamper == "header_shape_swapped" or tamper == "grown"
    assert _digest(out) == clean
    verify_model(out)
    assert not staging.exists()


def test_edited_journal_receipt_is_not_trusted(family, clean, tmp_path, monkeypatch):
    out = tmp_path / "out"
    staging = _interrupted(family, out, monkeypatch)
    journal = staging / ".raymerge" / "journal.jsonl"
    lines = journal.read_text().splitlines()
    first = json.loads(lines[0])
    first["crc32"] ^= 1
    journal.write_text("\n".join([json.dumps(first), *lines[1:], '{"id": "torn']))  # and a torn last line
    figures = merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES)
    assert figures.tasks_resumed == 11
    assert _digest(out) == clean


@pytest.mark.parametrize("where", ["shard", "meta"])
def test_symlink_planted_in_staging_is_refused_and_never_followed(family, clean, tmp_path, monkeypatch, where):
    out = tmp_path / "out"
    staging = _interrupted(family, out, monkeypatch)
    victim = tmp_path / "victim.bin"
    victim.write_bytes(b"precious")
    link = _done_shard(staging) if where == "shard" else staging / ".raymerge" / "journal.jsonl"
    link.unlink()
    link.symlink_to(victim)
    with pytest.raises(OutputError, match="holds a symlink; it was not followed"):
        merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES)
    assert victim.read_bytes() == b"precious" and not out.exists() and link.is_symlink()
    # --overwrite discards the untrusted staging directory (deleting the link, not its target).
    merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES, overwrite=True)
    assert victim.read_bytes() == b"precious" and _digest(out) == clean


def test_fifo_in_staging_is_refused_without_hanging(family, tmp_path, monkeypatch):
    out = tmp_path / "out"
    staging = _interrupted(family, out, monkeypatch)
    os.mkfifo(staging / "model-00001-of-00002.safetensors.fifo")
    with pytest.raises(OutputError, match="holds a FIFO"):
        merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES)


def test_journal_that_is_a_directory_is_refused(family, tmp_path, monkeypatch):
    out = tmp_path / "out"
    staging = _interrupted(family, out, monkeypatch)
    journal = staging / ".raymerge" / "journal.jsonl"
    journal.unlink()
    journal.mkdir()
    with pytest.raises(OutputError, match="a directory where a file belongs"):
        merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES)


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_staging_path_that_is_not_a_directory_is_refused(family, clean, tmp_path, kind):
    out = tmp_path / "out"
    staging = tmp_path / "out.raymerge-staging"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    if kind == "file":
        staging.write_text("not a directory")
    else:
        staging.symlink_to(elsewhere)
    with pytest.raises(OutputError, match="the staging path is .*not a directory" if kind == "file" else "symlink"):
        merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]
    merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES, overwrite=True)
    assert _digest(out) == clean and sorted(p.name for p in elsewhere.iterdir()) == ["keep.txt"]


def test_staging_of_another_recipe_is_refused_unless_overwrite(family, tmp_path, monkeypatch):
    out = tmp_path / "out"
    _interrupted(family, out, monkeypatch)
    other = _recipe(family, density=0.6)
    with pytest.raises(OutputError, match="unfinished merge of another plan.*pass --overwrite to discard it"):
        merge(other, out, progress=False, out_shard_bytes=SHARD_BYTES)
    ref = tmp_path / "ref"
    merge(other, ref, progress=False, out_shard_bytes=SHARD_BYTES)
    merge(other, out, progress=False, out_shard_bytes=SHARD_BYTES, overwrite=True)
    assert _digest(out) == _digest(ref)


def test_bytes_changed_before_publish_are_never_published(family, clean, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = Staging.check_staged

    def flip_then_check(self, receipts):
        shard = sorted(self.dir.glob("*.safetensors"))[0]
        raw = bytearray(shard.read_bytes())
        raw[-3] ^= 0x40
        shard.write_bytes(bytes(raw))
        return real(self, receipts)

    monkeypatch.setattr(Staging, "check_staged", flip_then_check)
    with pytest.raises(OutputError, match="no longer match their receipts; not publishing"):
        merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES)
    assert not out.exists()
    monkeypatch.setattr(Staging, "check_staged", real)
    figures = merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES)
    assert figures.tasks_resumed == figures.tasks - 1
    assert _digest(out) == clean


def test_header_edited_before_publish_is_never_published(family, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = Staging.check_staged

    def edit_then_check(self, receipts):
        shard = sorted(self.dir.glob("*.safetensors"))[0]
        shard.write_bytes(_swap_a_shape(shard.read_bytes()))
        return real(self, receipts)

    monkeypatch.setattr(Staging, "check_staged", edit_then_check)
    with pytest.raises(OutputError, match="staged shard header differs from the plan; not publishing"):
        merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES)
    assert not out.exists()


def test_stale_old_output_is_cleaned_or_explained_before_any_compute(family, clean, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = local_executor.run_task

    def counting(task, staging_dir, device):
        calls["n"] += 1
        return real(task, staging_dir, device)

    monkeypatch.setattr(local_executor, "run_task", counting)
    out = tmp_path / "out"
    old = tmp_path / "out.raymerge-old"
    old.mkdir()
    (old / "model.safetensors").write_text("the previous model")
    # No output but an -old: an interrupted replace left the previous model there. Explained, kept.
    with pytest.raises(OutputError, match="left here by an interrupted --overwrite.*move it back"):
        merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES)
    assert calls["n"] == 0 and (old / "model.safetensors").exists()
    # Both an output and an -old: the -old is the replaced model; --overwrite deletes it before compute.
    out.mkdir()
    seen = []
    monkeypatch.setattr(local_executor, "run_task", lambda *a: (seen.append(os.path.lexists(old)), counting(*a))[1])
    merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES, overwrite=True)
    assert seen and not any(seen), "the stale -old is gone before the first task"
    assert _digest(out) == clean and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two_renames"])
@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_overwrite_of_a_file_or_symlink_leaves_no_old_path(family, clean, tmp_path, monkeypatch, kind, exchange):
    import raymerge.engine.publish as publish

    if not exchange:  # a file system without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(publish, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("a file in the way")
    else:
        target = tmp_path / "target"
        target.mkdir()
        out.symlink_to(target)
    for _ in range(2):  # and a second --overwrite still works
        merge(_recipe(family), out, progress=False, out_shard_bytes=SHARD_BYTES, overwrite=True)
        assert _digest(out) == clean and out.is_dir() and not out.is_symlink()
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == (["out"] if kind == "file" else ["out", "target"]), left


# ------------------------------------------------------------------------------------------------
# Two runs on one output: the second fails at once; a killed run releases the output.

SLOW_RUN = """
import os, sys, time
import raymerge.engine.local as local
real = local.run_task
calls = []
def slow(task, staging_dir, device):
    # After the first task, wait while the test holds the run (at most 5 minutes).
    calls.append(task.id)
    deadline = time.monotonic() + 300
    while len(calls) > 1 and os.path.exists(os.environ["HOLD"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return real(task, staging_dir, device)
local.run_task = slow
from raymerge.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def _cli(*args, hold=None):
    import subprocess
    import sys

    head = [sys.executable, "-c", SLOW_RUN] if hold else [sys.executable, "-m", "raymerge.cli"]
    env = {**os.environ, "HOLD": str(hold)} if hold else None
    return subprocess.Popen(
        [*head, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def _wait_for(path, proc, seconds=120.0):
    import time

    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_second_run_on_the_same_output_fails_at_once_and_the_first_publishes_its_own_recipe(family, tmp_path):
    out = tmp_path / "out"
    recipes = {}
    for density in (0.3, 0.5):
        recipes[density] = tmp_path / f"ties{density}.yml"
        recipes[density].write_text(_recipe(family, density).source)
    common = ("--out-shard-size", SHARD_BYTES, "--workers", "1", "--quiet")
    hold = tmp_path / "hold"
    hold.touch()
    first = _cli("run", recipes[0.3], out, *common, hold=hold)
    _wait_for(out.with_name("out.raymerge-staging") / ".raymerge" / "journal.jsonl", first)
    second = _cli("run", recipes[0.5], out, *common)
    _, err = second.communicate(timeout=120)
    assert first.poll() is None, "the first run is still holding the output"
    hold.unlink()
    lines = err.strip().splitlines()
    assert second.returncode != 0 and len(lines) == 1, err
    assert lines[0].startswith("raymerge: error: another raymerge run is writing this output") and str(out) in lines[0]
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    ref = tmp_path / "ref"
    merge(_recipe(family, 0.3), ref, progress=False, out_shard_bytes=SHARD_BYTES)
    assert _digest(out) == _digest(ref)
    assert "density: 0.3" in (out / "README.md").read_text()
    verify_model(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "ref", "ties0.3.yml", "ties0.5.yml"], "no lock left"


def test_a_killed_run_releases_the_output(family, clean, tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    recipe = tmp_path / "ties.yml"
    recipe.write_text(_recipe(family).source)
    common = ("--out-shard-size", SHARD_BYTES, "--workers", "1", "--quiet")
    hold = tmp_path / "hold"
    hold.touch()
    first = _cli("run", recipe, out, *common, hold=hold)
    journal = out.with_name("out.raymerge-staging") / ".raymerge" / "journal.jsonl"
    _wait_for(journal, first)
    while not journal.read_text():  # the first task is done, the second held
        assert first.poll() is None
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    second = _cli("run", recipe, out, *common)
    _, err = second.communicate(timeout=300)
    assert second.returncode == 0, err
    assert _digest(out) == clean
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hold", "out", "ties.yml"]
