"""Tiny transformers models with a word-level tokenizer, built in temp dirs: Llama and BERT for the
data-based merging tests (statistics, RegMean end to end, TACT); Mistral, Qwen2/3, Gemma 2/3,
Phi-3, GPT-2, Mixtral, Qwen3-MoE, T5 and a LLaVA-style VLM, stored as published, for the parity
tests against mergekit; PEFT LoRA adapters; mergekit's fused MoE layout."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

WORDS = (
    "the",
    "a",
    "cat",
    "dog",
    "bird",
    "sat",
    "ran",
    "flew",
    "on",
    "under",
    "over",
    "mat",
    "tree",
    "sky",
    "big",
    "small",
    "red",
    "blue",
    "green",
    "one",
    "two",
    "three",
    "fast",
    "slow",
    "and",
    "or",
    "but",
    "then",
    "now",
    "here",
    "there",
)
VOCAB = 64


def write_tokenizer(path: Path, words: Sequence[str] = WORDS, added: Sequence[str] = ()) -> None:
    """A whitespace word-level tokenizer over ``words`` ([PAD]=0, [UNK]=1, [BOS]=2, then the
    words), with ``added`` as added special tokens after them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]")
    if added:
        fast.add_tokens(list(added), special_tokens=True)
    fast.save_pretrained(str(path))


# Decoder-only causal LMs of one tiny shape (hidden 32, 4 heads, 2 blocks): config and model class
# names in transformers, and what each architecture sets on top of the shared shape.
CAUSAL: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8, "tie_word_embeddings": False}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "sliding_window": 16}),  # tied
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        {"num_key_value_heads": 4, "pad_token_id": 0, "tie_word_embeddings": False},
    ),
}


def _decoder_shape(layers: int = 2, **over: Any) -> dict[str, Any]:
    shape: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    return {**shape, **over}


def tiny_causal(path: Path, arch: str, seed: int = 0, layers: int = 2) -> Path:
    """A ``CAUSAL`` architecture (``llama``, ``mistral``, ``qwen2``, ``qwen3``, ``gemma2``, ``phi3``)
    with the word-level tokenizer, saved by ``save_pretrained`` (its published layout)."""
    import transformers

    config_cls, model_cls, extra = CAUSAL[arch]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_cls)(**_decoder_shape(layers, **extra))
    getattr(transformers, model_cls)(cfg).eval().save_pretrained(str(path))
    write_tokenizer(path)
    return path


def tiny_llama(path: Path, seed: int = 0, layers: int = 2) -> Path:
    return tiny_causal(path, "llama", seed, layers)


def tiny_gpt2(path: Path, seed: int = 0, layers: int = 2) -> Path:
    """GPT-2 (Conv1D linears stored in × out, tied LM head, learned positions)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=32, initializer_range=0.2)
    GPT2LMHeadModel(cfg).eval().save_pretrained(str(path))
    write_tokenizer(path)
    return path


# LLaVA's tensors under the model's own module names (``LlavaForConditionalGeneration.state_dict()``),
# from the names transformers' save_pretrained writes.
LLAVA_MODULE_NAMES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def llava_module_name(name: str) -> str:
    for saved, module in LLAVA_MODULE_NAMES:
        if name.startswith(saved):
            return module + name[len(saved) :]
    return name


def tiny_llava(path: Path, seed: int = 0, text_layers: int = 2, vision_layers: int = 2, saved: bool = False) -> Path:
    """A LLaVA-style VLM: a CLIP vision tower, a 2-layer projector and a Llama language model,
    stored under the model's module names (``model.language_model.…``, ``lm_head``), or with
    ``saved`` as transformers' save_pretrained writes it (``language_model.model.…``)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=16,
        patch_size=8,
        projection_dim=16,
    )
    text = LlamaConfig(**_decoder_shape(text_layers, tie_word_embeddings=False))
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=VOCAB - 1, vision_feature_layer=-1)
    LlavaForConditionalGeneration(cfg).eval().save_pretrained(str(path))
    if not saved:
        _rename(path, llava_module_name)
    write_tokenizer(path)
    return path


def tiny_bert(path: Path, seed: int = 0, layers: int = 2) -> Path:
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        initializer_range=0.2,
    )
    BertModel(cfg).eval().save_pretrained(str(path))
    write_tokenizer(path)
    return path


def perturbed(src: Path, dst: Path, seed: int, scale: float = 0.05) -> Path:
    """A fine-tuned-like copy of ``src``: every parameter plus N(0, scale²·mean|p|²) noise."""
    model = load(src)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.abs().mean())
    model.save_pretrained(str(dst))
    write_tokenizer(dst)
    return dst


def write_jsonl(path: Path, n: int, seed: int, lo: int = 3, hi: int = 12) -> Path:
    """``n`` random sentences of lo–hi words, one JSON object per line."""
    rng = random.Random(seed)
    lines = [json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))}) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _model_cls(path: Path):
    """The class ``config.json`` names (``LlamaForCausalLM``, ``GPT2LMHeadModel``, …), else AutoModel."""
    import transformers

    names = json.loads((path / "config.json").read_text()).get("architectures") or []
    return getattr(transformers, names[0], transformers.AutoModel) if names else transformers.AutoModel


def load(path: Path):
    """The model in ``path`` (the class its config names), in eval mode."""
    return _model_cls(path).from_pretrained(str(path)).eval()


def average(dirs: list[Path], dst: Path) -> Path:
    """The plain weight average of ``dirs`` (no alignment: a non-local merge when their bases differ)."""
    models = [load(d) for d in dirs]
    sd = {k: sum(m.state_dict()[k] for m in models) / len(models) for k in models[0].state_dict()}
    models[0].load_state_dict(sd)
    models[0].save_pretrained(str(dst))
    write_tokenizer(dst)
    return dst


# ------------------------------------------------------------------------------------------------ other
# architectures, as their checkpoints are published (for the parity tests against mergekit-yaml)


def _rename(path: Path, rename) -> None:
    """Rewrite ``path``'s model.safetensors with every tensor name passed through ``rename``."""
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    sd = load_file(str(f))
    save_file({rename(k): v.contiguous() for k, v in sd.items()}, str(f), metadata={"format": "pt"})


def tiny_gemma3(path: Path, seed: int = 0, text_layers: int = 3, vision_layers: int = 2) -> Path:
    """Gemma 3 with a text and a SigLIP vision tower (4-D patch-embedding convolution), in the
    published layout (``vision_tower.vision_model.…``) that mergekit's definition names."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Gemma3Config(
        text_config=dict(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=64,
            sliding_window=16,
        ),
        vision_config=dict(
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=vision_layers,
            num_attention_heads=2,
            image_size=16,
            patch_size=8,
            vision_use_head=False,
        ),
        mm_tokens_per_image=4,
    )
    Gemma3ForConditionalGeneration(cfg).save_pretrained(str(path))
    _rename(path, lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1))
    return path


def tiny_t5(path: Path, seed: int = 0, encoder_layers: int = 2, decoder_layers: int = 4) -> Path:
    """T5 (gated-GELU) whose decoder may be deeper than its encoder."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=encoder_layers,
        num_decoder_layers=decoder_layers,
        num_heads=4,
        feed_forward_proj="gated-gelu",
    )
    T5ForConditionalGeneration(cfg).save_pretrained(str(path))
    return path


def tiny_mixtral(path: Path, seed: int = 0, layers: int = 2, experts: int = 3) -> Path:
    """Mixtral, stored as published: ``block_sparse_moe.experts.E.w1/w2/w3`` and ``…gate``."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(
        **_decoder_shape(layers, intermediate_size=24, initializer_range=0.02),
        num_local_experts=experts,
        num_experts_per_tok=2,
    )
    MixtralForCausalLM(cfg).save_pretrained(str(path))
    return path


def tiny_qwen3_moe(path: Path, seed: int = 0, layers: int = 2, experts: int = 3) -> Path:
    """Qwen3-MoE, stored as published: ``mlp.experts.E.gate_proj/up_proj/down_proj``, ``mlp.gate``."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        **_decoder_shape(layers, initializer_range=0.02),
        moe_intermediate_size=24,
        head_dim=8,
        num_experts=experts,
        num_experts_per_tok=2,
    )
    Qwen3MoeForCausalLM(cfg).save_pretrained(str(path))
    return path


def tiny_qwen2_moe(path: Path, seed: int = 0, layers: int = 2, experts: int = 3) -> Path:
    """Qwen2-MoE, stored as published: routed ``mlp.experts.E.…`` plus a gated ``mlp.shared_expert``."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2MoeConfig(
        **_decoder_shape(layers, tie_word_embeddings=False),
        moe_intermediate_size=24,
        shared_expert_intermediate_size=24,
        num_experts=experts,
        num_experts_per_tok=2,
    )
    Qwen2MoeForCausalLM(cfg).save_pretrained(str(path))
    write_tokenizer(path)
    return path


def perturbed_file(src: Path, dst: Path, seed: int, scale: float = 0.05, uneven_experts: bool = False) -> Path:
    """``perturbed`` on the stored tensors themselves (names kept as stored): a copy of ``src``
    with N(0, scale²·mean|p|²) noise on every float tensor. ``uneven_experts``: a MoE's expert E
    gets (E + 1) times that noise, so its experts move by different angles."""
    import re
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, dirs_exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = load_file(str(src / "model.safetensors"))
    out = {}
    for k, v in sd.items():
        if v.is_floating_point():
            m = re.search(r"\.experts\.(\d+)\.", k) if uneven_experts else None
            s = scale * (int(m.group(1)) + 1 if m else 1)
            v = (v + torch.randn(v.shape, generator=g) * s * v.abs().mean()).contiguous()
        out[k] = v
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# ------------------------------------------------------------------------------------------------ mergekit's
# fused MoE layout: mergekit reads a published MoE checkpoint as transformers v5 holds it and writes it so


# (gate, up, down) of one expert, per MoE layout, and the router's stored name.
MOE = {
    "mixtral": (r"(.*)\.block_sparse_moe\.experts\.(\d+)\.", ("w1", "w3", "w2"), ".block_sparse_moe.gate."),
    "qwen3_moe": (r"(.*)\.mlp\.experts\.(\d+)\.", ("gate_proj", "up_proj", "down_proj"), ".mlp.gate."),
}
MOE["qwen2_moe"] = MOE["qwen3_moe"]


def fuse_moe(sd: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """``sd`` with each layer's experts fused as mergekit writes them: ``mlp.experts.gate_up_proj``
    = [gate; up] per expert, stacked; ``mlp.experts.down_proj``; the router as ``mlp.gate``.
    Other architectures' tensors are returned as they are."""
    import re

    if arch not in MOE:
        return sd
    pattern, (gate, up, down), router = MOE[arch]
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for k, v in sd.items():
        m = re.match(pattern + r"(\w+)\.weight$", k)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = v
        else:
            out[k.replace(router, ".mlp.gate.")] = v
    for prefix, by_index in experts.items():
        order = [by_index[i] for i in sorted(by_index)]
        out[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([e[gate], e[up]]) for e in order])
        out[f"{prefix}.mlp.experts.down_proj"] = torch.stack([e[down] for e in order])
    return out


# ------------------------------------------------------------------------------------------------ LoRA

LORA_TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def write_adapter(
    path: Path, base: Path, r: int, seed: int, extra: dict | None = None, whole: tuple = (), embed: bool = False
) -> Path:
    """A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors, PEFT's key layout) on
    ``base``'s q/v/down projections, rank ``r``, factors of norm ~0.3; ``embed`` also adapts the
    token embedding, ``whole`` names tensors saved whole (modules_to_save); ``extra`` overrides
    config entries."""
    from safetensors.torch import load_file, save_file

    path.mkdir(parents=True)
    weights: dict[str, torch.Tensor] = {}
    for f in sorted(base.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, w in weights.items():
        module = name.removesuffix(".weight")
        if not module.endswith(LORA_TARGETS):
            continue
        out_f, in_f = w.shape
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.3
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.3
    if embed:  # PEFT's embedding adapter: A is r × vocabulary, B is width × r, the update (B·A)ᵀ
        vocab, width = weights["model.embed_tokens.weight"].shape
        tensors["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(r, vocab, generator=g) * 0.3
        tensors["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.randn(width, r, generator=g) * 0.3
    for name in whole:
        tensors[f"base_model.model.{name}"] = weights[name] + 0.1 * torch.randn(weights[name].shape, generator=g)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": r,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj", "down_proj", *(["embed_tokens"] if embed else [])],
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": [n.removesuffix(".weight") for n in whole] or None,
        **(extra or {}),
    }
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path
