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
