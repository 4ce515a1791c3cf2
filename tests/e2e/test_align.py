"""Permutation alignment (weight matching): exactness, monotone objective, function preservation,
the non-local merge it repairs, and the ``raymerge align`` command."""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file
from torch import nn

from raymerge.cli import main
from raymerge.engine.align import (
    Permutation,
    PermutationSpec,
    PermutedAxis,
    align_checkpoints,
    apply_permutation,
    match_weights,
    permutation_spec_for,
    permute_tensor,
    shapes_of,
    weight_distance,
)
from raymerge.engine.errors import AlignmentError

log = logging.getLogger(__name__)
transformers.logging.set_verbosity_error()


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Bit-stable numbers on a shared 2-core machine; restore whatever the session had.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _random_biases(model: transformers.PreTrainedModel) -> transformers.PreTrainedModel:
    # Fresh models have zero biases, which would hide a bias that is not permuted.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def _llama(seed: int, bias: bool = False) -> transformers.PreTrainedModel:
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=61,
        max_position_embeddings=64,
        attention_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return _random_biases(transformers.LlamaForCausalLM(cfg).eval())


def _bert(seed: int) -> transformers.PreTrainedModel:
    cfg = transformers.BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=61,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(seed)
    return _random_biases(transformers.BertModel(cfg).eval())


BUILDERS: dict[str, Callable[[int], transformers.PreTrainedModel]] = {
    "llama": _llama,
    "llama-bias": lambda seed: _llama(seed, bias=True),
    "bert": _bert,
}


def _outputs(model: transformers.PreTrainedModel, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's output (logits, or BERT's last hidden state) on a fixed batch with ``state`` loaded."""
    twin = copy.deepcopy(model)
    twin.load_state_dict(state, strict=True)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = twin(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _random_perms(spec: PermutationSpec, seed: int) -> dict[str, torch.Tensor]:
    """A random permutation per group, never the identity (so recovering it is a real test)."""
    g = torch.Generator().manual_seed(seed)
    perms = {}
    for p in spec.perms:
        perm = torch.randperm(p.size, generator=g)
        while torch.equal(perm, torch.arange(p.size)):
            perm = torch.randperm(p.size, generator=g)
        perms[p.name] = perm
    return perms


def _inner(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], spec: PermutationSpec) -> float:
    return sum(float((a[t].double() * b[t].double()).sum()) for t in spec.tensors)


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_permuted_copy_is_recovered_exactly(arch: str) -> None:
    model = BUILDERS[arch](0)
    ref = _state(model)
    spec = permutation_spec_for(model.config, shapes_of(ref))
    kinds = {p.name.rsplit(".", 1)[1] for p in spec.perms}
    assert len(spec.perms) == 4 and len(kinds) == 2  # MLP units and attention heads in both blocks
    if arch == "llama-bias":
        assert any(ax.tensor.endswith("q_proj.bias") and ax.block == 8 for p in spec.perms for ax in p.axes)
    sigma = _random_perms(spec, seed=1)
    shuffled = apply_permutation(ref, spec, sigma)
    assert all(not torch.equal(shuffled[t], ref[t]) for t in spec.tensors)
    # Permuting units and heads is a symmetry: the network computes the same function.
    torch.testing.assert_close(_outputs(model, shuffled), _outputs(model, ref), rtol=0, atol=1e-5)

    result = match_weights(ref, shuffled, spec, seed=3)
    assert result.converged
    for p in spec.perms:
        assert torch.equal(result.perms[p.name], torch.argsort(sigma[p.name])), p.name
    aligned = apply_permutation(shuffled, spec, result.perms)
    for name, tensor in ref.items():
        torch.testing.assert_close(aligned[name], tensor, rtol=0, atol=1e-6)
    assert weight_distance(ref, shuffled, spec, result.perms) < 1e-6 < weight_distance(ref, shuffled, spec)


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_independent_models_get_closer_and_keep_their_function(arch: str) -> None:
    model_a, model_b = BUILDERS[arch](0), BUILDERS[arch](1)
    a, b = _state(model_a), _state(model_b)
    spec = permutation_spec_for(model_b.config, shapes_of(b))
    result = match_weights(a, b, spec, seed=0)
    aligned = apply_permutation(b, spec, result.perms)

    before, after = weight_distance(a, b, spec), weight_distance(a, b, spec, result.perms)
    log.info("%s: ‖A − B‖ %.4f -> ‖A − P(B)‖ %.4f in %d passes", arch, before, after, result.passes)
    assert after < before - 1e-3 * before
    trace = torch.tensor(result.objective, dtype=torch.float64)
    assert len(trace) > len(spec.perms)  # at least one full pass was recorded
    assert bool((trace[1:] >= trace[:-1]).all()), "objective decreased"
    assert trace[-1] > trace[0]
    # The tracked objective is Σ⟨A, P(B)⟩, and ‖A − P(B)‖² = ‖A‖² + ‖B‖² − 2Σ⟨A, P(B)⟩.
    assert result.objective[-1] == pytest.approx(_inner(a, aligned, spec), rel=1e-9)
    assert result.objective[0] == pytest.approx(_inner(a, b, spec), rel=1e-9)
    assert after**2 == pytest.approx(_inner(a, a, spec) + _inner(b, b, spec) - 2 * result.objective[-1], rel=1e-9)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in result.perms.values())
    torch.testing.assert_close(_outputs(model_b, aligned), _outputs(model_b, b), rtol=0, atol=1e-5)


class _MLP(nn.Sequential):
    def __init__(self, sizes: list[int], seed: int) -> None:
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(n_in, n_out))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        super().__init__(*layers)

    @property
    def linear_names(self) -> list[str]:
        return [str(i) for i, m in enumerate(self) if isinstance(m, nn.Linear)]

    def hidden(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Post-activation outputs of every hidden layer."""
        outs = []
        for m in self:
            x = m(x)
            if isinstance(m, nn.ReLU):
                outs.append(x)
        return outs


def _mlp_spec(net: _MLP) -> PermutationSpec:
    return permutation_spec_for({"model_type": "mlp", "layers": net.linear_names}, shapes_of(net.state_dict()))


def test_plain_mlp_coupled_layers() -> None:
    """Three hidden layers: the middle weights carry two permutations, so the layers are coupled."""
    net = _MLP([12, 48, 40, 32, 5], seed=0)
    spec = _mlp_spec(net)
    assert [p.size for p in spec.perms] == [48, 40, 32] and len(spec.components()) == 1
    assert [len(spec.axes_of(f"{i}.weight")) for i in (0, 2, 4, 6)] == [1, 2, 2, 1]
    ref = _state(net)
    x = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    sigma = _random_perms(spec, seed=2)
    shuffled = apply_permutation(ref, spec, sigma)
    with torch.no_grad():
        expected = net(x)
        net.load_state_dict(shuffled)
        torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-6)
    result = match_weights(ref, shuffled, spec, seed=0)
    for name, perm in result.perms.items():
        assert torch.equal(perm, torch.argsort(sigma[name])), name

    other = _state(_MLP([12, 48, 40, 32, 5], seed=1))
    result = match_weights(ref, other, spec, seed=0)
    trace = torch.tensor(result.objective, dtype=torch.float64)
    assert result.converged and result.passes >= 2  # coupling needs more than one pass
    assert bool((trace[1:] >= trace[:-1]).all()) and trace[-1] > trace[0]
    assert weight_distance(ref, other, spec, result.perms) < weight_distance(ref, other, spec)
    with torch.no_grad():
        net.load_state_dict(other)
        before = net(x)
        net.load_state_dict(apply_permutation(other, spec, result.perms))
        torch.testing.assert_close(net(x), before, rtol=0, atol=1e-5)


# --- the non-local case: experts fine-tuned from two differently seeded bases -----------------

_D, _K = 16, 4


def _labels(x: torch.Tensor) -> torch.Tensor:
    """A fixed linear teacher over 4 classes."""
    teacher = torch.randn(_K, _D, generator=torch.Generator().manual_seed(123))
    return (x @ teacher.T).argmax(1)


def _task(n: int, shift: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs from N(shift, I) with the teacher's labels."""
    x = torch.randn(n, _D, generator=torch.Generator().manual_seed(seed)) + shift
    return x, _labels(x)


def _fit(net: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> nn.Module:
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def _loss_acc(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = net(x)
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).double().mean().item()


def _mean_std(net: _MLP, x: torch.Tensor) -> list[float]:
    """Per-channel standard deviation over the data, averaged over channels, at each hidden layer."""
    with torch.no_grad():
        return [h.std(0).mean().item() for h in net.hidden(x)]


def test_nonlocal_merge_alignment_repairs_variance_collapse(record_property: Callable[[str, object], None]) -> None:
    sizes = [_D, 64, 64, _K]
    x0, y0 = _task(4096, torch.zeros(_D), seed=1)
    shift_a, shift_b = torch.zeros(_D), torch.zeros(_D)
    shift_a[:4], shift_b[4:8] = 1.5, 1.5
    base_a = _fit(_MLP(sizes, seed=0), x0, y0, steps=300, lr=1e-2)
    base_b = _fit(_MLP(sizes, seed=1), x0, y0, steps=300, lr=1e-2)
    # Each expert learns a shifted input distribution, starting from its own base.
    expert_a = _fit(copy.deepcopy(base_a), *_task(2048, shift_a, seed=2), steps=150, lr=3e-3)
    expert_b = _fit(copy.deepcopy(base_b), *_task(2048, shift_b, seed=3), steps=150, lr=3e-3)
    # Held-out data from both experts' tasks: a merge should serve both.
    x_eval = torch.cat([_task(2048, shift_a, seed=4)[0], _task(2048, shift_b, seed=5)[0]])
    y_eval = _labels(x_eval)

    spec = _mlp_spec(base_a)
    matching = match_weights(_state(base_a), _state(base_b), spec, seed=0)  # bases decide the permutation
    ea, eb = _state(expert_a), _state(expert_b)
    eb_aligned = apply_permutation(eb, spec, matching.perms)

    def average(other: dict[str, torch.Tensor]) -> _MLP:
        net = _MLP(sizes, seed=0)
        net.load_state_dict({k: (ea[k] + other[k]) / 2 for k in ea})
        return net

    # Denominator: the experts' mean per-channel std, which no permutation of the units changes.
    expert_std = [(s + t) / 2 for s, t in zip(_mean_std(expert_a, x_eval), _mean_std(expert_b, x_eval))]
    nets = {"expert_a": expert_a, "expert_b": expert_b, "unaligned": average(eb), "aligned": average(eb_aligned)}
    loss, acc, ratio = {}, {}, {}
    for label, net in nets.items():
        loss[label], acc[label] = _loss_acc(net, x_eval, y_eval)
        ratio[label] = [s / e for s, e in zip(_mean_std(net, x_eval), expert_std)]
    figures = {
        k: {"loss": round(loss[k], 4), "accuracy": round(acc[k], 4), "std_ratio": [round(r, 3) for r in ratio[k]]}
        for k in nets
    }
    record_property("nonlocal_figures", json.dumps(figures))
    log.info("non-local merge: %s", figures)
    # Averaging unrelated units collapses the hidden activations; alignment largely undoes it.
    assert ratio["unaligned"][-1] < 0.7, figures
    assert ratio["aligned"][-1] > ratio["unaligned"][-1] + 0.2, figures
    assert loss["aligned"] < 0.5 * loss["unaligned"], figures
    assert acc["aligned"] > acc["unaligned"] + 0.05, figures
    # The aligned merge is about as good as either expert on the union of the two tasks.
    assert loss["aligned"] < 2 * max(loss["expert_a"], loss["expert_b"]), figures


# --- validation and the command line ----------------------------------------------------------


def test_shape_mismatch_and_bad_specs_are_named() -> None:
    a = _state(_llama(0))
    b = dict(a)
    bad = "model.layers.1.mlp.up_proj.weight"
    b[bad] = torch.zeros(48, 32)
    spec = permutation_spec_for(_llama(0).config, shapes_of(a))
    with pytest.raises(AlignmentError, match=r"no axis 0 of 64 × 1 entries.*tensor model\.layers\.1\.mlp\.up_proj"):
        match_weights(a, b, spec)
    del b[bad]
    with pytest.raises(AlignmentError, match="has no tensor.*up_proj"):
        match_weights(a, b, spec)
    with pytest.raises(AlignmentError, match="no permutation spec for model_type 'gpt2'"):
        permutation_spec_for({"model_type": "gpt2"}, shapes_of(a))
    with pytest.raises(AlignmentError, match="reorders two axes of one tensor"):
        PermutationSpec((Permutation("p", 4, (PermutedAxis("w", 0), PermutedAxis("w", 1))),))
    with pytest.raises(AlignmentError, match="not a permutation"):
        apply_permutation(a, spec, {p.name: torch.zeros(p.size, dtype=torch.int64) for p in spec.perms})
    nan = dict(a, **{bad: torch.full((64, 32), float("nan"))})
    with pytest.raises(AlignmentError, match="non-finite"):
        match_weights(a, nan, spec)


def test_align_cli_writes_permuted_model_and_expert(tmp_path, capsys) -> None:
    model_a, model_b = _llama(0), _llama(1)
    expert_b = copy.deepcopy(model_b)
    with torch.no_grad():
        for p in expert_b.parameters():
            p.add_(0.01 * torch.randn_like(p))
    dirs = {}
    for name, model in (("a", model_a), ("b", model_b), ("eb", expert_b)):
        dirs[name] = tmp_path / name
        model.save_pretrained(dirs[name], max_shard_size="40KB")  # several shards and an index
        (dirs[name] / "tokenizer_config.json").write_text(json.dumps({"source": name}))
    assert (dirs["b"] / "model.safetensors.index.json").exists()
    out_b, out_eb = tmp_path / "b-aligned", tmp_path / "eb-aligned"
    argv = [
        "align",
        "--reference",
        str(dirs["a"]),
        "--model",
        str(dirs["b"]),
        "--out",
        str(out_b),
        "--also",
        f"{dirs['eb']}:{out_eb}",
        "-q",
    ]
    # An output that is an input (or the folder holding it) is refused even with --overwrite.
    for bad in (dirs["b"], dirs["a"], tmp_path):
        with pytest.raises(AlignmentError, match="the input model"):
            align_checkpoints(str(dirs["a"]), str(dirs["b"]), bad, overwrite=True)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "4 permutations" in printed and f"wrote {out_eb}" in printed

    perms = load_file(out_b / ".raymerge" / "permutations.safetensors")
    summary = json.loads((out_b / ".raymerge" / "alignment.json").read_text())
    assert summary["distance_after"] < summary["distance_before"]
    assert json.loads((out_eb / "tokenizer_config.json").read_text()) == {"source": "eb"}
    assert json.loads((out_b / "config.json").read_text())["model_type"] == "llama"
    assert sorted(p.name for p in out_b.glob("*.safetensors")) == sorted(
        p.name for p in dirs["b"].glob("*.safetensors")
    )
    spec = permutation_spec_for(model_b.config, shapes_of(model_b.state_dict()))
    for out, model in ((out_b, model_b), (out_eb, expert_b)):
        loaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
        got = _state(loaded)
        want = _state(model)
        for name, tensor in want.items():
            assert torch.equal(got[name], permute_tensor(name, tensor, spec, perms)), name
        torch.testing.assert_close(_outputs(loaded, got), _outputs(model, want), rtol=0, atol=1e-5)
    a, b, aligned = _state(model_a), _state(model_b), _state(transformers.LlamaForCausalLM.from_pretrained(out_b))
    assert weight_distance(a, aligned, spec) == pytest.approx(summary["distance_after"], rel=1e-6)
    assert weight_distance(a, aligned, spec) < weight_distance(a, b, spec)

    # A second run refuses to clobber, and a mismatched reference names the tensor.
    assert main(argv) == 2
    assert f"output directory exists (file {out_b})" in capsys.readouterr().err
    small = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{**model_a.config.to_dict(), "intermediate_size": 48})
    )
    small.save_pretrained(tmp_path / "small")
    capsys.readouterr()
    assert (
        main(
            [
                "align",
                "--reference",
                str(tmp_path / "small"),
                "--model",
                str(dirs["b"]),
                "--out",
                str(tmp_path / "x"),
                "-q",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("raymerge: error: shape [48, 32] in model") and err.count("\n") == 1
    assert f"(file {tmp_path / 'small'}, tensor model.layers.0.mlp.gate_proj.weight)" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_matching_on_cuda_agrees_with_cpu() -> None:
    """Similarities are fp64 on the tensors' device; CUDA must reach the same permutations."""
    a, b = _state(_llama(0)), _state(_llama(1))
    spec = permutation_spec_for(_llama(0).config, shapes_of(a))
    on_cpu = match_weights(a, b, spec, seed=0)
    on_gpu = match_weights({k: v.cuda() for k, v in a.items()}, {k: v.cuda() for k, v in b.items()}, spec, seed=0)
    for name, perm in on_cpu.perms.items():
        assert torch.equal(on_gpu.perms[name], perm), name
    assert on_gpu.objective[-1] == pytest.approx(on_cpu.objective[-1], rel=1e-12)


def test_align_overwrite_keeps_the_old_output_if_writing_fails(family, tmp_path, monkeypatch) -> None:
    import raymerge.engine.align as align

    base, experts = family
    out = tmp_path / "aligned"
    align_checkpoints(str(base), str(experts[0]), out)
    (out / "marker").write_text("the old model")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def fail(*args: object) -> None:  # the shards are written, the side files are not
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(align, "copy_side_files", fail)
    with pytest.raises(OSError, match="No space"):
        align_checkpoints(str(base), str(experts[1]), out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned"], "no staging directory is left behind"
    monkeypatch.undo()
    align_checkpoints(str(base), str(experts[1]), out, overwrite=True)
    summary = json.loads((out / ".raymerge" / "alignment.json").read_text())
    assert not (out / "marker").exists() and summary["model"] == str(experts[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aligned"]
