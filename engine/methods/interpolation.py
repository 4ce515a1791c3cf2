"""Geometric two-point methods: SLERP and Model Stock (mergekit 0.1.5 semantics)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from raymerge.engine.methods.registry import MergeArgs


def slerp(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """Spherical interpolation from the base (t=0) to the one expert (t=1) over the whole tensor.

    The angle comes from the normalised flattened tensors; nearly collinear pairs
    (|cos| > 0.9995) fall back to linear interpolation. Coefficients apply to the raw tensors.
    """
    assert base is not None and len(experts) == 1
    t = float(args.shared["t"])
    a, b = base, experts[0]
    eps = 1e-8
    na = float(torch.linalg.vector_norm(a))
    nb = float(torch.linalg.vector_norm(b))
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = float(((a / na) * (b / nb)).sum().clamp(-1, 1))
    if abs(dot) > 0.9995:
        ca, cb = 1 - t, t
    else:
        theta = math.acos(dot)
        s = math.sin(theta)
        ca, cb = math.sin((1 - t) * theta) / s, math.sin(t * theta) / s
    return ca * a + cb * b


def model_stock(base: torch.Tensor | None, experts: Sequence[torch.Tensor], args: MergeArgs) -> torch.Tensor:
    """Model Stock (Jang et al. 2024): interpolate between the base and the experts' mean.

    t = k·cosθ / (1 + (k−1)·cosθ) with cosθ the mean pairwise cosine of task vectors, over the
    whole tensor, or per output row with ``filter_wise``. Where the denominator vanishes the
    base is kept.
    """
    assert base is not None and len(experts) >= 2
    filter_wise = bool(args.shared["filter_wise"])
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base.reshape(shape[0], -1)
        ws = [x.unsqueeze(0) if x.dim() == 1 else x.reshape(shape[0], -1) for x in experts]
    else:
        w0 = base.reshape(1, -1)
        ws = [x.reshape(1, -1) for x in experts]
    offsets = [w - w0 for w in ws]
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cos_sum = torch.zeros(w0.shape[0], dtype=w0.dtype, device=w0.device)
    pairs = 0
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            denom = (norms[i] * norms[j]).clamp(min=1e-6)
            cos_sum += ((offsets[i] * offsets[j]).sum(dim=-1) / denom).clamp(-1, 1)
            pairs += 1
    cos = (cos_sum / pairs).unsqueeze(-1)
    k = len(ws)
    denom = 1 + (k - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), k * cos / torch.where(singular, torch.ones_like(denom), denom))
    mean = torch.zeros_like(w0)
    for w in ws:
        mean.add_(w)
    mean.div_(k)
    return (t * mean + (1 - t) * w0).reshape(shape)
