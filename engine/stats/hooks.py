"""One pass over the data with forward hooks: input Grams, output moments, per-channel corrections.

Gram sums Σ xxᵀ of a layer's input rows accumulate on the device where the input arrives — fp64 on
CPU and on GPUs with full-rate FP64, fp32 (never TF32) on other GPUs
(``methods.precision.stats_dtype``) — and leave that device once per layer at the pass's end.
A row is one non-padding token when the input has the batch mask's [batch, seq] leading shape,
else one sample. Corrections (``PointAffine``) are applied before any measurement at the same
point, so a corrected point is measured as the corrected model computes it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from raymerge.engine.errors import StatsError
from raymerge.engine.methods.precision import stats_dtype, tf32
from raymerge.engine.stats.data import Batch, batch_tokens
from raymerge.engine.stats.models import accepted_inputs, input_device, module_map
from raymerge.engine.stats.moments import Moments


@dataclass(frozen=True)
class PointAffine:
    """A per-channel affine y = scale·x + shift applied to a module's output (last axis)."""

    point: str
    scale: torch.Tensor
    shift: torch.Tensor


@dataclass(frozen=True)
class PassSpec:
    """What one pass over the data collects: Grams of ``gram_layers``, moments at ``points``.

    ``corrections`` are applied to the named modules' outputs during the pass (TACT); with
    ``stop_after`` each forward stops once that point's statistics are taken (later layers are
    not needed, so they are not run).
    """

    gram_layers: tuple[str, ...] = ()
    points: tuple[str, ...] = ()
    corrections: tuple[PointAffine, ...] = ()
    stop_after: str | None = None


@dataclass(frozen=True)
class PassResult:
    """What a pass returns: moments per point, rows per Gram layer, and how much data it saw."""

    moments: dict[str, Moments]
    gram_rows: dict[str, int]
    batches: int
    tokens: int


GramSink = Callable[[str, torch.Tensor, int], None]
"""Receives (layer, Σ xxᵀ on its accumulation device, rows) once per Gram layer at a pass's end."""


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early (the rest of the network is not needed)."""


def first_tensor(out: Any) -> torch.Tensor | None:
    """A module output's tensor: the output itself, or the first item of a tuple/list output; else None."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def _replace_first(out: Any, new: torch.Tensor) -> Any:
    if isinstance(out, torch.Tensor):
        return new
    if isinstance(out, tuple):
        return (new, *out[1:])
    return [new, *out[1:]]


class _TokenMask:
    """The current batch's padding mask, as boolean [batch, seq] on whichever device asks."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self._by_device: dict[torch.device, torch.Tensor] = {}

    def set(self, mask: torch.Tensor | None) -> None:
        self.mask = mask.bool() if mask is not None else None
        self._by_device = {}

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [..., C] as rows [n, C], without padding positions when the mask's shape applies."""
        m = self.mask
        if m is not None and x.dim() == m.dim() + 1 and tuple(x.shape[:-1]) == tuple(m.shape):
            dm = self._by_device.get(x.device)
            if dm is None:
                dm = self._by_device[x.device] = m.to(x.device)
            return x[dm]
        return x.reshape(-1, x.shape[-1])


@dataclass
class _GramAcc:
    total: torch.Tensor | None = None
    rows: int = 0


@dataclass
class HookHandles:
    """The handles of the hooks one pass registered; ``remove`` takes them all off the model."""

    handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _need(modules: Mapping[str, nn.Module], name: str, what: str) -> nn.Module:
    if name not in modules:
        raise StatsError(f"no module named {name!r} in the model ({what})", tensor=name)
    return modules[name]


def affine_hook(scale: torch.Tensor, shift: torch.Tensor) -> Callable[..., Any]:
    """A forward hook replacing the output x by scale·x + shift (per channel, last axis)."""
    cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module: nn.Module, args: Any, out: Any) -> Any:
        x = first_tensor(out)
        if x is None:
            return None
        key = (x.device, x.dtype)
        if key not in cache:
            cache[key] = (scale.to(x.device, x.dtype), shift.to(x.device, x.dtype))
        a, b = cache[key]
        return _replace_first(out, torch.addcmul(b, x, a))

    return hook


def run_pass(
    model: nn.Module,
    batches: Sequence[Batch],
    spec: PassSpec,
    *,
    on_gram: GramSink | None = None,
    progress: bool = False,
    desc: str = "statistics",
) -> PassResult:
    """Run ``batches`` through ``model`` once with hooks for ``spec``; return moments and Gram rows.

    Gram sums Σ xxᵀ (fp64 on CPU and full-FP64 GPUs, else fp32) stay on the device where each
    layer's input arrives until the pass ends, then go to ``on_gram`` one layer at a time and are
    freed. Moments are reduced per batch on the device and merged with Chan's update.
    """
    modules = module_map(model)
    mask = _TokenMask()
    hooks = HookHandles()
    grams: dict[str, _GramAcc] = {n: _GramAcc() for n in spec.gram_layers}
    moments: dict[str, Moments] = {}
    last: dict[str, Any] = {"x": None, "prod": None}  # q/k/v (gate/up) share one input: one product

    def gram_hook(name: str) -> Callable[..., None]:
        acc = grams[name]

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):
                return
            if x is last["x"]:
                prod, n = last["prod"]
            else:
                rows = mask.rows(x.detach())
                dt = stats_dtype("auto", rows.device)
                r = rows.to(dt)
                with tf32(False):  # fp32 Grams on consumer GPUs: full fp32 products, never TF32
                    prod, n = r.T @ r, int(r.shape[0])
                last["x"], last["prod"] = x, (prod, n)
            if acc.total is None:
                acc.total = torch.zeros_like(prod)
            acc.total.add_(prod.to(acc.total.device))
            acc.rows += n

        return hook

    def moment_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            x = first_tensor(out)
            if x is None:
                raise StatsError(f"module output is {type(out).__name__}, not a tensor", tensor=name)
            rows = mask.rows(x.detach())
            m = Moments.of_rows(rows, stats_dtype("auto", rows.device))
            moments[name] = moments[name].merge(m) if name in moments else m
            if spec.stop_after == name:
                raise _StopForward

        return hook

    if spec.stop_after is not None and spec.stop_after not in spec.points:
        raise StatsError("stop_after must be one of the pass's points", tensor=spec.stop_after)
    # Corrections first: hooks run in registration order, so a point that is both corrected and
    # measured in one pass is measured after its correction (what the corrected model computes).
    for c in spec.corrections:
        hooks.handles.append(_need(modules, c.point, "correction").register_forward_hook(affine_hook(c.scale, c.shift)))
    for name in spec.gram_layers:
        hooks.handles.append(_need(modules, name, "Gram layer").register_forward_pre_hook(gram_hook(name)))
    for name in spec.points:
        hooks.handles.append(_need(modules, name, "statistics point").register_forward_hook(moment_hook(name)))

    device = input_device(model)
    accepted = accepted_inputs(model)
    tokens = 0
    it: Any = batches
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(batches, desc=desc, unit="batch", leave=False)
    try:
        with torch.no_grad():
            for batch in it:
                feed = {k: v.to(device) for k, v in batch.items() if accepted is None or k in accepted}
                m = batch.get("attention_mask")
                mask.set(m)
                tokens += batch_tokens(batch)
                with contextlib.suppress(_StopForward):
                    model(**feed)
                last["x"] = last["prod"] = None
    finally:
        hooks.remove()
    rows = {}
    for name, acc in grams.items():
        if acc.total is None:
            raise StatsError("this linear layer was never called in the forward pass; no Gram for it", tensor=name)
        rows[name] = acc.rows
        if on_gram is not None:
            on_gram(name, acc.total, acc.rows)
        acc.total = None
    missing = [p for p in spec.points if p not in moments]
    if missing:
        raise StatsError("statistics point was never reached in the forward pass", tensor=missing[0])
    return PassResult({k: v.cpu() for k, v in moments.items()}, rows, len(batches), tokens)
