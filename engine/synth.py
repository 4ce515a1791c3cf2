"""Deterministic synthetic Llama-shaped checkpoints for tests, the demo and benchmarks.

Experts are the base plus structured task vectors: a low-rank component (what fine-tuning tends
to produce) and a sparse component, each from its own seed. Files are written tensor by tensor,
so building a multi-GB checkpoint never holds more than one tensor in memory. Header-only
checkpoints (``make_header_only_family``, ``make_header_only_grams``) have real headers over
sparse files with no data: Llama 3 70B and 405B families to plan against, in seconds and a few
MiB of disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from raymerge.engine.plan import shard_header
from raymerge.engine.storage import DTYPES, TAG_OF_DTYPE
from raymerge.engine.task import tensor_bytes


@dataclass(frozen=True)
class LlamaShape:
    vocab: int
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int

    def config(self, dtype: torch.dtype) -> dict[str, object]:
        """A ``transformers`` LlamaConfig dict for this shape."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "torch_dtype": str(dtype).replace("torch.", ""),
        }

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Tensor names and shapes in Hugging Face Llama layout."""
        h, i, hd = self.hidden, self.intermediate, self.hidden // self.heads
        kv = self.kv_heads * hd
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}."
            out += [
                (p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)),
                (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i)),
            ]
        out += [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]
        return out

    @property
    def params(self) -> int:
        total = 0
        for _, s in self.tensors():
            n = 1
            for d in s:
                n *= d
            total += n
        return total


SHAPES: dict[str, LlamaShape] = {
    "tiny": LlamaShape(vocab=512, hidden=64, layers=2, intermediate=176, heads=4, kv_heads=2),
    "small": LlamaShape(vocab=4096, hidden=256, layers=4, intermediate=688, heads=8, kv_heads=4),
    "1b": LlamaShape(vocab=32000, hidden=2048, layers=16, intermediate=5632, heads=16, kv_heads=4),
    "7b": LlamaShape(vocab=32000, hidden=4096, layers=32, intermediate=11008, heads=32, kv_heads=32),
    # Benchmarked as layer subsets (dataclasses.replace(shape, layers=n)): same widths, fewer layers.
    "70b": LlamaShape(vocab=32000, hidden=8192, layers=80, intermediate=28672, heads=64, kv_heads=8),
    "405b": LlamaShape(vocab=128256, hidden=16384, layers=126, intermediate=53248, heads=128, kv_heads=8),
    # Llama 3 / 3.1 at full size (head_dim 128, 128k vocabulary, untied): for header-only plans.
    "llama3-70b": LlamaShape(vocab=128256, hidden=8192, layers=80, intermediate=28672, heads=64, kv_heads=8),
    "llama3-405b": LlamaShape(vocab=128256, hidden=16384, layers=126, intermediate=53248, heads=128, kv_heads=8),
}


def _seed(*parts: object) -> int:
    import hashlib

    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def base_tensor(name: str, shape: tuple[int, ...], seed: int, device: str = "cpu") -> torch.Tensor:
    """Base weights: norms near 1, matrices ~ N(0, 0.02²).

    Values depend on ``device`` (each device has its own generator), but are deterministic on each.
    """
    g = torch.Generator(device).manual_seed(_seed("base", seed, name))
    if len(shape) == 1:
        return 1.0 + 0.05 * torch.randn(shape, generator=g, device=device)
    return 0.02 * torch.randn(shape, generator=g, device=device)


def task_vector(
    name: str, shape: tuple[int, ...], expert: int, seed: int, scale: float = 0.004, device: str = "cpu"
) -> torch.Tensor:
    """A structured task vector: rank-4 plus 1 % sparse spikes (vectors: dense small noise)."""
    g = torch.Generator(device).manual_seed(_seed("expert", seed, expert, name))
    if len(shape) == 1:
        return scale * torch.randn(shape, generator=g, device=device)
    rows, cols = shape[0], int(torch.tensor(shape[1:]).prod())
    r = 4
    low = (torch.randn(rows, r, generator=g, device=device) @ torch.randn(r, cols, generator=g, device=device)) * (
        scale / r**0.5
    )
    spikes = torch.rand(rows, cols, generator=g, device=device) < 0.01
    low += spikes * torch.randn(rows, cols, generator=g, device=device) * (4 * scale)
    return low.reshape(shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _shard_files(
    specs: list[tuple[str, tuple[int, ...]]], item: int, shard_bytes: int | None, stem: str = "model"
) -> list[tuple[str, list[tuple[str, tuple[int, ...]]]]]:
    """Group ``specs`` (in order) into shards of at most ``shard_bytes`` the way Hugging Face names
    them: ``model.safetensors`` alone, else ``model-0000i-of-0000n.safetensors``."""
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    fill = 0
    for name, shape in specs:
        nb = item * _numel(shape)
        if shard_bytes and groups[-1] and fill + nb > shard_bytes:
            groups.append([])
            fill = 0
        groups[-1].append((name, shape))
        fill += nb
    n = len(groups)
    names = [f"{stem}.safetensors" if n == 1 else f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return list(zip(names, groups, strict=True))


def _shard_rows(
    group: list[tuple[str, tuple[int, ...]]], tag: str, item: int
) -> tuple[list[tuple[str, str, tuple[int, ...], int, int]], int]:
    """Header rows ``(name, tag, shape, start, end)`` packed from offset 0, and the data bytes."""
    rows = []
    pos = 0
    for name, shape in group:
        nb = item * _numel(shape)
        rows.append((name, tag, shape, pos, pos + nb))
        pos += nb
    return rows, pos


def _write_metadata(
    path: Path,
    weight_map: dict[str, str],
    n_files: int,
    config: dict[str, object] | None,
    tokenizer: bool,
    total_size: int | None = None,
) -> None:
    if n_files > 1:
        meta: dict[str, object] = {} if total_size is None else {"total_size": total_size}
        index = {"metadata": meta, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        (path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256, "source": str(path.name)}))


def _write_shards(
    path: str | Path,
    specs: list[tuple[str, tuple[int, ...]]],
    dtype: torch.dtype,
    shard_bytes: int | None,
    fill: Callable[[BinaryIO, list[tuple[str, tuple[int, ...]]], int], None],
) -> tuple[Path, dict[str, str], int, int]:
    """Lay ``specs`` out in HF-layout shards under ``path``: each file gets its length prefix and
    header, then ``fill(file, group, data_bytes)`` writes (or leaves out) the data section.
    Returns the directory, the weight map, the shard count and the total data bytes."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tag = TAG_OF_DTYPE[dtype]
    item = DTYPES[tag][1]
    files = _shard_files(specs, item, shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for fname, group in files:
        rows, data_bytes = _shard_rows(group, tag, item)
        weight_map.update((name, fname) for name, _ in group)
        total += data_bytes
        header = shard_header(rows)
        with open(path / fname, "wb") as f:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            fill(f, group, data_bytes)
    return path, weight_map, len(files), total


def write_checkpoint(
    path: str | Path,
    tensors: Iterator[tuple[str, torch.Tensor]] | list[tuple[str, torch.Tensor]],
    specs: list[tuple[str, tuple[int, ...]]],
    dtype: torch.dtype,
    config: dict[str, object] | None,
    shard_bytes: int | None = None,
    tokenizer: bool = True,
) -> Path:
    """Stream tensors (in ``specs`` order) into HF-layout safetensors shards plus metadata."""
    it = iter(tensors)

    def fill(f: BinaryIO, group: list[tuple[str, tuple[int, ...]]], _: int) -> None:
        for name, shape in group:
            got_name, t = next(it)
            assert got_name == name and tuple(t.shape) == tuple(shape), (got_name, name)
            f.write(tensor_bytes(t.to(dtype)))

    out, weight_map, n_files, _ = _write_shards(path, specs, dtype, shard_bytes, fill)
    _write_metadata(out, weight_map, n_files, config, tokenizer)
    return out


def write_header_only_checkpoint(
    path: str | Path,
    specs: list[tuple[str, tuple[int, ...]]],
    dtype: torch.dtype,
    config: dict[str, object] | None,
    shard_bytes: int | None = None,
    tokenizer: bool = True,
) -> Path:
    """Write real safetensors headers for ``specs`` whose data sections are holes.

    Each shard is the 8-byte little-endian header length, the JSON header (dtype, shape and
    ``data_offsets`` exactly as for real data), then a file truncated up to its full size without
    writing a byte: a sparse file that passes strict header validation, reads as zeros and takes
    ~4 KiB of disk however large the tensors. Sharded and indexed like ``write_checkpoint``
    (``shard_bytes`` per shard); for planning and header-level tests of frontier-size models.
    """

    def fill(f: BinaryIO, _: list[tuple[str, tuple[int, ...]]], data_bytes: int) -> None:
        f.truncate(f.tell() + data_bytes)

    out, weight_map, n_files, total = _write_shards(path, specs, dtype, shard_bytes, fill)
    _write_metadata(out, weight_map, n_files, config, tokenizer, total_size=total)
    return out


def make_family(
    root: str | Path,
    shape: LlamaShape | str,
    n_experts: int,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    shard_bytes: int | None = None,
    scale: float = 0.004,
    device: str = "cpu",
) -> tuple[Path, list[Path]]:
    """Write a base checkpoint and ``n_experts`` fine-tuned-like experts under ``root``.

    ``device="cuda"`` draws the random tensors on the GPU (much faster for 7B+ shapes; different,
    equally deterministic values).
    """
    shp = SHAPES[shape] if isinstance(shape, str) else shape
    root = Path(root)
    specs = shp.tensors()
    cfg = shp.config(dtype)

    def stream(expert: int | None) -> Iterator[tuple[str, torch.Tensor]]:
        for name, s in specs:
            t = base_tensor(name, s, seed, device)
            if expert is not None:
                t += task_vector(name, s, expert, seed, scale, device)
            yield name, t.cpu()

    base = write_checkpoint(root / "base", stream(None), specs, dtype, cfg, shard_bytes)
    experts = [
        write_checkpoint(root / f"expert{e}", stream(e), specs, dtype, cfg, shard_bytes) for e in range(n_experts)
    ]
    os.sync()
    return base, experts


# Hugging Face's default max_shard_size ("5GB").
HF_SHARD_BYTES = 5 * 10**9


def make_header_only_family(
    root: str | Path,
    shape: LlamaShape | str,
    n_experts: int,
    *,
    dtype: torch.dtype = torch.bfloat16,
    shard_bytes: int | None = HF_SHARD_BYTES,
) -> tuple[Path, list[Path]]:
    """A base and ``n_experts`` experts under ``root`` (``base``, ``expert0`` …) with real headers
    and no data (``write_header_only_checkpoint``): what ``raymerge plan`` needs of a 405B family,
    in milliseconds per checkpoint and a few KiB of disk per shard. The experts' files are identical
    (planning reads headers only); ``make_family``'s layout and return value otherwise.
    """
    shp = SHAPES[shape] if isinstance(shape, str) else shape
    root = Path(root)
    specs = shp.tensors()
    cfg = shp.config(dtype)
    base = write_header_only_checkpoint(root / "base", specs, dtype, cfg, shard_bytes)
    experts = [
        write_header_only_checkpoint(root / f"expert{e}", specs, dtype, cfg, shard_bytes) for e in range(n_experts)
    ]
    return base, experts


def gram_specs(shape: LlamaShape | str) -> list[tuple[str, tuple[int, int]]]:
    """RegMean's statistics for ``shape``: one ``[in, in]`` input Gram per linear layer, keyed by
    module name (``model.layers.0.mlp.down_proj``) as ``raymerge stats`` writes them."""
    shp = SHAPES[shape] if isinstance(shape, str) else shape
    return [
        (name.removesuffix(".weight"), (s[1], s[1]))
        for name, s in shp.tensors()
        if name.startswith("model.layers.") and len(s) == 2
    ]


def make_header_only_grams(
    path: str | Path,
    shape: LlamaShape | str,
    *,
    dtype: torch.dtype = torch.float32,
    shard_bytes: int | None = HF_SHARD_BYTES,
) -> Path:
    """Header-only input Grams for RegMean (``gram_specs``), as a directory in Hugging Face layout
    (``shard_bytes`` per shard) or, with ``shard_bytes=None``, the one file ``path/grams.safetensors``
    that ``raymerge stats`` writes. Returns what a recipe's ``grams`` parameter should name.
    """
    path = Path(path)
    out = write_header_only_checkpoint(path, list(gram_specs(shape)), dtype, None, shard_bytes, tokenizer=False)
    if shard_bytes is None:
        single = out / "grams.safetensors"
        (out / "model.safetensors").rename(single)
        return single
    return out
