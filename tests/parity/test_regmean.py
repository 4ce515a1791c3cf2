"""RegMean solve from given Gram matrices: FusionBench parity, fp64 reference, engine end to end."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from raymerge.engine.errors import CheckpointError
from raymerge.engine.merge import merge
from raymerge.engine.methods import METHODS, MergeArgs
from raymerge.engine.recipe import parse_recipe

from conftest import load_dir, recipe_text


def _grams(cols, n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(4 * cols, cols, generator=g, dtype=torch.float64)
        out.append(x.T @ x / x.shape[0])
    return out


def _args(grams, alpha):
    shared = {p.name: p.default for p in METHODS["regmean"].params if p.scope.value == "shared"}
    shared["alpha"] = alpha
    return MergeArgs(shared, [{}] * len(grams), None, "w", 0, grams)


@pytest.mark.parametrize("shape", [(48, 32), (32, 48)])
@pytest.mark.parametrize("alpha", [1.0, 0.95, 0.1])
def test_regmean_matches_fusion_bench(shape, alpha):
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights

    torch.manual_seed(0)
    ws = [torch.randn(*shape, dtype=torch.float64) for _ in range(3)]
    grams = _grams(shape[1], 3, seed=1)
    ref = merging_with_regmean_weights(
        {"m.weight": ws}, [{"m": g} for g in grams], reduce_non_diagonal_ratio=alpha, weight_transpose=True
    )["m.weight"]
    ours = METHODS["regmean"].fn(None, ws, _args(grams, alpha))
    assert ((ours - ref).norm() / ref.norm()).item() <= 1e-8  # issue bound: 1e-4


def test_regmean_singular_grams_use_pseudo_inverse():
    # Inputs confined to a subspace: Σ G is singular, Cholesky fails, the pinv solution is used.
    torch.manual_seed(1)
    basis = torch.randn(16, 6, dtype=torch.float64)
    grams = [basis @ torch.diag(torch.rand(6, dtype=torch.float64) + 0.5) @ basis.T for _ in range(2)]
    ws = [torch.randn(10, 16, dtype=torch.float64) for _ in range(2)]
    out = METHODS["regmean"].fn(None, ws, _args(grams, 1.0))
    ref = sum(w @ g for w, g in zip(ws, grams)) @ torch.linalg.pinv(sum(grams), hermitian=True)
    assert torch.isfinite(out).all() and ((out - ref).norm() / ref.norm()).item() <= 1e-8


def _write_grams(path, base_dir, seed):
    """One Gram per linear layer of the tiny Llama, keyed by module name."""
    tensors = load_dir(base_dir)
    grams = {}
    for i, (name, w) in enumerate(sorted(tensors.items())):
        if w.dim() == 2 and "embed" not in name and "lm_head" not in name:
            grams[name[: -len(".weight")]] = _grams(w.shape[1], 1, seed * 1000 + i)[0].float()
    save_file(grams, str(path))
    return grams


def test_engine_regmean_end_to_end(family, tmp_path):
    base, experts = family
    files = [tmp_path / f"grams{i}.safetensors" for i in range(3)]
    grams = [_write_grams(f, base, i) for i, f in enumerate(files)]
    text = recipe_text("regmean", None, experts, {"alpha": 0.9}, [{"grams": str(f)} for f in files])
    merge(parse_recipe(text), tmp_path / "out", progress=False)
    out = load_dir(tmp_path / "out")
    es = [load_dir(e) for e in experts]
    name = "model.layers.1.self_attn.q_proj.weight"
    module = name[: -len(".weight")]
    g = [grams[i][module].double() for i in range(3)]
    gt = [0.9 * x + 0.1 * torch.diag(torch.diag(x)) for x in g]
    ref = sum(e[name].double() @ x for e, x in zip(es, gt)) @ torch.linalg.inv(sum(gt))
    assert ((out[name].double() - ref).norm() / ref.norm()).item() <= 1e-6
    mean = sum(e["model.norm.weight"].double() for e in es) / 3
    assert (out["model.norm.weight"].double() - mean).abs().max() <= 1e-6


def test_missing_gram_names_file_and_layer(family, tmp_path):
    base, experts = family
    files = [tmp_path / f"grams{i}.safetensors" for i in range(2)]
    _write_grams(files[0], base, 0)
    partial = _write_grams(files[1], base, 1)
    partial.pop("model.layers.0.mlp.up_proj")
    save_file(partial, str(files[1]))
    text = recipe_text("regmean", None, experts[:2], None, [{"grams": str(f)} for f in files])
    with pytest.raises(CheckpointError, match="model.layers.0.mlp.up_proj") as exc:
        merge(parse_recipe(text), tmp_path / "out", progress=False)
    assert "grams1.safetensors" in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_regmean_from_collected_grams_matches_fusion_bench(tmp_path):
    """End to end: `collect_stats` on each expert's own data → Gram files → a `regmean` recipe →
    merged model, against FusionBench's `regmean_merging`, which collects its Grams with its own
    forward hooks on the same models and batches (no padding: FusionBench counts every row)."""
    from fusion_bench.method.regmean.regmean import regmean_merging
    from hf_tiny import perturbed, tiny_llama
    from transformers import LlamaForCausalLM

    from raymerge.engine.stats import DataSpec, collect_stats

    base = tiny_llama(tmp_path / "base")
    experts = [perturbed(base, tmp_path / f"e{i}", seed=i, scale=0.3) for i in range(3)]
    batches = []
    for i, e in enumerate(experts):
        ids = torch.randint(3, 40, (12, 10), generator=torch.Generator().manual_seed(10 + i))
        torch.save({"input_ids": ids}, tmp_path / f"task{i}.pt")
        batches.append([{"input_ids": ids[lo : lo + 4]} for lo in range(0, 12, 4)])
        collect_stats(e, DataSpec((str(tmp_path / f"task{i}.pt"),), batch_size=4), tmp_path / f"stats{i}")
    per_model = [{"grams": str(tmp_path / f"stats{i}" / "grams.safetensors")} for i in range(3)]
    merge(
        parse_recipe(recipe_text("regmean", None, experts, {"alpha": 0.95}, per_model)),
        tmp_path / "out",
        progress=False,
    )
    ours = load_dir(tmp_path / "out")

    class Trainer:  # the three members regmean_merging uses
        def __init__(self, b):
            self.b, self._train_batch_size = b, 4

        def get_train_dataloader(self):
            return self.b

        def _prepare_inputs(self, x):
            return x

    models = [LlamaForCausalLM.from_pretrained(str(e)).eval() for e in experts]
    ref = regmean_merging(models, [Trainer(b) for b in batches], [], [12] * 3, reduce_non_diagonal_ratio=0.95)
    assert set(ref) == set(ours)
    regmean_tensors = 0
    for name, r in ref.items():
        if name == "lm_head.weight":  # FusionBench solves every nn.Linear; raymerge averages lm_head
            mean = sum(m.state_dict()[name] for m in models) / 3
            assert ((ours[name] - mean).norm() / mean.norm()).item() <= 1e-6
            continue
        err = ((ours[name].double() - r.double()).norm() / r.double().norm()).item()
        assert err <= 1e-4, (name, err)
        if r.dim() == 2 and "embed" not in name:
            regmean_tensors += 1
            avg = sum(m.state_dict()[name] for m in models) / 3
            assert ((avg - r).norm() / r.norm()).item() > 1e-2  # not trivially the plain average
    assert regmean_tensors == 14


@pytest.mark.parametrize("block_rows", [1, 256])
@pytest.mark.parametrize("singular", [False, True])
def test_regmean_chunked_equals_whole_tensor_path(block_rows, singular, monkeypatch):
    """B = Σ W_t G̃_t accumulated over 7-row chunks (each its own block, or gathered into blocks of
    ≥ 256 rows) and solved block by block gives the whole-tensor result; on the Cholesky path and
    on the pseudo-inverse path."""
    from raymerge.engine.methods import InMemorySource, gram_stream

    torch.manual_seed(2)
    if singular:
        basis = torch.randn(32, 9, dtype=torch.float64)
        grams = [basis @ torch.diag(torch.rand(9, dtype=torch.float64) + 0.5) @ basis.T for _ in range(3)]
    else:
        grams = _grams(32, 3, seed=4)
    ws = [torch.randn(600, 32, dtype=torch.float64) for _ in range(3)]
    args = _args(grams, 0.95 if not singular else 1.0)
    whole = METHODS["regmean"].fn(None, ws, args)  # blocks of 256 rows
    monkeypatch.setattr(gram_stream, "BLOCK_ROWS", block_rows)
    src = InMemorySource(None, ws, chunk_rows=7)
    chunked = src.assemble(METHODS["regmean"].chunked(src, args))
    assert ((chunked - whole).norm() / whole.norm()).item() <= 1e-12


def test_regmean_does_not_scale_the_callers_grams():
    grams = _grams(16, 2, seed=3)
    kept = [g.clone() for g in grams]
    METHODS["regmean"].fn(None, [torch.randn(8, 16, dtype=torch.float64) for _ in range(2)], _args(grams, 0.5))
    assert all(torch.equal(g, k) for g, k in zip(grams, kept))


def test_cholesky_apply_is_cholesky_solve():
    from raymerge.engine.methods.eigh import cholesky_apply as _cholesky_apply

    A = sum(_grams(40, 2, seed=6))
    L = torch.linalg.cholesky(A)
    B = torch.randn(30, 40, dtype=torch.float64)
    assert torch.equal(_cholesky_apply(L, B), torch.cholesky_solve(B.T, L).T)
