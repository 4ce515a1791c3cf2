"""The mergekit compatibility table: mergekit-style recipes, unchanged, through mergekit 0.1.5 and
raymerge on the same tiny fp32 checkpoints of many architectures.

Each row is one recipe as a mergekit user writes it (mergekit's customary parameters, including
ones a method ignores, such as ``weight`` on slerp or ``int8_mask`` on TIES). Both tools run in
this process (``mergekit.merge.run_merge`` and ``raymerge.cli.main``); the row then requires equal
tensor names, every tensor within 1e-6, the same block and vocabulary counts in ``config.json``,
and raymerge's output to load with ``from_pretrained`` with no missing or unexpected weights.
Every mergekit merge method and every architecture appears at least once (checked below).

Two differences hold for every row and are undone before comparing: raymerge keeps a published
MoE checkpoint's per-expert tensors where mergekit writes transformers' fused ``gate_up_proj`` /
``down_proj`` (``fuse_moe``), and the token ids of a union vocabulary follow recipe order in
raymerge and a hash map's order in mergekit (rows are compared token by token).

Rows with an ``expected`` reason differ from mergekit on purpose (README, "Coming from
mergekit"): their ``check`` says how — random drops with the same statistics, fp32 compute
rounded once, magnitude ties broken by position.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from string import Template

import pytest
import torch
import yaml
from hf_tiny import (
    WORDS,
    fuse_moe,
    llava_module_name,
    perturbed_file,
    tiny_causal,
    tiny_gemma3,
    tiny_gpt2,
    tiny_llava,
    tiny_mixtral,
    tiny_qwen2_moe,
    tiny_qwen3_moe,
    write_adapter,
    write_tokenizer,
)

from raymerge.cli import main as raymerge_main

from conftest import load_dir

transformers = pytest.importorskip("transformers")
mergekit_merge = pytest.importorskip("mergekit.merge")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge_methods.registry import registered_methods  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

Tensors = dict[str, torch.Tensor]

BUILDERS: dict[str, Callable[[Path], Path]] = {
    **{
        arch: (lambda p, a=arch: tiny_causal(p, a)) for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3")
    },
    "gemma3": lambda p: tiny_gemma3(p, text_layers=2),
    "gpt2": tiny_gpt2,
    "mixtral": tiny_mixtral,
    "qwen2_moe": tiny_qwen2_moe,
    "qwen3_moe": tiny_qwen3_moe,
    "llava": tiny_llava,
    "llava_saved": lambda p: tiny_llava(p, saved=True),
}
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight", "wte.weight")


# ------------------------------------------------------------------------------------------------ checks
# of the rows that differ on purpose: (mergekit's tensors, raymerge's, the family's inputs by key)


def same_drop_statistics(ref: Tensors, got: Tensors, inputs: Callable[[str], Tensors]) -> None:
    """Random drops: other draws, the same law — the share of entries left at the base and the mean
    |change| agree within sampling noise, while the draws themselves differ."""
    base = inputs("B")
    kept = [sum(int((out[k] != base[k]).sum()) for k in base) for out in (ref, got)]
    moved = [sum(float((out[k].double() - base[k]).abs().sum()) for k in base) for out in (ref, got)]
    total = sum(v.numel() for v in base.values())
    assert abs(kept[0] - kept[1]) / total < 0.02, kept
    assert abs(moved[0] - moved[1]) / moved[0] < 0.05, moved
    assert any(not torch.equal(ref[k], got[k]) for k in base)


def rounded_once(ref: Tensors, got: Tensors, inputs: Callable[[str], Tensors]) -> None:
    """``dtype: bfloat16``: mergekit computes in bf16; raymerge computes in fp32 and rounds once, so
    it differs from mergekit by rounding (and where bf16 moved TIES' top-k boundary), rarely more."""
    big = total = 0
    for k, r in ref.items():
        assert r.dtype == got[k].dtype == torch.bfloat16, k
        ulp = r.double().abs().clamp(min=2**-20) * 2**-7
        big += int(((r.double() - got[k].double()).abs() > 1.01 * ulp).sum())
        total += r.numel()
    assert any(not torch.equal(ref[k], got[k]) for k in ref)
    assert big / total < 0.1, f"{big} of {total} elements differ by more than one bf16 step"  # 4.7% here


def mergekit_drops_the_language_model(ref: Tensors, got: Tensors, inputs: Callable[[str], Tensors]) -> None:
    """A LLaVA checkpoint as transformers' save_pretrained writes it (``language_model.model.…``):
    mergekit's inferred architecture keeps only the vision tower and projector, so its output
    lacks the language model; raymerge merges every tensor. Where both write a tensor (under
    the model's module names), they agree."""
    got = {llava_module_name(k): v for k, v in got.items()}
    assert set(ref) < set(got)
    assert all(k.startswith(("model.language_model.", "lm_head.")) for k in set(got) - set(ref))
    assert not any(k.startswith(("model.language_model.", "lm_head.")) for k in ref)
    worst = max((ref[k].double() - got[k].double()).abs().max().item() for k in ref)
    assert worst <= 1e-6


def ties_broken_by_position(ref: Tensors, got: Tensors, inputs: Callable[[str], Tensors]) -> None:
    """One expert whose |δ| takes two values, TIES at density 0.5: both keep ⌊n/2⌋ entries and
    agree wherever |δ| is not the k-th largest; among the tied entries at that magnitude raymerge
    keeps the last ones in flat order (ranks ascend with position), mergekit whichever its
    unordered argsort returns."""
    base, expert = inputs("QB"), inputs("QE")
    differ = 0
    for k, b in base.items():
        delta = (expert[k] - b).flatten()
        n_keep = int(0.5 * delta.numel())
        if n_keep == 0 or not delta.any():
            continue
        tie = delta.abs().sort(descending=True).values[n_keep - 1]
        r, g = (ref[k] - b).flatten(), (got[k] - b).flatten()
        assert int((r != 0).sum()) == int((g != 0).sum()) == n_keep, k
        off = r != g
        assert bool((delta.abs()[off] == tie).all()), k
        kept = (g != 0) & (delta.abs() == tie)
        ties = (delta.abs() == tie).nonzero().flatten()
        assert torch.equal(kept.nonzero().flatten(), ties[ties.numel() - int(kept.sum()) :]), k  # the last ones
        differ += int(off.sum())
    assert differ > 0


# ------------------------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Row:
    """One recipe over one architecture's family: ``$B`` the base, ``$E1``–``$E3`` fine-tuned
    experts (``$U1``–``$U3``: a MoE's experts moved by different angles), ``$V`` an expert with another tokenizer, ``$A`` a LoRA adapter on the base, ``$QB`` /
    ``$QE`` a base and expert on a power-of-two grid (exact magnitude ties). ``moved``: the
    output must differ from the base somewhere (false where a slice recipe copies it)."""

    arch: str
    case: str
    recipe: str
    expected: str | None = None
    check: Callable[[Tensors, Tensors, Callable[[str], Tensors]], None] | None = None
    moved: bool = True
    same_names: bool = True
    xfail: str | None = None  # a known divergence not fixed yet (the test must fail: strict)

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.case}"

    @property
    def method(self) -> str:
        return yaml.safe_load(self.recipe)["merge_method"]


def _models(*entries: tuple[str, str]) -> str:
    return "models:\n" + "".join(f"  - model: ${m}\n" + (f"    parameters: {p}\n" if p else "") for m, p in entries)


def _slices(*slices: list[tuple[str, int, int]]) -> str:
    out = "slices:\n"
    for sources in slices:
        out += "  - sources:\n" + "".join(
            f"      - model: ${m}\n        layer_range: [{a}, {b}]\n" for m, a, b in sources
        )
    return out


SLERP_T = (
    "parameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
    "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n"
)
DROP = "random drop: a hash of raymerge.seed, not mergekit's torch RNG"
ROWS = (
    # ---- every merge method, with mergekit's customary parameters
    Row(
        "llama",
        "linear",
        "merge_method: linear\n"
        + _models(("E1", "{weight: 0.5}"), ("E2", "{weight: [0.2, 1.0]}"), ("E3", "{weight: 0.3}")),
    ),
    Row(
        "mistral",
        "task_arithmetic",
        "merge_method: task_arithmetic\nbase_model: $B\n"
        + _models(("E1", "{weight: 0.7}"), ("E2", "{weight: 0.3}"))
        + "parameters: {lambda: 0.9}\n",
    ),
    Row(
        "qwen2",
        "ties",
        "merge_method: ties\nbase_model: $B\n"
        + _models(("B", ""), ("E1", "{density: 0.5, weight: 0.5}"), ("E2", "{density: 0.7, weight: [0.3, 0.8]}"))
        + "parameters: {normalize: true, int8_mask: true}\n",
    ),
    Row(
        "qwen3",
        "dare_ties",
        "merge_method: dare_ties\nbase_model: $B\n"
        + _models(("E1", "{density: 0.53, weight: 0.4}"), ("E2", "{density: 0.53, weight: 0.6}"))
        + "parameters: {int8_mask: true}\n",
        DROP,
        same_drop_statistics,
    ),
    Row(
        "gemma2",
        "dare_linear",
        "merge_method: dare_linear\nbase_model: $B\n"
        + _models(("E1", "{density: 0.5, weight: 0.5}"), ("E2", "{density: 0.5, weight: 0.5}")),
        DROP,
        same_drop_statistics,
    ),
    Row(
        "phi3",
        "breadcrumbs",
        "merge_method: breadcrumbs\nbase_model: $B\n"
        + _models(
            ("E1", "{density: 0.9, gamma: 0.01, weight: 0.6}"), ("E2", "{density: 0.8, gamma: 0.02, weight: 0.4}")
        ),
    ),
    Row(
        "gpt2",
        "breadcrumbs_ties",
        "merge_method: breadcrumbs_ties\nbase_model: $B\n"
        + _models(("E1", "{weight: 1.0}"), ("E2", "{weight: 0.5}"))
        + "parameters: {density: 0.9, gamma: 0.01}\n",
    ),
    Row(
        "mixtral",
        "della",
        "merge_method: della\nbase_model: $B\n"
        + _models(("E1", "{density: 1.0, weight: 1.0}"), ("E2", "{density: 1.0, weight: 0.5}"))
        + "parameters: {lambda: 0.9}\n",
    ),
    Row(
        "gemma3",
        "della_linear",
        "merge_method: della_linear\nbase_model: $B\n"
        + _models(("E1", "{weight: 0.6}"), ("E2", "{weight: 0.4}"))
        + "parameters: {density: 0.5, epsilon: 0.1, lambda: 1.0}\n",
        DROP,
        same_drop_statistics,
    ),
    Row(
        "qwen3_moe",
        "sce",
        "merge_method: sce\nbase_model: $B\n"
        + _models(("E1", ""), ("E2", ""), ("E3", ""))
        + "parameters: {select_topk: 0.3}\n",
    ),
    Row(
        "gemma3",
        "slerp",
        "merge_method: slerp\nbase_model: $B\n" + _models(("B", "{weight: 1.0}"), ("E1", "{weight: 1.0}")) + SLERP_T,
    ),
    Row(
        "mistral",
        "multislerp",
        "merge_method: multislerp\n"
        + _models(("E1", "{weight: 1.0}"), ("E2", "{weight: 0.5}"), ("E3", "{weight: [0.2, 1.0]}")),
    ),
    Row("qwen2", "nuslerp", "merge_method: nuslerp\n" + _models(("E1", "{weight: 0.3}"), ("E2", "{weight: 0.7}"))),
    Row(
        "phi3",
        "karcher",
        "merge_method: karcher\n"
        + _models(("E1", ""), ("E2", ""), ("E3", ""))
        + "parameters: {max_iter: 20, tol: 1.0e-6}\n",
    ),
    Row(
        "qwen3_moe",
        "model_stock",
        "merge_method: model_stock\nbase_model: $B\n"
        + _models(("E1", "{weight: 1.0}"), ("E2", "{weight: 1.0}"), ("E3", "{weight: 1.0}"))
        + "parameters: {normalize: true}\n",
    ),
    Row(
        "gemma2",
        "nearswap",
        "merge_method: nearswap\nbase_model: $B\n" + _models(("B", ""), ("E1", "")) + "parameters: {t: 0.005}\n",
    ),
    Row("qwen3", "arcee_fusion", "merge_method: arcee_fusion\nbase_model: $B\n" + _models(("B", ""), ("E1", ""))),
    Row(
        "mixtral",
        "ram",
        "merge_method: ram\nbase_model: $B\n"
        + _models(("E1", "{weight: 1.0}"), ("E2", "{weight: 1.0}"))
        + "parameters: {epsilon: 0.004}\n",
    ),
    Row(
        "gpt2",
        "ramplus_tl",
        "merge_method: ramplus_tl\nbase_model: $B\n"
        + _models(("E1", ""), ("E2", ""))
        + "parameters: {epsilon: 0.004, r: 0.5, alpha: 0.8}\n",
    ),
    Row("qwen3", "passthrough", "merge_method: passthrough\n" + _models(("E1", "{scale: 0.5}"))),
    Row("llava", "linear", "merge_method: linear\n" + _models(("E1", "{weight: 0.6}"), ("E2", "{weight: [0.1, 0.9]}"))),
    Row(
        "llava",
        "ties",
        "merge_method: ties\nbase_model: $B\n"
        + _models(("E1", "{density: 0.5, weight: 1.0}"), ("E2", "{density: 0.5, weight: 0.5}"))
        + "parameters: {normalize: true}\n",
    ),
    Row(
        "llava_saved",
        "linear",
        "merge_method: linear\n" + _models(("E1", "{weight: 0.6}"), ("E2", "{weight: 0.4}")),
        "mergekit drops the language model of a LLaVA checkpoint in transformers' saved layout",
        mergekit_drops_the_language_model,
        same_names=False,
    ),
    Row(
        "qwen2_moe",
        "ties",
        "merge_method: ties\nbase_model: $B\n"
        + _models(("E1", "{density: 0.5, weight: 0.6}"), ("E2", "{density: 0.5, weight: 0.4}"))
        + "parameters: {normalize: true}\n",
    ),
    # MoE: whole-tensor statistics (angles, norms, quartiles) span mergekit's fused expert tensor
    Row(
        "mixtral",
        "slerp",
        "merge_method: slerp\nbase_model: $B\n" + _models(("B", ""), ("U1", "")) + "parameters: {t: 0.3}\n",
    ),
    Row("mixtral", "nuslerp", "merge_method: nuslerp\n" + _models(("U1", "{weight: 0.4}"), ("U2", "{weight: 0.6}"))),
    Row(
        "qwen2_moe",
        "multislerp",
        "merge_method: multislerp\nbase_model: $B\n" + _models(("U1", "{weight: 0.5}"), ("U2", "{weight: 0.5}")),
    ),
    Row("qwen3_moe", "karcher", "merge_method: karcher\n" + _models(("U1", ""), ("U2", ""), ("U3", ""))),
    Row("qwen3_moe", "arcee_fusion", "merge_method: arcee_fusion\nbase_model: $B\n" + _models(("B", ""), ("U1", ""))),
    Row(
        "mixtral",
        "nuslerp-row-wise",
        "merge_method: nuslerp\n"
        + _models(("U1", "{weight: 0.4}"), ("U2", "{weight: 0.6}"))
        + "parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}\n",
        xfail="mergekit slerps each column of the fused [experts, rows, width] tensor, across the "
        "experts; raymerge each column of one stored expert",
    ),
    # ---- slices: depth up-scaling, a GPT-2 stack, gradient SLERP over slices
    Row("llama", "slices-dus", "merge_method: passthrough\n" + _slices([("B", 0, 2)], [("B", 1, 2)]), moved=False),
    Row(
        "gpt2",
        "passthrough-stack",
        "merge_method: passthrough\n" + _slices([("E1", 0, 2)], [("E2", 1, 2)], [("E3", 0, 1)]),
    ),
    Row(
        "llama",
        "slices-gradient-slerp",
        "merge_method: slerp\nbase_model: $B\n"
        + _slices([("B", 0, 2), ("E1", 0, 2)], [("B", 1, 2), ("E1", 1, 2)])
        + SLERP_T,
    ),
    # ---- tokenizers and chat templates
    Row(
        "llama",
        "tokenizer-union",
        "merge_method: linear\nbase_model: $B\ntokenizer_source: union\n"
        + _models(("B", "{weight: 0.5}"), ("V", "{weight: 0.5}")),
    ),
    Row(
        "qwen2",
        "tokenizer-section",
        "merge_method: ties\nbase_model: $B\n"
        + _models(("E1", "{density: 0.6, weight: 1.0}"), ("V", "{density: 0.8, weight: 0.5}"))
        + "tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n  tokens:\n    <|im_start|>:\n      source: $V\n    fox:\n      source: {kind: model_token, model: $B, token: cat}\n      force: true\n",
    ),
    Row(
        "mistral",
        "chat-template",
        "merge_method: linear\n"
        + _models(("E1", "{weight: 1.0}"), ("E2", "{weight: 1.0}"))
        + "chat_template: chatml\n",
    ),
    # ---- a LoRA adapter as an input
    Row(
        "llama",
        "lora",
        "merge_method: task_arithmetic\nbase_model: $B\n" + _models(("B+$A", "{weight: 0.7}"), ("E1", "{weight: 0.5}")),
    ),
    # ---- where raymerge differs on purpose
    Row(
        "llama",
        "ties-bf16",
        "merge_method: ties\nbase_model: $B\ndtype: bfloat16\n"
        + _models(("E1", "{density: 0.5, weight: 1.0}"), ("E2", "{density: 0.5, weight: 0.5}"))
        + "parameters: {normalize: true}\n",
        "fp32 compute, rounded once to the output dtype",
        rounded_once,
    ),
    Row(
        "llama",
        "ties-exact-ties",
        "merge_method: ties\nbase_model: $QB\n" + _models(("QE", "{density: 0.5, weight: 1.0}")),
        "exact ties: equal |δ| broken by position",
        ties_broken_by_position,
    ),
)


# ------------------------------------------------------------------------------------------------ families


def _other_tokenizer(src: Path, dst: Path) -> Path:
    """``src`` with another tokenizer: some words dropped, two new ones, a shuffled order and an
    added ``<|im_start|>`` (its embedding keeps its rows: the ids now mean other tokens)."""
    shutil.copytree(src, dst)
    words = [*WORDS[4:], "fox", "owl"]
    random.Random(3).shuffle(words)
    write_tokenizer(dst, words, added=("<|im_start|>",))
    return dst


def _on_grid(src: Path, dst: Path, delta: bool) -> Path:
    """``src`` rounded to multiples of 2⁻¹² (so differences are exact in fp32), plus, with ``delta``,
    ±2⁻⁷ or ±2⁻⁶ on every entry: magnitudes that tie by the thousand."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(11)
    out = {}
    for k, v in load_file(str(src / "model.safetensors")).items():
        v = torch.round(v * 4096) / 4096
        if delta:
            step = torch.randint(1, 3, v.shape, generator=g).float() * 2**-7
            v = v + step * (torch.randint(0, 2, v.shape, generator=g).float() * 2 - 1)
        out[k] = v.contiguous()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> Callable[[str, str], Path]:
    """``zoo(arch, key)``: the path of one model of an architecture's family, built on first use."""
    built: dict[tuple[str, str], Path] = {}

    def get(arch: str, key: str) -> Path:
        if (arch, key) not in built:
            root = tmp_path_factory.getbasetemp() / f"compat-{arch}"
            root.mkdir(exist_ok=True)
            if key == "B":
                path = BUILDERS[arch](root / "B")
            elif key.startswith("E"):
                path = perturbed_file(get(arch, "B"), root / key, seed=int(key[1:]))
            elif key.startswith("U"):
                path = perturbed_file(get(arch, "B"), root / key, seed=int(key[1:]), uneven_experts=True)
            elif key == "V":
                path = _other_tokenizer(get(arch, "E2"), root / "V")
            elif key == "A":
                path = write_adapter(root / "A", get(arch, "B"), 4, seed=1)
            else:
                path = _on_grid(get(arch, "B"), root / key, delta=key == "QE")
            built[arch, key] = path
        return built[arch, key]

    return get


def _fill(row: Row, zoo: Callable[[str, str], Path]) -> str:
    names = {m.group("named") for m in Template.pattern.finditer(row.recipe) if m.group("named")}
    text = Template(row.recipe).substitute({k: str(zoo(row.arch, k)) for k in names})
    return text if "\ndtype:" in "\n" + text else text + "dtype: float32\n"


# ------------------------------------------------------------------------------------------------ comparing


def _vocab(out: Path) -> dict[str, int]:
    return transformers.AutoTokenizer.from_pretrained(str(out)).get_vocab()


def _by_token(ref: Tensors, mk_out: Path, rm_out: Path) -> Tensors:
    """mergekit's embedding and LM-head rows moved to raymerge's token ids (same token set)."""
    mk_vocab, rm_vocab = _vocab(mk_out), _vocab(rm_out)
    assert set(mk_vocab) == set(rm_vocab)
    out = dict(ref)
    for name, t in ref.items():
        if name.endswith(VOCAB_TENSORS):
            moved = t.clone()
            for token, i in mk_vocab.items():
                moved[rm_vocab[token]] = t[i]
            out[name] = moved
    return out


CONVERSATION = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "the cat sat"},
    {"role": "assistant", "content": "on the mat"},
]


def _chat(out: Path) -> str:
    """The conversation as the output's tokenizer renders it with its chat template."""
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    return tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)


def _counts(out: Path) -> dict[str, object]:
    """Block and vocabulary counts of ``config.json`` (and of a nested text / vision config)."""
    cfg = json.loads((out / "config.json").read_text())
    keys = ("num_hidden_layers", "n_layer", "vocab_size")
    found = {k: cfg[k] for k in keys if k in cfg}
    for sub in ("text_config", "vision_config"):
        found.update({f"{sub}.{k}": cfg[sub][k] for k in keys if k in cfg.get(sub, {})})
    return found


def _loads(out: Path) -> None:
    """raymerge's output loads through the class its config names, with every weight found."""
    names = json.loads((out / "config.json").read_text())["architectures"]
    cls = getattr(transformers, names[0])
    _, info = cls.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info


PARAMS = [
    pytest.param(r, id=r.id, marks=[pytest.mark.xfail(strict=True, reason=r.xfail)] if r.xfail else []) for r in ROWS
]


@pytest.mark.parametrize("row", PARAMS)
def test_recipe_matches_mergekit(row: Row, zoo, tmp_path):
    text = _fill(row, zoo)
    mk_out, rm_out = tmp_path / "mergekit", tmp_path / "raymerge"
    options = MergeOptions(quiet=True, lora_merge_cache=str(tmp_path / "lora-cache"))
    with torch.random.fork_rng(devices=[]):  # mergekit's random drops draw from torch's global RNG
        torch.manual_seed(0)
        mergekit_merge.run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(mk_out), options)
    (tmp_path / "recipe.yaml").write_text(text)
    assert raymerge_main(["run", str(tmp_path / "recipe.yaml"), str(rm_out), "-q"]) == 0

    ref, got = load_dir(mk_out), fuse_moe(load_dir(rm_out), row.arch)
    if "tokenizer" in text:
        ref = _by_token(ref, mk_out, rm_out)
    if row.same_names:
        assert set(ref) == set(got), sorted(set(ref) ^ set(got))[:6]
    assert _counts(mk_out) == _counts(rm_out)
    if "chat_template" in text:
        assert _chat(rm_out) == _chat(mk_out) and "<|im_start|>user" in _chat(rm_out)
    _loads(rm_out)
    if row.check is not None:
        row.check(ref, got, lambda key: fuse_moe(load_dir(zoo(row.arch, key)), row.arch))
    else:
        worst = max(((ref[k].double() - got[k].double()).abs().max().item(), k) for k in ref)
        assert worst[0] <= 1e-6, f"{row.id}: max |diff| {worst[0]:.3g} at {worst[1]}"
    if row.moved:
        base = fuse_moe(load_dir(zoo(row.arch, "QB" if "$QB" in row.recipe else "B")), row.arch)
        assert any(not torch.equal(got[k], base[k]) for k in got if k in base and got[k].shape == base[k].shape)


def test_table_covers_every_method_and_architecture():
    assert {m.spec.name for m in registered_methods()} <= {r.method for r in ROWS}
    assert set(BUILDERS) <= {r.arch for r in ROWS}
    assert len({r.id for r in ROWS}) == len(ROWS)
    assert all(r.expected and r.check for r in ROWS if r.expected or r.check)
