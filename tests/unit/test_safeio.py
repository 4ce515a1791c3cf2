"""The bounded JSON/file readers every parsed side file goes through."""

from __future__ import annotations

import os

import pytest

from raymerge.engine.errors import RaymergeError
from raymerge.engine.safeio import read_json, read_regular


def test_cases(tmp_path):
    p = tmp_path / "a.json"
    for body in ["[" * 100000, '{"a": ' + "9" * 5000 + "}", "[]", "null", '{"a":1,"a":2}', "\xff", "{"]:
        p.write_bytes(body.encode("latin-1"))
        with pytest.raises(RaymergeError):
            read_json(p)
    p.write_text('{"a": [1, {"b": "x[[["}]}')
    assert read_json(p)["a"][0] == 1
    with pytest.raises(RaymergeError):
        read_regular("/dev/zero")
    with pytest.raises(RaymergeError):
        read_regular(tmp_path)
    os.mkfifo(tmp_path / "f")
    with pytest.raises(RaymergeError, match="FIFO"):
        read_regular(tmp_path / "f")
