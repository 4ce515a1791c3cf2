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
            "--repeats",
            "2",
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
        assert r["repeats"] == 2 and len(r["walls_s"]) == len(r["io_floors_s"]) == 2
        assert r["wall_over_io_floor"] in r["walls_over_io_floor"] and r["wall_s"] in r["walls_s"]
    # One floor before each of the 2 × 2 runs (the first run takes the floor measured at the start).
    assert len(mx["io_floor"]["floors_s"]) == 4
    assert [s["workers"] for s in mx["scaling"]] == [1, 2]
    growth = {g["size"]: g for g in res["growth"]}
    assert growth["small"]["input_bytes"] > 10 * growth["tiny"]["input_bytes"]
    assert "| ties | raymerge | local |" in throughput.summary_table(res)


def test_a_row_is_the_repeat_with_the_median_ratio():
    """Each run is judged against the floor measured just before it: the row keeps the repeat
    whose wall over its own floor is the median, not the fastest wall."""
    runs = [
        {"returncode": 0, "wall_s": w, "io_floor_s": f, "wall_over_io_floor": round(w / f, 4)}
        for w, f in ((8.0, 2.0), (6.0, 1.0), (9.0, 4.5))
    ]
    row = throughput.typical(runs)
    assert (row["wall_s"], row["wall_over_io_floor"]) == (8.0, 4.0)
    assert row["walls_s"] == [8.0, 6.0, 9.0] and row["walls_over_io_floor"] == [4.0, 6.0, 2.0]
    ray = [dict(r, wall_s=r["wall_s"] * k) for r, k in zip(runs, (1.1, 1.5, 1.0), strict=True)]
    assert throughput.median_ratio(ray, runs) == 1.1
    failed = throughput.typical([*runs, {"returncode": 1, "wall_s": 1.0}])
    assert failed["returncode"] == 1


def test_ray_split_reads_the_summary_table(tmp_path):
    """The benchmark's split of a Ray run (driver vs cluster, start-up times) from the table the
    executor prints."""
    from raymerge.cluster.progress import DRIVER_ROW, ClusterProgress
    from raymerge.engine.task import Receipt

    def receipt(i: int, read: int) -> Receipt:
        return Receipt(id=f"t{i}", tensor=f"t{i}", crc32=0, nbytes=10, read_bytes=read, seconds=0.5, device="cpu")

    p = ClusterProgress(5, 0)
    p.unit_done(DRIVER_ROW, "driver", [receipt(0, 2_000_000_000)], 0)
    p.unit_done("abcdef0123456789", "10.0.0.1", [receipt(i, 500_000_000) for i in range(1, 5)], 0)
    log = tmp_path / "ray.log"
    log.write_text("noise\n" + p.table("embedded Ray ready after 3.2 s, workers warm after 5.0 s") + "\nfigures\n")
    split = throughput.ray_split(log)
    assert split == {
        "driver_tasks": 1,
        "driver_read_gb": 2.0,
        "ray_tasks": 4,
        "ray_read_gb": 2.0,
        "head_ready_s": 3.2,
        "workers_warm_s": 5.0,
    }
    log.write_text(p.table("embedded Ray not ready before the driver had run every task"))
    assert throughput.ray_split(log)["head_ready_s"] is None
