"""Activation statistics: Grams and moments against direct fp64 references, the exact parallel
merge, accelerate offload vs plain loading, Ray actors vs one process, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_tiny import tiny_llama, write_jsonl
from safetensors import safe_open
from safetensors.torch import save_file

from raymerge.engine.plan import open_aux
from raymerge.engine.stats import DataSpec, Moments, collect_stats, merge_moments, read_moments

RAYMERGE = [sys.executable, "-m", "raymerge.cli"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("stats")
    return tiny_llama(root / "llama"), write_jsonl(root / "task.jsonl", 23, seed=1)


def _grams(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _reference(model_dir: Path, data: Path, batch_size: int) -> tuple[dict, dict]:
    """fp64 Grams (inputs of every Linear) and moments at the default points, from raw captured
    activations with padding removed, via transformers and the tokenizer directly."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    points = [f"model.layers.{i}.{s}" for i in range(2) for s in ("self_attn.o_proj", "mlp.gate_proj")] + [
        f"model.layers.{i}" for i in range(2)
    ]
    ins: dict[str, list] = {}
    outs: dict[str, list] = {}
    mods = dict(model.named_modules())
    handles = []
    for name, mod in mods.items():
        if isinstance(mod, torch.nn.Linear):
            handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: ins.setdefault(n, []).append(a[0])))
    for p in points:
        handles.append(mods[p].register_forward_hook(lambda m, a, o, n=p: outs.setdefault(n, []).append(o)))
    masks = []
    with torch.no_grad():
        for lo in range(0, len(texts), batch_size):
            enc = tok(texts[lo : lo + batch_size], padding=True, return_tensors="pt")
            masks.append(enc["attention_mask"].bool())
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    grams = {}
    for n, xs in ins.items():
        rows = torch.cat([x[m] for x, m in zip(xs, masks)]).double()
        grams[n] = (rows.T @ rows / rows.shape[0], rows.shape[0])
    moments = {}
    for n, ys in outs.items():
        rows = torch.cat([y[m] for y, m in zip(ys, masks)]).double()
        moments[n] = (rows.mean(0), rows.var(0, unbiased=False), rows.shape[0])
    return grams, moments


def test_grams_and_moments_match_fp64_reference(llama, tmp_path):
    model_dir, data = llama
    res = collect_stats(model_dir, DataSpec((str(data),), batch_size=5), tmp_path, points="default")
    ref_grams, ref_moments = _reference(model_dir, data, 5)
    got = _grams(tmp_path / "grams.safetensors")
    assert set(got) == set(ref_grams) and len(got) == 15  # 7 per block + lm_head
    for name, (g, n) in ref_grams.items():
        assert res.gram_rows[name] == n < 23 * 13  # non-padding tokens only
        assert got[name].dtype == torch.float32 and got[name].shape == g.shape
        assert ((got[name].double() - g).norm() / g.norm()).item() <= 1e-6, name
    assert res.tokens == n
    assert set(res.points) == set(ref_moments)
    stored = read_moments(tmp_path / "moments.safetensors")
    for name, (mean, var, n) in ref_moments.items():
        m = stored[name]
        assert m.count == n
        assert (m.mean - mean).abs().max().item() <= 1e-6 * max(1.0, mean.abs().max().item()), name
        assert ((m.var - var).abs() / var).max().item() <= 1e-5, name
    # network order: attention output, MLP pre-activation, block output, block by block
    assert res.points[:3] == ("model.layers.0.self_attn.o_proj", "model.layers.0.mlp.gate_proj", "model.layers.0")
    summary = json.loads((tmp_path / "stats.json").read_text())
    assert summary["tokens"] == n and summary["passes"] == 1


def test_gram_file_is_what_regmean_reads(llama, tmp_path):
    model_dir, data = llama
    collect_stats(model_dir, DataSpec((str(data),), batch_size=8), tmp_path)
    ck = open_aux(str(tmp_path / "grams.safetensors"))
    assert ck.entries["model.layers.1.mlp.down_proj"].shape == (48, 48)
    assert ck.entries["model.layers.0.self_attn.q_proj"].shape == (32, 32)


def test_chan_merge_equals_whole():
    torch.manual_seed(0)
    x = torch.randn(1000, 7, dtype=torch.float64) * 3 + 5
    whole = Moments.of_rows(x)
    cuts = [0, 1, 17, 400, 401, 1000]
    parts = [{"p": Moments.of_rows(x[a:b])} for a, b in zip(cuts, cuts[1:])]
    merged = merge_moments(parts)["p"]
    assert merged.count == 1000
    assert torch.allclose(merged.mean, x.mean(0), rtol=0, atol=1e-12)
    assert torch.allclose(merged.var, x.var(0, unbiased=False), rtol=1e-12, atol=0)
    assert torch.allclose(whole.m2, merged.m2, rtol=1e-12, atol=0)


def test_accelerate_offload_gives_the_plain_statistics(llama, tmp_path):
    """Tensor data (.pt input ids); on CPU a host budget far below the model forces disk offload and
    several Gram passes; the statistics must not change."""
    model_dir, _ = llama
    g = torch.Generator().manual_seed(3)
    torch.save({"input_ids": torch.randint(3, 40, (12, 9), generator=g)}, tmp_path / "ids.pt")
    spec = DataSpec((str(tmp_path / "ids.pt"),), batch_size=4)
    plain = collect_stats(model_dir, spec, tmp_path / "plain", points="default", device="cpu")
    off = collect_stats(model_dir, spec, tmp_path / "off", points="default", device="cpu", memory_budget=80_000)
    assert plain.passes == 1 and off.passes > 2  # the offloaded run splits the Grams into several passes
    assert plain.tokens == off.tokens == 12 * 9
    a, b = _grams(tmp_path / "plain" / "grams.safetensors"), _grams(tmp_path / "off" / "grams.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-6, atol=1e-7), k
    for p in plain.points:
        assert torch.allclose(plain.moments[p].mean, off.moments[p].mean, rtol=1e-6, atol=1e-7)
        assert torch.allclose(plain.moments[p].var, off.moments[p].var, rtol=1e-6, atol=1e-9)


def test_offload_is_really_used(llama):
    from raymerge.engine.stats import load_model, release_model

    model_dir, _ = llama
    loaded = load_model(model_dir, device="cpu", memory_budget=80_000)
    try:
        assert loaded.dispatched and loaded.host_weight_bytes < 40_000
        assert any(p.device.type == "meta" for p in loaded.model.parameters())  # streamed from disk
    finally:
        release_model(loaded)


def test_cli_stats_and_clean_errors(llama, tmp_path, capfd):
    model_dir, data = llama
    ok = subprocess.run(
        [
            *RAYMERGE,
            "stats",
            str(model_dir),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "s"),
            "--points",
            "*.mlp.gate_proj",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ok.returncode == 0, ok.stderr
    assert "grams" in ok.stdout and (tmp_path / "s" / "grams.safetensors").exists()
    assert set(read_moments(tmp_path / "s" / "moments.safetensors")) == {
        f"model.layers.{i}.mlp.gate_proj" for i in range(2)
    }

    from raymerge.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "the cat"}\n')
    for args, needle in [
        (("--data", str(bad)), "text-field"),
        (("--data", str(data), "--points", "model.layers.9.mlp"), "model.layers.9.mlp"),
        (("--data", str(tmp_path / "missing.jsonl")), "missing.jsonl"),
    ]:
        capfd.readouterr()
        code = main(["stats", str(model_dir), *args, "--out", str(tmp_path / "x"), "-q"])
        lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
        assert code != 0 and len(lines) == 1 and lines[0].startswith("raymerge: error:"), lines
        assert needle in lines[0]


def test_text_without_tokenizer_is_refused(tmp_path):
    from raymerge.engine.stats import StatsError, load_batches

    (tmp_path / "d.jsonl").write_text('{"text": "a b"}\n')
    with pytest.raises(StatsError, match="tokenizer"):
        load_batches(DataSpec((str(tmp_path / "d.jsonl"),), tokenizer=str(tmp_path)))


@pytest.mark.ray
def test_ray_two_actors_match_one_process(llama, tmp_path):
    """`raymerge stats --executor ray --actors 2`: each actor takes half the batches; the driver's
    exact combination equals the single-process statistics to fp32 rounding."""
    import ray

    from raymerge.cli import main

    model_dir, data = llama
    common = ["stats", str(model_dir), "--data", str(data), "--batch-size", "4", "-q"]
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main([*common, "--out", str(tmp_path / "ray"), "--executor", "ray", "--actors", "2"]) == 0
    finally:
        ray.shutdown()
    a, b = _grams(tmp_path / "local" / "grams.safetensors"), _grams(tmp_path / "ray" / "grams.safetensors")
    assert set(a) == set(b) and len(a) == 15
    for k in a:
        assert ((a[k].double() - b[k].double()).norm() / a[k].double().norm()).item() <= 1e-6, k
    ma, mb = (
        read_moments(tmp_path / "local" / "moments.safetensors"),
        read_moments(tmp_path / "ray" / "moments.safetensors"),
    )
    assert list(ma) == list(mb) and len(ma) == 6
    for p in ma:
        assert ma[p].count == mb[p].count
        assert torch.allclose(ma[p].mean, mb[p].mean, rtol=1e-6, atol=1e-7), p
        assert torch.allclose(ma[p].var, mb[p].var, rtol=1e-6, atol=1e-9), p
    sa, sb = (json.loads((tmp_path / d / "stats.json").read_text()) for d in ("local", "ray"))
    assert sa["gram_rows"] == sb["gram_rows"] and sa["tokens"] == sb["tokens"]
    assert not (tmp_path / "ray" / ".partial").exists()


def test_save_tensor_file_single_unnamed_tensor(llama, tmp_path):
    """A safetensors file with one unnamed tensor feeds the model's main input."""
    model_dir, _ = llama
    save_file({"x": torch.randint(3, 40, (5, 6))}, str(tmp_path / "ids.safetensors"))
    res = collect_stats(model_dir, DataSpec((str(tmp_path / "ids.safetensors"),), batch_size=2), tmp_path / "o")
    assert res.batches == 3 and res.tokens == 30
