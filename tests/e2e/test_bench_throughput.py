"""Smoke run of the throughput benchmark on the tiny shape (the only way CI runs it)."""

from __future__ import annotations

import json

import pytest

from benchmarks import throughput


@pytest.mark.slow
def test_throughput_smoke_tiny(tmp_path):
    rc = throughput.main(
        [
            "--size",
            "tiny",
            "--experts",
            "2",
            "--methods",
            "ties,actmat",
            "--executors",
            "local",
            "--peers",
            "none",
            "--workers",
            "1,2",
            "--growth",
            "tiny,small",
            "--workdir",
            str(tmp_path / "work"),
            "--results-dir",
            str(tmp_path / "res"),
            "--stem",
            "smoke",
            "--sample-interval",
            "0.02",
        ]
    )
    assert rc == 0
    res = json.loads((tmp_path / "res" / "smoke.json").read_text())
    assert (tmp_path / "res" / "smoke.png").stat().st_size > 10_000
    assert not (tmp_path / "res" / "smoke.partial.json").exists()
    mx = res["matrix"]
    assert {r["method"] for r in mx["runs"]} == {"ties", "actmat"}
    for r in mx["runs"]:
        assert r["returncode"] == 0 and r["read_gbps"] > 0 and r["peak_rss_bytes"] > 50 << 20
        assert r["wall_over_io_floor"] > 1  # a merge cannot beat reading its inputs once
    assert [s["workers"] for s in mx["scaling"]] == [1, 2]
    growth = {g["size"]: g for g in res["growth"]}
    assert growth["small"]["input_bytes"] > 10 * growth["tiny"]["input_bytes"]
    assert "| ties | raymerge | local |" in throughput.summary_table(res)
