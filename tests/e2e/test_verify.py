"""``raymerge verify`` against edits that keep the files parseable: headers against the merge's
records, trailing bytes, duplicate keys, missing or malformed receipts, special files."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from raymerge.engine.errors import CheckpointError
from raymerge.engine.merge import merge
from raymerge.engine.recipe import parse_recipe
from raymerge.engine.verify import verify_model

from conftest import recipe_text

CLI = [sys.executable, "-m", "raymerge.cli", "verify"]


@pytest.fixture(scope="module")
def merged(family, tmp_path_factory):
    base, experts = family
    out = tmp_path_factory.mktemp("verify") / "merged"
    recipe = recipe_text("ties", base, experts, {"density": 0.5}, [{"weight": 1.0}] * 3, extra="out_dtype: bfloat16")
    merge(parse_recipe(recipe), out, progress=False, out_shard_bytes=100_000)
    return out


@pytest.fixture
def model(merged, tmp_path):
    """A fresh copy of the merged model to damage."""
    return shutil.copytree(merged, tmp_path / "model")


def _shard(model):
    return sorted(model.glob("*.safetensors"))[0]


def _edit_header(path, edit):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = edit(raw[8 : 8 + n])
    assert len(header) == n and header != raw[8 : 8 + n]
    path.write_bytes(raw[:8] + header + raw[8 + n :])


def _swap_shape(h: bytes) -> bytes:
    m = next(m for m in re.finditer(rb'"shape":\[(\d+),(\d+)\]', h) if m.group(1) != m.group(2))
    return h[: m.start()] + b'"shape":[' + m.group(2) + b"," + m.group(1) + b"]" + h[m.end() :]


def _swap_names(h: bytes) -> bytes:
    names = sorted(json.loads(h), key=len)
    a, b = next((a, b) for a, b in zip(names, names[1:], strict=False) if len(a) == len(b) and a != b)
    return h.replace(a.encode(), b"\0").replace(b.encode(), a.encode()).replace(b"\0", b.encode())


def test_a_merge_verifies_and_the_cli_says_what_it_checked(merged):
    ok = subprocess.run([*CLI, str(merged)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: 21 tensors in ") and "header(s) match the merge's" in ok.stdout
    rep = verify_model(merged)
    assert rep.tasks_checked > 0 and rep.headers_checked == rep.shards and not rep.structural_only


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (_swap_shape, "shard header differs from the one the merge wrote"),
        (_swap_names, "header"),
        (lambda h: h.replace(b'"BF16"', b'"F16" ', 1), "shard header differs"),
    ],
    ids=["shape_swapped", "names_swapped", "dtype_changed"],
)
def test_header_edits_that_keep_valid_json_are_caught(model, edit, needle):
    for shard in sorted(model.glob("*.safetensors")):
        try:
            _edit_header(shard, edit)
            break
        except StopIteration:  # no pair of names of one length in this shard
            continue
    with pytest.raises(CheckpointError, match=needle) as exc:
        verify_model(model)
    assert shard.name in str(exc.value)


def test_trailing_bytes_are_refused(model):
    with open(_shard(model), "ab") as f:
        f.write(b"\0" * (1 << 20))
    with pytest.raises(CheckpointError, match="1048576 trailing bytes after the last tensor's data"):
        verify_model(model)


def test_duplicate_key_in_a_header_is_refused(tmp_path):
    header = (
        b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'
    )
    model = tmp_path / "dup"
    model.mkdir()
    (model / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model.safetensors"}}))
    with pytest.raises(CheckpointError, match="duplicate key 'w'"):
        verify_model(model, structural=True)


def test_without_receipts_verify_says_what_it_could_not_check(model):
    (model / ".raymerge" / "receipts.json").unlink()
    bad = subprocess.run([*CLI, str(model)], capture_output=True, text=True, timeout=300)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode != 0 and len(lines) == 1, bad.stderr
    assert "could not check the tensor bytes against the merge's checksums" in lines[0]
    assert "--structural" in lines[0]
    ok = subprocess.run([*CLI, "--structural", str(model)], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("structure ok: 21 tensors") and "NOT checked" in ok.stdout
    (model / ".raymerge" / "shards.json").unlink()
    with pytest.raises(CheckpointError, match="nor the headers against the ones the merge wrote"):
        verify_model(model)


@pytest.mark.parametrize(
    ("path", "content", "needle"),
    [
        (".raymerge/receipts.json", b"not json", "receipts is not valid JSON"),
        (".raymerge/receipts.json", b'[{"tensor": "x"}]', "receipt is not {tensor, shard"),
        (".raymerge/receipts.json", b'{"a": 1}', "receipts holds a JSON object where a list belongs"),
        (".raymerge/shards.json", b"[1]", "shard record is not"),
        ("model.safetensors.index.json", b"[]", "index holds a JSON array where a object belongs"),
        ("model.safetensors.index.json", b'{"weight_map": {}}', "index lists no tensors"),
        ("model.safetensors.index.json", b"\xff\xfe", "index is not UTF-8"),
    ],
)
def test_malformed_records_are_one_error_naming_the_file(model, path, content, needle):
    (model / path).write_bytes(content)
    with pytest.raises(CheckpointError, match=re.escape(needle)) as exc:
        verify_model(model)
    assert str(model / path) in str(exc.value)


def test_receipt_moved_to_another_tensor_is_caught(model):
    receipts = json.loads((model / ".raymerge" / "receipts.json").read_text())
    receipts[0]["tensor"], receipts[1]["tensor"] = receipts[1]["tensor"], receipts[0]["tensor"]
    (model / ".raymerge" / "receipts.json").write_text(json.dumps(receipts))
    with pytest.raises(CheckpointError, match="places this tensor elsewhere|checksum"):
        verify_model(model)


def test_fifo_shard_or_index_does_not_hang(model):
    shard = _shard(model)
    shard.unlink()
    os.mkfifo(shard)
    with pytest.raises(CheckpointError, match="shard is not a regular file"):
        verify_model(model)
    index = model / "model.safetensors.index.json"
    index.unlink()
    os.mkfifo(index)
    bad = subprocess.run([*CLI, str(model)], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "not a regular file" in bad.stderr
