"""TACT: after correction the merged model reproduces the expert's per-channel mean/std at every
point; folded per-task models equal the hooked model; unfoldable points are refused; the
corrections file and CLI round-trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hf_tiny import average, load, perturbed, tiny_bert, tiny_llama, write_jsonl

from raymerge.engine.stats import DataSpec, PassSpec, PointAffine, load_batches, run_pass
from raymerge.engine.tact import (
    Corrections,
    PointCorrection,
    TactError,
    apply_corrections,
    compute_corrections,
    correction,
    fold_corrections,
)

BUILD = {"llama": tiny_llama, "bert": tiny_bert}


def _nonlocal_merge(kind: str, root: Path) -> tuple[str, Path, Path, DataSpec]:
    """An expert of base A averaged with an expert of an unrelated base B (no alignment): the
    non-local merge whose activations collapse."""
    a, b = BUILD[kind](root / "A", seed=0), BUILD[kind](root / "B", seed=1)
    expert = perturbed(a, root / "expert", seed=5, scale=0.2)
    other = perturbed(b, root / "other", seed=6, scale=0.2)
    merged = average([expert, other], root / "merged")
    data = DataSpec((str(write_jsonl(root / "task.jsonl", 24, seed=2)),), batch_size=6)
    return kind, expert, merged, data


@pytest.fixture(scope="module")
def llama_case(tmp_path_factory) -> tuple[str, Path, Path, DataSpec]:
    return _nonlocal_merge("llama", tmp_path_factory.mktemp("tact-llama"))


@pytest.fixture(scope="module")
def bert_case(tmp_path_factory) -> tuple[str, Path, Path, DataSpec]:
    return _nonlocal_merge("bert", tmp_path_factory.mktemp("tact-bert"))


def _moments_with(model_dir: Path, data: DataSpec, tokenizer: Path, hooks_from: Corrections | None, points):
    model = load(model_dir)
    batches = load_batches(data.with_tokenizer(str(tokenizer)))
    if hooks_from is None:
        return run_pass(model, batches, PassSpec(points=tuple(points))).moments
    with apply_corrections(model, hooks_from):  # run_pass's hooks come after: they see corrected outputs
        return run_pass(model, batches, PassSpec(points=tuple(points))).moments


@pytest.mark.parametrize("case", ["llama_case", "bert_case"])
def test_corrected_model_matches_expert_at_every_point(case, request):
    """Acceptance: per-channel mean and std of the corrected merged model on the calibration data
    equal the expert's within 1e-3 at every correction point."""
    kind, expert, merged, data = request.getfixturevalue(case)
    corr = compute_corrections(expert, merged, data, "default", task="t")
    names = [p.point for p in corr.points]
    assert len(names) == 6  # attention output, MLP pre-activation, block output × 2 blocks
    want = _moments_with(expert, data, expert, None, names)
    got = _moments_with(merged, data, expert, corr, names)
    for n in names:
        assert got[n].count == want[n].count > 100
        assert (got[n].mean - want[n].mean).abs().max().item() <= 1e-3, n
        assert (got[n].std - want[n].std).abs().max().item() <= 1e-3, n
    if kind == "llama":  # variance collapse before the correction, as in the paper
        collapse = corr.collapse()
        assert min(collapse.values()) < 0.6 and all(v < 0.9 for v in collapse.values()), collapse

    # Control: corrections computed from the *uncorrected* merged model at every point (not point
    # by point) miss the expert's statistics downstream of the first point.
    plain = _moments_with(merged, data, expert, None, names)
    naive = Corrections(
        "t",
        tuple(
            type(p)(
                p.point,
                *(x.float() for x in correction(want[p.point], plain[p.point], corr.eps)),
                p.expert_mean,
                p.expert_std,
                p.merged_mean,
                p.merged_std,
            )
            for p in corr.points
        ),
        corr.eps,
        corr.tokens,
    )
    off = _moments_with(merged, data, expert, naive, names)
    worst = max((off[n].std - want[n].std).abs().max().item() for n in names[1:])
    assert worst > 1e-2


@pytest.mark.parametrize(
    ("case", "points"),
    [
        ("bert_case", "default"),  # post-LayerNorm outputs and intermediate.dense: all foldable
        ("llama_case", ["*.self_attn.o_proj", "*.mlp.gate_proj"]),
    ],  # Linear outputs; biases switched on
)
def test_folded_model_equals_hooked_model(case, points, request, tmp_path):
    kind, expert, merged, data = request.getfixturevalue(case)
    corr = compute_corrections(expert, merged, data, points, task="t", require_foldable=True)
    with pytest.raises(TactError, match="is the merged model"):  # --overwrite would delete the input
        fold_corrections(merged, corr, merged, overwrite=True)
    out = fold_corrections(merged, corr, tmp_path / "folded")
    info = json.loads((out / "tact.json").read_text())
    if kind == "llama":  # Llama has no o_proj/gate_proj bias: the fold switches the config flags on
        cfg = json.loads((out / "config.json").read_text())
        assert (
            cfg["attention_bias"] and cfg["mlp_bias"] and "model.layers.1.self_attn.o_proj.bias" in info["biases_added"]
        )
    hooked, folded = load(merged), load(out)
    batches = load_batches(data.with_tokenizer(str(expert)))
    key = "logits" if kind == "llama" else "last_hidden_state"
    with apply_corrections(hooked, corr), torch.no_grad():
        for b in batches:
            y_hook, y_fold = hooked(**b)[key], folded(**b)[key]
            assert (y_hook - y_fold).abs().max().item() <= 1e-5 * max(1.0, y_hook.abs().max().item())
    with torch.no_grad():  # and the correction does something
        assert (load(merged)(**batches[0])[key] - folded(**batches[0])[key]).abs().max().item() > 1e-2


def test_unfoldable_points_are_refused(llama_case, tmp_path):
    """Llama's block outputs are residual sums, not any module's output: no weights to fold into."""
    _, expert, merged, data = llama_case
    with pytest.raises(TactError, match=r"model\.layers\.0\b"):
        compute_corrections(expert, merged, data, "default", require_foldable=True)
    corr = compute_corrections(expert, merged, data, "model.layers.1", task="t")
    with pytest.raises(TactError, match="cannot be folded"):
        fold_corrections(merged, corr, tmp_path / "f")
    assert not (tmp_path / "f").exists()


def test_corrections_file_and_cli(bert_case, tmp_path, capsys):
    from raymerge.cli import main

    _, expert, merged, data = bert_case
    args = [
        "tact",
        "compute",
        "--expert",
        str(expert),
        "--merged",
        str(merged),
        "--data",
        data.files[0],
        "--task",
        "qa",
        "--out",
        str(tmp_path),
        "--batch-size",
        "6",
        "--fold",
        "-q",
    ]
    assert main(args) == 0
    path = tmp_path / "corrections" / "qa.safetensors"
    corr = Corrections.load(path)
    assert corr.task == "qa" and len(corr.points) == 6 and corr.eps == 1e-6
    assert corr.points[0].point == "encoder.layer.0.attention.output"
    assert all(p.producer_kind in ("norm", "linear") for p in corr.points)
    assert (tmp_path / "qa" / "config.json").exists() and (tmp_path / "qa" / "tact.json").exists()
    # The API on the same data gives the same file contents.
    api = compute_corrections(expert, merged, data, "default", task="qa")
    for a, b in zip(api.points, corr.points):
        assert torch.allclose(a.scale, b.scale, rtol=1e-5) and torch.allclose(a.shift, b.shift, rtol=1e-5, atol=1e-6)
    assert main(["tact", "show", str(path)]) == 0
    assert "encoder.layer.1.intermediate.dense" in capsys.readouterr().out
    assert (
        main(["tact", "fold", "--merged", str(merged), "--corrections", str(path), "--out", str(tmp_path / "qa")]) == 2
    )
    assert "exists" in capsys.readouterr().err
    assert (
        main(
            [
                "tact",
                "fold",
                "--merged",
                str(merged),
                "--corrections",
                str(path),
                "--out",
                str(tmp_path / "qa"),
                "--overwrite",
            ]
        )
        == 0
    )


def test_point_affine_is_per_channel():
    torch.manual_seed(0)
    from raymerge.engine.stats import Moments

    x = torch.randn(500, 4, dtype=torch.float64) * torch.tensor([0.5, 1, 2, 3]) + torch.tensor([1.0, -2, 0, 5])
    target = Moments.of_rows(torch.randn(300, 4, dtype=torch.float64) * 7 - 1)
    a, s = correction(target, Moments.of_rows(x), eps=0.0)
    y = Moments.of_rows(x * a + s)
    assert torch.allclose(y.mean, target.mean, atol=1e-12) and torch.allclose(y.std, target.std, rtol=1e-12)
    assert isinstance(PointAffine("p", a, s).scale, torch.Tensor)


def _norm_correction(point: str, channels: int) -> Corrections:
    """A made-up correction of one LayerNorm's output (foldable into γ and β, no statistics needed)."""
    g = torch.Generator().manual_seed(3)
    stat = torch.ones(channels, dtype=torch.float64)
    p = PointCorrection(
        point,
        1 + 0.1 * torch.rand(channels, generator=g),
        0.1 * torch.randn(channels, generator=g),
        0 * stat,
        stat,
        0 * stat,
        stat,
        point,
        "norm",
    )
    return Corrections("t", (p,), 1e-6, 1)


def test_fold_overwrite_keeps_the_old_model_until_the_new_one_is_complete(bert_case, tmp_path, monkeypatch):
    import shutil

    _, _, merged, _ = bert_case
    corr = _norm_correction("encoder.layer.0.output.LayerNorm", 32)
    out = fold_corrections(merged, corr, tmp_path / "folded")
    (out / "marker").write_text("the old model")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = shutil.copy2

    def full_disk(*args, **kwargs):  # after the shards are written, before the side files are
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copy2", full_disk)
    with pytest.raises(OSError, match="No space"):
        fold_corrections(merged, corr, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the old model is untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded"], "no staging directory is left behind"
    monkeypatch.setattr(shutil, "copy2", real)

    # And a successful overwrite never leaves the path empty: check it around every move and delete.
    import os

    def watched(fn):
        def call(*args, **kwargs):
            assert os.path.isdir(out), f"nothing at {out} before {fn.__name__}"
            result = fn(*args, **kwargs)
            assert os.path.isdir(out), f"nothing at {out} after {fn.__name__}"
            return result

        return call

    for module, name in ((os, "rename"), (os, "replace"), (shutil, "rmtree"), (shutil, "move")):
        monkeypatch.setattr(module, name, watched(getattr(module, name)))
    assert fold_corrections(merged, corr, out, overwrite=True) == out
    assert not (out / "marker").exists() and (out / "tact.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folded"]
