"""Merging from an HTTP URL reads about the bytes it needs and matches the local merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raymerge.engine.merge import merge
from raymerge.engine.recipe import parse_recipe
from raymerge.engine.storage import ShardReader, open_checkpoint

from conftest import load_dir, recipe_text
from rangeserver import RangeServer, dir_bytes


def test_http_merge_matches_local_and_reads_only_needed_bytes(tmp_path, family):
    base, experts = family
    root = base.parent
    local = recipe_text("task_arithmetic", base, experts, {"lambda": 0.5}, [{"weight": 1.0}] * 3)
    merge(parse_recipe(local), tmp_path / "local", progress=False)
    with RangeServer(root) as srv:
        remote = recipe_text(
            "task_arithmetic",
            f"{srv.url}/{base.name}",
            [f"{srv.url}/{e.name}" for e in experts],
            {"lambda": 0.5},
            [{"weight": 1.0}] * 3,
        )
        merge(parse_recipe(remote), tmp_path / "remote", progress=False, workers=2)
        sent = srv.bytes_sent
        ranged = [r for r in srv.requests if r[0] == "GET" and r[2]]
        whole = [r for r in srv.requests if r[0] == "GET" and not r[2] and r[1].endswith(".safetensors")]
    a, b = load_dir(tmp_path / "local"), load_dir(tmp_path / "remote")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    needed = sum(dir_bytes(root / d) for d in [base.name, *[e.name for e in experts]])
    assert ranged, "no range requests were made"
    assert not whole, f"whole-file downloads: {whole[:3]}"
    # Every tensor byte is needed once; allow headers, configs and index files on top.
    assert needed * 0.9 <= sent <= needed * 1.05, (sent, needed)


def test_http_reads_one_tensor_rows_only(family):
    base, _ = family
    with RangeServer(base.parent) as srv:
        ck = open_checkpoint(f"{srv.url}/{base.name}")
        name = "model.layers.0.mlp.up_proj.weight"
        before = srv.bytes_sent
        reader = ShardReader(ck.shard_of[name])
        header_bytes = srv.bytes_sent - before
        entry = reader.entries[name]
        rows = reader.read_rows(entry, 10, 20)
        got = srv.bytes_sent - before - header_bytes
    local = ShardReader(str(Path(base) / Path(ck.shard_of[name]).name))
    assert torch.equal(rows, local.read_rows(local.entries[name], 10, 20))
    assert got == 10 * entry.row_bytes()


def test_transient_5xx_are_retried_and_permanent_ones_fail_clearly(tmp_path, family, monkeypatch):
    import raymerge.engine.storage as storage
    from raymerge.engine.errors import CheckpointError

    monkeypatch.setattr(storage, "BACKOFF_S", 0.01)
    base, experts = family
    with RangeServer(base.parent) as srv:
        text = recipe_text(
            "task_arithmetic",
            f"{srv.url}/{base.name}",
            [f"{srv.url}/{e.name}" for e in experts],
            None,
            [{"weight": 1.0}] * 3,
        )
        srv.fail_ranged = 3  # three failures in a row, then the server recovers
        merge(parse_recipe(text), tmp_path / "flaky", progress=False, workers=1)
        assert srv.fail_ranged == 0
        local = recipe_text("task_arithmetic", base, experts, None, [{"weight": 1.0}] * 3)
        merge(parse_recipe(local), tmp_path / "local", progress=False)
        a, b = load_dir(tmp_path / "local"), load_dir(tmp_path / "flaky")
        assert all(torch.equal(a[k], b[k]) for k in a)
        storage.clear_shard_cache()
        srv.fail_always = True
        with pytest.raises(CheckpointError, match="failed after 5 attempts") as exc:
            merge(parse_recipe(text), tmp_path / "dead", progress=False)
        assert srv.url in str(exc.value)
        assert not (tmp_path / "dead").exists()


def test_verify_over_http_checks_receipts_with_range_reads(tmp_path, family):
    # `raymerge verify URL`: the same checks as on a local directory, over range reads; a flipped
    # byte in a served shard is named by tensor and shard URL, and no shard is downloaded whole.
    import subprocess
    import sys

    base, experts = family
    out = tmp_path / "served" / "merged"
    out.parent.mkdir()
    merge(
        parse_recipe(recipe_text("ties", base, experts, None, [{"weight": 1.0, "density": 0.5}] * 3)),
        out,
        progress=False,
        out_shard_bytes=100_000,
    )
    with RangeServer(out.parent) as srv:
        url = f"{srv.url}/merged"
        cli = [sys.executable, "-m", "raymerge.cli", "verify", url]
        ok = subprocess.run(cli, capture_output=True, text=True)
        assert ok.returncode == 0 and ok.stdout.startswith("ok: 21 tensors"), ok.stderr
        assert "task checksums" in ok.stdout and " 0 task checksums" not in ok.stdout
        assert not [r for r in srv.requests if r[0] == "GET" and not r[2] and r[1].endswith(".safetensors")]
        receipts = json.loads((out / ".raymerge" / "receipts.json").read_text())
        victim = receipts[3]
        shard = out / victim["shard"]
        raw = bytearray(shard.read_bytes())
        raw[victim["offset"]] ^= 0x01
        shard.write_bytes(bytes(raw))
        bad = subprocess.run(cli, capture_output=True, text=True)
        missing = subprocess.run(
            [sys.executable, "-m", "raymerge.cli", "verify", f"{url}-nothing-here"], capture_output=True, text=True
        )
    assert bad.returncode != 0
    line = bad.stderr.strip()
    assert "checksum" in line and victim["tensor"] in line and f"{url}/{victim['shard']}" in line, line
    assert missing.returncode != 0 and "model.safetensors.index.json" in missing.stderr, missing.stderr
