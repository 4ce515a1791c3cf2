"""Header parsing, zero-copy local reads, sharded/single layouts, and HTTP range reads."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from raymerge.engine.errors import CheckpointError, HeaderError
from raymerge.engine.storage import ShardReader, open_checkpoint, open_shard, parse_header

from conftest import load_dir


def _raw_file(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_header_matches_safetensors_library(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2).bfloat16()}
    save_file(tensors, tmp_path / "x.safetensors")
    r = ShardReader(str(tmp_path / "x.safetensors"))
    for k, v in tensors.items():
        got = r.read_rows(r.entries[k])
        assert got.dtype == v.dtype and torch.equal(got, v)
    assert torch.equal(r.read_rows(r.entries["a"], 1, 3), tensors["a"][1:3])


def test_local_read_is_zero_copy(tmp_path):
    save_file({"w": torch.randn(64, 64)}, tmp_path / "x.safetensors")
    r = ShardReader(str(tmp_path / "x.safetensors"))
    v1 = r.read_rows(r.entries["w"], 0, 8)
    v2 = r.read_rows(r.entries["w"], 0, 8)
    # Both views point into the same mapping: no bytes were copied.
    assert v1.data_ptr() == v2.data_ptr()


@pytest.mark.parametrize(
    "header,data,match",
    [
        ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}, b"\0" * 8, "outside the data section"),
        ({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}, b"\0" * 16, "needs 24 bytes"),
        ({"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2, "unsupported dtype"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlaps",
        ),
        ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "bad shape"),
        ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4, "bad data_offsets"),
    ],
)
def test_bad_headers_are_refused(tmp_path, header, data, match):
    f = _raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(HeaderError, match=match) as exc:
        ShardReader(str(f))
    assert "bad.safetensors" in str(exc.value)


def test_header_length_beyond_file(tmp_path):
    f = tmp_path / "t.safetensors"
    f.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(HeaderError, match="beyond the file"):
        ShardReader(str(f))


def test_not_json_header(tmp_path):
    f = tmp_path / "t.safetensors"
    f.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}")
    with pytest.raises(HeaderError, match="JSON"):
        parse_header(b"\xff\xfe{}", 12, str(f))


def test_index_with_path_components_is_refused(tmp_path, family):
    base, _ = family
    bad = tmp_path / "bad"
    bad.mkdir()
    idx = json.loads((base / "model.safetensors.index.json").read_text())
    name = next(iter(idx["weight_map"]))
    idx["weight_map"][name] = "../../etc/passwd"
    (bad / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        open_checkpoint(str(bad))


def test_pickle_only_checkpoint_is_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(str(tmp_path))


def test_sharded_and_single_layouts_read_the_same(family):
    base, _ = family
    ck = open_checkpoint(str(base))
    assert len({u for u in ck.shard_of.values()}) > 1
    ref = load_dir(base)
    assert set(ck.entries) == set(ref)
    for name, entry in ck.entries.items():
        got = open_shard(ck.shard_of[name]).read_rows(entry)
        assert torch.equal(got, ref[name]), name


def test_output_overlap_catches_an_output_that_is_holds_or_lies_in_an_input(tmp_path):
    from raymerge.engine.storage import output_overlap

    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "models")
    inputs = [str(tmp_path / "models" / "base"), "s3://bucket/models/expert"]
    assert output_overlap(str(tmp_path / "models" / "base"), inputs) == (inputs[0], "is")
    assert output_overlap(str(tmp_path / "models" / "base") + "/", inputs) == (inputs[0], "is")
    assert output_overlap(str(tmp_path / "models"), inputs) == (inputs[0], "contains")
    assert output_overlap(str(tmp_path / "link"), inputs) == (inputs[0], "contains")  # through a symlink
    assert output_overlap(f"file://{tmp_path}/models/x/../base", inputs) == (inputs[0], "is")
    assert output_overlap(str(tmp_path / "models" / "base2"), inputs) is None  # a sibling, not a prefix
    # Inside an input's directory: publishing would change that model (issue 17).
    assert output_overlap(str(tmp_path / "models" / "base" / "merged"), inputs) == (inputs[0], "lies inside")
    assert output_overlap("s3://bucket/models/expert/merged", inputs) == (inputs[1], "lies inside")
    assert output_overlap("s3://bucket/models/", inputs) == (inputs[1], "contains")
    assert output_overlap("s3://bucket/models/expert", inputs) == (inputs[1], "is")
    assert output_overlap("s3://bucket/model", inputs) is None
