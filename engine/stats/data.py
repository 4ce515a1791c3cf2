"""Unlabelled data for statistics: reading text and tensor files into batches of model inputs.

A batch is a dict of CPU tensors the model's forward accepts as keyword arguments. Text batches
carry an ``attention_mask`` (1 = token, 0 = padding), which the hooks use to leave padding out of
every statistic; ``batch_tokens`` counts the rows a batch contributes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raymerge.engine.errors import StatsError
from raymerge.engine.safeio import decode_text, parse_json, read_regular
from raymerge.engine.stats.models import require_transformers

Batch = dict[str, torch.Tensor]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model")


@dataclass(frozen=True)
class DataSpec:
    """Where a task's unlabelled data is and how to batch it.

    ``files``: ``.jsonl`` (one object per line, text under ``text_field``, or one JSON string per
    line), ``.json`` (a list of such), ``.txt`` (one example per non-empty line), or tensor files
    ``.pt`` / ``.safetensors`` holding one tensor ``[examples, ...]`` (fed as the model's main
    input: ``input_ids``, ``pixel_values``, …) or several named ones (``input_ids`` and
    ``attention_mask``, …). Text is tokenized with the tokenizer in ``tokenizer`` (default: the
    model directory), truncated to ``max_length`` tokens and right-padded per batch.
    """

    files: tuple[str, ...]
    tokenizer: str | None = None
    text_field: str = "text"
    batch_size: int = 8
    max_length: int = 512
    max_examples: int | None = None

    def with_tokenizer(self, default: str | None) -> DataSpec:
        """This spec with ``tokenizer`` defaulted to ``default`` (a model directory)."""
        return self if self.tokenizer or not default else dataclasses.replace(self, tokenizer=str(default))


DATA_FILE_BYTES = 4 << 30  # text data is held in memory whole; more than this is a mistake


def _read_texts(path: str, field_name: str) -> list[str]:
    suffix = Path(path).suffix.lower()
    raw = decode_text(
        read_regular(path, limit=DATA_FILE_BYTES, error=StatsError, what="data file"),
        file=path,
        error=StatsError,
        what="data file",
    )
    if suffix == ".txt":
        return [ln for ln in raw.splitlines() if ln.strip()]
    if suffix == ".json":
        items = parse_json(raw, file=path, expect=list, error=StatsError, what="a .json data file")
    else:
        items = [
            parse_json(ln, file=f"{path}:{i + 1}", expect=None, error=StatsError, what="data line")
            for i, ln in enumerate(raw.splitlines())
            if ln.strip()
        ]
    texts = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            texts.append(item)
        elif isinstance(item, dict) and isinstance(item.get(field_name), str):
            texts.append(item[field_name])
        else:
            raise StatsError(
                f"example {i} has no string field {field_name!r}",
                file=path,
                hint="set --text-field to the key holding the text",
            )
    return texts


def _read_tensors(path: str, main_input: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad data file
        raise StatsError(f"cannot read tensor data file: {exc}", file=path) from None
    if isinstance(obj, torch.Tensor):
        obj = {main_input: obj}
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise StatsError("a tensor data file must hold a tensor or a dict of tensors", file=path)
    if len(obj) == 1 and main_input not in obj:
        obj = {main_input: next(iter(obj.values()))}
    n = {int(v.shape[0]) if v.dim() else -1 for v in obj.values()}
    if len(n) != 1 or -1 in n:
        raise StatsError(f"tensors disagree on the number of examples (dim 0): {sorted(n)}", file=path)
    return dict(obj)


def _tokenizer(directory: str | None, file: str) -> Any:
    if not directory or not any((Path(directory) / f).exists() for f in _TOKENIZER_FILES):
        raise StatsError(
            f"text data needs a tokenizer, and {directory or 'no directory'} has none",
            file=file,
            hint="put tokenizer files in the model directory, pass --tokenizer DIR, or give tensor files (.pt/.safetensors) of input ids",
        )
    require_transformers()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise StatsError("the tokenizer has neither a pad nor an eos token to pad batches with", file=directory)
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_batches(spec: DataSpec, *, main_input: str = "input_ids") -> list[Batch]:
    """Read ``spec``'s files into CPU batches of at most ``spec.batch_size`` examples, in file order.

    Batches never span two files; ``max_examples`` caps the total. Text batches carry an
    ``attention_mask`` (1 = token, 0 = padding), which the hooks use to leave padding out.
    """
    if spec.batch_size < 1:
        raise StatsError(f"batch size must be ≥ 1, got {spec.batch_size}")
    batches: list[Batch] = []
    left = spec.max_examples if spec.max_examples is not None else -1
    for path in spec.files:
        if left == 0:
            break
        if not Path(path).is_file():
            raise StatsError("data file not found", file=path)
        if path.endswith((".pt", ".safetensors")):
            tensors = _read_tensors(path, main_input)
            n = int(next(iter(tensors.values())).shape[0])
            n = n if left < 0 else min(n, left)
            for lo in range(0, n, spec.batch_size):
                hi = min(n, lo + spec.batch_size)
                batches.append({k: v[lo:hi] for k, v in tensors.items()})
        else:
            texts = _read_texts(path, spec.text_field)
            texts = texts if left < 0 else texts[:left]
            n = len(texts)
            if not texts:
                continue
            tok = _tokenizer(spec.tokenizer, path)
            for lo in range(0, n, spec.batch_size):
                enc = tok(
                    texts[lo : lo + spec.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=spec.max_length,
                    return_tensors="pt",
                )
                batches.append({k: v for k, v in enc.items() if isinstance(v, torch.Tensor)})
        left = left - n if left > 0 else left
    if not batches:
        raise StatsError("no examples in the data files", file=", ".join(spec.files))
    return batches


def shard_batches(batches: Sequence[Batch], rank: int, world: int) -> list[Batch]:
    """Batches ``rank, rank + world, …``: one worker's share for data-parallel collection."""
    return list(batches[rank::world])


def batch_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    """Rows a batch contributes: non-padding tokens, else batch × sequence for token ids, else samples."""
    m = batch.get("attention_mask")
    if m is not None:
        return int(m.sum())
    first = next(iter(batch.values()))
    is_ids = first.dim() >= 2 and not first.is_floating_point()
    return int(first.shape[0]) * (int(first.shape[1]) if is_ids else 1)
