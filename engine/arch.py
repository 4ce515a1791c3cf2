"""What a model looks like: the one module that knows architectures by their names.

Everything here is a pure function of tensor names, module names, shapes and ``config.json``
values — no tensor data, no model walking. The planner asks it which class a tensor is and how a
linear weight is stored, recipes ask it which block a tensor is in, statistics ask it where a
block's attention output and MLP input are, alignment asks it which model types it has
permutation specs for, and TACT asks it which config flags switch biases on. Adding an
architecture means adding its names here.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Any

from raymerge.engine.errors import PlanError
from raymerge.engine.storage import TensorEntry

# ------------------------------------------------------------------------------------------------ blocks

# Numbered transformer blocks: Llama ``model.layers.7.``, GPT-2 ``h.7.``, BERT ``encoder.layer.7.``,
# ViT/others ``blocks.7.`` / ``block.7.``.
LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """Transformer block index in a tensor name (``model.layers.7.mlp…`` → 7), else None."""
    m = LAYER_RE.search(tensor_name)
    return int(m.group(1)) if m else None


def num_layers(config: dict[str, Any], names: Iterable[str]) -> int:
    """Number of transformer blocks: from the config (``num_hidden_layers``, ``n_layer``,
    ``num_layers``), else one more than the highest block index among ``names``, else 1."""
    n = config.get("num_hidden_layers") or config.get("n_layer") or config.get("num_layers")
    if isinstance(n, int):
        return n
    idxs = [i for i in (layer_index(name) for name in names) if i is not None]
    return max(idxs) + 1 if idxs else 1


def stack_of(tensor_name: str) -> str | None:
    """The stack a block tensor belongs to: its name up to the block index
    (``encoder.block.3.layer.0…`` → ``encoder.block.``), None outside numbered blocks."""
    m = LAYER_RE.search(tensor_name)
    return tensor_name[: m.start(1)] if m else None


def stack_depths(config: dict[str, Any], names: Iterable[str]) -> dict[str, int]:
    """Blocks per stack (``stack_of``): mergekit counts each module's layers on its own (T5's
    encoder and decoder, Gemma 3's text and vision towers), so a gradient spans each stack.

    A stack holds one more block than its highest index; a model with a single stack takes the
    config's count (``num_layers``) where that is at least as many."""
    top: dict[str, int] = {}
    for name in names:
        m = LAYER_RE.search(name)
        if m:
            key = name[: m.start(1)]
            top[key] = max(top.get(key, 0), int(m.group(1)) + 1)
    if len(top) == 1:
        (key, n), declared = next(iter(top.items())), num_layers(config, ())
        top[key] = max(n, declared)
    return top


def depth_fraction(tensor_name: str, depths: dict[str, int] | int) -> float:
    """mergekit's ``t`` for a tensor: block index / (blocks in its stack − 1), 1 in a one-block
    stack, 0 outside blocks; always in [0, 1]. ``depths``: ``stack_depths``, or one count for all."""
    m = LAYER_RE.search(tensor_name)
    if m is None:
        return 0.0
    idx = int(m.group(1))
    n = depths if isinstance(depths, int) else depths.get(tensor_name[: m.start(1)], idx + 1)
    n = max(n, idx + 1)
    return idx / (n - 1) if n > 1 else 1.0


# ------------------------------------------------------------------------------------------------ experts

# Model types whose published per-expert tensors mergekit reads fused, as transformers v5 holds
# them: per layer ``mlp.experts.gate_up_proj`` = every expert's [gate; up] stacked,
# ``mlp.experts.down_proj`` = every expert's down stacked, and the router as ``mlp.gate.weight``.
# Each pattern: (stored name, its fused group's name); group 1 is the layer prefix.
FUSED_EXPERTS: dict[str, tuple[tuple[re.Pattern[str], str], ...]] = {
    "mixtral": (
        (re.compile(r"^(.*)\.block_sparse_moe\.experts\.\d+\.w[13]\.weight$"), r"\1.mlp.experts.gate_up_proj"),
        (re.compile(r"^(.*)\.block_sparse_moe\.experts\.\d+\.w2\.weight$"), r"\1.mlp.experts.down_proj"),
        (re.compile(r"^(.*)\.block_sparse_moe\.gate\.weight$"), r"\1.mlp.gate.weight"),
    ),
    "qwen3_moe": (
        (re.compile(r"^(.*)\.mlp\.experts\.\d+\.(?:gate|up)_proj\.weight$"), r"\1.mlp.experts.gate_up_proj"),
        (re.compile(r"^(.*)\.mlp\.experts\.\d+\.down_proj\.weight$"), r"\1.mlp.experts.down_proj"),
    ),
}
# Qwen2-MoE's routed experts are stored as Qwen3-MoE's (its ``shared_expert`` stays a plain MLP).
FUSED_EXPERTS["qwen2_moe"] = FUSED_EXPERTS["qwen3_moe"]


def mergekit_name(tensor_name: str, model_type: Any) -> str:
    """The name mergekit's architecture definition gives a stored tensor, which its ``filter``
    settings match: a published MoE's expert tensor → its fused group (``FUSED_EXPERTS``);
    every other name as it is."""
    for pattern, fused in FUSED_EXPERTS.get(str(model_type), ()):
        if pattern.match(tensor_name):
            return pattern.sub(fused, tensor_name)
    return tensor_name


def fused_groups(model_type: Any, names: Iterable[str]) -> dict[str, tuple[str, ...]]:
    """For each stored tensor that mergekit reads as part of a fused expert tensor, every stored
    tensor of that fused tensor in mergekit's order (expert by expert, gate before up), itself
    included. Tensor-wide statistics (TIES' magnitude rank, Model Stock's cosine) run over the
    group, as mergekit's run over its fused tensor. One pass over ``names``."""
    if str(model_type) not in FUSED_EXPERTS:
        return {}
    by_fused: dict[str, list[str]] = {}
    for name in names:
        fused = mergekit_name(name, model_type)
        if fused != name and fused.endswith(("gate_up_proj", "down_proj")):
            by_fused.setdefault(fused, []).append(name)

    def order(name: str) -> tuple[int, int]:
        m = re.search(r"\.experts\.(\d+)\.(\w+)\.weight$", name)
        return (int(m.group(1)), 0 if m.group(2) in ("w1", "gate_proj") else 1) if m else (0, 0)

    out: dict[str, tuple[str, ...]] = {}
    for members in by_fused.values():
        group = tuple(sorted(members, key=order))
        out.update(dict.fromkeys(group, group))
    return out


# ------------------------------------------------------------------------------------------------ tensors

# Names of 2-D tables that are looked up, not multiplied (token, position and type embeddings,
# T5's relative-position buckets) and of LM heads: Gram and spectral methods give them their fallback.
EMBED_HINTS = (
    "embed_tokens",
    "lm_head",
    "wte",
    "word_embeddings",
    "embed_out",
    "tok_embeddings",
    "output.weight",
    "wpe",
    "position_embedding",
    "token_type_embeddings",
    "embed_positions",
    "relative_attention_bias",
)

# Model types whose linear layers are transformers' Conv1D (weight stored in × out, y = x W + b).
INPUT_MAJOR_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})


def is_embedding_name(name: str) -> bool:
    """True when ``name`` names an embedding table or LM head (see ``EMBED_HINTS``)."""
    return any(h in name for h in EMBED_HINTS)


def linear_layout(tensor_class: str, config: dict[str, Any]) -> str:
    """``in_out`` for the 2-D weights of Conv1D models, else ``out_in`` (``nn.Linear``)."""
    return "in_out" if tensor_class == "linear" and config.get("model_type") in INPUT_MAJOR_MODEL_TYPES else "out_in"


def classify(name: str, entry: TensorEntry, vocab_size: int | None) -> str:
    """Tensor class: ``buffer`` (non-float), ``embedding`` (token embeddings / LM head),
    ``linear`` (other 2-D weights), ``vector`` (≤1-D) or ``other`` (≥3-D, e.g. convolutions).

    A 2-D tensor is an embedding by name, or by a first dimension equal to the vocabulary size —
    but only outside numbered blocks: inside a block that shape is a projection whose width
    happens to equal the vocabulary (small models), and treating it as an embedding would give it
    the fallback merge instead of the method's."""
    if not entry.is_float:
        return "buffer"
    vocab_shaped = vocab_size is not None and entry.shape[0] == vocab_size and layer_index(name) is None
    if len(entry.shape) == 2 and (is_embedding_name(name) or vocab_shaped):
        return "embedding"
    if len(entry.shape) == 2:
        return "linear"
    if len(entry.shape) <= 1:
        return "vector"
    return "other"


def fused_blocks(name: str, e: TensorEntry, config: dict[str, Any]) -> list[int] | None:
    """Row sizes of the blocks of a packed projection, from the model config; None if not packed.

    Known layouts: ``qkv_proj`` = [q; k; v] with heads·head_dim and kv_heads·head_dim rows
    (Phi-3 style), ``gate_up_proj`` = [gate; up] with equal halves.
    """
    if len(e.shape) != 2:
        return None
    rows = e.shape[0]
    if name.endswith("qkv_proj.weight"):
        heads = config.get("num_attention_heads")
        kv = config.get("num_key_value_heads") or heads
        hidden = config.get("hidden_size")
        if not (isinstance(heads, int) and isinstance(kv, int) and isinstance(hidden, int)):
            raise PlanError("split_fused needs num_attention_heads and hidden_size in config.json", tensor=name)
        hd = config.get("head_dim") or hidden // heads
        blocks = [heads * hd, kv * hd, kv * hd]
    elif name.endswith("gate_up_proj.weight"):
        blocks = [rows // 2, rows - rows // 2]
    else:
        return None
    if sum(blocks) != rows:
        raise PlanError(
            f"packed projection has {rows} rows but the config implies blocks {blocks}",
            tensor=name,
            hint="set raymerge.split_fused: false to merge it as stored",
        )
    return blocks


# ------------------------------------------------------------------------------------------------ modules

# Module of a block (relative name) whose output is the attention output (Llama, BERT, GPT-2,
# OPT/BART, GPT-NeoX/Falcon, ...), and the one whose output is the MLP hidden pre-activation.
ATTN_OUT_MODULES = (
    "self_attn.o_proj",
    "attention.output",
    "attn.c_proj",
    "self_attn.out_proj",
    "attn.out_proj",
    "self_attention.dense",
    "attn.o_proj",
)
MLP_PRE_MODULES = ("mlp.gate_proj", "intermediate.dense", "mlp.c_fc", "mlp.fc1", "mlp.dense_h_to_4h", "mlp.up_proj")


def block_points(block: str, modules: Collection[str]) -> tuple[str | None, str | None]:
    """The attention-output and MLP pre-activation modules of ``block`` (a module name) among
    ``modules`` (all module names of the model), each None when no known name is present."""
    attn = next((f"{block}.{s}" for s in ATTN_OUT_MODULES if f"{block}.{s}" in modules), None)
    mlp = next((f"{block}.{s}" for s in MLP_PRE_MODULES if f"{block}.{s}" in modules), None)
    return attn, mlp


# ------------------------------------------------------------------------------------------------ model types

# Model types with a Llama-style permutation spec (gate/up/down MLP, q/k/v/o attention with
# grouped key/value heads) and with a BERT-style one (intermediate/output dense, query/key/value).
LLAMA_LIKE = ("llama", "mistral", "qwen2")
BERT_LIKE = ("bert", "roberta")

# config.json flags that give linear layers a bias, tried in order when folding a shift into a
# layer that has none (Llama's attention_bias / mlp_bias, others' bias / use_bias, Megatron's).
BIAS_FLAGS = ("attention_bias", "mlp_bias", "bias", "use_bias", "add_bias_linear")


__all__ = [
    "ATTN_OUT_MODULES",
    "BERT_LIKE",
    "BIAS_FLAGS",
    "EMBED_HINTS",
    "FUSED_EXPERTS",
    "INPUT_MAJOR_MODEL_TYPES",
    "LAYER_RE",
    "LLAMA_LIKE",
    "MLP_PRE_MODULES",
    "block_points",
    "classify",
    "depth_fraction",
    "fused_blocks",
    "fused_groups",
    "is_embedding_name",
    "layer_index",
    "linear_layout",
    "mergekit_name",
    "num_layers",
    "stack_depths",
    "stack_of",
]
