"""Smoke runs of the benchmark scripts (the only benchmark code CI runs): tiny sizes, sane numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quality_smoke(tmp_path: Path) -> None:
    # A subprocess, as a user runs it: the CLI, the torch thread setting and the cache stay out of
    # this test process.
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.quality",
        "--smoke",
        "--results-dir",
        str(tmp_path),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "quality_smoke.json").read_text())
    assert (tmp_path / "quality_smoke.png").stat().st_size > 1000
    rows = {r["label"]: r for r in result["rows"]}
    probe, expert = rows["Base (linear probe)"], rows["Experts (individual)"]
    tasks = list(result["tasks"])
    assert len(tasks) == 2
    for t in tasks:
        assert expert["accuracy"][t] > probe["accuracy"][t] + 0.1, (t, expert["accuracy"], probe["accuracy"])
        assert expert["accuracy"][t] > 0.8
    merged = [r for r in result["rows"] if r["kind"] != "reference" and r.get("status") != "pending"]
    assert {r["method"] for r in merged} >= {"task_arithmetic", "ties", "actmat"}
    for r in merged:
        for t in tasks:
            assert 0.0 < r["normalized"][t] <= 1.5, (r["label"], r["normalized"])
        assert abs(r["mean_normalized"] - sum(r["normalized"].values()) / len(tasks)) < 1e-9
    for r in result["rows"]:
        if r.get("status") == "pending":
            assert r["reason"]
    # Reruns reuse the trained base and experts from the cache.
    assert result["training"]["cached"] is False
    assert (Path(result["training"]["cache_dir"]) / "complete.json").exists()
    # The README table is rendered from the JSON: one line per row plus header, rule and expert line.
    if str(ROOT) not in sys.path:  # benchmarks/ is a top-level package of the checkout, not installed
        sys.path.insert(0, str(ROOT))
    from benchmarks.quality import markdown_table

    table = markdown_table(result)
    assert len(table.splitlines()) == len(result["rows"]) + 3
    assert proc.stdout.startswith(table.splitlines()[0])


def test_svd_paths_smoke(tmp_path: Path) -> None:
    # Both spectral solver paths on small shapes: same merge (≤ 1e-8), the Gram path runs no exact
    # SVD on these well-conditioned rectangular matrices, and the per-block totals add up.
    out = tmp_path / "svd.json"
    cmd = [sys.executable, "-m", "benchmarks.svd_paths", "--block", "quick", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    assert {(r["shape"], r["method"]) for r in res["rows"]} == {
        (s, m) for s in ("attn_256x256", "mlp_in_688x256", "mlp_out_256x688") for m in ("tsv_m", "iso_c", "iso_cts")
    }
    for r in res["rows"]:
        assert r["rel_diff"] <= 1e-8, r
        assert r["exact_svds"] > 0
        if r["shape"] != "attn_256x256":
            assert r["auto_exact_svds"] == 0, r
    counts = {"attn_256x256": 4, "mlp_in_688x256": 2, "mlp_out_256x688": 1}
    for m, tot in res["per_block"].items():
        want = sum(r["exact_s"] * counts[r["shape"]] for r in res["rows"] if r["method"] == m)
        assert abs(tot["exact_s"] - want) < 2e-3, (m, tot, want)
