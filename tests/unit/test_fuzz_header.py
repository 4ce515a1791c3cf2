"""Fuzzing the safetensors header parser: any input ends in a HeaderError/CheckpointError or a
valid parse — never another exception, a hang, or an allocation larger than the file."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raymerge.engine.errors import CheckpointError
from raymerge.engine.storage import ShardReader, parse_header

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "headers"

_dtypes = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "Q4", "", "f32"])
_ints = st.one_of(st.integers(-5, 300), st.just(2**63), st.booleans(), st.floats(allow_nan=True), st.text(max_size=3))
_entry = st.fixed_dictionaries(
    {},
    optional={
        "dtype": _dtypes,
        "shape": st.one_of(st.lists(_ints, max_size=4), _ints),
        "data_offsets": st.one_of(st.lists(_ints, max_size=3), _ints),
    },
)
_header = st.dictionaries(st.text(max_size=8), st.one_of(_entry, _ints, st.none()), max_size=5)


def _check(raw: bytes, size: int) -> None:
    try:
        entries, _, start = parse_header(raw, size, "fuzz.safetensors")
    except CheckpointError:
        return
    for e in entries.values():  # anything accepted is internally consistent
        assert start <= e.start <= e.end <= size
        assert e.numel * e.itemsize == e.nbytes


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(header=_header, data_len=st.integers(0, 512))
def test_structured_headers(header, data_len):
    raw = json.dumps(header).encode()
    _check(raw, 8 + len(raw) + data_len)


@settings(max_examples=400, deadline=None)
@given(blob=st.binary(max_size=300))
def test_arbitrary_bytes_as_header(blob):
    _check(blob, 8 + len(blob) + 16)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=64), length=st.integers(0, 2**64 - 1))
def test_arbitrary_files(tmp_path, blob, length):
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", length) + blob)
    with contextlib.suppress(CheckpointError):
        ShardReader(str(f))


@pytest.mark.parametrize("case", sorted(CORPUS.glob("*.bin")), ids=lambda p: p.name)
def test_committed_corpus(case, tmp_path):
    """Inputs that once broke or nearly broke a parser are kept and replayed."""
    data = case.read_bytes()
    f = tmp_path / "x.safetensors"
    f.write_bytes(data)
    with pytest.raises(CheckpointError):
        ShardReader(str(f))
