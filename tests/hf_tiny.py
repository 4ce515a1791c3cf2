"""Tiny transformers models (Llama, BERT) with a word-level tokenizer, built in temp dirs for the
data-based merging tests (statistics, RegMean end to end, TACT)."""

from __future__ import annotations

import json
import random
from pathlib import Path

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


def write_tokenizer(path: Path) -> None:
    """A whitespace word-level tokenizer over WORDS ([PAD]=0, [UNK]=1, [BOS]=2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]")
    fast.save_pretrained(str(path))


def tiny_llama(path: Path, seed: int = 0, layers: int = 2) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        initializer_range=0.2,
    )
    LlamaForCausalLM(cfg).eval().save_pretrained(str(path))
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
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=24,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    MixtralForCausalLM(cfg).save_pretrained(str(path))
    return path


def tiny_qwen3_moe(path: Path, seed: int = 0, layers: int = 2, experts: int = 3) -> Path:
    """Qwen3-MoE, stored as published: ``mlp.experts.E.gate_proj/up_proj/down_proj``, ``mlp.gate``."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=experts,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    Qwen3MoeForCausalLM(cfg).save_pretrained(str(path))
    return path


def perturbed_file(src: Path, dst: Path, seed: int, scale: float = 0.05) -> Path:
    """``perturbed`` on the stored tensors themselves (names kept as stored): a copy of ``src``
    with N(0, scale²·mean|p|²) noise on every float tensor."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, dirs_exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    sd = load_file(str(src / "model.safetensors"))
    out = {
        k: (v + torch.randn(v.shape, generator=g) * scale * v.abs().mean()).contiguous() if v.is_floating_point() else v
        for k, v in sd.items()
    }
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
