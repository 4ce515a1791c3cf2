"""LoRA adapters as merge inputs: mergekit's ``model: BASE+ADAPTER`` syntax.

``ADAPTER`` is a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``). The
input model it stands for is never written anywhere: its checkpoint is the base's (same tensors,
same byte ranges), and each tensor the adapter targets carries a ``LoraRef`` — where its A and B
factors are and the scale — so a task forms rows of ``W + scale · B·A`` itself, from the rows it
reads (``delta_rows``). The scale is ``lora_alpha / r`` (``lora_alpha / √r`` with
``use_rslora``), with ``alpha_pattern`` overrides; ``fan_in_fan_out`` (Conv1D) and embedding
adapters take the product transposed, as PEFT does. Tensors the adapter saves whole
(``modules_to_save``) replace the base's. DoRA and trained biases are refused.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

import torch

from raymerge.engine.errors import CheckpointError
from raymerge.engine.methods.gram_lora import Factors
from raymerge.engine.safeio import read_json
from raymerge.engine.storage import Checkpoint, join_url, open_checkpoint, open_shard

PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraRef:
    """The low-rank update of one tensor: factor byte ranges (``a``: r × in, ``b``: out × r, as
    ``TensorRef`` fields), ``scale``, and ``transposed`` (the weight is stored in × out)."""

    a_url: str
    a_start: int
    a_end: int
    a_dtype: str
    a_shape: tuple[int, ...]
    b_url: str
    b_start: int
    b_end: int
    b_dtype: str
    b_shape: tuple[int, ...]
    scale: float
    transposed: bool

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LoraRef:
        return cls(**{**d, "a_shape": tuple(d["a_shape"]), "b_shape": tuple(d["b_shape"])})


@dataclass(frozen=True)
class LoraCheckpoint(Checkpoint):
    """The base's checkpoint, with the adapter's update per tensor it targets."""

    deltas: dict[str, LoraRef] = dataclasses.field(default_factory=dict)
    base_url: str = ""


def split_lora(url: str) -> tuple[str, str] | None:
    """``(base, adapter)`` for mergekit's ``BASE+ADAPTER``, else None."""
    parts = url.split("+")
    return (parts[0], parts[1]) if len(parts) == 2 and all(parts) else None


def open_model(url: str, *, allow_pickle: bool = False) -> Checkpoint:
    """A merge input's checkpoint: a model directory, or a base with a LoRA adapter on it."""
    pair = split_lora(url)
    if pair is None:
        return open_checkpoint(url, allow_pickle=allow_pickle)
    base_url, adapter = pair
    base = open_checkpoint(base_url, allow_pickle=allow_pickle)
    cfg_url = join_url(adapter, "adapter_config.json")
    cfg = read_json(cfg_url, error=CheckpointError, what="adapter config")
    if cfg.get("use_dora"):
        raise CheckpointError("DoRA adapters are not supported as inputs", file=cfg_url)
    if cfg.get("bias", "none") != "none":
        raise CheckpointError(
            f"adapters with trained biases (bias: {cfg.get('bias')}) are not supported as inputs", file=cfg_url
        )
    weights = join_url(adapter, "adapter_model.safetensors")
    reader = open_shard(weights)
    entries, shard_of, deltas = dict(base.entries), dict(base.shard_of), {}
    pairs: dict[str, dict[str, Any]] = {}
    for key, e in reader.entries.items():
        name = key[len(PREFIX) :] if key.startswith(PREFIX) else key
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?", name)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)[-1]] = (e, "embedding" in m.group(2))
            continue
        whole = name.replace(".modules_to_save.default", "")
        if whole in entries and entries[whole].shape == e.shape:
            entries[whole], shard_of[whole] = e, weights  # saved whole (modules_to_save)
            continue
        raise CheckpointError(
            "adapter tensor matches no tensor of the base model", file=weights, tensor=key, hint=f"base: {base_url}"
        )
    for module, ab in pairs.items():
        name = f"{module}.weight"
        if set(ab) != {"A", "B"} or name not in entries:
            raise CheckpointError(
                "adapter factors do not pair up with a weight of the base model", file=weights, tensor=module
            )
        (a, embedding), (b, _) = ab["A"], ab["B"]
        r = a.shape[0]  # the rank (lora_embedding_A is r × vocabulary too)
        alpha = _alpha(cfg, module)
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        transposed = embedding or bool(cfg.get("fan_in_fan_out"))
        w = entries[name].shape
        rows, cols = (b.shape[0], a.shape[1]) if not transposed else (a.shape[1], b.shape[0])
        if len(w) != 2 or (rows, cols) != tuple(w) or b.shape[1] != a.shape[0]:
            raise CheckpointError(
                f"adapter factors {list(b.shape)}·{list(a.shape)} do not fit weight {list(w)}",
                file=weights,
                tensor=module,
            )
        deltas[name] = LoraRef(
            weights, a.start, a.end, a.dtype, a.shape, weights, b.start, b.end, b.dtype, b.shape, scale, transposed
        )
    return LoraCheckpoint(url, base.config, shard_of, entries, deltas, base_url)


def _alpha(cfg: dict[str, Any], module: str) -> float:
    """``lora_alpha``, or the ``alpha_pattern`` entry whose key ends the module name (PEFT's rule)."""
    for key, value in (cfg.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(cfg.get("lora_alpha", 8))


def delta_rows(ref: LoraRef, name: str, r0: int, r1: int, compute: torch.dtype) -> torch.Tensor:
    """Rows [r0, r1) of ``scale · B·A`` (transposed where the weight is stored in × out)."""
    from raymerge.engine.headers import TensorEntry

    a_entry = TensorEntry(name, ref.a_dtype, ref.a_shape, ref.a_start, ref.a_end)
    b_entry = TensorEntry(name, ref.b_dtype, ref.b_shape, ref.b_start, ref.b_end)
    a = open_shard(ref.a_url).read_rows(a_entry).to(compute)
    b = open_shard(ref.b_url).read_rows(b_entry).to(compute)
    if ref.transposed:
        return (b @ a[:, r0:r1]).T * ref.scale
    return (b[r0:r1] @ a) * ref.scale


def lora_factors(ref: LoraRef, name: str, r0: int, r1: int, compute: torch.dtype, device: torch.device) -> Factors:
    """The update of rows [r0, r1) as factors: scale · B[r0:r1] · A (an adapter stored as out × in).

    Gram methods solve in the span of the A's from these (``methods.gram_lora``) instead of
    reading rows of base + scale·B·A. Non-finite factors are refused, naming the adapter file."""
    from raymerge.engine.headers import TensorEntry

    if ref.transposed:
        raise ValueError("factored form of a transposed adapter")
    out = []
    for url, entry in (
        (ref.a_url, TensorEntry(name, ref.a_dtype, ref.a_shape, ref.a_start, ref.a_end)),
        (ref.b_url, TensorEntry(name, ref.b_dtype, ref.b_shape, ref.b_start, ref.b_end)),
    ):
        x = open_shard(url).read_rows(entry).to(device=device, dtype=compute)
        if not bool(torch.isfinite(x).all()):
            raise CheckpointError("adapter factor contains NaN or Inf", file=url, tensor=name)
        out.append(x)
    a, b = out
    return Factors(a, b[r0:r1], ref.scale)


__all__ = ["LoraCheckpoint", "LoraRef", "delta_rows", "lora_factors", "open_model", "split_lora"]
