"""Multi-stage recipes: mergekit-multi's named stages and mergekit-mega's ``out_path`` stages run
in dependency order, the final one into OUT; against mergekit 0.1.5's own ``mergekit-multi``."""

from __future__ import annotations

import json
import os

import pytest
import torch

from raymerge.cli import main as raymerge_main

from conftest import load_dir


def _multi(base, experts, first_name: str = "blend") -> str:
    """Two named stages and an unnamed final merge that reads both, listed final-first."""
    e0, e1, e2 = experts
    return f"""\
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {first_name}
    parameters: {{weight: 0.5}}
  - model: sharp
    parameters: {{weight: 0.3}}
dtype: float32
---
name: {first_name}
merge_method: linear
models:
  - model: {e0}
    parameters: {{weight: 0.5}}
  - model: {e1}
    parameters: {{weight: 0.5}}
dtype: float32
---
name: sharp
merge_method: ties
base_model: {base}
models:
  - model: {first_name}
    parameters: {{weight: 1.0, density: 0.5}}
  - model: {e2}
    parameters: {{weight: 1.0, density: 0.5}}
dtype: float32
"""


def _tensors_close(got: dict, want: dict, tol: float = 1e-6) -> None:
    assert got.keys() == want.keys()
    for k in want:
        err = float((got[k].double() - want[k].double()).abs().max())
        scale = max(1.0, float(want[k].double().abs().max()))
        assert err <= tol * scale, (k, err)


def test_named_stages_match_mergekit_multi(family, tmp_path, capsys):
    base, experts = family
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(_multi(base, experts))
    out = tmp_path / "out"
    assert raymerge_main(["run", str(recipe), str(out), "-q"]) == 0
    err = capsys.readouterr().err
    # Dependency order whatever the document order: blend, then sharp (reads blend), then the final.
    assert err.index("'blend' ->") < err.index("'sharp' ->") < err.index("'final merge' ->")
    assert (tmp_path / "out.stages" / "blend" / "config.json").is_file()
    assert (tmp_path / "out.stages" / "sharp" / "config.json").is_file()

    from click.testing import CliRunner
    from mergekit.scripts.multimerge import main as mergekit_multi

    ref = tmp_path / "mk-out"
    result = CliRunner().invoke(
        mergekit_multi, [str(recipe), "-I", str(tmp_path / "mk-stages"), "--out-path", str(ref)], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    _tensors_close(load_dir(out), load_dir(ref))
    _tensors_close(load_dir(tmp_path / "out.stages" / "sharp"), load_dir(tmp_path / "mk-stages" / "sharp"))


def test_out_path_stages_and_reuse(family, tmp_path, monkeypatch, capsys):
    """mergekit-mega's form: stages written to their ``out_path`` (relative to the working
    directory), referred to by it; a stage that already holds a model is used as it is."""
    base, experts = family
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "mega.yaml"
    recipe.write_text(
        f"""\
merge_method: linear
models:
  - model: {experts[0]}
    parameters: {{weight: 0.5}}
  - model: {experts[1]}
    parameters: {{weight: 0.5}}
dtype: float32
out_path: ./models/blend
---
merge_method: task_arithmetic
base_model: {base}
models:
  - model: models/blend
    parameters: {{weight: 0.7}}
  - model: {experts[2]}
    parameters: {{weight: 0.2}}
dtype: float32
out_path: ./models/final
"""
    )
    assert raymerge_main(["run", str(recipe), "out", "-q"]) == 0
    assert not os.path.exists("models/final")  # the final merge goes to OUT
    # The same two merges as two ordinary recipes.
    (tmp_path / "a.yaml").write_text(recipe.read_text().split("---")[0].replace("out_path: ./models/blend\n", ""))
    (tmp_path / "b.yaml").write_text(
        recipe.read_text()
        .split("---")[1]
        .replace("models/blend", "ref-blend")
        .replace("out_path: ./models/final\n", "")
    )
    assert raymerge_main(["run", "a.yaml", "ref-blend", "-q"]) == 0
    assert raymerge_main(["run", "b.yaml", "ref", "-q"]) == 0
    got, want = load_dir(tmp_path / "out"), load_dir(tmp_path / "ref")
    assert all(torch.equal(got[k], want[k]) for k in want)

    stamp = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "models" / "blend").iterdir()}
    capsys.readouterr()
    assert raymerge_main(["run", str(recipe), "out2", "-q"]) == 0
    assert "already holds a model, used as it is" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "models" / "blend").iterdir()} == stamp
    assert raymerge_main(["run", str(recipe), "out2", "-q", "--overwrite"]) == 0
    assert "'./models/blend' -> ./models/blend" in capsys.readouterr().err


def test_plan_waits_for_stages_not_merged_yet(family, tmp_path, capsys):
    base, experts = family
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(_multi(base, experts))
    inter = tmp_path / "stages"
    assert raymerge_main(["plan", str(recipe), "--intermediate-dir", str(inter)]) == 0
    cap = capsys.readouterr()
    assert "stage 1/3 'blend'" in cap.err and cap.out.count("method      ") == 1
    assert f"not planned, reads {inter / 'blend'}" in cap.err
    assert raymerge_main(["run", str(recipe), str(tmp_path / "out"), "-q", "--intermediate-dir", str(inter)]) == 0
    capsys.readouterr()
    assert raymerge_main(["plan", str(recipe), "--intermediate-dir", str(inter)]) == 0
    assert capsys.readouterr().out.count("method      ") == 3
    # --json: one document for the whole file, a stage's plan null while it waits.
    assert raymerge_main(["plan", str(recipe), "--intermediate-dir", str(tmp_path / "none-yet"), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)["stages"]
    assert [s["stage"] for s in listing] == ["blend", "sharp", "final merge"]
    assert listing[0]["plan"]["method"] == "linear" and listing[0]["plan"]["task_list"]
    assert listing[1]["plan"] is None and listing[1]["waits_for"] == [str(tmp_path / "none-yet" / "blend")]


@pytest.mark.parametrize(
    "case, needle",
    [
        ("cycle", "read each other in a cycle: 'a' -> 'b' -> 'a'"),
        ("twice", "two stages are called 'a'"),
        ("unnamed", "2 documents have neither `name` nor `out_path`"),
        ("sinks", "cannot tell which stage is the final merge: stages no other stage reads: 'a', 'b'"),
        ("path", "stage name '../x' must not be a path"),
    ],
)
def test_bad_stage_graphs_are_one_line(family, tmp_path, capsys, case, needle):
    base, experts = family
    e0, e1 = experts[:2]

    def doc(name, a, b):
        head = f"name: {name}\n" if name else ""
        return (
            head
            + f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1}}\n"
            + (f"  - model: {b}\n    parameters: {{weight: 1}}\n")
        )

    docs = {
        "cycle": [doc("a", "b", e0), doc("b", "a", e1), doc(None, "a", "b")],
        "twice": [doc("a", e0, e1), doc("a", e1, e0), doc(None, "a", e0)],
        "unnamed": [doc(None, e0, e1), doc(None, e1, e0)],
        "sinks": [doc("a", e0, e1), doc("b", e1, e0)],
        "path": [doc("../x", e0, e1), doc(None, "../x", e0)],
    }[case]
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("---\n".join(docs))
    out = tmp_path / "out"
    assert raymerge_main(["run", str(recipe), str(out), "-q"]) != 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("raymerge: error:") and str(recipe) in lines[0], lines
    assert needle in lines[0]
    assert not out.exists() and not (tmp_path / "out.stages").exists()


@pytest.mark.parametrize("case", ["typo-in-last-stage", "out-exists"])
def test_nothing_runs_when_a_later_stage_would_fail(family, tmp_path, capsys, case):
    """A misspelt parameter in the final document, or an OUT that exists, is found before the
    first stage merges anything."""
    base, experts = family
    text = _multi(base, experts)
    out = tmp_path / "out"
    if case == "typo-in-last-stage":
        text = text.replace("weight: 1.0, density: 0.5}\n  - model", "weight: 1.0, densty: 0.5}\n  - model", 1)
        needle = "densty"
    else:
        out.mkdir()
        needle = "output path already exists"
    recipe = tmp_path / "multi.yaml"
    recipe.write_text(text)
    assert raymerge_main(["run", str(recipe), str(out), "-q"]) != 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("raymerge: error:") and needle in lines[0], lines
    assert not (tmp_path / "out.stages").exists()


def test_submitted_multi_stage_recipe_is_portable(family, tmp_path, monkeypatch):
    """``raymerge submit`` ships the recipe to a job with another working directory: relative
    model paths become absolute (slices' sources too), stage names stay names, and the shipped
    text merges the same bytes from anywhere."""
    pytest.importorskip("ray")
    from raymerge.cluster.submit import portable_recipe

    base, experts = family
    monkeypatch.chdir(tmp_path)
    rel_base, rel = os.path.relpath(base), [os.path.relpath(e) for e in experts]
    text = _multi(rel_base, rel)
    portable = portable_recipe(text, "multi.yaml")
    assert "model: blend" in portable and "model: sharp" in portable
    assert str(experts[0]) in portable and f"base_model: {base}" in portable
    (tmp_path / "multi.yaml").write_text(text)
    assert raymerge_main(["run", "multi.yaml", "here", "-q"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "recipe.yaml").write_text(portable)
    monkeypatch.chdir(elsewhere)
    assert raymerge_main(["run", "recipe.yaml", "there", "-q"]) == 0
    got, want = load_dir(elsewhere / "there"), load_dir(tmp_path / "here")
    assert all(torch.equal(got[k], want[k]) for k in want)

    sliced = (
        "merge_method: passthrough\nslices:\n  - sources:\n"
        f"      - model: {os.path.relpath(experts[0])}\n        layer_range: [0, 1]\n"
    )
    assert f"model: {experts[0]}" in portable_recipe(sliced, "sliced.yaml")
