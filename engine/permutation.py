"""Permutation symmetries of a model: which axes of which tensors one permutation of hidden units
moves, per architecture, and applying permutations to a state dict.

An MLP's hidden units can be permuted (rows of its input projections, columns of its output
projection), and so can whole attention heads, without changing the network's function. A
``PermutationSpec`` lists those permutations for a checkpoint (``permutation_spec_for``: Llama-
like and BERT-like transformers by name, plain MLP stacks from shapes); ``align`` picks them by
weight matching.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from raymerge.engine.arch import BERT_LIKE, LLAMA_LIKE
from raymerge.engine.errors import AlignmentError


@dataclass(frozen=True)
class PermutedAxis:
    """One axis of one tensor that a permutation reorders, in blocks of ``block`` consecutive entries.

    ``block`` is 1 for hidden units and the head width for attention heads (``rep × head_dim`` for
    grouped-query q/o projections, whose query heads move with their key/value head).
    """

    tensor: str
    axis: int
    block: int = 1


@dataclass(frozen=True)
class Permutation:
    """A permutation of ``size`` units and every tensor axis it must be applied to."""

    name: str
    size: int
    axes: tuple[PermutedAxis, ...]


@dataclass(frozen=True)
class PermutationSpec:
    """The permutation symmetries used for alignment: which axes of which tensors move together.

    A tensor may carry several permutations on different axes (the middle layer of an MLP) but
    never the same one twice (linear assignment could not optimise it exactly).
    """

    perms: tuple[Permutation, ...]
    _axes_of: dict[str, tuple[tuple[str, PermutedAxis], ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [p.name for p in self.perms]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise AlignmentError(f"permutation names repeat: {dup}")
        axes_of: dict[str, list[tuple[str, PermutedAxis]]] = {}
        for p in self.perms:
            if p.size < 1:
                raise AlignmentError(f"permutation {p.name} has size {p.size}")
            for ax in p.axes:
                if ax.axis < 0 or ax.block < 1:
                    raise AlignmentError(
                        f"axis {ax.axis} / block {ax.block} of permutation {p.name}",
                        tensor=ax.tensor,
                        hint="axes count from 0 and blocks hold at least one entry",
                    )
                for q, other in axes_of.get(ax.tensor, []):
                    if q == p.name or other.axis == ax.axis:
                        raise AlignmentError(
                            f"permutations {q} and {p.name} both reorder axis {ax.axis}"
                            if q != p.name
                            else f"permutation {p.name} reorders two axes of one tensor",
                            tensor=ax.tensor,
                            hint="a tensor may carry one permutation per axis, each once",
                        )
                axes_of.setdefault(ax.tensor, []).append((p.name, ax))
        object.__setattr__(self, "_axes_of", {t: tuple(v) for t, v in axes_of.items()})

    @property
    def tensors(self) -> tuple[str, ...]:
        """Names of every tensor some permutation touches, in spec order."""
        return tuple(self._axes_of)

    def axes_of(self, tensor: str) -> tuple[tuple[str, PermutedAxis], ...]:
        """(permutation name, axis) pairs applied to ``tensor``; empty for untouched tensors."""
        return self._axes_of.get(tensor, ())

    def components(self) -> list[PermutationSpec]:
        """Split into independent groups: permutations that share no tensor never interact.

        In a transformer without residual permutations each block is one group, so alignment can
        read, match and release one block at a time.
        """
        parent = list(range(len(self.perms)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        index = {p.name: i for i, p in enumerate(self.perms)}
        for pairs in self._axes_of.values():
            first = index[pairs[0][0]]
            for q, _ in pairs[1:]:
                parent[root(index[q])] = root(first)
        groups: dict[int, list[Permutation]] = {}
        for i, p in enumerate(self.perms):
            groups.setdefault(root(i), []).append(p)
        return [PermutationSpec(tuple(g)) for g in groups.values()]

    def check(self, shapes: Mapping[str, Sequence[int]], *, label: str) -> None:
        """Raise ``AlignmentError`` unless every permuted axis exists in ``shapes`` with size × block entries."""
        for p in self.perms:
            for ax in p.axes:
                if ax.tensor not in shapes:
                    raise AlignmentError(
                        f"model {label} has no tensor that permutation {p.name} needs",
                        file=label,
                        tensor=ax.tensor,
                        hint="the weights do not match the architecture in config.json",
                    )
                shape = tuple(shapes[ax.tensor])
                if ax.axis >= len(shape) or shape[ax.axis] != p.size * ax.block:
                    raise AlignmentError(
                        f"shape {list(shape)} in model {label} has no axis {ax.axis} of {p.size} × {ax.block} "
                        f"entries for permutation {p.name}",
                        file=label,
                        tensor=ax.tensor,
                        hint="check intermediate_size, num_attention_heads and num_key_value_heads in config.json",
                    )


def shapes_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Tensor name → shape, the form ``permutation_spec_for`` and ``PermutationSpec.check`` take."""
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def _get(config: Any, key: str, default: Any = None) -> Any:
    value = config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)
    return default if value is None else value


def _blocks(names: Iterable[str], pattern: str) -> list[str]:
    """Block prefixes (``model.layers.3``) of tensors matching ``pattern``, in layer order."""
    found = []
    for name in names:
        m = re.fullmatch(pattern, name)
        if m:
            prefix = m.group(1)
            found.append((prefix.rsplit(".", 1)[0], int(prefix.rsplit(".", 1)[1]), prefix))
    return [prefix for _, _, prefix in sorted(found)]


def _with_biases(
    axes: list[PermutedAxis], biases: list[tuple[str, int]], names: Collection[str]
) -> tuple[PermutedAxis, ...]:
    """``axes`` plus the bias axes (name, block) that exist in ``names``."""
    return tuple(axes + [PermutedAxis(t, 0, block) for t, block in biases if t in names])


def _llama_spec(config: Any, names: Collection[str], heads: bool) -> list[Permutation]:
    hidden = int(_get(config, "hidden_size"))
    n_heads = int(_get(config, "num_attention_heads"))
    n_kv = int(_get(config, "num_key_value_heads", n_heads))
    head_dim = int(_get(config, "head_dim", hidden // n_heads))
    inter = int(_get(config, "intermediate_size"))
    if n_heads % n_kv:
        raise AlignmentError(f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}")
    q_block = (n_heads // n_kv) * head_dim  # query heads that share one key/value head move together
    perms = []
    for block in _blocks(names, r"(.*layers\.\d+)\.mlp\.gate_proj\.weight"):
        mlp = f"{block}.mlp"
        axes = [PermutedAxis(f"{mlp}.{p}.weight", 0) for p in ("gate_proj", "up_proj")]
        axes.append(PermutedAxis(f"{mlp}.down_proj.weight", 1))
        biases = [(f"{mlp}.{p}.bias", 1) for p in ("gate_proj", "up_proj")]
        perms.append(Permutation(f"{mlp}.hidden", inter, _with_biases(axes, biases, names)))
        if heads:
            att = f"{block}.self_attn"
            width = {"q_proj": q_block, "k_proj": head_dim, "v_proj": head_dim}
            axes = [PermutedAxis(f"{att}.{p}.weight", 0, w) for p, w in width.items()]
            axes.append(PermutedAxis(f"{att}.o_proj.weight", 1, q_block))
            biases = [(f"{att}.{p}.bias", w) for p, w in width.items()]
            perms.append(Permutation(f"{att}.kv_heads", n_kv, _with_biases(axes, biases, names)))
    return perms


def _bert_spec(config: Any, names: Collection[str], heads: bool) -> list[Permutation]:
    hidden = int(_get(config, "hidden_size"))
    n_heads = int(_get(config, "num_attention_heads"))
    head_dim = hidden // n_heads
    inter = int(_get(config, "intermediate_size"))
    perms = []
    for block in _blocks(names, r"(.*encoder\.layer\.\d+)\.intermediate\.dense\.weight"):
        axes = [PermutedAxis(f"{block}.intermediate.dense.weight", 0), PermutedAxis(f"{block}.output.dense.weight", 1)]
        biases = [(f"{block}.intermediate.dense.bias", 1)]
        perms.append(Permutation(f"{block}.intermediate", inter, _with_biases(axes, biases, names)))
        if heads:
            att = f"{block}.attention"
            axes = [PermutedAxis(f"{att}.self.{p}.weight", 0, head_dim) for p in ("query", "key", "value")]
            axes.append(PermutedAxis(f"{att}.output.dense.weight", 1, head_dim))
            biases = [(f"{att}.self.{p}.bias", head_dim) for p in ("query", "key", "value")]
            perms.append(Permutation(f"{att}.heads", n_heads, _with_biases(axes, biases, names)))
    return perms


def mlp_permutation_spec(layers: Sequence[str], shapes: Mapping[str, Sequence[int]]) -> PermutationSpec:
    """Spec for a plain MLP of linear layers ``layers`` (module names, input to output).

    The hidden units between ``layers[k]`` and ``layers[k+1]`` are one permutation: rows (and bias)
    of the first, columns of the second. Exact for elementwise activations between the layers; a
    norm with per-unit parameters in between would have to be permuted too and is not handled.
    """
    perms = []
    for first, second in zip(layers[:-1], layers[1:]):
        if f"{first}.weight" not in shapes:
            raise AlignmentError(f"no weight for linear layer {first!r}", tensor=f"{first}.weight")
        axes = [PermutedAxis(f"{first}.weight", 0), PermutedAxis(f"{second}.weight", 1)]
        size = int(shapes[f"{first}.weight"][0])
        perms.append(Permutation(f"{first}.out", size, _with_biases(axes, [(f"{first}.bias", 1)], shapes)))
    return PermutationSpec(tuple(perms))


def permutation_spec_for(
    config: Mapping[str, Any] | Any, shapes: Mapping[str, Sequence[int]], *, heads: bool = True
) -> PermutationSpec:
    """Derive the permutation spec of a model from its config (dict or transformers config) and tensor shapes.

    Llama-style (``llama``, ``mistral``, ``qwen2``): per block the MLP hidden units (gate/up rows,
    down columns) and, with ``heads``, whole key/value heads with their query groups (q/k/v rows,
    o columns). BERT-style (``bert``, ``roberta``): intermediate units (rows + bias, output.dense
    columns) and whole heads. ``model_type: mlp`` with ``layers: [names]``: a plain MLP
    (``mlp_permutation_spec``). Tensor names may carry any prefix (``model.``, ``bert.``).
    """
    model_type = _get(config, "model_type")
    if model_type in LLAMA_LIKE:
        perms = _llama_spec(config, shapes, heads)
    elif model_type in BERT_LIKE:
        perms = _bert_spec(config, shapes, heads)
    elif model_type == "mlp":
        layers = _get(config, "layers")
        if not isinstance(layers, Sequence) or len(layers) < 2:
            raise AlignmentError("an mlp config needs 'layers': the names of two or more linear layers")
        return mlp_permutation_spec(list(layers), shapes)
    else:
        raise AlignmentError(
            f"no permutation spec for model_type {model_type!r}",
            hint=f"supported: {', '.join(LLAMA_LIKE + BERT_LIKE)}, mlp; or build a PermutationSpec by hand",
        )
    if not perms:
        raise AlignmentError(f"found no {model_type} blocks among the tensor names", hint="is this the right config?")
    spec = PermutationSpec(tuple(perms))
    return spec


def unit_index(perm: torch.Tensor, block: int) -> torch.Tensor:
    if block == 1:
        return perm
    return (perm[:, None] * block + torch.arange(block, device=perm.device)).reshape(-1)


def permute_tensor(
    name: str, tensor: torch.Tensor, spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Apply to one tensor every permutation the spec puts on it (returned unchanged if none)."""
    for pname, ax in spec.axes_of(name):
        tensor = tensor.index_select(ax.axis, unit_index(perms[pname].to(tensor.device), ax.block))
    return tensor


def _check_perms(spec: PermutationSpec, perms: Mapping[str, torch.Tensor]) -> None:
    for p in spec.perms:
        if p.name not in perms:
            raise AlignmentError(f"no permutation given for {p.name}")
        got = perms[p.name]
        if got.shape != (p.size,) or not torch.equal(torch.sort(got.cpu()).values, torch.arange(p.size)):
            raise AlignmentError(f"{p.name} is not a permutation of {p.size} units", hint="pass Matching.perms")


def apply_permutation(
    state_dict: Mapping[str, torch.Tensor], spec: PermutationSpec, perms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Return a new state dict with every permuted axis reordered (P(B)); other tensors are shared, not copied.

    For a spec from ``permutation_spec_for`` the permuted model computes exactly the same function.
    """
    _check_perms(spec, perms)
    spec.check(shapes_of({t: state_dict[t] for t in spec.tensors if t in state_dict}), label="state dict")
    return {name: permute_tensor(name, t, spec, perms) for name, t in state_dict.items()}
