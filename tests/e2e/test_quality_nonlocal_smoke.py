"""Smoke run of the non-local merge-quality benchmark: two differently seeded tiny bases, 2 + 2
experts, three alignments, merges through ``merge()``, TACT; numbers that can fail."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quality_nonlocal_smoke(tmp_path: Path) -> None:
    # A subprocess, as a user runs it: the CLI, the torch thread setting and the cache stay out of
    # this test process.
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.quality_nonlocal",
        "--smoke",
        "--results-dir",
        str(tmp_path),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "quality_nonlocal_smoke.json").read_text())
    assert (tmp_path / "quality_nonlocal_smoke.png").stat().st_size > 1000
    tasks = list(res["tasks"])
    assert len(res["tasks_a"]) == len(res["tasks_b"]) == 2 and set(res["tasks_a"] + res["tasks_b"]) == set(tasks)
    assert res["seeds"]["base_b"] != res["seeds"]["suite_and_base_a"]
    rows = res["rows"]
    expert = next(r for r in rows if r["label"] == "Experts (individual)")
    for t in tasks:
        assert expert["accuracy"][t] > 0.8, (t, expert["accuracy"])
    by = {(r["alignment"], r["label"]): r for r in rows}

    # Permuting B's side is an exact symmetry: every B expert computes the same logits.
    aligned = [k for k in res["alignments"] if k != "none"]
    assert set(aligned) == {"wm", "wm_res", "am_res"}
    for key in aligned:
        info = res["alignments"][key]
        assert max(info["function_check"]["max_abs_logit_diff"].values()) <= 1e-4
        assert info["distance_after"] < info["distance_before"]

    # Residual streams of two seeds are unrelated channel by channel; matching them pairs up
    # correlated channels (activation matching by construction more than weight matching).
    def residual_corr(key: str) -> float:
        c = res["alignments"][key]["residual_correlation"]
        return sum(c.values()) / len(c)

    assert abs(residual_corr("none")) < 0.05
    assert residual_corr("am_res") > residual_corr("wm_res") > residual_corr("none") + 0.05

    # Variance collapse of the unaligned average at the MLP pre-activations (post-LN BERT's other
    # points are LayerNorm outputs, renormalised per token); alignment lessens it.
    def mlp_ratio(key: str) -> float:
        return by[(key, "Average")]["sigma_ratio"]["mlp_preactivation"]

    assert mlp_ratio("none") < 0.9
    assert mlp_ratio("am_res") > mlp_ratio("none") + 0.03

    # TACT reproduces the expert's per-channel std at every point on the calibration data, and
    # recovers accuracy over the merge it corrects; more correction points recover more.
    for key, c in res["variance_collapse"].items():
        assert set(c["after"]) == set(c["before"]) and len(c["after"]) == 3 * res["config"]["size"]["layers"]
        for p, v in c["after"].items():
            assert abs(v - 1) < 1e-2, (key, p, v)
        tact = next(r for r in rows if r["alignment"] == key and r.get("method") == "tact")
        merged = by[(key, tact["on"])]
        assert tact["mean_normalized"] > merged["mean_normalized"] + 0.02, (key, tact["mean_normalized"])
    wide = next(r for r in rows if r.get("method") == "tact_wide")
    default = next(r for r in rows if r["alignment"] == wide["alignment"] and r.get("method") == "tact")
    assert wide["on"] == default["on"] and wide["params"]["points_per_task"] > 3 * res["config"]["size"]["layers"]
    assert wide["mean_normalized"] > default["mean_normalized"]

    # Interpolating A's and B's expert averages: endpoints are the two local averages.
    for path in res["interpolation"].values():
        assert [p["alpha"] for p in path] == [0.0, 0.25, 0.5, 0.75, 1.0]
        assert path[0]["tasks_a_normalized"] > path[0]["tasks_b_normalized"]
        assert path[-1]["tasks_b_normalized"] > path[-1]["tasks_a_normalized"]

    for r in rows:
        for t in tasks:
            assert 0.0 < r["normalized"][t] <= 2.0, (r["label"], r["normalized"])
        assert abs(r["mean_normalized"] - sum(r["normalized"].values()) / len(tasks)) < 1e-9

    # The README table is rendered from the JSON: header, rule, one line per row, the expert line;
    # then the variance-collapse table with one line per alignment.
    if str(ROOT) not in sys.path:  # benchmarks/ is a top-level package of the checkout, not installed
        sys.path.insert(0, str(ROOT))
    from benchmarks.quality_nonlocal import markdown_table

    table = markdown_table(res)
    main, collapse = table.split("\n\n")
    assert len(main.splitlines()) == len(rows) + 3
    assert len(collapse.splitlines()) == len(res["variance_collapse"]) + 2
    assert proc.stdout.startswith(main.splitlines()[0])
    assert re.search(r"\| no alignment \| Average \|", table)
    assert f"wrote {tmp_path / 'quality_nonlocal_smoke.json'}" in proc.stdout
