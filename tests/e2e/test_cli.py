"""The CLI: plan output, and bad input → one error line, exit code ≠ 0, nothing at the output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import recipe_text

RAYMERGE = [sys.executable, "-m", "raymerge.cli"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*RAYMERGE, *args], capture_output=True, text=True, timeout=300)


def _assert_clean_failure(proc, out: Path, *needles: str) -> None:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("raymerge: error:"), proc.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert not out.exists()


def test_plan_json(family, tmp_path):
    base, experts = family
    r = tmp_path / "r.yaml"
    r.write_text(recipe_text("ties", base, experts, {"density": 0.5}, [{"weight": 1}] * 3))
    proc = _run("plan", str(r), "--json", "--out-shard-size", "100KB")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["tensors"] == 21 and len(s["shards"]) > 1
    assert s["read_bytes"] == 4 * s["write_bytes"]  # base + 3 experts, fp32 in and out
    assert all(t["est_host_bytes"] > 0 for t in s["task_list"])
    human = _run("plan", str(r))
    assert human.returncode == 0 and "peak task" in human.stdout


def test_bad_recipe_key(family, tmp_path):
    base, experts = family
    r = tmp_path / "r.yaml"
    r.write_text(recipe_text("ties", base, experts, {"densiti": 0.5}, [{"weight": 1}] * 3))
    out = tmp_path / "out"
    _assert_clean_failure(_run("run", str(r), str(out)), out, "densiti", "did you mean 'density'")


def test_missing_model_path(family, tmp_path):
    base, experts = family
    r = tmp_path / "r.yaml"
    r.write_text(recipe_text("ties", base, [*experts[:2], tmp_path / "nope"], None, [{"weight": 1}] * 3))
    out = tmp_path / "out"
    _assert_clean_failure(_run("run", str(r), str(out)), out, "nope")


def _clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_shape_mismatch_names_model_and_tensor(family_single, tmp_path):
    base, experts = family_single
    bad = _clone(experts[1], tmp_path / "bad")
    t = load_file(bad / "model.safetensors")
    t["model.layers.1.mlp.up_proj.weight"] = torch.zeros(10, 64)
    save_file(t, bad / "model.safetensors")
    r = tmp_path / "r.yaml"
    r.write_text(recipe_text("ties", base, [experts[0], bad], None, [{"weight": 1}] * 2))
    out = tmp_path / "out"
    _assert_clean_failure(_run("run", str(r), str(out)), out, str(bad), "model.layers.1.mlp.up_proj.weight")


def test_missing_tensor_names_model_and_tensor(family_single, tmp_path):
    base, experts = family_single
    bad = _clone(experts[1], tmp_path / "bad")
    t = load_file(bad / "model.safetensors")
    del t["model.norm.weight"]
    save_file(t, bad / "model.safetensors")
    r = tmp_path / "r.yaml"
    r.write_text(recipe_text("ties", base, [experts[0], bad], None, [{"weight": 1}] * 2))
    out = tmp_path / "out"
    _assert_clean_failure(_run("run", str(r), str(out)), out, str(bad), "model.norm.weight", "missing")


def test_truncated_shard(family_single, tmp_path):
    base, experts = family_single
    bad = _clone(experts[0], tmp_path / "bad")
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    r = tmp_path / "r.yaml"
    r.write_text(recipe_text("ties", base, [bad, experts[1]], None, [{"weight": 1}] * 2))
    out = tmp_path / "out"
    _assert_clean_failure(_run("run", str(r), str(out)), out, "model.safetensors", "tensor")


def test_nan_input_is_refused(family_single, tmp_path):
    base, experts = family_single
    bad = _clone(experts[0], tmp_path / "bad")
    t = load_file(bad / "model.safetensors")
    t["model.layers.0.self_attn.q_proj.weight"][3, 3] = float("nan")
    save_file(t, bad / "model.safetensors")
    r = tmp_path / "r.yaml"
    r.write_text(recipe_text("task_arithmetic", base, [bad], None, [{"weight": 1}]))
    out = tmp_path / "out"
    _assert_clean_failure(
        _run("run", str(r), str(out), "-q"), out, "NaN", "model.layers.0.self_attn.q_proj.weight", "bad"
    )


def test_budget_too_small_is_refused_by_plan(family, tmp_path):
    base, experts = family
    r = tmp_path / "r.yaml"
    r.write_text(recipe_text("ties", base, experts, None, [{"weight": 1}] * 3))
    out = tmp_path / "out"
    _assert_clean_failure(_run("run", str(r), str(out), "--memory-budget", "10KB"), out, "memory budget", "embed")


def test_vocabulary_mismatch_names_tensor_and_remedy(family_single, tmp_path):
    base, experts = family_single
    bad = _clone(experts[0], tmp_path / "bad")
    t = load_file(bad / "model.safetensors")
    t["model.embed_tokens.weight"] = torch.zeros(520, 64)  # 8 added tokens
    save_file(t, bad / "model.safetensors")
    r = tmp_path / "r.yaml"
    r.write_text(recipe_text("ties", base, [bad, experts[1]], None, [{"weight": 1}] * 2))
    out = tmp_path / "out"
    _assert_clean_failure(_run("run", str(r), str(out)), out, "model.embed_tokens.weight", "vocabulary sizes differ")


def test_absolute_shard_name_in_index_is_refused(family, tmp_path):
    base, experts = family
    bad = tmp_path / "bad"
    shutil.copytree(base, bad)
    idx = json.loads((bad / "model.safetensors.index.json").read_text())
    name = next(iter(idx["weight_map"]))
    idx["weight_map"][name] = "/etc/passwd"
    (bad / "model.safetensors.index.json").write_text(json.dumps(idx))
    r = tmp_path / "r.yaml"
    r.write_text(recipe_text("ties", bad, experts, None, [{"weight": 1}] * 3))
    out = tmp_path / "out"
    _assert_clean_failure(_run("run", str(r), str(out)), out, "not a plain file name", "model.safetensors.index.json")


def test_demo_builds_merges_and_reports(tmp_path, capsys):
    from raymerge.engine.demo import run_demo

    assert run_demo(tmp_path, size="tiny") == 0
    out = capsys.readouterr().out
    for method in ("ties:", "actmat:", "wudi:"):
        assert method in out
    for d in ("merged", "merged-actmat", "merged-wudi"):
        assert (tmp_path / d / "model.safetensors.index.json").exists()


def test_methods_lists_every_method_and_explains_one():
    from raymerge.engine.methods import METHODS

    listing = _run("methods")
    assert listing.returncode == 0
    names = {line.split()[0] for line in listing.stdout.splitlines()[1:]}
    assert names == set(METHODS) - {"mean_task_vector"}
    one = _run("methods", "della")
    assert one.returncode == 0
    density = next(line for line in one.stdout.splitlines() if line.split()[0] == "density")
    assert "per model" in density and "default 1.0" in density and "[0, 1]" in density
    assert "required" in next(line for line in one.stdout.splitlines() if line.split()[0] == "weight")
    bad = _run("methods", "tis")
    assert bad.returncode == 2 and "did you mean 'ties'" in bad.stderr


def test_align_also_pairs_split_between_urls():
    import argparse

    import pytest

    from raymerge.cli.main import _also_pair

    assert _also_pair("s3://models/e:s3://out/e") == ("s3://models/e", "s3://out/e")
    assert _also_pair("/m/e:/o/e") == ("/m/e", "/o/e")
    assert _also_pair("https://h/m:/o") == ("https://h/m", "/o")
    with pytest.raises(argparse.ArgumentTypeError):
        _also_pair("s3://only-one")


def test_abbreviated_long_options_are_refused(tmp_path, capsys):
    """argparse would read `--out DIR` as `--out-shard-size DIR`; a mergekit habit must fail clearly."""
    from raymerge.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "o")])
    assert exc.value.code != 0
    assert "unrecognized arguments: --out" in capsys.readouterr().err


def test_a_mergekit_yaml_command_line_runs(family, tmp_path):
    """mergekit-yaml's flags are accepted by `raymerge run`: 5B is five billion bytes per shard,
    --no-copy-tokenizer leaves the tokenizer out, the rest change nothing."""
    from raymerge.cli import main, parse_size

    base, experts = family
    tok = tmp_path / "base"
    shutil.copytree(base, tok)
    (tok / "tokenizer.json").write_text("{}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text("task_arithmetic", tok, experts, per_model=[{"weight": 0.3}] * 3))
    flags = ["--out-shard-size", "5B", "--lazy-unpickle", "--allow-crimes", "--trust-remote-code", "-q"]
    assert parse_size("5B") == 5 * 10**9 and parse_size("500M") == 5 * 10**8 and parse_size("1024") == 1024
    assert main(["run", str(recipe), str(tmp_path / "a"), *flags, "--no-copy-tokenizer"]) == 0
    assert main(["run", str(recipe), str(tmp_path / "b"), *flags, "--copy-tokenizer"]) == 0
    assert not (tmp_path / "a" / "tokenizer.json").exists() and (tmp_path / "b" / "tokenizer.json").exists()
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_submit_forwards_every_run_option():
    """`submit` rebuilds `raymerge run`'s flags from the one declaration of them."""
    from raymerge.cli.main import build_parser
    from raymerge.cli.options import MERGEKIT_OPTIONS, RUN_OPTIONS, forward

    argv = ["submit", "r.yaml", "--out", "o", "--memory-budget", "2GiB", "--workers", "3", "--device", "cuda"]
    argv += ["--device-memory", "80GiB", "--overwrite", "--strict", "--no-copy-tokenizer", "--out-shard-size", "1GB"]
    args = build_parser().parse_args(argv)
    got = forward(args, (*RUN_OPTIONS, *MERGEKIT_OPTIONS))
    again = build_parser().parse_args(["run", "r.yaml", "o", *got])
    for opt in (*RUN_OPTIONS, *MERGEKIT_OPTIONS):
        assert getattr(again, opt.dest) == getattr(args, opt.dest), opt.flag
