"""Statistics and correction points: which modules to measure, in network order, and what produced them.

Points are module names. ``default`` means, per transformer block, the attention output, the MLP
hidden pre-activation and the block output (module names from ``raymerge.engine.arch``).
``probe_points`` runs one batch to order the points as the network produces them and to find the
``nn.Linear`` / ``nn.LayerNorm`` whose output a point is, which is what folding needs.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from raymerge.engine.arch import block_points
from raymerge.engine.errors import StatsError
from raymerge.engine.stats.data import Batch
from raymerge.engine.stats.hooks import HookHandles, first_tensor
from raymerge.engine.stats.models import accepted_inputs, input_device, module_map

# Modules whose (eval-mode) output is their input object: never the producer of a value.
_PASS_THROUGH = (nn.Dropout, nn.Identity)


@dataclass(frozen=True)
class PointInfo:
    """A statistics/correction point: module name, channels, and the module that produced its value.

    ``producer`` is the innermost ``nn.Linear`` or ``nn.LayerNorm`` whose output tensor *is* the
    point's output (dropout/identity in between), or None (e.g. a residual add): only points with a
    producer can be folded into weights.
    """

    name: str
    channels: int
    producer: str | None
    producer_kind: str | None  # "linear" | "norm"


def block_names(model: nn.Module) -> list[str]:
    """The transformer blocks: children of the largest ``ModuleList`` of same-class modules."""
    best: tuple[int, str, list[str]] = (0, "", [])
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(c) for c in mod}) == 1:
            size = sum(p.numel() for p in mod.parameters())
            if size > best[0]:
                best = (size, name, [f"{name}.{i}" if name else str(i) for i in range(len(mod))])
    return best[2]


def default_points(model: nn.Module) -> list[str]:
    """Per block: attention output, MLP hidden pre-activation, block output (Llama/BERT/ViT/GPT-2 names)."""
    modules = module_map(model)
    out: list[str] = []
    blocks = block_names(model)
    if not blocks:
        raise StatsError("cannot find the transformer blocks of this model", hint="name the points with --points")
    for b in blocks:
        for found in block_points(b, modules):
            if found is None:
                raise StatsError(
                    f"no known attention-output / MLP module in block {b}",
                    tensor=b,
                    hint="name the points with --points (module names or glob patterns)",
                )
            out.append(found)
        out.append(b)
    return out


def expand_points(model: nn.Module, patterns: Sequence[str] | str) -> list[str]:
    """Module names for ``patterns``: ``default``, exact names or glob patterns (``*.mlp.gate_proj``)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    names = list(module_map(model))
    out: list[str] = []
    for pat in patterns:
        if pat == "default":
            hits = default_points(model)
        elif pat in ("none", ""):
            hits = []
        else:
            hits = [n for n in names if n and (n == pat or fnmatch.fnmatchcase(n, pat))]
            if not hits:
                near = [n for n in names if n and pat.split(".")[-1] in n][:3]
                raise StatsError(
                    f"no module matches point {pat!r}",
                    tensor=pat,
                    hint=f"use module names such as {', '.join(near or names[1:4])}",
                )
        out.extend(h for h in hits if h not in out)
    return out


def probe_points(model: nn.Module, batch: Batch, points: Sequence[str]) -> list[PointInfo]:
    """Run one batch to put ``points`` in network order (the order their outputs are produced)
    and find each point's producer module (for folding)."""
    modules = module_map(model)
    fired: list[tuple[str, torch.Tensor | None]] = []
    hooks = HookHandles()

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            fired.append((name, first_tensor(out)))

        return hook

    for name, mod in modules.items():
        if name and not isinstance(mod, _PASS_THROUGH):
            hooks.handles.append(mod.register_forward_hook(record(name)))
    device = input_device(model)
    accepted = accepted_inputs(model)
    try:
        with torch.no_grad():
            model(**{k: v.to(device) for k, v in batch.items() if accepted is None or k in accepted})
    finally:
        hooks.remove()
    first_fire: dict[str, int] = {}
    for i, (n, _) in enumerate(fired):
        first_fire.setdefault(n, i)
    missing = [p for p in points if p not in first_fire]
    if missing:
        raise StatsError("point was never called in a forward pass", tensor=missing[0])
    infos = []
    for p in sorted(points, key=lambda n: first_fire[n]):
        i = first_fire[p]
        out = fired[i][1]
        if out is None:
            raise StatsError("point's output is not a tensor", tensor=p)
        producer = None
        # The earliest call inside p's subtree that returned this very tensor made it.
        for n, o in fired[: i + 1]:
            if o is out and (n == p or n.startswith(p + ".")):
                producer = n
                break
        kind = None
        if producer is not None:
            mod = modules[producer]
            if isinstance(mod, nn.Linear):
                kind = "linear"
            elif isinstance(mod, nn.LayerNorm) and mod.elementwise_affine:
                kind = "norm"
        infos.append(PointInfo(p, int(out.shape[-1]), producer if kind else None, kind))
    return infos
